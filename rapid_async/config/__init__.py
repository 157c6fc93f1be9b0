"""Typed run configuration: dataclasses, TOML files, `--set a.b=c` overrides.

Used by every process (learner, actor, launcher, tune). One TOML file describes
a run; each table maps to one dataclass below and every field carries a
docstring. `load_config(path, overrides)` reads the file, applies overrides and
validates; validation errors are `ValueError`s that name the field and the fix.

Modules (import every name from `rapid_async.config`, which re-exports them):
- `sections.py`: the dataclasses, one per TOML table, each field with its
  docstring, and the allowed values of the choice fields.
- `validate.py`: `Config.validate`, the checks across fields.
- `load.py`: TOML files, `--set` overrides, type coercion, writing TOML back.
"""

from rapid_async.config.load import (_coerce, _literal, _task_option, _toml_value, apply_dict,
                                     config_from_dict, dumps_toml, field_docs, load_config,
                                     parse_overrides, resolve_device)
from rapid_async.config.sections import (_DEVICE, AGGREGATIONS, COMPUTE_DTYPES, DTYPES, ENGINES,
                                         LOSSES, MODES, PROMPT_FORMATS, TRUNCATED, ActorConfig,
                                         AlgoConfig, Config, EnvConfig, LearnerConfig, MetricsConfig,
                                         ModelConfig, RunConfig, TaskConfig, TransportConfig)
from rapid_async.config.validate import (_check_choice, _check_gpu_list, _check_positive,
                                         episode_token_cap, validate_config)

__all__ = [
    "AGGREGATIONS", "COMPUTE_DTYPES", "DTYPES", "ENGINES", "LOSSES", "MODES", "PROMPT_FORMATS",
    "TRUNCATED", "ActorConfig", "AlgoConfig", "Config", "EnvConfig", "LearnerConfig", "MetricsConfig",
    "ModelConfig", "RunConfig", "TaskConfig", "TransportConfig", "apply_dict",
    "config_from_dict", "dumps_toml", "episode_token_cap", "field_docs", "load_config", "parse_overrides",
    "resolve_device", "validate_config",
]
