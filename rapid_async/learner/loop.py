"""The learner's training loop (`rapid-learner`): take -> update -> publish -> record.

The `Learner` owns the trainer (model, optimizer), the staleness-aware buffer,
the work scheduler and the network thread (`network.py`, which owns every
socket). Its loop reads like the algorithm:

    while not done:
        groups = take()                   # a round (sync modes) or a mini-batch
        for minibatch in split(groups):
            metrics = update(minibatch)   # one optimizer step
            publish(metrics)              # every sync_every steps / end of round
            record(metrics)               # checkpoint, metrics.jsonl, evaluation
                                          # requests and arrived results

Held-out evaluation is work for an actor (`learner/evaluation.py`): the loop
requests it at the start, every `run.eval_every` published versions and at
the end, and records each result, with the version it evaluated, when it
arrives. Only shut-down waits for the final result (with a timeout).

Per mode (DESIGN.md section 2):
    grpo         one round = minibatch_groups prompts at version v, 1 update
    rapid-sync   one round = batch_groups prompts at version v, H updates,
                 then publish; generation waits for training
    rapid-async  actors generate continuously; each update takes the oldest
                 fresh minibatch from the buffer (staleness <= max_staleness)

Around the loop: `startup.py` (model directory, torch threads, learner.json),
`resume.py` (the work state checkpoints record, resuming), `signals.py`
(SIGINT / SIGTERM stop after the current step), `stats.py` (clock and network
figures of each record).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from rapid_async.config import Config, dumps_toml
from rapid_async.learner.resume import resume_from_checkpoint, work_state
from rapid_async.learner.signals import StopOnSignal
from rapid_async.learner.startup import (endpoint_file, previous_ports, resolve_model_dir,
                                         set_learner_threads, write_endpoint_file)
from rapid_async.learner.stats import clock_stats, net_stats

__all__ = ["Learner", "endpoint_file", "previous_ports", "resolve_model_dir", "run_learner"]

log = logging.getLogger("rapid.learner")


class Learner(StopOnSignal):
    """One learner process: set-up in `__init__`, the loop in `run`.

    Args:
        cfg: the run config.
        resume: continue from the newest checkpoint in `run.run_dir`.
        model_dir: model directory (default: `model.path` or the tiny model).
    """

    def __init__(self, cfg: Config, resume: bool = False, model_dir: str | None = None):
        from rapid_async.learner.buffer import RolloutBuffer
        from rapid_async.learner.checkpoint import Checkpointer
        from rapid_async.learner.evaluation import EvalBoard, LearnerEvaluations, task_settings
        from rapid_async.learner.limits import grant_limits
        from rapid_async.learner.network import LearnerNetwork
        from rapid_async.learner.scheduler import WorkScheduler
        from rapid_async.learner.trainer import Trainer
        from rapid_async.metrics import MetricsWriter
        from rapid_async.config import resolve_device
        from rapid_async.metrics_backends import open_backends
        from rapid_async.tasks.base import task_from_config

        cfg.learner.device = resolve_device(cfg.learner.device)
        set_learner_threads()
        self.cfg = cfg
        self.mode = cfg.run.mode
        self.sync = self.mode != "rapid-async"
        self.run_dir = Path(cfg.run.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(dumps_toml(cfg))
        self.model_dir = model_dir or resolve_model_dir(cfg)
        self.trainer = Trainer(cfg, self.model_dir)
        self.resumed: dict[str, Any] | None = (
            resume_from_checkpoint(self.trainer, cfg, self.run_dir) if resume else None)
        self.trainer.start_replay_record(resumed=bool(self.resumed))  # rapid-replay's record
        self.task = task_from_config(cfg)
        max_staleness = cfg.learner.max_staleness if not self.sync else cfg.updates_per_batch - 1
        self.buffer = RolloutBuffer(max_staleness=max_staleness)
        self.scheduler = WorkScheduler(self.mode, cfg.learner.batch_groups,
                                       cfg.learner.buffer_groups, max_staleness,
                                       start_index=self.trainer.data_position,
                                       actor_timeout=cfg.learner.actor_timeout_s,
                                       limits=grant_limits(cfg))
        if self.resumed:
            self.scheduler.requeue(self.resumed["pending"])
        self.checkpointer = Checkpointer(self.run_dir, cfg.run.checkpoint_every,
                                         cfg.run.checkpoint_minutes, cfg.run.keep_checkpoints,
                                         start_version=self.trainer.version)
        self.taken: list[Any] = []  # groups taken from the buffer, not yet trained
        self.learner_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"  # this incarnation
        settings = {"config": cfg.to_dict(), "model_dir": str(Path(self.model_dir).resolve()),
                    "run_dir": str(self.run_dir.resolve()), "learner_id": self.learner_id}
        self.evals = EvalBoard(task_settings(cfg), timeout_s=cfg.learner.actor_timeout_s)
        ports = previous_ports(self.run_dir) if resume else None
        self.net = LearnerNetwork(cfg, self.buffer, self.scheduler, settings, evals=self.evals,
                                  validator=self._validator(), ports=ports)
        self.metrics = MetricsWriter(self.run_dir, "learner",
                                     backends=open_backends(cfg, self.run_dir, "learner", "learner"))
        self.publisher = self._start_publisher()
        self.start_version = self.trainer.version
        self.clock = {"busy": 0.0, "wait": 0.0, "publish": 0.0, "eval": 0.0, "checkpoint": 0.0,
                      "tokens": 0.0}
        self.evaluations = LearnerEvaluations(cfg, self.evals, self.metrics, self.start_version)
        self.stop_reason = "done"
        self.stop_requested: str | None = None  # set by SIGINT / SIGTERM
        self._previous_handlers: dict[int, Any] = {}

    def _validator(self) -> Any:
        """The checks every arriving group must pass (vocabulary, lengths, prompt...)."""
        from transformers import AutoTokenizer

        from rapid_async.actor.rollout import prompt_tokens
        from rapid_async.learner.validate import GroupValidator
        from rapid_async.tasks.prompts import PromptSettings

        embedding = self.trainer.model.get_input_embeddings()
        vocab = getattr(embedding, "num_embeddings", None) or self.trainer.model.config.vocab_size
        # The network thread gets its own tokenizer: a fast tokenizer is not
        # safe to use from two threads at once (evaluation uses the trainer's).
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        settings = PromptSettings.from_config(self.cfg, self.task)
        expected = self._episode_prompts(tokenizer, settings)
        if expected is None:
            expected = lambda i: prompt_tokens(self.task, tokenizer, i, settings)  # noqa: E731
        from rapid_async.config import episode_token_cap

        # With an [env], completions are whole episodes: up to env.max_episode_tokens.
        return GroupValidator(self.cfg.algo.group_size, int(vocab), episode_token_cap(self.cfg),
                              expected_prompt=expected)

    def _episode_prompts(self, tokenizer: Any, settings: Any) -> Any:
        """Index -> an episode's opening ids when the run has an [env], else None."""
        from rapid_async.envs import env_factory
        from rapid_async.envs.rollout import EpisodePrompts

        factory = env_factory(self.cfg, self.task)
        return None if factory is None else EpisodePrompts(factory, self.task, tokenizer, settings)

    def _start_publisher(self) -> Any:
        """The weight publisher thread, with the current weights as its base."""
        from rapid_async.weights.publisher import WeightPublisher

        self.weight_stats: dict[str, Any] = {}

        def published(update: Any, stats: dict[str, Any]) -> None:  # publisher thread
            self.net.publish(update)
            self.weight_stats = stats

        gather = self.trainer.publish_params if self.trainer.ranks.world > 1 else None
        source = self.trainer.published_weights()  # the model, or LoRA's merged view
        publisher = WeightPublisher(source, self.cfg.model.inference_dtype,
                                    on_update=published, on_snapshot=self.net.snapshot_ready,
                                    gather=gather, fill=getattr(source, "fill", None))
        publisher.begin(self.trainer.version)
        self.published_version = self.trainer.version  # the newest version handed over
        self.net.set_published(self.trainer.version)
        self.net.weights_source = publisher
        self.net.limit_chain(publisher.layout.nbytes)
        return publisher

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train until `run.max_steps` (or `run.max_seconds`); return a summary."""
        self.start()
        try:
            while not self.done():
                minibatches = self.split(self.take())
                for j, minibatch in enumerate(minibatches):
                    metrics = self.update(minibatch)
                    self.publish(metrics, end_of_round=j == len(minibatches) - 1)
                    self.record(metrics)
                    if self.trainer.version >= self.cfg.run.max_steps or self.stop_requested:
                        break
        except BaseException as exc:
            self.stop_reason = f"error: {type(exc).__name__}: {exc}"
            raise
        finally:
            summary = self.shutdown()
        return summary

    def start(self) -> None:
        """Open the sockets, announce the endpoint, ask for the start evaluation."""
        self._install_signal_handlers()
        self.net.start()
        write_endpoint_file(self.run_dir, self.net.sockets, self.learner_id)
        log.info("learner listening on %s (mode %s)", self.net.sockets.control_endpoint, self.mode)
        self.t_start = time.time()
        self.evaluations.start(self.t_start)
        if self.resumed:
            self.metrics.write({"step": self.trainer.version, "version": self.trainer.version,
                                "event": "resume", "resume/path": self.resumed["path"],
                                "resume/pending": len(self.resumed["pending"]),
                                "resume/changed": self.resumed["changes"]})
        self.metrics.write({"step": self.trainer.version, "version": self.trainer.version,
                            "elapsed_s": 0.0, "event": "start"})

    def done(self) -> bool:
        """True when the step or time budget is spent or a signal asked to stop
        (sets `stop_reason`)."""
        if self.stop_requested:
            self.stop_reason = self.stop_requested
            return True
        if self.trainer.version >= self.cfg.run.max_steps:
            return True
        limit = self.cfg.run.max_seconds
        if limit and time.time() - self.t_start - self.clock["eval"] > limit:
            self.stop_reason = "max_seconds"
            return True
        return False

    def take(self) -> list[Any]:
        """Wait for the next round (sync modes) or mini-batch (rapid-async) of
        groups; [] when the step or time budget runs out while waiting."""
        need = self.cfg.learner.minibatch_groups
        if self.sync:
            self.scheduler.open_round(self.trainer.version)
            need = self.cfg.learner.batch_groups
        t0 = time.perf_counter()
        groups = None
        while groups is None and not self.stop_requested:
            self.net.check()
            self.publisher.check()
            if self.done():  # the time budget also runs out while waiting for data
                groups = []
                break
            groups = self.buffer.take(need, self.trainer.version, timeout=0.5)
        self.clock["wait"] += time.perf_counter() - t0
        self.taken = list(groups or [])
        return self.taken

    def split(self, groups: list[Any]) -> list[list[Any]]:
        """Whole groups in mini-batches of `minibatch_groups`."""
        size = self.cfg.learner.minibatch_groups
        return [groups[i:i + size] for i in range(0, len(groups), size)]

    def update(self, minibatch: list[Any]) -> dict[str, Any]:
        """One optimizer step on a mini-batch; returns its metrics."""
        self.buffer.record_consumed(minibatch, self.trainer.version)
        newest = self._newest_token_staleness(minibatch, self.trainer.version)
        t0 = time.perf_counter()
        metrics = self.trainer.update(minibatch)
        self.taken = [g for g in self.taken if all(g is not m for m in minibatch)]
        # Which prompts this version trained (or a non-finite step skipped),
        # with their grant ids (audits: no work twice), and how many of its
        # groups came from weights not verified as served.
        ids = [g.prompt_id for g in minibatch]
        metrics["skipped/prompts" if metrics.get("guard/skipped") else "trained/prompts"] = ids
        if not metrics.get("guard/skipped"):
            metrics["trained/grants"] = [g.grant_id for g in minibatch]
        metrics["trained/unverified"] = sum(not self.net.verified(g) for g in minibatch)
        # In-flight updates: groups whose tokens span versions (staleness is
        # the oldest token's; this is how much newer their newest token was).
        metrics.update(newest)
        metrics["dropped/prompts"] = self.buffer.pop_dropped()
        self.trainer.data_position = self.scheduler.next_index
        self.clock["busy"] += time.perf_counter() - t0
        self.clock["tokens"] += metrics["batch/tokens"]
        return metrics

    @staticmethod
    def _newest_token_staleness(minibatch: list[Any], version: int) -> dict[str, float]:
        """In-flight updates: how many groups span versions, and the mean
        staleness of their newest tokens (a group's staleness is its oldest's)."""
        newest = [g.newest_version() if hasattr(g, "newest_version") else g.policy_version
                  for g in minibatch]
        return {"trained/mixed_version_groups":
                sum(getattr(g, "version_runs", None) is not None for g in minibatch),
                "staleness/newest_token_mean": sum(version - v for v in newest) / len(newest)}

    def publish(self, metrics: dict[str, Any], end_of_round: bool, force: bool = False) -> None:
        """Hand new weights to the publisher thread when it is time, or now with
        `force` (adds weight metrics).

        The training loop only casts the weights into a buffer (on its
        device); encoding and sending happen in the publisher thread. In the
        synchronous modes the next round must be generated with these
        weights, so the loop waits until they are out, and that wait counts
        as time blocked by publishing.
        """
        version = self.trainer.version
        due = end_of_round if self.sync else version % self.cfg.learner.sync_every == 0
        if not (due or force) or version == self.published_version:  # a skipped step made no version
            return
        t0 = time.perf_counter()
        self.publisher.stage(version)
        self.published_version = version
        if self.sync:
            self.publisher.wait_published(version)
        blocked = time.perf_counter() - t0
        self.clock["publish"] += blocked
        metrics["weights/blocked_s"] = blocked
        metrics.update(self.weight_stats)  # the newest version the publisher finished

    def record(self, metrics: dict[str, Any]) -> None:
        """Write the step's metrics record; checkpoint when due (after the
        record: a checkpoint at version v implies its record); request an
        evaluation when one is due and record the results that arrived."""
        from rapid_async.metrics import clean, progress_line

        version = self.trainer.version
        stepped = not metrics.get("guard/skipped")
        if stepped:
            self.evaluations.note_version(version, self.clock["eval"])
        self.checkpointer.check()
        rec = clean({"step": version, "version": version, "mode": self.mode, **metrics,
                     **self.buffer.stats(), **clock_stats(self.clock, self.t_start),
                     **net_stats(self.net, self.scheduler),
                     **self.checkpointer.stats})
        self.metrics.write(rec)
        print("[learner] " + progress_line(rec), flush=True)
        if stepped and self.checkpointer.due(version):
            self.clock["checkpoint"] += self.checkpoint(background=True)
        self.evaluations.after_step(self.published_version, version)

    # ------------------------------------------------------------------ evaluation

    def final_evaluation(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Publish the last version if it is not yet, have an actor evaluate it
        and wait for that and the start evaluation (learner/evaluation.py);
        returns their result records ({} where none came)."""
        version = self.trainer.version
        self.net.check()
        if self.published_version != version:
            self.publish({}, end_of_round=True, force=True)
        self._finish_publishing()  # the actors must hold the last version to evaluate it
        final_job = self.evaluations.final_job(version)
        self.clock["eval"] += self.evaluations.wait(
            final_job, version, check=self.net.check,
            actors_connected=self._actors_alive)
        return self.evaluations.results(final_job)

    def _actors_alive(self) -> bool:
        """Whether any actor was heard from within `learner.actor_timeout_s`
        (the scheduler remembers a silent one much longer, for its work)."""
        timeout = self.cfg.learner.actor_timeout_s
        return any(self.scheduler.silent_for(a) <= timeout for a in self.scheduler.actors())

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, background: bool, extra: dict[str, Any] | None = None) -> float:
        """Checkpoint now (in the background unless told otherwise); return the
        seconds the training loop was blocked."""
        pending, self.trainer.data_position = work_state(self.net, self.scheduler, self.buffer,
                                                          self.taken)
        meta = {"config": self.cfg.to_dict(), "extra": extra or {}}
        return self.checkpointer.save(self.trainer, pending, meta, background=background)

    # ------------------------------------------------------------------ shut-down

    def shutdown(self) -> dict[str, Any]:
        """Checkpoint (first: nothing after it can cost it); publish the last
        version and wait for an actor's final evaluation (and the start one if
        still out); then stop the actors, write the end record, close sockets."""
        from rapid_async.metrics import clean

        version = self.trainer.version
        start, final = {}, {}
        try:
            self.clock["checkpoint"] += self.checkpoint(
                background=False, extra={"stop_reason": self.stop_reason})
            start, final = self.final_evaluation()
        finally:
            elapsed = time.time() - self.t_start
            self._finish_publishing()  # at once if done already
            self.net.stop_actors(self.stop_reason)
            self.metrics.write(clean({
                "step": version, "version": version, "event": "end",
                "eval/success": final.get("eval/success"),
                "eval/version": final.get("eval/version"), "eval/time": final.get("eval/time"),
                "eval/start_success": start.get("eval/success"),
                # dropped as stale by the last take (no step after it to say so)
                "dropped/prompts": self.buffer.pop_dropped(),
                "elapsed_s": elapsed, "stop_reason": self.stop_reason,
                "learner/checkpoint_s": self.clock["checkpoint"], **self.checkpointer.stats,
                **self.buffer.stats(), **net_stats(self.net, self.scheduler)}))
            time.sleep(0.3)
            self.net.shutdown()
            self.publisher.close()
            self.trainer.close()
            self.metrics.close()
            self._restore_signal_handlers()
        summary = {"start_success": start.get("eval/success"),
                   "final_success": final.get("eval/success"),
                   "steps": version - self.start_version, "elapsed_s": elapsed,
                   "bad_messages": dict(self.net.bad_messages), "run_dir": str(self.run_dir)}
        print(f"[learner] held-out success: {_fmt(summary['start_success'])} -> "
              f"{_fmt(summary['final_success'])} after {summary['steps']} steps in "
              f"{elapsed:.0f}s", flush=True)
        return summary

    def _finish_publishing(self, timeout: float = 300.0) -> None:
        """Let the publisher send the last staged version before the actors are stopped."""
        try:
            if not self.publisher.flush(timeout):
                log.warning("the last weights were not published within %.0f s", timeout)
        except RuntimeError as exc:  # the publisher failed; shutdown goes on
            log.error("%s", exc)


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def run_learner(cfg: Config, resume: bool = False, model_dir: str | None = None) -> dict[str, Any]:
    """Train until `run.max_steps` (or `run.max_seconds`); return a summary."""
    return Learner(cfg, resume=resume, model_dir=model_dir).run()
