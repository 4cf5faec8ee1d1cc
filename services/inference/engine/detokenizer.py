"""Token ids → text, incrementally, with stop strings that cut the text exactly.

Decoding only a short window of recent tokens keeps each step O(1) in the output length; a window
that ends inside a multi-byte character (decoded as U+FFFD) is held back until the next token
completes it. Text that could still turn out to be the start of a stop string is held back too, so
the streamed text never has to be taken back: it is exactly the final text, cut before the stop string.
"""

from __future__ import annotations

from typing import Any

# Tokens decoded ahead of the unread ones so that tokenizers that merge spaces or bytes across token
# boundaries (byte-level BPE, SentencePiece) render the new tokens as they would in the full text.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        # Fast tokenizers: decode in Rust without transformers' per-call Python overhead (a sixth of
        # a tiny model's step time otherwise).
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._backend = None  # that clean-up is done in Python by `decode`
        self.stop = tuple(s for s in stop if s)
        self._ids = list(prompt_token_ids)
        self._prefix_offset = max(len(self._ids) - _CONTEXT_TOKENS, 0)
        self._read_offset = len(self._ids)
        self.text = ""
        """Output text decoded so far, including text still held back."""
        self._emitted = 0
        self.stopped = False
        """True once a stop string was found; `text` then ends right before it."""

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return str(self._backend.decode(ids, skip_special_tokens=True))
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token_id: int) -> str:
        """Take the next output token; return the text that is now final (maybe empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        return self._render()

    def add_many(self, token_ids: list[int]) -> str:
        """Take several output tokens at once (two decodes, not two per token). Without stop strings
        only: a stop string must be found at its token, so that the tokens after it are neither sent
        nor billed; with stop strings, call `add` per token."""
        if self.stop:
            raise ValueError("add_many cannot place a stop string at its token: call add per token")
        if not token_ids:
            return ""
        self._ids += token_ids
        return self._render()

    def _render(self) -> str:
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The request ended for another reason: release whatever was held back."""
        if not self.stopped and self._read_offset < len(self._ids):
            # Tokens still waiting to complete a character: render them as the full decode would.
            before = self._decode(self._ids[self._prefix_offset : self._read_offset])
            after = self._decode(self._ids[self._prefix_offset :])
            self.text += after[len(before) :]
            self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stop and not self.stopped:
            # A stop string may straddle the text already emitted and the new text.
            search_from = max(self._emitted - max(len(s) for s in self.stop) + 1, 0)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self.text) if final else len(self.text) - self._held_back()
        released = self.text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return released

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string.

        Only tails starting with the stop string's first character are tried, longest first, each
        with one C-level `startswith`: trying every length with a fresh slice cost 16 stop strings of
        256 characters about a millisecond per token, halving other streams' speed."""
        text = self.text
        longest = 0
        for s in self.stop:
            start = len(text) - min(len(s) - 1, len(text))
            j = text.find(s[0], start)
            while j != -1 and len(text) - j > longest:
                if s.startswith(text[j:]):
                    longest = len(text) - j
                    break
                j = text.find(s[0], j + 1)
        return longest
