"""Tests of rapid_async.metrics: JSONL records, progress line, plots."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from rapid_async.metrics import MetricsWriter, clean, plot_run, progress_line, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_writer_appends_lines_with_role_and_time(tmp_path):
    run = tmp_path / "run"  # created by the writer
    learner = MetricsWriter(run, "learner")
    actor = MetricsWriter(run, "actor")
    t0 = time.time()
    rec = learner.write({"step": 1, "reward/mean": 0.5})
    actor.write({"actor_id": "a0", "actor/tokens_per_s": np.float32(2.5),
                 "version": torch.tensor(3)})
    learner.write({"step": 2, "staleness/hist": {"0": 4, "1": 2}})
    assert rec["role"] == "learner" and t0 <= rec["time"] <= time.time()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert [json.loads(line)["role"] for line in lines] == ["learner", "actor", "learner"]
    recs = read_metrics(run)
    assert recs[0] == rec
    assert recs[1]["actor/tokens_per_s"] == 2.5 and recs[1]["version"] == 3
    assert recs[2]["staleness/hist"] == {"0": 4, "1": 2}
    assert recs[0]["time"] <= recs[1]["time"] <= recs[2]["time"]


def test_writer_refuses_what_json_cannot_hold(tmp_path):
    writer = MetricsWriter(tmp_path, "learner")
    with pytest.raises(TypeError, match="object"):
        writer.write({"bad": object()})


def test_read_metrics_skips_torn_and_foreign_lines(tmp_path):
    writer = MetricsWriter(tmp_path, "learner")
    writer.write({"step": 1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"role": "actor", "time": 12.5, "actor/tok\n')  # torn by a crash
        f.write("[1, 2, 3]\n")  # valid JSON, not a record
        f.write('{"hello": "world"}\n')  # a dict that no MetricsWriter wrote
        f.write("\n")
    writer.write({"step": 2})
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]


def test_read_metrics_names_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory"):
        read_metrics(tmp_path / "nope")


def test_clean_replaces_non_finite_floats_by_none(tmp_path):
    rec = {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.5, "e": 3, "f": "x",
           "g": {"h": math.nan, "i": 2.0}, "j": None}
    out = clean(rec)
    assert out == {"a": None, "b": None, "c": None, "d": 1.5, "e": 3, "f": "x",
                   "g": {"h": None, "i": 2.0}, "j": None}
    assert math.isnan(rec["a"])  # the input is not modified
    MetricsWriter(tmp_path, "learner").write(out)  # now valid JSON
    assert read_metrics(tmp_path)[0]["g"] == {"h": None, "i": 2.0}


def test_progress_line_formats_a_record():
    rec = {"step": 12, "version": 12, "reward/mean": 0.5, "eval/success": 0.25,
           "throughput/tokens_per_s": 1234.4, "staleness/mean": 1.5,
           "learner/busy_frac": 0.75, "elapsed_s": 60.2}
    assert progress_line(rec) == ("step 12 v12 reward 0.500 heldout 0.250 tok/s 1234 "
                                  "staleness 1.50 busy 75% t 60s")


def test_progress_line_tolerates_missing_and_none_values():
    line = progress_line({"step": 3, "reward/mean": None})
    assert line == "step 3 v- reward - heldout - tok/s - staleness - busy - t -s"
    assert progress_line({}).startswith("step - v- reward -")


def write_run(run_dir, steps=6):
    learner = MetricsWriter(run_dir, "learner")
    actors = [MetricsWriter(run_dir, "actor") for _ in range(2)]
    for step in range(1, steps + 1):
        for i, a in enumerate(actors):
            a.write({"actor_id": f"a{i}", "actor/tokens_per_s": 100.0 + 10 * i + step})
        rec = {"step": step, "version": step, "reward/mean": step / steps,
               "throughput/tokens_per_s": 150.0 + step, "staleness/mean": 0.5,
               "staleness/max": 2, "staleness/hist": {"0": step, "1": 2 * step, "2": 1}}
        if step % 3 == 0:
            rec["eval/success"] = step / (2 * steps)
        learner.write(clean(rec))
        time.sleep(0.001)


def test_plot_run_writes_a_png(tmp_path):
    write_run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"note": "foreign line without role or time"}\n')
    out = plot_run(tmp_path)
    assert out == tmp_path / "plots.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000  # four panels with lines and bars, not an empty canvas
    other = plot_run(tmp_path, tmp_path / "other.png")
    assert other.read_bytes()[:8] == PNG_MAGIC


def test_plot_run_needs_learner_records(tmp_path):
    MetricsWriter(tmp_path, "actor").write({"actor_id": "a0", "actor/tokens_per_s": 1.0})
    MetricsWriter(tmp_path, "learner").write({"event": "no step here"})
    with pytest.raises(ValueError, match="no learner records"):
        plot_run(tmp_path)
    assert not (tmp_path / "plots.png").exists()


def test_writer_forwards_scalars_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rapid_async.metrics_backends import TensorBoardBackend

    tb = tmp_path / "tensorboard" / "learner"
    writer = MetricsWriter(tmp_path, "learner", backends=[TensorBoardBackend(tb)])
    for step in (1, 2, 3):
        writer.write({"step": step, "loss/policy": 0.5 / step, "mode": "rapid-async",
                      "staleness/hist": {"0": step, "2": 1}, "eval/success": None})
    writer.close()
    acc = EventAccumulator(str(tb)).Reload()
    assert [e.step for e in acc.Scalars("loss/policy")] == [1, 2, 3]
    assert acc.Scalars("loss/policy")[-1].value == pytest.approx(0.5 / 3)
    assert [e.value for e in acc.Scalars("staleness/hist/0")] == [1, 2, 3]
    assert "mode" not in acc.Tags()["scalars"] and "eval/success" not in acc.Tags()["scalars"]
    assert len(read_metrics(tmp_path)) == 3  # metrics.jsonl as before


def test_a_failing_backend_is_dropped_and_training_goes_on(tmp_path, caplog):
    class Broken:
        def write(self, rec, step):
            raise OSError("disk full")

        def close(self):
            pass

    writer = MetricsWriter(tmp_path, "actor", backends=[Broken()])
    writer.write({"actor_id": "a0", "actor/groups": 1})
    writer.write({"actor_id": "a0", "actor/groups": 2})
    assert writer.backends == [] and "disk full" in caplog.text
    assert [r["actor/groups"] for r in read_metrics(tmp_path)] == [1, 2]


def test_backends_are_validated_by_name_and_package():
    from rapid_async.config import load_config
    from rapid_async.metrics_backends import missing_package, parse_backends

    assert parse_backends(" tensorboard , wandb") == ["tensorboard", "wandb"]
    assert parse_backends("") == []
    with pytest.raises(ValueError, match="'mlflow' is not one of tensorboard, wandb"):
        load_config(None, ["metrics.backends=mlflow"])
    assert load_config(None, ["metrics.backends=tensorboard"]).metrics.backends == "tensorboard"
    if missing_package("wandb"):
        with pytest.raises(ValueError, match="pip install wandb"):
            load_config(None, ["metrics.backends=wandb"])
    with pytest.raises(ValueError, match="metrics.wandb_mode"):
        load_config(None, ["metrics.wandb_mode=sometimes"])


def test_writer_logs_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from rapid_async.config import load_config
    from rapid_async.metrics_backends import open_backends

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["metrics.backends=wandb", "metrics.wandb_mode=offline"])
    writer = MetricsWriter(tmp_path, "learner",
                           backends=open_backends(cfg, tmp_path, "learner", "learner"))
    for step in (1, 2, 3):
        writer.write({"step": step, "loss/policy": 1.0 / step, "staleness/hist": {"0": step}})
    assert len(writer.backends) == 1  # nothing failed
    writer.close()
    import wandb

    wandb.teardown()  # what process exit does: the service writes out the run
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()  # the offline run's records hold each logged key per step
    assert data.count(b"loss/policy") >= 3 and b"staleness/hist/0" in data


def test_eval_series_places_results_at_the_time_of_their_version():
    from rapid_async.metrics import eval_series

    recs = [
        {"role": "learner", "time": 100.0, "step": 1},
        # arrived at 130 but evaluates the version made at 110; a later one arrived first
        {"role": "learner", "time": 130.0, "event": "eval", "eval/success": 0.5,
         "eval/version": 10, "eval/time": 110.0},
        {"role": "learner", "time": 125.0, "event": "eval", "eval/success": 0.7,
         "eval/version": 20, "eval/time": 120.0},
        {"role": "actor", "time": 126.0, "eval/success": 0.9},  # not the learner's record
        {"role": "learner", "time": 105.0, "eval/success": 0.25},  # old style: its own time
    ]
    assert eval_series(recs, "eval/success", t0=100.0) == ([5.0, 10.0, 20.0], [0.25, 0.5, 0.7])


def test_progress_line_names_the_evaluated_version():
    rec = {"step": 40, "version": 40, "eval/success": 0.5, "eval/version": 25}
    assert "heldout 0.500@v25 " in progress_line(rec)
