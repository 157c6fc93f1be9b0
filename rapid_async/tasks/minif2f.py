"""MiniF2F (Lean 4): prove competition statements; the reward is Lean's verdict.

Data: `minif2f_lean4.jsonl` (name, split, header, formal_statement; built from
yangky11/miniF2F-lean4, statements for Lean v4.24.0 + Mathlib), from `path`
(default $RAPID_DATA/minif2f/minif2f_lean4.jsonl). Training uses the "valid"
split, the held-out set is "test" (244 each).

A REAL RUN NEEDS A LEAN 4 TOOLCHAIN WITH MATHLIB, which this package cannot
install: set `lean_project` to a Lake project that has Mathlib built (e.g. a
checkout of miniF2F-lean4 after `lake exe cache get && lake build`) and, if
`lake` is not on PATH, `lean_command`. Without them the task refuses to start
with a message saying so.

Verifier: the proof is the completion's last ```lean block (or the whole
text): either the tactics that follow the statement's ":= by" or a whole
theorem whose statement equals the official one token for token. The file
Lean checks is built from the problem's header and official statement plus
that proof only, after the screen of `lean_screen` (comments stripped first,
then no sorry/axiom, no meta-programming or IO - run_tac, elab, macro,
syntax, #eval, Lean.*, IO.*, unsafe, extern, ... - no new commands, and
native_decide only with `allow_native_decide`); refused proofs score 0
without running Lean. Lean runs inside the program sandbox (sandbox.py): no
network, a minimal read-only root holding only the Lean toolchain, the Lake
project and the interpreter, a private /tmp holding the proof file
(/tmp/box/Check.lean), whole-program memory / CPU / process limits (cgroup),
all capabilities dropped; killed after `timeout_s`. `lean_command` ("{file}"
is replaced by the proof file's path) runs with `lean_project` as its
working directory, which it cannot write: the project must be built
beforehand. Reward 1.0 when the command exits 0 and reports no error and no
`sorry`, else 0.0.

Used by the actor (rewards), the learner and rapid-eval (held-out problems).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rapid_async.tasks.base import Problem
from rapid_async.tasks.datasets import DatasetTask, data_root, load_records, require_fields
from rapid_async.tasks.lean_screen import Refused, build_source
from rapid_async.tasks.sandbox import Limits, RunResult, Sandbox

log = logging.getLogger("rapid.minif2f")

DEFAULT_TEMPLATE = ("Complete the following Lean 4 proof.\n\n```lean4\n{statement}\n```\n\n"
                    "Write the complete theorem with its proof in a ```lean4 code block.")
"""Prompt text; {statement} is the header and the theorem up to ':= by'."""
DEFAULT_COMMAND = "lake env lean {file}"
PROOF_FILE = "{workdir}/Check.lean"
"""The proof file in the sandbox (/tmp/box/Check.lean there; the sandbox fills in {workdir})."""
_NO_TOOLCHAIN = ("the minif2f task needs a Lean 4 toolchain with Mathlib, which rapid_async cannot "
                 "install: set [task.options] lean_project to a Lake project with Mathlib built "
                 "(e.g. miniF2F-lean4 after `lake exe cache get && lake build`) and, unless `lake` "
                 "is on PATH, lean_command (default {command!r}). {problem}")


def proof_source(problem: Problem, text: str, allow_native_decide: bool = False) -> str | None:
    """The Lean file checking a completion, or None when it is refused outright."""
    try:
        return build_source(problem.meta["header"], problem.meta["statement"], problem.meta["name"],
                            text, allow_native_decide)
    except Refused:
        return None


def _toolchain_paths(executable: str) -> list[str]:
    """Host paths the Lean command needs to see: its toolchain and elan's home."""
    real = os.path.realpath(executable)
    paths = [os.path.dirname(os.path.dirname(real))]
    elan = os.environ.get("ELAN_HOME") or os.path.expanduser("~/.elan")
    if os.path.isdir(elan):
        paths.append(elan)
    return paths


