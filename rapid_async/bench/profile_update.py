"""Profile of one learner update at the quickstart shape (`bin/bench-profile`).

Not a test and never on the runtime path. Builds the learner's `Trainer`
exactly as `configs/quickstart.toml` does (the warm-started tiny model, 32
groups of K = 8, max_new_tokens 6, one torch thread like the quickstart's
learner), generates real rollout groups with the hf engine (as an actor
would), and times the phases of N updates with explicit timers wrapped
around the functions `Trainer.update` calls:

    collate            learner.policy.collate (groups -> padded Batch)
    plan               micro-batch and rank plan
    advantages pass    the no-grad log-prob pass for importance weights
                       (only when a group is split over micro-batches)
    forward body       the decoder (embedding + layers + norm)
    forward head       lm_head + log-softmax at the completion positions
    micro loss         microbatch_loss
    backward           loss.backward(), of which "head recompute" is the
                       checkpointed lm_head chunks run again
    full-batch loss    compute_loss on the whole mini-batch (no grad: metrics)
    grad clip          clip_grad_norm_
    optimizer          AdamW step
    batch metrics      reward, staleness, mismatch metrics
    other              the rest of Trainer.update (copies, bookkeeping)
    publish stage      WeightPublisher.stage: the cast into the staging buffer

    python -m rapid_async.bench.profile_update --updates 20 --label before
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
PHASES = ["collate", "plan", "advantages pass", "forward body", "forward head", "micro loss",
          "backward", "head recompute", "full-batch loss", "grad clip", "optimizer",
          "batch metrics", "other", "publish stage"]


class Timers:
    """Seconds per phase, accumulated over the profiled updates."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.in_backward = False
        self.in_advantages = False

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.total[name] += time.perf_counter() - t0

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed


def quickstart_groups(cfg, model_dir: str, n_groups: int) -> list:
    """Real rollout groups of the quickstart: the hf engine samples the task's prompts."""
    from transformers import AutoTokenizer

    from rapid_async.actor.rollout import generate_groups
    from rapid_async.engines import make_engine
    from rapid_async.tasks.base import task_from_config

    engine = make_engine("hf", model_dir, cfg.model.inference_dtype, "cpu", cfg.run.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return generate_groups(engine, tokenizer, task_from_config(cfg), cfg,
                           list(range(n_groups)), 0, "bench")


def instrument(trainer, timers: Timers) -> contextlib.ExitStack:
    """Patch timers around the functions one update calls; undone on exit."""
    from rapid_async.learner import policy, trainer as trainer_mod

    stack = contextlib.ExitStack()

    def patch(obj, name, wrapper):
        old = getattr(obj, name)
        setattr(obj, name, wrapper(old))
        stack.callback(setattr, obj, name, old)

    patch(trainer_mod, "collate", lambda f: timers.wrap("collate", f))
    patch(trainer_mod, "microbatch_loss", lambda f: timers.wrap("micro loss", f))
    patch(trainer_mod, "compute_loss", lambda f: timers.wrap("full-batch loss", f))
    patch(trainer, "_plan", lambda f: timers.wrap("plan", f))
    def advantages_wrapper(f):
        def timed(*args, **kwargs):
            timers.in_advantages = True
            try:
                with timers.phase("advantages pass"):
                    return f(*args, **kwargs)
            finally:
                timers.in_advantages = False
        return timed
    patch(trainer, "_advantages_first", advantages_wrapper)
    patch(trainer, "_batch_metrics", lambda f: timers.wrap("batch metrics", f))
    patch(trainer.optimizer, "step", lambda f: timers.wrap("optimizer", f))
    patch(torch.nn.utils, "clip_grad_norm_", lambda f: timers.wrap("grad clip", f))

    def head_wrapper(f):
        def timed(*args, **kwargs):
            name = "head recompute" if timers.in_backward else "forward head"
            with timers.phase(name if not timers.in_advantages else "_ignored"):
                return f(*args, **kwargs)
        return timed
    for attr in ("chunk_logprobs", "_chunk_logprobs_fn"):
        if hasattr(policy, attr):
            patch(policy, attr, head_wrapper)

    def backward_wrapper(f):
        def timed(self, *args, **kwargs):
            timers.in_backward = True
            try:
                with timers.phase("backward"):
                    return f(self, *args, **kwargs)
            finally:
                timers.in_backward = False
        return timed
    patch(torch.Tensor, "backward", backward_wrapper)
    decoder = trainer.model.get_decoder()
    starts: list[float] = []

    def body_done(*_):
        if not timers.in_advantages:
            timers.total["forward body"] += time.perf_counter() - starts[-1]
        starts.pop()
    handles = [decoder.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())),
               decoder.register_forward_hook(body_done)]
    for h in handles:
        stack.callback(h.remove)
    return stack


