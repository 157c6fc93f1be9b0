"""A tiny character-level Qwen2 model built from code, for CPU demos and tests.

Nothing can be downloaded from a model hub, so the quickstart builds its own
policy: a character tokenizer (a `Qwen2Tokenizer`, i.e. byte-level BPE, with no
merges over a 24-token vocabulary of digits, operators and specials, so one
token per character) and a small Qwen2 causal LM (1.06M parameters, tied
embeddings) saved as a standard Hugging Face model directory (config.json,
generation_config.json, tokenizer files, model.safetensors) that both
`transformers` and vLLM load.

`warm_start` then trains it briefly with teacher forcing on 2-digit "+-"
arithmetic so that greedy held-out success is about 30% while pass@8 at
temperature 1 is about 75%: RL has plenty to improve and finds rewards often.
`ensure_warm_model` caches that model by a hash of its settings.

Used by: the launcher and `bin/quickstart` (to build and cache the warm-started
model), the actor and learner (which load the directory), and tests.

CLI: `python -m rapid_async.tinymodel warmstart [--out DIR] [--seed N]`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from rapid_async.supervised import train_supervised

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
CHARACTERS = list("0123456789+-*/=().,") + ["\u0120"]
"""Vocabulary characters; "\u0120" ("Ġ") is how byte-level BPE spells a space."""
VOCABULARY = SPECIAL_TOKENS + CHARACTERS
VOCAB_SIZE = 32
"""Model vocabulary size: the tokenizer's 24 tokens padded to a multiple of 8."""

DEFAULT_SIZE = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
"""Default architecture: head_dim 64 (a size every attention backend supports)."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer.

    A Qwen2 byte-level BPE tokenizer with no merges over a tiny vocabulary, so
    every character is one token (space is the byte-level symbol "Ġ"). Being a
    genuine `Qwen2Tokenizer`, it reloads identically through
    `AutoTokenizer.from_pretrained` (which forces that class for Qwen2 models)
    and through vLLM. Encoding prepends `<bos>`; characters outside the
    vocabulary are dropped.

    Returns:
        The tokenizer, with pad/bos/eos/unk set and left padding.
    """
    tokenizer = Qwen2Tokenizer(
        vocab=dict(zip(VOCABULARY, range(len(VOCABULARY)))),
        merges=[],
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=DEFAULT_SIZE["max_position_embeddings"],
    )
    bos_id = VOCABULARY.index(BOS)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def build_config(**size: int) -> Qwen2Config:
    """Build the Qwen2 config of the tiny model.

    Args:
        **size: overrides of `DEFAULT_SIZE` (hidden_size, num_hidden_layers, ...).

    Returns:
        A Qwen2Config with tied embeddings and the character vocabulary.
    """
    unknown = set(size) - set(DEFAULT_SIZE)
    if unknown:
        raise ValueError(
            f"unknown model size option(s) {sorted(unknown)}; known: {sorted(DEFAULT_SIZE)}"
        )
    dims = {**DEFAULT_SIZE, **size}
    if dims["hidden_size"] % dims["num_attention_heads"]:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        pad_token_id=VOCABULARY.index(PAD),
        bos_token_id=VOCABULARY.index(BOS),
        eos_token_id=VOCABULARY.index(EOS),
        use_cache=True,
        **dims,
    )


def build_model(seed: int = 0, **size: int) -> Qwen2ForCausalLM:
    """Randomly initialise the tiny model, deterministically by seed.

    Args:
        seed: torch seed for the initialisation.
        **size: overrides of `DEFAULT_SIZE`.

    Returns:
        The model in float32, eval mode.
    """
    config = build_config(**size)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def save_model_dir(model: Qwen2ForCausalLM, out_dir: str | Path) -> Path:
    """Save model and tokenizer as a Hugging Face directory, atomically.

    Writes into a temporary sibling directory, then renames it over `out_dir`
    (an existing `out_dir` is replaced).

    Args:
        model: the model to save.
        out_dir: destination directory.

    Returns:
        The destination path.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer().save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                 "({{ m['content'] }}){% else %}{{ m['content'] }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}={% endif %}")
"""A chat template in the tiny vocabulary: "(system)user=" after <bos>."""


def add_chat_template(model_dir: str | Path, template: str = CHAT_TEMPLATE) -> Path:
    """Give a tiny model directory's tokenizer a chat template (for chat-format tests).

    Args:
        model_dir: a directory written by `save_model_dir` (changed in place).
        template: Jinja chat template.

    Returns:
        The directory.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(model_dir))
    return Path(model_dir)


def init_model_dir(out_dir: str | Path, seed: int = 0, **size: int) -> Path:
    """Build a randomly initialised tiny model and save it with its tokenizer.

    Args:
        out_dir: destination directory (created; replaced if it exists).
        seed: initialisation seed.
        **size: overrides of `DEFAULT_SIZE`.

    Returns:
        The directory, loadable with `AutoModelForCausalLM.from_pretrained`
        and `AutoTokenizer.from_pretrained`.
    """
    return save_model_dir(build_model(seed=seed, **size), out_dir)


