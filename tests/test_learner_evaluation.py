"""Tests for rapid_async.learner.evaluation (the learner's evaluation jobs) and
for how the learner's network thread hands them out over real ZeroMQ sockets."""

from __future__ import annotations

import time

import pytest

from rapid_async.learner.evaluation import EvalBoard, result_record
from rapid_async.wire.protocol import EvalResult

SETTINGS = {"problems": 20, "samples": 0, "temperature": 1.0, "max_new_tokens": 4, "seed": 0}


def _result(job_id: int, version: int, actor: str = "a0", success: float = 0.5) -> EvalResult:
    return EvalResult(actor, job_id, version, {"success": success, "problems": 20.0}, "")


def test_a_job_goes_to_one_actor_and_its_result_is_recorded_once():
    board = EvalBoard(SETTINGS)
    job = board.request(0, "start")
    taken = board.take("a0", evaluator=False)
    assert taken is not None and taken[0] is job
    assert taken[1] == {"job_id": job.job_id, "kind": "start", "min_version": 0, **SETTINGS}
    assert board.take("a1", evaluator=False) is None, "one actor per job"
    assert board.status(job) == "running"
    assert board.answer(_result(job.job_id, 0))
    assert not board.answer(_result(job.job_id, 0, actor="a1")), "a second answer is ignored"
    assert board.counters["late_results"] == 1
    assert [j.job_id for j in board.take_results()] == [job.job_id]
    assert board.take_results() == [] and board.status(job) == "answered"


