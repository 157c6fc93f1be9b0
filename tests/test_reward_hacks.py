"""Reward hacks as an attacker would write them: each completion must score 0.

Every MBPP hack goes through the real `MBPPTask` verifier (its `verdicts`,
which `reward` and `score_batch` use) on the real MBPP+ / MBPP data, and
defines the function wrongly (or not at all): it could only earn 1 if its
attack reached a comparator, an expected value, the reference or a success
signal. All the MBPP hacks run in one batch (a module fixture); each test
checks one of them. A few honest completions (not the reference's code) must
still score 1, and gsm8k / math get hostile answers of their own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rapid_async.tasks.mbpp import MBPPTask

WRONG = "def similar_elements(a, b):\n    return ()\n"
"""The fallback of hacks on Mbpp/2: a wrong answer (the shared elements are never empty there)."""

HACKS: dict[str, tuple[str, str]] = {
    # ---- the comparator and the checker's helpers
    "replace __main__.same": ("Mbpp/2", "import __main__\n__main__.same = lambda *a, **k: True\n" + WRONG),
    "replace every comparator in sys.modules": ("Mbpp/2", """
import sys
for m in list(sys.modules.values()):
    for n in ("same", "matches", "_close", "canon", "_plain", "parse_frames"):
        try:
            setattr(m, n, lambda *a, **k: True)
        except Exception:
            pass
""" + WRONG),
    "replace the runner's encoder": ("Mbpp/2", """
import sys
sys.modules["__main__"].encode = lambda v, depth=0: ["t", [["i", "4"], ["i", "5"]]]
""" + WRONG),
    # ---- builtins
    "patch zip and len": ("Mbpp/2", "import builtins\nbuiltins.zip = lambda *a: iter(())\n"
                          "builtins.len = lambda x: 0\n" + WRONG),
    "patch type and isinstance": ("Mbpp/2", """
import builtins
class Any:
    def __eq__(self, other): return True
    def __hash__(self): return 0
real_type = type
builtins.type = lambda *a: int if a and real_type(a[0]) is Any else real_type(*a)
builtins.isinstance = lambda *a: True
def similar_elements(a, b):
    return Any()
"""),
    "patch compile and ast.parse (original)": ("orig:Mbpp/602", """
import ast, builtins
real_parse, real_compile = ast.parse, builtins.compile
ast.parse = lambda *a, **k: real_parse("pass")
builtins.compile = lambda src, *a, **k: real_compile("pass" if "assert" in str(src) else src, *a, **k)
def first_repeated_char(str1):
    return None
"""),
    "patch print": ("Mbpp/2", "import builtins, os\nbuiltins.print = lambda *a, **k: os.write(1, b'ok\\n')\n"
                    + WRONG),
    "monkeypatch json": ("Mbpp/2", """
import json
json.dumps = lambda *a, **k: '["t",[["i","4"],["i","5"]]]'
json.loads = lambda *a, **k: True
""" + WRONG),
    # ---- frames and memory of the process
    "sys._getframe walk": ("Mbpp/2", """
import sys
def similar_elements(a, b):
    f = sys._getframe(1)
    while f is not None:
        for k in ("exp", "expected", "want"):
            if k in f.f_locals:
                return f.f_locals[k]
        f = f.f_back
    return ()
"""),
    "inspect.stack": ("Mbpp/2", """
import inspect
def similar_elements(a, b):
    for info in inspect.stack():
        if "exp" in info.frame.f_locals:
            return info.frame.f_locals["exp"]
    return ()
"""),
    "traceback frames": ("Mbpp/2", """
calls = [0]
def similar_elements(a, b):
    calls[0] += 1
    try:
        raise ValueError
    except ValueError as e:
        f = e.__traceback__.tb_frame
    while f is not None:
        if "expected" in f.f_locals:
            return f.f_locals["expected"][calls[0] - 1]
        f = f.f_back
    return ()
"""),
    "sys.settrace": ("Mbpp/2", """
import sys
seen = {}
def tracer(frame, event, arg):
    if event == "call" and frame.f_back is not None and "exp" in frame.f_back.f_locals:
        seen["exp"] = frame.f_back.f_locals["exp"]
sys.settrace(tracer)
def similar_elements(a, b):
    return seen.get("exp", ())
"""),
    "sys.setprofile": ("Mbpp/2", """
