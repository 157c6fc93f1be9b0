"""Typed run configuration: dataclasses, TOML files, `--set a.b=c` overrides.

Used by every process (learner, actor, launcher, tune). One TOML file describes
a run; each table maps to one dataclass below and every field carries a
docstring. `load_config(path, overrides)` reads the file, applies overrides and
validates; validation errors are `ValueError`s that name the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

MODES = ("grpo", "rapid-sync", "rapid-async")
LOSSES = ("rapid", "grpo", "pg", "rapid_no_is")
AGGREGATIONS = ("sequence-mean", "token-mean")
ENGINES = ("hf", "vllm")
TRUNCATED = ("keep", "zero-reward", "mask")
PROMPT_FORMATS = ("plain", "chat")
_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
DTYPES = ("float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class ModelConfig:
    path: str = ""
    """Hugging Face model directory. Empty: the tiny warm-started CPU model,
    built from code and cached under .cache/ (see rapid_async.tinymodel)."""

    inference_dtype: str = "float32"
    """dtype of the actor's weights; updates are exact in this dtype."""

    train_dtype: str = "float32"
    """dtype of the learner's master weights and AdamW state: float32 (low
    precision arithmetic is `learner.compute_dtype`; bf16 master weights lose
    updates at small learning rates, so they are refused)."""


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    """Task: a built-in name (arithmetic, gsm8k, math, mbpp, minif2f), the name
    of an entry point in the group "rapid_async.tasks", or "package.module:Class"
    (see rapid_async.tasks.base)."""

    options: dict[str, Any] = field(default_factory=dict)
    """The [task.options] table, passed to the task's constructor, which
    validates it (e.g. digits, ops, seed for arithmetic; path, split for the
    dataset tasks). Keys written directly under [task] that are not fields of
    this table (e.g. the older `digits = 2`) are task options too."""

    prompt_format: str = "plain"
    """plain (the problem text as it is) or chat (the tokenizer's chat
    template, with system_prompt as the system message)."""

    system_prompt: str = ""
    """System message in chat format ("" : the task's default, if any)."""

    stop: list[str] = field(default_factory=list)
    """Stop strings, added to the task's own; generation ends after the first
    one that appears (EOS always ends it)."""

    failure_reward: float = 0.0
    """Reward given when the verifier raises or returns a non-finite value
    (such completions are counted and logged with their prompt id)."""


@dataclass
class AlgoConfig:
    loss: str = "rapid"
    """Objective: rapid | grpo | pg | rapid_no_is (DESIGN.md section 2)."""

    group_size: int = 4
    """K: completions sampled per prompt."""

    eta: float = 2.0
    """Truncation of the sequence importance weight."""

    eps: float = 0.2
    """PPO clip range."""

    beta: float = 0.0
    """KL coefficient to a frozen reference model (0: no reference model; the
    GRPO baseline of DESIGN.md uses 0.04, set it explicitly)."""

    aggregation: str = "sequence-mean"
    """How token losses are averaged: sequence-mean | token-mean."""

    temperature: float = 1.0
    """Sampling temperature, used by the actor and by the learner's log-probs."""

    max_new_tokens: int = 1024
    """Cap on completion length in tokens (the paper allows up to 2048; the
    CPU quickstart sets 6)."""

    truncated: str = "keep"
    """What the learner does with completions cut at max_new_tokens
    (finish_reason "length"): keep (train on them as they are), zero-reward
    (their reward becomes 0) or mask (they take no part in the loss)."""


@dataclass
class RunConfig:
    mode: str = "rapid-async"
    """grpo (on-policy), rapid-sync (the paper) or rapid-async (this project)."""

    run_dir: str = "runs/default"
    """Where metrics.jsonl, checkpoints and plots go."""

    seed: int = 0
    """Seed for model init, data order and sampling."""

    max_steps: int = 100
    """Stop after this many optimizer steps."""

    max_seconds: float = 0.0
    """Stop after this many seconds of training (0: no limit)."""

    eval_every: int = 10
    """Held-out evaluation every N optimizer steps (0: only at start and end).
    An actor evaluates, at the first published version at or past each
    multiple of N; the learner records the result when it arrives."""

    eval_size: int = 200
    """Number of held-out problems per evaluation."""

    eval_samples: int = 0
    """Sampled completions per held-out problem (at algo.temperature) for
    eval/pass@k, besides the greedy one (0: greedy success only)."""

    eval_timeout_s: float = 300.0
    """At the end of a run, how long the learner waits for an actor's final
    evaluation (2 s when no actor is connected); then it records the
    evaluation as missing (event "eval_missing")."""

    checkpoint_every: int = 100
    """Save a checkpoint every N optimizer steps (0: not by steps). Written by
    a background thread from a copy; training waits only for the copy."""

    checkpoint_minutes: float = 30.0
    """Also save a checkpoint every M minutes of wall time (0: not by time)."""

    keep_checkpoints: int = 2
    """Keep the newest K checkpoints and delete older ones (the one written at
    the end of a run is always among them)."""


