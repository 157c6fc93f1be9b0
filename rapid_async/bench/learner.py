"""Benchmark of one learner update (`bin/bench-learner`): peak memory and tokens/s.

Not a test and never on the runtime path. Each measurement runs in a fresh
child process so that its peak memory is its own: the child builds a model
directory with Qwen2.5's vocabulary (151,936) and a few layers, a `Trainer`,
random rollout groups (K = 4, fixed prompt and completion lengths), takes one
warm-up update (it allocates the optimizer state), then measures two updates:
wall time (the faster), trained completion tokens per second, and peak memory (on CPU the
process's peak resident set, reset just before the update through
/proc/self/clear_refs; on CUDA `torch.cuda.max_memory_allocated`).

"before" runs the learner code of a git revision (default: the last commit
before issue 8's learner changes), exported with `git archive` and put first
on the child's PYTHONPATH; "after" runs this checkout. The child only uses
APIs both have: `load_config`, `Trainer(cfg, model_dir).update(groups)`.

    python -m rapid_async.bench.learner                       # CPU table -> learner-cpu.md
    python -m rapid_async.bench.learner --shape qwen2.5-0.5b --device cuda --groups 8 \
        --completion 1024,2048 --versions before,bf16,fp32 \
        --variant bf16=learner.compute_dtype=bfloat16 --variant fp32=...  # bin/gpu-check-learner

`--versions` lists what to run: "before" (the old revision) and the labels of
`--variant LABEL=OVERRIDE,OVERRIDE` (this checkout with those config
overrides; "after" = `--after-set` by default).
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

REPO = Path(__file__).resolve().parents[2]
BEFORE_REV = "a9e6cd6"
"""The last commit before issue 8's learner changes (full-logit log-probs, one pass)."""
K = 4
VOCAB = 151_936
SHAPES = {
    # A few layers with Qwen2.5's vocabulary: small enough for 2 CPU cores.
    "cpu-small": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 2},
    # Qwen2.5-0.5B's shape (random init).
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2},
}


# ---------------------------------------------------------------- child side


