"""Held-out evaluation: the one code path that scores a policy on a task.

Used by: an actor (or a dedicated evaluator) when the learner hands it an
evaluation task (`rapid_async.actor.evaluator`), `rapid-eval`
(`evaluate_model`, any saved model or checkpoint directory), the tiny model's
warm start and benchmark scripts. Works with any `Engine` (transformers or
vLLM).

One evaluation takes the first `problems` held-out problems of a task, encodes
their prompts exactly as training does (`tasks.prompts.encode_prompt`, in the
run's prompt format, with its stop strings), generates

- one greedy completion per problem (temperature 0), and/or
- `samples` completions per problem at a sampling temperature,

scores every completion with the task's verifier (through `tasks.scoring.Scorer`:
a failing verifier costs one reward, never the evaluation) and keeps one record
per problem (prompt, completions, rewards). A completion counts as correct when
its reward reaches the task's `success_threshold` (1.0 unless the task says
otherwise). The summary holds:

    success       fraction of problems whose greedy completion is correct
    mean_reward   mean greedy reward
    pass@k        unbiased pass@k over the sampled completions (Chen et al.
                  2021): per problem with n samples of which c are correct,
                  1 - C(n - c, k) / C(n, k), averaged over problems;
                  pass@1 is then the mean fraction of correct samples
    sample_reward mean reward of the sampled completions
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rapid_async.engines.base import Engine, GenerateRequest
from rapid_async.tasks.base import Task
from rapid_async.tasks.prompts import PromptSettings, decode_completion, encode_prompt
from rapid_async.tasks.scoring import Scorer


@dataclass
class EvalSettings:
    """What one evaluation does.

    Attributes:
        problems: how many held-out problems (the first ones of the task's set).
        greedy: generate one greedy completion per problem (-> success).
        samples: sampled completions per problem for pass@k (0: none).
        temperature: sampling temperature of the sampled completions (> 0).
        max_new_tokens: completion length cap.
        seed: sampling seed; each batch uses seed + index of its first problem.
        rows_per_call: completions per engine call at most (problems are
            batched so that problems x completions stays under it).
        ks: the k of pass@k to report (default: 1, powers of 2 and `samples`).
    """

    problems: int = 200
    greedy: bool = True
    samples: int = 0
    temperature: float = 1.0
    max_new_tokens: int = 16
    seed: int = 0
    rows_per_call: int = 256
    ks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.problems < 0:
            raise ValueError(f"problems = {self.problems} must be >= 0")
        if self.samples < 0:
            raise ValueError(f"samples = {self.samples} must be >= 0")
        if not self.greedy and self.samples == 0:
            raise ValueError("nothing to evaluate: greedy is off and samples = 0")
        if self.samples and not self.temperature > 0:
            raise ValueError(f"temperature = {self.temperature} must be > 0 for sampled "
                             "completions (greedy decoding is the greedy pass)")
        if self.max_new_tokens < 1 or self.rows_per_call < 1:
            raise ValueError("max_new_tokens and rows_per_call must be >= 1")
        if self.ks is not None and any(not 1 <= k <= self.samples for k in self.ks):
            raise ValueError(f"ks = {self.ks}: every k must be in 1..samples = {self.samples}")

    def pass_ks(self) -> list[int]:
        """The k of pass@k to report: `ks`, or 1, 2, 4, ... and `samples` itself."""
        if self.ks is not None:
            return sorted(set(self.ks))
        if not self.samples:
            return []
        ks = {self.samples}
        k = 1
        while k < self.samples:
            ks.add(k)
            k *= 2
        return sorted(ks)


@dataclass
class ProblemRecord:
    """The evaluation of one problem (a line of the per-problem JSONL).

    Attributes:
        prompt_id, prompt, answer: the problem.
        greedy_completion, greedy_reward: the greedy pass (None when off).
        completions, rewards: the sampled completions and their rewards.
        correct: how many sampled completions are correct.
    """

    prompt_id: str
    prompt: str
    answer: str
    greedy_completion: str | None = None
    greedy_reward: float | None = None
    completions: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    correct: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalReport:
    """Per-problem records and their summary (see the module docstring)."""

    records: list[ProblemRecord]
    summary: dict[str, float]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem (Chen et al. 2021, eq. 1).

    The probability that k completions drawn without replacement from n, of
    which c are correct, contain at least one correct: 1 - C(n-c, k) / C(n, k).
    Computed with exact integers.

    Args:
        n: completions sampled (>= k).
        c: correct ones among them (0..n).
        k: the k of pass@k (>= 1).

    Returns:
        pass@k in [0, 1].
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def success_threshold(task: Task) -> float:
    """The reward at or above which a completion counts as correct."""
    return float(getattr(task, "success_threshold", 1.0))


def _generate_texts(engine: Engine, tokenizer: Any, prompts: list[list[int]], n: int,
                    temperature: float, max_new_tokens: int, seed: int | None,
                    stop: tuple[str, ...]) -> list[list[str]]:
    """`n` completions per prompt, decoded as for the verifier, in prompt order."""
    groups = engine.generate(GenerateRequest(prompts=prompts, n=n, temperature=temperature,
                                             max_new_tokens=max_new_tokens, seed=seed, stop=stop))
    return [[decode_completion(tokenizer, c.token_ids) for c in group] for group in groups]


def _episodes(runner: Any, chunk: list, n: int, temperature: float,
              seed: int | None) -> tuple[list[list[str]], list[list[float]]]:
    """With an environment: `n` episodes per problem -> transcripts and final rewards."""
    played = runner.run(chunk, n, temperature, seed)
    return ([[ep.transcript() for ep in eps] for eps in played],
            [[ep.reward for ep in eps] for eps in played])


def _batches(count: int, per_problem: int, rows: int) -> list[tuple[int, int]]:
    """(start, stop) problem ranges with at most `rows` completions each."""
    size = max(1, rows // max(per_problem, 1))
    return [(i, min(i + size, count)) for i in range(0, count, size)]


def run_evaluation(engine: Engine, tokenizer: Any, task: Task, settings: EvalSettings,
                   progress: Callable[[int, int], None] | None = None,
                   prompt_settings: PromptSettings | None = None,
                   scorer: Scorer | None = None, runner: Any = None) -> EvalReport:
    """Evaluate the engine's current weights on the task's held-out problems.

    Args:
        engine: any Engine; temperature 0 must mean greedy decoding.
        tokenizer: the model's tokenizer.
        task: supplies held-out problems and the verifier.
        settings: what to generate (see `EvalSettings`).
        progress: called as progress(problems_done, problems_total) after each
            batch (a progress bar, or an actor's heartbeat).
        prompt_settings: prompt format, system prompt and stop strings, as in
            training (`PromptSettings.from_config`; default: plain, no stops).
        scorer: scores completions (default: `Scorer(task)`, failures score 0).
        runner: an `envs.EpisodeRunner` for a run with an [env]: each
            completion is then an episode (its transcript is recorded, its
            reward is the episode's); engine calls and limits are the runner's.

    Returns:
        The per-problem records and their summary.
    """
    t0 = time.perf_counter()
    prompt_settings = prompt_settings or PromptSettings()
    scorer = scorer or Scorer(task)
    failures_before = sum(scorer.failures.values())
    problems = task.heldout(settings.problems)
    records = [ProblemRecord(p.prompt_id, p.prompt, p.answer) for p in problems]
    threshold = success_threshold(task)
    per_problem = max(settings.samples, 1)
    for start, stop in _batches(len(problems), per_problem, settings.rows_per_call):
        chunk = problems[start:stop]
        prompts = [encode_prompt(tokenizer, p.prompt, prompt_settings) for p in chunk]
        if runner is not None:
            _episode_pass(runner, records[start:stop], chunk, settings, start, threshold)
            if progress is not None:
                progress(stop, len(problems))
            continue
        if settings.greedy:
            texts = [t for (t,) in _generate_texts(engine, tokenizer, prompts, 1, 0.0,
                                                   settings.max_new_tokens, None,
                                                   prompt_settings.stop)]
            for rec, text, reward in zip(records[start:stop], texts,
                                         scorer.score_many(chunk, texts)):
                rec.greedy_completion, rec.greedy_reward = text, reward
        if settings.samples:
            groups = _generate_texts(engine, tokenizer, prompts, settings.samples,
                                     settings.temperature, settings.max_new_tokens,
                                     settings.seed + start, prompt_settings.stop)
            rewards = scorer.score_many([p for p, g in zip(chunk, groups) for _ in g],
                                        [t for g in groups for t in g])
            for j, (rec, group) in enumerate(zip(records[start:stop], groups)):
                rec.completions = group
                rec.rewards = rewards[j * settings.samples:(j + 1) * settings.samples]
                rec.correct = sum(1 for r in rec.rewards if r >= threshold)
        if progress is not None:
            progress(stop, len(problems))
    summary = summarize(records, settings, threshold)
    summary["verifier_failures"] = sum(scorer.failures.values()) - failures_before
    summary["seconds"] = time.perf_counter() - t0
    return EvalReport(records, summary)


def _episode_pass(runner: Any, records: list[ProblemRecord], chunk: list,
                  settings: EvalSettings, start: int, threshold: float) -> None:
    """Fill the records of one chunk of problems from environment episodes."""
    if settings.greedy:
        texts, rewards = _episodes(runner, chunk, 1, 0.0, None)
        for rec, (text,), (reward,) in zip(records, texts, rewards):
            rec.greedy_completion, rec.greedy_reward = text, reward
    if settings.samples:
        texts, rewards = _episodes(runner, chunk, settings.samples, settings.temperature,
                                   settings.seed + start)
        for rec, group, values in zip(records, texts, rewards):
            rec.completions, rec.rewards = group, values
            rec.correct = sum(1 for r in values if r >= threshold)


def summarize(records: list[ProblemRecord], settings: EvalSettings,
              threshold: float = 1.0) -> dict[str, float]:
    """Summary numbers of per-problem records (see the module docstring).

    Args:
        records: one per problem.
        settings: the settings that produced them (which passes, which k).
        threshold: reward at or above which a completion is correct.

    Returns:
        {"problems", "samples", and "success", "mean_reward" (greedy pass),
         "pass@k" for each k, "sample_reward" (sampled pass)}.
    """
    n = len(records)
    out: dict[str, float] = {"problems": n, "samples": settings.samples}
    if settings.greedy:
        greedy = [r.greedy_reward for r in records if r.greedy_reward is not None]
        out["success"] = sum(1 for g in greedy if g >= threshold) / max(n, 1)
        out["mean_reward"] = sum(greedy) / max(n, 1)
    if settings.samples:
        for k in settings.pass_ks():
            out[f"pass@{k}"] = sum(pass_at_k(settings.samples, r.correct, k)
                                   for r in records) / max(n, 1)
        out["sample_reward"] = sum(sum(r.rewards) for r in records) / max(n * settings.samples, 1)
    return out


def write_records(path: str | Path, report: EvalReport) -> Path:
    """Write one JSON line per problem (see `ProblemRecord`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for rec in report.records:
            f.write(json.dumps(rec.to_json(), allow_nan=False) + "\n")
    return path


def evaluate(engine: Engine, tokenizer: Any, task: Task, n: int = 200, max_new_tokens: int = 16,
             batch_size: int = 256, prompt_settings: PromptSettings | None = None) -> float:
    """Greedy success rate on the first `n` held-out problems (a shortcut).

    Args:
        engine, tokenizer, task: as in `run_evaluation`.
        n: number of held-out problems.
        max_new_tokens: completion length cap.
        batch_size: problems per engine call.
        prompt_settings: prompt format and stop strings (default: plain, none).

    Returns:
        The fraction of problems whose greedy completion is correct.
    """
    settings = EvalSettings(problems=n, max_new_tokens=max_new_tokens, rows_per_call=batch_size)
    return run_evaluation(engine, tokenizer, task, settings,
                          prompt_settings=prompt_settings).summary["success"]


def settings_from_config(cfg: Any, samples: int, problems: int | None = None,
                         greedy: bool = True, ks: tuple[int, ...] | None = None) -> EvalSettings:
    """EvalSettings as the learner's held-out evaluation uses them for a run config:
    algo.temperature and algo.max_new_tokens, seed run.seed, engine calls of
    actor.chunk_groups x algo.group_size completions, run.eval_size problems."""
    return EvalSettings(problems=cfg.run.eval_size if problems is None else problems,
                        greedy=greedy, samples=samples, temperature=cfg.algo.temperature,
                        max_new_tokens=cfg.algo.max_new_tokens, seed=cfg.run.seed,
                        rows_per_call=cfg.actor.chunk_groups * cfg.algo.group_size, ks=ks)


def evaluate_model(cfg: Any, model_dir: str | Path, settings: EvalSettings, out: str | Path,
                   show_progress: bool = True) -> EvalReport:
    """`rapid-eval`: evaluate a model directory with the run config's engine and task.

    Args:
        cfg: the run config (task, engine, dtype, device, prompt settings).
        model_dir: a Hugging Face model directory (e.g. a run's checkpoint).
        settings: what to generate.
        out: per-problem JSONL path; the summary goes to OUT.summary.json too.
        show_progress: show progress (a rich bar on a terminal, else a line
            every few seconds).

    Returns:
        The report (records and summary).
    """
    from transformers import AutoTokenizer

    from rapid_async.engines import make_engine
    from rapid_async.config import resolve_device
    from rapid_async.progress import ProgressDisplay
    from rapid_async.tasks.base import task_from_config
    from rapid_async.tasks.prompts import check_chat_template

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    task = task_from_config(cfg)
    prompt_settings = PromptSettings.from_config(cfg, task)
    if prompt_settings.prompt_format == "chat":
        check_chat_template(tokenizer, str(model_dir))
    engine = make_engine(cfg.actor.engine, str(model_dir), cfg.model.inference_dtype,
                         resolve_device(cfg.actor.device), cfg.run.seed)
    runner = episode_runner(cfg, engine, tokenizer, task, prompt_settings)
    try:
        with ProgressDisplay("[rapid-eval] problems", total=settings.problems) as display:
            def progress(done: int, total: int) -> None:
                if show_progress:
                    display.update(completed=done, status=f"{cfg.task.name}, {model_dir}")

            report = run_evaluation(engine, tokenizer, task, settings, progress=progress,
                                    prompt_settings=prompt_settings,
                                    scorer=Scorer(task, cfg.task.failure_reward),
                                    runner=runner)
    finally:
        if runner is not None:
            runner.close()
        engine.close()
        if callable(getattr(task, "close", None)):
            task.close()
    path = write_records(out, report)
    summary = {**report.summary, "model": str(model_dir), "task": cfg.task.name,
               "engine": cfg.actor.engine, "temperature": settings.temperature,
               "max_new_tokens": settings.max_new_tokens, "seed": settings.seed}
    path.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return report


def episode_runner(cfg: Any, engine: Any, tokenizer: Any, task: Any,
                   prompt_settings: PromptSettings) -> Any:
    """The EpisodeRunner of a run config with an [env] (None without one)."""
    from rapid_async.envs import EpisodeLimits, EpisodeRunner, env_factory

    factory = env_factory(cfg, task)
    if factory is None:
        return None
    return EpisodeRunner(engine, tokenizer, factory, prompt_settings,
                         EpisodeLimits.from_config(cfg), cfg.env.concurrency,
                         cfg.env.step_workers, cfg.task.failure_reward)


def summary_line(summary: dict[str, float]) -> str:
    """The numbers of a summary on one line: pass@k first, then greedy success."""
    parts = [f"{k} {v:.3f}" for k, v in summary.items() if k.startswith("pass@")]
    if "success" in summary:
        parts.append(f"greedy success {summary['success']:.3f}")
    n, samples = int(summary["problems"]), int(summary["samples"])
    return "  ".join(parts) + f"  ({n} problems" + (f" x {samples} samples)" if samples else ")")
