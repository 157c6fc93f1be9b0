"""The run configuration's sections: one dataclass per TOML table, and `Config`.

Used by every process (learner, actor, launcher, tune) through
`rapid_async.config`. Every field carries a docstring under it (`field_docs`
reads them for --help and docs); `Config.validate` is in `validate.py`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

MODES = ("grpo", "rapid-sync", "rapid-async")
LOSSES = ("rapid", "grpo", "pg", "rapid_no_is")
AGGREGATIONS = ("sequence-mean", "token-mean")
ENGINES = ("hf", "vllm")
TRUNCATED = ("keep", "zero-reward", "mask")
BASELINES = ("paper", "loo")
RECORD_REPLAY = ("auto", "on", "off")
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

    baseline: str = "paper"
    """Group baseline of the advantages: paper | loo. "paper" is DESIGN.md's
    b = (1/K) sum_j wbar_j r_j, which includes the sample's own weighted reward
    and so biases the gradient off-policy; "loo" leaves the sample out,
    b_i = (1/(K-1)) sum_{j != i} wbar_j r_j (unbiased: see rapid_async.loss)."""

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
    """Most actors the learner keeps state for at once (bounds its memory). A
    Hello beyond that forgets the actor that delivered least recently (never
    delivered first, oldest first), unless every one delivered within
    actor_timeout_s; then it is refused and the actor retries later."""

    max_groups_per_actor: int = 0
    """Most undelivered prompts one actor may hold (0: its share of
    buffer_groups, or of the round in the synchronous modes, among the live
    actors that deliver; actors that have not delivered yet share at most half
    of it). No single client can hold all the work."""

    grant_timeout_factor: float = 4.0
    """Work not delivered within this many times its measured generation time
    (seconds per group from real deliveries x the grant's prompts, never less
    than grant_timeout_min_s) is taken back and handed to others, also from an
    actor that heartbeats; its late delivery is dropped (0: never)."""

    grant_timeout_min_s: float = 60.0
    """Floor of a grant's deadline in seconds (also the deadline until the run
    has measured a delivery)."""

    stop_after_rejected_s: float = 120.0
    """Stop the run with an error (exit status 3, an end record) when every
    group that answered a grant was rejected for this long (and at least
    stop_after_rejected_groups of them): the actors and the learner disagree
    (task, prompts, model) and no step can ever be made. 0: never."""

    stop_after_rejected_groups: int = 256
    """See stop_after_rejected_s: rejected groups, with none accepted, before
    the run stops."""

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

    packing: bool = False
    """Run the forward/backward on packed rows of whole sequences (position ids
    restarting per sequence; attention never crosses one: SDPA's block-diagonal
    mask on CPU, flash-attention varlen where installed) instead of padded rows,
    with micro-batches and ranks balanced by real tokens. Same log-probs and
    gradients; micro_batch_tokens then counts packed tokens."""

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

    record_replay: str = "auto"
    """Record every trained mini-batch and the weights' digests per version in
    RUN_DIR/replay/ (zstd msgpack), so that `rapid-replay RUN_DIR` can retrain
    offline and check each version bit for bit: on | off | auto (on for a
    one-rank CPU learner, where it costs about 13 ms (0.7% of an update) and
    7.5 KB per step of the quickstart; off on GPUs, where digesting the master
    weights each step is O(model size) on the training thread)."""

    max_skipped_steps: int = 10
    """Stop with an error after this many consecutive steps skipped for a
    non-finite loss or gradient norm (0: never stop)."""

    lora: bool = False
    """Train LoRA adapters (peft) instead of every weight: only the adapters
    are trainable and in the optimizer, the KL reference (algo.beta) is the
    base with the adapters off, and actors are sent the merged weights
    W + (alpha / rank) B A cast to model.inference_dtype (they need no LoRA
    code). One learner rank only (learner.devices = 1)."""

    lora_rank: int = 16
    """r: rank of each adapter (A is r x in, B is out x r)."""

    lora_alpha: float = 32.0
    """LoRA alpha: the adapter's output is scaled by alpha / rank."""

    lora_dropout: float = 0.0
    """Dropout on the adapters' input while training, in [0, 1). Above 0 the
    learner's log-probs are noisy versions of the actors' (merged weights, no
    dropout): keep 0 for exact importance ratios."""

    lora_target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names of the Linear modules that get adapters (peft's target_modules;
    the default is every projection of a Qwen2 / Llama decoder layer)."""


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
    """How long an actor keeps trying to reach a learner that went away (or
    that refuses its Hello because it is full: asked again with backoff, 0.5 s
    doubling to 30 s) before it gives up and exits with an error."""

    heartbeat_s: float = 1.0
    """Seconds between an actor's heartbeats, sent from a thread of their own,
    also while the engine generates."""

    inflight: bool = False
    """In-flight weight updates (rapid-async): the actor applies new weights
    between decode steps instead of only between chunks, and each group
    carries per-token policy versions (its staleness is its oldest token's).
    hf engine; the vLLM engine cannot take weights mid-generation here, so it
    generates each chunk in `inflight_subchunks` pieces and takes weights
    between them (each group then has one version)."""

    inflight_subchunks: int = 4
    """With `inflight` on an engine without between-step updates (vLLM): how
    many generate calls a chunk is split into, weights taken between them."""

    inflight_recompute: bool = False
    """With `inflight`: after an update, re-prefill prompt + generated tokens
    under the new weights (default: keep the KV cache computed with the old
    ones, as PipelineRL does)."""

    max_batch_rows: int = 0
    """Continuous batching (hf engine): at most this many completions (prompt x
    sample rows) in flight per engine call; a finished row's slot takes the
    next waiting row of the chunk. 0: the whole chunk in one batch."""


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

    max_connections: int = 0
    """Most TCP connections each learner socket keeps open; past it the least
    recently active one without an actor session is shut down
    (`wire/connections.py`). 0: 2 x learner.max_actors + 32 on control (an
    actor opens two there) and learner.max_actors + 32 on rollouts and weights."""

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
class EnvConfig:
    name: str = ""
    """Environment that turns each problem into a multi-turn episode (see
    rapid_async.envs): empty (the task's single completion, scored once, as
    without environments), a built-in name (single, retry, python-math,
    mbpp-feedback), an entry point of the group "rapid_async.envs" or
    "package.module:Class"."""

    options: dict[str, Any] = field(default_factory=dict)
    """The [env.options] table, passed to the environment's constructor."""

    max_turns: int = 3
    """Model turns per episode at most; the episode ends after this many
    (scored with the reward of its last step)."""

    max_episode_tokens: int = 0
    """Tokens after the prompt per episode at most (model and env turns);
    0: max_turns * algo.max_new_tokens. Each model turn also stops at
    algo.max_new_tokens."""

    concurrency: int = 0
    """Episodes an actor runs at once (their model turns share one engine
    call); 0: every episode of a work chunk (chunk_groups x group_size)."""

    step_workers: int = 8
    """Threads that run environment steps (tools, checkers) beside generation."""


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
    env: EnvConfig = field(default_factory=EnvConfig)

    @property
    def updates_per_batch(self) -> int:
        """H: optimizer updates per inference batch."""
        return self.learner.batch_groups // self.learner.minibatch_groups

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Check every field and the fields against each other (see `validate.py`).

        Returns:
            self, so that `Config().validate()` chains.

        Raises:
            ValueError: naming the field and the fix.
        """
        from rapid_async.config.validate import validate_config

        return validate_config(self)

    def _get(self, dotted: str) -> Any:
        section, key = dotted.split(".")
        return getattr(getattr(self, section), key)