def make_model_dir(out: Path, shape: str) -> Path:
    """A random Qwen2 model with Qwen2.5's vocabulary, tied embeddings, saved with a tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rapid_async.tinymodel import build_tokenizer

    config = Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=4096,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def make_groups(n_groups: int, prompt_len: int, completion_len: int, seed: int) -> list:
    """Random full-length rollout groups; behaviour log-probs near log(1/V), mixed rewards."""
    import torch

    from rapid_async.wire.protocol import RolloutGroup

    gen = torch.Generator().manual_seed(seed)
    # The "before" revision's RolloutGroup has no finish_reasons.
    extra = ({"finish_reasons": ["stop"] * K}
             if "finish_reasons" in RolloutGroup.__dataclass_fields__ else {})
    groups = []
    for g in range(n_groups):
        ids = torch.randint(3, VOCAB, (K, completion_len), generator=gen, dtype=torch.int32)
        groups.append(RolloutGroup(
            actor_id="bench", prompt_id=str(g), policy_version=0,
            prompt_ids=torch.randint(3, VOCAB, (prompt_len,), generator=gen, dtype=torch.int32),
            completion_ids=ids, completion_lengths=torch.full((K,), completion_len, dtype=torch.int32),
            logprobs=torch.full((K, completion_len), -11.9, dtype=torch.float32),
            rewards=torch.roll(torch.tensor([1.0, 0.0, 0.0, 1.0]), g),  # mixed: real gradients
            gen_seconds=0.0, created_at=0.0, info={}, **extra))
    return groups


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(spec: dict) -> dict:
    """One warm-up update, then `repeats` measured updates (in this process)."""
    import torch

    from rapid_async.config import load_config
    from rapid_async.learner.trainer import Trainer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = load_config(overrides=spec["overrides"])
    trainer = Trainer(cfg, spec["model_dir"])
    groups = make_groups(spec["groups"], spec["prompt"], spec["completion"], seed=1)
    cuda = cfg.learner.device.startswith("cuda")
    trainer.update(groups)  # warm-up: allocates gradients and the optimizer state
    runs = [_measured_update(trainer, groups, cuda) for _ in range(spec.get("repeats", 2))]
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "peak_mib": max(r["peak_mib"] for r in runs),
            "update_mib": max(r["update_mib"] for r in runs),
            "threads": torch.get_num_threads(), "repeats": len(runs)}


def _measured_update(trainer, groups: list, cuda: bool) -> dict:
    """Time and peak memory of one update."""
    import gc

    import torch

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    metrics = trainer.update(groups)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    tokens = metrics["batch/tokens"]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "peak_mib": peak / 2**20, "update_mib": (peak - base) / 2**20,
            "grad_norm": metrics["grad/norm"], "microbatches": metrics.get("batch/microbatches", 1)}


# ---------------------------------------------------------------- parent side


def export_revision(rev: str, dest: Path) -> Path:
    """`git archive REV` of this repository into dest; returns dest."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_child(spec: dict, code_root: Path | None, timeout: float) -> dict:
    """Run `measure(spec)` in a fresh interpreter, optionally on another code tree."""
    env = dict(os.environ)
    root = code_root if code_root is not None else REPO  # the child runs outside the repository
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          cwd=tempfile.gettempdir(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(result: dict, key: str, spec: str) -> str:
    return "failed" if "error" in result else format(result[key], spec)


def write_table(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    lines = [
        f"# Learner update: peak memory and tokens/s ({args.shape}, {args.device})", "",
        f"Command: `bin/bench-learner {' '.join(sys.argv[1:])}`".rstrip(), "",
        f"Machine: {args.machine}; {platform.machine()}, Python {platform.python_version()}; "
        f"torch threads per child: {rows[0]['result'].get('threads', '?') if rows else '?'}.",
        f"Model: Qwen2 with vocabulary {VOCAB:,}, {json.dumps(SHAPES[args.shape])}, tied "
        "embeddings, random init, fp32 master weights, AdamW.",
        f"Data: K = {K}, prompt {args.prompt} tokens, every completion full length; "
        "`groups` is the mini-batch (rows = 4 x groups).",
        "`before`: revision " + args.before_rev + " (full (B, L, V) logits, one pass); "
        + "; ".join(f"`{k}`: this checkout with {' '.join(v) or 'its defaults'}"
                    for k, v in variants(args).items()) + ".",
        f"Each child: one warm-up update, then {args.repeats} measured updates; time is the "
        "fastest. "
        "Peak = the process's peak resident memory during an update (CPU) or peak CUDA "
        "memory allocated (GPU); `update` = peak minus the memory held just before the update. "
        "`micro` = micro-batches per update.",
        "", "| code | groups | completion tokens | micro | update s | tokens/s | peak MiB | update MiB |",
        "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["result"]
        lines.append(f"| {row['version']} | {row['groups']} | {row['completion']} | "
                     f"{_cell(r, 'microbatches', '.0f')} | {_cell(r, 'seconds', '.2f')} | "
                     f"{_cell(r, 'tokens_per_s', ',.0f')} | "
                     f"{_cell(r, 'peak_mib', ',.0f')} | {_cell(r, 'update_mib', ',.0f')} |")
    lines += ["", "Issue 8's criterion: at fixed `learner.micro_batch_tokens`, doubling the mini-batch "
              "raises peak memory by less than 10%.", "", *doubling_lines(rows), ""]
    errors = [f"- {row['version']} {row['groups']}x{row['completion']}: {row['result']['error']}"
              for row in rows if "error" in row["result"]]
    if errors:
        lines += ["Failures:", *errors, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def doubling_lines(rows: list[dict]) -> list[str]:
    """Peak-memory growth when the mini-batch doubles, per code version and length."""
    out = []
    by_key = {(r["version"], r["groups"], r["completion"]): r["result"] for r in rows}
    for (version, groups, completion), r in sorted(by_key.items()):
        big = by_key.get((version, groups * 2, completion))
        if big and "error" not in r and "error" not in big:
            growth = big["peak_mib"] / r["peak_mib"] - 1
            out.append(f"- {version}, {completion} tokens: {groups} -> {groups * 2} groups raises "
                       f"peak memory by {growth:+.1%}")
    return out


def variants(args: argparse.Namespace) -> dict[str, list[str]]:
    """Label -> config overrides of each run of this checkout ("after" by default)."""
    out = {"after": list(args.after_set)}
    for item in args.variant:
        label, _, overrides = item.partition("=")
        out[label] = [o for o in overrides.split(",") if o]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--groups", default="2,4", help="mini-batch sizes in groups of K=4")
    p.add_argument("--completion", default="64,128", help="completion lengths")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--versions", default="before,after")
    p.add_argument("--before-rev", default=BEFORE_REV)
    p.add_argument("--after-set", nargs="*", default=["learner.micro_batch_tokens=640"],
                   help="config overrides for the `after` code")
    p.add_argument("--variant", action="append", default=[],
                   help="LABEL=OVERRIDE,OVERRIDE...: this checkout with those overrides")
    p.add_argument("--repeats", type=int, default=2, help="measured updates per child")
    p.add_argument("--threads", type=int, default=0, help="torch threads per child (0: default)")
    p.add_argument("--machine", default="the 2-core CPU dev box, under /work/heavy.lock")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/learner-cpu.md"))
    p.add_argument("--json", default="", help="also write the rows as JSON here")
    args = p.parse_args()
    if args.child:
        import rapid_async

        result = measure(json.loads(args.child))
        print(json.dumps({**result, "code": str(Path(rapid_async.__file__).parent)}), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-learner-") as tmp:
        model_dir = str(make_model_dir(Path(tmp) / "model", args.shape))
        roots: dict[str, Path] = {}
        missing = ""
        if "before" in args.versions.split(","):
            try:
                roots["before"] = export_revision(args.before_rev, Path(tmp) / "before")
            except (OSError, subprocess.CalledProcessError) as exc:  # e.g. a copy without .git
                missing = f"revision {args.before_rev} not available here ({exc})"
        base = [f"learner.device={args.device}", "learner.lr=1e-6", f"algo.group_size={K}",
                f"algo.max_new_tokens={max(int(c) for c in args.completion.split(','))}"]
        labels = variants(args)
        for version in args.versions.split(","):
            if version != "before" and version not in labels:
                raise SystemExit(f"--versions: {version!r} is neither 'before' nor a --variant label")
            extra = labels.get(version, [])
            for completion in map(int, args.completion.split(",")):
                for groups in map(int, args.groups.split(",")):
                    spec = {"model_dir": model_dir, "groups": groups, "completion": completion,
                            "prompt": args.prompt, "threads": args.threads,
                            "repeats": args.repeats,
                            "overrides": base + list(extra)}
                    result = ({"error": missing} if version == "before" and missing
                              else run_child(spec, roots.get(version), args.timeout))
                    print(f"[bench-learner] {version} groups={groups} T={completion}: {result}",
                          flush=True)
                    rows.append({"version": version, "groups": groups, "completion": completion,
                                 "result": result})
    write_table(rows, args, Path(args.out))
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "device": args.device,
                                               "prompt": args.prompt, "rows": rows}, indent=1))
    print(f"[bench-learner] wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
