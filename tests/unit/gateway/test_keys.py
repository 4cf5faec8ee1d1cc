from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from services.common.errors import PermissionDenied, Unauthenticated
from services.gateway.auth import bearer_token
from services.gateway.keys import KeySource, TenantLimits, hash_key, new_key, parse_key_ring

DEFAULTS = TenantLimits(max_concurrent_streams=64, tokens_per_minute=0)


def document(*entries: dict[str, object], tenants: dict[str, object] | None = None) -> str:
    return json.dumps({"keys": list(entries), "tenants": tenants or {}})


def test_keys_are_matched_by_hash_and_map_to_their_tenant() -> None:
    key = new_key()
    assert key.startswith("olk_") and len(key) > 40
    ring = parse_key_ring(document({"sha256": hash_key(key), "tenant": "acme"}), DEFAULTS, "test")
    assert ring.authenticate(key).tenant == "acme"
    with pytest.raises(Unauthenticated):
        ring.authenticate(key + "x")


def test_a_revoked_key_is_told_so() -> None:
    key = new_key()
    entry = {"sha256": hash_key(key), "tenant": "acme", "name": "laptop", "revoked": True}
    ring = parse_key_ring(document(entry), DEFAULTS, "test")
    with pytest.raises(PermissionDenied, match="revoked"):
        ring.authenticate(key)


def test_tenant_limits_override_the_defaults() -> None:
    ring = parse_key_ring(document(tenants={"acme": {"tokens_per_minute": 100}}), DEFAULTS, "test")
    assert ring.limits["acme"] == TenantLimits(max_concurrent_streams=64, tokens_per_minute=100)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "not JSON"),
        (document({"sha256": "abc", "tenant": "acme"}), "64 hex digits"),
        (document({"sha256": "a" * 64, "tenant": "Not A Tenant"}), "tenant must match"),
        (document(tenants={"acme": {"max_concurrent_streams": 0}}), "integers >= 1"),
        (json.dumps({"keys": {}}), "expected a list"),
    ],
)
def test_malformed_documents_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_key_ring(text, DEFAULTS, "keys.json")


def test_the_file_is_reloaded_when_it_changes_and_a_bad_edit_keeps_the_old_keys(tmp_path: Path) -> None:
    now = [0.0]
    key = new_key()
    path = tmp_path / "keys.json"
    path.write_text(document({"sha256": hash_key(key), "tenant": "acme"}))
    source = KeySource(DEFAULTS, path=path, reload_s=5, clock=lambda: now[0])
    assert source.authenticate(key).tenant == "acme"

    path.write_text(document({"sha256": hash_key(key), "tenant": "acme", "revoked": True}))
    os.utime(path, ns=(1, 1))  # a different modification time whatever the file system's resolution
    assert source.authenticate(key).tenant == "acme"  # not checked again before reload_s
    now[0] = 6
    with pytest.raises(PermissionDenied):
        source.authenticate(key)

    path.write_text("{broken")
    os.utime(path, ns=(2, 2))
    now[0] = 12
    with pytest.raises(PermissionDenied):  # still the last good ring
        source.authenticate(key)


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_key_file_deleted_or_emptied_revokes_its_keys(tmp_path: Path, how: str) -> None:
    now = [0.0]
    file_key, inline_key = new_key(), new_key()
    path = tmp_path / "keys.json"
    path.write_text(document({"sha256": hash_key(file_key), "tenant": "acme"}))
    inline = document({"sha256": hash_key(inline_key), "tenant": "globex"})
    source = KeySource(DEFAULTS, path=path, inline=inline, reload_s=5, clock=lambda: now[0])
    assert source.authenticate(file_key).tenant == "acme"
    if how == "deleted":
        path.unlink()
    else:
        path.write_text("\n")
        os.utime(path, ns=(1, 1))
    now[0] = 6
    with pytest.raises(Unauthenticated):
        source.authenticate(file_key)
    assert source.authenticate(inline_key).tenant == "globex"  # inline keys are not the file's
    path.write_text(document({"sha256": hash_key(file_key), "tenant": "acme"}))
    os.utime(path, ns=(2, 2))
    now[0] = 12
    assert source.authenticate(file_key).tenant == "acme"  # and a file put back is read again


def test_inline_keys_and_file_keys_are_merged(tmp_path: Path) -> None:
    inline_key, file_key = new_key(), new_key()
    path = tmp_path / "keys.json"
    path.write_text(document({"sha256": hash_key(file_key), "tenant": "globex"}))
    source = KeySource(
        DEFAULTS, path=path, inline=document({"sha256": hash_key(inline_key), "tenant": "acme"})
    )
    assert source.authenticate(inline_key).tenant == "acme"
    assert source.authenticate(file_key).tenant == "globex"
    assert source.limits_of("acme") == DEFAULTS


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer   abc "),), "abc"),
    ],
)
def test_bearer_tokens_are_read_from_metadata(metadata: tuple[tuple[str, str], ...], expected: str) -> None:
    assert bearer_token(metadata) == expected


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Basic abc"),), (("authorization", "Bearer "),), (("x", "y"),)]
)
def test_missing_or_malformed_authorization_is_unauthenticated(metadata: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(Unauthenticated):
        bearer_token(metadata)


def test_the_key_helper_prints_a_key_and_its_entry(capsys: pytest.CaptureFixture[str]) -> None:
    from services.gateway.keys import _main

    assert _main(["new", "acme"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key = lines[0].rsplit(" ", 1)[1]
    entry = json.loads(lines[1].split(":", 1)[1])
    ring = parse_key_ring(json.dumps({"keys": [entry]}), DEFAULTS, "printed")
    assert ring.authenticate(key).tenant == "acme"
    assert _main(["new"]) == 2
