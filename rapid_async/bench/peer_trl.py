"""TRL's GRPOTrainer on the quickstart task: the peer side of `bin/bench-peer`.

One run trains the warm-started tiny model (`ensure_warm_model()`) with TRL
1.16's GRPOTrainer on the prompts rapid-run trains on (the config's task, train
problems 0, 1, 2, ... in order), rewarded by the project's `Scorer` on the
task's verifier, with the config's hyper-parameters mapped to TRL's
(`grpo_args`, the mapping is `MAPPING`). A `HeldOutRecorder` callback runs the
project's greedy held-out evaluation (`run_evaluation`, the same problems,
count, prompt encoding and length as rapid-run's evaluation) every
`eval_every_s` seconds of training and records one row per evaluation:

    step      optimizer steps taken
    train_s   training clock: seconds since on_train_begin (just before the
              first generation), less the evaluations' own time
    wall_s    wall clock: seconds since the driver launched the process
              (imports and model load included), less the evaluations
    success   greedy held-out success
    tokens    completion tokens generated so far

Evaluations pause TRL's training (rapid-run's run on an actor while the
learner trains), so their time is taken out of both clocks.

CLI (one run, used by `rapid_async.bench.peer`):
    python -m rapid_async.bench.peer_trl --setting on-policy --seed 0 --seconds 120 --out R.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import typer

SETTINGS = {"on-policy": 1, "spg4": 4}
"""TRL setting name -> steps_per_generation (generations reused for that many steps)."""

MAPPING = [
    ("algo.group_size = 8", "num_generations = 8"),
    ("learner.minibatch_groups = 32 (x 8 completions)", "per_device_train_batch_size = 256, "
     "gradient_accumulation_steps = 1"),
    ("rapid-sync: batch_groups = 128 = 4 mini-batches", "steps_per_generation = 4 "
     "(generation_batch_size 1024); on-policy: 1"),
    ("learner.lr = 5e-5, AdamW, constant, weight_decay 0", "learning_rate = 5e-5, optim adamw_torch, "
     "lr_scheduler_type constant, warmup 0, weight_decay 0"),
    ("learner.grad_clip = 1.0", "max_grad_norm = 1.0"),
    ("algo.temperature = 1.0 (no top-k / top-p)", "temperature = 1.0, top_p = 1.0, top_k = 0"),
    ("algo.max_new_tokens = 6", "max_completion_length = 6"),
    ("algo.beta = 0 (no reference model)", "beta = 0.0"),
    ("algo.eps = 0.2 (PPO clip)", "epsilon = 0.2 (token-level ratio)"),
    ("algo.aggregation = sequence-mean", "loss_type = 'grpo' (per-sequence mean)"),
    ("advantages r - group baseline, no std scaling", "scale_rewards = 'none'"),
    ("algo.truncated = keep", "mask_truncated_completions = False"),
    ("one update per mini-batch", "num_iterations = 1"),
    ("prompts in order 0, 1, 2, ...", "shuffle_dataset = False"),
    ("rapid-sync: whole groups per mini-batch", "(TRL shuffles a generation's completions "
     "across its mini-batches, advantages computed first)"),
]
"""quickstart.toml's hyper-parameters and the TRL arguments they map to."""


def grpo_args(cfg: Any, steps_per_generation: int, seed: int, out_dir: str,
              max_steps: int = 1_000_000) -> Any:
    """GRPOConfig with `cfg`'s hyper-parameters (see `MAPPING`); training ends
    at `max_steps` or when the recorder stops it."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir, seed=seed, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=1_000_000, disable_tqdm=True, max_steps=max_steps,
        per_device_train_batch_size=cfg.learner.minibatch_groups * cfg.algo.group_size,
        gradient_accumulation_steps=1, num_generations=cfg.algo.group_size,
        steps_per_generation=steps_per_generation,
        max_completion_length=cfg.algo.max_new_tokens, temperature=cfg.algo.temperature,
        top_p=1.0, top_k=0, learning_rate=cfg.learner.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=cfg.learner.weight_decay, max_grad_norm=cfg.learner.grad_clip,
        optim="adamw_torch", beta=cfg.algo.beta, epsilon=cfg.algo.eps, loss_type="grpo",
        scale_rewards="none", mask_truncated_completions=cfg.algo.truncated == "mask",
        num_iterations=1, shuffle_dataset=False, dataloader_num_workers=0,
        disable_dropout=True, log_completions=False, bf16=False, fp16=False)


class ProjectReward:
    """TRL reward function: the project's Scorer on the task's verifier.

    The dataset's "index" column names the training problem; completions are
    TRL's decoded text (special tokens skipped, as the actor decodes). Counts
    the completion tokens it sees (`tokens`).
    """

    __name__ = "project_scorer"

    def __init__(self, task: Any, problems: list[Any]):
        from rapid_async.tasks.scoring import Scorer

        self.scorer = Scorer(task)
        self.problems = problems
        self.tokens = 0

    def __call__(self, prompts: list[str], completions: list[str], index: list[int],
                 completion_ids: list[list[int]] | None = None, **_: Any) -> list[float]:
        if completion_ids is not None:
            self.tokens += sum(len(ids) for ids in completion_ids)
        return self.scorer.score_many([self.problems[i] for i in index], list(completions))


def held_out_success(model: Any, tokenizer: Any, task: Any, cfg: Any) -> float:
    """Greedy held-out success of `model` as rapid-run's evaluation measures it."""
    from rapid_async.engines.hf import HFEngine
    from rapid_async.evaluate import run_evaluation, settings_from_config
    from rapid_async.tasks.prompts import PromptSettings

    was_training = model.training
    engine = HFEngine.from_model(model, seed=cfg.run.seed)
    try:
        report = run_evaluation(engine, tokenizer, task, settings_from_config(cfg, samples=0),
                                prompt_settings=PromptSettings.from_config(cfg, task))
    finally:
        model.train(was_training)
    return float(report.summary["success"])