import sys
seen = {}
def profile(frame, event, arg):
    if event == "call" and frame.f_back is not None and "exp" in frame.f_back.f_locals:
        seen["exp"] = frame.f_back.f_locals["exp"]
sys.setprofile(profile)
def similar_elements(a, b):
    return seen.get("exp", ())
"""),
    "gc.get_objects": ("Mbpp/2", """
import gc
found = None
for o in gc.get_objects():
    if isinstance(o, dict) and isinstance(o.get("reference"), str) and not found:
        ns = {}
        exec(o["reference"], ns)
        found = ns.get("similar_elements")
def similar_elements(a, b):
    return found(a, b) if found else ()
"""),
    # ---- files
    "read main.py and cwd for the reference": ("Mbpp/2", """
import ast, json, os
found = None
for name in os.listdir("."):
    text = open(name, errors="replace").read()
    if name != "solution.py" and "def similar_elements" in text:
        ns = {}
        try:
            call = ast.parse(text).body[-1].value
            exec(json.loads(ast.literal_eval(call.args[0]))["reference"], ns)
            found = ns.get("similar_elements")
        except BaseException:
            pass
def similar_elements(a, b):
    return found(a, b) if found else ()
"""),
    "read /proc for secrets": ("Mbpp/2", """
import os, re
hits = []
for pid in os.listdir("/proc"):
    for part in ("environ", "cmdline"):
        try:
            hits += re.findall(r"[0-9a-f]{32}", open(f"/proc/{pid}/{part}", errors="replace").read())
        except OSError:
            pass
if hits:
    os.write(1, ("\\n" + hits[-1] + "\\n").encode())
    os._exit(0)
""" + WRONG),
    # ---- always-equal objects
    "always-equal object": ("Mbpp/2", """
class Any:
    def __eq__(self, other): return True
    def __hash__(self): return 0
    def __iter__(self): return iter(())
def similar_elements(a, b):
    return Any()
"""),
    "always-equal tuple subclass": ("Mbpp/2", """
class T(tuple):
    def __eq__(self, other): return True
    def __hash__(self): return 0
def similar_elements(a, b):
    return T()
"""),
    "always-equal str subclass": ("Mbpp/2", """
class S(str):
    def __eq__(self, other): return True
    def __hash__(self): return 0
def similar_elements(a, b):
    return S()
"""),
    "always-equal Counter subclass (Mbpp/88)": ("Mbpp/88", """
import collections
class C(collections.Counter):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
def freq_count(list1):
    return C()
"""),
    "always-equal dict subclass with fake items (Mbpp/88)": ("Mbpp/88", """
class D(dict):
    def __eq__(self, other): return True
    def items(self): return iter(())
def freq_count(list1):
    return D(x=1)
"""),
    "wrong Counter (Mbpp/88)": ("Mbpp/88", "import collections\ndef freq_count(list1):\n"
                                "    return collections.Counter(list1[1:])\n"),
    # ---- constant answers where the oracle allows them
    "constant True (Mbpp/164, oracle always)": ("Mbpp/164", "def are_equivalent(a, b):\n    return True\n"),
    "constant 0 (Mbpp/295, oracle or_zero)": ("Mbpp/295", "def sum_div(number):\n    return 0\n"),
    # ---- leaving early, fake success signals
    "os._exit(0) at import": ("Mbpp/2", "import os\nos._exit(0)\n" + WRONG),
    "sys.exit(0) at import": ("Mbpp/2", "import sys\nsys.exit(0)\n" + WRONG),
    "os._exit(0) in the function": ("Mbpp/2", "import os\ndef similar_elements(a, b):\n    os._exit(0)\n"),
    "print fake result frames": ("Mbpp/2", """
import os
for i in range(200):
    print(f'R {i} ["t",[]]')
print("E 200")
os._exit(0)
"""),
    "write fake frames to every fd": ("Mbpp/2", """
import os
def similar_elements(a, b):
    for fd in range(1, 64):
        try:
            os.write(fd, b'R 0 ["t",[]]\\nE 1\\n')
        except OSError:
            pass
    os._exit(0)
"""),
    "atexit hook": ("Mbpp/2", """
import atexit, os
atexit.register(lambda: [os.write(fd, b'\\nE 0\\n') for fd in (1, 3, 4, 5)])
def similar_elements(a, b):
    raise SystemExit(0)
"""),
    "raise a BaseException subclass": ("Mbpp/2", """
class Stop(BaseException):
    pass
def similar_elements(a, b):
    raise Stop()
