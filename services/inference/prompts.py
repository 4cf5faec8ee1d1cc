"""Prompt text and conversations → the base model's token ids, with its tokenizer and chat template.

A conversation is rendered with the tokenizer's chat template and `add_generation_prompt`, exactly as
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` tokenizes it, so a served chat
prompt is the one the model was tuned on; an adapter that ships its own template is rendered with
that one instead (`chat_templates.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.common.errors import InvalidArgument

MAX_MESSAGES = 1024


class ChatMessage(Protocol):
    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


class Prompter:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        # No token stands for more characters than its own vocabulary entry holds, so a text longer
        # than max_context x this cannot fit: it is refused before tokenising (megabytes of text
        # would otherwise hold the event loop for seconds, and their ids the memory).
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.max_token_chars = max((len(p) for p in pieces if isinstance(p, str)), default=1) or 1

    def check_fits(self, chars: int, max_tokens: int, field: str) -> None:
        """InvalidArgument when `chars` characters are more than `max_tokens` tokens can hold."""
        if chars > max_tokens * self.max_token_chars:
            raise InvalidArgument(
                field,
                f"{chars} characters cannot fit this worker's context of {max_tokens} tokens "
                f"(a token holds at most {self.max_token_chars} characters of this tokenizer)",
            )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def chat(
        self, messages: Sequence[ChatMessage], field: str = "messages", template: str | None = None
    ) -> list[int]:
        """The conversation's token ids, ready for the assistant's turn, under the tokenizer's chat
        template or `template` (an adapter's own); InvalidArgument naming the field when it is empty
        or the template refuses it (templates may raise on, say, two user turns in a row)."""
        if not messages:
            raise InvalidArgument(field, "a conversation needs at least one message")
        if len(messages) > MAX_MESSAGES:
            raise InvalidArgument(field, f"at most {MAX_MESSAGES} messages")
        for i, message in enumerate(messages):
            if not message.role:
                raise InvalidArgument(f"{field}[{i}].role", "must not be empty")
        if not self.has_chat_template and template is None:
            raise InvalidArgument(field, "this worker's tokenizer has no chat template: send text")
        turns = [{"role": m.role, "content": m.content} for m in messages]
        try:
            ids = self.tokenizer.apply_chat_template(
                turns, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # jinja's own errors, raised by the template's `raise_exception`
            raise InvalidArgument(field, f"the chat template refused the conversation: {exc}") from None
        return [int(i) for i in ids]
