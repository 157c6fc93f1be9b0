"""MATH: competition problems; the reward checks the last \\boxed{} answer with math-verify.

Data: JSONL records with `problem` and `answer` (the PRM800K "math_splits"
files: train = MATH minus MATH-500, test = MATH-500), from `train_path` /
`test_path` (default $RAPID_DATA/math/{train,test}.jsonl) or a Hugging Face
dataset with the same fields (`hf_dataset`, e.g. "HuggingFaceH4/MATH-500"
for the test split). Held-out = the test split.

Verifier: the content of the last \\boxed{...} of the completion (braces
matched; no box, reward 0) and the reference answer are both parsed and
compared by `math-verify` (Hugging Face): equivalence of numbers, fractions,
expressions, intervals, sets and units, with no hand-written normaliser here.
math-verify's own signal-based timeouts are turned off (they only work in the
main thread, and actors may verify in threads); instead every comparison runs
in a `TimedWorker` child process that is killed after `verify_timeout_s`
seconds (reward 0 then, counted in `timeouts`), and whose address space is
capped at `memory_mb` (an answer that makes sympy build a huge number fails
there with MemoryError: reward 0, the host unharmed). Never raises.

Used by the actor (rewards), the learner and rapid-eval (held-out problems).
"""

from __future__ import annotations

from functools import lru_cache

from rapid_async.tasks.base import Problem
from rapid_async.tasks.datasets import DatasetTask, data_root, load_records, require_fields
from rapid_async.tasks.workers import TimedWorker

DEFAULT_TEMPLATE = ("{problem}\nPlease reason step by step, and put your final answer "
                    "within \\boxed{}.")
"""Prompt text; {problem} is replaced by the problem (the usual Qwen math prompt)."""
MAX_ANSWER_CHARS = 1000
"""A boxed answer longer than this scores 0 without being parsed."""


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} in `text` (braces matched), or
    the token after the last "\\boxed " written without braces; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    if rest.startswith(" "):
        token = rest.split(None, 1)[0] if rest.strip() else ""
        return token.split("$", 1)[0] or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for j, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:j]
    return None


@lru_cache(maxsize=4096)
def _parse(answer: str) -> list:
    """math-verify's parse of one answer, written as a boxed LaTeX answer."""
    from math_verify import parse

    return parse(f"\\boxed{{{answer}}}", parsing_timeout=None)


def equivalent(reference: str, answer: str) -> bool:
    """math-verify equivalence of two answers (runs in the worker process).

    No signal-based timeouts: the caller bounds the time by killing the worker.
    """
    from math_verify import verify

    gold, pred = _parse(reference), _parse(answer)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


class MathTask(DatasetTask):
    """MATH with a math-verify verifier on the last boxed answer.

    Args:
        train_path, test_path: local JSONL files (default $RAPID_DATA/math/).
        hf_dataset: a Hugging Face dataset name instead (fields problem, answer).
        hf_config: its config, if any.
        template: prompt text with a {problem} field.
        seed: order of training problems.
        heldout_size: cap on the held-out set (default: the whole test split).
        verify_timeout_s: wall-clock bound of one comparison (> 0).
        memory_mb: address-space limit of the comparison's worker process (MiB).
    """

    name = "math"

    def __init__(self, train_path: str | None = None, test_path: str | None = None,
                 hf_dataset: str | None = None, hf_config: str | None = None,
                 template: str = DEFAULT_TEMPLATE, seed: int = 0,
                 heldout_size: int | None = None, verify_timeout_s: float = 5.0,
                 memory_mb: int = 1024):
        super().__init__(seed)
        if "{problem}" not in template:
            raise ValueError("template must contain the field {problem}")
        if not isinstance(verify_timeout_s, (int, float)) or not verify_timeout_s > 0:
            raise ValueError(f"verify_timeout_s must be > 0, got {verify_timeout_s!r}")
        self.template = template
        self.verify_timeout_s = float(verify_timeout_s)
        root = data_root() / "math"
        splits = []
        for path, default, split in ((train_path, root / "train.jsonl", "train"),
                                     (test_path, root / "test.jsonl", "test")):
            records = load_records(path, default, hf_dataset, split, hf_config)
            require_fields(records, ("problem", "answer"), str(path or hf_dataset or default))
            splits.append([self._problem(r.get("unique_id") or f"{split}-{i}", r)
                           for i, r in enumerate(records)])
        heldout = splits[1] if heldout_size is None else splits[1][:heldout_size]
        self._set_problems(splits[0], heldout)
        self._worker = TimedWorker("rapid_async.tasks.math:equivalent", memory_mb=memory_mb,
                                   warmup=("1", "1"))
        self.timeouts = 0

    def _problem(self, prompt_id: str, record: dict) -> Problem:
        return Problem(str(prompt_id), self.template.replace("{problem}", record["problem"]),
                       str(record["answer"]), {"solution": record.get("solution", "")})

    def reward(self, problem: Problem, completion_text: str | None) -> float:
        """1.0 when the last boxed answer is equivalent to the reference, else 0.0."""
        if not isinstance(completion_text, str) or not problem.answer.strip():
            return 0.0
        answer = last_boxed(completion_text)
        if answer is None or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
            return 0.0
        try:
            return 1.0 if self._worker.call(problem.answer, answer,
                                            timeout=self.verify_timeout_s) else 0.0
        except TimeoutError:
            self.timeouts += 1
            return 0.0
        except RuntimeError:
            return 0.0

    def close(self) -> None:
        """Stop the verifier's worker process."""
        self._worker.close()
