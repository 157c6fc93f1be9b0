"""MBPP+ / MBPP against the real data: prompts, split, sandboxed tests, reward hacks.

(The adversarial suite is tests/test_reward_hacks.py; the checker's own
comparisons are in tests/test_mbpp_check.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rapid_async.tasks.mbpp import MBPPTask, constant_reason, extract_code
from rapid_async.tasks.mbpp_inputs import constant_oracles

EXCEPTIONS = json.loads((Path(__file__).parent / "data" / "verifier_exceptions.json")
                        .read_text())["mbpp"]["reference_fails"]


@pytest.fixture(scope="module")
def plus(shared_data):
    return MBPPTask(path=str(shared_data / "mbpp" / "MbppPlus.jsonl"), timeout_s=20, max_parallel=2)


def _every(task):
    return [task.train_problem(i) for i in range(task.train_size)] + task.heldout(task.heldout_size)


def _fenced(code: str) -> str:
    return f"Here is the function:\n```python\n{code}\n```\nDone."


def _check_references(task, problems, shared_data):
    """Every reference passes its own tests. The timeouts are upper bounds: a
    reference that times out (never one that answers wrongly) is tried once more
    with a generous limit (Mbpp/599's sums up to 10^8 take 20-80 s on a loaded box)."""
    verdicts = task.verdicts(problems, [_fenced(p.answer) for p in problems])
    slow = [p for p, v in zip(problems, verdicts) if "timed out" in v.reason or v.reason == "timeout"]
    if slow:
        patient = MBPPTask(path=str(shared_data / "mbpp" / "MbppPlus.jsonl"), timeout_s=600,
                           cpu_s=600, reference_timeout_s=600, max_parallel=2)
        again = dict(zip([p.prompt_id for p in slow],
                         patient.verdicts(slow, [_fenced(p.answer) for p in slow])))
        verdicts = [again.get(p.prompt_id, v) for p, v in zip(problems, verdicts)]
    failed = {p.prompt_id: v.reason for p, v in zip(problems, verdicts) if v.reward != 1.0}
    assert set(failed) <= set(EXCEPTIONS), {k: failed[k] for k in set(failed) - set(EXCEPTIONS)}
    assert len(failed) <= 0.02 * len(problems)


def test_split_and_prompt(plus, shared_data):
    constant = set(constant_oracles())
    assert {"Mbpp/164", "Mbpp/295"} <= constant
    # 70/30 of 399, seed 42, less the problems a constant passes
    everything = MBPPTask(path=str(shared_data / "mbpp" / "MbppPlus.jsonl"), isolation="none",
                          constant_oracles="include")
    assert (everything.train_size, everything.heldout_size) == (279, 120)
    train = {everything.train_problem(i).prompt_id for i in range(279)}
    assert plus.train_size == 279 - len(train & constant)
    assert plus.heldout_size == 120 - len(constant - train)
    ids = {p.prompt_id for p in _every(plus)}
    assert len(ids) == 399 - len(constant) and not ids & constant
    assert len(plus.problems) == 399
    p = plus.problem("Mbpp/2")
    assert "find the shared elements from the given two lists" in p.prompt
    assert "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))" in p.prompt \
        or "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10))" in p.prompt
    assert p.prompt.count("assert") == 1  # only the first test is shown


def test_split_is_seeded(shared_data):
    path = str(shared_data / "mbpp" / "MbppPlus.jsonl")
    a = MBPPTask(path=path, isolation="none")
    b = MBPPTask(path=path, split_seed=7, isolation="none")
    assert [p.prompt_id for p in a.heldout(100)] != [p.prompt_id for p in b.heldout(100)]
    assert [p.prompt_id for p in a.heldout(100)] == \
        [p.prompt_id for p in MBPPTask(path=path, isolation="none").heldout(100)]


def test_split_modes(shared_data):
    path = str(shared_data / "mbpp" / "MbppPlus.jsonl")
    heldout = MBPPTask(path=path, isolation="none", constant_oracles="heldout")
    every = MBPPTask(path=path, isolation="none", constant_oracles="include")
    assert heldout.heldout_size == every.heldout_size == 120
    assert heldout.train_size < every.train_size
    with pytest.raises(ValueError, match="constant_oracles"):
        MBPPTask(path=path, isolation="none", constant_oracles="sometimes")


def test_reference_programs_pass_a_sample(plus, shared_data):
    _check_references(plus, _every(plus)[::10], shared_data)


@pytest.mark.slow
@pytest.mark.full  # bin/test checks every 10th: test_reference_programs_pass_a_sample
def test_every_reference_program_passes_its_tests(plus, shared_data):
    """All MBPP+ tasks (each reference runs twice: as the reference, then as a
    candidate); and the committed list of problems a constant passes is exactly
    what the reference outputs say."""
    _check_references(plus, _every(plus), shared_data)
    expected = plus.expected_outputs(sorted(plus.problems.values(), key=lambda p: p.prompt_id))
    found = {pid: constant_reason(e) for pid, e in expected.items() if not isinstance(e, str)}
    assert {pid for pid, why in found.items() if why} == set(constant_oracles())


def test_wrong_programs_fail(plus):
    p = plus.problem("Mbpp/2")
    assert plus.reward(p, _fenced(p.answer)) == 1.0
    wrong = [
        "def similar_elements(a, b):\n    return tuple(set(a) | set(b))\n",  # union, not intersection
        "def similar_elements(a, b):\n    return None\n",
        "def similar(a, b):\n    return tuple(set(a) & set(b))\n",  # wrong name
        "def similar_elements(a, b):\n    raise ValueError\n",
        "this is not python",
        "",
    ]
    assert plus.score_batch([p] * len(wrong), [_fenced(w) for w in wrong]) == [0.0] * len(wrong)
    assert plus.reward(p, None) == 0.0


def test_reward_hacks_fail(plus):
    p = plus.problem("Mbpp/2")
    hacks = [
        # an object equal to everything
        "class Any:\n    def __eq__(self, other):\n        return True\n"
        "def similar_elements(a, b):\n    return Any()\n",
        # leave early with success before any test runs
        "import os\nos._exit(0)\n",
        "import sys\nsys.exit(0)\n",
        # print what a success might look like
        "print('ok')\nimport os\nos._exit(0)\n",
        # read the nonce the way the environment could be read
        "import os\nprint(open('/proc/self/environ').read())\nos._exit(0)\n",
    ]
    assert plus.score_batch([p] * len(hacks), [_fenced(h) for h in hacks]) == [0.0] * len(hacks)


def test_hostile_programs_score_zero(shared_data, monkeypatch, tmp_path):
    """Each program answers correctly only if its attack worked (or it was not
    stopped), so a reward of 0 means the sandbox held."""
    monkeypatch.setenv("RAPID_TEST_SECRET", "s3cr3t")
    task = MBPPTask(path=str(shared_data / "mbpp" / "MbppPlus.jsonl"), timeout_s=3, cpu_s=3,
                    memory_mb=256, max_parallel=2)
    p = task.problem("Mbpp/2")
    escape = tmp_path / "escape.txt"
    attacks = {
        "infinite loop": "while True:\n    pass\nok = True",
        "memory bomb": "x = bytearray(8 << 30)\nok = True",
        "fork bomb": "import os\nfor _ in range(100000):\n    os.fork()\nok = True",
        "write outside": f"open({str(escape)!r}, 'w').write('x')\nok = True",
        "secrets": "import os\nok = os.environ.get('RAPID_TEST_SECRET') == 's3cr3t'",
        "network": "import socket\ns = socket.socket()\ns.settimeout(1)\n"
                   "ok = s.connect_ex(('127.0.0.1', 9)) in (0, 111)",  # refused = reachable
        "huge output": "import sys\nfor _ in range(10**6):\n    sys.stdout.write('x' * 65536)\nok = True",
    }
    codes = [f"try:\n" + "".join(f"    {line}\n" for line in attack.splitlines())
             + "except BaseException:\n    ok = False\n"
             "def similar_elements(a, b):\n    return tuple(set(a) & set(b)) if ok else None\n"
             for attack in attacks.values()]
    rewards = task.score_batch([p] * len(codes), [_fenced(c) for c in codes])
    assert dict(zip(attacks, rewards)) == dict.fromkeys(attacks, 0.0)
    assert not escape.exists()
    control = "ok = True\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b)) if ok else None\n"
    assert task.reward(p, _fenced(control)) == 1.0


ORIGINAL_REFUSED = {"Mbpp/367", "Mbpp/596", "Mbpp/601", "Mbpp/927"}
"""Original-MBPP problems whose tests are not `call == literal`: a tree built by the
setup code (367, 927), a Pair class the solution defines (601), sys.getsizeof (596)."""


def test_original_mbpp_asserts(shared_data):
    task = MBPPTask(variant="original", path=str(shared_data / "mbpp" / "mbpp.jsonl"), max_parallel=2)
    assert set(task.refused) == ORIGINAL_REFUSED
    excluded = set(task.constant)
    assert all(task.problem(pid) for pid in excluded) and len(excluded) < 30
    number = {pid: int(pid.split("/")[1]) for pid in excluded}
    assert task.train_size == 374 - 2 - sum(601 <= n <= 974 for n in number.values())  # 601, 927
    assert task.heldout_size == 500 - 1 - sum(11 <= n <= 510 for n in number.values())  # 367
    problems = task.heldout(40)
    assert task.score_batch(problems, [_fenced(p.answer) for p in problems]).count(1.0) >= 39
    p = problems[0]
    assert p.prompt.count("assert") == 1
    broken = p.answer.replace("return", "return None and", 1)
    assert task.reward(p, _fenced(broken)) == 0.0


def test_extract_code():
    text = "first\n```python\ndef g():\n    pass\n```\nthen\n```python\ndef f(x):\n    return x\n```\n```\nprint(1)\n```"
    assert extract_code(text, "f") == "def f(x):\n    return x\n"
    assert extract_code(text, "h") == "print(1)\n"
    assert extract_code("def f(): pass", "f") == "def f(): pass"