@dataclass
class LearnerConfig:
    lr: float = 1e-4
    """Adam learning rate (the paper uses 1e-6 for 0.5B-3B models; the tiny
    CPU model needs more)."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""

    batch_groups: int = 32
    """Groups per inference batch (one round in grpo / rapid-sync)."""

    minibatch_groups: int = 8
    """Groups per optimizer step. H = batch_groups / minibatch_groups updates
    per inference batch."""

    sync_every: int = 1
    """Publish new weights every N optimizer steps (rapid-async)."""

    max_staleness: int = 4
    """Drop groups generated more than this many versions ago (rapid-async)."""

    buffer_groups: int = 64
    """Capacity of the rollout buffer plus work handed out (backpressure)."""

    actor_timeout_s: float = 30.0
    """An actor silent this long (no message, no heartbeat) loses its unfinished
    work to the others. Actors send heartbeats while they generate, so a slow
    chunk is not silence; must be >= 3 x actor.heartbeat_s."""

    max_actors: int = 256
    """Most actors the learner keeps state for at once (bounds its memory); a
    Hello beyond that is refused unless a silent, idle actor can be forgotten."""

    device: str = "auto"
    """Torch device of the learner: auto (the GPU this process was given,
    else the CPU), cpu, cuda or cuda:N."""

    micro_batch_tokens: int = 16384
    """Padded tokens (rows x longest prompt + completion) per forward/backward
    pass. A mini-batch is split into micro-batches of whole groups under this
    budget and their gradients accumulated (exactly the full-batch gradient);
    memory then depends on this, not on the mini-batch. 0: one pass."""

    logprob_chunk_tokens: int = 256
    """Completion tokens per lm_head call when computing log-probs: one
    (chunk, vocabulary) block of logits exists at a time."""

    compute_dtype: str = "auto"
    """Arithmetic of forward and backward: auto (bfloat16 on CUDA, float32 on
    CPU), float32 or bfloat16 (autocast; master weights and optimizer state
    stay in float32)."""

    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass instead of keeping its
    activations (less memory, about a third more compute)."""

    devices: int = 1
    """Learner ranks (GPUs on a GPU node): > 1 shards the model with FSDP2
    under torchrun (`rapid-run --learner-devices M`); gloo on CPU."""

    gpus: str = ""
    """GPUs of the learner ranks on this node, e.g. "0,1" (empty: the first
    `devices` GPUs). Used by rapid-run."""

    record_batches: bool = False
    """Save every mini-batch the learner trains on to RUN_DIR/batches/ (safetensors),
    to replay a run on another setup or to debug a skipped step."""

    max_skipped_steps: int = 10
    """Stop with an error after this many consecutive steps skipped for a
    non-finite loss or gradient norm (0: never stop)."""


@dataclass
class ActorConfig:
    engine: str = "hf"
    """Inference engine: hf (transformers) or vllm."""

    chunk_groups: int = 8
    """Groups an actor asks for at once (rapid-async)."""

    device: str = "auto"
    """Torch device of the actor's hf engine: auto (the GPU this process was
    given, else the CPU), cpu, cuda or cuda:N."""

    gpus: str = ""
    """GPUs for the actors on this node, one actor each, e.g. "2,3" (empty:
    every GPU the learner does not use). Used by rapid-run."""

    learner_timeout_s: float = 30.0
    """An actor whose request gets no answer for this long (or that is
    blocked this long sending, and then gets no answer to a ping) takes the
    learner for gone: it says Hello again (the learner may have restarted)
    and resynchronises by snapshot."""

    rejoin_timeout_s: float = 600.0
    """How long an actor keeps trying to reach a learner that went away before
    it gives up and exits with an error."""

    heartbeat_s: float = 1.0
    """Seconds between an actor's heartbeats, sent from a thread of their own,
    also while the engine generates."""


