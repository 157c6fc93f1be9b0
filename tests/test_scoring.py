"""Scorer: a verifier that raises or returns NaN costs one reward, not the actor."""

from __future__ import annotations

import logging
import math

import pytest

from rapid_async.tasks.base import Problem
from rapid_async.tasks.scoring import Scorer


class Moody:
    """A verifier with every kind of failure, chosen by the completion text."""

    name = "moody"

    def reward(self, problem, text):
        if text == "raise":
            raise RuntimeError("boom")
        return {"nan": math.nan, "inf": -math.inf, "str": "1", "none": None,
                "neg": -1.0, "big": 1e6, "int": 1}.get(text, 0.5)


P = Problem("p42", "q", "a")


def test_failures_get_the_failure_value_are_counted_and_logged(caplog):
    scorer = Scorer(Moody(), failure_reward=-0.5)
    with caplog.at_level(logging.WARNING, logger="rapid.tasks"):
        got = [scorer.score(P, t) for t in ["raise", "nan", "inf", "str", "none"]]
    assert got == [-0.5] * 5
    assert scorer.failures == {"exception": 1, "non_finite": 2, "non_numeric": 2}
    assert all("p42" in r.getMessage() for r in caplog.records) and len(caplog.records) == 5
    assert "RuntimeError: boom" in caplog.records[0].getMessage()


def test_any_finite_float_is_a_reward():
    scorer = Scorer(Moody())
    assert [scorer.score(P, t) for t in ["neg", "big", "int", "ok"]] == [-1.0, 1e6, 1.0, 0.5]
    assert not scorer.failures


def test_score_many_uses_score_batch_and_falls_back_when_it_fails():
    class Batched(Moody):
        calls = 0

        def score_batch(self, problems, texts):
            Batched.calls += 1
            if "raise" in texts:
                raise OSError("pool broke")
            return [0.25 if t == "ok" else math.nan for t in texts]

    scorer = Scorer(Batched())
    assert scorer.score_many([P, P], ["ok", "x"]) == [0.25, 0.0]
    assert scorer.failures["non_finite"] == 1
    assert scorer.score_many([P, P], ["raise", "neg"]) == [0.0, -1.0]
    assert scorer.failures["batch_exception"] == 1 and Batched.calls == 2


def test_failure_value_must_be_finite():
    with pytest.raises(ValueError, match="failure_reward"):
        Scorer(Moody(), failure_reward=math.nan)
