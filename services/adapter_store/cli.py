"""`openlora store serve | config` (run the service) and `openlora adapters ...` (use it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import grpc
import typer
from openlora.adapters import Contributor, Provenance, adapter_ref
from openlora.files import adapter_files
from openlora.transfer import download, upload
from openlora.v1 import adapter_store_pb2 as pb
from openlora.v1 import adapter_store_pb2_grpc
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from services.adapter_store.settings import StoreSettings
from services.common.app import App
from services.common.cli import add_config_command, load_settings, serve_app
from services.common.grpc_client import ClientTLS, open_channel
from services.common.trust.setup import operator_identity

T = TypeVar("T")
console = Console(stderr=True)
app = typer.Typer(help="Adapter store: validated catalog on S3.", no_args_is_help=True)
add_config_command(app, StoreSettings)
adapters_app = typer.Typer(
    help="Upload, import, list, show, download and delete adapters.", no_args_is_help=True
)

StoreAddress = Annotated[
    str,
    typer.Option("--store", envvar="OPENLORA_STORE_ADDRESS", help="Adapter store (or gateway) host:port."),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        envvar="OPENLORA_API_KEY",
        help="Through a gateway: your API key (your adapters are then named <tenant>/<name>). "
        "Without one, calls go to the store as an operator (OPENLORA_SERVICE_SECRET_FILE).",
    ),
]
CaFile = Annotated[
    Path | None,
    typer.Option(envvar="OPENLORA_CA_FILE", help="CA bundle of the server's certificate (TLS)."),
]
UseTls = Annotated[bool, typer.Option("--tls", help="TLS trusting the system's CAs (on with --ca-file).")]


class _ApiKey:
    """A tenant's credential at the gateway, sent on every call like a service token."""

    def __init__(self, key: str) -> None:
        self.entry = ("authorization", f"Bearer {key}")

    def metadata(self, audience: str, method: str = "") -> tuple[str, str]:
        return self.entry


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (OPENLORA_STORE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (OPENLORA_STORE_PORT).")] = None,
    backend: Annotated[str | None, typer.Option(help="local or s3 (OPENLORA_STORE_BACKEND).")] = None,
    local_dir: Annotated[Path | None, typer.Option(help="Directory of the local backend.")] = None,
) -> None:
    """Run the adapter store (every setting: `openlora store config`)."""
    from services.adapter_store.app import StoreApp, build
    from services.common.log import configure_logging

    settings = load_settings(StoreSettings, host=host, port=port, backend=backend, local_dir=local_dir)
    configure_logging("store", settings.log_level, settings.log_format)

    def ready(store: App, port: int) -> str:
        assert isinstance(store, StoreApp)
        return f"adapter store listening on {settings.host}:{port} ({store.describe()})"

    serve_app("adapter store", lambda: build(settings), ready)


def _run(
    address: str,
    call: Callable[[adapter_store_pb2_grpc.AdapterStoreAsyncStub], Awaitable[T]],
    api_key: str | None = None,
    ca_file: Path | None = None,
    tls: bool = False,
) -> T:
    # A tenant goes through the gateway with its API key; an operator straight to the store, signing
    # with the cluster's secret.
    identity = _ApiKey(api_key) if api_key else operator_identity()
    client_tls = ClientTLS(ca_file) if ca_file is not None or tls else None

    async def go() -> T:
        async with open_channel(address, tls=client_tls, identity=identity, audience="store") as channel:
            return await call(adapter_store_pb2_grpc.AdapterStoreStub(channel))

    try:
        return asyncio.run(go())
    except grpc.aio.AioRpcError as exc:
        console.print(f"[red]error[/red] {exc.code().name}: {escape(exc.details() or '')}")
        raise typer.Exit(1) from None


def _provenance(trainer: str, datasets: list[str], contributors: list[str]) -> pb.Provenance:
    try:
        parsed = tuple(Contributor.parse(text) for text in contributors)
    except ValueError as exc:
        raise typer.BadParameter(f"{exc} (e.g. alice:trainer:0.7)", param_hint="--contributor") from None
    return Provenance(trainer, tuple(datasets), parsed).to_proto()


def _progress() -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
    )


