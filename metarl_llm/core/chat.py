"""Chat-formatted token streams: the prompt rendered through the tokenizer's chat template, and
the environment's replies as new user turns (docs/design.md section 5).

Token in, token out still holds. The prompt's tokens are the tokenisation of the rendered
prompt (with the generation prompt), and those tokens are the ones trained on. The policy's
sampled tokens are never re-encoded. An environment reply becomes the tokens of what the
template adds after the stream so far: the conversation is rendered again with the reply as a
user turn and the generation prompt, and the stream's text must be a prefix of that render.
Only the new suffix is tokenised and appended. A template that rewrites an earlier part is
refused with an error naming it (Qwen3's, for example, drops the ``<think>`` block of every
assistant turn before the last user turn), because then the stream the policy saw and the
conversation the template describes differ.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChatState:
    """One trial's conversation: the messages so far and where the open assistant turn's tokens begin
    in the stream (everything the policy and the engine put there since the last user turn)."""

    messages: list[dict]
    turn_start: int


class TemplateError(ValueError):
    """The chat template cannot extend the token stream (or there is none)."""


@dataclass
class ChatFormat:
    """Renders a trial's conversation through ``tokenizer``'s chat template.

    ``system_prompt``: an optional system turn before the problem. ``name``: how errors name
    the template (the model's name or path).
    """

    tokenizer: object
    system_prompt: str | None = None
    name: str = "the tokenizer"

    def __post_init__(self):
        if not getattr(self.tokenizer, "chat_template", None):
            raise TemplateError(
                f"{self.name} has no chat template (tokenizer_config.json's chat_template); "
                "turn chat formatting off for a base model"
            )

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def start(self, prompt: str) -> tuple[list[dict], list[int]]:
        """(the conversation so far, the prompt's token ids): the system turn (if any) and the problem
        as the user turn, rendered with the generation prompt (the assistant turn is open)."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return messages, self.encode(self.render(messages, True))

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text: the template's special-token strings become their ids; no BOS/EOS is added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def reply(
        self, messages: list[dict], stream_text: str, assistant_text: str, observation: str
    ) -> tuple[list[dict], list[int]]:
        """The environment's ``observation`` after the assistant turn ``assistant_text`` as a user
        turn. ``stream_text``: the decoded token stream so far (prompt render and everything the
        policy wrote, its end-of-turn token included). Returns the conversation with both turns
        and the observation's token ids: what the template renders after ``stream_text``, the
        generation prompt of the next assistant turn included.

        Raises :class:`TemplateError` when the render does not begin with ``stream_text``."""
        messages = [*messages, {"role": "assistant", "content": assistant_text}, {"role": "user", "content": observation}]
        rendered = self.render(messages, True)
        if not rendered.startswith(stream_text):
            at = next((k for k, (a, b) in enumerate(zip(rendered, stream_text)) if a != b), min(len(rendered), len(stream_text)))
            raise TemplateError(
                f"the chat template of {self.name} does not extend the token stream: rendered with the environment's "
                f"reply as a user turn, the conversation differs from the tokens the policy saw at character {at} "
                f"(stream {stream_text[max(0, at - 30) : at + 30]!r}, template {rendered[max(0, at - 30) : at + 30]!r}). "
                "Templates that drop or rewrite earlier turns (some drop earlier <think> blocks) cannot carry "
                "feedback as chat turns: use a template that keeps earlier turns verbatim, or feedback as plain "
                "text in the assistant turn"
            )
        return messages, self.encode(rendered[len(stream_text) :])
