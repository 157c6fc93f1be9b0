"""Tests for rapid_async.evaluate: pass@k, greedy success, per-problem records,
and `rapid-eval` against the learner's held-out evaluation."""

from __future__ import annotations

import json
import math

import pytest

from rapid_async.engines.base import Completion, GenerateRequest
from rapid_async.evaluate import (EvalSettings, evaluate, pass_at_k, run_evaluation,
                                  summary_line, write_records)
from rapid_async.tasks.arithmetic import ArithmeticTask
from rapid_async.tinymodel import build_tokenizer


class ScriptedEngine:
    """A stand-in engine (the evaluator is under test, not the engine).

    Answers a prompt correctly on sample j when `rule(prompt_text, j)` is true,
    otherwise answers "x"; records every request it receives.
    """

    def __init__(self, tokenizer, task, rule):
        self.tokenizer, self.rule = tokenizer, rule
        self.answers = {p.prompt: p.answer for p in task.heldout(task.heldout_size)}
        self.requests: list[GenerateRequest] = []

    def generate(self, request):
        self.requests.append(request)
        groups = []
        for prompt in request.prompts:
            text = self.tokenizer.decode(prompt, skip_special_tokens=True)
            group = []
            for j in range(request.n):
                answer = self.answers[text] if self.rule(text, j) else "x"
                ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
                ids.append(self.tokenizer.eos_token_id)
                group.append(Completion(ids, [-0.1] * len(ids)))
            groups.append(group)
        return groups


@pytest.fixture()
def setup():
    return build_tokenizer(), ArithmeticTask(heldout_size=100)


def test_pass_at_k_matches_hand_computed_values():
    # n = 5 samples, c = 2 correct:
    #   pass@1 = 1 - C(3,1)/C(5,1) = 1 - 3/5 = 0.4  (= c / n)
    #   pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    #   pass@3 = 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9
    #   pass@4 = 1 (only 3 wrong ones: any 4 contain a correct one)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-15)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-15)
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9, abs=1e-15)
    assert pass_at_k(5, 2, 4) == 1.0
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    # n = 200, c = 3, k = 100: 1 - (197! 100!) / (97! 200!) computed as a product
    expected = 1.0 - math.prod((100 - i) / (200 - i) for i in range(3))
    assert pass_at_k(200, 3, 100) == pytest.approx(expected, rel=1e-12)
    for bad in [(4, 1, 5), (4, 5, 1), (4, 1, 0)]:
        with pytest.raises(ValueError, match="1 <= k <= n"):
            pass_at_k(*bad)


def test_greedy_success_rate(setup):
    tokenizer, task = setup
    right = {p.prompt for p in task.heldout(100)[:37]}
    engine = ScriptedEngine(tokenizer, task, lambda text, j: text in right)
    assert evaluate(engine, tokenizer, task, n=100, batch_size=30) == pytest.approx(0.37)
    assert [len(r.prompts) for r in engine.requests] == [30, 30, 30, 10]
    assert all(r.temperature == 0.0 and r.n == 1 for r in engine.requests)


def test_sampled_pass_at_k_and_records(setup, tmp_path):
    tokenizer, task = setup
    problems = task.heldout(40)
    # first 10 problems: only sample 3 is right (c = 1 of 4); next 10: all 4 right; rest: none
    solved_once = {p.prompt for p in problems[:10]}
    solved_all = {p.prompt for p in problems[10:20]}
    engine = ScriptedEngine(tokenizer, task,
                            lambda text, j: text in solved_all or (text in solved_once and j == 3))
    settings = EvalSettings(problems=40, samples=4, temperature=1.0, seed=7, rows_per_call=64)
    report = run_evaluation(engine, tokenizer, task, settings)
    s = report.summary
    # per problem with c = 1 of n = 4: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2, pass@4 = 1
    assert s["pass@1"] == pytest.approx((10 * 0.25 + 10 * 1.0) / 40)
    assert s["pass@2"] == pytest.approx((10 * 0.5 + 10 * 1.0) / 40)
    assert s["pass@4"] == pytest.approx(20 / 40)
    assert s["sample_reward"] == pytest.approx((10 * 1 + 10 * 4) / (40 * 4))
    # greedy (sample index 0 in the script): right only on the all-right problems
    assert s["success"] == pytest.approx(10 / 40) and s["mean_reward"] == pytest.approx(10 / 40)
    assert s["problems"] == 40 and s["samples"] == 4
    # 64 rows per call / 4 samples = 16 problems per batch; greedy then sampled per batch
    assert [(len(r.prompts), r.n, r.temperature, r.seed) for r in engine.requests] == [
        (16, 1, 0.0, None), (16, 4, 1.0, 7), (16, 1, 0.0, None), (16, 4, 1.0, 23),
        (8, 1, 0.0, None), (8, 4, 1.0, 39)]
    rec = report.records[0]
    assert rec.prompt == problems[0].prompt and rec.answer == problems[0].answer
    wrong = tokenizer.decode(tokenizer("x", add_special_tokens=False)["input_ids"])
    assert rec.completions == [wrong, wrong, wrong, problems[0].answer]
    assert rec.rewards == [0.0, 0.0, 0.0, 1.0] and rec.correct == 1
    assert rec.greedy_completion == wrong and rec.greedy_reward == 0.0
    path = write_records(tmp_path / "out" / "eval.jsonl", report)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 40 and lines[0]["rewards"] == [0.0, 0.0, 0.0, 1.0]
    assert lines[10]["greedy_reward"] == 1.0 and lines[10]["prompt_id"] == problems[10].prompt_id
    assert summary_line(s).startswith("pass@1 0.312  pass@2 0.375  pass@4 0.500  greedy success")


