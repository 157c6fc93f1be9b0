"""Benchmark of the actor's inference engines (`hf`, `vllm`) on the tiny model.

Not a test: run by `bin/bench-engines` on a CPU machine, it measures generation
tokens/s at inference batches of 8 to 512 sequences (prompts x K samples),
the wall time of one in-place weight update, the engine start time and the
resident memory of each engine, and writes a Markdown table (by default
`benchmarks/results/engines-cpu.md`).

Run as `python -m rapid_async.bench.engines [--out PATH] [--batches 8,32,128,512]`;
the `__main__` guard matters because vLLM spawns its engine core.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

K = 4
PROMPT = [1] + [4 + (3 * i) % 20 for i in range(11)]
"""A 12-token prompt (BOS + characters); each prompt differs in its last token."""


def process_tree_rss_mib() -> dict[str, float]:
    """Resident memory of this process and its descendants.

    Returns:
        {"this process": MiB, "children": MiB summed} (shared pages counted twice).
    """
    import psutil

    me = psutil.Process()
    children = sum(c.memory_info().rss for c in me.children(recursive=True))
    return {"this process": me.memory_info().rss / 2**20, "children": children / 2**20}


def make_engine(name: str, model_dir: Path):
    """Start an engine on the tiny model, fp32."""
    if name == "hf":
        from rapid_async.engines.hf import HFEngine

        return HFEngine(model_dir, dtype="float32", seed=0)
    from rapid_async.engines.vllm import VLLMEngine

    return VLLMEngine(model_dir, dtype="float32", seed=0, max_model_len=64)


def tokens_per_second(engine, sequences: int, max_new_tokens: int, repeats: int) -> float:
    """Median generated tokens/s over `repeats` calls of `sequences` samples.

    Args:
        engine: an Engine.
        sequences: batch size in sequences (prompts x K, K = 4).
        max_new_tokens: cap per completion.
        repeats: timed calls (after one untimed warm-up).
    """
    from rapid_async.engines.base import GenerateRequest

    prompts = [PROMPT[:-1] + [4 + i % 20] for i in range(max(1, sequences // K))]
    request = GenerateRequest(prompts=prompts, n=K, temperature=1.0,
                              max_new_tokens=max_new_tokens, seed=0)
    engine.generate(request)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = engine.generate(request)
        seconds = time.perf_counter() - start
        rates.append(sum(len(c.token_ids) for g in out for c in g) / seconds)
    return statistics.median(rates)


def update_seconds(engine, model_dir: Path, repeats: int = 5) -> float:
    """Median wall time of `engine.load_weights` with the full fp32 state."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.load_weights(state)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_engine(name: str, model_dir: Path, batches: list[int], max_new_tokens: int,
                 repeats: int) -> dict:
    """All measurements of one engine; the engine is closed afterwards."""
    start = time.perf_counter()
    engine = make_engine(name, model_dir)
    result = {"start_s": time.perf_counter() - start, "tokens_per_s": {}}
    try:
        for batch in batches:
            result["tokens_per_s"][batch] = tokens_per_second(engine, batch, max_new_tokens,
                                                              repeats)
            print(f"[bench] {name} batch {batch}: {result['tokens_per_s'][batch]:.0f} tok/s",
                  flush=True)
        result["update_s"] = update_seconds(engine, model_dir)
        result["rss_mib"] = process_tree_rss_mib()
    finally:
        engine.close()
    return result


def render(results: dict[str, dict], batches: list[int], max_new_tokens: int) -> str:
    """The Markdown report."""
    import torch
    import vllm

    lines = [
        "# Inference engines on CPU: tiny model",
        "",
        f"Written by `bin/bench-engines` on {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, vllm {vllm.__version__}. Model: "
        "`rapid_async.tinymodel` defaults (Qwen2, 4 layers, hidden 128, vocab 32, "
        "tied embeddings), fp32. Each batch is prompts x K=4 samples of a 12-token "
        f"prompt, temperature 1, up to {max_new_tokens} new tokens (EOS may end a "
        "sample early; only generated tokens count). Median of timed calls after one "
        "warm-up. vLLM on CPU binds its worker to one core and reserves the other for "
        "its front end (VLLM_CPU_OMP_THREADS_BIND=auto); hf uses torch's threads. "
        f"1-minute load average when the report was written: {os.getloadavg()[0]:.1f} "
        "(a shared machine: other processes compete for the same cores, so small-batch "
        "numbers in particular are noisy).",
        "",
        "| sequences | " + " | ".join(f"{n} tokens/s" for n in results) + " |",
        "|---:|" + "---:|" * len(results),
    ]
    for batch in batches:
        row = " | ".join(f"{results[n]['tokens_per_s'][batch]:.0f}" for n in results)
        lines.append(f"| {batch} | {row} |")
    lines += ["", "| engine | start (s) | one weight update (ms) | RSS this process (MiB) | "
              "RSS child processes (MiB) |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        rss = r["rss_mib"]
        lines.append(f"| {name} | {r['start_s']:.1f} | {1000 * r['update_s']:.1f} | "
                     f"{rss['this process']:.0f} | {rss['children']:.0f} |")
    lines += ["", "The weight update is `load_weights` with the full fp32 state (median of 5); "
              "for vLLM it includes writing the safetensors file, the layerwise reload in the "
              "worker, the lm_head kernel rebuild and the prefix-cache reset. vLLM's RSS "
              "includes its 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE=1).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/engines-cpu.md")
    parser.add_argument("--batches", default="8,32,128,512")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", default="hf,vllm")
    args = parser.parse_args()
    from rapid_async.tinymodel import init_model_dir

    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_model_dir(Path(tmp) / "model", seed=0)
        results = {name: bench_engine(name, model_dir, batches, args.max_new_tokens,
                                      args.repeats)
                   for name in args.engines.split(",")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(render(results, batches, args.max_new_tokens))
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
