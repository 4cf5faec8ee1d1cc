"""Structured-output masks (engine/constraints.py) with the real grammar engine, on the tiny tokenizer.

Random logits take the odd paths a trained model rarely does (stray bytes, control characters,
split UTF-8), so every output of a masked random walk must still parse and validate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from services.common.errors import InvalidArgument
from services.inference.engine.constraints import (
    ConstraintCompiler,
    ConstraintMatcher,
    ConstraintViolation,
)
from services.inference.engine.output_format import Constraint

# Wider than the tokenizer's 512 tokens, as a model's padded lm_head can be.
LOGITS_WIDTH = 520
MAX_TOKENS = 256
EOS = 0  # <|endoftext|> in services/cluster/tiny_models.py

# Every string, number and array bounded, objects closed: a random walk through it is finite.
NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z]{1,6}-[0-9]{2}$"},
        "title": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["fast", "slow", "warm"]},
        "owner": {
            "type": "object",
            "properties": {
                "rank": {"type": "integer", "minimum": 1, "maximum": 64},
                "active": {"type": "boolean"},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["rank", "active"],
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "slots": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "on": {"const": True}},
                "required": ["n"],
            },
            "minItems": 1,
            "maxItems": 2,
        },
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]},
    },
    "required": ["id", "title", "kind", "owner", "tags", "slots", "note"],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> ConstraintCompiler:
    return ConstraintCompiler(tokenizer, LOGITS_WIDTH)


def token_id(tokenizer: Any, text: str) -> int:
    """The single token whose text is `text` (every byte has one in a byte-level BPE)."""
    ids = tokenizer.encode(text)
    assert len(ids) == 1, (text, ids)
    return int(ids[0])


def sample(
    compiler: ConstraintCompiler,
    constraint: Constraint,
    generator: torch.Generator,
    bias: torch.Tensor | None,
) -> tuple[list[int], bool]:
    """One masked random walk: (its tokens, whether the constraint finished it within MAX_TOKENS)."""
    matcher = compiler.matcher(constraint)
    tokens: list[int] = []
    for _ in range(MAX_TOKENS):
        logits = torch.randn(LOGITS_WIDTH, generator=generator)
        if bias is not None:
            logits += bias
        matcher.mask_logits(logits)
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        matcher.accept(token)
        tokens.append(token)
        if matcher.is_finished:
            return tokens, True
    return tokens, False


def test_sampled_outputs_always_validate_against_the_schema(
    compiler: ConstraintCompiler, tokenizer: Any
) -> None:
    constraint = Constraint("json_schema", json.dumps(NESTED_SCHEMA))
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        tokens, finished = sample(compiler, constraint, generator, bias=None)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        assert finished, f"not done after {MAX_TOKENS} tokens: {text!r}"
        jsonschema.validate(json.loads(text), NESTED_SCHEMA)  # json.loads is strict: no raw controls


def test_json_object_outputs_parse_as_objects(compiler: ConstraintCompiler, tokenizer: Any) -> None:
    # A random walk through free text ends only on a closing quote: make quotes and "]" likely
    # (not "}", which would end most objects at "{}").
    closers = torch.zeros(LOGITS_WIDTH)
    for text, token in tokenizer.get_vocab().items():
        if ('"' in text or "]" in text) and token < LOGITS_WIDTH:
            closers[token] = 4.0
    generator = torch.Generator().manual_seed(1)
    objects = []
    for _ in range(30):
        tokens, finished = sample(compiler, Constraint("json_object"), generator, bias=closers)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        assert finished, f"not done after {MAX_TOKENS} tokens: {text!r}"
        objects.append(json.loads(text))
    assert all(isinstance(o, dict) for o in objects)
    assert sum(1 for o in objects if o) >= 20, "mostly non-empty objects, so keys and values were walked"


@pytest.mark.parametrize(
    ("kind", "spec", "pattern"),
    [
        ("regex", r"[a-c]{2,5}-\d{1,3}(x|yz)?", r"[a-c]{2,5}-\d{1,3}(x|yz)?"),
        ("grammar", 'start: "(" NUM ("," NUM)~0..3 ")"\nNUM: /[0-9]{1,2}/', r"\(\d{1,2}(,\d{1,2}){0,3}\)"),
        (
            "grammar",
            'root ::= "(" num ("," num){0,3} ")"\nnum ::= [0-9] [0-9]?',
            r"\(\d{1,2}(,\d{1,2}){0,3}\)",
        ),
    ],
    ids=["regex", "lark", "ebnf"],
)
def test_regex_and_grammar_outputs_match_in_full(
    compiler: ConstraintCompiler, tokenizer: Any, kind: Any, spec: str, pattern: str
) -> None:
    generator = torch.Generator().manual_seed(2)
    for _ in range(50):
        tokens, finished = sample(compiler, Constraint(kind, spec), generator, bias=None)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        assert finished and re.fullmatch(pattern, text), text


@pytest.mark.parametrize(
    ("constraint", "field"),
    [
        (Constraint("json_schema", '{"type": "strin"}'), "response_format.json_schema"),
        (Constraint("json_schema", '{"type": "object"'), "response_format.json_schema"),
        (Constraint("json_schema", "[1, 2]"), "response_format.json_schema"),
        (Constraint("json_schema", '{"type": "string", "pattern": "(["}'), "response_format.json_schema"),
        (
            Constraint("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}'),
            "response_format.json_schema",
        ),
        (Constraint("regex", "(ab"), "response_format.regex"),
        (Constraint("grammar", "start: undefined_rule"), "response_format.grammar"),
        (Constraint("grammar", 'root ::= "a" |'), "response_format.grammar"),
    ],
)
def test_invalid_constraints_name_the_request_field(
    compiler: ConstraintCompiler, constraint: Constraint, field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        compiler.check(constraint)
    assert raised.value.field == field and raised.value.problem
    assert ".cc:" not in raised.value.problem, "native source locations are stripped"
    with pytest.raises(InvalidArgument):
        compiler.matcher(constraint)


def test_masked_tokens_are_minus_inf_and_allowed_ones_untouched(
    compiler: ConstraintCompiler, tokenizer: Any
) -> None:
    # Independent oracle: at the start of "ab|cd" exactly the tokens spelling a prefix of either
    # are allowed; special tokens, EOS and the ids past the tokenizer's vocabulary never are.
    vocab = {token: tokenizer.decode([token]) for token in range(len(tokenizer))}
    special = set(tokenizer.all_special_ids)
    expected = {
        t for t, s in vocab.items() if s and t not in special and ("ab".startswith(s) or "cd".startswith(s))
    }
    logits = torch.randn(4, LOGITS_WIDTH, dtype=torch.bfloat16)
    before = logits.clone()
    matchers = [compiler.matcher(Constraint("regex", "ab|cd")) for _ in range(2)]
    compiler.apply_masks(logits, [3, 1], matchers)  # rows out of order; rows 0 and 2 unconstrained
    for row in (1, 3):
        allowed = {int(t) for t in torch.isfinite(logits[row]).nonzero()}
        assert allowed == expected
        masked = logits[row][~torch.isfinite(logits[row])]
        assert bool((masked == float("-inf")).all())
        keep = sorted(expected)
        assert torch.equal(logits[row, keep], before[row, keep])
    assert torch.equal(logits[[0, 2]], before[[0, 2]])


def test_eos_is_allowed_exactly_when_the_grammar_can_end(
    compiler: ConstraintCompiler, tokenizer: Any
) -> None:
    a, b, c = (token_id(tokenizer, ch) for ch in "abc")

    def eos_allowed(matcher: ConstraintMatcher) -> bool:
        logits = torch.zeros(LOGITS_WIDTH)
        matcher.mask_logits(logits)
        return bool(torch.isfinite(logits[EOS]))

    matcher = compiler.matcher(Constraint("regex", "a(bc)?"))
    assert not eos_allowed(matcher) and not matcher.can_end
    matcher.accept(a)
    assert eos_allowed(matcher) and matcher.can_end and not matcher.is_finished
    matcher.accept(b)
    assert not eos_allowed(matcher) and not matcher.is_finished
    matcher.accept(c)
    # Only EOS could follow: finished now, without spending a step on the forced EOS.
    assert matcher.is_finished
    with pytest.raises(ConstraintViolation):
        matcher.accept(EOS)

    open_ended = compiler.matcher(Constraint("regex", "a+"))
    open_ended.accept(a)
    assert not open_ended.is_finished
    open_ended.accept(EOS)  # sampled EOS where the grammar could go on: that ends it too
    assert open_ended.is_finished


def test_a_disallowed_token_is_refused(compiler: ConstraintCompiler, tokenizer: Any) -> None:
    matcher = compiler.matcher(Constraint("regex", "ab"))
    with pytest.raises(ConstraintViolation):
        matcher.accept(token_id(tokenizer, "b"))


def test_json_strings_refuse_raw_controls_and_surrogates(
    compiler: ConstraintCompiler, tokenizer: Any
) -> None:
    # Byte-level BPE: each byte has a token, so a random model can emit bytes JSON strings forbid.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()  # type: ignore[no-untyped-call]
    byte_token = {byte: tokenizer.convert_tokens_to_ids(char) for byte, char in byte_chars.items()}
    schemas = [{"type": "string"}, {"type": "string", "maxLength": 5}]
    for schema in schemas:
        matcher = compiler.matcher(Constraint("json_schema", json.dumps(schema)))
        matcher.accept(byte_token[ord('"')])
        logits = torch.zeros(LOGITS_WIDTH)
        matcher.mask_logits(logits)
        for control in (0x01, 0x09, 0x1F):
            assert logits[byte_token[control]] == float("-inf"), (schema, control)
        matcher.accept(byte_token[0xED])  # lead byte of U+D000..U+DFFF; the surrogate half is invalid
        logits = torch.zeros(LOGITS_WIDTH)
        matcher.mask_logits(logits)
        assert logits[byte_token[0x9F]] == 0 and logits[byte_token[0xA0]] == float("-inf"), schema


def test_constraint_travels_as_two_strings() -> None:
    constraint = Constraint("regex", "[0-9]+")
    assert Constraint.decode(constraint.encode()) == constraint
    with pytest.raises(InvalidArgument):
        Constraint.decode(["yaml", ""])


def test_compiled_grammars_are_an_lru(tokenizer: Any) -> None:
    compiler = ConstraintCompiler(tokenizer, LOGITS_WIDTH, cache_size=2)
    first, second, third = (Constraint("regex", f"a{{{n}}}") for n in (1, 2, 3))
    compiler.matcher(first)
    compiler.matcher(second)
    compiler.matcher(first)  # first is now the most recent
    compiler.matcher(third)
    assert list(compiler._cache) == [first, third]


def test_a_bounded_schema_ends_on_the_random_tiny_model(tiny_llama_dir: Path, tokenizer: Any) -> None:
    """200 greedy generations of the real (random) model, batched: all end, all valid. Greedy is the
    hard case: a random model's argmax loops, so only bounds (maxLength, maximum, maxItems) end it."""
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 8},
            "kind": {"enum": ["fast", "slow"]},
            "rank": {"type": "integer", "minimum": 1, "maximum": 64},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["title", "kind", "rank", "tags"],
    }
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # loads in eval mode
    compiler = ConstraintCompiler(tokenizer, model.config.vocab_size)
    constraint = Constraint("json_schema", json.dumps(schema))
    batch = 200
    matchers = [compiler.matcher(constraint) for _ in range(batch)]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    ids = torch.randint(3, model.config.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(3))
    cache = DynamicCache()
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            live = [i for i in range(batch) if not matchers[i].is_finished]
            if not live:
                break
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1].float()
            compiler.apply_masks(logits, live, [matchers[i] for i in live])
            chosen = logits.argmax(-1)
            for i in live:
                matchers[i].accept(int(chosen[i]))
                outputs[i].append(int(chosen[i]))
            ids = chosen[:, None]
    assert all(m.is_finished for m in matchers)
    for tokens in outputs:
        jsonschema.validate(json.loads(tokenizer.decode(tokens, skip_special_tokens=True)), schema)
