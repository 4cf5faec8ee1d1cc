"""Incremental detokenization and stop strings, on the tiny byte-level BPE tokenizer."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from services.inference.engine.detokenizer import IncrementalDetokenizer

TEXT = "Hello world, the café serves naïve 東京 tokens 😀 to über-fast workers!"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def stream(
    tokenizer: Any, prompt: list[int], output: list[int], stop: tuple[str, ...] = ()
) -> tuple[str, bool]:
    detok = IncrementalDetokenizer(tokenizer, prompt, stop)
    pieces = [detok.add(t) for t in output]
    if not detok.stopped:
        pieces.append(detok.flush())
    assert "".join(pieces) == detok.text, "streamed pieces are exactly the final text"
    return detok.text, detok.stopped


@pytest.mark.parametrize("split", [0, 1, 5, 12])
def test_streamed_text_equals_the_full_decode(tokenizer: Any, split: int) -> None:
    ids = tokenizer.encode(TEXT)
    text, stopped = stream(tokenizer, ids[:split], ids[split:])
    assert text == tokenizer.decode(ids[split:]) and not stopped


def test_random_byte_tokens_decode_like_the_tokenizer(tokenizer: Any) -> None:
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(3, tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        assert stream(tokenizer, [], ids)[0] == tokenizer.decode(ids)


def test_multibyte_characters_are_never_split(tokenizer: Any) -> None:
    ids = tokenizer.encode("😀東京😀")
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) == "😀東京😀"


@pytest.mark.parametrize("stop", ["café", "東", "o w", "😀", "!", "serves naïve"])
def test_stop_string_cuts_the_text_exactly(tokenizer: Any, stop: str) -> None:
    ids = tokenizer.encode(TEXT)
    text, stopped = stream(tokenizer, [], ids, (stop,))
    assert stopped and text == TEXT[: TEXT.index(stop)]


def test_the_earliest_of_several_stop_strings_wins(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT)
    text, stopped = stream(tokenizer, [], ids, ("workers", "naïve", "absent"))
    assert stopped and text == TEXT[: TEXT.index("naïve")]


def test_a_partial_match_is_released_when_the_text_moves_on(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT)
    text, stopped = stream(tokenizer, [], ids, ("café au lait", ""))
    assert not stopped and text == TEXT


def test_nothing_is_added_after_a_stop(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT)
    detok = IncrementalDetokenizer(tokenizer, [], ("world",))
    for t in ids:
        detok.add(t)
    assert detok.stopped and detok.text == "Hello " and detok.add(ids[0]) == "" and detok.flush() == ""


def reference_held_back(text: str, stops: tuple[str, ...]) -> int:
    """The definition: the longest tail of `text` that is a proper prefix of a stop string."""
    return max(
        (n for s in stops for n in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:n])),
        default=0,
    )


def test_the_held_back_tail_matches_its_definition_on_random_texts(tokenizer: Any) -> None:
    """Repetitive alphabets, so tails and prefixes overlap in every way (the fast search tries only
    tails starting with a stop string's first character)."""
    rng = random.Random(11)
    for _ in range(2_000):
        alphabet = rng.choice(["ab", "abc", "aab "])
        stops = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 4))
        )
        detok = IncrementalDetokenizer(tokenizer, [1], stops)
        detok.text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        assert detok._held_back() == reference_held_back(detok.text, stops), (detok.text, stops)
