"""One node, one command (`rapid-run`): a learner and N actors as child processes.

The launcher builds (or finds in the cache) the model, starts the learner,
waits for it to write RUN_DIR/learner.json with its control endpoint, then
starts the actors. Each child gets its devices: on a GPU node the learner gets
the first `learner.devices` GPUs (one torchrun rank each, FSDP2) and each actor
one of the others (CUDA_VISIBLE_DEVICES; `learner.gpus` / `actor.gpus`
override); on CPU the learner's ranks get the first cores and the actors the
others (CPU affinity, one torch thread each; `rapid_async.placement`).

While the run goes on, the launcher shows the learner's progress from its
metrics (`rapid_async.progress`: a rich bar on a terminal, a line every few
seconds in a log). On Ctrl-C or SIGTERM it stops gracefully: SIGTERM to the
learner, which stops the actors, writes a checkpoint and its end record; then
rapid-run exits 0 (a second Ctrl-C stops every child at once). With several
learner ranks the SIGTERM goes to rank 0 (its pid is in RUN_DIR/learner.json),
which stops the other ranks itself; torchrun then exits 0. The launcher waits
for the learner's graceful stop up to `learner.signals.stop_grace_s` of the
config (the final evaluation's timeout, the actor timeout and a margin for a
step and the checkpoint), not a fixed few seconds. When an actor fails (a
SIGKILL, a crash) it stops the run the same graceful way (the learner's end
record says which evaluations went missing) and exits 1; when the learner
fails it stops every child at once. At the end it stops every child it
started, by pid. Child output goes to RUN_DIR/learner.log and
RUN_DIR/actor-N.log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rapid_async.config import Config
from rapid_async.placement import (_gpu_count, _gpu_plan, apply_affinity_from_env,  # noqa: F401
                                   device_plan, placement_record)
from rapid_async.run_files import (_actor_busy, _last_learner_record, _learner_id,  # noqa: F401
                                   _print_summary, local_actor_keys)


class Launcher:
    """Starts, watches and stops the learner and actor children."""

    def __init__(self, config_path: str | None, overrides: list[str], cfg: Config,
                 n_actors: int, resume: bool):
        self.config_path = config_path
        self.overrides = overrides
        self.cfg = cfg
        self.n_actors = n_actors
        self.resume = resume
        self.run_dir = Path(cfg.run.run_dir)
        self.children: dict[str, subprocess.Popen] = {}
        self._logs: list[Any] = []
        self.signals = 0  # SIGINT / SIGTERM received (counted by `on_signal`)

    def on_signal(self, signum: int, frame: Any) -> None:
        """SIGINT / SIGTERM: only counted here; the loops look at the count
        (raising inside subprocess or rich code could leave a lock held)."""
        self.signals += 1

    def _check_signals(self) -> None:
        if self.signals:
            raise Interrupted()

    def _spawn(self, name: str, args: list[str], env_extra: dict[str, str]) -> None:
        env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
        log = open(self.run_dir / f"{name}.log", "ab")
        self._logs.append(log)
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", "rapid_async.cli", *args], env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _config_args(self) -> list[str]:
        args = ["--config", self.config_path] if self.config_path else []
        for o in self.overrides:
            args += ["--set", o]
        return args

    def start(self, model_dir: str) -> str:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lc = self.cfg.learner
        plan = device_plan(self.n_actors, lc.devices, lc.gpus, self.cfg.actor.gpus)
        (self.run_dir / "placement.json").write_text(json.dumps(placement_record(plan)))
        learner_curve, actor_curve = local_actor_keys(self.cfg, self.run_dir)
        args = ["learner", *self._config_args(), *learner_curve, "--model-dir", model_dir]
        if self.resume:
            args.append("--resume")
        previous = _learner_id(self.run_dir)
        self._spawn("learner", args, plan[0])
        endpoint = self._wait_for_endpoint(previous)
        for i in range(self.n_actors):
            self._spawn(f"actor-{i}", ["actor", "--learner", endpoint, "--actor-id",
                                       f"actor-{i}", *actor_curve], plan[i + 1])
        (self.run_dir / "children.json").write_text(json.dumps(
            {name: proc.pid for name, proc in self.children.items()}))
        return endpoint

    def _wait_for_endpoint(self, previous: str | None, timeout_s: float = 300.0) -> str:
        """The control endpoint from RUN_DIR/learner.json once the new learner
        wrote it (its learner_id differs from `previous`; the file is kept, for
        a resumed learner reads the ports of the previous one from it)."""
        endpoint_file = self.run_dir / "learner.json"
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_signals()
            self._check_children()
            try:
                info = json.loads(endpoint_file.read_text())
            except (OSError, ValueError):
                info = {}
            if info.get("control") and info.get("learner_id") != previous:
                return info["control"]
            if time.monotonic() > deadline:
                raise RuntimeError(f"the learner wrote no {endpoint_file} in {timeout_s:.0f} s; "
                                   f"see {self.run_dir / 'learner.log'}")
            time.sleep(0.2)

    def _check_children(self) -> None:
        for name, proc in self.children.items():
            rc = proc.poll()
            if rc is not None and rc != 0:
                raise ChildFailed(f"{name} (pid {proc.pid}) exited with code {rc}; "
                                  f"see {self.run_dir / (name + '.log')}", name)

    def watch(self, progress_every: float = 5.0) -> None:
        """Show progress until the learner exits; raise ChildFailed on a failure."""
        from rapid_async.progress import ProgressDisplay, run_status

        run = self.cfg.run
        by_time = run.max_seconds > 0 and run.max_steps >= 100_000
        total = run.max_seconds if by_time else run.max_steps
        learner = self.children["learner"]
        with ProgressDisplay("[rapid-run]", total=total, every_s=progress_every) as display:
            while learner.poll() is None:
                self._check_signals()
                self._check_children()
                rec = _last_learner_record(self.run_dir)
                if rec:
                    done = rec.get("train_s" if by_time else "step")
                    display.update(completed=round(done) if isinstance(done, (int, float)) else None,
                                   status=run_status(rec, _actor_busy(self.run_dir)))
                time.sleep(0.5)
        self._check_children()
        deadline = time.monotonic() + 60
        for name, proc in self.children.items():
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        self._check_children()

    def stop_gracefully(self, learner_grace_s: float | None = None,
                        actor_grace_s: float = 60.0) -> int:
        """SIGTERM to the learner (rank 0 of several), which stops the actors,
        checkpoints and writes its end record; wait for it (at most
        `learner_grace_s`, default `stop_grace_s` of the config), then for the
        actors. Returns the exit code for rapid-run: 0 when the learner
        stopped cleanly. A second Ctrl-C / SIGTERM meanwhile interrupts the
        wait (then `stop_all`)."""
        from rapid_async.learner.signals import stop_grace_s

        if learner_grace_s is None:
            learner_grace_s = stop_grace_s(self.cfg)
        learner = self.children.get("learner")
        if learner is None:
            return 0
        if learner.poll() is None:
            os.kill(self._learner_leader(learner), signal.SIGTERM)  # by pid
        seen = self.signals
        deadline = time.monotonic() + learner_grace_s
        while learner.poll() is None:
            if self.signals > seen:
                raise Interrupted()  # the second one: stop at once
            if time.monotonic() > deadline:
                print(f"[rapid-run] the learner did not stop in {learner_grace_s:.0f} s",
                      flush=True)
                return 1
            time.sleep(0.2)
        deadline = time.monotonic() + actor_grace_s
        for name, proc in self.children.items():
            while proc.poll() is None and time.monotonic() < deadline and self.signals == seen:
                time.sleep(0.2)
        # Killed by this SIGTERM before it could install its handler (still
        # loading): nothing was trained, nothing lost.
        return 0 if learner.returncode in (0, -signal.SIGTERM) else 1

    def _learner_leader(self, learner: subprocess.Popen) -> int:
        """The pid to signal for a graceful stop: the learner child, or with
        several ranks its rank 0 (torchrun's child, named in learner.json):
        torchrun would SIGKILL the ranks after its shutdown timeout and exit 1
        even when they stop cleanly."""
        if self.cfg.learner.devices <= 1:
            return learner.pid
        try:
            pid = int(json.loads((self.run_dir / "learner.json").read_text())["pid"])
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return learner.pid
        return pid if parent == learner.pid else learner.pid  # only our own grandchild

    def stop_all(self, grace_s: float = 10.0) -> None:
        """Stop every child this launcher started, by pid (TERM, then KILL)."""
        for proc in self.children.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for proc in self.children.values():
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        for log in self._logs:
            log.close()


class Interrupted(Exception):
    """rapid-run got SIGINT or SIGTERM (raised by the loops, not the handler)."""


class ChildFailed(RuntimeError):
    """A learner or actor child exited with a non-zero code (`name`: which)."""

    def __init__(self, message: str, name: str = "learner"):
        super().__init__(message)
        self.name = name


def check_task(cfg: Config) -> None:
    """Build the run's task once here, so that bad task options or a missing
    toolchain (minif2f without Lean) stop rapid-run with the task's own message
    before any child starts (raises ValueError)."""
    from rapid_async.tasks.base import task_from_config

    task = task_from_config(cfg)
    close = getattr(task, "close", None)
    if close is not None:
        close()


def run_node(config_path: str | None, overrides: list[str], n_actors: int | None,
             resume: bool = False, learner_devices: int | None = None) -> int:
    """`rapid-run`: the whole node. Returns the process exit code."""
    from rapid_async.config import load_config
    from rapid_async.learner.startup import resolve_model_dir

    if learner_devices is not None:
        overrides = [*overrides, f"learner.devices={learner_devices}"]
    cfg = load_config(config_path, overrides)
    check_task(cfg)
    if n_actors is None:
        gpus = _gpu_count()
        free = gpus if gpus else len(os.sched_getaffinity(0))
        n_actors = max(1, free - cfg.learner.devices)
    model_dir = resolve_model_dir(cfg)
    launcher = Launcher(config_path, overrides, cfg, n_actors, resume)
    previous = {sig: signal.signal(sig, launcher.on_signal)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        try:
            endpoint = launcher.start(model_dir)
            print(f"[rapid-run] learner at {endpoint}, {n_actors} actor(s), mode {cfg.run.mode}, "
                  f"run dir {launcher.run_dir}", flush=True)
            launcher.watch()
        except Interrupted:
            print("[rapid-run] interrupted: the learner checkpoints and stops the actors "
                  "(interrupt again to stop at once)", flush=True)
            code = launcher.stop_gracefully()
    except Interrupted:
        print("[rapid-run] interrupted again: stopping every child now", flush=True)
        code = 130
    except ChildFailed as exc:
        print(f"[rapid-run] {exc}", file=sys.stderr, flush=True)
        code = 1
        if exc.name != "learner":  # the learner checkpoints and records the end
            code = _stop_after_actor_failure(launcher)
    finally:
        launcher.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _print_summary(launcher.run_dir)
    return code


def _stop_after_actor_failure(launcher: Launcher) -> int:
    """An actor failed: stop the learner gracefully (it notices the dead
    actor, gives up its evaluation and writes its end record); exit code 1
    (a child failed), 130 on a second interrupt."""
    print("[rapid-run] stopping the learner gracefully (checkpoint, end record)", flush=True)
    try:
        clean = launcher.stop_gracefully() == 0
    except Interrupted:
        print("[rapid-run] interrupted: stopping every child now", flush=True)
        return 130
    print(f"[rapid-run] the learner {'stopped cleanly' if clean else 'did not stop cleanly'}",
          flush=True)
    return 1


