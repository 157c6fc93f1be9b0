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
text): either a whole theorem (then it must state the same theorem) or the
tactics that follow the statement's ":= by". It is written, with the
problem's header and statement, to a new file in `lean_project`/.rapid_tmp/
and checked by `lean_command` ("{file}" is replaced by that file's path; run
in `lean_project`, killed with its process group after `timeout_s`). Reward
1.0 when the command exits 0 and reports no error and no `sorry`, else 0.0.
Proofs containing sorry, admit, new axioms or code that runs at elaboration
time (#eval, run_cmd, unsafe, implemented_by, extern, #exit) score 0 without
running Lean: Lean itself is not run in the Python sandbox.

Used by the actor (rewards), the learner and rapid-eval (held-out problems).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rapid_async.tasks.base import Problem
from rapid_async.tasks.datasets import DatasetTask, data_root, load_records, require_fields

DEFAULT_TEMPLATE = ("Complete the following Lean 4 proof.\n\n```lean4\n{statement}\n```\n\n"
                    "Write the complete theorem with its proof in a ```lean4 code block.")
"""Prompt text; {statement} is the header and the theorem up to ':= by'."""
DEFAULT_COMMAND = "lake env lean {file}"
FORBIDDEN = re.compile(r"\b(sorry|admit|axiom|unsafe|implemented_by|extern|run_cmd)\b|#eval|#exit")
_FENCE = re.compile(r"```[ \t]*(?:lean4|lean)?[ \t]*\n(.*?)```", re.S)
_NO_TOOLCHAIN = ("the minif2f task needs a Lean 4 toolchain with Mathlib, which rapid_async cannot "
                 "install: set [task.options] lean_project to a Lake project with Mathlib built "
                 "(e.g. miniF2F-lean4 after `lake exe cache get && lake build`) and, unless `lake` "
                 "is on PATH, lean_command (default {command!r}). {problem}")


def proof_source(problem: Problem, text: str) -> str | None:
    """The Lean file checking a completion, or None when it is refused outright."""
    blocks = _FENCE.findall(text)
    body = blocks[-1] if blocks else text
    if not body.strip() or FORBIDDEN.search(body):
        return None
    name = problem.meta["name"]
    match = re.search(rf"\btheorem\s+{re.escape(name)}\b", body)
    if match:
        theorem = body[match.start():]
        claim = problem.meta["statement"].removesuffix("by").rstrip().removesuffix(":=")
        if not " ".join(theorem.split()).startswith(" ".join(claim.split())):
            return None  # a different statement proves nothing about this problem
        return problem.meta["header"] + theorem
    return problem.meta["header"] + problem.meta["statement"] + "\n" + body


class MiniF2FTask(DatasetTask):
    """MiniF2F in Lean 4, checked by a configured Lean command.

    Args:
        lean_project: Lake project directory with Mathlib built (required).
        lean_command: command line; "{file}" becomes the proof file's path.
        path: the JSONL file (default $RAPID_DATA/minif2f/minif2f_lean4.jsonl).
        template: prompt text with {statement}.
        seed: order of training problems.
        timeout_s: wall-clock limit of one Lean run.
        max_parallel: Lean runs at once.
    """

    name = "minif2f"

    def __init__(self, lean_project: str = "", lean_command: str = DEFAULT_COMMAND,
                 path: str | None = None, template: str = DEFAULT_TEMPLATE, seed: int = 0,
                 timeout_s: float = 300.0, max_parallel: int = 2):
        super().__init__(seed)
        self.command = shlex.split(lean_command) if isinstance(lean_command, str) else list(lean_command)
        if not lean_project:
            raise ValueError(_NO_TOOLCHAIN.format(command=lean_command, problem="No lean_project is set."))
        if not Path(lean_project).is_dir():
            raise ValueError(_NO_TOOLCHAIN.format(
                command=lean_command, problem=f"lean_project {lean_project!r} is not a directory."))
        if not self.command or shutil.which(self.command[0]) is None:
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
        self._slots = threading.BoundedSemaphore(max_parallel)
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

    def _run_lean(self, source: str) -> bool:
        """Check one Lean file; True when Lean accepts it without errors or sorry."""
        folder = self.project / ".rapid_tmp"
        folder.mkdir(exist_ok=True)
        file = folder / f"Check_{uuid.uuid4().hex}.lean"
        file.write_text(source)
        command = [part.replace("{file}", str(file)) for part in self.command]
        try:
            with self._slots:
                proc = subprocess.Popen(command, cwd=self.project, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    out, _ = proc.communicate(timeout=self.timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate()
                    return False
        except OSError:
            return False
        finally:
            file.unlink(missing_ok=True)
        text = out.decode(errors="replace")
        return proc.returncode == 0 and "error" not in text and "sorry" not in text

    def reward(self, problem: Problem, completion_text: str | None) -> float:
        """1.0 when Lean accepts the completion's proof of the statement, else 0.0."""
        return self.score_batch([problem], [completion_text])[0]

    def score_batch(self, problems: list[Problem], texts: list[str | None]) -> list[float]:
        """Rewards of many completions, up to `max_parallel` Lean runs at once."""
        sources = [proof_source(p, t) if isinstance(t, str) else None for p, t in zip(problems, texts)]
        with ThreadPoolExecutor(max_workers=self.max_parallel) as pool:
            verdicts = list(pool.map(lambda s: s is not None and self._run_lean(s), sources))
        return [1.0 if v else 0.0 for v in verdicts]
