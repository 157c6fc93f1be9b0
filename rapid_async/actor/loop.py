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
snapshot: its weights may be ahead of or behind the restored version.

The actor never generates with weights it cannot vouch for: every update is
checked and verified before it is written into the engine's weights
(`rapid_async.weights.receiver`); deltas it missed because its queue was
full are fetched from the learner's chain of recent deltas, and an update
that cannot be applied (not kept any more, malformed, checksum failure) makes
it ask for a snapshot before it generates again.

A dedicated evaluator (`evaluator=True`) asks for zero groups: it only
evaluates, and while one is connected the generating actors do not.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("rapid.actor")


def make_engine(name: str, model_dir: str, dtype: str, device: str, seed: int) -> Any:
    """Build the inference engine named in the config."""
    if name == "hf":
        from rapid_async.engines.hf import HFEngine

        return HFEngine(model_dir, device=device, dtype=dtype, seed=seed)
    if name == "vllm":
        from rapid_async.engines.vllm import VLLMEngine

        return VLLMEngine(model_dir, dtype=dtype, seed=seed)
    raise ValueError(f"actor.engine = {name!r} is not one of hf, vllm")


class Actor:
    """One actor: sockets, engine, task and the weights it holds.

    Args:
        control_endpoint: the learner's control endpoint, tcp://HOST:PORT.
        actor_id: unique name of this actor.
        engine: override of the config's actor.engine (None: use the config).
        evaluator: only evaluate (ask for no generation work).
        curve_keys: this actor's CURVE key pair (with `server_key`, the
            learner's public key): needed when the learner uses CURVE.
    """

    def __init__(self, control_endpoint: str, actor_id: str | None = None,
                 engine: str | None = None, hello_timeout_s: float = 60.0,
                 evaluator: bool = False, curve_keys: Any = None,
                 server_key: bytes | None = None):
        from rapid_async.actor.heartbeat import Heartbeat
        from rapid_async.config import config_from_dict
        from rapid_async.wire.transport import ActorSockets

        self.actor_id = actor_id or f"{socket.gethostname()}-{os.getpid()}"
        self.control_endpoint = control_endpoint
        self._curve = {"curve_keys": curve_keys, "server_key": server_key}
        self.sockets = ActorSockets(control_endpoint, self.actor_id, **self._curve)
        welcome = self.sockets.hello(os.getpid(), engine or "config",
                                     timeout_ms=int(hello_timeout_s * 1000))
        self.learner_id = welcome.settings.get("learner_id")
        self._grant_learner = self.learner_id
        self.cfg = config_from_dict(welcome.settings["config"])
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
                                        "rejoins": 0, "dropped_on_rejoin": 0, "bad_control": 0}

    @property
    def version(self) -> int | None:
        """Version of the verified weights the engine holds (None: none yet)."""
        return None if self.receiver is None else self.receiver.version

    def setup(self) -> None:
        """Load tokenizer, task and engine, then the learner's current weights."""
        from transformers import AutoTokenizer

        from rapid_async.config import resolve_device
        from rapid_async.tasks.base import task_from_config
        from rapid_async.tasks.prompts import PromptSettings, check_chat_template
        from rapid_async.tasks.scoring import Scorer

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.task = task_from_config(cfg)
        self.prompt_settings = PromptSettings.from_config(cfg, self.task)
        if self.prompt_settings.prompt_format == "chat":
            check_chat_template(self.tokenizer, self.model_dir)
        self.scorer = Scorer(self.task, cfg.task.failure_reward)
        self.engine = make_engine(self.engine_name, self.model_dir, cfg.model.inference_dtype,
                                  resolve_device(cfg.actor.device),
                                  cfg.run.seed + (os.getpid() % 10007))
        from rapid_async.weights import WeightReceiver

        self.receiver = WeightReceiver(self.engine)
        self._snapshot("join")

    # -- weights
    def _install(self, updates: list[Any]) -> None:
        """Verify and write updates in order, then let the engine load them once.

        Raises:
            NeedSnapshot: at the first update that cannot be applied (those
                before it stay applied).
        """
        t0 = time.perf_counter()
        try:
            for update in updates:
                self.receiver.apply(update)
                self.stats["update_bytes"] += len(update.payload)
                self.stats["snapshots" if update.kind == "snapshot" else "deltas"] += 1
        finally:
            self.receiver.commit()
            self.stats["update_s"] += time.perf_counter() - t0

    def _snapshot(self, reason: str) -> None:
        """Ask for the full weights and install them (retrying while the
        learner has none to give or sends one that fails its checks); return
        early if the learner says stop."""
        from rapid_async.weights import NeedSnapshot
        from rapid_async.wire.transport import LearnerRestarted

        for _ in range(100):
            if self._check_stop():
                return
            try:
                update = self.sockets.request_snapshot(reason, timeout_ms=self._timeout_ms(60))
                self._install([update])
                return
            except (LearnerRestarted, TimeoutError) as exc:
                self.rejoin(str(exc))  # ends with a snapshot of the learner it finds
                return
            except RuntimeError as exc:  # an ErrorReply, e.g. no weights yet
                log.warning("actor %s: %s", self.actor_id, exc)
            except NeedSnapshot as exc:
                self.stats["rejected_updates"] += 1
                log.warning("actor %s: rejected a snapshot: %s", self.actor_id, exc.reason)
            time.sleep(0.2)
        raise RuntimeError("the learner did not send a usable weight snapshot after 100 tries")

    def poll_weights(self, timeout_ms: int = 0) -> None:
        """Apply every queued weight update in order (fetching missed deltas
        from the learner), the engine loading once; a snapshot on any doubt."""
        from rapid_async.weights import NeedSnapshot
        from rapid_async.wire.transport import BadMessage

        queued = []
        while (update := self.sockets.recv_weights(timeout_ms=timeout_ms)) is not None:
            timeout_ms = 0
            if isinstance(update, BadMessage):
                self.stats["rejected_updates"] += 1
                log.warning("actor %s: bad weight update (%s)", self.actor_id, update.reason)
                continue
            queued.append(update)
        if not queued:
            return
        try:
            self._install(self._in_order(queued))
        except NeedSnapshot as exc:
            self.stats["rejected_updates"] += 1
            log.info("actor %s: %s; asking for a snapshot", self.actor_id, exc.reason)
            self._snapshot(exc.reason)

    def _in_order(self, queued: list[Any]) -> list[Any]:
        """The deltas that take our version to the newest queued one, in order;
        gaps (deltas dropped by a full queue) filled from the learner's chain.

        Raises:
            NeedSnapshot: if a missed delta is no longer kept by the learner.
        """
        from rapid_async.weights import NeedSnapshot

        chain, version = [], self.version
        for update in sorted(queued, key=lambda u: u.version):
            if version is None or update.version <= version or update.base_version is None:
                continue  # old, or not a delta: PUB carries deltas only
            while version < update.base_version:
                try:
                    missed = self.sockets.request_delta(version, timeout_ms=30_000)
                except (RuntimeError, TimeoutError) as exc:
                    raise NeedSnapshot(f"missed deltas after version {version}: {exc}") from exc
                if missed.base_version != version or missed.version > update.base_version:
                    raise NeedSnapshot(f"the learner's chain does not lead from {version} "
                                       f"to {update.base_version}")
                self.stats["chain_fetches"] += 1
                chain.append(missed)
                version = missed.version
            if update.base_version == version:
                chain.append(update)
                version = update.version
        return chain

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

    def _request_work(self) -> Any:
        """Ask for a chunk; a grant larger than asked for is cut (and counted):
        no reply makes the actor take on unbounded work."""
        asked = 0 if self.evaluator else self.cfg.actor.chunk_groups
        grant = self.sockets.request_work(asked)
        if len(grant.prompt_indices) > asked:
            self.stats["bad_control"] += 1
            log.warning("actor %s: grant of %d prompts for %d asked; keeping %d", self.actor_id,
                        len(grant.prompt_indices), asked, asked)
            grant.prompt_indices = grant.prompt_indices[:asked]
        return grant

    def _wait_version(self, min_version: int, timeout_s: float = 5.0) -> bool:
        """Wait for weights of at least `min_version` (a snapshot if they do
        not come by PUB in time). Returns False only when the learner said
        stop; the grant is never dropped silently: if the snapshot is still
        older (the learner moved on meanwhile) the work is done anyway and
        the learner's staleness bound decides whether it is used."""
        deadline = time.monotonic() + timeout_s
        while self.version is None or self.version < min_version:
            if self._check_stop():
                return False
            if time.monotonic() > deadline:
                self._snapshot(f"behind: have {self.version}, need {min_version}")
                break
            self.poll_weights(timeout_ms=50)
        return self.stopped is None

    # -- finding the learner again
    def _timeout_ms(self, at_least_s: float = 0.0) -> int:
        return int(max(self.cfg.actor.learner_timeout_s, at_least_s) * 1000)

    def _request_work(self, max_groups: int) -> Any:
        """A WorkGrant, or None if the learner did not answer or asked us to
        rejoin (then we have said Hello again and hold its current weights).
        A grant larger than asked for is cut (and counted): no reply makes
        the actor take on unbounded work."""
        from rapid_async.wire.transport import LearnerRestarted

        try:
            grant = self.sockets.request_work(max_groups, timeout_ms=self._timeout_ms())
        except (LearnerRestarted, TimeoutError) as exc:
            self.rejoin(str(exc))
            return None
        self._grant_learner = self.learner_id  # whose grant it is
        if len(grant.prompt_indices) > max_groups:
            self.stats["bad_control"] += 1
            log.warning("actor %s: grant of %d prompts for %d asked; keeping %d", self.actor_id,
                        len(grant.prompt_indices), max_groups, max_groups)
            grant.prompt_indices = grant.prompt_indices[:max_groups]
        return grant

    def _learner_endpoint(self) -> str:
        """The control endpoint in RUN_DIR/learner.json (a restarted learner may
        have moved), else the one we used last."""
        try:
            info = json.loads((Path(self.run_dir) / "learner.json").read_text())
            return str(info["control"])
        except (OSError, ValueError, KeyError, TypeError):
            return self.control_endpoint

    def rejoin(self, reason: str) -> None:
        """Say Hello again (new sockets) until a learner answers, then take its
        snapshot. Raises TimeoutError after `actor.rejoin_timeout_s`."""
        from rapid_async.config import config_from_dict
        from rapid_async.wire.transport import ActorSockets

        log.warning("actor %s: %s; saying Hello again", self.actor_id, reason)
        self.stats["rejoins"] += 1
        deadline = time.monotonic() + self.cfg.actor.rejoin_timeout_s
        while True:
            self.sockets.close()
            self.control_endpoint = self._learner_endpoint()
            self.sockets = ActorSockets(self.control_endpoint, self.actor_id, **self._curve)
            try:
                welcome = self.sockets.hello(os.getpid(), self.engine_name, timeout_ms=5000,
                                             session=self.session)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no learner answered at {self.control_endpoint} for "
                        f"{self.cfg.actor.rejoin_timeout_s:.0f} s (actor.rejoin_timeout_s)") from None
        self.cfg = config_from_dict(welcome.settings["config"])  # a resumed run may change it
        self.learner_id = welcome.settings.get("learner_id")
        self.session = welcome.session  # the heartbeat thread reads it at each beat
        self.eval_tasks.clear()  # jobs of the learner that has gone
        log.info("actor %s: rejoined the learner at %s (version %d)", self.actor_id,
                 self.control_endpoint, welcome.policy_version)
        self._snapshot("rejoin")

    def _same_learner(self) -> bool:
        """A ping (Hello on the same sockets): True if the learner we know
        answers; else rejoin whichever answers now and return False."""
        try:
            welcome = self.sockets.hello(os.getpid(), self.engine_name,
                                         timeout_ms=self._timeout_ms())
        except (TimeoutError, RuntimeError) as exc:
            self.rejoin(str(exc))
            return False
        if welcome.settings.get("learner_id") != self.learner_id:
            self.rejoin("the learner restarted")
            return False
        return True

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

        learner, checksum = self._grant_learner, self.receiver.checksum
        if self.learner_id != learner:  # granted by a learner that has since gone
            self.stats["dropped_on_rejoin"] += len(indices)
            return
        groups = generate_groups(self.engine, self.tokenizer, self.task, self.cfg, indices,
                                 self.version, self.actor_id, scorer=self.scorer,
                                 prompt_settings=self.prompt_settings,
                                 grant_id=grant_id)
        self.stats["gen_s"] += sum(group.gen_seconds for group in groups)
        self.stats["chunks"] += 1
        self.stats["verifier_failures"] = sum(self.scorer.failures.values())
        for group in groups:
            if checksum is not None:
                group.info["weights_checksum"] = checksum
        for i, group in enumerate(groups):
            self.stats["tokens"] += int(group.completion_lengths.sum())
            self.stats["truncated"] += int(group.info.get("truncated", 0))
            if self.learner_id != learner or not self._send(group):
                if self.stopped is None:
                    self.stats["dropped_on_rejoin"] += len(groups) - i
                return
            self.stats["groups"] += 1

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
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        close_task = getattr(getattr(self, "task", None), "close", None)
        if close_task is not None:
            close_task()