class Clock:
    """The board's clock, advanced by hand: silences are counted in clock ticks,
    not in how fast a loaded machine runs the test."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


@pytest.fixture
def clock(monkeypatch):
    from rapid_async.learner import eval_loop, evaluation

    fake = Clock()
    monkeypatch.setattr(evaluation, "time", fake)
    monkeypatch.setattr(eval_loop, "time", fake)
    return fake


def test_a_silent_or_departed_actor_loses_its_job_to_the_next(clock):
    board = EvalBoard(SETTINGS, timeout_s=0.2)
    job = board.request(5, "periodic")
    assert board.take("a0", evaluator=False)[0] is job
    clock.now += 0.1
    board.heard("a0")  # a heartbeat keeps it
    clock.now += 0.15
    assert board.expire_silent() == []
    clock.now += 0.25
    assert board.expire_silent() == ["a0"]
    assert board.status(job) == "waiting" and board.counters["reissued"] == 1
    assert board.take("a1", evaluator=False)[0] is job and job.attempts == 2
    assert board.release("a1", "the actor left") == [job.job_id]
    assert board.take("a2", evaluator=False)[0] is job and job.attempts == 3
    # the first actor comes back with an answer after all: first answer wins
    assert board.answer(_result(job.job_id, 7, actor="a0"))
    assert not board.answer(_result(job.job_id, 6, actor="a2"))


def test_an_untaken_periodic_job_is_superseded_but_start_and_final_are_kept():
    board = EvalBoard(SETTINGS)
    start = board.request(0, "start")
    p10 = board.request(10, "periodic")
    p20 = board.request(20, "periodic")
    assert board.counters["superseded"] == 1 and p10.superseded
    assert board.find(10) is None and board.find(20) is p20
    assert board.take("a0", False)[0] is start, "oldest first"
    assert board.take("a1", False)[0] is p20
    final = board.request(30, "final")
    assert not p20.superseded, "a taken job is never superseded"
    assert board.oldest_open_version() == 0
    board.answer(_result(start.job_id, 0))
    assert board.oldest_open_version() == 20
    assert board.take("a0", False)[0] is final


def test_a_dedicated_evaluator_takes_the_jobs_while_it_is_alive(clock):
    board = EvalBoard(SETTINGS, timeout_s=0.2)
    job = board.request(0, "start")
    board.heard("ev", evaluator=True)
    assert board.take("gen", evaluator=False) is None
    assert board.take("ev", evaluator=True)[0] is job
    board.answer(_result(job.job_id, 0, actor="ev"))
    nxt = board.request(4, "periodic")
    clock.now += 0.25  # the evaluator went quiet: generating actors take over
    assert board.take("gen", evaluator=False)[0] is nxt


def test_result_record_places_the_result_at_its_version():
    board = EvalBoard(SETTINGS)
    job = board.request(25, "periodic")
    board.take("a0", False)
    board.answer(EvalResult("a0", job.job_id, 27, {"success": 0.75, "pass@4": 0.9}, ""))
    clock = {27: {"time": 1000.0, "elapsed_s": 40.0, "train_s": 38.0}}
    rec = result_record(board.take_results()[0], clock, current_version=31)
    assert rec["eval/version"] == 27 and rec["eval/requested_version"] == 25
    assert rec["eval/success"] == 0.75 and rec["eval/pass@4"] == 0.9
    assert rec["eval/train_s"] == 38.0 and rec["eval/time"] == 1000.0
    assert rec["version"] == 31 and rec["eval/actor"] == "a0" and rec["event"] == "eval"
    failed = board.request(30, "periodic")
    board.take("a0", False)
    board.answer(EvalResult("a0", failed.job_id, 30, {}, "out of memory"))
    rec = result_record(board.take_results()[0], clock, current_version=31)
    assert rec["eval/error"] == "out of memory" and "eval/success" not in rec
    assert board.counters["failed"] == 1


# ---------------------------------------------------------------- over real sockets


@pytest.fixture()
def network(request):
    """A real learner network thread (real sockets) with an EvalBoard."""
    from rapid_async.config import Config
    from rapid_async.learner.buffer import RolloutBuffer
    from rapid_async.learner.network import LearnerNetwork
    from rapid_async.learner.scheduler import WorkScheduler

    mode = request.param
    cfg = Config()
    cfg.run.mode = mode
    scheduler = WorkScheduler(mode, batch_groups=4, capacity=8, max_staleness=1,
                              actor_timeout=30.0)
    board = EvalBoard(SETTINGS, timeout_s=30.0)
    net = LearnerNetwork(cfg, RolloutBuffer(max_staleness=1), scheduler,
                         {"config": cfg.to_dict()}, evals=board)
    net.set_published(0)
    net.start()
    yield net, scheduler, board
    net.shutdown()


def _actor(net, name):
    from rapid_async.wire.transport import ActorSockets

    sockets = ActorSockets(net.sockets.control_endpoint, name)
    sockets.hello(1, "none", timeout_ms=5000)
    return sockets


def _eval_task(sockets):
    from rapid_async.wire.protocol import EvalTask

    msg = sockets.recv_control(timeout_ms=0)
    return msg if isinstance(msg, EvalTask) else None


@pytest.mark.parametrize("network", ["rapid-async"], indirect=True)
def test_async_mode_hands_out_an_evaluation_before_generation_work(network):
    net, scheduler, board = network
    job = board.request(0, "start")
    a0 = _actor(net, "a0")
    try:
        grant = a0.request_work(4, timeout_ms=5000)
        task = _eval_task(a0)
        assert task is not None and task.job_id == job.job_id and task.kind == "start"
        assert task.problems == 20 and grant.prompt_indices == [], "evaluation first"
        grant = a0.request_work(4, timeout_ms=5000)
        assert grant.prompt_indices == [0, 1, 2, 3] and _eval_task(a0) is None
        a0.send_eval_result(_result(job.job_id, 0))
        deadline = time.monotonic() + 5
        while board.status(job) != "answered":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert net.counters["evals/handed_out"] == 1
    finally:
        a0.close()


@pytest.mark.parametrize("network", ["rapid-sync"], indirect=True)
def test_sync_mode_hands_out_an_evaluation_after_the_rounds_work(network):
    net, scheduler, board = network
    scheduler.open_round(0)
    board.request(0, "start")
    a0 = _actor(net, "a0")
    try:
        grant = a0.request_work(3, timeout_ms=5000)
        assert grant.prompt_indices == [0, 1, 2] and _eval_task(a0) is None
        grant = a0.request_work(3, timeout_ms=5000)
        assert grant.prompt_indices == [3] and _eval_task(a0) is None
        grant = a0.request_work(3, timeout_ms=5000)
        task = _eval_task(a0)
        assert grant.prompt_indices == [] and task is not None and task.min_version == 0
    finally:
        a0.close()


@pytest.mark.parametrize("network", ["rapid-async"], indirect=True)
def test_an_evaluation_of_an_actor_that_leaves_goes_to_the_next(network):
    net, scheduler, board = network
    job = board.request(3, "periodic")
    a0, a1 = _actor(net, "a0"), _actor(net, "a1")
    try:
        a0.request_work(4, timeout_ms=5000)
        assert _eval_task(a0).job_id == job.job_id
        a0.send_stats({"leaving": 1})  # what a dying actor's close() sends
        deadline = time.monotonic() + 5
        while board.status(job) != "waiting":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        a1.request_work(4, timeout_ms=5000)
        assert _eval_task(a1).job_id == job.job_id
    finally:
        a0.close()
        a1.close()


# ---------------------------------------------------------------- the training loop's side


def test_learner_evaluations_ask_record_and_give_up_clearly(tmp_path, monkeypatch):
    from rapid_async.config import load_config
    from rapid_async.learner import eval_loop
    from rapid_async.learner.evaluation import LearnerEvaluations, task_settings
    from rapid_async.metrics import MetricsWriter, read_metrics

    cfg = load_config(None, ["run.eval_every=10", "run.eval_size=20", "run.eval_samples=4",
                             "run.eval_timeout_s=5"])
    board = EvalBoard(task_settings(cfg))
    assert board.settings == {"problems": 20, "samples": 4, "temperature": 1.0,
                              "max_new_tokens": cfg.algo.max_new_tokens, "seed": 0}
    evals = LearnerEvaluations(cfg, board, MetricsWriter(tmp_path, "learner"), start_version=0)
    evals.start(time.time())
    for version in range(1, 13):
        evals.note_version(version, eval_s=0.0)
        evals.after_step(published_version=version - version % 2, version=version)
    jobs = [board.take("a0", False)[0] for _ in range(2)]
    assert [(j.kind, j.min_version) for j in jobs] == [("start", 0), ("periodic", 10)]
    assert board.take("a0", False) is None, "one periodic job: v10 (published at step 10)"
    board.answer(_result(jobs[1].job_id, 11, success=0.75))
    evals.after_step(published_version=12, version=13)
    rec = [r for r in read_metrics(tmp_path) if r.get("event") == "eval"][0]
    assert rec["eval/version"] == 11 and rec["eval/success"] == 0.75 and rec["version"] == 13
    assert rec["eval/time"] == evals.version_clock[11]["time"], "placed at v11's time"
    # shut-down: the start job's actor left and no actor is connected
    assert board.release("a0", "the actor left") == [jobs[0].job_id]
    monkeypatch.setattr(eval_loop, "NO_ACTOR_GRACE_S", 0.1)
    final = evals.final_job(13)
    assert final.kind == "final" and evals.final_job(13) is final
    waited = evals.wait(final, 13, check=lambda: None, actors_connected=lambda: False)
    assert 0.1 <= waited < 2
    missing = [r for r in read_metrics(tmp_path) if r.get("event") == "eval_missing"]
    assert [(r["eval/kind"], r["reason"]) for r in missing] == [
        ("start", "no actor is connected"), ("final", "no actor is connected")]
    assert evals.results(final) == ({}, {})


# ---------------------------------------------------------------- results bound to their job (issue 16.4)


def test_a_result_is_bound_to_an_actor_that_took_the_job_and_to_its_versions():
    board = EvalBoard(SETTINGS)
    job = board.request(10, "periodic")
    assert board.take("a0", evaluator=False)[0] is job
    assert not board.answer(_result(job.job_id, 12, actor="a1"), newest_version=12), \
        "an actor that never took the job cannot answer it"
    assert not board.answer(_result(job.job_id, 9), newest_version=12), "below the job's version"
    assert not board.answer(_result(job.job_id, 13), newest_version=12), "never published"
    assert board.counters["refused_actor"] == 1 and board.counters["refused_version"] == 2
    # A wrong version from the job's actor: it is done with the job, so the job
    # goes out again (else the learner would wait for it until eval_timeout_s).
    assert board.status(job) == "waiting" and board.counters["reissued"] == 1
    assert board.take("a1", evaluator=False)[0] is job
    assert board.answer(_result(job.job_id, 12, actor="a1"), newest_version=12)
    assert [j.result.policy_version for j in board.take_results()] == [12]


def test_an_actors_metric_names_cannot_overwrite_the_records_fields():
    board = EvalBoard(SETTINGS)
    job = board.request(4, "final")
    board.take("a0", evaluator=False)
    forged = {"success": 0.5, "pass@4": 0.75, "version": 999.0, "kind": 1.0, "actor": 2.0,
              "requested_version": 0.0, "attempts": 0.0, "time": 0.0, "lag_s": 0.0, "x" * 60: 1.0}
    assert board.answer(EvalResult("a0", job.job_id, 4, forged, ""), newest_version=4)
    clock = {4: {"time": 100.0, "elapsed_s": 10.0, "train_s": 8.0}}
    rec = result_record(board.take_results()[0], clock, current_version=5)
    assert rec["eval/version"] == 4 and rec["eval/kind"] == "final" and rec["eval/actor"] == "a0"
    assert rec["eval/requested_version"] == 4 and rec["eval/attempts"] == 1
    assert rec["eval/time"] == 100.0 and rec["version"] == 5
    assert rec["eval/success"] == 0.5 and rec["eval/pass@4"] == 0.75
    assert rec["eval/dropped_metrics"] == 8 and "eval/" + "x" * 60 not in rec


@pytest.mark.parametrize("network", ["rapid-async"], indirect=True)
def test_over_sockets_another_actor_or_an_unpublished_version_cannot_answer(network):
    net, scheduler, board = network
    job = board.request(0, "start")
    a0, a1 = _actor(net, "a0"), _actor(net, "a1")
    try:
        a0.request_work(4, timeout_ms=5000)
        assert _eval_task(a0).job_id == job.job_id
        a1.send_eval_result(_result(job.job_id, 0, actor="a1"))  # a1's own connection, a0's job
        a0.send_eval_result(_result(job.job_id, 3))  # version 3 was never published (0 is)
        deadline = time.monotonic() + 10
        while net.counters["evals/refused"] < 2:
            assert time.monotonic() < deadline, dict(net.counters)
            time.sleep(0.01)
        assert board.counters["refused_actor"] == 1 and board.counters["refused_version"] == 1
        assert board.status(job) == "waiting", "a0 answered wrongly: the job goes out again"
        a0.request_work(4, timeout_ms=5000)
        assert _eval_task(a0).job_id == job.job_id
        a0.send_eval_result(_result(job.job_id, 0))
        while board.status(job) != "answered":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert net.counters["evals/refused"] == 2
    finally:
        a0.close()
        a1.close()
