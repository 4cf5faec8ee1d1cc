"""Each token's own bytes, as the OpenAI API reports them beside a logprob.

A token of a byte-level BPE may hold part of a UTF-8 character, so decoding it alone would give a
replacement character: its bytes are read back from the vocabulary's byte-to-character table instead.
SentencePiece byte-fallback pieces (`<0xE2>`) are their byte; anything else is its decoded text.
"""

from __future__ import annotations

import functools
import re
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte → printable character table (the one byte-level BPE stores tokens in), inverted."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table: dict[int, str] = bytes_to_unicode()  # type: ignore[no-untyped-call]
    return {char: byte for byte, char in table.items()}


class TokenBytes:
    """`tokenizer` → bytes of any token id, cached (a vocabulary is at most a few hundred thousand)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_ids: list[int]) -> list[bytes]:
        cache = self._cache
        out = []
        for token_id in token_ids:
            found = cache.get(token_id)
            if found is None:
                found = cache[token_id] = self._bytes_of(token_id)
            out.append(found)
        return out

    def _bytes_of(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self.byte_level:
                table = _byte_of_char()
                if all(c in table for c in piece):
                    return bytes(table[c] for c in piece)
            if match := _BYTE_PIECE.fullmatch(piece):
                return bytes([int(match.group(1), 16)])
        return str(self.tokenizer.decode([token_id])).encode()
