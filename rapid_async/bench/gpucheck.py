"""The GPU check (`bin/gpu-check`): one script, one report, on one NVIDIA GPU.

Not on the runtime path. Runs sections in order, each a function that returns
a JSON-able dict and renders its own Markdown, and writes OUT/gpu-check.json
and OUT/gpu-check.md (a section that fails is recorded with its error and the
others still run):

    env      the GPU, driver, torch and CUDA
    weights  bin/bench-weights' "after" learner and hf-actor parts on the GPU:
             blocked time per publish, encode, apply + verify, bytes, exactness
    learner  (only with --only learner: it adds about 3 minutes) one learner update
             at Qwen2.5-0.5B's shape, 32 rows x 1,024 and 2,048 completion
             tokens, bf16 and fp32 (`bin/gpu-check-learner`): peak memory, tokens/s
    modes    rapid-async and rapid-sync (`rapid-run`, 1 learner + 1 actor sharing
             the GPU) at configs/gpu-check-0.5b.toml: seconds per step, learner
             time blocked on publishing, actor apply time, weight traffic share,
             GPU utilisation (nvidia-smi samples)

A new check is one more `section_<name>(ctx) -> dict` and `render_<name>(dict)
-> list[str]` pair, listed in SECTIONS. The model is Qwen2.5-0.5B's shape built
from code (random init) with a word-level tokenizer that covers its whole
vocabulary; the task is `hashbit` (a hash bit of prompt and completion as the
reward), so that gradients and deltas are not zero on a random model.

`--cpu` is a dry run of the same code on this machine's CPU with a tiny model
body (same vocabulary) and a few short steps: it checks the script, not the
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "gpu-check-0.5b.toml"


# ---------------------------------------------------------------- the model


def word_tokenizer(vocab: int):
    """The tiny model's character tokenizer, its vocabulary padded to `vocab`.

    Ids 0-23 are the characters and specials of `rapid_async.tinymodel` (prompts
    are digit strings, one token per character); every other id decodes to a
    placeholder "<t<id>>", so that the text of a completion sampled from a
    random model over the whole vocabulary differs between samples (the
    hashbit reward needs that). It stays a genuine Qwen2Tokenizer, which
    `AutoTokenizer` insists on for Qwen2 models.
    """
    from tokenizers import processors
    from transformers import Qwen2Tokenizer

    from rapid_async.tinymodel import BOS, EOS, PAD, UNK, VOCABULARY

    words = VOCABULARY + [f"<t{i}>" for i in range(len(VOCABULARY), vocab)]
    tokenizer = Qwen2Tokenizer(vocab=dict(zip(words, range(vocab))), merges=[], unk_token=UNK,
                               bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCABULARY.index(BOS))])
    return tokenizer


def build_model_dir(out: Path, tiny: bool) -> Path:
    """Qwen2.5-0.5B's shape (or a tiny body), random init, fp32, + tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from rapid_async.bench.weights import QWEN05, TINY

    if (out / "config.json").is_file():
        return out
    shape = {**QWEN05, **(TINY if tiny else {}), "bos_token_id": 1, "eos_token_id": 2,
             "pad_token_id": 0}
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(out)
    word_tokenizer(shape["vocab_size"]).save_pretrained(out)
    return out


# ---------------------------------------------------------------- helpers


