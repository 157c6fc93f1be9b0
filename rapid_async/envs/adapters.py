"""Adapters: procedural datasets of `reasoning-gym` as a task (any environment plays it).

`task.name = "reasoning_gym"` with `[task.options] dataset = "basic_arithmetic"`
(any name `reasoning_gym.create_dataset` knows) and that dataset's own options
(e.g. `min_digits`, `max_digits`). Training problem `index` is item `index`
of a dataset seeded with `seed` (of `size` items, cycled); the held-out set
is the first `heldout_size` items of a dataset seeded with `seed + size`
(reasoning-gym seeds item i with seed + i, so the two never share a draw;
training also skips any problem whose question is held out). The reward is the
dataset's own `score_answer`, on the completion with surrounding whitespace
and special-token text removed. Use it as a single-turn task or in an
environment (`env.name = "retry"` gives the model another try).

Needs `pip install rapid_async[envs]` (reasoning-gym).
"""

from __future__ import annotations

from typing import Any

from rapid_async.tasks.base import Problem

_EOS_MARKERS = ("<eos>", "<|endoftext|>", "<|im_end|>", "</s>")


class ReasoningGymTask:
    """A reasoning-gym procedural dataset as a task (see the module docstring).

    Args:
        dataset: the reasoning-gym dataset name.
        seed: seeds the training stream (held out: seed + size).
        size: training items before the stream repeats.
        heldout_size: held-out problems.
        **config: the dataset's own options.
    """

    name = "reasoning_gym"

    def __init__(self, dataset: str = "basic_arithmetic", seed: int = 0, size: int = 100000,
                 heldout_size: int = 200, **config: Any):
        try:
            import reasoning_gym
        except ImportError as err:
            raise ValueError("the reasoning_gym task needs the reasoning-gym package: pip "
                             "install 'rapid_async[envs]'") from err
        try:
            self.train = reasoning_gym.create_dataset(dataset, seed=seed, size=size, **config)
            # reasoning-gym seeds item i with seed + i: seed + size starts past training
            self.held = reasoning_gym.create_dataset(dataset, seed=seed + size,
                                                     size=heldout_size, **config)
        except Exception as err:  # unknown name or options: say which
            raise ValueError(f"reasoning-gym dataset {dataset!r} with options {config}: "
                             f"{err}") from err
        self.dataset, self.size = dataset, size
        self._heldout = [self._problem(self.held, i, "heldout") for i in range(heldout_size)]
        self._held_questions = {p.prompt for p in self._heldout}

    def _problem(self, data: Any, index: int, split: str) -> Problem:
        entry = data[index]
        return Problem(f"{self.dataset}-{split}-{index}", str(entry["question"]),
                       str(entry["answer"]), {"split": split, "index": index})

    def train_problem(self, index: int) -> Problem:
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be a non-negative integer, got {index!r}")
        for step in range(self.size):
            problem = self._problem(self.train, (index + step) % self.size, "train")
            if problem.prompt not in self._held_questions:
                return problem
        raise ValueError("every training problem is also held out")

    def heldout(self, n: int) -> list[Problem]:
        if not 0 <= n <= len(self._heldout):
            raise ValueError(f"n must be in 0..{len(self._heldout)} (heldout_size), got {n}")
        return list(self._heldout[:n])

    def reward(self, problem: Problem, completion_text: str | None) -> float:
        """The dataset's `score_answer` for the completion (0.0 for non-text)."""
        if not isinstance(completion_text, str):
            return 0.0
        text = completion_text
        for marker in _EOS_MARKERS:
            text = text.split(marker, 1)[0]
        data = self.train if problem.meta.get("split") == "train" else self.held
        entry = data[int(problem.meta["index"])]
        return float(data.score_answer(text.strip(), entry))
