"""Benchmark of one learner update, full fine-tuning vs LoRA (`bin/bench-lora`).

Not a test and never on the runtime path. Each cell (shape x method x weight
dtype) runs in a fresh child process so that its peak memory is its own. The
child builds Qwen2 at Qwen2.5-0.5B's, -1.5B's or -3B's shape from code (random init,
tied embeddings, vocabulary 151,936), hands it to a real `Trainer`
(`Trainer(cfg, model_dir, model=...)`: the tokenizer comes from a small
directory; `learner.lora` on or off), and takes two updates on one random
group (K = 2, short prompt and completion): the first also allocates the
AdamW state, the second is the steady state. Peak memory is the process's
peak resident set (VmHWM) over building, both updates and the optimizer state.

Before a cell starts, the parent estimates its memory (weights x 4 for full
fine-tuning: weights, gradients, AdamW's two moments; weights + adapters x 4
for LoRA; plus a margin) and compares it with MemAvailable: a cell that would
not fit is reported as "does not fit" with the estimate and is never started.

    python -m rapid_async.bench.lora                     # -> benchmarks/results/lora-cpu.md
    python -m rapid_async.bench.lora --shapes qwen2.5-1.5b --dtypes bfloat16 --methods lora
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rapid_async.bench.learner import _status_kib

REPO = Path(__file__).resolve().parents[2]
VOCAB = 151_936
SHAPES = {
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},  # a check of the driver
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2},
    "qwen2.5-1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2},
    "qwen2.5-3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 2},
}
LORA = ["learner.lora=true"]  # the defaults: rank 16, alpha 32, q k v o gate up down
MARGIN_GIB = 1.5
"""Estimated memory besides weights and optimizer: activations, logits chunks, torch."""
RESERVE_GIB = 2.0
"""MemAvailable a cell must leave to the rest of the (shared) machine."""


def parameter_counts(shape: str, rank: int = 16) -> tuple[int, int]:
    """(parameters of the model, LoRA parameters on the 7 projections at `rank`)."""
    s = SHAPES[shape]
    h, i, n = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    adapters = rank * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    return VOCAB * h + n * layer + h, n * adapters


def estimate_gib(shape: str, method: str, dtype: str) -> float:
    """Peak memory estimate of a cell (GiB)."""
    params, adapters = parameter_counts(shape)
    width = 2 if dtype == "bfloat16" else 4
    if method == "full":  # weights, gradients, exp_avg, exp_avg_sq (all in the weights' dtype)
        return (4 * params * width) / 2**30 + MARGIN_GIB
    return (params * width + 4 * adapters * 4) / 2**30 + MARGIN_GIB  # fp32 adapters


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no MemAvailable in /proc/meminfo")


# ---------------------------------------------------------------- child side


def random_group(prompt_len: int, completion_len: int) -> object:
    """One full-length rollout group of K = 2 random completions, rewards 1 and 0."""
    import torch

    from rapid_async.wire.protocol import RolloutGroup

    gen = torch.Generator().manual_seed(1)
    return RolloutGroup(
        actor_id="bench", prompt_id="0", policy_version=0,
        prompt_ids=torch.randint(3, VOCAB, (prompt_len,), generator=gen, dtype=torch.int32),
        completion_ids=torch.randint(3, VOCAB, (2, completion_len), generator=gen,
                                     dtype=torch.int32),
        completion_lengths=torch.full((2,), completion_len, dtype=torch.int32),
        logprobs=torch.full((2, completion_len), -11.9, dtype=torch.float32),
        rewards=torch.tensor([1.0, 0.0]), finish_reasons=["stop", "stop"],
        gen_seconds=0.0, created_at=0.0, info={})


def measure(spec: dict) -> dict:
    """Build the model, the Trainer, then two updates (in this process)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rapid_async.config import load_config
    from rapid_async.learner.lora import trainable_parameters
    from rapid_async.learner.trainer import Trainer
    from rapid_async.tinymodel import build_tokenizer

    config = Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=4096,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, **SHAPES[spec["shape"]])
    tok_dir = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    build_tokenizer().save_pretrained(tok_dir)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec["dtype"]))
    build_s = time.perf_counter() - t0
    overrides = ["algo.group_size=2", "learner.lr=1e-5", "run.seed=0", "learner.device=cpu",
                 "learner.record_replay=off", *(LORA if spec["method"] == "lora" else [])]
    trainer = Trainer(load_config(overrides=overrides), tok_dir, model=model)
    rss_ready = _status_kib("VmRSS") / 2**20
    groups = [random_group(spec["prompt"], spec["completion"])]
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        metrics = trainer.update(groups)
        seconds.append(time.perf_counter() - t0)
        assert metrics["guard/skipped"] == 0.0, metrics
    trainable = sum(p.numel() for p in trainable_parameters(trainer.model))
    state = trainer.optimizer.state_dict()["state"]
    moments = sum(v.numel() * v.element_size() for s in state.values() for k, v in s.items()
                  if k in ("exp_avg", "exp_avg_sq"))
    return {"build_s": build_s, "first_s": seconds[0], "second_s": seconds[1],
            "ready_gib": rss_ready, "peak_gib": _status_kib("VmHWM") / 2**20,
            "params": sum(p.numel() for p in trainer.model.parameters()),
            "trainable": trainable, "adam_gib": moments / 2**30,
            "threads": torch.get_num_threads(), "tokens": metrics["batch/tokens"]}


