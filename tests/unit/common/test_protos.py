"""The wire contracts: stubs import, carry the fields ARCHITECTURE.md promises, pass lint, are fresh."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))
import lint_protos  # noqa: E402

# Message -> fields the design document names; others may be added, none renamed.
CONTRACT = {
    "common_pb2": {
        "AdapterRef": {"id", "version"},
        "AdapterMix": {"components", "strategy", "density", "rank", "seed"},
        "Component": {"adapter", "weight"},
        "SamplingParams": {"temperature", "top_p", "top_k", "seed", "max_new_tokens", "stop", "ignore_eos"},
        "Usage": {"prompt_tokens", "completion_tokens"},
    },
    "inference_pb2": {
        "GenerateRequest": {
            "request_id",
            "text",
            "token_ids",
            "adapter_ref",
            "mix",
            "sampling",
            "return_logprobs",
        },
        "GenerateChunk": {"token_ids", "text", "logprobs", "finish_reason", "usage"},
    },
    "adapter_store_pb2": {
        "UploadHeader": {"id", "owner", "visibility", "provenance", "base_model"},
        "ImportRequest": {"source_uri"},
        "AdapterInfo": {
            "id",
            "version",
            "digest",
            "base_model",
            "rank",
            "alpha",
            "target_modules",
            "size_bytes",
            "owner",
            "visibility",
            "provenance",
            "created_at",
        },
        "Provenance": {"trainer", "datasets", "contributors"},
        "Contributor": {"id", "role", "share"},
        "ListAdaptersRequest": {"base_model", "owner", "page_token"},
    },
    "attribution_pb2": {
        "TokenUsage": {"request_id", "token_index", "kind", "adapters", "tenant", "worker_id", "ts"},
    },
    "relay_pb2": {
        "RelayUp": {"starts", "cancels"},
        "RelayStart": {"stream_id", "request", "timeout_s", "trace_headers"},
        "RelayDown": {"events"},
        "RelayEvent": {"stream_id", "chunk", "completion_tokens", "prompt_tokens", "end"},
        "RelayEnd": {"code", "message", "status_details"},
    },
}
SERVICES = {
    "inference_pb2": ("Inference", {"Generate", "ListModels"}),
    "adapter_store_pb2": ("AdapterStore", {"Upload", "Import", "Get", "List", "Delete", "Download"}),
    "attribution_pb2": ("Attribution", {"RecordUsage", "GetUsage", "GetRewards", "WatchRewards"}),
    "relay_pb2": ("WorkerRelay", {"Relay"}),
}


def test_every_contract_service_is_named_for_health_and_reflection() -> None:
    from services.common.contracts import SERVICE_NAMES

    assert set(SERVICE_NAMES.values()) == {
        "openlora.v1.Inference",
        "openlora.v1.AdapterStore",
        "openlora.v1.Attribution",
        "openlora.v1.WorkerRelay",
    }


@pytest.mark.parametrize("module", sorted(CONTRACT))
def test_messages_carry_the_contract_fields(module: str) -> None:
    stubs = importlib.import_module(f"openlora.v1.{module}")
    for message, fields in CONTRACT[module].items():
        present = set(stubs.DESCRIPTOR.message_types_by_name[message].fields_by_name)
        assert fields <= present, f"{message} lacks {fields - present}"


@pytest.mark.parametrize("module", sorted(SERVICES))
def test_services_carry_the_contract_methods(module: str) -> None:
    stubs = importlib.import_module(f"openlora.v1.{module}")
    name, methods = SERVICES[module]
    service = stubs.DESCRIPTOR.services_by_name[name]
    assert methods <= set(service.methods_by_name)
    assert service.methods_by_name["Download" if name == "AdapterStore" else next(iter(methods))]


def test_streaming_shapes_match_the_contract() -> None:
    from openlora.v1 import adapter_store_pb2, attribution_pb2, inference_pb2

    generate = inference_pb2.DESCRIPTOR.services_by_name["Inference"].methods_by_name["Generate"]
    upload = adapter_store_pb2.DESCRIPTOR.services_by_name["AdapterStore"].methods_by_name["Upload"]
    record = attribution_pb2.DESCRIPTOR.services_by_name["Attribution"].methods_by_name["RecordUsage"]
    assert (generate.client_streaming, generate.server_streaming) == (False, True)
    assert (upload.client_streaming, upload.server_streaming) == (True, False)
    assert (record.client_streaming, record.server_streaming) == (True, False)


def test_enums_named_in_the_contract() -> None:
    from openlora.v1 import common_pb2, inference_pb2

    assert [common_pb2.MergeStrategy.Name(v) for v in common_pb2.MergeStrategy.values()] == [
        "MERGE_STRATEGY_UNSPECIFIED",
        "LINEAR",
        "TIES",
        "DARE_LINEAR",
        "DARE_TIES",
    ]
    assert [inference_pb2.FinishReason.Name(v) for v in inference_pb2.FinishReason.values()] == [
        "FINISH_REASON_UNSPECIFIED",
        "STOP",
        "LENGTH",
        "CANCELLED",
    ]


def test_committed_protos_pass_lint() -> None:
    files = sorted((ROOT / "protos").rglob("*.proto"))
    assert lint_protos.lint(ROOT / "protos", files) == []


def test_committed_stubs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


BAD_PROTO = """
    syntax = "proto3";
    package acme;

    // Documented.
    message bad_message {
      // Documented.
      string BadField = 1;
      string undocumented = 2;
    }

    // Documented.
    enum Colour {
      // Wrong zero name.
      RED = 0;
      // Not upper snake.
      Green = 1;
    }

    service thing {
      // Documented.
      rpc do_it(bad_message) returns (bad_message);
    }
"""


def test_lint_catches_each_rule(tmp_path: Path) -> None:
    (tmp_path / "acme").mkdir()
    path = tmp_path / "acme" / "bad.proto"
    path.write_text(textwrap.dedent(BAD_PROTO))
    problems = "\n".join(lint_protos.lint(tmp_path, [path]))
    for expected in [
        "package 'acme' is not versioned",
        "message bad_message is not PascalCase",
        "field bad_message.BadField is not lower_snake_case",
        "field bad_message.undocumented has no leading comment",
        "enum Colour must have zero value COLOUR_UNSPECIFIED",
        "enum value Colour.Green is not UPPER_SNAKE_CASE",
        "service thing is not PascalCase",
        "service thing has no leading comment",
        "rpc thing.do_it is not PascalCase",
    ]:
        assert expected in problems
