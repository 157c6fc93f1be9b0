"""Held-out evaluation: greedy success rate and pass@k of a policy on a task.

Used by: the tiny model's warm start, the learner / launcher for periodic
held-out evaluation, and benchmark scripts. Works with any `Engine`.
"""

from __future__ import annotations

from rapid_async.engines.base import Engine, GenerateRequest
from rapid_async.tasks.base import Problem, Task
from rapid_async.tasks.prompts import PromptSettings, decode_completion, encode_prompt
from rapid_async.tasks.scoring import Scorer


def _completion_texts(engine: Engine, tokenizer, problems: list[Problem], n: int,
                      temperature: float, max_new_tokens: int, seed: int | None,
                      batch_size: int, prompt_settings: PromptSettings | None = None
                      ) -> list[list[str]]:
    """Sample `n` completions per problem and decode them (special tokens dropped).

    Prompts are encoded by `tasks.prompts.encode_prompt` (plain by default),
    as the actor encodes training prompts; its stop strings apply.

    Returns:
        One list of `n` texts per problem, in problem order.
    """
    texts: list[list[str]] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        settings = prompt_settings or PromptSettings()
        prompts = [encode_prompt(tokenizer, p.prompt, settings) for p in chunk]
        chunk_seed = None if seed is None else seed + start
        groups = engine.generate(GenerateRequest(prompts=prompts, n=n, temperature=temperature,
                                                 max_new_tokens=max_new_tokens, seed=chunk_seed,
                                                 stop=settings.stop))
        for group in groups:
            texts.append([decode_completion(tokenizer, c.token_ids) for c in group])
    return texts


def evaluate(engine: Engine, tokenizer, task: Task, n: int = 200, max_new_tokens: int = 16,
             batch_size: int = 256, prompt_settings: PromptSettings | None = None) -> float:
    """Greedy success rate on the first `n` held-out problems.

    Args:
        engine: any Engine that accepts temperature 0 as greedy decoding.
        tokenizer: the model's tokenizer (prompt text -> ids, ids -> text).
        task: the task supplying held-out problems and rewards.
        n: number of held-out problems.
        max_new_tokens: completion length cap.
        batch_size: problems per engine call.
        prompt_settings: prompt format, system prompt and stop strings
            (default: plain, none).

    Returns:
        Mean reward over the problems (a failing verifier scores 0).
    """
    problems = task.heldout(n)
    texts = _completion_texts(engine, tokenizer, problems, 1, 0.0, max_new_tokens, 0, batch_size,
                              prompt_settings)
    rewards = Scorer(task).score_many(problems, [t[0] for t in texts])
    return sum(rewards) / max(len(rewards), 1)


def pass_at_k(engine: Engine, tokenizer, task: Task, k: int, n: int = 200,
              temperature: float = 1.0, max_new_tokens: int = 16, seed: int = 0,
              batch_size: int = 128) -> dict[str, float]:
    """Sample k completions per held-out problem and report pass@k and mean reward.

    Args:
        engine, tokenizer, task, n, max_new_tokens, batch_size: as in `evaluate`.
        k: samples per problem.
        temperature: sampling temperature.
        seed: sampling seed (reproducible results).

    Returns:
        {"pass_at_k": fraction of problems with at least one reward-1 sample,
         "mean_reward": mean reward over all n * k samples}.
    """
    problems = task.heldout(n)
    texts = _completion_texts(engine, tokenizer, problems, k, temperature, max_new_tokens, seed,
                              batch_size)
    rewards = [[task.reward(p, t) for t in group] for p, group in zip(problems, texts)]
    solved = sum(1.0 for group in rewards if max(group) >= 1.0)
    total = sum(sum(group) for group in rewards)
    return {"pass_at_k": solved / max(len(problems), 1),
            "mean_reward": total / max(len(problems) * k, 1)}
