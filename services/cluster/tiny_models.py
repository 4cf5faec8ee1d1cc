"""Tiny random causal LMs with a byte-level BPE tokenizer, built offline in seconds.

Tests, the CI demo and benchmarks need a real `transformers` model folder without downloading one:
`build_tiny_model` writes `config.json`, `model.safetensors` and a tokenizer trained in code on a
seeded corpus, all deterministic for a given family and seed. Families cover the architectures the
engine promises to serve: Llama, Qwen2 (with per-layer sliding window) and Mistral (global window).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

Family = Literal["llama", "qwen2", "mistral"]
FAMILIES: tuple[Family, ...] = ("llama", "qwen2", "mistral")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_WORDS = [
    "the",
    "a",
    "an",
    "adapter",
    "model",
    "token",
    "batch",
    "serve",
    "request",
    "stream",
    "worker",
    "gateway",
    "store",
    "ledger",
    "reward",
    "contributor",
    "data",
    "train",
    "merge",
    "rank",
    "slot",
    "cache",
    "memory",
    "fast",
    "slow",
    "cold",
    "warm",
    "block",
    "prefix",
    "decode",
    "prefill",
    "attention",
    "layer",
    "weight",
    "delta",
    "sum",
    "of",
    "and",
    "to",
    "in",
    "on",
    "for",
    "with",
    "by",
    "from",
    "is",
    "are",
    "was",
    "be",
    "it",
    "this",
    "that",
    "we",
    "you",
    "they",
    "one",
    "two",
    "three",
    "many",
    "few",
    "every",
    "hello",
    "world",
    "café",
    "naïve",
    "über",
    "東京",
    "😀",
]


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(4, 16)
        sentence = " ".join(rng.choice(_WORDS) for _ in range(n))
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?", ",", ":"]))
    return out


def build_tokenizer(out_dir: Path, vocab_size: int = 512, seed: int = 0) -> int:
    """Train a byte-level BPE tokenizer into out_dir; return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(out_dir)
    return int(tokenizer.get_vocab_size())


def tiny_config(family: Family, vocab_size: int, eos_token_id: int, bos_token_id: int) -> object:
    """A config small enough to run a forward pass in milliseconds on one CPU core."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=eos_token_id,
        # Larger than the default 0.02 so random logits are spread out: greedy decoding then moves
        # through the vocabulary instead of repeating one token, which makes parity tests meaningful.
        initializer_range=0.15,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        # Window on the second layer only, so per-layer sliding windows are exercised.
        return Qwen2Config(
            **common,
            use_sliding_window=True,
            sliding_window=32,
            max_window_layers=1,
            layer_types=["full_attention", "sliding_attention"],
        )
    if family == "mistral":
        return MistralConfig(**common, sliding_window=32)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def build_tiny_model(out_dir: Path, family: Family = "llama", seed: int = 0) -> Path:
    """Write a tiny random model + tokenizer folder loadable with `from_pretrained(out_dir)`."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(out_dir, seed=seed)
    eos, bos = SPECIAL_TOKENS.index("<|endoftext|>"), SPECIAL_TOKENS.index("<|im_start|>")
    config = tiny_config(family, vocab_size, eos_token_id=eos, bos_token_id=bos)
    # Offset by family so two families built with one seed are different models.
    torch.manual_seed(seed * len(FAMILIES) + FAMILIES.index(family))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir)
    return out_dir