class MiniF2FTask(DatasetTask):
    """MiniF2F in Lean 4, checked by a configured Lean command in the sandbox.

    Args:
        lean_project: Lake project directory with Mathlib built (required).
        lean_command: command line; "{file}" becomes the proof file's path.
        path: the JSONL file (default $RAPID_DATA/minif2f/minif2f_lean4.jsonl).
        template: prompt text with {statement}.
        seed: order of training problems.
        timeout_s: wall-clock limit of one Lean run.
        max_parallel: Lean runs at once.
        memory_mb: memory of one Lean run, all its processes (cgroup).
        cpus: CPU cores of one Lean run (cgroup quota).
        allow_native_decide: accept proofs using native_decide (trusts Lean's
            compiler; off by default).
        sandbox_paths: more host paths Lean must see (read-only), beyond the
            project, the command's toolchain and elan's home.
        isolation: sandbox mode ("auto", "namespaces", "userns", "none").
    """

    name = "minif2f"

    def __init__(self, lean_project: str = "", lean_command: str = DEFAULT_COMMAND,
                 path: str | None = None, template: str = DEFAULT_TEMPLATE, seed: int = 0,
                 timeout_s: float = 300.0, max_parallel: int = 2, memory_mb: int = 8192,
                 cpus: float = 1.0, allow_native_decide: bool = False,
                 sandbox_paths: list[str] | tuple[str, ...] = (), isolation: str = "auto"):
        super().__init__(seed)
        self.command = shlex.split(lean_command) if isinstance(lean_command, str) else list(lean_command)
        if not lean_project:
            raise ValueError(_NO_TOOLCHAIN.format(command=lean_command, problem="No lean_project is set."))
        if not Path(lean_project).is_dir():
            raise ValueError(_NO_TOOLCHAIN.format(
                command=lean_command, problem=f"lean_project {lean_project!r} is not a directory."))
        executable = shutil.which(self.command[0]) if self.command else None
        if executable is None:
            raise ValueError(_NO_TOOLCHAIN.format(
                command=lean_command, problem=f"{self.command[:1]} is not an executable on PATH."))
        if "{file}" not in " ".join(self.command):
            raise ValueError(f"lean_command must contain {{file}}, got {lean_command!r}")
        if "{statement}" not in template:
            raise ValueError("template must contain the field {statement}")
        if not timeout_s > 0 or not (isinstance(max_parallel, int) and max_parallel >= 1):
            raise ValueError(f"timeout_s must be > 0 and max_parallel >= 1, got {timeout_s}, {max_parallel}")
        self.project, self.template = Path(lean_project).resolve(), template
        self.timeout_s, self.max_parallel = float(timeout_s), max_parallel
        self.allow_native_decide = bool(allow_native_decide)
        self.argv = [os.path.abspath(executable)] + [p.replace("{file}", PROOF_FILE)
                                                     for p in self.command[1:]]
        self.lean_runs = 0
        paths = [str(self.project), *_toolchain_paths(executable), *sandbox_paths]
        self.sandbox = Sandbox(
            Limits(wall_s=self.timeout_s, cpu_s=max(1, int(self.timeout_s * max(cpus, 1) + 1)),
                   memory_mb=1 << 30, total_memory_mb=memory_mb, cpus=cpus, processes=256,
                   open_files=4096, file_mb=256, tmpfs_mb=512, output_bytes=1 << 20),
            max_parallel=max_parallel, isolation=isolation, extra_paths=tuple(paths))
        self.env = {"PATH": f"{os.path.dirname(self.argv[0])}:/usr/bin:/bin"}
        elan = os.environ.get("ELAN_HOME") or os.path.expanduser("~/.elan")
        if os.path.isdir(elan):
            self.env["ELAN_HOME"] = elan
        default = data_root() / "minif2f" / "minif2f_lean4.jsonl"
        records = load_records(path, default)
        require_fields(records, ("name", "split", "header", "formal_statement"), str(path or default))
        problems = {s: [self._problem(r) for r in records if r["split"] == s] for s in ("valid", "test")}
        self._set_problems(problems["valid"], problems["test"])

    def _problem(self, r: dict) -> Problem:
        statement = r["formal_statement"].rstrip()
        prompt = self.template.replace("{statement}", r["header"] + statement)
        return Problem(f"{r['split']}/{r['name']}", prompt, "",
                       {"name": r["name"], "header": r["header"], "statement": statement})

    def check(self, source: str) -> RunResult:
        """Run the Lean command on one file in the sandbox (its whole result)."""
        self.lean_runs += 1
        return self.sandbox.run_command(self.argv, files={"Check.lean": source}, env=self.env,
                                        cwd=str(self.project))

    def _run_lean(self, source: str) -> bool:
        """Check one Lean file; True when Lean accepts it without errors or sorry."""
        try:
            result = self.check(source)
        except OSError as e:
            log.warning("minif2f: the Lean sandbox failed: %s", e)
            return False
        text = result.stdout + result.stderr
        return result.returncode == 0 and "error" not in text and "sorry" not in text

    def reward(self, problem: Problem, completion_text: str | None) -> float:
        """1.0 when Lean accepts the completion's proof of the statement, else 0.0."""
        return self.score_batch([problem], [completion_text])[0]

    def score_batch(self, problems: list[Problem], texts: list[str | None]) -> list[float]:
        """Rewards of many completions, up to `max_parallel` Lean runs at once."""
        sources = [proof_source(p, t, self.allow_native_decide) if isinstance(t, str) else None
                   for p, t in zip(problems, texts)]
        with ThreadPoolExecutor(max_workers=self.max_parallel) as pool:
            verdicts = list(pool.map(lambda s: s is not None and self._run_lean(s), sources))
        return [1.0 if v else 0.0 for v in verdicts]
