"""Canonical safetensors, the stream splitter and the fetch policy, without a server."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
import torch
from openlora.files import DeclaredFile, FileMismatch, FileSplitter
from safetensors.torch import load_file, save_file

from services.adapter_store.safetensors_file import read_header, write_canonical
from services.adapter_store.sources import policy as policy_module
from services.adapter_store.sources.policy import FetchPolicy
from services.common.errors import InvalidArgument


def test_canonical_form_is_loadable_and_independent_of_writer_order(tmp_path: Path) -> None:
    a = {"z.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(8, 4, dtype=torch.bfloat16)}
    save_file(a, tmp_path / "one.safetensors", metadata={"writer": "x"})
    save_file(dict(reversed(a.items())), tmp_path / "two.safetensors")
    digests = []
    for name in ("one", "two"):
        source = tmp_path / f"{name}.safetensors"
        header = read_header(source)
        renames = {n: f"renamed.{n}" for n in header.tensors}
        digests.append(write_canonical(source, header, renames, tmp_path / f"{name}.canonical", copy_bytes=7))
        loaded = load_file(tmp_path / f"{name}.canonical")
        for old, tensor in a.items():
            assert torch.equal(loaded[f"renamed.{old}"], tensor)
    assert digests[0] == digests[1] == hashlib.sha256((tmp_path / "one.canonical").read_bytes()).hexdigest()


def test_splitter_checks_sizes_and_digests(tmp_path: Path) -> None:
    parts = [b"hello ", b"", b"world"]
    files = [DeclaredFile(f"f{i}", len(p), hashlib.sha256(p).hexdigest()) for i, p in enumerate(parts)]
    splitter = FileSplitter(files, [tmp_path / f"out{i}" for i in range(3)])
    for byte in b"".join(parts):  # one byte at a time crosses every boundary
        splitter.write(bytes([byte]))
    out = splitter.finish()
    assert [out[f"f{i}"].read_bytes() for i in range(3)] == parts

    wrong = [DeclaredFile("f", 5, hashlib.sha256(b"other").hexdigest())]
    with pytest.raises(FileMismatch, match="sha256"):
        FileSplitter(wrong, [tmp_path / "x"]).write(b"hello")
    too_much = FileSplitter([DeclaredFile("f", 1, hashlib.sha256(b"a").hexdigest())], [tmp_path / "y"])
    with pytest.raises(FileMismatch, match="more bytes"):
        too_much.write(b"ab")


def test_policy_blocks_private_addresses_unless_allowed() -> None:
    for host in ("127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "[::1]", "192.168.0.1"):
        with pytest.raises(InvalidArgument, match="non-public"):
            FetchPolicy().check_host(host)
    FetchPolicy(allow_private_networks=True).check_host("127.0.0.1")
    with pytest.raises(InvalidArgument, match="allow-list"):
        FetchPolicy(allowed_hosts=("*.example.com",), allow_private_networks=True).check_host("127.0.0.1")
    FetchPolicy(allowed_hosts=("*.example.com",), allow_private_networks=True).check_host("cdn.example.com")


def test_policy_refuses_hosts_that_do_not_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise socket.gaierror("no such host")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(InvalidArgument, match="does not resolve"):
        FetchPolicy().check_host("nowhere.invalid")


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::7f00:1",  # NAT64 (RFC 6052) of 127.0.0.1
        "64:ff9b:1::a00:1",  # local-use NAT64 (RFC 8215) of 10.0.0.1
        "::ffff:169.254.169.254",  # IPv4-mapped cloud metadata
        "2002:c0a8:1::",  # 6to4 of 192.168.0.1
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo
        "::127.0.0.1",  # IPv4-compatible
        "100.64.0.1",  # carrier-grade NAT
    ],
)
def test_private_addresses_written_inside_others_are_refused(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(policy_module, "system_resolve", lambda host, port: [address])
    with pytest.raises(InvalidArgument, match="non-public"):
        FetchPolicy().check_host("innocent.example")


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses_in_the_same_forms_pass(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_module, "system_resolve", lambda host, port: [address])
    FetchPolicy().check_host("public.example")