def _pythonpath() -> str:
    """The repository first, then whatever bin/gpu-check put on the path (the
    folder of packages it installed from wheels: pyzmq, zstandard, ...)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def _python(*args: str, timeout: float, env: dict | None = None, log: Path | None = None) -> int:
    """Run `python ARGS` from the repository; output to `log`; return code (124 on timeout)."""
    full_env = {**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})}
    out = open(log, "ab") if log else None
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 15)  # the process group we started (rapid-run and its children)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        return 124
    finally:
        if out:
            out.close()


class GpuSampler:
    """Samples GPU utilisation with `nvidia-smi -lms` while running (no-op without one)."""

    def __init__(self, period_ms: int = 500):
        self.samples: list[tuple[float, float, float]] = []  # (time, util %, memory MiB)
        self._proc = None
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", f"-lms={period_ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def stop(self) -> dict[str, Any]:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_mem_max_mib": None, "gpu_samples": 0}
        utils = [u for _, u, _ in self.samples]
        return {"gpu_util_mean": sum(utils) / len(utils), "gpu_mem_max_mib": max(m for *_, m in self.samples),
                "gpu_samples": len(utils)}


# ---------------------------------------------------------------- sections


def section_env(ctx: dict) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "dry_run_on_cpu": ctx["cpu"]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                            timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def render_env(info: dict) -> list[str]:
    return [f"- {k}: {v}" for k, v in info.items()]


def section_weights(ctx: dict) -> dict:
    """bench-weights' after parts (learner, hf actor) on the GPU."""
    work = ctx["work"] / "weights"
    args = ["--impl", "after", "--dir", str(work), "--device", ctx["device"],
            "--size", "tiny" if ctx["cpu"] else "0.5b"]
    for part in ("learner", "actor-hf"):
        rc = _python("-m", "rapid_async.bench.weights", "--part", part, *args,
                     timeout=ctx["budget"]["weights"], log=ctx["work"] / "weights.log")
        if rc != 0:
            raise RuntimeError(f"bench weights {part} exited with {rc}; see {ctx['work'] / 'weights.log'}")
    learner = json.loads((work / "learner.json").read_text())
    actor = json.loads((work / "actor-hf.json").read_text())
    rows = learner["rows"]
    return {
        "deltas": len(rows),
        "update_s_mean": sum(r["update_s"] for r in rows) / len(rows),
        "blocked_s_max": max(r["blocked_s"] for r in rows),
        "encode_s_mean": sum(r["encode_s"] for r in rows) / len(rows),
        "delta_mb_mean": sum(r["bytes"] for r in rows) / len(rows) / 1e6,
        "entropy_bound_mb_mean": sum(r["entropy_bound_bytes"] for r in rows) / len(rows) / 1e6,
        "bf16_snapshot_mb": learner["bf16_bytes"] / 1e6,
        "apply_verify_s_max": max(r["total_s"] for r in actor["rows"]),
        "bit_exact": all(r["exact"] for r in actor["rows"]),
        "snapshot_build_s": learner["snapshot_build_s"],
        "snapshot_install_s": actor["snapshot"]["total_s"],
    }


def render_weights(w: dict) -> list[str]:
    return [f"- {w['deltas']} deltas: update {w['update_s_mean']:.3f} s, publish blocked the loop "
            f"at most {1000 * w['blocked_s_max']:.1f} ms (target 50 ms), encode {w['encode_s_mean']:.3f} s "
            "(publisher thread)",
            f"- delta {w['delta_mb_mean']:.1f} MB (entropy bound {w['entropy_bound_mb_mean']:.1f} MB, "
            f"bf16 snapshot {w['bf16_snapshot_mb']:.0f} MB)",
            f"- actor apply + verify at most {w['apply_verify_s_max']:.3f} s (target 0.5 s), "
            f"bit-exact: {w['bit_exact']}",
            f"- snapshot: build {w['snapshot_build_s']:.2f} s, install {w['snapshot_install_s']:.2f} s"]


def _mode_summary(run_dir: Path) -> dict:
    from rapid_async.metrics import read_metrics

    records = read_metrics(run_dir)
    steps = [r for r in records if r.get("role") == "learner" and "loss/policy" in r]
    actors = [r for r in records if r.get("role") == "actor"]
    if len(steps) < 2:
        raise RuntimeError(f"{run_dir}: fewer than 2 training steps were recorded")
    first, last = steps[0], steps[-1]
    n = len(steps) - 1
    out = {"steps": len(steps),
           "s_per_step": (last["elapsed_s"] - first["elapsed_s"]) / n,
           "update_s_per_step": (last["learner/busy_s"] - first["learner/busy_s"]) / n,
           "publish_blocked_s_per_step": (last["learner/publish_s"] - first["learner/publish_s"]) / n,
           "learner_weight_share": last["learner/publish_s"] / max(last["train_s"], 1e-9),
           "encode_s_mean": _mean(r.get("weights/encode_s") for r in steps),
           "delta_mb_mean": _mean(r.get("weights/update_bytes") for r in steps) / 1e6
           if _mean(r.get("weights/update_bytes") for r in steps) else None,
           "learner_busy_frac": last.get("learner/busy_frac")}
    if actors:
        a = actors[-1]
        taken = max(a.get("actor/deltas", 0) + a.get("actor/snapshots", 0), 1)
        active = max(a.get("actor/busy_s", 0) + a.get("actor/idle_s", 0), 1e-9)
        out.update({"actor_update_s_per_update": a.get("actor/update_s", 0) / taken,
                    "actor_weight_share": a.get("actor/update_s", 0) / active,
                    "actor_deltas": a.get("actor/deltas"), "actor_snapshots": a.get("actor/snapshots"),
                    "actor_chain_fetches": a.get("actor/chain_fetches")})
    return out


