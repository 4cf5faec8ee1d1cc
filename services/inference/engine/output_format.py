"""What a request asks its output to match: a JSON object, a JSON schema, a regex or a grammar.

Plain data (no torch, no grammar engine), so the scheduler's side of the engine and the messages
between processes can carry it; `constraints.py` compiles it into token masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from services.common.errors import InvalidArgument

ConstraintKind = Literal["json_object", "json_schema", "regex", "grammar"]
KINDS: tuple[ConstraintKind, ...] = get_args(ConstraintKind)


@dataclass(frozen=True)
class Constraint:
    """What a request asks its output to match; plain data, sent between processes as [kind, spec]."""

    kind: ConstraintKind
    spec: str = ""
    """Empty for json_object; else the JSON schema text, the regex (matched in full), or the grammar:
    Lark (rule `start`), or xgrammar's GBNF-style EBNF (rule `root`) when it contains "::="."""

    def encode(self) -> list[str]:
        return [self.kind, self.spec]

    @classmethod
    def decode(cls, fields: Sequence[str]) -> Constraint:
        if len(fields) != 2 or fields[0] not in KINDS:
            raise InvalidArgument("response_format", f"unknown constraint {list(fields)[:1]}")
        kind: ConstraintKind = fields[0]  # narrowed by the membership test above
        return cls(kind, fields[1])