def _print_info(info: pb.AdapterInfo) -> None:
    table = Table(show_header=False, box=None)
    for key, value in (
        ("id", info.id),
        ("version", info.version),
        ("digest", info.digest),
        ("base model", info.base_model),
        ("rank / alpha", f"{info.rank} / {info.alpha:g}"),
        ("targets", ", ".join(info.target_modules)),
        ("size", f"{info.size_bytes:,} bytes"),
        ("owner", info.owner or "-"),
        ("visibility", pb.Visibility.Name(info.visibility)),
        ("trainer", info.provenance.trainer or "-"),
        ("datasets", ", ".join(info.provenance.datasets) or "-"),
        (
            "contributors",
            ", ".join(
                f"{c.id} ({pb.Role.Name(c.role).lower()}, {c.share:g})" for c in info.provenance.contributors
            )
            or "-",
        ),
        ("created", info.created_at.ToDatetime().isoformat(timespec="seconds") + "Z"),
    ):
        table.add_row(f"[bold]{key}[/bold]", str(value))
    Console().print(table)


Trainer = Annotated[str, typer.Option(help="Who trained it.")]
Datasets = Annotated[list[str] | None, typer.Option("--dataset", help="A training dataset (repeatable).")]
Contributors = Annotated[
    list[str] | None, typer.Option("--contributor", help="id:role:share, role trainer|data (repeatable).")
]


@adapters_app.command("upload")
def upload_cmd(
    source: Annotated[Path, typer.Argument(exists=True, help="PEFT folder or .tar archive.")],
    adapter_id: Annotated[str, typer.Option("--id", help="Adapter id, e.g. acme/poet.")],
    base_model: Annotated[str, typer.Option(help="Registered base model it was trained for.")],
    owner: Annotated[str, typer.Option(help="Owning tenant.")] = "",
    public: Annotated[bool, typer.Option(help="Visible to every tenant.")] = False,
    trainer: Trainer = "",
    dataset: Datasets = None,
    contributor: Contributors = None,
    store: StoreAddress = "127.0.0.1:50053",
    api_key: ApiKey = None,
    ca_file: CaFile = None,
    tls: UseTls = False,
) -> None:
    """Upload a PEFT adapter (a new version when the id exists)."""
    paths = adapter_files(source)
    header = pb.UploadHeader(
        id=adapter_id,
        owner=owner,
        base_model=base_model,
        visibility=pb.PUBLIC if public else pb.PRIVATE,
        provenance=_provenance(trainer, dataset or [], contributor or []),
    )
    with _progress() as bar:
        task = bar.add_task(f"uploading {adapter_id}", total=sum(p.stat().st_size for p in paths))
        info = _run(
            store,
            lambda stub: upload(stub, header, paths, progress=lambda n: bar.advance(task, n)),
            api_key,
            ca_file,
            tls,
        )
    _print_info(info)


@adapters_app.command("import")
def import_cmd(
    source_uri: Annotated[
        str, typer.Argument(help="hf://org/repo[@rev], s3://bucket/prefix, https://.../a.tar")
    ],
    adapter_id: Annotated[str, typer.Option("--id", help="Id to store it under (derived when empty).")] = "",
    base_model: Annotated[str, typer.Option(help="Base model (read from its config when empty).")] = "",
    owner: Annotated[str, typer.Option(help="Owning tenant.")] = "",
    public: Annotated[bool, typer.Option(help="Visible to every tenant.")] = False,
    trainer: Trainer = "",
    dataset: Datasets = None,
    contributor: Contributors = None,
    store: StoreAddress = "127.0.0.1:50053",
    api_key: ApiKey = None,
    ca_file: CaFile = None,
    tls: UseTls = False,
) -> None:
    """Have the store fetch, validate and store an adapter from a URI."""
    request = pb.ImportRequest(
        source_uri=source_uri,
        id=adapter_id,
        owner=owner,
        base_model=base_model,
        visibility=pb.PUBLIC if public else pb.PRIVATE,
        provenance=_provenance(trainer, dataset or [], contributor or []),
    )
    with console.status(f"importing {source_uri}"):
        info = _run(store, lambda stub: stub.Import(request), api_key, ca_file, tls)
    _print_info(info)


