"""Tests of rapid_async.learner.validate: what the learner refuses to train on, and why."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from rapid_async.learner.validate import MAX_ABS_REWARD, MIN_BEHAVIOUR_LOGPROB, GroupValidator
from rapid_async.wire.protocol import RolloutGroup

PROMPTS = {3: [1, 7, 8], 4: [1, 9]}


def _validator(**kwargs) -> GroupValidator:
    return GroupValidator(group_size=2, vocab_size=32, max_new_tokens=4,
                          expected_prompt=lambda i: PROMPTS[i], **kwargs)


def _group(**overrides) -> RolloutGroup:
    fields = dict(actor_id="a", prompt_id="3", policy_version=2,
                  prompt_ids=torch.tensor([1, 7, 8], dtype=torch.int32),
                  completion_ids=torch.tensor([[5, 2, 0], [31, 6, 2]], dtype=torch.int32),
                  completion_lengths=torch.tensor([2, 3], dtype=torch.int32),
                  logprobs=torch.tensor([[-1.0, -0.5, 0.0], [-3.0, -0.1, -0.2]]),
                  rewards=torch.tensor([1.0, -0.5]), finish_reasons=["stop", "stop"],
                  gen_seconds=0.1, created_at=time.time(), info={}, grant_id=9)
    fields.update(overrides)
    return RolloutGroup(**fields)


def _reason(group: RolloutGroup, index: int = 3, min_version: int = 1, published: int = 5):
    problem = _validator().check(group, index, min_version, published)
    return None if problem is None else problem[0]


def test_a_good_group_passes_at_every_bound():
    assert _reason(_group()) is None
    at_bounds = _group(logprobs=torch.tensor([[MIN_BEHAVIOUR_LOGPROB, -0.5, 0.0],
                                              [-3.0, -0.1, -0.2]]),
                       rewards=torch.tensor([MAX_ABS_REWARD, -MAX_ABS_REWARD]), policy_version=5)
    assert _reason(at_bounds) is None
    assert _reason(_group(policy_version=1)) is None  # the grant's minimum itself


@pytest.mark.parametrize("overrides, reason", [
    (dict(completion_ids=torch.tensor([[5], [6], [7]], dtype=torch.int32),
          completion_lengths=torch.tensor([1, 1, 1], dtype=torch.int32),
          logprobs=torch.full((3, 1), -0.5), rewards=torch.zeros(3),
          finish_reasons=["stop"] * 3), "group_size"),
    (dict(prompt_ids=torch.zeros(0, dtype=torch.int32)), "prompt_empty"),
    (dict(prompt_ids=torch.tensor([1, 9], dtype=torch.int32)), "prompt_mismatch"),  # prompt 4's
    (dict(completion_ids=torch.tensor([[5, 2, 0], [32, 6, 2]], dtype=torch.int32)), "token_range"),
    (dict(completion_lengths=torch.tensor([0, 3], dtype=torch.int32),
          completion_ids=torch.tensor([[0, 0, 0], [31, 6, 2]], dtype=torch.int32),
          logprobs=torch.tensor([[0.0, 0.0, 0.0], [-3.0, -0.1, -0.2]])), "completion_empty"),
    (dict(completion_ids=torch.full((2, 5), 3, dtype=torch.int32),
          completion_lengths=torch.tensor([5, 5], dtype=torch.int32),
          logprobs=torch.full((2, 5), -0.5)), "completion_too_long"),
    (dict(logprobs=torch.tensor([[-50.01, -0.5, 0.0], [-3.0, -0.1, -0.2]])), "logprob_range"),
    (dict(rewards=torch.tensor([1.0, -1e30])), "reward_range"),
    (dict(policy_version=6), "version_future"),
    (dict(policy_version=0), "version_below_grant"),
])
def test_each_refusal_names_its_reason(overrides, reason):
    assert _reason(_group(**overrides)) == reason


def test_prompt_ids_beyond_the_vocabulary_are_refused_when_the_prompt_is_not_checkable():
    unchecked = GroupValidator(group_size=2, vocab_size=32, max_new_tokens=4,
                               max_prompt_tokens=8)
    assert unchecked.check(_group(), 3, 0, 5) is None
    bad_token = _group(prompt_ids=torch.tensor([1, 40], dtype=torch.int32))
    assert unchecked.check(bad_token, 3, 0, 5)[0] == "token_range"
    too_long = _group(prompt_ids=torch.ones(9, dtype=torch.int32))
    assert unchecked.check(too_long, 3, 0, 5)[0] == "prompt_mismatch"


def test_the_explanation_says_what_was_wrong():
    reason, text = _validator().check(_group(policy_version=2**63 - 1), 3, 0, 5)
    assert reason == "version_future" and "newer than the published version 5" in text
    group = dataclasses.replace(_group(), completion_ids=torch.tensor([[5, 2, 0], [99, 6, 2]],
                                                                      dtype=torch.int32))
    assert "99 >= vocabulary size 32" in _validator().check(group, 3, 0, 5)[1]


def test_a_token_newer_than_the_published_version_is_refused():
    """In-flight updates: the oldest token (policy_version 2) is fine, but a
    token claiming version 6 > published 5 cannot have been generated."""
    runs = lambda newest: torch.tensor([[0, 2, 1], [0, newest, 1], [1, 2, 3]], dtype=torch.int64)
    assert _reason(_group(version_runs=runs(5))) is None
    reason, text = _validator().check(_group(version_runs=runs(6)), 3, 1, 5)
    assert reason == "version_future" and "a token of policy_version 6" in text