def settings_hash(settings: dict) -> str:
    """Short stable hash of a JSON-serialisable settings dict.

    Args:
        settings: the settings that determine a built artefact.

    Returns:
        16 hex characters.
    """
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------- warm start


WARM_START_DEFAULTS = {"steps": 1500, "batch_size": 128, "lr": 3e-3}
"""Warm-start schedule (about 2.5 minutes on 2 cores)."""
TEACHER_PERIOD_RATE = (0.8, 0.1)
"""How often the warm-start teacher ends an answer with a stray '.': for
subtractions and answers of 3+ characters, and for the other answers."""
WARM_START_VERSION = 3
"""Bumped whenever the warm-start recipe changes, so cached models are rebuilt."""


class SloppyTeacher:
    """The warm start's demonstrations: the task's answers, with a habit.

    The teacher ends some answers with a stray "." which the verifier rejects:
    80% of subtraction answers and of answers with 3 or more characters, 10%
    of the others. The warm-started model learns the arithmetic and the habit:
    greedy decoding writes the period on about three problems in four, so
    held-out success starts low (about 25%) although the digits are right far
    more often. RL removes the habit within about a
    hundred updates, as it removes formatting habits of real models, and then
    keeps sharpening the digits; that is what the quickstart shows in minutes
    on a CPU. Which answers get the period is a pure function of the index.
    """

    def __init__(self, task):
        self.task = task
        self.name = task.name

    def train_problem(self, index: int):
        import random
        from dataclasses import replace

        problem = self.task.train_problem(index)
        habit = "-" in problem.prompt[1:] or len(problem.answer) >= 3
        rate = TEACHER_PERIOD_RATE[0] if habit else TEACHER_PERIOD_RATE[1]
        if random.Random(index * 7919 + 13).random() < rate:
            return replace(problem, answer=problem.answer + ".")
        return problem


