"""Usage records attribution refused, kept aside in a file beside the spool instead of resent.

A refused record would be refused again on every resend and, resent from the oldest batch first,
hold back every record behind it. So it is written here, one JSON line each (the batch's sequence,
the record's index in it, the field and reason attribution gave, and the record itself), fsynced
before the spool lets the batch go, and never sent again: an operator can see what was not billed
and why, and replay it once fixed. A worker that dies between this write and the spool's ack writes
the same lines again after its restart; (sequence, index) tells the copies apart.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format
from openlora.v1 import attribution_pb2

log = logging.getLogger("openlora.usage")
FILE_NAME = "dead-letter.jsonl"


@dataclass(frozen=True)
class DeadLetter:
    sequence: int  # the spool batch that held the record
    index: int  # its position in that batch
    field: str
    reason: str
    record: attribution_pb2.TokenUsage | None  # None when the batch could not be read back


class DeadLetterFile:
    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILE_NAME
        self.records = 0
        """Records written since start (a counter for metrics)."""
        self._lock = threading.Lock()

    def write(self, letters: Sequence[DeadLetter]) -> None:
        """Append `letters` durably (blocking: call off the event loop), one log line each."""
        if not letters:
            return
        now = time.time()
        lines = []
        for letter in letters:
            entry = {
                "dead_lettered_at": now,
                "sequence": letter.sequence,
                "index": letter.index,
                "field": letter.field,
                "reason": letter.reason,
                "record": json_format.MessageToDict(letter.record) if letter.record is not None else None,
            }
            lines.append(json.dumps(entry, sort_keys=True) + "\n")
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write("".join(lines))
                out.flush()
                os.fsync(out.fileno())
            self.records += len(letters)
        for letter in letters:
            request = letter.record.request_id if letter.record is not None else "?"
            log.error(
                "usage record %d of batch %d (request %s) refused by attribution, kept in %s: %s: %s",
                letter.index,
                letter.sequence,
                request,
                self.path,
                letter.field,
                letter.reason,
            )

    def read(self) -> list[dict[str, object]]:
        """Every entry written so far (for operators and tests)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line]