@dataclass
class TransportConfig:
    host: str = "127.0.0.1"
    """Address the learner binds. Loopback by default; other hosts need CURVE."""

    port: int = 0
    """Learner control port that actors connect to (0: a random free port,
    written to RUN_DIR/learner.json)."""

    rollout_hwm: int = 8
    """High-water mark of the rollout queue (messages): full means actors block."""

    weights_hwm: int = 2
    """High-water mark of the weights publisher (messages per actor): updates
    beyond it are dropped for a busy actor, which then catches up from the
    learner's chain of recent deltas (`delta_chain_mb`) or a snapshot."""

    delta_chain_mb: int = 512
    """Megabytes of recent weight deltas the learner keeps for actors that
    missed some (0: keep none, such actors take a snapshot). Never more than
    one uncompressed copy of the inference weights: beyond that a snapshot
    costs less."""

    curve_secret_key: str = ""
    """Path of the learner's CURVE secret key file (NAME.key_secret, made by
    `rapid-keys`). Set: every socket is encrypted and only actors whose keys are
    in `authorized_keys` may connect, on loopback too. Needed for any host
    other than loopback."""

    curve_public_key: str = ""
    """Path of the learner's CURVE public key file (NAME.key): the server key
    actors connect with (`rapid-actor --curve-public-key`; rapid-run passes it
    to its actors). Required with `curve_secret_key`."""

    authorized_keys: str = ""
    """Path of an actor's public key file, or of a directory whose *.key files
    are the actors allowed to connect. Required with `curve_secret_key`; any
    other client is refused: it receives nothing and its messages are dropped."""


