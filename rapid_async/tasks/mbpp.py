"""MBPP / MBPP+: write a Python function; the reward calls it in the sandbox and checks the results here.

Data (`variant`):
- "plus" (default): EvalPlus MBPP+ (`MbppPlus.jsonl`: prompt, entry_point,
  canonical_solution, base_input, plus_input, atol, assertion). Tests: every
  base and plus input; expected outputs from the canonical solution, run once
  per problem in its own sandboxed process and kept in memory. Split as in
  the RAPID paper: a seeded shuffle (`split_seed` 42) of the 399 tasks, the
  first 70% (`train_fraction`) for training and the rest held out.
- "original": MBPP (`mbpp.jsonl`: text, code, test_list), the standard split:
  tasks 601-974 train, 11-510 held out; each test assert is parsed
  (`mbpp_check.parse_assert`) into a call and its expected literal. Problems
  with a test of another shape are dropped and listed in `refused`.
Files come from `path` (default $RAPID_DATA/mbpp/MbppPlus.jsonl or mbpp.jsonl),
or a Hugging Face dataset via `hf_dataset` with the same fields.

Reward integrity: the completion's code runs alone in its sandboxed process
(`mbpp_harness.py` calls its function on every test input, inputs given as
a file, and writes typed results on a private channel); the trusted
comparison (`mbpp_check`) runs here. No reference, expected value or nonce is
ever in the candidate's process or files. Problems that one constant answer
passes (`mbpp_inputs.constant_oracles()` for MBPP+, computed for original
MBPP) are left out of training and held-out sets and score 0 by default
(`constant_oracles = "exclude"`); "heldout" keeps them for evaluation only,
"include" everywhere (the paper's sets).

Prompt (as in the paper): the description and the first test assert. The
completion's code is the last ```python block that defines the function (else
the last fenced block, else the whole text). Reward 1.0 when every test
passes, else 0.0 (wrong output, exception, timeout, resource limit, output
that is not plain data). Programs run in `rapid_async.tasks.sandbox`, up to
`max_parallel` at once; `score_batch` runs a batch in parallel and `verdicts`
says why each completion scored what it did.

Used by the actor (rewards), the learner and rapid-eval (held-out problems).
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from rapid_async.tasks import mbpp_check
from rapid_async.tasks.base import Problem
from rapid_async.tasks.datasets import DatasetTask, data_root, load_records, require_fields
from rapid_async.tasks.mbpp_harness import decode, encode
from rapid_async.tasks.mbpp_inputs import constant_oracles, restore, rule_of
from rapid_async.tasks.sandbox import Limits, RunResult, Sandbox

log = logging.getLogger("rapid.tasks")
DEFAULT_TEMPLATE = ("You are an expert Python programmer, and here is your task: {description} "
                    "Your code should pass this test:\n\n{test}\n\n"
                    "Write the function in a ```python code block.")
"""Prompt text with {description} and {test} (the first test assert)."""
HARNESS = Path(__file__).with_name("mbpp_harness.py")
MAX_CODE_CHARS = 100_000
CONSTANT_MODES = ("exclude", "heldout", "include")
ORACLES = mbpp_check.ORACLES  # kept for callers of the old name

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.S)


def extract_code(text: str, entry_point: str) -> str:
    """The program in a completion: the last fenced block defining `entry_point`,
    else the last fenced block, else the whole text."""
    blocks = _FENCE.findall(text)
    for block in reversed(blocks):
        if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", block):
            return block
    return blocks[-1] if blocks else text


@dataclass(frozen=True)
class Verdict:
    """One completion's reward and why ("ok", "no code", "timeout", "wrong output 3"...)."""

    reward: float
    reason: str


@dataclass
class _Expected:
    """What the checker compares one problem's results with."""

    values: list  # typed expected value per call
    oracles: list  # oracle per call (None: exact + floats)
    atol: float = 0.0
    mappings: bool = False  # the reference returns Counter & co: a candidate may too


