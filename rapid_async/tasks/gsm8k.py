"""GSM8K: grade-school word problems; the reward checks the final number.

Data: the original JSONL files (`question`, `answer` whose last line is
"#### <number>"), from `train_path` / `test_path` (default
$RAPID_DATA/gsm8k/{train,test}.jsonl) or the Hugging Face dataset
"openai/gsm8k" (config "main") with `hf_dataset`. Training uses the train
split; the held-out set is the test split.

Verifier: the model's final answer is the number after the last "####" if
there is one, else the content of the last \\boxed{...}, else the last number in
the text. Numbers may carry thousands separators ("1,234", LaTeX's "1{,}234"), a currency sign or
units ("$18", "18 dollars"), decimals ("18.00") or be a simple fraction
("\\frac{1}{2}", "1/2"); they are compared exactly as rationals with the
reference. Reward 1.0 for a match, else 0.0; never raises.

Parsing is linear in the length of the text (every pattern can start only
once per run of digits, so no input makes the regular expressions backtrack
quadratically), and only the last MAX_COMPLETION_CHARS characters of a
completion are read; a "number" longer than MAX_NUMBER_CHARS characters is
not an answer.

Used by the actor (rewards), the learner and rapid-eval (held-out problems).
"""

from __future__ import annotations

import re
from fractions import Fraction

from rapid_async.tasks.base import Problem
from rapid_async.tasks.datasets import DatasetTask, data_root, load_records, require_fields

DEFAULT_TEMPLATE = ("{question}\nPlease reason step by step, and put your final answer "
                    "after \"####\".")
"""Prompt text; {question} is replaced by the problem."""
MAX_COMPLETION_CHARS = 20_000
"""Longer completions are only searched in their last MAX_COMPLETION_CHARS characters."""

MAX_NUMBER_CHARS = 100
"""Longer numbers (digits, separators, sign) are skipped: not an answer, and costly to convert."""

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
_FRACTION = re.compile(r"(-?)\\d?frac\{(-?\d+)\}\{(-?\d+)\}"
                       r"|(?:(-)|(?<![\d-]))(\d+)\s*/\s*(\d+)")
"""\\frac{a}{b}, or a / b. The second form starts only at a "-" or at the first digit of a
run (the look-behind), so a long run of digits is scanned once, not once per digit."""


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def parse_number(text: str) -> Fraction | None:
    """The last number written in `text` (a fraction where one is written last)."""
    text = text.replace("{,}", ",").replace("\\,", ",")
    best: tuple[int, re.Match] | None = None
    for pattern in (_NUMBER, _FRACTION):
        for m in pattern.finditer(text):
            if len(m.group()) > MAX_NUMBER_CHARS or (best is not None and m.end() < best[0]):
                continue
            if pattern is _NUMBER or int(m.group(3) or m.group(6)) != 0:
                best = (m.end(), m)
    if best is None:
        return None
    m = best[1]
    if m.re is _NUMBER:
        return Fraction(m.group().replace(",", ""))
    if m.group(2) is not None:
        num, den, sign = int(m.group(2)), int(m.group(3)), -1 if m.group(1) else 1
    else:
        num, den, sign = int(m.group(5)), int(m.group(6)), -1 if m.group(4) else 1
    return sign * Fraction(num, den)


def final_answer(text: str) -> Fraction | None:
    """The model's final number: after the last "####", else in the last
    \\boxed{}, else the last number of the text."""
    text = text[-MAX_COMPLETION_CHARS:]
    if "####" in text:
        return parse_number(text.rsplit("####", 1)[1].split("\n\n")[0])
    boxed = _last_boxed(text)
    if boxed is not None:
        return parse_number(boxed)
    return parse_number(text)


class GSM8KTask(DatasetTask):
    """GSM8K with a final-number verifier.

    Args:
        train_path, test_path: local JSONL files (default $RAPID_DATA/gsm8k/).
        hf_dataset: a Hugging Face dataset name instead (e.g. "openai/gsm8k").
        hf_config: its config (default "main").
        template: prompt text with a {question} field.
        seed: order of training problems.
        heldout_size: cap on the held-out set (default: the whole test split).
    """

    name = "gsm8k"
    stop_strings: tuple[str, ...] = ()

    def __init__(self, train_path: str | None = None, test_path: str | None = None,
                 hf_dataset: str | None = None, hf_config: str = "main",
                 template: str = DEFAULT_TEMPLATE, seed: int = 0,
                 heldout_size: int | None = None):
        super().__init__(seed)
        if "{question}" not in template:
            raise ValueError("template must contain the field {question}")
        self.template = template
        root = data_root() / "gsm8k"
        splits = []
        for path, default, split in ((train_path, root / "train.jsonl", "train"),
                                     (test_path, root / "test.jsonl", "test")):
            records = load_records(path, default, hf_dataset, split, hf_config)
            require_fields(records, ("question", "answer"), str(path or hf_dataset or default))
            splits.append([self._problem(f"{split}-{i}", r) for i, r in enumerate(records)])
        heldout = splits[1] if heldout_size is None else splits[1][:heldout_size]
        self._set_problems(splits[0], heldout)

    def _problem(self, prompt_id: str, record: dict) -> Problem:
        answer = record["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
        return Problem(prompt_id, self.template.replace("{question}", record["question"]), answer,
                       {"solution": record["answer"]})

    def reward(self, problem: Problem, completion_text: str | None) -> float:
        """1.0 when the completion's final number equals the reference, else 0.0."""
        if not isinstance(completion_text, str):
            return 0.0
        try:
            got = final_answer(completion_text)
            return 1.0 if got is not None and got == Fraction(problem.answer) else 0.0
        except (ValueError, ZeroDivisionError, OverflowError):
            return 0.0
