"""The inference-engine interface that the actor process uses.

An engine turns prompts (token ids) into K sampled completions each, together
with the log-probability of every sampled token under the distribution it was
actually sampled from (temperature applied, no top-k / top-p). These are the
behaviour log-probs mu of DESIGN.md section 2.

Engines also take new weights in place (no restart). The actor's weight
receiver (`rapid_async.weights.receiver`) asks the engine for one flat buffer
that holds its weights (`weight_buffer`), writes verified changes into it and
then tells the engine once (`weights_updated`); `load_weights` takes the full
set of named tensors instead (evaluation, tests). Either way the weights are
exactly the learner's, cast to the inference dtype, so that the actor can
vouch for every bit it generates with.

Implementations: `hf.py` (transformers generate, CPU default) and `vllm.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Completion:
    """One sampled completion.

    Attributes:
        token_ids: sampled token ids, EOS included when the model emitted it.
        logprobs: log-prob of each sampled token under the sampling
            distribution (temperature applied); same length as token_ids.
        finish_reason: "stop" (EOS or a stop string emitted) or "length"
            (max_new_tokens hit).
        versions: with a request's `step_hook`: the label (policy version)
            the hook returned before the forward pass that sampled each token;
            same length as token_ids. None without a hook.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "stop"
    versions: list[int] | None = None


@dataclass
class GenerateRequest:
    """What to sample.

    Attributes:
        prompts: token ids of each prompt, no padding.
        n: completions per prompt (the group size K).
        temperature: sampling temperature (> 0).
        max_new_tokens: cap on completion length.
        seed: optional seed for reproducible sampling.
        stop: stop strings: a completion ends with the token that completes
            the first of them (that token is kept), finish_reason "stop".
        step_hook: in-flight weight updates (engines with
            `supports_step_hook`): called before every forward pass, between
            decode steps; it may change the engine's weights in place (the
            actor applies queued deltas there) and returns the label of the
            weights the next pass uses (the policy version), recorded per
            token in `Completion.versions`.
        recompute: after a step_hook changed the label, re-prefill prompt +
            generated tokens under the new weights instead of keeping the KV
            cache computed with the old ones (the default keeps it, as
            PipelineRL does; the log-probs are those of the distribution the
            token was sampled from either way).
        max_batch: continuous batching (hf engine): at most this many rows
            (prompt x sample) in flight; a finished row's slot takes the next
            waiting one (0: every row in one batch).
    """

    prompts: list[list[int]]
    n: int
    temperature: float = 1.0
    max_new_tokens: int = 16
    seed: int | None = None
    extra: dict = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    step_hook: Callable[[], int] | None = None
    recompute: bool = False
    max_batch: int = 0


def stop_window(stops: tuple[str, ...] | list[str]) -> int:
    """Tokens to decode at the end of a completion to see any stop string
    completed by its newest token (a token is at least one byte)."""
    return max(len(s.encode()) for s in stops) + 1


def stop_length(token_ids: list[int], decode: Callable[[list[int]], str],
                stops: tuple[str, ...] | list[str]) -> int | None:
    """Where a finished completion must be cut for its first stop string.

    Args:
        token_ids: the sampled tokens.
        decode: token ids -> text (the model's tokenizer).
        stops: stop strings.

    Returns:
        The smallest n such that token_ids[:n] contains a stop string (its
        last token completes it), or None when none occurs.
    """
    if not stops or not token_ids or not any(s in decode(token_ids) for s in stops):
        return None
    window = stop_window(stops)
    for n in range(1, len(token_ids) + 1):
        tail = decode(token_ids[max(0, n - window):n])
        if any(s in tail for s in stops):
            return n
    return None


class Engine(Protocol):
    """What the actor needs from an inference engine."""

    def generate(self, request: GenerateRequest) -> list[list[Completion]]:
        """Sample `request.n` completions for each prompt.

        Returns:
            One list of `n` completions per prompt, in prompt order.
        """
        ...

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Replace the model's weights in place with these tensors.

        Args:
            named_tensors: every parameter of the model (Hugging Face names,
                as in model.safetensors), already in the inference dtype.
        """
        ...

    def expected_tensors(self) -> tuple[dict[str, tuple[int, ...]], set[str], torch.dtype]:
        """(required name -> shape, optional names such as a tied lm_head, dtype)."""
        ...

    def weight_buffer(self, layout) -> torch.Tensor:
        """A flat buffer (a `rapid_async.weights.Layout`'s numel) the weights live in.

        Raises:
            ValueError: if the layout does not name exactly this model's tensors.
        """
        ...

    def weights_updated(self) -> None:
        """The buffer was written: take the new weights before the next generate."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...
