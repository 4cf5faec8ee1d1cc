"""The Kubernetes manifests stay true to the code: every OPENLORA_* variable they set is a real setting
of that service, probes ask the port the container serves gRPC on, and they render with kustomize."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.adapter_store.settings import StoreSettings
from services.attribution.settings import AttributionSettings
from services.common.settings import ServiceSettings
from services.gateway.settings import GatewaySettings
from services.inference.settings import WorkerSettings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
SETTINGS: dict[str, type[ServiceSettings]] = {
    "OPENLORA_STORE_": StoreSettings,
    "OPENLORA_ATTRIBUTION_": AttributionSettings,
    "OPENLORA_WORKER_": WorkerSettings,
    "OPENLORA_GATEWAY_": GatewaySettings,
}


def documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def containers() -> list[dict[str, Any]]:
    found = []
    for doc in documents():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        found.extend(spec.get("containers", []))
    return found


def check_setting(name: str) -> None:
    for prefix, settings in SETTINGS.items():
        if name.startswith(prefix):
            field = name.removeprefix(prefix).lower()
            assert field in settings.model_fields, f"{name}: {settings.__name__} has no setting {field!r}"
            return
    raise AssertionError(f"{name}: no service has the prefix of this variable")


def test_every_openlora_variable_is_a_real_setting() -> None:
    names = [e["name"] for c in containers() for e in c.get("env", [])]
    names += [k for doc in documents() if doc["kind"] == "ConfigMap" for k in doc["data"]]
    openlora = [n for n in names if n.startswith("OPENLORA_")]
    assert len(openlora) > 20
    for name in openlora:
        check_setting(name)


def test_probes_ask_the_grpc_port_each_container_serves() -> None:
    serving = {"store": 50053, "attribution": 50054, "worker": 50052, "gateway": 50051}
    for container in containers():
        if container["name"] not in serving:
            continue
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == serving[container["name"]]
        assert container["args"] == [container["name"], "serve"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == ports["grpc"], (container["name"], probe)


def test_worker_spool_lives_on_the_pods_own_volume() -> None:
    (worker,) = [d for d in documents() if d["kind"] == "StatefulSet"]
    container = worker["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert [t["metadata"]["name"] for t in worker["spec"]["volumeClaimTemplates"]] == ["spool"]
    assert env["OPENLORA_WORKER_SPOOL_DIR"]["value"].startswith(mounts["spool"] + "/")
    assert env["OPENLORA_WORKER_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_kustomization_renders() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(rendered) if doc)
    assert kinds.count("Deployment") == 3 and "StatefulSet" in kinds and "Job" in kinds
    assert all(
        doc["metadata"].get("namespace") == "openlora"
        for doc in yaml.safe_load_all(rendered)
        if doc and doc["kind"] != "Namespace"
    )


def test_the_example_api_key_secret_is_a_valid_key_file() -> None:
    from services.gateway.keys import TenantLimits, parse_key_ring

    (secret,) = [
        d for d in documents() if d["kind"] == "Secret" and d["metadata"]["name"] == "openlora-api-keys"
    ]
    ring = parse_key_ring(secret["stringData"]["api-keys.json"], TenantLimits(64, 0), "secrets.example.yaml")
    assert ring.limits["acme"].max_concurrent_streams == 32


def test_network_policies_let_in_exactly_the_roles_the_table_allows() -> None:
    """Each service's gRPC port admits the pods whose role may call one of its RPCs (operators come
    through port-forward), everything else is denied; only the gateway is open to the world."""
    from services.common.trust.roles import AUTHORIZATION, OPERATOR

    policies = {d["metadata"]["name"]: d["spec"] for d in documents() if d["kind"] == "NetworkPolicy"}
    deny = policies.pop("openlora-default-deny")
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    grpc_port = {"store": 50053, "attribution": 50054, "worker": 50052, "gateway": 50051}
    for component, port in grpc_port.items():
        spec = policies[f"openlora-{component}"]
        assert spec["podSelector"] == {"matchLabels": {"app": f"openlora-{component}"}}
        (rule,) = [r for r in spec["ingress"] if {"port": port, "protocol": "TCP"} in r["ports"]]
        if component == "gateway":
            assert "from" not in rule  # clients from anywhere
            continue
        callers = {role for roles in AUTHORIZATION[component].values() for role in roles} - {OPERATOR}
        admitted = {peer["podSelector"]["matchLabels"]["app"] for peer in rule["from"]}
        assert admitted == {f"openlora-{role.value}" for role in callers}, component


def test_every_service_mounts_the_shared_secret_its_settings_name() -> None:
    (config,) = [d for d in documents() if d["kind"] == "ConfigMap"]
    for prefix in SETTINGS:
        assert config["data"][f"{prefix}SERVICE_SECRET_FILE"] == "/etc/openlora/service/secret"
    for doc in documents():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["service-secret"]["secret"]["secretName"] == "openlora-service-secret"
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["service-secret"] == "/etc/openlora/service", doc["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_mutual_tls_overlay_secures_every_hop_behind_the_gateway() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S.parent / "k8s-mtls")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    workloads = {
        d["metadata"]["name"].removeprefix("openlora-"): d["spec"]["template"]["spec"]
        for d in yaml.safe_load_all(rendered)
        if d and d["kind"] in ("Deployment", "StatefulSet")
    }
    hops = {
        "store": [],
        "attribution": ["STORE"],
        "worker": ["STORE", "ATTRIBUTION"],
        "gateway": ["UPSTREAM"],
    }
    for name, pod in workloads.items():
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        for variable in env:
            if variable.startswith("OPENLORA_"):
                check_setting(variable)
        prefix = f"OPENLORA_{name.upper()}_"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == f"openlora-tls-{name}"
        for hop in hops[name]:  # every hop it calls presents its certificate
            assert env[f"{prefix}{hop}_TLS_CERT_FILE"] == "/etc/openlora/tls/tls.crt", (name, hop)
        if name == "gateway":
            continue  # its clients use API keys; the kubelet's gRPC probes still reach it
        assert env[f"{prefix}TLS_CLIENT_CA_FILE"] == "/etc/openlora/tls/ca.crt"
        for probe in ("readinessProbe", "livenessProbe"):
            assert "grpc" not in container[probe]
            assert container[probe]["exec"]["command"][:2] == ["openlora", "health"], (name, probe)
    certificates = list(
        yaml.safe_load_all((K8S.parent / "k8s-mtls" / "certificates.example.yaml").read_text())
    )
    from services.common.trust.roles import Role

    names = {c["spec"]["commonName"] for c in certificates}
    assert {r.value for r in Role} <= names