@dataclass
class MetricsConfig:
    backends: str = ""
    """Where the learner and actors log besides RUN_DIR/metrics.jsonl: a comma-separated
    list of "tensorboard" (RUN_DIR/tensorboard; needs the tensorboard package) and
    "wandb" (needs the wandb package and a login, or wandb_mode = "offline").
    Empty: metrics.jsonl only."""

    wandb_project: str = "rapid_async"
    """Weights & Biases project of the run."""

    wandb_entity: str = ""
    """Weights & Biases entity (team or user); empty: your default."""

    wandb_mode: str = ""
    """Weights & Biases mode: online, offline or disabled; empty: wandb's default
    (the WANDB_MODE environment variable, else online)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    run: RunConfig = field(default_factory=RunConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def updates_per_batch(self) -> int:
        """H: optimizer updates per inference batch."""
        return self.learner.batch_groups // self.learner.minibatch_groups

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        for section, values in self.to_dict().items():
            for key, value in values.items():
                if isinstance(value, float) and math.isnan(value):
                    raise ValueError(f"{section}.{key} = nan: set a number")
        _check_choice("run.mode", self.run.mode, MODES)
        _check_choice("algo.loss", self.algo.loss, LOSSES)
        _check_choice("algo.aggregation", self.algo.aggregation, AGGREGATIONS)
        _check_choice("actor.engine", self.actor.engine, ENGINES)
        _check_choice("model.inference_dtype", self.model.inference_dtype, DTYPES)
        _check_choice("model.train_dtype", self.model.train_dtype, DTYPES)
        if self.model.train_dtype != "float32":
            raise ValueError(
                f"model.train_dtype = {self.model.train_dtype!r}: master weights must be float32 "
                "(AdamW steps at small learning rates vanish in 16-bit weights); for 16-bit "
                "arithmetic set learner.compute_dtype = \"bfloat16\"")
        _check_choice("learner.compute_dtype", self.learner.compute_dtype, COMPUTE_DTYPES)
        for name in ("learner.gpus", "actor.gpus"):
            _check_gpu_list(name, self._get(name))
        _check_choice("algo.truncated", self.algo.truncated, TRUNCATED)
        _check_choice("task.prompt_format", self.task.prompt_format, PROMPT_FORMATS)
        for name in ("learner.device", "actor.device"):
            if not _DEVICE.match(self._get(name)):
                raise ValueError(f"{name} = {self._get(name)!r} is not a device: use auto, cpu, "
                                 "cuda or cuda:N")
        if not math.isfinite(self.task.failure_reward):
            raise ValueError(f"task.failure_reward = {self.task.failure_reward} must be finite")
        if not isinstance(self.task.options, dict) or not all(
                isinstance(k, str) for k in self.task.options):
            raise ValueError("task.options must be a table with string keys")
        for name in ("algo.group_size", "algo.max_new_tokens", "run.max_steps",
                     "run.eval_size", "learner.batch_groups",
                     "learner.minibatch_groups", "learner.sync_every",
                     "learner.buffer_groups", "actor.chunk_groups", "run.keep_checkpoints",
                     "actor.learner_timeout_s",
                     "transport.rollout_hwm", "transport.weights_hwm",
                     "learner.logprob_chunk_tokens", "learner.devices", "learner.max_actors",
                     "actor.heartbeat_s", "learner.actor_timeout_s"):
            _check_positive(name, self._get(name))
        for name in ("run.eval_every", "run.checkpoint_every", "run.checkpoint_minutes",
                     "run.max_seconds", "run.eval_samples", "run.eval_timeout_s",
                     "learner.max_staleness", "learner.weight_decay",
                     "learner.grad_clip", "algo.beta", "transport.port",
                     "actor.rejoin_timeout_s",
                     "learner.micro_batch_tokens",
                     "learner.max_skipped_steps", "transport.delta_chain_mb"):
            if self._get(name) < 0:
                raise ValueError(f"{name} = {self._get(name)} must be >= 0")
        if self.algo.temperature <= 0:
            raise ValueError(f"algo.temperature = {self.algo.temperature} must be > 0 "
                             "(behaviour log-probs need a sampling distribution)")
        if not 0 < self.algo.eps < 1:
            raise ValueError(f"algo.eps = {self.algo.eps} must be in (0, 1)")
        if self.algo.eta <= 0:
            raise ValueError(f"algo.eta = {self.algo.eta} must be > 0 (use inf for no truncation)")
        if not 0 < self.learner.lr < 1:
            raise ValueError(f"learner.lr = {self.learner.lr} must be in (0, 1)")
        if self.algo.group_size < 2:
            raise ValueError(f"algo.group_size = {self.algo.group_size}: group advantages "
                             "need K >= 2 completions per prompt")
        lb = self.learner
        if lb.batch_groups % lb.minibatch_groups:
            raise ValueError(
                f"learner.batch_groups = {lb.batch_groups} must be a multiple of "
                f"learner.minibatch_groups = {lb.minibatch_groups} (a mini-batch is made "
                "of whole groups)")
        if self.run.mode == "grpo" and lb.batch_groups != lb.minibatch_groups:
            raise ValueError(
                "run.mode = 'grpo' is on-policy: set learner.batch_groups equal to "
                f"learner.minibatch_groups (got {lb.batch_groups} and {lb.minibatch_groups})")
        if self.run.mode == "rapid-async" and lb.buffer_groups < lb.minibatch_groups:
            raise ValueError(
                f"learner.buffer_groups = {lb.buffer_groups} must be >= "
                f"learner.minibatch_groups = {lb.minibatch_groups}")
        self._validate_metrics()
        self._validate_transport()
        self._check_progress()
        return self

    def _validate_transport(self) -> None:
        from rapid_async.wire.security import is_loopback

        t = self.transport
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

    def _validate_metrics(self) -> None:
        from rapid_async.metrics_backends import missing_package, parse_backends

        for name in parse_backends(self.metrics.backends):
            package = missing_package(name)
            if package:
                raise ValueError(f"metrics.backends = {self.metrics.backends!r}: {name} needs "
                                 f"the {package} package; pip install {package}, or leave "
                                 f"{name} out")
        _check_choice("metrics.wandb_mode", self.metrics.wandb_mode,
                      ("", "online", "offline", "disabled"))

    def _check_progress(self) -> None:
        """Refuse settings under which training can never take a step."""
        lb = self.learner
        if lb.actor_timeout_s < 3 * self.actor.heartbeat_s:
            raise ValueError(
                f"learner.actor_timeout_s = {lb.actor_timeout_s} is less than 3 heartbeats "
                f"(actor.heartbeat_s = {self.actor.heartbeat_s}): live actors would be taken "
                f"for gone and their work handed out again. Raise learner.actor_timeout_s to "
                f">= {3 * self.actor.heartbeat_s:g} or lower actor.heartbeat_s")
        if self.run.mode == "rapid-async" and lb.sync_every > lb.max_staleness + 1:
            # Actors only ever hold published versions p (multiples of
            # sync_every); the learner at version p + sync_every - 1 still needs
            # data of staleness sync_every - 1, so every group would arrive stale.
            raise ValueError(
                f"learner.sync_every = {lb.sync_every} with learner.max_staleness = "
                f"{lb.max_staleness} cannot make progress in rapid-async: between two "
                f"publishes every group becomes up to sync_every - 1 = {lb.sync_every - 1} "
                "versions stale and is dropped. Set learner.max_staleness >= "
                f"{lb.sync_every - 1} or learner.sync_every <= {lb.max_staleness + 1}")

    def _get(self, dotted: str) -> Any:
        section, key = dotted.split(".")
        return getattr(getattr(self, section), key)


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


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each dataclass field (for --help and docs)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())  # type: ignore[union-attr]
    return docs


def _literal(text: str) -> Any:
    """A --set value as TOML reads it (3 -> int, true -> bool, [..] -> list),
    else the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(dotted: str, value: Any, typ: Any) -> Any:
    """Check or convert a TOML / --set value to the field's declared type."""
    origin = getattr(typ, "__origin__", None)
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(f"{dotted} = {value!r}: expected a table")
    if origin is list:
        if isinstance(value, str):
            value = _literal(value) if value.strip().startswith("[") else [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"{dotted} = {value!r}: expected a list of strings, e.g. [\"a\", \"b\"]")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ValueError(f"{dotted} = {value!r}: expected a value of type {typ.__name__}")


