"""Task plug-ins: built-in names, entry points, "module:Class" paths, options."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from rapid_async.config import load_config
from rapid_async.tasks.arithmetic import ArithmeticTask
from rapid_async.tasks.base import get_task, known_tasks, task_from_config

PLUGIN = textwrap.dedent('''
    from rapid_async.tasks.base import Problem

    class EchoTask:
        """Reward -1 unless the completion repeats the word."""
        name = "echo"

        def __init__(self, word="hello", penalty=-1.0):
            if not isinstance(word, str) or not word:
                raise ValueError(f"word must be a non-empty string, got {word!r}")
            self.word, self.penalty = word, penalty

        def train_problem(self, index):
            return Problem(str(index), f"say {self.word}", self.word)

        def heldout(self, n):
            return [self.train_problem(10**6 + i) for i in range(n)]

        def reward(self, problem, text):
            return 1.0 if text == problem.answer else self.penalty
''')


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A module `echo_plugin` and an installed-looking distribution declaring it
    as the entry point `echo` of the group rapid_async.tasks."""
    (tmp_path / "echo_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "echo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rapid_async.tasks]\necho = echo_plugin:EchoTask\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("echo_plugin", None)
    from rapid_async.tasks import base
    base._FACTORIES.pop("echo", None)
    base._FACTORIES.pop("echo_plugin:EchoTask", None)


def test_builtin_tasks_are_known():
    assert {"arithmetic", "gsm8k", "math", "mbpp", "minif2f"} <= set(known_tasks())


def test_arithmetic_options_from_the_options_table_and_the_older_flat_form(tmp_path):
    new = tmp_path / "new.toml"
    new.write_text('[task]\nname = "arithmetic"\n[task.options]\ndigits = 3\nops = "*"\nseed = 5\n')
    old = tmp_path / "old.toml"
    old.write_text('[task]\ndigits = 3\nops = "*"\nseed = 5\n')
    for path in (new, old):
        task = task_from_config(load_config(path))
        assert isinstance(task, ArithmeticTask)
        assert task.options()["digits"] == 3 and task.ops == "*" and task.seed == 5
    cfg = load_config(overrides=["task.options.digits=1", "task.ops=+"])
    assert cfg.task.options == {"digits": 1, "ops": "+"}
    assert task_from_config(cfg).digits == 1


def test_bad_options_are_rejected_by_the_task_with_its_name():
    with pytest.raises(ValueError, match="task 'arithmetic': .*digits"):
        get_task("arithmetic", {"digits": 0})
    with pytest.raises(ValueError, match="task 'arithmetic': bad options \\['colour'\\]"):
        get_task("arithmetic", {"colour": "red"})
    with pytest.raises(ValueError, match="unknown task 'nope'.*known tasks: .*gsm8k"):
        get_task("nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        get_task("no_such_module:Task")
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        get_task("rapid_async.tasks.arithmetic:Missing")


def test_module_path_and_entry_point_plugins(plugin_dir):
    by_path = get_task("echo_plugin:EchoTask", {"word": "hi"})
    assert by_path.reward(by_path.train_problem(0), "hi") == 1.0
    assert by_path.reward(by_path.train_problem(0), "no") == -1.0
    assert "echo" in known_tasks()
    by_entry_point = get_task("echo", {"penalty": -2.0})
    assert by_entry_point.reward(by_entry_point.train_problem(1), "x") == -2.0
    with pytest.raises(ValueError, match="task 'echo': word must be a non-empty string"):
        get_task("echo", {"word": ""})


def test_plugins_reach_a_child_process(plugin_dir):
    """A child started the way rapid-run starts learners and actors (python -m,
    in the same directory) finds both plug-in forms from the config alone."""
    config = plugin_dir / "run.toml"
    config.write_text('[task]\nname = "echo"\n[task.options]\nword = "yo"\n')
    code = ("import sys; from rapid_async.config import load_config;"
            "from rapid_async.tasks.base import task_from_config;"
            "t = task_from_config(load_config(sys.argv[1], sys.argv[2:]));"
            "print(type(t).__name__, t.word)")
    for extra in ([], ["--set", "task.name=echo_plugin:EchoTask"]):
        overrides = [e for e in extra if e != "--set"]
        out = subprocess.run([sys.executable, "-c", code, str(config), *overrides],
                             cwd=plugin_dir, capture_output=True, text=True, timeout=120,
                             env={"PYTHONPATH": f"{plugin_dir}:{REPO}", "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["EchoTask", "yo"]


def test_a_module_path_task_trains_through_rapid_run(plugin_dir, random_model_dir):
    """rapid-run's learner and actor both build the plug-in from the config:
    its reward (-1: the tiny model cannot write letters) reaches the learner."""
    from rapid_async.metrics import read_metrics

    run_dir = plugin_dir / "run"
    sets = [f"model.path={random_model_dir}", "task.name=echo_plugin:EchoTask",
            f"run.run_dir={run_dir}", "run.max_steps=2", "run.eval_every=0", "run.eval_size=2",
            "algo.group_size=2", "algo.max_new_tokens=4", "learner.batch_groups=2",
            "learner.minibatch_groups=2", "learner.buffer_groups=4", "actor.chunk_groups=2"]
    args = [sys.executable, "-m", "rapid_async.cli", "run", "--actors", "1"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, cwd=plugin_dir, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                              "OMP_NUM_THREADS": "1", "HOME": str(plugin_dir)})
    logs = out.stdout + out.stderr + "".join(p.read_text() for p in run_dir.glob("*.log"))
    assert out.returncode == 0, logs[-3000:]
    steps = [r for r in read_metrics(run_dir) if r.get("role") == "learner" and "loss/policy" in r]
    assert len(steps) == 2 and all(r["reward/mean"] == -1.0 for r in steps)
