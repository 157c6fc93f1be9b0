"""A tiny character-level Qwen2 model built from code, for CPU demos and tests.

Nothing can be downloaded from a model hub, so the quickstart builds its own
policy: a character tokenizer (`PreTrainedTokenizerFast` over a WordLevel
vocabulary of digits, operators and a few specials) and a small Qwen2 causal LM
saved as a standard Hugging Face model directory (config.json,
generation_config.json, tokenizer files, model.safetensors) that both
`transformers` and vLLM load.

Used by: the launcher and `bin/quickstart` (to build and cache the warm-started
model), the actor and learner (which load the directory), and tests.

CLI: `python -m rapid_async.tinymodel warmstart [--out DIR] [--seed N]`.
"""

from __future__ import annotations

import hashlib
import math
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


def encode_examples(tokenizer, problems, eos_id: int) -> dict[str, torch.Tensor]:
    """Teacher-forcing batch: <bos> prompt answer <eos>, loss on answer and EOS.

    Args:
        tokenizer: the character tokenizer.
        problems: the problems to encode.
        eos_id: id appended after each answer.

    Returns:
        input_ids (B, L), attention_mask (B, L) and labels (B, L), right-padded;
        labels are -100 on <bos>, prompt and padding.
    """
    rows, label_rows = [], []
    for problem in problems:
        prompt_ids = tokenizer(problem.prompt)["input_ids"]
        answer_ids = tokenizer(problem.answer, add_special_tokens=False)["input_ids"] + [eos_id]
        rows.append(prompt_ids + answer_ids)
        label_rows.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows)):
        input_ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(row)] = torch.tensor(label_row)
        mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_supervised(model, tokenizer, task, steps: int, batch_size: int, lr: float,
                     first_index: int = 0, log=None, log_every: int = 50) -> list[float]:
    """Teacher-forced cross-entropy on training problems, cosine-decayed AdamW.

    Step s trains on task.train_problem(first_index + s * batch_size + i) for
    i < batch_size, so the data order is a pure function of the arguments.

    Args:
        model: the causal LM (trained in place).
        tokenizer: its tokenizer.
        task: supplies `train_problem`.
        steps: optimizer steps.
        batch_size: problems per step.
        lr: peak learning rate (linear warm-up over 5% of steps, cosine to 10%).
        first_index: data position of the first problem.
        log: optional callable(step, loss) called every `log_every` steps.
        log_every: logging period in steps.

    Returns:
        The loss of every step.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses = []
    for step in range(steps):
        start = first_index + step * batch_size
        problems = [task.train_problem(start + i) for i in range(batch_size)]
        batch = encode_examples(tokenizer, problems, model.config.eos_token_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % log_every == 0:
            log(step + 1, sum(losses[-log_every:]) / log_every)
    model.eval()
    return losses
