"""Token in, token out: chat messages of an episode -> the token ids the model sees.

Used by the episode runner (`envs/runner.py`) in the actor and by the
learner's check of arriving prompts. The model's own turns are never
rendered or re-tokenized: the runner keeps the ids the engine sampled and
appends only the environment's new messages, rendered here as a suffix.

- The opening (`Renderer.opening`) is the chat template applied to the
  opening messages with the generation prompt (with `tools=` when the
  environment has tools), encoded without extra special tokens: for the
  usual [system,] user opening this is exactly `tasks.prompts.encode_prompt`,
  so single-turn prompts are the same tokens as without environments. In
  "plain" format it is the user text encoded as it is.
- An environment turn (`Renderer.env_turn`) is rendered by difference on a
  fixed stand-in conversation: A = template([user U, assistant M]) and
  B = template([user U, assistant M, *env messages], generation prompt). B
  must start with A (a template that rewrites earlier turns cannot be used
  token in, token out; ValueError says so); the env text is what the template
  writes after the assistant's content in A (its end-of-turn marker, minus
  the model's own last token when the model emitted it) followed by B minus A.
  In "plain" format the messages' contents are appended as they are.
"""

from __future__ import annotations

from typing import Any

from rapid_async.tasks.prompts import PromptSettings, check_chat_template

_USER = "\u2063rapid-user\u2063"
_MODEL = "\u2063rapid-model\u2063"
"""Stand-in contents of the conversation env turns are rendered against
(invisible separators, so no template mistakes them for markup)."""


class Renderer:
    """Renders an episode's messages as token ids for one tokenizer and format.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        settings: prompt format ("plain" or "chat").
        tools: JSON schemas of the environment's tools (chat format), or None.
    """

    def __init__(self, tokenizer: Any, settings: PromptSettings, tools: list[dict] | None = None):
        self.tokenizer = tokenizer
        self.settings = settings
        self.tools = tools or None
        self.chat = settings.prompt_format == "chat"
        if self.chat:
            check_chat_template(tokenizer)

    def _template(self, messages: list[dict], generation_prompt: bool) -> str:
        kwargs = {"tools": self.tools} if self.tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation_prompt,
                                                  **kwargs)

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def opening(self, messages: list[dict]) -> list[int]:
        """Token ids of the opening messages, ending with the generation prompt.

        Raises:
            ValueError: the opening renders to no tokens.
        """
        if self.chat:
            ids = self._encode(self._template(messages, True))
        else:
            ids = self._encode("".join(m["content"] for m in messages if m["role"] != "system"),
                               special=True)
        if not ids:
            raise ValueError(f"the episode's opening {messages!r:.120} encodes to no tokens")
        return ids

    def env_text(self, messages: list[dict], last_token: int | None) -> str:
        """The text appended after a model turn for the environment's `messages`.

        Args:
            messages: the environment's new messages.
            last_token: the model turn's last token id (its EOS, when it
                emitted one, is not written again), or None.

        Raises:
            ValueError: a chat template that does not render them as a suffix.
        """
        if not self.chat:
            return "".join(m["content"] for m in messages)
        base = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _MODEL}]
        before = self._template(base, False)
        after = self._template(base + list(messages), True)
        if not after.startswith(before) or _MODEL not in before:
            raise ValueError(
                "the chat template does not render environment messages as a suffix of the "
                "conversation (it rewrites earlier turns), so multi-turn episodes cannot keep "
                "the model's tokens; use a template that appends turns, or prompt_format plain")
        tail = before[before.rindex(_MODEL) + len(_MODEL):]  # e.g. "<|im_end|>\n"
        if last_token is not None:
            own = self.tokenizer.decode([last_token], skip_special_tokens=False)
            if own and tail.startswith(own):
                tail = tail[len(own):]
        return tail + after[len(before):]

    def env_turn(self, messages: list[dict], last_token: int | None) -> list[int]:
        """Token ids of the environment's `messages` after a model turn (see `env_text`)."""
        return self._encode(self.env_text(messages, last_token))
