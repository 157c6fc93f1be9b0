"""Validation of a run configuration: each field's range and the checks across fields.

Used by every process through `Config.validate` (`load_config` calls it). Each
problem is a ValueError that names the field and the fix; settings under which
training could never take a step are refused here too.
"""

from __future__ import annotations

import math
from typing import Any

from rapid_async.config.sections import (_DEVICE, AGGREGATIONS, BASELINES, COMPUTE_DTYPES, DTYPES,
                                         ENGINES, LOSSES, RECORD_REPLAY, MODES, PROMPT_FORMATS, TRUNCATED, Config)


def validate_config(cfg: Config) -> Config:
    """Check every field of `cfg` and the fields against each other; `Config.validate`.

    Returns:
        cfg.

    Raises:
        ValueError: naming the field and the fix.
    """
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            if isinstance(value, float) and math.isnan(value):
                raise ValueError(f"{section}.{key} = nan: set a number")
    _check_choice("run.mode", cfg.run.mode, MODES)
    _check_choice("algo.loss", cfg.algo.loss, LOSSES)
    _check_choice("algo.aggregation", cfg.algo.aggregation, AGGREGATIONS)
    _check_choice("algo.baseline", cfg.algo.baseline, BASELINES)
    _check_choice("learner.record_replay", cfg.learner.record_replay, RECORD_REPLAY)
    if cfg.learner.record_replay == "on" and cfg.learner.devices > 1:
        raise ValueError(f"learner.record_replay = \"on\" needs learner.devices = 1 (got "
                         f"{cfg.learner.devices}): replay records one rank's weights; use auto or off")
    _check_choice("actor.engine", cfg.actor.engine, ENGINES)
    _check_choice("model.inference_dtype", cfg.model.inference_dtype, DTYPES)
    _check_choice("model.train_dtype", cfg.model.train_dtype, DTYPES)
    if cfg.model.train_dtype != "float32":
        raise ValueError(
            f"model.train_dtype = {cfg.model.train_dtype!r}: master weights must be float32 "
            "(AdamW steps at small learning rates vanish in 16-bit weights); for 16-bit "
            "arithmetic set learner.compute_dtype = \"bfloat16\"")
    _check_choice("learner.compute_dtype", cfg.learner.compute_dtype, COMPUTE_DTYPES)
    for name in ("learner.gpus", "actor.gpus"):
        _check_gpu_list(name, cfg._get(name))
    _check_choice("algo.truncated", cfg.algo.truncated, TRUNCATED)
    _check_choice("task.prompt_format", cfg.task.prompt_format, PROMPT_FORMATS)
    for name in ("learner.device", "actor.device"):
        if not _DEVICE.match(cfg._get(name)):
            raise ValueError(f"{name} = {cfg._get(name)!r} is not a device: use auto, cpu, "
                             "cuda or cuda:N")
    if not math.isfinite(cfg.task.failure_reward):
        raise ValueError(f"task.failure_reward = {cfg.task.failure_reward} must be finite")
    if not isinstance(cfg.task.options, dict) or not all(
            isinstance(k, str) for k in cfg.task.options):
        raise ValueError("task.options must be a table with string keys")
    for name in ("algo.group_size", "algo.max_new_tokens", "run.max_steps",
                 "run.eval_size", "learner.batch_groups",
                 "learner.minibatch_groups", "learner.sync_every",
                 "learner.buffer_groups", "actor.chunk_groups", "run.keep_checkpoints",
                 "actor.learner_timeout_s",
                 "transport.rollout_hwm", "transport.weights_hwm",
                 "learner.logprob_chunk_tokens", "learner.devices", "learner.max_actors",
                 "actor.heartbeat_s", "learner.actor_timeout_s", "actor.inflight_subchunks"):
        _check_positive(name, cfg._get(name))
    for name in ("run.eval_every", "run.checkpoint_every", "run.checkpoint_minutes",
                 "run.max_seconds", "run.eval_samples", "run.eval_timeout_s",
                 "learner.max_staleness", "learner.weight_decay",
                 "learner.grad_clip", "algo.beta", "transport.port",
                 "actor.rejoin_timeout_s", "actor.max_batch_rows",
                 "learner.micro_batch_tokens",
                 "learner.max_skipped_steps", "transport.delta_chain_mb",
                 "transport.max_connections", "learner.max_groups_per_actor", "learner.grant_timeout_factor",
                 "learner.grant_timeout_min_s", "learner.stop_after_rejected_s",
                 "learner.stop_after_rejected_groups"):
        if cfg._get(name) < 0:
            raise ValueError(f"{name} = {cfg._get(name)} must be >= 0")
    if cfg.algo.temperature <= 0:
        raise ValueError(f"algo.temperature = {cfg.algo.temperature} must be > 0 "
                         "(behaviour log-probs need a sampling distribution)")
    if not 0 < cfg.algo.eps < 1:
        raise ValueError(f"algo.eps = {cfg.algo.eps} must be in (0, 1)")
    if cfg.algo.eta <= 0:
        raise ValueError(f"algo.eta = {cfg.algo.eta} must be > 0 (use inf for no truncation)")
    if not 0 < cfg.learner.lr < 1:
        raise ValueError(f"learner.lr = {cfg.learner.lr} must be in (0, 1)")
    if cfg.algo.group_size < 2:
        raise ValueError(f"algo.group_size = {cfg.algo.group_size}: group advantages "
                         "need K >= 2 completions per prompt")
    lb = cfg.learner
    if lb.batch_groups % lb.minibatch_groups:
        raise ValueError(
            f"learner.batch_groups = {lb.batch_groups} must be a multiple of "
            f"learner.minibatch_groups = {lb.minibatch_groups} (a mini-batch is made "
            "of whole groups)")
    if cfg.run.mode == "grpo" and lb.batch_groups != lb.minibatch_groups:
        raise ValueError(
            "run.mode = 'grpo' is on-policy: set learner.batch_groups equal to "
            f"learner.minibatch_groups (got {lb.batch_groups} and {lb.minibatch_groups})")
    if cfg.run.mode == "rapid-async" and lb.buffer_groups < lb.minibatch_groups:
        raise ValueError(
            f"learner.buffer_groups = {lb.buffer_groups} must be >= "
            f"learner.minibatch_groups = {lb.minibatch_groups}")
    _validate_lora(cfg)
    _validate_env(cfg)
    _validate_metrics(cfg)
    _validate_transport(cfg)
    _check_progress(cfg)
    return cfg


