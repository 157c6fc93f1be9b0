"""How much work one actor may hold, and for how long: used by the learner's scheduler.

Used by `rapid_async.learner.scheduler.WorkScheduler` (in the learner
process), which holds the per-actor state and its lock; these are the rules,
as small functions of that state, so that no single client can hold the
learner's work (issue 21, item 1):

- Quota. An actor holds at most `limit` undelivered prompts:
  `learner.max_groups_per_actor`, or by default its share of the bound (the
  buffer capacity in rapid-async, the round in the synchronous modes) among
  the live actors that deliver, ceil(bound / n). An actor that has not
  delivered yet (or from which work was taken back since) is "unproven": it
  competes for a share with the delivering actors as one more actor, and all
  unproven actors together hold at most half of the bound, so a client that
  only asks (or thousands of them) never holds more than half.
- Deadline. A grant of n prompts must be delivered within
  max(`learner.grant_timeout_min_s`, `learner.grant_timeout_factor` x
  seconds per group x n), where seconds per group is measured from accepted
  deliveries (the slower of the actor's own and the run's; the floor alone
  until something was delivered). Work past its deadline is taken back and
  handed to others; its late delivery is dropped and counted (`late`), and
  the actor is unproven again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EMA = 0.2
"""Weight of a new sample in the running seconds-per-group estimates."""


@dataclass(frozen=True)
class GrantLimits:
    """The quota and deadline rules (None / 0: that rule is off).

    Args:
        max_per_actor: fixed quota per actor (0: the share described above;
            None: no quota at all, as in the tuning simulator).
        timeout_factor: deadline as a multiple of the measured generation
            time of the grant (0: grants never time out).
        timeout_min_s: the deadline's floor in seconds.
    """

    max_per_actor: int | None = None
    timeout_factor: float = 0.0
    timeout_min_s: float = 60.0

    def limit(self, bound: int, proven: bool, proven_alive: int) -> int:
        """Most prompts one actor may hold.

        Args:
            bound: the capacity (rapid-async) or round size (synchronous).
            proven: the actor has delivered since it joined or lost work.
            proven_alive: live, proven actors other than this one.
        """
        if self.max_per_actor is None:
            return bound
        if self.max_per_actor > 0:
            return self.max_per_actor
        return max(1, math.ceil(bound / (proven_alive + 1)))

    def quota(self, bound: int, proven: bool, proven_alive: int, held: int,
              unproven_held: int) -> int:
        """How many more prompts the actor may take now (>= 0)."""
        room = self.limit(bound, proven, proven_alive) - held
        if not proven and self.max_per_actor is not None:
            room = min(room, math.ceil(bound / 2) - unproven_held)
        return max(0, room)

    def deadline_s(self, n: int, own_spg: float, run_spg: float) -> float:
        """Seconds a grant of `n` prompts may stay undelivered (inf: no deadline)."""
        if self.timeout_factor <= 0:
            return math.inf
        measured = self.timeout_factor * max(own_spg, run_spg) * n
        return max(self.timeout_min_s, measured)


def update_spg(current: float, elapsed_s: float, n: int) -> float:
    """The running seconds-per-group estimate after a group of an n-prompt
    grant arrived `elapsed_s` after the grant."""
    sample = elapsed_s / max(n, 1)
    return sample if current <= 0 else (1 - EMA) * current + EMA * sample


def grant_limits(cfg) -> GrantLimits:
    """The rules of a run config's `learner` section."""
    lb = cfg.learner
    return GrantLimits(max_per_actor=lb.max_groups_per_actor,
                       timeout_factor=lb.grant_timeout_factor,
                       timeout_min_s=lb.grant_timeout_min_s)