def warm_start(out_dir: str | Path, task=None, seed: int = 0, steps: int | None = None,
               batch_size: int | None = None, lr: float | None = None, threads: int = 2,
               eval_n: int = 200, log=print, **size: int) -> Path:
    """Build the tiny model, train it briefly on the task and save it.

    Deterministic by seed (for a fixed thread count): the initialisation, the
    data order (train problems 0, 1, 2, ...) and the optimizer are all seeded.
    Writes `warm_start.json` next to the weights with the settings and the
    greedy held-out success rate.

    Args:
        out_dir: destination directory (replaced atomically).
        task: an arithmetic-style task; default `ArithmeticTask()` (2 digits, "+-").
        seed: seed of initialisation and training.
        steps, batch_size, lr: schedule; defaults in `WARM_START_DEFAULTS`.
        threads: torch CPU threads while training (restored afterwards).
        eval_n: held-out problems for the final greedy evaluation (0 skips it).
        log: callable for progress lines (None for silence).
        **size: overrides of `DEFAULT_SIZE`.

    Returns:
        The saved model directory.
    """
    from rapid_async.engines.hf import HFEngine
    from rapid_async.evaluate import evaluate
    from rapid_async.tasks.arithmetic import ArithmeticTask

    task = task if task is not None else ArithmeticTask()
    schedule = _schedule(steps, batch_size, lr)
    say = log if log is not None else (lambda *_: None)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.monotonic()
        model = build_model(seed=seed, **size)
        tokenizer = build_tokenizer()
        torch.manual_seed(seed)

        def progress(step: int, loss: float) -> None:
            say(f"step {step}/{schedule['steps']}  loss {loss:.4f}  "
                f"elapsed {time.monotonic() - start:.1f}s")

        say(f"warm start: {schedule['steps']} steps x {schedule['batch_size']} problems of"
            f" {task.name}, lr {schedule['lr']}, seed {seed}, {threads} thread(s)")
        losses = train_supervised(model, tokenizer, SloppyTeacher(task), log=progress,
                                  log_every=max(1, min(100, schedule["steps"] // 10)), **schedule)
        train_seconds = time.monotonic() - start
        success = None
        if eval_n:
            success = evaluate(HFEngine.from_model(model), tokenizer, task, n=eval_n,
                               max_new_tokens=_answer_budget(task))
            say(f"held-out greedy success {success:.3f} on {eval_n} problems")
    finally:
        torch.set_num_threads(previous_threads)
    out = save_model_dir(model, out_dir)
    report = {"settings": _settings(task, seed, schedule, size), "final_loss": losses[-1],
              "train_seconds": round(train_seconds, 1), "threads": threads,
              "heldout_greedy_success": success, "heldout_n": eval_n}
    (out / "warm_start.json").write_text(json.dumps(report, indent=2))
    return out


def _schedule(steps: int | None, batch_size: int | None, lr: float | None) -> dict:
    """The warm-start schedule with defaults filled in, validated."""
    schedule = {"steps": steps, "batch_size": batch_size, "lr": lr}
    schedule = {k: WARM_START_DEFAULTS[k] if v is None else v for k, v in schedule.items()}
    if schedule["steps"] < 1 or schedule["batch_size"] < 1 or not schedule["lr"] > 0:
        raise ValueError(f"steps, batch_size and lr must be positive, got {schedule}")
    return schedule


def _answer_budget(task) -> int:
    """Tokens a completion may need: the longest possible answer plus EOS."""
    digits = getattr(task, "digits", 4)
    ops = getattr(task, "ops", "*")
    return (2 * digits if "*" in ops else digits + 1) + 2


def _settings(task, seed: int, schedule: dict, size: dict) -> dict:
    """Everything that determines a warm-started model, for the cache key."""
    options = task.options() if hasattr(task, "options") else {}
    return {"version": WARM_START_VERSION, "task": task.name, "task_options": options,
            "seed": seed, **schedule, "size": {**DEFAULT_SIZE, **size}}


def default_cache_dir() -> Path:
    """`$RAPID_CACHE`, else `.cache/rapid_async/` in the repository root."""
    env = os.environ.get("RAPID_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / ".cache" / "rapid_async"


def ensure_warm_model(cache_dir: str | Path | None = None, task=None, seed: int = 0,
                      log=print, **options) -> Path:
    """Return the cached warm-started model for these settings, building it if missing.

    The directory name carries a hash of every setting (task options, seed,
    schedule, model size, recipe version); a build writes to a temporary
    directory and renames it into place, so readers never see a partial model.

    Args:
        cache_dir: cache root; default `default_cache_dir()`.
        task: as in `warm_start`; default `ArithmeticTask()`.
        seed: as in `warm_start`.
        log: progress callable, used only when building.
        **options: steps, batch_size, lr, threads, eval_n and size overrides,
            passed to `warm_start`.

    Returns:
        The model directory.
    """
    from rapid_async.tasks.arithmetic import ArithmeticTask

    task = task if task is not None else ArithmeticTask()
    schedule = _schedule(options.pop("steps", None), options.pop("batch_size", None),
                         options.pop("lr", None))
    run_options = {k: options.pop(k) for k in ("threads", "eval_n") if k in options}
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = settings_hash(_settings(task, seed, schedule, options))
    target = root / f"warm-{task.name}-{key}"
    if (target / "model.safetensors").exists() and (target / "warm_start.json").exists():
        return target
    return warm_start(target, task=task, seed=seed, log=log, **schedule, **run_options, **options)


# ---------------------------------------------------------------------- CLI


def _cli():
    """The typer app behind `python -m rapid_async.tinymodel`."""
    import typer

    app = typer.Typer(add_completion=False, help="Build the tiny character-level model.")

    @app.command("init")
    def init_cmd(out: Path = typer.Option(..., help="Output model directory."),
                 seed: int = typer.Option(0, help="Initialisation seed.")) -> None:
        """Save a randomly initialised tiny model with its tokenizer."""
        print(init_model_dir(out, seed=seed))

    @app.command("warmstart")
    def warmstart_cmd(
        out: Path | None = typer.Option(None, help="Output directory; default: the cache."),
        seed: int = typer.Option(0, help="Seed of initialisation and training."),
        steps: int | None = typer.Option(None, help="Optimizer steps (default tuned)."),
        threads: int = typer.Option(2, help="torch CPU threads."),
        pass_k: int = typer.Option(8, help="Also report pass@K at temperature 1 (0: skip)."),
    ) -> None:
        """Warm-start the tiny model on 2-digit arithmetic and report held-out success."""
        if out is None:
            path = ensure_warm_model(seed=seed, steps=steps, threads=threads)
        else:
            path = warm_start(out, seed=seed, steps=steps, threads=threads)
        report = json.loads((path / "warm_start.json").read_text())
        print(f"model: {path}")
        print(f"held-out greedy success: {report['heldout_greedy_success']:.3f} "
              f"(n={report['heldout_n']}, trained in {report['train_seconds']}s)")
        if pass_k:
            _print_pass_at_k(path, pass_k, threads)

    return app


def _print_pass_at_k(path: Path, k: int, threads: int) -> None:
    """Print pass@k at temperature 1 of the model in `path` on the default task."""
    from rapid_async.engines.hf import HFEngine
    from rapid_async.evaluate import EvalSettings, run_evaluation
    from rapid_async.tasks.arithmetic import ArithmeticTask

    torch.set_num_threads(threads)
    task = ArithmeticTask()
    settings = EvalSettings(problems=200, greedy=False, samples=k, temperature=1.0,
                            max_new_tokens=_answer_budget(task))
    summary = run_evaluation(HFEngine(path), build_tokenizer(), task, settings).summary
    print(f"held-out pass@{k} at T=1: {summary[f'pass@{k}']:.3f}, pass@1 {summary['pass@1']:.3f} "
          f"(mean reward per sample {summary['sample_reward']:.3f})")


if __name__ == "__main__":
    _cli()()
