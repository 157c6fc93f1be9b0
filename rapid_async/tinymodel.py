"""A tiny character-level Qwen2 model built from code, for CPU demos and tests.

Nothing can be downloaded from a model hub, so the quickstart builds its own
policy: a character tokenizer (a `Qwen2Tokenizer`, i.e. byte-level BPE, with no
merges over a 24-token vocabulary of digits, operators and specials, so one
token per character) and a small Qwen2 causal LM (1.06M parameters, tied
embeddings) saved as a standard Hugging Face model directory (config.json,
generation_config.json, tokenizer files, model.safetensors) that both
`transformers` and vLLM load.

`rapid_async.warmstart` then trains it with teacher forcing on 2-digit "+-"
arithmetic until greedy held-out success reaches a target (15%), while pass@8
at temperature 1 is far higher: RL has plenty to improve and finds rewards
often; `ensure_warm_model` caches that model by a hash of its recipe. Those
names are importable from here too.

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
from pathlib import Path

import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer


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


# ------------------------------------------------- the warm start (rapid_async.warmstart)


_WARM_START_NAMES = {"WARM_START_DEFAULTS", "WARM_START_VERSION", "warm_start",
                     "ensure_warm_model", "default_cache_dir", "SloppyTeacher",
                     "TEACHER_PERIOD_RATE", "_answer_budget"}


def __getattr__(name: str):
    """The warm start's names, from `rapid_async.warmstart` (imported on first use)."""
    if name in _WARM_START_NAMES:
        from rapid_async import warmstart

        return getattr(warmstart, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------- CLI


def _cli():
    """The typer app behind `python -m rapid_async.tinymodel`."""
    import typer

    from rapid_async.warmstart import WARM_START_DEFAULTS, ensure_warm_model, warm_start

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
        steps: int | None = typer.Option(None, help="Most optimizer steps (default: recipe)."),
        target: float = typer.Option(WARM_START_DEFAULTS["target"],
                                     help="Stop at this held-out greedy success (0: never)."),
        threads: int = typer.Option(2, help="torch CPU threads."),
        pass_k: int = typer.Option(8, help="Also report pass@K at temperature 1 (0: skip)."),
    ) -> None:
        """Warm-start the tiny model on 2-digit arithmetic and report held-out success."""
        recipe = {"steps": steps, "target": target if target > 0 else None}
        if out is None:
            path = ensure_warm_model(seed=seed, threads=threads, recipe=recipe)
        else:
            path = warm_start(out, seed=seed, threads=threads, recipe=recipe)
        report = json.loads((path / "warm_start.json").read_text())
        print(f"model: {path}")
        print(f"held-out greedy success: {report['heldout_greedy_success']:.3f} "
              f"(n={report['heldout_n']}, {report['steps_taken']} steps, target "
              f"{report['settings']['target']} "
              f"{'reached' if report['target_reached'] else 'not reached'}, "
              f"trained in {report['train_seconds']}s)")
        if pass_k:
            _print_pass_at_k(path, pass_k, threads)

    @app.command("ship-warm")
    def ship_warm_cmd(threads: int = typer.Option(2, help="torch CPU threads.")) -> None:
        """Build the default warm start into the package's assets (rapid_async/assets/),
        replacing any shipped one of an older recipe; commit the result."""
        import shutil

        from rapid_async.warmstart import SHIPPED_DIR

        path = ensure_warm_model(cache_dir=SHIPPED_DIR, threads=threads)
        for old in SHIPPED_DIR.glob("warm-*"):
            if old != path:
                shutil.rmtree(old)
        print(f"shipped: {path}")

    return app


def _print_pass_at_k(path: Path, k: int, threads: int) -> None:
    """Print pass@k at temperature 1 of the model in `path` on the default task."""
    from rapid_async.engines.hf import HFEngine
    from rapid_async.evaluate import EvalSettings, run_evaluation
    from rapid_async.tasks.arithmetic import ArithmeticTask
    from rapid_async.warmstart import _answer_budget

    torch.set_num_threads(threads)
    task = ArithmeticTask()
    settings = EvalSettings(problems=200, greedy=False, samples=k, temperature=1.0,
                            max_new_tokens=_answer_budget(task))
    summary = run_evaluation(HFEngine(path), build_tokenizer(), task, settings).summary
    print(f"held-out pass@{k} at T=1: {summary[f'pass@{k}']:.3f}, pass@1 {summary['pass@1']:.3f} "
          f"(mean reward per sample {summary['sample_reward']:.3f})")


if __name__ == "__main__":
    _cli()()
