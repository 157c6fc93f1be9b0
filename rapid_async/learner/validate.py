"""Checks of an arriving rollout group against the grant and the model, in the learner process.

The wire protocol (`rapid_async.wire.protocol`) only checks that a group is
well formed. Before a group enters the buffer, the learner's network thread
also checks that the model can train on it and that it answers the work that
was granted, so that no single group an actor sends can crash or poison the
learner. A refused group is counted by reason and logged; its prompt is
handed out again (see `LearnerNetwork`).

Reasons (metric `rollouts/rejected_<reason>`):

    group_size           K differs from algo.group_size
    prompt_empty         no prompt tokens
    prompt_mismatch      the prompt is not the task's prompt for the granted index
    token_range          a prompt or completion token id is outside the vocabulary
    completion_empty     a completion has no tokens (the loss needs at least one;
                         real engines always return one: EOS is included)
    completion_too_long  more than algo.max_new_tokens tokens (padded width too)
    version_future       policy_version (or a token's, with version_runs) newer than
                         any published weights
    version_below_grant  policy_version older than the grant's minimum version
    logprob_range        a behaviour log-prob below MIN_BEHAVIOUR_LOGPROB
    reward_range         a reward outside [-MAX_ABS_REWARD, MAX_ABS_REWARD]
"""

from __future__ import annotations

from typing import Any, Callable

MIN_BEHAVIOUR_LOGPROB = -50.0
"""Lowest behaviour log-prob (nats) accepted for a sampled token. A token is
sampled with its own probability, so an honest engine reports a value below
this for any given token with probability at most V * e^-50 (about 3e-17 for a
151,936-token vocabulary): never, in practice. Lower values are a bug or an
attack; they make the importance ratio exp(log pi - log mu) overflow in float32
(at about 88 nats) and turn the loss into NaN. Here exp(50) = 5e21 stays finite."""

MAX_ABS_REWARD = 1e6
"""Largest |reward| accepted. Rewards may be any finite float (task scales
differ), but a reward of 1e30 makes every advantage in its group overflow in
the loss; no task here comes within orders of magnitude of this bound."""


class GroupValidator:
    """Decides whether the learner may train on a rollout group.

    Args:
        group_size: K, completions per prompt (algo.group_size).
        vocab_size: rows of the model's input embedding; token ids must be below it.
        max_new_tokens: cap on completion length (algo.max_new_tokens; with an
            [env], the episode cap `config.episode_token_cap`: model and env
            tokens of all turns together).
        expected_prompt: prompt index -> the prompt token ids the actor was
            meant to use (None: not checkable, only the length is bounded).
        max_prompt_tokens: bound on the prompt length when it is not checkable.
    """

    def __init__(self, group_size: int, vocab_size: int, max_new_tokens: int,
                 expected_prompt: Callable[[int], list[int]] | None = None,
                 max_prompt_tokens: int = 32768):
        self.group_size = group_size
        self.vocab_size = vocab_size
        self.max_new_tokens = max_new_tokens
        self.expected_prompt = expected_prompt
        self.max_prompt_tokens = max_prompt_tokens

    def check(self, group: Any, index: int, min_version: int,
              published_version: int) -> tuple[str, str] | None:
        """None if `group` may enter the buffer, else (reason, explanation).

        Args:
            group: a decoded `RolloutGroup`.
            index: the prompt index it answers (from its prompt_id).
            min_version: the grant's minimum policy version.
            published_version: the newest version actors can hold.
        """
        for check in (self._shape, self._prompt, self._tokens, self._lengths, self._logprobs,
                      self._rewards):
            problem = check(group, index)
            if problem is not None:
                return problem
        return self._version(group, min_version, published_version)

    def _shape(self, group: Any, index: int) -> tuple[str, str] | None:
        k, t = group.completion_ids.shape
        if k != self.group_size:
            return "group_size", f"{k} completions, expected K = {self.group_size}"
        if t > self.max_new_tokens:
            return ("completion_too_long",
                    f"completions padded to {t} tokens > the cap of {self.max_new_tokens} "
                    "(algo.max_new_tokens; env.max_episode_tokens with an [env])")
        return None

    def _prompt(self, group: Any, index: int) -> tuple[str, str] | None:
        n = group.prompt_ids.numel()
        if n == 0:
            return "prompt_empty", "the prompt has no tokens"
        if self.expected_prompt is None:
            if n > self.max_prompt_tokens:
                return "prompt_mismatch", f"prompt of {n} tokens > {self.max_prompt_tokens}"
            return None
        expected = self.expected_prompt(index)
        if group.prompt_ids.tolist() != list(expected):
            return ("prompt_mismatch",
                    f"prompt ({n} tokens) is not the task's prompt {index} ({len(expected)} tokens)")
        return None

    def _tokens(self, group: Any, index: int) -> tuple[str, str] | None:
        for name in ("prompt_ids", "completion_ids"):
            ids = getattr(group, name)
            if ids.numel() and int(ids.max()) >= self.vocab_size:
                return ("token_range",
                        f"{name} holds token id {int(ids.max())} >= vocabulary size {self.vocab_size}")
        return None

    def _lengths(self, group: Any, index: int) -> tuple[str, str] | None:
        lengths = group.completion_lengths
        if int(lengths.min()) < 1:
            return "completion_empty", f"completion lengths {lengths.tolist()} include 0"
        if int(lengths.max()) > self.max_new_tokens:
            return ("completion_too_long",
                    f"completion of {int(lengths.max())} tokens > the cap of "
                    f"{self.max_new_tokens} (algo.max_new_tokens; env.max_episode_tokens "
                    "with an [env])")
        return None

    def _logprobs(self, group: Any, index: int) -> tuple[str, str] | None:
        lowest = float(group.logprobs.min()) if group.logprobs.numel() else 0.0
        if lowest < MIN_BEHAVIOUR_LOGPROB:
            return ("logprob_range",
                    f"behaviour log-prob {lowest:.4g} < {MIN_BEHAVIOUR_LOGPROB} (no honest sample)")
        return None

    def _rewards(self, group: Any, index: int) -> tuple[str, str] | None:
        largest = float(group.rewards.abs().max()) if group.rewards.numel() else 0.0
        if largest > MAX_ABS_REWARD:
            return "reward_range", f"reward of magnitude {largest:.4g} > {MAX_ABS_REWARD:g}"
        return None

    def _version(self, group: Any, min_version: int, published: int) -> tuple[str, str] | None:
        v = group.policy_version
        newest = group.newest_version() if hasattr(group, "newest_version") else v
        if newest > published:
            return ("version_future",
                    f"a token of policy_version {newest} is newer than the published "
                    f"version {published}")
        if v > published:
            return ("version_future",
                    f"policy_version {v} is newer than the published version {published}")
        if v < min_version:
            return ("version_below_grant",
                    f"policy_version {v} is older than the grant's minimum {min_version}")
        return None


def prompt_index(prompt_id: str) -> int | None:
    """The training-stream index in a group's prompt_id ("17"), or None."""
    if not (0 < len(prompt_id) <= 18 and prompt_id.isascii() and prompt_id.isdigit()):
        return None
    return int(prompt_id)
