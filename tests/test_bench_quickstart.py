"""The quickstart benchmark's report (bin/bench-quickstart): rows and the band."""

from rapid_async.bench.quickstart import VARIANTS, report


def test_report_has_a_row_per_variant_and_the_band():
    rows = [{"name": "1 thread", "warm": {"steps_taken": 1650, "checks": [[1600, 0.13], [1650, 0.156]],
                                          "train_seconds": 400.2},
             "rl": {"before": 0.15, "after": 0.81, "version": 200, "wall_s": 300}},
            {"name": "2 threads", "warm": {"steps_taken": 1400, "checks": [[1400, 0.162]],
                                           "train_seconds": 350.0},
             "rl": {"before": 0.17, "after": 0.86, "version": 200, "wall_s": 280}}]
    text = report(rows, "test box")
    assert "| 1 thread | 1650 | 0.156 | 400 | 0.150 -> 0.810 | 300 |" in text
    assert "before RL 0.150-0.170, after 0.810-0.860" in text and "test box" in text
    assert all("threads" in v and "env" in v for v in VARIANTS.values())
