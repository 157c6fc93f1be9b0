"""The learner process (`rapid-learner`): buffer -> mini-batch updates -> weights.

Two threads:
- the network thread owns every learner socket (ZeroMQ sockets are not
  thread-safe): it answers actors on the control socket (hello, work requests,
  snapshot requests, stats), moves arriving rollout groups into the buffer,
  publishes weight updates handed to it by the training loop, and counts bad
  messages without dying on them;
- the main thread trains: it takes whole groups from the buffer, runs
  `Trainer.update`, publishes new weights every `sync_every` steps, evaluates,
  checkpoints and writes metrics. A failure of the network thread is re-raised
  here.

Per mode (DESIGN.md section 2):
    grpo         one round = minibatch_groups prompts at version v, 1 update
    rapid-sync   one round = batch_groups prompts at version v, H updates,
                 then publish; generation waits for training
    rapid-async  actors generate continuously; each update takes the oldest
                 fresh minibatch from the buffer (staleness <= max_staleness)
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rapid_async.config import Config, dumps_toml

log = logging.getLogger("rapid.learner")


class LearnerNetwork(threading.Thread):
    """The learner's network thread: sockets, actors, buffer input.

    Args:
        cfg: run config.
        buffer: where arriving groups go.
        scheduler: hands out work to actors.
        welcome_settings: sent to each actor in Welcome (config, model dir).
    """

    def __init__(self, cfg: Config, buffer: Any, scheduler: Any, welcome_settings: dict):
        super().__init__(name="learner-network", daemon=True)
        from rapid_async.transport import LearnerSockets

        self.cfg = cfg
        self.buffer = buffer
        self.scheduler = scheduler
        self.welcome_settings = welcome_settings
        self.sockets = LearnerSockets(host=cfg.transport.host, control_port=cfg.transport.port,
                                      rollout_hwm=cfg.transport.rollout_hwm,
                                      weights_hwm=cfg.transport.weights_hwm)
        self.outbox: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._published: tuple[int, dict] | None = None  # (version, inference state)
        self._snapshot_cache = None
        self.bad_messages: Counter[str] = Counter()
        self.actor_stats: dict[str, dict] = {}
        self.counters: Counter[str] = Counter()

    # -- called from the training loop
    def set_published(self, version: int, state: dict) -> None:
        """Make (version, state) the weights served on snapshot requests."""
        with self._lock:
            self._published = (version, state)

    def publish(self, update: Any) -> None:
        self.outbox.put(("publish", update))

    def stop_actors(self, reason: str) -> None:
        self.outbox.put(("stop", reason))

    def check(self) -> None:
        """Re-raise a failure of the network thread in the caller."""
        if self.error is not None:
            raise RuntimeError(f"learner network thread failed: {self.error!r}") from self.error

    def shutdown(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    # -- the thread
    def run(self) -> None:
        try:
            last_expire = time.monotonic()
            while not self._halt.is_set():
                self._drain_outbox()
                got = self._pump_rollouts()
                self._serve_control(timeout_ms=0 if got else 5)
                if time.monotonic() - last_expire > 1.0:
                    for actor_id in self.scheduler.expire_silent():
                        log.warning("actor %s went silent; its work is handed to others", actor_id)
                    last_expire = time.monotonic()
            self._drain_outbox()
        except BaseException as exc:  # re-raised by check() in the main loop
            self.error = exc
        finally:
            self.sockets.close()

    def _drain_outbox(self) -> None:
        from rapid_async.protocol import Stop

        while True:
            try:
                kind, item = self.outbox.get_nowait()
            except queue.Empty:
                return
            if kind == "publish":
                self.sockets.publish(item)
                self.counters["weights/published"] += 1
                self.counters["weights/published_bytes"] += len(item.payload)
            elif kind == "stop":
                self.sockets.broadcast(Stop(reason=item))

    def _bad(self, where: str, reason: str) -> None:
        self.bad_messages[where] += 1
        log.warning("bad message on %s socket: %s", where, reason)

    def _pump_rollouts(self, limit: int = 64) -> int:
        from rapid_async.protocol import RolloutGroup
        from rapid_async.transport import BadMessage

        n = 0
        while n < limit:
            msg = self.sockets.recv_rollout(timeout_ms=0)
            if msg is None:
                return n
            n += 1
            if isinstance(msg, BadMessage):
                self._bad("rollouts", msg.reason)
                continue
            if not isinstance(msg, RolloutGroup):
                self._bad("rollouts", f"expected a rollout group, got {type(msg).__name__}")
                continue
            k = self.cfg.algo.group_size
            if msg.completion_ids.shape[0] != k:
                self._bad("rollouts", f"group {msg.prompt_id} from {msg.actor_id} has "
                          f"{msg.completion_ids.shape[0]} completions, expected K = {k}")
                continue
            try:
                index = int(msg.prompt_id)
            except ValueError:
                index = -1
            self.scheduler.delivered(msg.actor_id, index)
            self.buffer.put(msg)
            self.counters["rollouts/groups"] += 1
        return n

    def _serve_control(self, timeout_ms: int) -> None:
        from rapid_async.protocol import (ActorStats, ErrorReply, Hello, SnapshotRequest,
                                          WorkGrant, WorkRequest)
        from rapid_async.transport import BadMessage

        got = self.sockets.poll_control(timeout_ms=timeout_ms)
        if got is None:
            return
        identity, msg = got
        if isinstance(msg, BadMessage):
            self._bad("control", msg.reason)
            if identity is not None:
                self.sockets.reply(identity, ErrorReply(message=msg.reason))
            return
        if isinstance(msg, Hello):
            self.scheduler.seen(msg.actor_id)
            version = self._published[0] if self._published else 0
            log.info("actor %s (pid %d, engine %s) joined", msg.actor_id, msg.pid, msg.engine)
            self.sockets.reply(identity, self.sockets.welcome(version, self.welcome_settings))
        elif isinstance(msg, WorkRequest):
            version = self._published[0] if self._published else 0
            indices, min_version = self.scheduler.grant(
                msg.actor_id, msg.max_groups, len(self.buffer), version)
            self.sockets.reply(identity, WorkGrant(prompt_indices=indices, min_version=min_version))
        elif isinstance(msg, SnapshotRequest):
            self.scheduler.seen(msg.actor_id)
            self.sockets.reply(identity, self._snapshot())
            self.counters["weights/snapshots_served"] += 1
        elif isinstance(msg, ActorStats):
            self.scheduler.seen(msg.actor_id)
            self.actor_stats[msg.actor_id] = dict(msg.stats)
            if msg.stats.get("leaving"):
                self.scheduler.forget(msg.actor_id)
        else:
            self._bad("control", f"unexpected {type(msg).__name__} on the control socket")
            self.sockets.reply(identity, ErrorReply(
                message=f"the learner does not accept {type(msg).__name__} messages"))

    def _snapshot(self) -> Any:
        from rapid_async.protocol import ErrorReply
        from rapid_async.weights import make_snapshot

        with self._lock:
            published = self._published
        if published is None:
            return ErrorReply(message="no weights published yet; retry shortly")
        version, state = published
        if self._snapshot_cache is None or self._snapshot_cache.version != version:
            self._snapshot_cache = make_snapshot(state, version)
        return self._snapshot_cache


def _endpoint_file(run_dir: Path) -> Path:
    return run_dir / "learner.json"


def run_learner(cfg: Config, resume: bool = False, model_dir: str | None = None) -> dict[str, Any]:
    """Train until `run.max_steps` (or `run.max_seconds`); return a summary."""
    import torch

    from rapid_async.buffer import RolloutBuffer
    from rapid_async.engines.hf import HFEngine
    from rapid_async.evaluate import evaluate as evaluate_engine
    from rapid_async.metrics import MetricsWriter, clean, progress_line
    from rapid_async.scheduler import WorkScheduler
    from rapid_async.tasks.base import get_task
    from rapid_async.trainer import Trainer, latest_checkpoint
    from rapid_async.weights import make_delta

    torch.set_num_threads(int(os.environ.get("RAPID_LEARNER_THREADS", "1")))
    run_dir = Path(cfg.run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dumps_toml(cfg))
    model_dir = model_dir or resolve_model_dir(cfg)
    trainer = Trainer(cfg, model_dir)
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ValueError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        trainer.load_checkpoint(ckpt)
        log.info("resumed from %s at version %d", ckpt, trainer.version)
    task = get_task(cfg.task.name, digits=cfg.task.digits, ops=cfg.task.ops, seed=cfg.task.seed)
    mode = cfg.run.mode
    h = cfg.updates_per_batch
    max_staleness = cfg.learner.max_staleness if mode == "rapid-async" else h - 1
    buffer = RolloutBuffer(max_staleness=max_staleness)
    round_groups = cfg.learner.batch_groups
    scheduler = WorkScheduler(mode, round_groups, cfg.learner.buffer_groups, max_staleness,
                              start_index=trainer.data_position,
                              actor_timeout=cfg.learner.actor_timeout_s)
    settings = {"config": cfg.to_dict(), "model_dir": str(Path(model_dir).resolve()),
                "run_dir": str(run_dir.resolve())}
    net = LearnerNetwork(cfg, buffer, scheduler, settings)
    metrics = MetricsWriter(run_dir, "learner")
    published_state = trainer.inference_state()
    published_version = trainer.version
    net.set_published(published_version, published_state)
    net.start()
    _endpoint_file(run_dir).write_text(json.dumps({
        "control": net.sockets.control_endpoint, "pid": os.getpid()}))
    log.info("learner listening on %s (mode %s)", net.sockets.control_endpoint, mode)

    # Held-out evaluation runs greedy decoding on a copy of the current
    # weights in the inference dtype, through the same engine code as an actor.
    eval_engine = HFEngine(model_dir, device=cfg.learner.device, dtype=cfg.model.inference_dtype)

    def evaluate() -> float:
        eval_engine.load_weights(trainer.inference_state())
        return evaluate_engine(eval_engine, trainer.tokenizer, task, cfg.run.eval_size,
                               cfg.algo.max_new_tokens)

    t_start = time.time()
    busy = 0.0
    wait = 0.0
    tokens = 0.0
    start_version = trainer.version
    first_eval = evaluate()
    eval_s = time.time() - t_start  # evaluations are not training time
    metrics.write({"step": trainer.version, "version": trainer.version, "eval/success": first_eval,
                   "elapsed_s": 0.0, "event": "start"})
    print(f"[learner] held-out success at start: {first_eval:.3f}", flush=True)
    last = first_eval
    stop_reason = "done"
    try:
        while trainer.version < cfg.run.max_steps:
            if cfg.run.max_seconds and time.time() - t_start - eval_s > cfg.run.max_seconds:
                stop_reason = "max_seconds"
                break
            sync = mode != "rapid-async"
            if sync:
                scheduler.open_round(trainer.version)
            need = round_groups if sync else cfg.learner.minibatch_groups
            t0 = time.perf_counter()
            groups = None
            while groups is None:
                net.check()
                groups = buffer.take(need, trainer.version, timeout=0.5)
            wait += time.perf_counter() - t0
            minibatches = [groups[i:i + cfg.learner.minibatch_groups]
                           for i in range(0, len(groups), cfg.learner.minibatch_groups)]
            for j, mb in enumerate(minibatches):
                buffer.record_consumed(mb, trainer.version)
                t1 = time.perf_counter()
                m = trainer.update(mb)
                trainer.data_position = scheduler.next_index
                dt = time.perf_counter() - t1
                busy += dt
                tokens += m["batch/tokens"]
                publish_now = (j == len(minibatches) - 1) if sync else \
                    (trainer.version % cfg.learner.sync_every == 0)
                if publish_now:
                    t2 = time.perf_counter()
                    new_state = trainer.inference_state()
                    update = make_delta(published_state, new_state, trainer.version,
                                        base_version=published_version)
                    published_state, published_version = new_state, trainer.version
                    net.set_published(trainer.version, new_state)
                    net.publish(update)
                    m["weights/update_bytes"] = len(update.payload)
                    m["weights/raw_bytes"] = update.raw_nbytes
                    m["weights/encode_s"] = time.perf_counter() - t2
                    busy += time.perf_counter() - t2
                if cfg.run.eval_every and trainer.version % cfg.run.eval_every == 0:
                    t3 = time.perf_counter()
                    last = evaluate()
                    eval_s += time.perf_counter() - t3
                    m["eval/success"] = last
                if cfg.run.checkpoint_every and trainer.version % cfg.run.checkpoint_every == 0:
                    trainer.save_checkpoint(run_dir)
                elapsed = time.time() - t_start
                active = max(elapsed - eval_s, 1e-9)
                rec = {"step": trainer.version, "version": trainer.version, "elapsed_s": elapsed,
                       "train_s": active, "mode": mode, **m, **buffer.stats(),
                       "learner/busy_s": busy, "learner/wait_s": wait,
                       "learner/busy_frac": busy / active,
                       "throughput/tokens_per_s": tokens / active,
                       "net/bad_messages": sum(net.bad_messages.values()),
                       **{f"net/{k}": v for k, v in net.counters.items()},
                       "scheduler/reissued": scheduler.reissued,
                       "actors": len(scheduler.actors())}
                metrics.write(clean(rec))
                print("[learner] " + progress_line(rec), flush=True)
                if trainer.version >= cfg.run.max_steps:
                    break
    finally:
        final_eval = evaluate() if trainer.version > start_version else last
        elapsed = time.time() - t_start
        trainer.save_checkpoint(run_dir, extra={"stop_reason": stop_reason})
        metrics.write({"step": trainer.version, "version": trainer.version, "event": "end",
                       "eval/success": final_eval, "elapsed_s": elapsed,
                       "stop_reason": stop_reason})
        net.stop_actors(stop_reason)
        time.sleep(0.3)
        net.shutdown()
    summary = {"start_success": first_eval, "final_success": final_eval,
               "steps": trainer.version - start_version, "elapsed_s": elapsed,
               "bad_messages": dict(net.bad_messages), "run_dir": str(run_dir)}
    print(f"[learner] held-out success: {first_eval:.3f} -> {final_eval:.3f} "
          f"after {summary['steps']} steps in {elapsed:.0f}s", flush=True)
    return summary


def resolve_model_dir(cfg: Config) -> str:
    """The model directory of a run: `model.path`, or the cached tiny model."""
    if cfg.model.path:
        p = Path(cfg.model.path)
        if not (p / "config.json").is_file():
            raise ValueError(f"model.path = {cfg.model.path!r} is not a Hugging Face model "
                             "directory (no config.json)")
        return str(p)
    from rapid_async.tinymodel import ensure_warm_model

    return str(ensure_warm_model())