def _validate_lora(cfg: Config) -> None:
    """LoRA settings: a positive rank and alpha, dropout in [0, 1), named target
    modules, one learner rank."""
    lb = cfg.learner
    _check_positive("learner.lora_rank", lb.lora_rank)
    if not (math.isfinite(lb.lora_alpha) and lb.lora_alpha > 0):
        raise ValueError(f"learner.lora_alpha = {lb.lora_alpha} must be a finite number > 0")
    if not 0 <= lb.lora_dropout < 1:
        raise ValueError(f"learner.lora_dropout = {lb.lora_dropout} must be in [0, 1)")
    if not lb.lora_target_modules or not all(
            isinstance(m, str) and m.strip() for m in lb.lora_target_modules):
        raise ValueError(f"learner.lora_target_modules = {lb.lora_target_modules!r}: name the "
                         "Linear modules that get adapters, e.g. [\"q_proj\", \"v_proj\"]")
    if lb.lora and lb.devices > 1:
        raise ValueError(f"learner.lora = true needs learner.devices = 1 (got {lb.devices}): "
                         "LoRA with several FSDP learner ranks is not supported; an adapter "
                         "run fits one device, or set learner.lora = false")


def _validate_env(cfg: Config) -> None:
    """Environment limits: positive turns, an episode cap that fits one model turn."""
    env = cfg.env
    if not isinstance(env.options, dict) or not all(isinstance(k, str) for k in env.options):
        raise ValueError("env.options must be a table with string keys")
    _check_positive("env.max_turns", env.max_turns)
    _check_positive("env.step_workers", env.step_workers)
    for name in ("env.max_episode_tokens", "env.concurrency"):
        if cfg._get(name) < 0:
            raise ValueError(f"{name} = {cfg._get(name)} must be >= 0")
    if 0 < env.max_episode_tokens < cfg.algo.max_new_tokens:
        raise ValueError(
            f"env.max_episode_tokens = {env.max_episode_tokens} is less than one model turn "
            f"(algo.max_new_tokens = {cfg.algo.max_new_tokens}): raise it, or set 0 for "
            "max_turns * max_new_tokens")


