"""A benchmark-only task whose reward is one hash bit of prompt and completion.

Not for training anything: `bin/gpu-check` measures the system (step time,
weight traffic, GPU use) on a randomly initialised model, which scores 0 on
any real task, so every advantage, every gradient and every weight delta would
be zero. Here the reward of a completion is bit 0 of sha256(prompt, NUL,
completion text): it varies between the K completions of a prompt, so the
learner takes real steps and publishes real deltas.

Prompts are `prompt_chars` random digits (one token each with the character
tokenizer of `rapid_async.tinymodel` and with the padded one that
`rapid_async.bench.gpucheck` builds, whose other ids decode to distinct
placeholders, so that completion texts differ). Used by the actor (prompts,
rewards) and the learner's evaluation, through `get_task("hashbit")`.
"""

from __future__ import annotations

import hashlib
import random

from rapid_async.tasks.base import Problem

class HashBitTask:
    """Random-digit prompts, reward = a hash bit of (prompt, completion).

    Args:
        seed: seeds the prompts.
        prompt_chars: digits per prompt.
        **_options: other task options of the run config (digits, ops), ignored.
    """

    name = "hashbit"

    def __init__(self, seed: int = 0, prompt_chars: int = 16, **_options):
        if prompt_chars < 1:
            raise ValueError(f"hashbit needs prompt_chars >= 1, got {prompt_chars}")
        self.seed, self.prompt_chars = seed, prompt_chars

    def _problem(self, key: int) -> Problem:
        rng = random.Random(self.seed * 1_000_003 + key)
        digits = "".join(rng.choice("0123456789") for _ in range(self.prompt_chars))
        return Problem(prompt_id=str(key), prompt=digits, answer="")

    def train_problem(self, index: int) -> Problem:
        """The training problem at `index` (>= 0)."""
        return self._problem(index)

    def heldout(self, n: int) -> list[Problem]:
        """n problems from a disjoint stream (negative keys)."""
        return [self._problem(-1 - i) for i in range(n)]

    def reward(self, problem: Problem, completion_text: str | None) -> float:
        """Bit 0 of sha256(prompt NUL completion): 0.0 or 1.0; never raises."""
        text = completion_text if isinstance(completion_text, str) else ""
        digest = hashlib.sha256(f"{problem.prompt}\x00{text}".encode("utf-8", "replace")).digest()
        return float(digest[0] & 1)
