"""MBPP / MBPP+: write a Python function; the reward runs its tests in the sandbox.

Data (`variant`):
- "plus" (default): EvalPlus MBPP+ (`MbppPlus.jsonl`: prompt, entry_point,
  canonical_solution, base_input, plus_input, atol, assertion). Tests: every
  base and plus input, expected outputs from the canonical solution (computed
  in the same sandboxed run, before the candidate's code runs). Split as in
  the RAPID paper: a seeded shuffle (`split_seed` 42) of the 399 tasks, the
  first 70% (`train_fraction`) for training and the rest held out.
- "original": MBPP (`mbpp.jsonl`: text, code, test_list, test_setup_code),
  the standard split: tasks 601-974 train, 11-510 held out; tests = test_list.
Files come from `path` (default $RAPID_DATA/mbpp/MbppPlus.jsonl or mbpp.jsonl),
or a Hugging Face dataset via `hf_dataset` with the same fields.

Prompt (as in the paper): the description and the first test assert. The
completion's code is the last ```python block that defines the function (else
the last fenced block, else the whole text). Reward 1.0 when every test
passes, else 0.0 (wrong output, exception, timeout, resource limit). Programs
run in `rapid_async.tasks.sandbox` (see there for what is isolated), up to
`max_parallel` at once; `score_batch` runs a batch in parallel.

Used by the actor (rewards), the learner and rapid-eval (held-out problems).
"""

from __future__ import annotations

import json
import random
import re
import secrets
from pathlib import Path

from rapid_async.tasks.base import Problem
from rapid_async.tasks.datasets import DatasetTask, data_root, load_records, require_fields
from rapid_async.tasks.sandbox import Limits, RunResult, Sandbox

DEFAULT_TEMPLATE = ("You are an expert Python programmer, and here is your task: {description} "
                    "Your code should pass this test:\n\n{test}\n\n"
                    "Write the function in a ```python code block.")
"""Prompt text with {description} and {test} (the first test assert)."""
HARNESS = Path(__file__).with_name("mbpp_harness.py")
MAX_CODE_CHARS = 100_000

# How MBPP+ inputs are restored from JSON (tuples, sets, complex), by task number.
RULES: dict[str, set[int]] = {
    "each_tuple": {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596,
                   616, 630, 726, 740, 744, 809},
    "each_items_tuple": {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780},
    "first_items_tuple": {75, 413, 444, 753},
    "second_tuple": {106, 750},
    "first_sets": {115},
    "float_complex": {124},
    "first_tuple": {250, 307, 405, 446, 617, 720, 763, 808},
    "each_tuple_of_tuples": {259, 401, 445},
    "first_mixed_tuple": {278},
    "first_dict_tuples": {722},
    "complex": {252},
    "all_tuples": {580, 615, 791},
}
ORACLES = {"are_equivalent": "always", "sum_div": "or_zero", "check_str": "not_none",
           "text_match_three": "not_none", "text_starta_endb": "not_none"}
"""MBPP+ tasks whose outputs are judged differently (as EvalPlus judges them)."""

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.S)


def extract_code(text: str, entry_point: str) -> str:
    """The program in a completion: the last fenced block defining `entry_point`,
    else the last fenced block, else the whole text."""
    blocks = _FENCE.findall(text)
    for block in reversed(blocks):
        if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", block):
            return block
    return blocks[-1] if blocks else text


def _rule(task_number: int) -> str:
    return next((name for name, ids in RULES.items() if task_number in ids), "none")