def make_recorder(evaluate: Any, reward: ProjectReward, launched: float, seconds: float,
                  eval_every_s: float, target: float | None) -> Any:
    """A TrainerCallback that evaluates every `eval_every_s` training seconds,
    records rows (see the module docstring) and stops training after `seconds`
    of training (or at `target`, when given)."""
    from transformers import TrainerCallback

    class HeldOutRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []
            self.eval_s = 0.0
            self.t0 = time.time()
            self.last = 0.0

        def clocks(self) -> tuple[float, float]:
            now = time.time()
            return now - self.t0 - self.eval_s, now - launched - self.eval_s

        def evaluate(self, step: int) -> float:
            train_s, wall_s = self.clocks()
            t = time.perf_counter()
            success = evaluate()
            self.eval_s += time.perf_counter() - t
            self.rows.append({"step": step, "train_s": train_s, "wall_s": wall_s,
                              "success": success, "tokens": reward.tokens})
            self.last = train_s
            print(f"[peer-trl] step {step} train {train_s:.1f}s wall {wall_s:.1f}s "
                  f"held-out {success:.3f}", flush=True)
            return success

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.time()
            self.evaluate(0)

        def on_step_end(self, args, state, control, **kwargs):
            train_s, _ = self.clocks()
            over = train_s >= seconds
            if over or train_s - self.last >= eval_every_s:
                success = self.evaluate(state.global_step)
                if over or (target is not None and success >= target):
                    control.should_training_stop = True
            return control

    return HeldOutRecorder()


def run_trl(setting: str, seed: int, seconds: float, eval_every_s: float, out: Path,
            config: str = "configs/quickstart.toml", launched: float | None = None,
            stop_at: float | None = None, threads: int = 2, prompts: int = 40_000,
            max_steps: int = 1_000_000) -> dict:
    """Train one TRL setting for `seconds` of training (or `max_steps` steps);
    write the result to `out` (JSON) and return it."""
    launched = launched if launched is not None else time.time()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from rapid_async.config import load_config
    from rapid_async.learner.startup import resolve_model_dir
    from rapid_async.tasks.base import task_from_config

    if setting not in SETTINGS:
        raise ValueError(f"TRL setting {setting!r} is not one of {', '.join(SETTINGS)}")
    torch.set_num_threads(threads)
    cfg = load_config(config, [f"run.seed={seed}"])
    model_dir = resolve_model_dir(cfg)
    task = task_from_config(cfg)
    problems = [task.train_problem(i) for i in range(prompts)]
    data = Dataset.from_dict({"prompt": [p.prompt for p in problems], "index": list(range(prompts))})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reward = ProjectReward(task, problems)
    recorder = make_recorder(lambda: held_out_success(model, tokenizer, task, cfg), reward,
                             launched, seconds, eval_every_s, stop_at)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], processing_class=tokenizer,
                          args=grpo_args(cfg, SETTINGS[setting], seed, str(out.parent / "trl-out"),
                                         max_steps),
                          train_dataset=data, callbacks=[recorder])
    trainer.train()
    train_s, wall_s = recorder.clocks()
    result = {"side": "trl", "setting": setting, "seed": seed, "rows": recorder.rows,
              "steps": trainer.state.global_step, "tokens": reward.tokens, "train_s": train_s,
              "wall_s": wall_s, "eval_s": recorder.eval_s, "model_dir": str(model_dir),
              "verifier_failures": sum(reward.scorer.failures.values())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def main(setting: str = typer.Option("on-policy", help="on-policy | spg4"),
         seed: int = typer.Option(0), seconds: float = typer.Option(120.0),
         eval_every_s: float = typer.Option(5.0), out: Path = typer.Option(...),
         config: str = typer.Option("configs/quickstart.toml"),
         launched: float = typer.Option(0.0, help="time.time() when the process was launched"),
         stop_at: float = typer.Option(0.0, help="stop once held-out success reaches this (0: no)"),
         threads: int = typer.Option(2)) -> None:
    """Run one TRL GRPO setting and write its rows to OUT (JSON)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_trl(setting, seed, seconds, eval_every_s, out, config, launched or None,
            stop_at or None, threads)


if __name__ == "__main__":
    typer.run(main)
