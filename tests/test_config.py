"""Tests of rapid_async.config: defaults, TOML files, --set overrides, validation."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from rapid_async.config import (
    Config,
    _coerce,
    config_from_dict,
    dumps_toml,
    field_docs,
    load_config,
    parse_overrides,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.toml"))
SECTIONS = [type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)]


def test_defaults_validate():
    cfg = Config().validate()
    assert cfg.run.mode == "rapid-async"
    assert cfg.updates_per_batch == cfg.learner.batch_groups // cfg.learner.minibatch_groups
    assert load_config().to_dict() == Config().to_dict()


def test_config_directory_is_not_empty():
    assert CONFIG_FILES, f"no TOML files in {CONFIG_DIR}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    out = tmp_path / "again.toml"
    out.write_text(dumps_toml(cfg))
    assert load_config(out).to_dict() == cfg.to_dict()


def test_file_values_are_applied(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[learner]\nlr = 3e-4\nbatch_groups = 12\nminibatch_groups = 4\n'
                    '[algo]\neta = inf\ntemperature = 1\n[run]\nmode = "rapid-sync"\n')
    cfg = load_config(path)
    assert cfg.learner.lr == 3e-4
    assert cfg.learner.batch_groups == 12 and cfg.updates_per_batch == 3
    assert cfg.algo.eta == math.inf
    assert cfg.algo.temperature == 1.0 and isinstance(cfg.algo.temperature, float)
    assert cfg.run.mode == "rapid-sync"


def test_overrides_coerce_types():
    cfg = load_config(overrides=[
        "learner.lr=3e-4", "learner.batch_groups=12", "learner.minibatch_groups=4",
        "algo.eta=inf", "run.mode=rapid-sync", "run.run_dir=runs/x=y", "run.max_seconds=2",
    ])
    assert cfg.learner.lr == pytest.approx(3e-4, rel=0) and isinstance(cfg.learner.lr, float)
    assert cfg.learner.batch_groups == 12 and isinstance(cfg.learner.batch_groups, int)
    assert cfg.algo.eta == math.inf
    assert cfg.run.mode == "rapid-sync"
    assert cfg.run.run_dir == "runs/x=y"  # only the first "=" splits
    assert cfg.run.max_seconds == 2.0 and isinstance(cfg.run.max_seconds, float)


def test_overrides_win_over_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[learner]\nlr = 3e-4\n")
    assert load_config(path, ["learner.lr=5e-5"]).learner.lr == 5e-5


@pytest.mark.parametrize("text, expected", [("true", True), ("False", False), ("1", True),
                                            ("0", False), (True, True)])
def test_bool_coercion(text, expected):
    assert _coerce("x.flag", text, bool) is expected


@pytest.mark.parametrize("value, typ", [("yes", bool), (1, bool), ("1.5", int), (True, int),
                                        (2.0, int), ("abc", float), (True, float), (3, str)])
def test_coercion_rejects_wrong_types(value, typ):
    with pytest.raises(ValueError, match=r"x\.field"):
        _coerce("x.field", value, typ)


def test_parse_overrides_rejects_malformed():
    for bad in ("lr=3e-4", "learner.lr", "=3"):
        with pytest.raises(ValueError, match="section.key=value"):
            parse_overrides([bad])
    assert parse_overrides([" learner.lr = 3e-4 "]) == {"learner": {"lr": "3e-4"}}


@pytest.mark.parametrize("overrides, field", [
    (["nosuch.lr=1"], "nosuch"),
    (["learner.nosuch=1"], "learner.nosuch"),
    (["learner.batch_groups=abc"], "learner.batch_groups"),
    (["learner.lr=fast"], "learner.lr"),
    (["run.mode=turbo"], "run.mode"),
    (["algo.loss=ppo"], "algo.loss"),
    (["algo.aggregation=sum"], "algo.aggregation"),
    (["algo.baseline=mean"], "algo.baseline"),
    (["actor.engine=tgi"], "actor.engine"),
    (["model.inference_dtype=int8"], "model.inference_dtype"),
    (["learner.batch_groups=10", "learner.minibatch_groups=4"], "learner.batch_groups"),
    (["run.mode=grpo", "learner.batch_groups=16", "learner.minibatch_groups=8"],
     "learner.batch_groups"),
    (["transport.host=0.0.0.0"], "transport.host"),
    (["transport.host=192.168.1.5"], "transport.host"),
    (["learner.minibatch_groups=0"], "learner.minibatch_groups"),
    (["learner.max_staleness=-1"], "learner.max_staleness"),
    (["algo.group_size=1"], "algo.group_size"),
    (["algo.temperature=0"], "algo.temperature"),
    (["algo.eps=1.5"], "algo.eps"),
    (["algo.eta=0"], "algo.eta"),
    (["learner.lr=0"], "learner.lr"),
    (["learner.buffer_groups=4", "learner.minibatch_groups=8", "learner.batch_groups=8"],
     "learner.buffer_groups"),
    (["algo.temperature=nan"], "algo.temperature"),
    (["algo.eta=nan"], "algo.eta"),
    (["algo.truncated=drop"], "algo.truncated"),
    (["task.prompt_format=html"], "task.prompt_format"),
    (["task.failure_reward=nan"], "task.failure_reward"),
    (["task.failure_reward=inf"], "task.failure_reward"),
    (["learner.device=gpu0"], "learner.device"),
    (["actor.device=cuda:x"], "actor.device"),
    (["task.stop=[1, 2]"], "task.stop"),
    (["learner.micro_batch_tokens=-1"], "learner.micro_batch_tokens"),
    (["learner.logprob_chunk_tokens=0"], "learner.logprob_chunk_tokens"),
    (["learner.compute_dtype=float16"], "learner.compute_dtype"),
    (["model.train_dtype=bfloat16"], "model.train_dtype"),
    (["learner.devices=0"], "learner.devices"),
    (["learner.gpus=0;1"], "learner.gpus"),
    (["actor.gpus=a"], "actor.gpus"),
    (["learner.max_skipped_steps=-1"], "learner.max_skipped_steps"),
    (["learner.sync_every=4", "learner.max_staleness=2"], "learner.sync_every"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError) as info:
        load_config(overrides=overrides)
    assert field in str(info.value)


def test_valid_edge_values_pass():
    cfg = load_config(overrides=["run.mode=grpo", "learner.batch_groups=8",
                                 "learner.minibatch_groups=8", "learner.max_staleness=0",
                                 "transport.host=localhost", "algo.eta=inf"])
    assert cfg.run.mode == "grpo" and cfg.learner.max_staleness == 0


def test_file_errors_name_file_and_field(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ValueError, match="does not exist"):
        load_config(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("[learner\nlr = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(broken)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[learner]\nbatch_groups = "many"\n')
    with pytest.raises(ValueError, match=r"learner\.batch_groups") as info:
        load_config(wrong)
    assert "wrong.toml" in str(info.value)
    flat = tmp_path / "flat.toml"
    flat.write_text("learner = 3\n")
    with pytest.raises(ValueError, match=r"\[learner\] must be a table"):
        load_config(flat)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[leaner]\nlr = 1e-4\n")
    with pytest.raises(ValueError, match=r"unknown section \[leaner\]"):
        load_config(unknown)


def test_dumps_toml_round_trips_every_field(tmp_path):
    cfg = load_config(overrides=["algo.eta=inf", "learner.lr=1e-06", "run.max_seconds=2.5",
                                 "run.mode=rapid-sync"])
    cfg.run.run_dir = 'runs/a "quoted" \\ dir'
    path = tmp_path / "dump.toml"
    path.write_text(dumps_toml(cfg))
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_every_section_field_is_documented():
    assert len(SECTIONS) == 9  # model, task, algo, run, learner, actor, transport, metrics, env
    for cls in SECTIONS:
        assert dataclasses.is_dataclass(cls)
        docs = field_docs(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        assert set(docs) == set(names), f"{cls.__name__}: undocumented {set(names) - set(docs)}"
        for name in names:
            assert len(docs[name]) > 10, f"{cls.__name__}.{name}: docstring too short"
            assert "\n" not in docs[name]


def test_task_options_table_flat_keys_and_overrides(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[task]\nname = "gsm8k"\nprompt_format = "chat"\nseed = 3\n'
                    'stop = ["\\n\\n"]\n[task.options]\ntrain_path = "a.jsonl"\nheldout_size = 5\n')
    cfg = load_config(path, ["task.options.heldout_size=7", "task.options.hf_config=main"])
    assert cfg.task.options == {"seed": 3, "train_path": "a.jsonl", "heldout_size": 7,
                                "hf_config": "main"}
    assert cfg.task.stop == ["\n\n"] and cfg.task.prompt_format == "chat"
    out = tmp_path / "again.toml"
    out.write_text(dumps_toml(cfg))
    assert load_config(out).to_dict() == cfg.to_dict()


def test_new_defaults_make_sense_for_real_tasks():
    cfg = Config().validate()
    assert cfg.algo.max_new_tokens >= 512 and cfg.algo.truncated == "keep"
    assert cfg.learner.device == "auto" and cfg.actor.device == "auto"
    assert cfg.task.prompt_format == "plain" and cfg.task.failure_reward == 0.0


def test_auto_device_is_the_cpu_without_a_gpu():
    import torch

    from rapid_async.config import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == "cuda:1"


def test_settings_that_cannot_make_progress_are_refused_with_the_fix():
    # rapid-async publishes every sync_every steps, so data is up to
    # sync_every - 1 versions old when it is used: with a tighter staleness
    # bound every group would be dropped and training would never step.
    with pytest.raises(ValueError) as info:
        load_config(overrides=["run.mode=rapid-async", "learner.sync_every=8",
                               "learner.max_staleness=4"])
    text = str(info.value)
    assert "learner.sync_every = 8" in text and "learner.max_staleness = 4" in text
    assert "learner.max_staleness >= 7" in text and "learner.sync_every <= 5" in text
    # the boundary makes progress, and the sync modes do not use sync_every
    load_config(overrides=["learner.sync_every=5", "learner.max_staleness=4"])
    load_config(overrides=["run.mode=rapid-sync", "learner.sync_every=8",
                           "learner.max_staleness=0"])