def _task_option(cfg: Config, key: str, value: Any, from_set: bool) -> None:
    """Store one task option: `options.KEY` (--set) or a key under [task] that is
    not a TaskConfig field (the older flat form, e.g. `digits = 2`)."""
    name = key.split(".", 1)[1] if key.startswith("options.") else key
    cfg.task.options[name] = _literal(value) if from_set and isinstance(value, str) else value


def apply_dict(cfg: Config, data: dict[str, Any], source: str = "config") -> Config:
    """Set fields of `cfg` from a nested dict {section: {key: value}}.

    Under [task], `options` is a free table and keys that are not TaskConfig
    fields become task options (the task validates them when it is built).
    """
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for section, values in data.items():
        if section not in sections:
            raise ValueError(f"{source}: unknown section [{section}]; known: "
                             f"{', '.join(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{section}] must be a table")
        obj = getattr(cfg, section)
        hints = get_type_hints(type(obj))
        for key, value in values.items():
            if section == "task" and (key.startswith("options.") or key not in hints):
                _task_option(cfg, key, value, from_set=source == "--set")
                continue
            if key not in hints:
                raise ValueError(f"{source}: unknown field {section}.{key}; known: "
                                 f"{', '.join(hints)}")
            if section == "task" and key == "options":
                cfg.task.options.update(_coerce(f"{source}: task.options", value, hints[key]))
                continue
            setattr(obj, key, _coerce(f"{source}: {section}.{key}", value, hints[key]))
    return cfg


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ["learner.lr=3e-4", ...] into {"learner": {"lr": "3e-4"}}.

    `task.options.KEY=VALUE` sets one task option (kept as "options.KEY").
    """
    data: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set {item!r}: expected section.key=value, "
                             "e.g. --set learner.lr=3e-4")
        dotted, value = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        data.setdefault(section, {})[key] = value.strip()
    return data


def resolve_device(name: str) -> str:
    """A config device name as torch understands it: "auto" is "cuda" when this
    process sees a GPU (the one the launcher gave it via CUDA_VISIBLE_DEVICES),
    else "cpu"; other names are returned unchanged."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML run config, apply `--set` overrides and validate.

    Raises:
        ValueError: naming the file, field and fix when anything is wrong.
    """
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: not valid TOML: {e}") from None
        apply_dict(cfg, data, source=str(p))
    if overrides:
        apply_dict(cfg, parse_overrides(overrides), source="--set")
    return cfg.validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a validated Config from `Config.to_dict()` output."""
    return apply_dict(Config(), data).validate()


def _toml_value(value: Any) -> str:
    """One value in TOML syntax (tables inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    return repr(value)


def dumps_toml(cfg: Config) -> str:
    """Write a config as TOML (one table per section; task options inline)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