# ---------------------------------------------------------------- parent side


def run_child(spec: dict, timeout: float) -> dict:
    """`measure(spec)` in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, "-m", "rapid_async.bench.lora", "--child",
                           json.dumps(spec)], env=env, cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row_text(row: dict) -> str:
    spec, r = row["spec"], row["result"]
    head = (f"| {spec['shape']} | {spec['method']} | {spec['dtype']} | "
            f"{row['estimate_gib']:.1f} | ")
    if "not_run" in r:
        return head + "not run (--estimate-only) | | | | | | |"
    if "skipped" in r:
        return head + f"does not fit ({r['skipped']}) | | | | | | |"
    if "error" in r:
        return head + f"failed: {r['error'][:120]} | | | | | | |"
    return head + (f"{r['peak_gib']:.2f} | {r['ready_gib']:.2f} | {r['trainable']:,} | "
                   f"{r['adam_gib']:.3f} | {r['first_s']:.1f} | {r['second_s']:.1f} | "
                   f"{r['build_s']:.0f} |")


def write_table(rows: list[dict], args: argparse.Namespace, before: str, after: str,
                out: Path) -> None:
    lines = [
        "# One learner update: full fine-tuning vs LoRA (CPU)", "",
        f"Command: `bin/bench-lora {' '.join(sys.argv[1:])}`".rstrip(), "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared), {available_gib():.1f} GiB available at the end; torch threads "
        f"{next((r['result'].get('threads') for r in rows if 'threads' in r['result']), '?')}.",
        f"Load (`uptime`) before: {before}", f"Load after: {after}", "",
        *(["**Estimates only (`--estimate-only`): no cell was run; run `bin/bench-lora` "
           "(alone, under the heavy lock) for measured peaks and seconds.**", ""]
          if args.estimate_only else []),
        "Model: Qwen2 at the named shape, built from code (random init), vocabulary 151,936, "
        "tied embeddings; weights in the listed dtype (this CPU has AVX2 but no AVX-512 BF16 "
        "or AMX, so bfloat16 arithmetic is emulated: slower, half the memory). The learner's "
        "real master dtype is float32 (`model.train_dtype`); bfloat16 cells show the memory "
        "a 16-bit weight copy would take. LoRA: `learner.lora = true` with the defaults "
        "(rank 16, alpha 32, q k v o gate up down projections), float32 adapters.",
        f"Data: one group of K = 2, prompt {args.prompt} + completion {args.completion} tokens; "
        "`Trainer.update` (micro-batching, chunked log-probs, AdamW) as the learner runs it.",
        "Peak = the child's peak resident memory (VmHWM) over model build, Trainer, two "
        "updates; ready = resident memory before the first update. First update allocates "
        "AdamW's state; second is the steady state. Estimate = weights x 4 (full: weights, "
        "gradients, two AdamW moments) or weights + adapters x 4 (LoRA), + "
        f"{MARGIN_GIB} GiB; a cell whose estimate exceeds MemAvailable - {RESERVE_GIB} GiB is "
        "not started (\"does not fit\").", "",
        "| shape | method | weights | estimate GiB | peak GiB | ready GiB | trainable | "
        "AdamW state GiB | first update s | second update s | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row_text(row) for row in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-3b")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--completion", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/lora-cpu.md")
    parser.add_argument("--estimate-only", action="store_true",
                        help="write the memory estimates and fit checks; run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))), flush=True)
        return
    before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = []
    for shape in args.shapes.split(","):
        for method in args.methods.split(","):
            for dtype in args.dtypes.split(","):
                spec = {"shape": shape, "method": method, "dtype": dtype,
                        "prompt": args.prompt, "completion": args.completion}
                need, free = estimate_gib(shape, method, dtype), available_gib()
                if need > free - RESERVE_GIB:
                    result = {"skipped": f"needs ~{need:.1f} GiB, {free:.1f} GiB available"}
                elif args.estimate_only:
                    result = {"not_run": True}
                else:
                    result = run_child(spec, args.timeout)
                rows.append({"spec": spec, "estimate_gib": need, "result": result})
                print(row_text(rows[-1]), flush=True)
    after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    write_table(rows, args, before, after, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
