"""MiniF2F: the Lean contract, tested with a stand-in for `lean` (no toolchain here).

The stand-in is an executable script in a fake toolchain directory; it runs
where the real Lean would (inside the sandbox) and reports what it can see,
so the tests check the command line, the mounts and the limits Lean gets.
No real Lean proof is checked here.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from conftest import REPO
from rapid_async.tasks.base import get_task
from rapid_async.tasks.lean_screen import Refused, build_source, strip_comments
from rapid_async.tasks.minif2f import PROOF_FILE, MiniF2FTask, proof_source

FAKE_LEAN = textwrap.dedent('''
    """Stand-in for `lean FILE`: reports what it sees (one JSON line), then
    accepts a proof that ends with `norm_num`, sleeps on `decide`, and
    reports a failure otherwise."""
    import json, os, pathlib, sys, time
    source = pathlib.Path(sys.argv[1]).read_text()
    status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
    try:
        open("written-by-lean.txt", "w").write("x")
        project_writable = True
    except OSError:
        project_writable = False
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "source": source,
                      "net": [l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]],
                      "visible": [p for p in VISIBLE if os.path.exists(p)],
                      "caps": status["CapEff"].strip(), "nnp": status["NoNewPrivs"].strip(),
                      "cgroup": open("/proc/self/cgroup").read(),
                      "project_writable": project_writable}), flush=True)
    if "\\n  decide\\n" in source:
        time.sleep(60)
    if source.rstrip().endswith("norm_num"):
        sys.exit(0)
    print(f"{sys.argv[1]}:5:2: " + "err" + "or: unsolved goals")
    sys.exit(1)
''')


def _make_task(tmp_path, shared_data, **options) -> MiniF2FTask:
    project, bin_dir = tmp_path / "project", tmp_path / "toolchain" / "bin"
    project.mkdir(exist_ok=True)
    bin_dir.mkdir(parents=True, exist_ok=True)
    lean = bin_dir / "lean"
    visible = [str(REPO / "rapid_async"), str(REPO / "tests"), str(REPO / "README.md"), str(shared_data), "/work/shared/data", "/root/.bashrc", "/home"]
    lean.write_text(f"#!{os.path.realpath(sys.executable)} -IS\nVISIBLE = {visible!r}\n" + FAKE_LEAN)
    lean.chmod(0o755)
    return MiniF2FTask(lean_project=str(project), lean_command=f"{lean} {{file}}",
                       path=str(shared_data / "minif2f" / "minif2f_lean4.jsonl"), timeout_s=10,
                       **options)


@pytest.fixture
def task(tmp_path, shared_data):
    return _make_task(tmp_path, shared_data)


def test_refuses_to_start_without_a_toolchain(shared_data, tmp_path):
    path = str(shared_data / "minif2f" / "minif2f_lean4.jsonl")
    with pytest.raises(ValueError, match="needs a Lean 4 toolchain.*No lean_project is set"):
        get_task("minif2f", {"path": path})
    with pytest.raises(ValueError, match="not an executable on PATH"):
        MiniF2FTask(lean_project=str(tmp_path), lean_command="no-such-lean {file}", path=path)
    with pytest.raises(ValueError, match="is not a directory"):
        MiniF2FTask(lean_project=str(tmp_path / "missing"), path=path)


def test_splits_and_prompt(task):
    assert (task.train_size, task.heldout_size) == (244, 244)
    p = task.heldout(1)[0]
    assert p.prompt_id.startswith("test/") and "import Mathlib" in p.prompt
    assert p.meta["statement"].endswith(":= by") and p.meta["statement"] in p.prompt


def test_lean_verdict_is_the_reward(task):
    p = task.heldout(1)[0]
    statement = p.meta["statement"]
    tactics = "```lean4\n  norm_num\n```"
    whole = f"```lean4\n{p.meta['header']}{statement}\n  norm_num\n```"
    commented = "```lean4\n" + statement.replace(" :", " /- a comment -/ :", 1) + " -- ok\n  norm_num\n```"
    options = "```lean4\nset_option maxHeartbeats 400000 in\n  norm_num\n```"
    wrong = "```lean4\n  simp\n```"
    rewards = task.score_batch([p] * 5, [tactics, whole, commented, options, wrong])
    assert rewards == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert task.lean_runs == 5


def test_lean_runs_in_the_sandbox_with_only_the_official_statement(task, shared_data):
    p = task.heldout(1)[0]
    source = proof_source(p, "```lean4\nimport Evil\ntheorem helper : True := trivial\n"
                             f"{p.meta['statement']}\n  norm_num\n```")
    assert source == p.meta["header"] + p.meta["statement"] + "\n  norm_num\n"
    result = task.check(source)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads(result.stdout.splitlines()[0])
    inside = "/tmp/box" if task.sandbox.isolation != "none" else os.path.dirname(seen["argv"][1])
    assert seen["argv"] == [task.argv[0], PROOF_FILE.format(workdir=inside)]
    assert seen["source"] == source
    assert seen["cwd"] == str(task.project) and not seen["project_writable"]
    assert not (task.project / "written-by-lean.txt").exists()
    assert seen["visible"] == []  # no checkout, datasets or home
    assert seen["caps"] == "0000000000000000" and seen["nnp"] == "1"
    if task.sandbox.isolation != "none":
        assert seen["net"] == ["lo"]  # own network namespace: loopback only, down
    if task.sandbox._cgroup is not None:
        assert "rapid-box-" in seen["cgroup"]  # whole-program memory / CPU / pids limits
        assert result.memory_peak_bytes is not None


HACKS = {
    "sorry": "  sorry",
    "sorry after a line comment that opens a block": "  norm_num\n-- /-\n  sorry\n-- -/\n  norm_num",
    "sorryAx": "  exact sorryAx _ false",
    "admit": "  admit",
    "axiom": "axiom cheat : False\n  norm_num",
    "run_tac": "  run_tac (pure ())\n  norm_num",
    "run_elab": "  run_elab (pure ())\n  norm_num",
    "run_meta": "  exact (by run_meta pure (); norm_num)\n  norm_num",
    "elab": "elab tac : tactic => pure ()\n  norm_num",
    "macro_rules": "macro_rules | `(tactic| norm_num) => `(tactic| trivial)\n  norm_num",
    "syntax": "syntax tac : tactic\n  norm_num",
    "IO": "  have h := IO.Process.run {cmd := x}\n  norm_num",
    "Lean meta": "  exact Lean.Elab.Tactic.evalTactic x\n  norm_num",
    "open ... in": "open Lean Elab Tactic in\n  norm_num",
    "#eval": "  norm_num\n#eval IO.println 1\n  norm_num",
    "#exit": "  norm_num\n#exit\n  norm_num",
    "unsafe": "  exact unsafeCast 0\n  norm_num",
    "implemented_by": "@[implemented_by x] def y := 1\n  norm_num",
    "extern": "  exact (extern 1)\n  norm_num",
    "native_decide": "  native_decide\n  norm_num",
    "set_option skipKernelTC": "set_option debug.skipKernelTC true in\n  norm_num",
    "string literal": '  simp [show "a" = "a" from rfl]\n  norm_num',
    "quoted name": "  exact «run_tac»\n  norm_num",
    "unterminated comment": "  norm_num\n/- never closed",
    "a second theorem": "  norm_num\ntheorem extra : False := by norm_num",
    "empty": "",
}


def _statement_hacks(p) -> dict:
    statement, name = p.meta["statement"], p.meta["name"]
    claim = statement.removesuffix(":= by").rstrip()
    return {
        "claim or True": f"```lean4\n{claim} ∨ True := by\n  norm_num\n```",
        "claim hidden in a comment": f"```lean4\ntheorem {name} : True -- {claim}\n := by\n  norm_num\n```",
        "statement in a block comment": f"```lean4\n/- {statement} -/\ntheorem {name} : True := by\n  norm_num\n```",
        "an extra hypothesis": "```lean4\n" + statement.replace(" :", " (hF : False) :", 1) + "\n  norm_num\n```",
        "another name": "```lean4\n" + statement.replace(name, name + "_x", 1) + "\n  norm_num\n```",
    }


def test_hacks_are_refused_without_running_lean(task):
    p = task.heldout(1)[0]
    hacks = {**HACKS, **_statement_hacks(p)}
    assert len(hacks) >= 30
    rewards = task.score_batch([p] * len(hacks), list(hacks.values()))
    accepted = [name for name, r in zip(hacks, rewards) if r != 0.0]
    assert accepted == []
    # each is refused by the screen itself (the fake lean would have accepted most)
    assert task.lean_runs == 0
    assert task.score_batch([p], [None]) == [0.0]
    # what comes before the theorem (the model's own header, an axiom) is dropped
    own = f"```lean4\n{p.meta['header']}axiom cheat : False\n{p.meta['statement']}\n  norm_num\n```"
    assert proof_source(p, own) == p.meta["header"] + p.meta["statement"] + "\n  norm_num\n"


def test_native_decide_is_a_task_option(tmp_path, shared_data):
    task = _make_task(tmp_path, shared_data, allow_native_decide=True)
    p = task.heldout(1)[0]
    assert task.reward(p, "  native_decide\n  norm_num") == 1.0 and task.lean_runs == 1
    assert task.reward(p, "  run_tac (pure ())\n  norm_num") == 0.0 and task.lean_runs == 1


def test_comments_are_stripped_before_screening():
    assert strip_comments("a /- b /- c -/ d -/ e -- f\ng") == "a" + " " * 19 + "e" + " " * 5 + "\ng"
    with pytest.raises(Refused, match="unterminated"):
        strip_comments("/- /- -/")
    with pytest.raises(Refused, match="not allowed"):
        build_source("", "theorem t : 1 = 1 := by", "t", "-- /-\n sorry\n-- -/")


def test_timeout_scores_zero(task):
    assert task.reward(task.heldout(1)[0], "  decide\n  norm_num") == 0.0
    assert task.lean_runs == 1


def test_rapid_run_refuses_to_start_without_a_toolchain(shared_data, tmp_path):
    """The launcher builds the task before any child: the message comes first."""
    import subprocess

    args = [sys.executable, "-m", "rapid_async.cli", "run", "--actors", "1",
            "--set", "task.name=minif2f", "--set", f"run.run_dir={tmp_path / 'run'}"]
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAPID_DATA": str(shared_data), "PYTHONPATH": str(REPO)})
    assert out.returncode == 2
    assert "needs a Lean 4 toolchain" in out.stderr and "lean_project" in out.stderr
    assert not (tmp_path / "run" / "learner.log").exists()