def test_settings_refuse_what_cannot_be_evaluated():
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvalSettings(greedy=False, samples=0)
    with pytest.raises(ValueError, match="temperature"):
        EvalSettings(samples=4, temperature=0.0)
    with pytest.raises(ValueError, match="every k must be in 1..samples = 4"):
        EvalSettings(samples=4, ks=(8,))
    assert EvalSettings(samples=8).pass_ks() == [1, 2, 4, 8]
    assert EvalSettings(samples=6).pass_ks() == [1, 2, 4, 6]


def test_real_engine_greedy_is_deterministic_and_matches_evaluate(random_model_dir, one_thread):
    from transformers import AutoTokenizer

    from rapid_async.engines.hf import HFEngine

    engine = HFEngine(random_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(random_model_dir)
    task = ArithmeticTask()
    settings = EvalSettings(problems=30, samples=3, max_new_tokens=4, rows_per_call=32)
    first = run_evaluation(engine, tokenizer, task, settings)
    second = run_evaluation(engine, tokenizer, task, settings)
    assert [r.to_json() for r in first.records] == [r.to_json() for r in second.records]
    assert first.summary["success"] == evaluate(engine, tokenizer, task, n=30, max_new_tokens=4,
                                                batch_size=10)
    assert all(len(r.completions) == 3 and len(r.rewards) == 3 for r in first.records)


# ---------------------------------------------------------------- rapid-eval vs the learner


def _rapid_eval(tmp_path, model_dir, name: str, overrides: list[str]) -> tuple[dict, list[str]]:
    from conftest import REPO, cli, read_log

    out = tmp_path / f"{name}.jsonl"
    proc = cli("eval", "--model", str(model_dir), "--task", "arithmetic", "--n", "4",
               "--config", str(REPO / "configs" / "quickstart.toml"), "--out", str(out),
               *sum((["--set", o] for o in overrides), []), log=tmp_path / f"{name}.log")
    assert proc.wait(timeout=300) == 0, read_log(tmp_path / f"{name}.log")[-3000:]
    log = read_log(tmp_path / f"{name}.log")
    assert "pass@1" in log and "pass@4" in log and "greedy success" in log
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    return summary, out.read_text().splitlines()


def test_rapid_eval_gives_the_same_numbers_as_the_learners_held_out_evaluation(
        tmp_path, warm_model_dir):
    """A real learner and actor run with sampled held-out evaluation; then
    `rapid-eval` on the start model and on the final checkpoint must give the
    same greedy success and pass@k, completion for completion."""
    from conftest import REPO, cli, read_log, stop, wait_for_file

    from rapid_async.metrics import read_metrics

    run_dir = tmp_path / "run"
    common = ["run.eval_size=60", "run.eval_samples=4", "actor.chunk_groups=8"]
    overrides = common + [f"run.run_dir={run_dir}", "run.mode=rapid-sync", "run.max_steps=4",
                          "learner.batch_groups=8", "learner.minibatch_groups=4",
                          "run.eval_every=0"]
    learner = cli("learner", "--config", str(REPO / "configs" / "quickstart.toml"),
                  "--model-dir", str(warm_model_dir), *sum((["--set", o] for o in overrides), []),
                  log=tmp_path / "learner.log")
    actor = None
    try:
        info = wait_for_file(run_dir / "learner.json", learner)
        actor = cli("actor", "--learner", info["control"], "--actor-id", "a0",
                    log=tmp_path / "actor.log")
        assert learner.wait(timeout=300) == 0, read_log(tmp_path / "learner.log")[-3000:]
        actor.wait(timeout=60)
    finally:
        for proc in (learner, actor):
            if proc is not None:
                stop(proc)
    evals = {r["eval/kind"]: r for r in read_metrics(run_dir) if r.get("event") == "eval"}
    assert set(evals) == {"start", "final"}
    assert evals["start"]["eval/version"] == 0 and evals["final"]["eval/version"] == 4
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    for kind, model_dir in (("start", warm_model_dir), ("final", checkpoint)):
        summary, lines = _rapid_eval(tmp_path, model_dir, kind, common)
        learner_rec = evals[kind]
        for key in ("success", "pass@1", "pass@2", "pass@4", "mean_reward"):
            assert summary[key] == learner_rec[f"eval/{key}"], (kind, key)
        actor_records = next((run_dir / "evals").glob(f"{kind}-v*-a0.jsonl")).read_text()
        assert lines == actor_records.splitlines(), f"{kind}: the same completions"
    assert 0.1 < evals["start"]["eval/success"] < 0.5, "the warm model's habit: about 0.25"
