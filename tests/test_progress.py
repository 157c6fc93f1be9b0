"""rapid_async.progress: the rich progress display of rapid-run and rapid-tune."""

from __future__ import annotations

import io

from rich.console import Console

from rapid_async.progress import ProgressDisplay, run_status


def test_plain_lines_in_a_log_at_most_every_interval():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, soft_wrap=True, highlight=False)
    with ProgressDisplay("[rapid-run]", total=200, every_s=3600, console=console) as d:
        assert not d.live
        d.update(10, status="step 10 reward 0.5")
        d.update(20, status="step 20 reward 0.6")  # within the interval: not printed
        d.log("[rapid-run] a message")
    lines = out.getvalue().splitlines()
    assert lines == ["[rapid-run] 10/200 step 10 reward 0.5", "[rapid-run] a message"]
    assert "\x1b" not in out.getvalue()  # no control characters in logs


def test_live_bar_on_a_terminal_shows_progress_and_status():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with ProgressDisplay("[rapid-tune]", total=4, console=console) as d:
        assert d.live
        d.update(3, status="trial 4: learner.sync_every=2")
    text = out.getvalue()
    assert "3/4" in text and "trial 4: learner.sync_every=2" in text and "[rapid-tune]" in text


def test_run_status_formats_a_learner_record():
    rec = {"step": 12, "version": 12, "reward/mean": 0.5, "eval/success": 0.25,
           "throughput/tokens_per_s": 1234.4, "staleness/mean": 1.5,
           "learner/busy_frac": 0.75, "train_s": 60.2}
    assert run_status(rec, "40%") == ("step 12 v12 reward 0.500 heldout 0.250 tok/s 1234 "
                                      "staleness 1.50 learner busy 75% actors busy 40% t 60s")
    assert run_status({}).startswith("step - v- reward -")
