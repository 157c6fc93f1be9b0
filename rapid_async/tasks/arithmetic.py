"""Synthetic integer arithmetic: the CPU demo task.

Problems look like "12+34=" with the answer "46"; the model is expected to emit
the answer and then EOS. Operands have a configurable number of digits (each
uniform in [0, 10**digits - 1]) and the operator is drawn from `ops` (any of
"+", "-", "*"); "-" can give negative answers such as "-22".

Splits: the held-out set is a fixed list of distinct problems drawn from its
own seeded stream; training problem `index` is drawn from a stream seeded by
(seed, index) and redrawn until it is not a held-out problem, so the splits are
disjoint and every problem is a pure function of (options, index).

Used by: the actor (prompts, rewards), evaluation and the tiny model's warm start.
"""

from __future__ import annotations

import random

from rapid_async.tasks.base import Problem

OPERATORS = "+-*"
_MAX_ANSWER_CHARS = 64
"""Completions longer than this (after trimming) score 0 without further work."""
_EOS_MARKERS = ("<eos>", "<|endoftext|>", "</s>")
"""Text after any of these is ignored by the verifier."""


def _apply(a: int, op: str, b: int) -> int:
    """Evaluate `a op b` for one of OPERATORS."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


class ArithmeticTask:
    """Procedurally generated integer arithmetic with exact-match rewards.

    Args:
        digits: digits per operand, 1-9.
        ops: operators to draw from, a non-empty subset of "+-*".
        seed: seeds both splits; different seeds give different problems.
        heldout_size: size of the fixed held-out set; at most half of all
            possible problems (default: 500, or half of them if fewer).
    """

    name = "arithmetic"

    def __init__(self, digits: int = 2, ops: str = "+-", seed: int = 0,
                 heldout_size: int | None = None):
        if not isinstance(digits, int) or not 1 <= digits <= 9:
            raise ValueError(f"digits must be an integer in 1..9, got {digits!r}")
        if not ops or any(op not in OPERATORS for op in ops) or len(set(ops)) != len(ops):
            raise ValueError(f"ops must be distinct characters from {OPERATORS!r}, got {ops!r}")
        space = len(ops) * (10**digits) ** 2
        if heldout_size is None:
            heldout_size = min(500, space // 2)
        if not isinstance(heldout_size, int) or not 1 <= heldout_size <= space // 2:
            raise ValueError(
                f"heldout_size must be in 1..{space // 2} (half of the {space} possible problems"
                f" for digits={digits}, ops={ops!r}), got {heldout_size}"
            )
        self.digits = digits
        self.ops = ops
        self.seed = seed
        self.heldout_size = heldout_size
        self._heldout = self._draw_heldout()
        self._heldout_keys = {p.prompt for p in self._heldout}

    def options(self) -> dict:
        """The constructor arguments, for logging and cache keys."""
        return {"digits": self.digits, "ops": self.ops, "seed": self.seed,
                "heldout_size": self.heldout_size}

    def _draw(self, rng: random.Random) -> Problem:
        """Draw one problem from `rng`."""
        high = 10**self.digits - 1
        a, b = rng.randint(0, high), rng.randint(0, high)
        op = self.ops[rng.randrange(len(self.ops))]
        prompt = f"{a}{op}{b}="
        return Problem(prompt_id=f"{a}{op}{b}", prompt=prompt, answer=str(_apply(a, op, b)))

    def _draw_heldout(self) -> list[Problem]:
        """The fixed held-out list: distinct problems from the held-out stream."""
        rng = random.Random(f"arithmetic-heldout-{self.seed}-{self.digits}-{self.ops}")
        problems: list[Problem] = []
        seen: set[str] = set()
        while len(problems) < self.heldout_size:
            problem = self._draw(rng)
            if problem.prompt not in seen:
                seen.add(problem.prompt)
                problems.append(problem)
        return problems

    def train_problem(self, index: int) -> Problem:
        """Training problem number `index`, never one of the held-out problems.

        Args:
            index: data position, >= 0.

        Returns:
            The problem; the same for the same (options, index).
        """
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be a non-negative integer, got {index!r}")
        rng = random.Random(f"arithmetic-train-{self.seed}-{self.digits}-{self.ops}-{index}")
        while True:
            problem = self._draw(rng)
            if problem.prompt not in self._heldout_keys:
                return problem

    def heldout(self, n: int) -> list[Problem]:
        """The first `n` held-out problems.

        Args:
            n: how many, 0..heldout_size.

        Returns:
            A new list of problems (the same ones on every call).
        """
        if not 0 <= n <= self.heldout_size:
            raise ValueError(
                f"n must be in 0..{self.heldout_size} (heldout_size), got {n}; "
                "raise heldout_size for a larger held-out set"
            )
        return list(self._heldout[:n])

    def reward(self, problem: Problem, completion_text: str | None) -> float:
        """1.0 if the completion is exactly the answer, else 0.0.

        Surrounding whitespace is ignored, and so is anything after an EOS
        marker. Anything else (empty, None, non-text, extra characters, other
        spellings such as "046" or "+46") scores 0.0; this never raises.

        Args:
            problem: the problem answered.
            completion_text: the decoded completion.

        Returns:
            1.0 or 0.0.
        """
        if not isinstance(completion_text, str):
            return 0.0
        text = completion_text
        for marker in _EOS_MARKERS:
            text = text.split(marker, 1)[0]
        text = text.strip()
        if not text or len(text) > _MAX_ANSWER_CHARS:
            return 0.0
        return 1.0 if text == problem.answer else 0.0