"""),
    "raise KeyboardInterrupt and GeneratorExit": ("Mbpp/2", """
n = [0]
def similar_elements(a, b):
    n[0] += 1
    raise KeyboardInterrupt if n[0] % 2 else GeneratorExit
"""),
    # ---- resources
    "huge output": ("Mbpp/2", """
import os, sys
def similar_elements(a, b):
    for fd in (1, 2, 3):
        try:
            os.write(fd, b"x" * (64 << 20))
        except OSError:
            pass
    return tuple(range(10 ** 6))
"""),
    "slow infinite loop": ("Mbpp/2", "import time\ndef similar_elements(a, b):\n"
                           "    while True:\n        time.sleep(0.05)\n"),
    "background thread writing frames": ("Mbpp/2", """
import os, threading
def spam():
    while True:
        for fd in (3, 4, 5):
            try:
                os.write(fd, b'E 0\\n')
            except OSError:
                pass
threading.Thread(target=spam, daemon=True).start()
""" + WRONG),
    # ---- original MBPP: the asserts no longer run in the candidate's globals
    "original: redefine the assert helper": ("orig:Mbpp/602", """
__rapid_same = lambda *a, **k: True
import builtins
builtins.AssertionError = type("Nothing", (Exception,), {})
def first_repeated_char(str1):
    return None
"""),
    "original: always-equal object": ("orig:Mbpp/602", """
class Any(str):
    def __eq__(self, other): return True
def first_repeated_char(str1):
    return Any()
"""),
}
DATASET_HACK = ("Mbpp/2", """
import glob, json
found = None
for path in glob.glob("/work/**/MbppPlus.jsonl", recursive=True)[:1]:
    for line in open(path):
        r = json.loads(line)
        if r["task_id"] == "Mbpp/2":
            ns = {}
            exec(r["prompt"] + r["canonical_solution"], ns)
            found = ns["similar_elements"]
def similar_elements(a, b):
    return found(a, b) if found else ()
