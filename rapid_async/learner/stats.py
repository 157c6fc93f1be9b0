"""The learner's clock and network figures for each step's metrics record.

Used by the learner process (`rapid_async.learner.loop`): `clock_stats` turns
the training loop's cumulative clocks into the `learner/*` time metrics and
throughput, `net_stats` reads the network thread's and the scheduler's counters
(`net/*`, `scheduler/*`, `actors`).
"""

from __future__ import annotations

import time
from typing import Any


def clock_stats(clock: dict[str, float], t_start: float) -> dict[str, float]:
    """Elapsed and active (not evaluating) seconds, cumulative busy / wait /
    publish / eval / checkpoint seconds, busy fraction and tokens per second."""
    elapsed = time.time() - t_start
    active = max(elapsed - clock["eval"], 1e-9)
    busy = clock["busy"] + clock["publish"] + clock["checkpoint"]
    return {"elapsed_s": elapsed, "train_s": active,
            "learner/busy_s": clock["busy"], "learner/wait_s": clock["wait"],
            "learner/publish_s": clock["publish"], "learner/eval_s": clock["eval"],
            "learner/checkpoint_s": clock["checkpoint"],
            "learner/busy_frac": busy / active,
            "throughput/tokens_per_s": clock["tokens"] / active}


def net_stats(net: Any, scheduler: Any) -> dict[str, Any]:
    """Bad messages by socket, the network thread's counters, re-issued and
    revoked work, connected and evicted actors."""
    return {"net/bad_messages": sum(net.bad_messages.values()),
            **{f"net/bad_{where}": n for where, n in list(net.bad_messages.items())},
            **{f"net/{k}": v for k, v in list(net.counters.items())},
            "scheduler/reissued": scheduler.reissued,
            "scheduler/revoked_at_round": scheduler.revoked_at_round,
            "scheduler/taken_back": getattr(scheduler, "taken_back", 0),
            "scheduler/released": getattr(scheduler, "released", 0),
            "actors": len(net.sessions), "net/actors/evicted": net.sessions.evicted,
            **{f"net/connections/{name}": len(g.open)
               for name, g in list(getattr(net.sockets, "guards", {}).items())},
            "net/connections/shut_down": sum(
                g.shut_down for g in list(getattr(net.sockets, "guards", {}).values()))}
