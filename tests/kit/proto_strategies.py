"""Hypothesis strategies for any protobuf message, read from its descriptor: what a hostile or careless
caller can put on the wire while still sending valid protobuf.

Strings mix arbitrary unicode (control characters, RTL marks, astral planes) with values that probe
for traversal, injection and server-side fetches (`HOSTILE_STRINGS`): every path-like one names
`SENTINEL`, so a test can look for a file by that name afterwards. Numbers include each type's bounds,
floats NaN and infinities, enums values outside the declared ones (proto3 keeps them).
"""

from __future__ import annotations

from typing import Any, cast

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn, SearchStrategy

SENTINEL = "openlora-fuzz-sentinel"

HOSTILE_STRINGS = (
    "",
    " ",
    ".",
    "..",
    "/",
    "a/b",
    "a/b/c",
    "tenant/..",
    "../../../../tmp/" + SENTINEL,
    "/tmp/" + SENTINEL,
    "..\\..\\" + SENTINEL,
    "fuzz/" + SENTINEL + "\x00.json",
    "%2e%2e%2f" + SENTINEL,
    "file:///etc/passwd",
    "file:///tmp/" + SENTINEL,
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:1/" + SENTINEL,
    "http://[::1]/" + SENTINEL,
    "http://10.0.0.1/" + SENTINEL,
    "https://localhost/" + SENTINEL,
    "gopher://127.0.0.1:6379/_" + SENTINEL,
    "ftp://example.invalid/" + SENTINEL,
    "s3://../" + SENTINEL,
    "hf://../../" + SENTINEL,
    "ollama://127.0.0.1/" + SENTINEL,
    "\x00",
    "\x1b[31mred",
    "\r\nx-injected: 1",
    "\u202eevil",
    "\ufeff",
    "\U0001f600" * 8,
    "'; DROP TABLE usage_events; --",
    "{{7*7}}",
    "$(touch /tmp/" + SENTINEL + ")",
    "x" * 300,
    "y" * 70_000,
)

# Protobuf strings are UTF-8: lone surrogates cannot be encoded by any client.
_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
_STRINGS = st.one_of(_TEXT, st.sampled_from(HOSTILE_STRINGS))
_BYTES = st.one_of(
    st.binary(max_size=64), st.sampled_from([b"", b"\x00" * 16, b"\x80\x04\x95", b"PK\x03\x04"])
)


def _integers(bits: int, signed: bool) -> SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = sorted({low, high, 0, 1, min(high, 2**31), max(low, -1), high // 2})
    return st.one_of(
        st.sampled_from(edges), st.integers(low, high), st.integers(max(low, -4), min(high, 4096))
    )


_F = FieldDescriptor
_SCALARS: dict[int, SearchStrategy[Any]] = {
    _F.TYPE_BYTES: _BYTES,
    _F.TYPE_BOOL: st.booleans(),
    _F.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    _F.TYPE_FLOAT: st.floats(allow_nan=True, allow_infinity=True, width=32),
    _F.TYPE_INT32: _integers(32, True),
    _F.TYPE_SINT32: _integers(32, True),
    _F.TYPE_SFIXED32: _integers(32, True),
    _F.TYPE_INT64: _integers(64, True),
    _F.TYPE_SINT64: _integers(64, True),
    _F.TYPE_SFIXED64: _integers(64, True),
    _F.TYPE_UINT32: _integers(32, False),
    _F.TYPE_FIXED32: _integers(32, False),
    _F.TYPE_UINT64: _integers(64, False),
    _F.TYPE_FIXED64: _integers(64, False),
}


def _enum(field: FieldDescriptor) -> SearchStrategy[int]:
    assert field.enum_type is not None
    declared = [v.number for v in field.enum_type.values]
    return st.one_of(st.sampled_from(declared), st.sampled_from([-1, max(declared) + 1, 2**31 - 1]))


def messages(
    descriptor: Descriptor,
    *,
    extra_strings: tuple[str, ...] = (),
    max_depth: int = 4,
    field_odds: int = 2,
) -> SearchStrategy[Message]:
    """Messages of `descriptor`'s type with any subset of fields set to any values (nested messages
    down to `max_depth`; repeated fields of up to a few entries, now and then many). Each field is set
    with odds 1 in `field_odds`. String fields also take `extra_strings`: names that exist where the
    messages are sent, so some requests get past the lookups."""
    strings = st.one_of(_STRINGS, st.sampled_from(extra_strings)) if extra_strings else _STRINGS
    return _Builder(strings, max_depth, field_odds).message(descriptor, 0)


def mutations(template: Message, *, extra_strings: tuple[str, ...] = ()) -> SearchStrategy[Message]:
    """`template` (a valid request) with one or two of its fields, at any depth, replaced or added:
    requests that get past the first checks and probe the ones behind them."""
    sparse = messages(cast(Descriptor, template.DESCRIPTOR), extra_strings=extra_strings, field_odds=6)

    def merged(change: Message) -> Message:
        result = type(template)()
        result.CopyFrom(template)
        result.MergeFrom(change)
        return result

    return sparse.map(merged)


class _Builder:
    def __init__(self, strings: SearchStrategy[str], max_depth: int, field_odds: int) -> None:
        self.strings = strings
        self.max_depth = max_depth
        self.present = st.integers(0, field_odds - 1).map(lambda n: n == 0)
        # One strategy per message type and depth, made once: making a composite strategy inspects its
        # function's source, and doing that for every nested message drawn took most of a slow run.
        self._messages: dict[tuple[str, int], SearchStrategy[Message]] = {}

    def value(self, field: FieldDescriptor, depth: int) -> SearchStrategy[Any]:
        if field.type == _F.TYPE_MESSAGE:
            assert field.message_type is not None
            return self.message(field.message_type, depth + 1)
        if field.type == _F.TYPE_ENUM:
            return _enum(field)
        if field.type == _F.TYPE_STRING:
            return self.strings
        return _SCALARS[field.type]

    def message(self, descriptor: Descriptor, depth: int) -> SearchStrategy[Message]:
        key = (descriptor.full_name, depth)
        if key not in self._messages:
            self._messages[key] = self._make_message(descriptor, depth)
        return self._messages[key]

    def _make_message(self, descriptor: Descriptor, depth: int) -> SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)
        value, max_depth, present = self.value, self.max_depth, self.present

        @st.composite
        def build(draw: DrawFn) -> Message:
            message = cls()
            for field in descriptor.fields:
                if field.type == _F.TYPE_MESSAGE and depth >= max_depth:
                    continue
                if not draw(present):
                    continue
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    _fill_map(draw, value, getattr(message, field.name), field.message_type, depth)
                elif field.is_repeated:
                    size = draw(st.one_of(st.integers(0, 3), st.just(64)))
                    values = [draw(value(field, depth)) for _ in range(size)]
                    target = getattr(message, field.name)
                    if field.type == _F.TYPE_MESSAGE:
                        for item in values:
                            target.add().CopyFrom(item)
                    else:
                        target.extend(values)
                elif field.type == _F.TYPE_MESSAGE:
                    getattr(message, field.name).CopyFrom(draw(value(field, depth)))
                else:
                    setattr(message, field.name, draw(value(field, depth)))
            return message

        return build()


def _fill_map(draw: DrawFn, value_of: Any, target: Any, entry: Descriptor, depth: int) -> None:
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    for _ in range(draw(st.integers(0, 3))):
        key = draw(value_of(key_field, depth))
        value = draw(value_of(value_field, depth))
        if value_field.type == _F.TYPE_MESSAGE:
            target[key].CopyFrom(value)
        else:
            target[key] = value
