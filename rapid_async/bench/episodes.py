"""Benchmark: many episodes per actor at once (`bin/bench-episodes`).

One actor's episode runner (`rapid_async.envs.runner`) with the hf engine on
the tiny model (one CPU thread) plays 3-turn episodes of an environment
whose every step calls a tool that takes 50 ms (a sleep standing in for a
sandboxed program), at 1, 8 and 32 concurrent episodes. Reports episodes/s,
generated (model) tokens/s and the actor's idle fraction: the share of the
wall time in which no model turn was ready to generate because every live
episode waited for its tool. Writes benchmarks/results/episodes-cpu.md.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
import typer

from rapid_async.envs import Environment, EpisodeLimits, EpisodeRunner, StepResult
from rapid_async.tasks.arithmetic import ArithmeticTask
from rapid_async.tasks.prompts import PromptSettings

TOOL_S = 0.05
TURNS = 3
TURN_TOKENS = 6


class SlowToolEnv(Environment):
    """Every model turn is answered by a tool that takes TOOL_S seconds; the
    episode ends after TURNS model turns with the task's reward of the last."""

    name = "slow-tool"

    def step(self, model_turn: str) -> StepResult:
        self.turn += 1
        time.sleep(TOOL_S)
        reward = float(self.task.reward(self.problem, model_turn))
        return StepResult([{"role": "tool", "content": "=" + self.problem.prompt}], reward,
                          self.turn >= TURNS)


def measure(runner: EpisodeRunner, task: ArithmeticTask, episodes: int) -> dict:
    for key in runner.stats:
        runner.stats[key] = 0
    problems = [task.train_problem(i) for i in range(episodes)]
    t0 = time.perf_counter()
    played = runner.run(problems, 1, 1.0, seed=0)
    wall = time.perf_counter() - t0
    tokens = sum(ep.model_tokens for eps in played for ep in eps)
    return {"episodes_per_s": episodes / wall, "tokens_per_s": tokens / wall,
            "idle_frac": runner.stats["idle_s"] / wall, "gen_frac": runner.stats["gen_s"] / wall,
            "engine_calls": runner.stats["engine_calls"], "wall_s": wall, "episodes": episodes,
            "turns": runner.stats["turns"]}


def main(out: Path = typer.Option(Path("benchmarks/results/episodes-cpu.md")),
         episodes: int = typer.Option(64, help="Episodes per setting."),
         model_dir: str = typer.Option("", help="Model directory (default: a random tiny model).")):
    from transformers import AutoTokenizer

    from rapid_async.engines.hf import HFEngine
    from rapid_async.tinymodel import init_model_dir

    torch.set_num_threads(1)
    model_dir = model_dir or str(init_model_dir(Path(".cache/bench-episodes/model")))
    engine, tokenizer = HFEngine(model_dir, seed=0), AutoTokenizer.from_pretrained(model_dir)
    task = ArithmeticTask()
    rows = []
    for concurrency in (1, 8, 32):
        runner = EpisodeRunner(engine, tokenizer, lambda: SlowToolEnv(task),
                               PromptSettings("plain"),
                               EpisodeLimits(TURNS, 3 * TURN_TOKENS + 2 * 8, TURN_TOKENS),
                               concurrency=concurrency, step_workers=32)
        measure(runner, task, min(episodes, 8))  # warm-up
        rows.append((concurrency, measure(runner, task, episodes)))
        runner.close()
        print(concurrency, rows[-1][1], flush=True)
    lines = [
        "# Episodes per actor at once (CPU)", "",
        f"Machine: 2-core dev box, loaded (other jobs queued on the heavy lock); "
        f"{platform.processor() or platform.machine()}, torch threads 1. Command: "
        "`flock /work/heavy.lock bin/bench-episodes` (here, in a worktree sharing a venv: `flock /work/heavy.lock env PYTHONPATH=$PWD .venv/bin/python -m rapid_async.bench.episodes`).", "",
        f"The hf engine on the tiny model (random weights), {episodes} episodes per setting, "
        f"{TURNS} model turns of up to {TURN_TOKENS} tokens each, every step a tool call that "
        f"takes {TOOL_S * 1000:.0f} ms (a sleep, run by the runner's 32 step threads). Idle: "
        "the share of the wall time in which the actor had no model turn to generate "
        "(every live episode waited for its tool).", "",
        "| concurrent episodes | episodes/s | generated tokens/s | actor idle | generating | "
        "engine calls |",
        "|---|---|---|---|---|---|",
    ]
    for c, r in rows:
        lines.append(f"| {c} | {r['episodes_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['idle_frac']:.0%} | {r['gen_frac']:.0%} | {r['engine_calls']} |")
    lines += ["", "With one episode at a time the actor waits for every tool call; with 8 or "
              "32 the model turns of the other episodes are generated (in one batched engine "
              "call) while tools run."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    typer.run(main)
