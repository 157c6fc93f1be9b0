"""The actor's loop (`rapid-actor`): weights in, rollouts out.

The loop, as in DESIGN.md section 3:

    hello -> welcome (run settings, endpoints)      control DEALER
    start the heartbeat thread                      its own DEALER (heartbeat.py)
    snapshot -> the engine's weight buffer          (checksum verified)
    repeat:
        apply every queued delta, in order;         weights SUB (+ DeltaRequest
        the engine loads once                       for missed ones)
        ask for work: prompt indices, min version   control DEALER
        if an EvalTask came with the grant:         (actor/evaluator.py)
            evaluate the held-out set, send EvalResult
        wait until our weights are >= min version
        generate K completions per prompt, score    engine + task verifier
        send one RolloutGroup per prompt            rollouts PUSH (blocks when
                                                    the learner is full)
    until the learner says Stop

If the learner stops answering (a request times out, or a send stays blocked
and a ping gets no answer) or answers Rejoin (it restarted and does not know
this actor), the actor says Hello again, to the endpoint in RUN_DIR/learner.json
when it can read it, drops what it generated for the old learner, and takes a
snapshot: its weights may be ahead of or behind the restored version
(`actor/rejoin.py`).

The actor never generates with weights it cannot vouch for: every update is
checked and verified before it is written into the engine's weights
(`rapid_async.weights.receiver`); deltas it missed because its queue was
full are fetched from the learner's chain of recent deltas, and an update
that cannot be applied (not kept any more, malformed, checksum failure) makes
it ask for a snapshot before it generates again (`actor/intake.py`).

A dedicated evaluator (`evaluator=True`) asks for zero groups: it only
evaluates, and while one is connected the generating actors do not.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from rapid_async.actor.intake import WeightIntake
from rapid_async.actor.rejoin import Rejoining, hello_with_backoff
from rapid_async.engines import make_engine

__all__ = ["Actor", "make_engine"]

log = logging.getLogger("rapid.actor")


class _Abandoned(Exception):
    """Raised by the in-flight step hook when the actor rejoined mid-generation."""


class Actor(WeightIntake, Rejoining):
    """One actor: sockets, engine, task and the weights it holds.

    Args:
        control_endpoint: the learner's control endpoint, tcp://HOST:PORT.
        actor_id: unique name of this actor.
        engine: override of the config's actor.engine (None: use the config).
        evaluator: only evaluate (ask for no generation work).
        curve_keys: this actor's CURVE key pair (with `server_key`, the
            learner's public key): needed when the learner uses CURVE.
        refused_patience_s: how long to keep asking a learner that refuses
            the Hello (it is full), with backoff, before giving up.
    """

    def __init__(self, control_endpoint: str, actor_id: str | None = None,
                 engine: str | None = None, hello_timeout_s: float = 60.0,
                 evaluator: bool = False, curve_keys: Any = None,
                 server_key: bytes | None = None, refused_patience_s: float = 600.0):
        from rapid_async.actor.heartbeat import Heartbeat
        from rapid_async.config import config_from_dict
        from rapid_async.wire.transport import ActorSockets

        self.actor_id = actor_id or f"{socket.gethostname()}-{os.getpid()}"
        self.control_endpoint = control_endpoint
        self._curve = {"curve_keys": curve_keys, "server_key": server_key}
        self.sockets = ActorSockets(control_endpoint, self.actor_id, **self._curve)
        # A learner that is full refuses us: ask again with backoff (rejoin.py).
        welcome = hello_with_backoff(self.sockets, self.actor_id, engine or "config",
                                     timeout_ms=int(hello_timeout_s * 1000),
                                     patience_s=refused_patience_s)
        self.learner_id = welcome.settings.get("learner_id")
        self._grant_learner = self.learner_id
        self._grant_epoch = 0
        self._welcome_config = welcome.settings["config"]
        self.cfg = config_from_dict(self._welcome_config)
        self.engine_override = engine
        self.engine_name = engine or self.cfg.actor.engine
        self.model_dir = welcome.settings["model_dir"]
        self.run_dir = welcome.settings["run_dir"]
        self.receiver: Any = None
        self.session = welcome.session
        # From here on the learner hears from us while we load and generate.
        self.heartbeat = Heartbeat(self, self.cfg.actor.heartbeat_s)
        self.heartbeat.start()
        self.stopped: str | None = None
        self.evaluator = evaluator
        self.eval_tasks: list[Any] = []  # EvalTasks received, not yet done
        self.stats: dict[str, float] = {"busy_s": 0.0, "idle_s": 0.0, "tokens": 0,
                                        "groups": 0, "snapshots": 0, "deltas": 0, "gen_s": 0.0,
                                        "update_s": 0.0, "update_bytes": 0, "chunks": 0,
                                        "send_wait_s": 0.0, "chain_fetches": 0,
                                        "rejected_updates": 0, "truncated": 0,
                                        "verifier_failures": 0, "eval_s": 0.0, "evals": 0,
                                        "rejoins": 0, "dropped_on_rejoin": 0, "bad_control": 0,
                                        "reconfigured": 0, "inflight_updates": 0,
                                        "mixed_groups": 0}

    @property
    def version(self) -> int | None:
        """Version of the verified weights the engine holds (None: none yet)."""
        return None if self.receiver is None else self.receiver.version

    def setup(self) -> None:
        """Load tokenizer, task and engine, then the learner's current weights."""
        self._load_engine()
        self._load_task()
        self._snapshot("join")

    def _load_engine(self) -> None:
        """Tokenizer, engine and weight receiver of `model_dir` (no weights yet)."""
        from transformers import AutoTokenizer

        from rapid_async.config import resolve_device
        from rapid_async.weights import WeightReceiver

        cfg = self.cfg
        self.engine_name = self.engine_override or cfg.actor.engine
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.engine = make_engine(self.engine_name, self.model_dir, cfg.model.inference_dtype,
                                  resolve_device(cfg.actor.device),
                                  cfg.run.seed + (os.getpid() % 10007))
        self.receiver = WeightReceiver(self.engine)
        if cfg.actor.inflight and not getattr(self.engine, "supports_step_hook", False):
            log.warning("actor.inflight: the %s engine cannot take weights between decode "
                        "steps; it takes them between %d sub-chunks of each chunk "
                        "(actor.inflight_subchunks)", self.engine_name,
                        cfg.actor.inflight_subchunks)

    def _load_task(self) -> None:
        """Task, prompt settings and scorer of the current config."""
        from rapid_async.tasks.base import task_from_config
        from rapid_async.tasks.prompts import PromptSettings, check_chat_template
        from rapid_async.tasks.scoring import Scorer

        self.task = task_from_config(self.cfg)
        self.prompt_settings = PromptSettings.from_config(self.cfg, self.task)
        if self.prompt_settings.prompt_format == "chat":
            check_chat_template(self.tokenizer, self.model_dir)
        self.scorer = Scorer(self.task, self.cfg.task.failure_reward)
        if getattr(self, "runner", None) is not None:
            self.runner.close()  # a rejoin rebuilds the task: the old episodes' runner goes
        self.runner = self._episode_runner()

    def _episode_runner(self) -> Any:
        """The EpisodeRunner of a run with an [env] (None: one completion per prompt)."""
        from rapid_async.evaluate import episode_runner

        return episode_runner(self.cfg, self.engine, self.tokenizer, self.task,
                              self.prompt_settings)

    # -- the loop
    def run(self) -> str:
        """Generate until the learner says stop; return its reason."""
        from rapid_async.metrics import MetricsWriter
        from rapid_async.metrics_backends import open_backends

        metrics = MetricsWriter(self.run_dir, "actor", backends=open_backends(
            self.cfg, self.run_dir, self.actor_id, "actor"))
        last_stats = time.monotonic()
        t_start = time.monotonic()
        try:
            while self.stopped is None:
                t0 = time.perf_counter()
                self.poll_weights()
                if self._check_stop():
                    break
                grant = self._request_work(0 if self.evaluator else self.cfg.actor.chunk_groups)
                if grant is None:
                    continue  # the learner had to be found again
                if self._check_stop():
                    break
                if self.eval_tasks:
                    self._evaluate(self.eval_tasks.pop(0))
                    self.stats["busy_s"] += time.perf_counter() - t0
                elif not grant.prompt_indices:
                    self.poll_weights(timeout_ms=200 if self.evaluator else 20)
                    self.stats["idle_s"] += time.perf_counter() - t0
                elif self._wait_version(grant.min_version):
                    self._generate_and_send(grant.prompt_indices, grant.grant_id)
                    self.stats["busy_s"] += time.perf_counter() - t0
                if time.monotonic() - last_stats > 2.0:
                    self._report(metrics, time.monotonic() - t_start)
                    last_stats = time.monotonic()
            self.poll_weights()  # a last delta sent just before Stop
            self._report(metrics, time.monotonic() - t_start, final=True)
        finally:
            metrics.close()
            self.close()
        return self.stopped or "stopped"

    def _send(self, group: Any) -> bool:
        """Send one group, waiting while the learner's queue is full (keeping
        weights fresh, noticing a stop). False if the learner stopped, or went
        away and was found again: the group was for the old one, drop it."""
        t_send = time.perf_counter()
        last_ping = t_send
        while not self.sockets.send_rollout(group, timeout_ms=500):
            # The learner's queue is full: backpressure. Keep weights fresh
            # and notice a stop while we wait; never drop the group.
            self.poll_weights()
            if self._check_stop():
                return False
            if time.perf_counter() - last_ping > self.cfg.actor.learner_timeout_s:
                if not self._same_learner():
                    return False
                last_ping = time.perf_counter()
        self.stats["send_wait_s"] += time.perf_counter() - t_send
        return True

    def _generate_and_send(self, indices: list[int], grant_id: int = 0) -> None:
        """Generate a granted chunk and send it. Each group records the
        verified checksum of the weights it came from (the learner checks it
        against what it served for that version)."""
        from rapid_async.actor.rollout import generate_groups

        learner = self._grant_learner
        checksums = {self.version: self.receiver.checksum}
        if not self._grant_valid(learner):  # granted by a learner (connection) since gone
            self.stats["dropped_on_rejoin"] += len(indices)
            return
        try:
            groups = generate_groups(self.engine, self.tokenizer, self.task, self.cfg, indices,
                                     self.version, self.actor_id, scorer=self.scorer,
                                     prompt_settings=self.prompt_settings,
                                     grant_id=grant_id, runner=self.runner,
                                     step_hook=self._step_hook(checksums)
                                     if self.cfg.actor.inflight else None)
        except _Abandoned:  # rejoined mid-generation: the work is the old learner's
            self.stats["dropped_on_rejoin"] += len(indices)
            return
        self.stats["gen_s"] += sum(group.gen_seconds for group in groups)
        self.stats["chunks"] += 1
        self.stats["verifier_failures"] = sum(self.scorer.failures.values())
        if self.runner is not None:
            for key in ("idle_s", "gen_s", "step_s", "engine_calls", "step_failures", "turns"):
                self.stats[f"env_{key}"] = self.runner.stats[key]
            self.stats["env_tokens"] = self.runner.stats["env_tokens"]
        for group in groups:
            self.stats["mixed_groups"] += group.version_runs is not None
            if checksums.get(group.policy_version) is not None:
                group.info["weights_checksum"] = checksums[group.policy_version]
        for i, group in enumerate(groups):
            self.stats["tokens"] += int(group.completion_lengths.sum())
            self.stats["truncated"] += int(group.info.get("truncated", 0))
            if not self._grant_valid(learner) or not self._send(group):
                if self.stopped is None:
                    self.stats["dropped_on_rejoin"] += len(groups) - i
                return
            self.stats["groups"] += 1

    def _step_hook(self, checksums: dict) -> Any:
        """The engine's between-steps call for in-flight updates: apply every
        queued update, note the checksum of each new version, return it."""
        epoch = self.stats["rejoins"]

        def hook() -> int:
            before = self.version
            self.poll_weights()
            if self.stats["rejoins"] != epoch or self.version is None:
                raise _Abandoned  # the engine may have been rebuilt: stop generating
            if self.version != before:
                self.stats["inflight_updates"] += 1
                checksums.setdefault(self.version, self.receiver.checksum)
            return self.version

        return hook

    def _grant_valid(self, learner: Any) -> bool:
        """False once the grant's learner has gone or we rejoined since (a
        learner that sees us reconnect hands our earlier work to others)."""
        return self.learner_id == learner and self.stats["rejoins"] == self._grant_epoch

    def _evaluate(self, task: Any) -> None:
        """Do an evaluation task and send its result (see actor/evaluator.py)."""
        from rapid_async.actor.evaluator import evaluate_task

        t0 = time.perf_counter()
        result = evaluate_task(self, task)
        if result is not None:
            self.sockets.send_eval_result(result)
            self.stats["evals"] += 1
        self.stats["eval_s"] += time.perf_counter() - t0

    def _check_stop(self) -> bool:
        """Drain unsolicited control messages (Stop, EvalTask); True once the
        learner said Stop."""
        from rapid_async.wire.protocol import EvalTask, Stop

        while self.stopped is None:
            msg = self.sockets.recv_control(timeout_ms=0)
            if msg is None:
                break
            if isinstance(msg, Stop):
                self.stopped = msg.reason
            elif isinstance(msg, EvalTask):
                self.eval_tasks.append(msg)
            else:  # garbage, or a reply nobody waits for: counted, never fatal
                self.stats["bad_control"] += 1
                n = self.stats["bad_control"]
                if n <= 20 or n & (n - 1) == 0:
                    log.warning("actor %s: ignoring unexpected control message %s (%d so far)",
                                self.actor_id, getattr(msg, "reason", type(msg).__name__), n)
        return self.stopped is not None

    def _report(self, metrics: Any, elapsed: float, final: bool = False) -> None:
        """Write and send the actor's metrics; the final record recomputes the
        weights' digest from the engine's buffer itself."""
        s = self.stats
        active = max(s["busy_s"] + s["idle_s"], 1e-9)
        rec = {"actor_id": self.actor_id, "version": self.version, "elapsed_s": elapsed,
               "weights/checksum": self.receiver.checksum,
               "weights/state_digest": (self.receiver.buffer_digest() if final
                                        else self.receiver.state_digest),
               "actor/tokens_per_s": s["tokens"] / max(elapsed, 1e-9),
               "actor/busy_frac": s["busy_s"] / active, **{f"actor/{k}": v for k, v in s.items()}}
        metrics.write(rec)
        try:
            self.sockets.send_stats({k: v for k, v in rec.items()
                                     if isinstance(v, (int, float)) and v is not None})
        except Exception as exc:  # stats are best effort; the loop goes on
            log.warning("could not send stats: %s", exc)

    def close(self) -> None:
        self.heartbeat.stop()
        try:
            self.sockets.send_stats({"leaving": 1})
        except Exception:
            pass
        self.sockets.close()
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        close_task = getattr(getattr(self, "task", None), "close", None)
        if close_task is not None:
            close_task()
