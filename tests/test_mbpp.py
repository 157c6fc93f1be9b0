"""MBPP+ / MBPP against the real data: prompts, split, sandboxed tests, reward hacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rapid_async.tasks.mbpp import MBPPTask, extract_code

EXCEPTIONS = json.loads((Path(__file__).parent / "data" / "verifier_exceptions.json")
                        .read_text())["mbpp"]["reference_fails"]


@pytest.fixture(scope="module")
def plus(shared_data):
    return MBPPTask(path=str(shared_data / "mbpp" / "MbppPlus.jsonl"), timeout_s=20, max_parallel=2)


def _every(task):
    return [task.train_problem(i) for i in range(task.train_size)] + task.heldout(task.heldout_size)


def _fenced(code: str) -> str:
    return f"Here is the function:\n```python\n{code}\n```\nDone."


def _check_references(task, problems):
    rewards = task.score_batch(problems, [_fenced(p.answer) for p in problems])
    failed = [p.prompt_id for p, r in zip(problems, rewards) if r != 1.0]
    assert set(failed) <= set(EXCEPTIONS), set(failed) - set(EXCEPTIONS)
    assert len(failed) <= 0.02 * len(problems)


def test_split_and_prompt(plus):
    assert (plus.train_size, plus.heldout_size) == (279, 120)  # 70/30 of 399, seed 42
    ids = {p.prompt_id for p in _every(plus)}
    assert len(ids) == 399
    p = next(q for q in _every(plus) if q.prompt_id == "Mbpp/2")
    assert "find the shared elements from the given two lists" in p.prompt
    assert "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))" in p.prompt \
        or "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10))" in p.prompt
    assert p.prompt.count("assert") == 1  # only the first test is shown


def test_split_is_seeded(shared_data):
    path = str(shared_data / "mbpp" / "MbppPlus.jsonl")
    a = MBPPTask(path=path, isolation="none")
    b = MBPPTask(path=path, split_seed=7, isolation="none")
    assert [p.prompt_id for p in a.heldout(120)] != [p.prompt_id for p in b.heldout(120)]
    assert [p.prompt_id for p in a.heldout(120)] == \
        [p.prompt_id for p in MBPPTask(path=path, isolation="none").heldout(120)]


def test_reference_programs_pass_a_sample(plus):
    _check_references(plus, _every(plus)[::10])


@pytest.mark.slow
def test_every_reference_program_passes_its_tests(plus):
    """All 399 MBPP+ tasks (about 45 s with 2 programs at a time)."""
    _check_references(plus, _every(plus))


def test_wrong_programs_fail(plus):
    p = next(q for q in _every(plus) if q.prompt_id == "Mbpp/2")
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
    p = next(q for q in _every(plus) if q.prompt_id == "Mbpp/2")
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
    p = next(q for q in _every(task) if q.prompt_id == "Mbpp/2")
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


def test_original_mbpp_asserts(shared_data):
    task = MBPPTask(variant="original", path=str(shared_data / "mbpp" / "mbpp.jsonl"), max_parallel=2)
    assert (task.train_size, task.heldout_size) == (374, 500)
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