def profile(args: argparse.Namespace) -> dict:
    """Warm-up updates, then `args.updates` timed updates and publish stages."""
    from rapid_async.config import load_config
    from rapid_async.learner.trainer import Trainer
    from rapid_async.tinymodel import ensure_warm_model
    from rapid_async.weights.publisher import WeightPublisher

    torch.set_num_threads(args.threads)
    cfg = load_config(str(REPO / "configs/quickstart.toml"),
                      overrides=["learner.device=cpu", "learner.record_replay=off",
                                 f"run.run_dir={args.run_dir}", *args.set])
    model_dir = str(ensure_warm_model())
    groups = quickstart_groups(cfg, model_dir, cfg.learner.minibatch_groups)
    trainer = Trainer(cfg, model_dir)
    publisher = WeightPublisher(trainer.model, cfg.model.inference_dtype, on_update=lambda *_: None)
    publisher.begin(trainer.version)
    for _ in range(args.warmup):
        trainer.update(groups)
    timers, totals = Timers(), []
    with instrument(trainer, timers):
        for _ in range(args.updates):
            t0 = time.perf_counter()
            metrics = trainer.update(groups)
            totals.append(time.perf_counter() - t0)
            with timers.phase("publish stage"):
                publisher.stage(trainer.version)
            publisher.flush(60)  # the encode thread finishes before the next timed update
    publisher.close()
    per = {k: v / args.updates for k, v in timers.total.items()}
    update_s = sum(totals) / len(totals)
    per.pop("_ignored", None)
    per["other"] = update_s - sum(v for k, v in per.items()
                                  if k not in ("head recompute", "publish stage"))
    lengths = [len(g.prompt_ids) + int(n) for g in groups for n in g.completion_lengths]
    return {"per": per, "update_s": update_s, "min_s": min(totals), "rows": len(lengths),
            "real_tokens": sum(lengths), "padded_tokens": metrics["batch/padded_tokens"],
            "completion_tokens": metrics["batch/tokens"], "micro": metrics["batch/microbatches"],
            "cfg_set": args.set}


def write_report(result: dict, args: argparse.Namespace, uptime: tuple[str, str]) -> None:
    out = Path(args.out)
    per, total = result["per"], result["update_s"]
    lines = [f"# Learner update profile at the quickstart shape ({args.label})", "",
             f"Command: `bin/bench-profile {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Machine: {args.machine}; {platform.machine()}, Python {platform.python_version()}, "
             f"torch {torch.__version__}, {args.threads} torch thread(s) (the quickstart learner's).",
             f"Load: `uptime` before: {uptime[0]}; after: {uptime[1]}.",
             "Config: configs/quickstart.toml (warm tiny model, 32 groups x K = 8, "
             f"max_new_tokens 6){' with ' + ' '.join(result['cfg_set']) if result['cfg_set'] else ''}; "
             "rollouts generated by the hf engine from the warm model.",
             f"Batch: {result['rows']} rows, {result['real_tokens']} real tokens (prompt + completion), "
             f"{result['padded_tokens']:.0f} padded tokens in the plan "
             f"(padding {1 - result['real_tokens'] / result['padded_tokens']:.1%}), "
             f"{result['completion_tokens']:.0f} completion tokens, {result['micro']:.0f} micro-batch(es).",
             f"{args.warmup} warm-up updates, then {args.updates} timed: mean {total:.3f} s per update "
             f"(fastest {result['min_s']:.3f} s).", "",
             "| phase | s per update | share of update |", "|---|---|---|"]
    for name in PHASES:
        if name in per:
            share = "" if name == "publish stage" else f"{per[name] / total:.1%}"
            lines.append(f"| {name} | {per[name]:.4f} | {share} |")
    lines += ["", "`head recompute` is part of `backward`; the advantages pass's forwards count "
              "in `advantages pass` only; `publish stage` is outside the update (the learner "
              "loop calls it after).", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a" if args.append else "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", default="after")
    p.add_argument("--set", action="append", default=[], help="config overrides")
    p.add_argument("--run-dir", default="/tmp/rapid-bench-profile")
    p.add_argument("--machine", default="the 2-core CPU dev box, under /work/heavy.lock")
    p.add_argument("--append", action="store_true", help="append to --out")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/learner-profile-cpu.md"))
    args = p.parse_args()
    before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = profile(args)
    after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    write_report(result, args, (before, after))
    print(f"[bench-profile] {result['update_s']:.3f} s per update: "
          + ", ".join(f"{k} {v:.4f}" for k, v in result["per"].items()), flush=True)


if __name__ == "__main__":
    main()
