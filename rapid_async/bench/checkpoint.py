"""Benchmark of learner checkpoints at Qwen2.5-0.5B's shape (run by `bin/bench-checkpoint`).

Not a test and never on the runtime path. A Qwen2-architecture model with
Qwen2.5-0.5B's configuration is built from code (random init, fp32 master
weights, as the learner holds them) with an AdamW state filled by one step on
random gradients, so that a checkpoint holds what a real one holds (weights,
two moments per parameter, RNG, pending prompts). It then checkpoints the way
`rapid_async.learner.checkpoint.Checkpointer` does:

- `blocking`: copy and write on the calling thread (what the training loop
  waited for before checkpoints moved to a background writer);
- `background`: the training loop waits only for the copy into host memory
  (`learner/checkpoint_s`); the write runs in a thread, timed separately.

Each is repeated; the Markdown table goes to benchmarks/results/ (by default
checkpoint-0.5b-cpu.md). It needs about 14 GB of memory and 7 GB of disk per
checkpoint (one kept at a time under --dir, removed at the end).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import torch


class _Trainer:
    """What the Checkpointer reads of the learner's Trainer."""

    def __init__(self, model, optimizer, tokenizer):
        self.model, self.optimizer, self.tokenizer = model, optimizer, tokenizer
        self.version, self.data_position = 1, 0


def build(size: str) -> _Trainer:
    """The 0.5B-shape model (or a tiny one), AdamW with its moments filled."""
    from transformers import AutoTokenizer

    from rapid_async.bench import weights
    from rapid_async.tinymodel import init_model_dir

    weights.OPTIONS["size"] = size
    model = weights.build_model(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tok_dir = init_model_dir(Path(os.environ.get("TMPDIR", "/tmp")) / "bench-ckpt-tok", seed=0,
                             hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
    return _Trainer(model, optimizer, AutoTokenizer.from_pretrained(tok_dir))


def measure(trainer: _Trainer, run_dir: Path, repeats: int) -> dict[str, list[float]]:
    from rapid_async.learner.checkpoint import Checkpointer

    out: dict[str, list[float]] = {"blocking_s": [], "background_blocked_s": [],
                                   "background_write_s": []}
    ckpt = Checkpointer(run_dir, every_steps=1, every_minutes=0, keep=1)
    pending = list(range(64))
    for i in range(repeats):
        trainer.version += 1
        out["blocking_s"].append(ckpt.save(trainer, pending, background=False))
        trainer.version += 1
        before = ckpt.stats["checkpoint/write_s"]
        out["background_blocked_s"].append(ckpt.save(trainer, pending, background=True))
        ckpt.wait()
        ckpt.check()
        out["background_write_s"].append(ckpt.stats["checkpoint/write_s"] - before)
        print(f"repeat {i}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in out.items()), flush=True)
    return out


def report(results: dict[str, list[float]], trainer: _Trainer, run_dir: Path, size: str,
           command: str) -> str:
    from rapid_async.learner.checkpoint import latest_checkpoint

    params = sum(p.numel() for p in trainer.model.parameters())
    ckpt = latest_checkpoint(run_dir)
    disk = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) if ckpt else 0
    lines = [
        f"# Learner checkpoints at {'Qwen2.5-0.5B' if size == '0.5b' else 'a tiny'} shape (CPU)",
        "",
        f"Machine: the 2-core development box ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs), torch {torch.__version__}, run under the shared lock. "
        f"Command: `{command}`.",
        "",
        f"Model: {params / 1e6:.0f}M parameters, fp32 master weights, AdamW moments filled; "
        f"one checkpoint on disk: {disk / 2**30:.2f} GiB (weights once for the tied "
        "embeddings, optimizer state, RNG, pending prompts).",
        "",
        "| how | training loop blocked (s) | write in the background (s) |",
        "|---|---|---|",
    ]

    def cell(values: list[float]) -> str:
        return f"{min(values):.2f} / {sorted(values)[len(values) // 2]:.2f} / {max(values):.2f}"

    lines.append(f"| blocking (copy and write on the training thread, as at shut-down) | "
                 f"{cell(results['blocking_s'])} | - |")
    lines.append(f"| background (now: copy, then a writer thread) | "
                 f"{cell(results['background_blocked_s'])} | {cell(results['background_write_s'])} |")
    lines += ["", "min / median / max over the repeats. Before this change periodic checkpoints "
              "were written on the training thread straight from the model (no copy), so the "
              "loop waited about the background write time. On a GPU the copy goes to reusable "
              "pinned host buffers (non-blocking device-to-host copies, one synchronize): "
              "not measured here (no GPU on this machine).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["0.5b", "tiny"], default="0.5b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=".cache/bench-checkpoint")
    parser.add_argument("--out", default="benchmarks/results/checkpoint-0.5b-cpu.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the learner's training thread count on this box
    run_dir = Path(args.dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    trainer = build(args.size)
    print(f"built in {time.perf_counter() - t0:.1f}s", flush=True)
    results = measure(trainer, run_dir, args.repeats)
    command = f"bin/bench-checkpoint --size {args.size} --repeats {args.repeats}"
    text = report(results, trainer, run_dir, args.size, command)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(text)


if __name__ == "__main__":
    main()