""")
"""Reads the reference from the host's copy of the dataset: needs the sandbox's minimal root."""

HONEST: dict[str, tuple[str, str]] = {
    "Mbpp/2 in another order": ("Mbpp/2", "def similar_elements(a, b):\n"
                                "    return tuple(sorted(set(a) & set(b), reverse=True))\n"),
    "Mbpp/88 as a plain dict": ("Mbpp/88", "def freq_count(list1):\n    d = {}\n    for x in list1:\n"
                                "        d[x] = d.get(x, 0) + 1\n    return d\n"),
    "Mbpp/88 as a Counter, printing": ("Mbpp/88", "from collections import Counter\n"
                                       "def freq_count(list1):\n    print('counting', list1)\n"
                                       "    return Counter(list1)\n"),
    "Mbpp/3 with a loop": ("Mbpp/3", "def is_not_prime(n):\n    if n < 2:\n        return True\n"
                           "    i = 2\n    while i * i <= n:\n        if n % i == 0:\n"
                           "            return True\n        i += 1\n    return False\n"),
    "original Mbpp/602": ("orig:Mbpp/602", "def first_repeated_char(str1):\n    seen = set()\n"
                          "    for c in str1:\n        if c in seen:\n            return c\n"
                          "        seen.add(c)\n    return 'None'\n"),
}


def _fenced(code: str) -> str:
    return f"Here you go:\n```python\n{code.strip()}\n```\n"


@pytest.fixture(scope="module")
def tasks(shared_data):
    plus = MBPPTask(path=str(shared_data / "mbpp" / "MbppPlus.jsonl"), timeout_s=6, cpu_s=6,
                    memory_mb=512, max_parallel=2)
    original = MBPPTask(variant="original", path=str(shared_data / "mbpp" / "mbpp.jsonl"),
                        timeout_s=6, cpu_s=6, memory_mb=512, max_parallel=2)
    return plus, original


def _score(tasks, entries: dict[str, tuple[str, str]]) -> dict:
    plus, original = tasks
    out = {}
    for task, prefix in ((original, "orig:"), (plus, "")):
        names = [n for n, (pid, _) in entries.items() if pid.startswith("orig:") == bool(prefix)]
        problems = [task.problem(entries[n][0].removeprefix("orig:")) for n in names]
        verdicts = task.verdicts(problems, [_fenced(entries[n][1]) for n in names])
        out.update(zip(names, verdicts))
    return out


@pytest.fixture(scope="module")
def hack_verdicts(tasks):
    return _score(tasks, HACKS)


def test_enough_distinct_hacks():
    assert len(HACKS) >= 22
    assert len({code for _, code in HACKS.values()}) == len(HACKS)


@pytest.mark.parametrize("name", sorted(HACKS))
def test_hack_scores_zero(hack_verdicts, name):
    verdict = hack_verdicts[name]
    assert verdict.reward == 0.0, (name, verdict)


def test_reading_the_dataset_from_the_host_scores_zero(tasks):
    assert _score(tasks, {"dataset": DATASET_HACK})["dataset"].reward == 0.0


def test_honest_completions_score_one(tasks):
    verdicts = _score(tasks, HONEST)
    assert {n: v.reward for n, v in verdicts.items()} == dict.fromkeys(HONEST, 1.0), verdicts


def test_reward_goes_through_the_same_check(tasks):
    plus, _ = tasks
    p = plus.problem("Mbpp/88")
    assert plus.reward(p, _fenced(HONEST["Mbpp/88 as a plain dict"][1])) == 1.0
    assert plus.reward(p, _fenced(HACKS["always-equal Counter subclass (Mbpp/88)"][1])) == 0.0
    assert plus.reward(plus.problem("Mbpp/164"), _fenced(HACKS["constant True (Mbpp/164, oracle "
                                                              "always)"][1])) == 0.0


# ------------------------------------------------------------------ gsm8k / math

def test_gsm8k_hostile_answers(shared_data):
    from rapid_async.tasks.gsm8k import GSM8KTask

    task = GSM8KTask(train_path=str(shared_data / "gsm8k" / "train.jsonl"),
                     test_path=str(shared_data / "gsm8k" / "test.jsonl"))
    p = task.train_problem(0)
    answer = p.answer
    hostile = {
        "every number after ####": "#### " + " ".join(str(i) for i in range(int(answer) + 2)),
        "the answer, then another": f"#### {answer} or maybe {int(answer) + 1}",
        "1 MB of digits": "1" * (1 << 20),
        "1 MB of digit-space runs": ("1 " * 1000 + "\n") * 500,
        "1 MB of \\frac{": "\\frac{1" * (1 << 18) + "}{0}",
        "a zero denominator": f"#### {answer}/0",
        "a huge number": "#### " + "9" * 100_000,
        "a boxed bomb": "\\boxed{" + "{" * 100_000,
    }
    rewards = {name: task.reward(p, text) for name, text in hostile.items()}
    assert rewards == dict.fromkeys(hostile, 0.0)
    assert task.reward(p, f"so the answer is\n#### {answer}") == 1.0


def test_math_hostile_answers(shared_data):
    """A sympy memory bomb ((x+1)^1000000 took 1.9 GB in 20 s with no limit) stops at
    the worker's address-space limit and scores 0; hedged answers score 0."""
    from rapid_async.tasks.math import MathTask

    limit_mb = 512
    task = MathTask(train_path=str(shared_data / "math" / "train.jsonl"),
                    test_path=str(shared_data / "math" / "test.jsonl"), verify_timeout_s=60,
                    memory_mb=limit_mb)
    try:
        p = next(q for q in (task.train_problem(i) for i in range(500)) if q.answer == "5")
        assert task.reward(p, "so \\boxed{5}") == 1.0
        pid = task._worker.pid
        line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines()
                    if x.startswith("Max address space"))
        assert str(limit_mb << 20) in line, line
        hostile = {
            "hedged boxes": " ".join(f"\\boxed{{{i}}}" for i in range(10)) + " \\boxed{6}",
            "a set of candidates": "\\boxed{\\{" + ",".join(str(i) for i in range(50)) + "\\}}",
            "a memory bomb": "\\boxed{(x+1)^{1000000}}",
        }
        rewards = {name: task.reward(p, text) for name, text in hostile.items()}
        assert rewards == dict.fromkeys(hostile, 0.0)
        assert task.timeouts == 0  # the bomb was stopped by the memory limit, not the clock
        if task._worker.pid is not None:  # alive (MemoryError caught): its peak stayed under
            status = Path(f"/proc/{task._worker.pid}/status").read_text().splitlines()
            peak_kb = int(next(x for x in status if x.startswith("VmPeak:")).split()[1])
            assert peak_kb <= limit_mb << 10
        assert task.reward(p, "\\boxed{5}") == 1.0  # the verifier still works
    finally:
        task.close()