def _mean(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def section_modes(ctx: dict) -> dict:
    results = {}
    for mode in ("rapid-async", "rapid-sync"):
        run_dir = ctx["work"] / f"run-{mode}"
        overrides = [f"model.path={ctx['model_dir']}", f"run.mode={mode}", f"run.run_dir={run_dir}",
                     f"run.max_steps={ctx['steps']}"]
        if ctx["cpu"]:
            overrides += ["algo.max_new_tokens=16", "learner.device=cpu", "actor.device=cpu"]
        args = ["-m", "rapid_async.cli", "run", "--config", str(CONFIG), "--actors", "1"]
        for o in overrides:
            args += ["--set", o]
        sampler = GpuSampler()
        start = time.time()
        rc = _python(*args, timeout=ctx["budget"]["mode"], log=ctx["work"] / f"{mode}.log")
        results[mode] = {"exit_code": rc, "wall_s": time.time() - start, **sampler.stop()}
        try:
            results[mode].update(_mode_summary(run_dir))
        except (OSError, RuntimeError, KeyError) as exc:
            results[mode]["error"] = f"{type(exc).__name__}: {exc}"
    results["failed"] = [mode for mode in ("rapid-async", "rapid-sync")
                         if results[mode]["exit_code"] != 0 or "error" in results[mode]]
    a, s = results.get("rapid-async", {}), results.get("rapid-sync", {})
    if a.get("s_per_step") and s.get("s_per_step"):
        results["async_over_sync"] = a["s_per_step"] / s["s_per_step"]
    return results


def render_modes(m: dict) -> list[str]:
    cols = [("steps", "steps", "d"), ("seconds per step", "s_per_step", ".3f"),
            ("learner update s / step", "update_s_per_step", ".3f"),
            ("learner blocked on publishing s / step", "publish_blocked_s_per_step", ".4f"),
            ("learner weight share", "learner_weight_share", ".1%"),
            ("encode s (publisher thread)", "encode_s_mean", ".3f"),
            ("delta MB", "delta_mb_mean", ".1f"),
            ("actor apply s / update", "actor_update_s_per_update", ".3f"),
            ("actor weight share", "actor_weight_share", ".1%"),
            ("actor deltas / snapshots / chain fetches", None, None),
            ("GPU utilisation, mean", "gpu_util_mean", ".0f"),
            ("exit code", "exit_code", "d")]
    lines = ["| | rapid-async | rapid-sync |", "|---|---|---|"]
    for label, key, spec in cols:
        cells = []
        for mode in ("rapid-async", "rapid-sync"):
            r = m.get(mode, {})
            if key is None:
                cells.append(f"{r.get('actor_deltas')} / {r.get('actor_snapshots')} / "
                             f"{r.get('actor_chain_fetches')}")
            else:
                v = r.get(key)
                cells.append("-" if v is None else format(v, spec))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    if "async_over_sync" in m:
        lines += ["", f"rapid-async takes {m['async_over_sync']:.2f}x the seconds per step of "
                      "rapid-sync (target <= 1)."]
    for mode in ("rapid-async", "rapid-sync"):
        if m.get(mode, {}).get("error"):
            lines.append(f"- {mode}: {m[mode]['error']}")
    if m.get("failed"):
        lines.append(f"- FAILED: {', '.join(m['failed'])} (see <mode>.log and run-<mode>/ in the work folder)")
    return lines


def section_learner(ctx: dict) -> dict:
    """bin/gpu-check-learner: one update at the 0.5B shape (a tiny one with --cpu)."""
    work = ctx["work"] / "learner"
    work.mkdir(parents=True, exist_ok=True)
    args = ["--out", str(work / "learner-gpu.md"), "--json", str(work / "learner.json")]
    if ctx["cpu"]:
        args += ["--shape", "cpu-small", "--device", "cpu", "--groups", "1", "--completion", "16",
                 "--prompt", "8", "--repeats", "1"]
    env = {"PYTHON": sys.executable}
    full_env = {**os.environ, "PYTHONPATH": _pythonpath(), **env}
    with open(ctx["work"] / "learner.log", "ab") as log:
        proc = subprocess.run(["bash", str(REPO / "bin" / "gpu-check-learner"), *args], cwd=REPO,
                              env=full_env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=ctx["budget"]["learner"])
    if not (work / "learner.json").is_file():
        raise RuntimeError(f"bin/gpu-check-learner exited with {proc.returncode}; "
                           f"see {ctx['work'] / 'learner.log'}")
    return {**json.loads((work / "learner.json").read_text()), "gpu_tests_rc": proc.returncode}


def render_learner(r: dict) -> list[str]:
    rows = sorted({4 * row["groups"] for row in r["rows"]})
    lines = [f"Qwen2 {r['shape']} on {r['device']}, {rows} rows, prompt {r['prompt']}; target: bf16 "
             "at 32 x 2,048 tokens fits in 80 GB and trains >= 40,000 tokens/s", "",
             "| code | completion | tokens/s | peak GiB allocated | micro-batches |",
             "|---|---|---|---|---|"]
    for row in r["rows"]:
        res = row["result"]
        if "error" in res:
            lines.append(f"| {row['version']} | {row['completion']} | failed: {res['error'][:80]} | | |")
        else:
            lines.append(f"| {row['version']} | {row['completion']} | {res['tokens_per_s']:,.0f} | "
                         f"{res['peak_mib'] / 1024:.1f} | {res.get('microbatches', 1):.0f} |")
    lines.append(f"\nGPU tests of the learner (pytest -m gpu): exit code {r['gpu_tests_rc']}")
    return lines


SECTIONS: list[tuple[str, Callable[[dict], dict], Callable[[dict], list[str]]]] = [
    ("env", section_env, render_env),
    ("weights", section_weights, render_weights),
    ("learner", section_learner, render_learner),
    ("modes", section_modes, render_modes),
]
OPT_IN = {"learner"}
"""Sections that run only when `--only` names them."""


# ---------------------------------------------------------------- main


def render(report: dict) -> str:
    lines = ["# GPU check", "", f"Written by `bin/gpu-check` on {report['date']} "
             f"({'DRY RUN on CPU, tiny model: not a measurement' if report['cpu'] else 'one GPU'}); "
             f"{report['wall_s']:.0f} s in all.", ""]
    for name, _, renderer in SECTIONS:
        if name not in report["sections"]:
            continue
        result = report["sections"][name]
        lines += [f"## {name}", ""]
        lines += ([f"FAILED: {result['error']}"] if "error" in result
                  else renderer(result)) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU with a tiny model")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default benchmarks/results; with --cpu the work folder)")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "gpu-check")
    parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="steps per mode (default 24; 6 with --cpu)")
    args = parser.parse_args(argv)
    args.out = args.out or (args.work if args.cpu else REPO / "benchmarks" / "results")
    start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    ctx = {"cpu": args.cpu, "device": "cpu" if args.cpu else "cuda", "work": args.work,
           "steps": args.steps or (6 if args.cpu else 24),
           "budget": {"weights": 150 if not args.cpu else 300, "mode": 150 if not args.cpu else 400,
                      "learner": 420}}
    ctx["model_dir"] = build_model_dir(args.work / ("model-tiny" if args.cpu else "model-0.5b"), args.cpu)
    only = {s for s in args.only.split(",") if s}
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": args.cpu, "sections": {}}
    for name, fn, _ in SECTIONS:
        if (only and name not in only) or (not only and name in OPT_IN):
            continue
        t0 = time.time()
        try:
            report["sections"][name] = fn(ctx)
        except Exception as exc:  # one failed section must not lose the others' results
            report["sections"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()[-2000:]}
        report["sections"][name]["section_s"] = time.time() - t0
        print(f"[gpu-check] {name}: {time.time() - t0:.0f} s", flush=True)
    report["wall_s"] = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-check-cpu-dry-run" if args.cpu else "gpu-check"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(render(report))
    print(f"[gpu-check] wrote {args.out / stem}.md", flush=True)
    ok = all("error" not in s and not s.get("failed") for s in report["sections"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