class MBPPTask(DatasetTask):
    """MBPP+ (or original MBPP) with sandboxed calls and a trusted checker.

    Args:
        variant: "plus" or "original".
        path: local JSONL file (default under $RAPID_DATA/mbpp/).
        hf_dataset, hf_split, hf_config: a Hugging Face dataset instead.
        split_seed: seed of the MBPP+ train / held-out shuffle (paper: 42).
        train_fraction: share of MBPP+ tasks used for training (paper: 0.7).
        template: prompt text with {description} and {test}.
        seed: order of training problems.
        timeout_s, cpu_s, memory_mb, processes, file_mb: sandbox limits per program
            (file_mb also bounds the results a program can send back: Mbpp/630's
            take 9.9 MiB, hence 16 by default).
        max_parallel: programs run at once.
        isolation: sandbox mode ("auto", "namespaces", "userns", "none").
        reference_timeout_s: wall-clock and CPU limit of a reference solution's run
            (once per problem; an upper bound: Mbpp/599's takes 20-80 s on a loaded
            2-core box). A reference that times out is retried at the next batch.
        constant_oracles: "exclude" (default), "heldout" or "include": what
            happens to problems a constant answer passes (see the module docstring).
    """

    name = "mbpp"

    def __init__(self, variant: str = "plus", path: str | None = None,
                 hf_dataset: str | None = None, hf_split: str = "test",
                 hf_config: str | None = None, split_seed: int = 42,
                 train_fraction: float = 0.7, template: str = DEFAULT_TEMPLATE, seed: int = 0,
                 timeout_s: float = 20.0, cpu_s: int = 20, memory_mb: int = 1024,
                 processes: int = 16, file_mb: int = 16, max_parallel: int = 4,
                 isolation: str = "auto", reference_timeout_s: float = 300.0,
                 constant_oracles: str = "exclude"):
        super().__init__(seed)
        if variant not in ("plus", "original"):
            raise ValueError(f"variant must be 'plus' or 'original', got {variant!r}")
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
        if constant_oracles not in CONSTANT_MODES:
            raise ValueError(f"constant_oracles must be one of {', '.join(CONSTANT_MODES)}, "
                             f"got {constant_oracles!r}")
        for field in ("{description}", "{test}"):
            if field not in template:
                raise ValueError(f"template must contain the field {field}")
        self.variant, self.template, self.constant_mode = variant, template, constant_oracles
        self.refused: dict[str, str] = {}  # original MBPP: problem id -> the test refused
        self.constant: dict[str, str] = {}  # problem id -> why a constant passes its tests
        self._expected: dict[str, _Expected | str] = {}  # cache: values, or why there are none
        self._lock = threading.Lock()
        default = data_root() / "mbpp" / ("MbppPlus.jsonl" if variant == "plus" else "mbpp.jsonl")
        records = load_records(path, default, hf_dataset, hf_split, hf_config)
        source = str(path or hf_dataset or default)
        if variant == "plus":
            train, heldout = self._load_plus(records, source, split_seed, train_fraction)
        else:
            train, heldout = self._load_original(records, source)
        self.problems = {p.prompt_id: p for p in train + heldout}
        """Every problem loaded (excluded ones too), by id."""
        keep_train = self.constant_mode == "include"
        keep_heldout = self.constant_mode != "exclude"
        self._set_problems([p for p in train if keep_train or p.prompt_id not in self.constant],
                           [p for p in heldout if keep_heldout or p.prompt_id not in self.constant])
        limits = dict(memory_mb=memory_mb, processes=processes, file_mb=file_mb,
                      output_bytes=int(file_mb) << 20)
        self.sandbox = Sandbox(Limits(wall_s=timeout_s, cpu_s=cpu_s, **limits),
                               max_parallel=max_parallel, isolation=isolation)
        self._reference_sandbox = None
        if variant == "plus":
            self._reference_sandbox = Sandbox(
                Limits(wall_s=reference_timeout_s, cpu_s=max(1, int(reference_timeout_s)), **limits),
                max_parallel=max_parallel, isolation=self.sandbox.isolation)
        self._runner = HARNESS.read_text(encoding="utf-8")

    # ------------------------------------------------------------------ problems

    def _prompt(self, description: str, test: str) -> str:
        return self.template.replace("{description}", description.strip()).replace(
            "{test}", test.strip())

    def _load_plus(self, records, source, split_seed, train_fraction):
        require_fields(records, ("task_id", "prompt", "entry_point", "canonical_solution",
                                 "base_input", "plus_input", "atol", "assertion"), source)
        problems = [self._plus_problem(r) for r in records]
        ids = {p.prompt_id for p in problems}
        self.constant = {k: v for k, v in constant_oracles().items() if k in ids}
        random.Random(split_seed).shuffle(problems)
        cut = round(train_fraction * len(problems))
        return problems[:cut], problems[cut:]

    def _plus_problem(self, r: dict) -> Problem:
        description = r["prompt"].strip().strip("'\"").strip()
        first_test = next(line for line in r["assertion"].splitlines() if line.strip())
        spec = {"kind": "plus", "entry_point": r["entry_point"], "atol": float(r["atol"] or 0),
                "reference": r["prompt"] + "\n" + r["canonical_solution"],
                "inputs": list(r["base_input"] or []) + list(r["plus_input"] or []),
                "rule": rule_of(int(str(r["task_id"]).split("/")[-1])),
                "oracle": mbpp_check.ORACLES.get(r["entry_point"])}
        return Problem(str(r["task_id"]), self._prompt(description, first_test),
                       r["canonical_solution"], {"spec": json.dumps(spec), "entry_point": r["entry_point"]})

    def _load_original(self, records, source):
        require_fields(records, ("task_id", "text", "code", "test_list"), source)
        by_id = {}
        for r in records:
            problem = self._original_problem(r)
            if problem is not None:
                by_id[int(r["task_id"])] = problem
        return ([p for i, p in sorted(by_id.items()) if 601 <= i <= 974],
                [p for i, p in sorted(by_id.items()) if 11 <= i <= 510])

    def _original_problem(self, r: dict) -> Problem | None:
        pid = f"Mbpp/{r['task_id']}"
        try:
            tests = [mbpp_check.parse_assert(t) for t in r["test_list"]]
        except mbpp_check.Refused as exc:
            self.refused[pid] = str(exc)
            return None
        calls = [[name, args] for name, args, _, _ in tests]
        expected = _Expected([t[2] for t in tests], [t[3] for t in tests])
        reason = constant_reason(expected)
        if reason:
            self.constant[pid] = reason
        self._expected[pid] = expected
        spec = {"kind": "asserts", "calls": calls}
        return Problem(pid, self._prompt(r["text"], r["test_list"][0]), r["code"],
                       {"spec": json.dumps(spec), "entry_point": tests[0][0]})

    def problem(self, prompt_id: str) -> Problem:
        """Any loaded problem by id (excluded ones too); KeyError if there is none."""
        return self.problems[prompt_id]

    # ------------------------------------------------------------------ verifier

    @staticmethod
    def _calls(spec: dict) -> list:
        if spec["kind"] == "asserts":
            return spec["calls"]
        return [[spec["entry_point"], encode(restore(spec["rule"], args))] for args in spec["inputs"]]

    def program(self, problem: Problem, code: str) -> tuple[str, dict]:
        """The sandboxed program calling `code`'s function on `problem`'s inputs, and its files."""
        calls = self._calls(json.loads(problem.meta["spec"]))
        return self._runner, {"solution.py": code, "calls.json": json.dumps(calls)}

    def _code(self, problem: Problem, text: str | None) -> str | None:
        if not isinstance(text, str):
            return None
        code = extract_code(text, problem.meta.get("entry_point", ""))
        return code if code.strip() and len(code) <= MAX_CODE_CHARS else None

    def _reference_done(self, problem: Problem, result: RunResult) -> None:
        """Keep the reference's outputs as the problem's expected values (not after a timeout)."""
        spec = json.loads(problem.meta["spec"])
        values, why = mbpp_check.parse_frames(result.stdout, len(spec["inputs"]))
        if values is None:
            if result.timed_out:
                return
            why = f"the reference solution failed: {why} (rc {result.returncode})"
            log.warning("mbpp %s: %s", problem.prompt_id, why)
            self._expected[problem.prompt_id] = why
            return
        mappings = any('["m",' in json.dumps(v) for v in values)
        self._expected[problem.prompt_id] = _Expected(values, [spec["oracle"]] * len(values),
                                                      spec["atol"], mappings)

    def _judge(self, problem: Problem, result: RunResult) -> Verdict:
        expected = self._expected.get(problem.prompt_id, "the reference solution timed out")
        if isinstance(expected, str):
            return Verdict(0.0, expected)
        if result.timed_out:
            return Verdict(0.0, "timeout")
        values, why = mbpp_check.parse_frames(result.stdout, len(expected.values))
        if values is None:
            return Verdict(0.0, why)
        for i, (want, got, oracle) in enumerate(zip(expected.values, values, expected.oracles)):
            if not mbpp_check.matches(want, got, oracle, expected.atol, expected.mappings):
                return Verdict(0.0, f"wrong output {i}")
        return Verdict(1.0, "ok")

    def verdicts(self, problems: list[Problem], texts: list[str | None]) -> list[Verdict]:
        """Rewards of many completions and why, their programs (and missing references) in parallel."""
        out: list[Verdict | None] = [None] * len(texts)
        jobs, refs = [], {}
        for i, (p, text) in enumerate(zip(problems, texts)):
            code = self._code(p, text)
            if p.prompt_id in self.constant and self.constant_mode == "exclude":
                out[i] = Verdict(0.0, "excluded: " + self.constant[p.prompt_id])
            elif code is None:
                out[i] = Verdict(0.0, "no code")
            else:
                jobs.append((i, p, code))
                if p.prompt_id not in self._expected:
                    refs[p.prompt_id] = p
        if refs:
            self._run_references(list(refs.values()))
        programs = [self.program(p, c) for _, p, c in jobs]
        results = self.sandbox.run_many([s for s, _ in programs], [f for _, f in programs])
        for (i, p, _), result in zip(jobs, results):
            out[i] = self._judge(p, result)
        return out

    def _run_references(self, problems: list[Problem]) -> None:
        """Compute (and keep) the expected outputs of `problems` from their reference solutions."""
        programs = [self.program(p, json.loads(p.meta["spec"])["reference"]) for p in problems]
        results = self._reference_sandbox.run_many([s for s, _ in programs], [f for _, f in programs])
        with self._lock:
            for p, result in zip(problems, results):
                self._reference_done(p, result)

    def reward(self, problem: Problem, completion_text: str | None) -> float:
        """1.0 when the completion's function passes every test, else 0.0."""
        return self.score_batch([problem], [completion_text])[0]

    def score_batch(self, problems: list[Problem], texts: list[str | None]) -> list[float]:
        """Rewards of many completions, their programs run in parallel."""
        return [v.reward for v in self.verdicts(problems, texts)]

    def expected_outputs(self, problems: list[Problem]) -> dict[str, object]:
        """Each problem's expected values (an `_Expected`) or why there are none, running
        the references not yet run."""
        missing = [p for p in problems if p.prompt_id not in self._expected]
        if missing and self._reference_sandbox is not None:
            self._run_references(missing)
        return {p.prompt_id: self._expected.get(p.prompt_id, "the reference solution timed out")
                for p in problems}


def constant_reason(expected: _Expected) -> str | None:
    """Why one constant answer passes every test of a problem, or None if none does."""
    oracles = set(expected.oracles)
    if oracles <= {"always"}:
        return "oracle 'always': every answer passes"
    if oracles <= {"always", "or_zero"}:
        return "oracle 'or_zero': the answer 0 passes"
    if not mbpp_check.constant_passes(expected.values, expected.oracles, expected.atol):
        return None
    if "not_none" in oracles:
        return "oracle 'not_none' and every reference output is on the same side of None"
    try:
        shown = repr(decode(expected.values[0]))
    except (ValueError, TypeError):
        shown = json.dumps(expected.values[0])
    return f"every test expects the same value {shown[:60]}"
