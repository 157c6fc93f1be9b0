"""`rapid-tune`: measure what limits a run, predict other settings, recommend one.

Used from the command line on one node (`rapid-tune report | recommend |
sweep`); nothing here runs inside the learner or the actors.

    measure.py    a run directory -> per-role costs over its steady window
    report.py     rapid-tune report RUN_DIR: the limiting role, why, what would move it
    sim.py        simulated time: processes that compute or wait, sharing devices
    roles.py      the learner, actors and publisher thread as simulated processes
    model.py      the cost model: Costs + Setting -> predicted updates/s, idle, staleness
    calibrate.py  measured runs -> Costs
    recommend.py  rapid-tune recommend: calibration trials, search, verification
    trials.py     one short real rapid-run trial, and its summary row
    sweep.py      rapid-tune sweep: trials over a grid -> table, CSV, JSON, PNGs
    plots.py      the sweep's PNGs
"""

from rapid_async.tune.sweep import parse_grid, sweep

__all__ = ["parse_grid", "sweep"]