def episode_token_cap(cfg: Config) -> int:
    """Tokens after the prompt an episode may hold: env.max_episode_tokens, or
    max_turns * algo.max_new_tokens when it is 0 (algo.max_new_tokens without an env)."""
    if not cfg.env.name:
        return cfg.algo.max_new_tokens
    return cfg.env.max_episode_tokens or cfg.env.max_turns * cfg.algo.max_new_tokens


def _validate_transport(cfg: Config) -> None:
    """Refuse a CURVE setup with missing key files, or a non-loopback host without CURVE."""
    from rapid_async.wire.security import is_loopback

    t = cfg.transport
    curve = bool(t.curve_secret_key)
    if curve and not (t.curve_public_key and t.authorized_keys):
        raise ValueError(
            "transport.curve_secret_key is set: also set transport.curve_public_key (the "
            "learner's public key file) and transport.authorized_keys (the actors' public "
            "key file or directory); rapid-keys makes key pairs")
    if not curve and (t.curve_public_key or t.authorized_keys):
        raise ValueError(
            "transport.curve_public_key / transport.authorized_keys need "
            "transport.curve_secret_key (the learner's secret key file) to turn CURVE on")
    if not is_loopback(t.host) and not curve:
        raise ValueError(
            f"transport.host = {t.host!r} is not loopback: set transport.curve_secret_key, "
            "curve_public_key and authorized_keys (rapid-keys makes key pairs) so that only "
            "your actors can connect, or bind 127.0.0.1 and tunnel")


def _validate_metrics(cfg: Config) -> None:
    """Refuse a metrics backend whose package is not installed, or an unknown wandb mode."""
    from rapid_async.metrics_backends import missing_package, parse_backends

    for name in parse_backends(cfg.metrics.backends):
        package = missing_package(name)
        if package:
            raise ValueError(f"metrics.backends = {cfg.metrics.backends!r}: {name} needs "
                             f"the {package} package; pip install {package}, or leave "
                             f"{name} out")
    _check_choice("metrics.wandb_mode", cfg.metrics.wandb_mode,
                  ("", "online", "offline", "disabled"))


def _check_progress(cfg: Config) -> None:
    """Refuse settings under which training can never take a step."""
    lb = cfg.learner
    if lb.actor_timeout_s < 3 * cfg.actor.heartbeat_s:
        raise ValueError(
            f"learner.actor_timeout_s = {lb.actor_timeout_s} is less than 3 heartbeats "
            f"(actor.heartbeat_s = {cfg.actor.heartbeat_s}): live actors would be taken "
            f"for gone and their work handed out again. Raise learner.actor_timeout_s to "
            f">= {3 * cfg.actor.heartbeat_s:g} or lower actor.heartbeat_s")
    if cfg.run.mode == "rapid-async" and lb.sync_every > lb.max_staleness + 1:
        # Actors only ever hold published versions p (multiples of
        # sync_every); the learner at version p + sync_every - 1 still needs
        # data of staleness sync_every - 1, so every group would arrive stale.
        raise ValueError(
            f"learner.sync_every = {lb.sync_every} with learner.max_staleness = "
            f"{lb.max_staleness} cannot make progress in rapid-async: between two "
            f"publishes every group becomes up to sync_every - 1 = {lb.sync_every - 1} "
            "versions stale and is dropped. Set learner.max_staleness >= "
            f"{lb.sync_every - 1} or learner.sync_every <= {lb.max_staleness + 1}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} = {value!r} is not one of {', '.join(choices)}")


def _check_gpu_list(name: str, value: str) -> None:
    if value and not all(part.strip().isdigit() for part in value.split(",")):
        raise ValueError(f"{name} = {value!r}: expected GPU indices separated by commas, "
                         "e.g. \"0,1\" (empty: automatic)")


def _check_positive(name: str, value: Any) -> None:
    if value <= 0:
        raise ValueError(f"{name} = {value} must be > 0")
