"""Prompt encoding: a problem's text -> the token ids the model sees.

One function, `encode_prompt`, used by every process that generates: the actor
(training rollouts, held-out evaluation work), the learner's evaluation and
`rapid-eval`. Keep them on this function so that training and evaluation
prompts are the same tokens.

Formats (`task.prompt_format`):
- "plain": the problem text encoded as it is, with the tokenizer's usual
  special tokens (e.g. the tiny model's <bos>).
- "chat": the tokenizer's own chat template (`apply_chat_template`), with an
  optional system message and the problem as the user message, ending with
  the assistant's generation prompt. The rendered text already holds the
  template's special tokens, so it is encoded without adding more.

`PromptSettings.from_config(cfg, task)` collects the format, the system prompt
(the run's `task.system_prompt`, else the task's own `system_prompt`) and the
stop strings (the task's `stop_strings` plus the run's `task.stop`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROMPT_FORMATS = ("plain", "chat")


@dataclass(frozen=True)
class PromptSettings:
    """How prompts are written and where completions stop.

    Attributes:
        prompt_format: "plain" or "chat".
        system_prompt: system message for "chat" ("" for none).
        stop: stop strings; generation ends after the first one (EOS always stops).
    """

    prompt_format: str = "plain"
    system_prompt: str = ""
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"task.prompt_format = {self.prompt_format!r} is not one of "
                             f"{', '.join(PROMPT_FORMATS)}")

    @classmethod
    def from_config(cls, cfg: Any, task: Any) -> PromptSettings:
        """The settings of a run config (`cfg.task`) for `task`."""
        system = cfg.task.system_prompt or getattr(task, "system_prompt", "") or ""
        stop = list(getattr(task, "stop_strings", ()) or ()) + list(cfg.task.stop)
        return cls(cfg.task.prompt_format, system, tuple(dict.fromkeys(s for s in stop if s)))


def check_chat_template(tokenizer: Any, where: str = "the model") -> None:
    """Raise ValueError when `tokenizer` has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"task.prompt_format = 'chat' but {where}'s tokenizer has no chat "
                         "template (tokenizer_config.json 'chat_template'); use "
                         "task.prompt_format = 'plain' or a model that has one")


def render_prompt(tokenizer: Any, text: str, settings: PromptSettings) -> str:
    """The prompt as text, before tokenization (the chat template applied in "chat")."""
    if settings.prompt_format == "plain":
        return text
    check_chat_template(tokenizer)
    messages = [{"role": "user", "content": text}]
    if settings.system_prompt:
        messages.insert(0, {"role": "system", "content": settings.system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, text: str, settings: PromptSettings) -> list[int]:
    """Token ids of one prompt in the given format.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        text: the problem's prompt text (`Problem.prompt`).
        settings: format, system prompt (stop strings are not used here).

    Returns:
        Non-empty list of token ids.

    Raises:
        ValueError: "chat" without a chat template, or a prompt with no tokens.
    """
    rendered = render_prompt(tokenizer, text, settings)
    special = settings.prompt_format == "plain"
    ids = list(tokenizer(rendered, add_special_tokens=special)["input_ids"])
    if not ids:
        raise ValueError(f"prompt {text[:60]!r} encodes to no tokens")
    return ids


def decode_completion(tokenizer: Any, token_ids: list[int]) -> str:
    """A completion's text for the verifier (special tokens such as EOS dropped)."""
    return tokenizer.decode(token_ids, skip_special_tokens=True)