@adapters_app.command("list")
def list_cmd(
    owner: Annotated[str, typer.Option(help="Only this owner's adapters.")] = "",
    base_model: Annotated[str, typer.Option(help="Only adapters for this base model.")] = "",
    store: StoreAddress = "127.0.0.1:50053",
    api_key: ApiKey = None,
    ca_file: CaFile = None,
    tls: UseTls = False,
) -> None:
    """List adapters (latest version of each), every page."""

    async def all_pages(stub: adapter_store_pb2_grpc.AdapterStoreAsyncStub) -> list[pb.AdapterInfo]:
        found: list[pb.AdapterInfo] = []
        token = ""
        while True:
            page = await stub.List(
                pb.ListAdaptersRequest(owner=owner, base_model=base_model, page_token=token)
            )
            found += page.adapters
            token = page.next_page_token
            if not token:
                return found

    table = Table("id", "version", "base model", "rank", "owner", "visibility", "size")
    for info in _run(store, all_pages, api_key, ca_file, tls):
        table.add_row(
            info.id,
            info.version,
            info.base_model,
            str(info.rank),
            info.owner or "-",
            pb.Visibility.Name(info.visibility).lower(),
            f"{info.size_bytes:,}",
        )
    Console().print(table)


@adapters_app.command("show")
def show_cmd(
    adapter: Annotated[str, typer.Argument(help="ID or ID@VERSION.")],
    store: StoreAddress = "127.0.0.1:50053",
    api_key: ApiKey = None,
    ca_file: CaFile = None,
    tls: UseTls = False,
) -> None:
    """Show one adapter version."""
    _print_info(
        _run(
            store,
            lambda stub: stub.Get(pb.GetAdapterRequest(adapter=adapter_ref(adapter))),
            api_key,
            ca_file,
            tls,
        )
    )


@adapters_app.command("delete")
def delete_cmd(
    adapter: Annotated[str, typer.Argument(help="ID (every version) or ID@VERSION.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    store: StoreAddress = "127.0.0.1:50053",
    api_key: ApiKey = None,
    ca_file: CaFile = None,
    tls: UseTls = False,
) -> None:
    """Delete an adapter version, or every version."""
    if not yes and not typer.confirm(f"delete {adapter}?"):
        raise typer.Exit(1)
    response = _run(
        store,
        lambda stub: stub.Delete(pb.DeleteAdapterRequest(adapter=adapter_ref(adapter))),
        api_key,
        ca_file,
        tls,
    )
    console.print(
        f"deleted {len(response.deleted_versions)} version(s): {', '.join(response.deleted_versions)}"
    )


@adapters_app.command("download")
def download_cmd(
    adapter: Annotated[str, typer.Argument(help="ID or ID@VERSION.")],
    dest: Annotated[Path, typer.Argument(help="Folder to write adapter_config.json and the weights into.")],
    store: StoreAddress = "127.0.0.1:50053",
    api_key: ApiKey = None,
    ca_file: CaFile = None,
    tls: UseTls = False,
) -> None:
    """Download an adapter's PEFT files, verifying their digests."""
    request = pb.GetAdapterRequest(adapter=adapter_ref(adapter))
    with _progress() as bar:
        task = bar.add_task(f"downloading {adapter}", total=None)
        info = _run(
            store,
            lambda stub: download(stub, request, dest, progress=lambda n: bar.advance(task, n)),
            api_key,
            ca_file,
            tls,
        )
    console.print(f"{info.id}@{info.version} -> {dest} (sha256 {info.digest[:12]}...)")


@adapters_app.command("register-base")
def register_base_cmd(
    name: Annotated[str, typer.Argument(help="Name adapters will use as base_model.")],
    config: Annotated[Path, typer.Argument(exists=True, help="The model's config.json, or its folder.")],
    store: StoreAddress = "127.0.0.1:50053",
    api_key: ApiKey = None,
    ca_file: CaFile = None,
    tls: UseTls = False,
) -> None:
    """Register a base model so adapters can be checked against its shapes."""
    path = config / "config.json" if config.is_dir() else config
    request = pb.RegisterBaseModelRequest(name=name, config_json=path.read_text())
    spec = _run(store, lambda stub: stub.RegisterBaseModel(request), api_key, ca_file, tls)
    modules = ", ".join(f"{m.name} {m.in_features}->{m.out_features}" for m in spec.modules)
    console.print(f"registered {spec.name} ({spec.model_type}, {spec.num_layers} layers): {modules}")