class MBPPTask(DatasetTask):
    """MBPP+ (or original MBPP) with sandboxed test execution.

    Args:
        variant: "plus" or "original".
        path: local JSONL file (default under $RAPID_DATA/mbpp/).
        hf_dataset, hf_split, hf_config: a Hugging Face dataset instead.
        split_seed: seed of the MBPP+ train / held-out shuffle (paper: 42).
        train_fraction: share of MBPP+ tasks used for training (paper: 0.7).
        template: prompt text with {description} and {test}.
        seed: order of training problems.
        timeout_s, cpu_s, memory_mb, processes, file_mb: sandbox limits per program.
        max_parallel: programs run at once.
        isolation: sandbox mode ("auto", "namespaces", "userns", "none").
    """

    name = "mbpp"

    def __init__(self, variant: str = "plus", path: str | None = None,
                 hf_dataset: str | None = None, hf_split: str = "test",
                 hf_config: str | None = None, split_seed: int = 42,
                 train_fraction: float = 0.7, template: str = DEFAULT_TEMPLATE, seed: int = 0,
                 timeout_s: float = 20.0, cpu_s: int = 20, memory_mb: int = 1024,
                 processes: int = 16, file_mb: int = 8, max_parallel: int = 4,
                 isolation: str = "auto"):
        super().__init__(seed)
        if variant not in ("plus", "original"):
            raise ValueError(f"variant must be 'plus' or 'original', got {variant!r}")
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
        for field in ("{description}", "{test}"):
            if field not in template:
                raise ValueError(f"template must contain the field {field}")
        self.variant, self.template = variant, template
        default = data_root() / "mbpp" / ("MbppPlus.jsonl" if variant == "plus" else "mbpp.jsonl")
        records = load_records(path, default, hf_dataset, hf_split, hf_config)
        source = str(path or hf_dataset or default)
        if variant == "plus":
            require_fields(records, ("task_id", "prompt", "entry_point", "canonical_solution",
                                     "base_input", "plus_input", "atol", "assertion"), source)
            problems = [self._plus_problem(r) for r in records]
            random.Random(split_seed).shuffle(problems)
            cut = round(train_fraction * len(problems))
            self._set_problems(problems[:cut], problems[cut:])
        else:
            require_fields(records, ("task_id", "text", "code", "test_list"), source)
            by_id = {int(r["task_id"]): self._original_problem(r) for r in records}
            self._set_problems([p for i, p in sorted(by_id.items()) if 601 <= i <= 974],
                               [p for i, p in sorted(by_id.items()) if 11 <= i <= 510])
        self.sandbox = Sandbox(Limits(wall_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb,
                                      processes=processes, file_mb=file_mb),
                               max_parallel=max_parallel, isolation=isolation)

    # ------------------------------------------------------------------ problems

    def _prompt(self, description: str, test: str) -> str:
        return self.template.replace("{description}", description.strip()).replace(
            "{test}", test.strip())

    def _plus_problem(self, r: dict) -> Problem:
        description = r["prompt"].strip().strip("'\"").strip()
        first_test = next(line for line in r["assertion"].splitlines() if line.strip())
        spec = {"kind": "inputs", "entry_point": r["entry_point"], "atol": float(r["atol"] or 0),
                "reference": r["prompt"] + "\n" + r["canonical_solution"],
                "inputs": list(r["base_input"] or []) + list(r["plus_input"] or []),
                "rule": _rule(int(str(r["task_id"]).split("/")[-1])),
                "oracle": ORACLES.get(r["entry_point"])}
        return Problem(str(r["task_id"]), self._prompt(description, first_test),
                       r["canonical_solution"], {"spec": json.dumps(spec), "entry_point": r["entry_point"]})

    def _original_problem(self, r: dict) -> Problem:
        entry = re.search(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", r["test_list"][0])
        spec = {"kind": "asserts", "tests": r["test_list"], "setup": r.get("test_setup_code", "")}
        return Problem(f"Mbpp/{r['task_id']}", self._prompt(r["text"], r["test_list"][0]),
                       r["code"], {"spec": json.dumps(spec),
                                   "entry_point": entry.group(1) if entry else ""})

    # ------------------------------------------------------------------ verifier

    def program(self, problem: Problem, code: str) -> tuple[str, dict]:
        """The sandboxed program checking `code` on `problem`, and its files."""
        spec = json.loads(problem.meta["spec"])
        spec["code"] = code
        source = HARNESS.read_text() + f"\n_main({json.dumps(spec)!r})\n"
        return source, {"nonce.txt": secrets.token_hex(16)}

    @staticmethod
    def passed(result: RunResult, files: dict) -> bool:
        """Whether a run printed its nonce as the last line and exited cleanly."""
        lines = result.stdout.strip().splitlines()
        return result.returncode == 0 and bool(lines) and lines[-1] == files["nonce.txt"]

    def _code(self, problem: Problem, text: str | None) -> str | None:
        if not isinstance(text, str):
            return None
        code = extract_code(text, problem.meta.get("entry_point", ""))
        return code if code.strip() and len(code) <= MAX_CODE_CHARS else None

    def reward(self, problem: Problem, completion_text: str | None) -> float:
        """1.0 when the completion's code passes every test in the sandbox, else 0.0."""
        return self.score_batch([problem], [completion_text])[0]

    def score_batch(self, problems: list[Problem], texts: list[str | None]) -> list[float]:
        """Rewards of many completions, their programs run in parallel."""
        codes = [self._code(p, t) for p, t in zip(problems, texts)]
        jobs = [(i, *self.program(p, c)) for i, (p, c) in enumerate(zip(problems, codes))
                if c is not None]
        rewards = [0.0] * len(texts)
        results = self.sandbox.run_many([j[1] for j in jobs], [j[2] for j in jobs])
        for (i, _, files), result in zip(jobs, results):
            rewards[i] = 1.0 if self.passed(result, files) else 0.0
        return rewards
