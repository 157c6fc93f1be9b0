"""bin/bench-peer: parsing and summaries (hand-made series), and TRL's side for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rapid_async.bench.peer import median_or_none, rapid_rows, seconds_to_threshold, summarise
from rapid_async.bench.peer_report import medians, ratios, write_report

REPO = Path(__file__).resolve().parents[1]

SERIES = [{"step": 0, "train_s": 0.0, "wall_s": 9.0, "success": 0.15},
          {"step": 10, "train_s": 5.2, "wall_s": 14.2, "success": 0.41},
          {"step": 20, "train_s": 10.4, "wall_s": 19.4, "success": 0.62},
          {"step": 30, "train_s": 15.0, "wall_s": 24.0, "success": 0.58}]


def test_seconds_to_threshold_first_crossing_on_each_clock():
    assert seconds_to_threshold(SERIES, 0.6) == 10.4
    assert seconds_to_threshold(SERIES, 0.6, "wall_s") == 19.4
    assert seconds_to_threshold(SERIES, 0.41) == 5.2  # reaching it exactly counts
    assert seconds_to_threshold(list(reversed(SERIES)), 0.5) == 10.4  # row order does not matter


def test_seconds_to_threshold_not_reached():
    assert seconds_to_threshold(SERIES, 0.7) is None
    assert seconds_to_threshold([], 0.6) is None


def test_median_counts_not_reached_as_never():
    assert median_or_none([30.0, None, 10.0]) == 30.0
    assert median_or_none([30.0, None, None]) is None
    assert median_or_none([None]) is None
    assert median_or_none([]) is None


def _result(setting: str, seed: int, times: list[float | None], steps: int = 100) -> dict:
    rows = [{"step": 0, "train_s": 0.0, "wall_s": 5.0, "success": 0.15}]
    if times[seed] is not None:
        rows.append({"step": 50, "train_s": times[seed], "wall_s": times[seed] + 5.0,
                     "success": 0.65})
    return {"setting": setting, "seed": seed, "rows": rows, "steps": steps, "tokens": 40_000,
            "train_s": 50.0, "load_before": "up 3:00, load average: 2.50, 2.0, 1.0",
            "load_after": "up 3:01, load average: 3.00, 2.0, 1.0"}


def test_summary_and_ratios_by_hand():
    results = ([_result("trl-on-policy", s, [40.0, 50.0, 60.0]) for s in range(3)]
               + [_result("trl-spg4", s, [30.0, None, 36.0]) for s in range(3)]
               + [_result("rapid-async", s, [24.0, 27.0, 30.0]) for s in range(3)]
               + [_result("rapid-sync", s, [None, None, 45.0]) for s in range(3)])
    summaries = [summarise(r, 0.6) for r in results]
    assert summaries[0]["updates_per_s"] == 2.0 and summaries[0]["tokens_per_s"] == 800.0
    med = medians(summaries)
    assert med["trl-on-policy"]["train_s"] == 50.0 and med["trl-on-policy"]["wall_s"] == 55.0
    assert med["trl-spg4"]["train_s"] == 36.0 and med["trl-spg4"]["reached"] == 2
    assert med["rapid-sync"]["train_s"] is None  # 2 of 3 never reached it
    r = ratios(med, "train_s")
    assert r["trl_best"] == "trl-spg4"
    assert r["async_vs_trl_best"]["value"] == pytest.approx(27.0 / 36.0)
    assert r["async_vs_trl_best"]["met"]  # 0.75 exactly is allowed
    assert r["sync_vs_trl_on_policy"]["value"] is None and not r["sync_vs_trl_on_policy"]["met"]


def test_report_written_with_not_reached(tmp_path):
    results = [_result("trl-on-policy", 0, [None]), _result("rapid-async", 0, [20.0]),
               _result("rapid-sync", 0, [None])]
    results[2]["profile"] = {"steps": 9, "actor/gen_s": 4.5, "actor/chunks": 9,
                             "learner/busy_s": 3.6, "train_s": 10.0, "first_train_s": 2.0,
                             "first_wait_s": 2.0, "learner/wait_s": 5.0, "learner/publish_s": 0.5,
                             "learner/checkpoint_s": 0.0, "elapsed_s": 9.0, "actor/update_s": 1.0,
                             "actor/eval_s": 0.3, "actor/idle_s": 2.0}
    meta = {"command": "python -m rapid_async.bench.peer --seeds 1", "seeds": 1, "seconds": 120.0,
            "target": 0.6, "stop_at_target": True, "eval_every_s": 5.0, "eval_every": 10,
            "config": "configs/quickstart.toml", "note": "test", "cpus": 2}
    out = tmp_path / "peer.md"
    write_report(results, meta, out)
    text = out.read_text()
    assert "| trl-on-policy | not reached | not reached | 0/1 |" in text
    assert "| rapid-async | 20.0 | 25.0 | 1/1 |" in text
    assert "| 2.50 | 3.00 |" in text  # uptime before / after
    assert "| rapid-sync | 10.0 | 2.0 s (20%) | 3.0 s (30%) | 3.6 s (36%) | 0.5 s (5%) |" in text
    assert "(1.43x)" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["medians"]["rapid-async"]["train_s"] == 20.0 and len(data["runs"]) == 3


def _write_metrics(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_rapid_rows_put_results_at_their_version_on_both_clocks(tmp_path):
    launched = 1000.0
    run_dir = tmp_path / "run"
    _write_metrics(run_dir, [
        {"role": "learner", "time": 1004.0, "step": 0, "version": 0, "event": "start"},
        {"role": "actor", "time": 1012.0, "actor_id": "actor-0", "elapsed_s": 2.0,
         "actor/tokens": 500},
        {"role": "learner", "time": 1011.0, "version": 1, "loss/policy": 0.1},
        {"role": "learner", "time": 1011.1, "event": "eval", "eval/version": 0, "eval/success": 0.15},
        {"role": "learner", "time": 1013.0, "version": 2, "loss/policy": 0.1},
        {"role": "learner", "time": 1016.0, "version": 3, "loss/policy": 0.1},
        {"role": "learner", "time": 1018.0, "event": "eval", "eval/version": 2, "eval/success": 0.61},
        {"role": "actor", "time": 1018.5, "actor_id": "actor-0", "elapsed_s": 8.5,
         "actor/tokens": 2000},
        {"role": "learner", "time": 1019.0, "event": "end", "eval/version": 3, "eval/success": 0.7},
    ])
    got = rapid_rows(run_dir, launched)
    # the actor's loop began at 1012 - 2 = 1010: training clock 0
    assert got["rows"] == [{"step": 0, "train_s": 0.0, "wall_s": 10.0, "success": 0.15},
                           {"step": 2, "train_s": 3.0, "wall_s": 13.0, "success": 0.61}]
    assert got["steps"] == 3 and got["tokens"] == 2000
    assert got["train_s"] == 6.0 and got["first_rollout_wall_s"] == 10.0
    assert seconds_to_threshold(got["rows"], 0.6) == 3.0


def test_rapid_rows_without_an_actor_say_so(tmp_path):
    _write_metrics(tmp_path / "run", [{"role": "learner", "time": 1.0, "event": "start"}])
    with pytest.raises(ValueError, match="no actor record"):
        rapid_rows(tmp_path / "run", 0.0)


def test_project_reward_is_the_task_verifier():
    from rapid_async.bench.peer_trl import ProjectReward
    from rapid_async.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask()
    problems = [task.train_problem(i) for i in range(3)]
    reward = ProjectReward(task, problems)
    texts = [problems[0].answer, problems[1].answer + ".", "x"]
    got = reward([p.prompt for p in problems], texts, index=[0, 1, 2],
                 completion_ids=[[1, 2], [3], [4, 5, 6]])
    assert got == [1.0, 0.0, 0.0] and reward.tokens == 6


@pytest.mark.slow
def test_trl_side_records_real_held_out_success(tmp_path, warm_model_dir):
    """Three real GRPOTrainer steps with the project's reward; the callback's
    evaluations are the project's, so the first one equals run_evaluation on
    the warm model itself."""
    pytest.importorskip("trl")
    from rapid_async.bench.peer_trl import run_trl
    from rapid_async.config import load_config
    from rapid_async.engines.hf import HFEngine
    from rapid_async.evaluate import run_evaluation, settings_from_config
    from rapid_async.tasks.base import task_from_config
    from rapid_async.tasks.prompts import PromptSettings
    from transformers import AutoTokenizer

    config = str(REPO / "configs" / "quickstart.toml")
    out = tmp_path / "trl" / "result.json"
    result = run_trl("spg4", seed=0, seconds=1e9, eval_every_s=0.0, out=out, config=config,
                     threads=1, prompts=512, max_steps=3)
    assert json.loads(out.read_text())["steps"] == 3
    rows = result["rows"]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(0.0 <= r["success"] <= 1.0 for r in rows)
    assert [r["train_s"] for r in rows] == sorted(r["train_s"] for r in rows)
    assert rows[-1]["wall_s"] > rows[-1]["train_s"] > 0 and result["tokens"] > 0

    cfg = load_config(config)
    task = task_from_config(cfg)
    report = run_evaluation(HFEngine(warm_model_dir), AutoTokenizer.from_pretrained(warm_model_dir),
                            task, settings_from_config(cfg, samples=0),
                            prompt_settings=PromptSettings.from_config(cfg, task))
    assert rows[0]["success"] == report.summary["success"]
    assert Path(result["model_dir"]).resolve() == Path(warm_model_dir).resolve()


def test_round_model_by_hand():
    from rapid_async.bench.peer_report import round_model

    # 9 updates (2.25 rounds of 4), 9 chunks of 0.5 s, updates of 0.4 s, 8 s from
    # the first step to the last: 4.0 s per round = 4 x 0.5 + 4 x 0.4 + 0.4 other
    p = {"steps": 9, "actor/gen_s": 4.5, "actor/chunks": 9, "learner/busy_s": 3.6,
         "train_s": 10.0, "first_train_s": 2.0}
    m = round_model(p, 4)
    assert m["chunks"] == 4 and m["g"] == 0.5 and m["u"] == pytest.approx(0.4)
    assert m["measured"] == pytest.approx(4.0) and m["other"] == pytest.approx(0.4)
    # pipelined: first chunk, then 3 x max(g, u), then the last update, + other
    assert m["pipelined"] == pytest.approx(0.5 + 3 * 0.5 + 0.4 + 0.4)
    assert m["speedup"] == pytest.approx(4.0 / 2.8)


def test_wait_profile_from_records(tmp_path):
    from rapid_async.bench.peer import wait_profile

    recs = [{"role": "actor", "actor_id": "a", "elapsed_s": 1.0, "actor/gen_s": 0.5},
            {"role": "learner", "loss/policy": 0.0, "train_s": 12.0, "learner/wait_s": 11.0},
            {"role": "learner", "loss/policy": 0.0, "train_s": 20.0, "learner/wait_s": 14.0,
             "learner/busy_s": 4.0, "learner/publish_s": 1.5},
            {"role": "actor", "actor_id": "a", "elapsed_s": 9.0, "actor/gen_s": 5.0,
             "actor/chunks": 6}]
    p = wait_profile(recs)
    assert p["first_wait_s"] == 11.0 and p["learner/wait_s"] == 14.0 and p["steps"] == 2
    assert p["actor/gen_s"] == 5.0 and p["elapsed_s"] == 9.0 and p["actor/update_s"] == 0.0
