"""An adapter's own chat template: uploaded beside the PEFT files (as `chat_template.jinja`, or in a
`tokenizer_config.json`, loose or in a tar archive), kept with the version, returned by Get; one that
does not parse as Jinja is refused naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
from openlora.files import adapter_files
from openlora.transfer import upload

from tests.integration.adapter_store.conftest import StoreUnderTest
from tests.integration.adapter_store.test_round_trip import header, ref
from tests.kit.adapters import tar_folder

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "


def with_file(peft_adapter: Path, folder: Path, name: str, text: str) -> Path:
    shutil.copytree(peft_adapter, folder)
    (folder / name).write_text(text)
    return folder


async def test_a_chat_template_file_is_kept_with_the_version(
    store: StoreUnderTest, peft_adapter: Path, tmp_path: Path
) -> None:
    folder = with_file(peft_adapter, tmp_path / "a", "chat_template.jinja", TEMPLATE)
    assert [p.name for p in adapter_files(folder)][-1] == "chat_template.jinja"
    info = await upload(store.stub, header("acme/chatty"), adapter_files(folder))
    assert info.chat_template == TEMPLATE
    assert (await store.stub.Get(ref("acme/chatty", info.version))).chat_template == TEMPLATE
    plain = await upload(store.stub, header("acme/plain"), adapter_files(peft_adapter))
    assert plain.chat_template == ""


async def test_a_tokenizer_config_in_an_archive_gives_its_template(
    store: StoreUnderTest, peft_adapter: Path, tmp_path: Path
) -> None:
    config = {
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}]
    }
    folder = with_file(peft_adapter, tmp_path / "b", "tokenizer_config.json", json.dumps(config))
    archive = tmp_path / "b.tar"
    names = ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json")
    archive.write_bytes(tar_folder(folder, {name: (folder / name).read_bytes() for name in names}))
    info = await upload(store.stub, header("acme/archived"), [archive])
    assert info.chat_template == TEMPLATE


async def test_a_template_that_does_not_parse_is_refused(
    store: StoreUnderTest, peft_adapter: Path, tmp_path: Path
) -> None:
    folder = with_file(peft_adapter, tmp_path / "c", "chat_template.jinja", "{% for m in messages %}")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await upload(store.stub, header("acme/broken"), adapter_files(folder))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chat_template.jinja" in (refused.value.details() or "")
