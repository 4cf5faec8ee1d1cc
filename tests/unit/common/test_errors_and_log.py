from __future__ import annotations

import json
import logging

import grpc
from google.rpc import error_details_pb2

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.common.log import JsonFormatter, TextFormatter, request_id_var


def test_invalid_argument_names_the_field() -> None:
    error = InvalidArgument("sampling.top_p", "must be in (0, 1]")
    status = error.to_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == "sampling.top_p: must be in (0, 1]"
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "sampling.top_p"


def test_retryable_errors_carry_retry_info() -> None:
    status = ResourceExhausted("tokens per minute exceeded", retry_after_s=1.5).to_status()
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() == 1_500_000_000
    assert NotFound("adapter x").to_status().details == []


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("openlora.test", logging.INFO, __file__, 1, msg, (), None)
    record.__dict__.update(extra)
    return record


def test_json_log_lines_carry_request_id_and_extras() -> None:
    token = request_id_var.set("req-1")
    try:
        line = JsonFormatter("gateway").format(_record("routed", worker="w1", duration_ms=1.5))
    finally:
        request_id_var.reset(token)
    entry = json.loads(line)
    assert entry["service"] == "gateway" and entry["msg"] == "routed"
    assert entry["request_id"] == "req-1"
    assert entry["worker"] == "w1" and entry["duration_ms"] == 1.5
    assert entry["level"] == "INFO" and entry["ts"].endswith("Z")


def test_json_log_includes_exception_text() -> None:
    try:
        raise ValueError("bad thing")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(JsonFormatter("store").format(record))
    assert "ValueError: bad thing" in entry["exc"]


def test_text_log_is_one_readable_line() -> None:
    line = TextFormatter("worker").format(_record("loaded adapter", adapter="a1"))
    assert "worker" in line and "loaded adapter" in line and "adapter=a1" in line
    assert "\n" not in line
