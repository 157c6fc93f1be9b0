"""The roles of a run as processes in simulated time, for the cost model (`model`).

Used by `rapid_async.tune.model.predict`, in the rapid-tune process only. The
learner, each actor and (when the costs say so) the learner's publisher thread
are generators for `rapid_async.tune.sim`, doing what their real loops do:

    learner    take a mini-batch (or a round) from the real `RolloutBuffer`,
               train, stage a version every sync_every steps (publish), other
    publisher  encode a staged version on the learner's device, then publish
               it; a newer staged version supersedes a waiting one
    actor      apply the versions published since its last look, ask the real
               `WorkScheduler` for work, wait for the grant's minimum version,
               generate the chunk, hand the groups to the buffer; evaluate a
               version when the learner asked for one

Times come from `model.Costs`; `System` also counts what the model reports:
staleness of consumed groups, groups generated, versions published.
"""

from __future__ import annotations

import math
from collections import Counter, namedtuple
from typing import Any

from rapid_async.tune.sim import Wait, Work

_Group = namedtuple("_Group", "policy_version index prompt_id")  # what the buffer reads


class System:
    """The learner, the actors and (optionally) a publisher thread in simulated time."""

    def __init__(self, costs: Any, s: Any):
        """`costs`: a `model.Costs`; `s`: a `model.Setting`."""
        from rapid_async.learner.buffer import RolloutBuffer
        from rapid_async.learner.scheduler import WorkScheduler

        self.c, self.s = costs, s
        self.sim: Any = None  # the Simulation, set by model.predict
        self.sync = s.mode != "rapid-async"
        self.h = max(1, s.batch_groups // s.minibatch_groups)
        self.span = self.h if self.sync else s.sync_every  # optimizer steps per publication
        bound = self.h - 1 if self.sync else s.max_staleness
        self.buffer = RolloutBuffer(max_staleness=bound)
        self.scheduler = WorkScheduler(s.mode, s.batch_groups, s.buffer_groups, bound,
                                       actor_timeout=math.inf)
        self.version = 0
        self.published = [0]
        self.pending: int | None = None
        self.eval_jobs = 0
        self.stale: Counter[int] = Counter()
        self.generated = 0
        self.update_times: list[float] = []
        self.on_update = lambda: None
        self.speedup = 1.0 + (max(1, s.learner_devices) - 1) * costs.learner_scaling

    def _publish(self, version: int) -> None:
        every = self.s.eval_every
        if every and version // every > self.published[-1] // every:
            self.eval_jobs += 1  # the learner asks an actor to evaluate this version
        self.published.append(version)

    def learner(self):
        s, c = self.s, self.c
        while True:
            need = s.batch_groups if self.sync else s.minibatch_groups
            if self.sync:
                self.scheduler.open_round(self.version)
            box: list = []

            def ready() -> bool:
                got = self.buffer.take(need, self.version, timeout=0)
                return got is not None and not box.append(got)

            yield Wait("wait", ready)
            groups = box[0]
            for j in range(0, need, s.minibatch_groups):
                for g in groups[j:j + s.minibatch_groups]:
                    self.stale[self.version - g.policy_version] += 1
                yield Work("train", c.train(s.minibatch_groups) / self.speedup)
                self.version += 1
                self.update_times.append(self.sim.now)
                self.on_update()
                due = j + s.minibatch_groups >= need if self.sync \
                    else self.version % s.sync_every == 0
                if due:
                    yield Work("publish", c.publish_cost(self.span))
                    if c.publish_bg > 0:
                        self.pending = version = self.version
                        if self.sync:  # the next round needs these weights out
                            yield Wait("publish", lambda: self.published[-1] >= version)
                    else:
                        self._publish(self.version)
                yield Work("other", c.other)
                if s.eval_every and c.eval > 0 and self.version % s.eval_every == 0:
                    yield Work("eval", c.eval)  # evaluation on the learner (older runs)

    def publisher(self):
        while True:
            yield Wait("idle", lambda: self.pending is not None)
            version, self.pending = self.pending, None
            yield Work("encode", self.c.publish_bg)
            self._publish(version)

    def actor(self, actor_id: str):
        s, c = self.s, self.c
        held = self.published[-1]
        while True:
            new = sum(1 for v in self.published if v > held)
            if new:
                target = self.published[-1]
                yield Work("apply", new * c.apply_cost(self.span))
                held = target
            box: list = []

            def granted() -> bool:
                if self.published[-1] > held:
                    return True  # as the actor loop: apply new weights before asking
                grant = self.scheduler.grant(actor_id, s.chunk_groups, len(self.buffer),
                                             self.published[-1])
                return bool(grant[0]) and not box.append(grant)

            if self.eval_jobs and c.actor_eval > 0:  # held-out evaluation is actor work
                self.eval_jobs -= 1
                yield Work("eval", c.actor_eval)
            yield Wait("idle", granted)
            if not box:
                continue
            idx, min_version, grant_id = box[0][0], box[0][1], tuple(box[0][2:3])
            if held < min_version:
                yield Wait("wait_version", lambda: self.published[-1] >= min_version)
                target = self.published[-1]
                yield Work("apply", sum(1 for v in self.published if v > held)
                           * c.apply_cost(self.span))
                held = target
            yield Work("gen", c.gen(len(idx)))
            for i in idx:
                self.scheduler.delivered(actor_id, i, *grant_id)
                self.buffer.put(_Group(held, i, str(i)))
            self.generated += len(idx)
