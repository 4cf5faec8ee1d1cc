"""Manifest (the store's JSON) <-> protobuf messages."""

from __future__ import annotations

import datetime
from typing import Any

from openlora.v1 import adapter_store_pb2 as pb

from services.adapter_store.base_models import BaseModelSpec
from services.adapter_store.catalog import Manifest


def provenance_to_dict(provenance: pb.Provenance) -> dict[str, Any]:
    return {
        "trainer": provenance.trainer,
        "datasets": list(provenance.datasets),
        "contributors": [
            {
                "id": c.id,
                "role": pb.Role.Name(c.role) if c.role in pb.Role.values() else str(c.role),
                "share": c.share,
            }
            for c in provenance.contributors
        ],
    }


def provenance_to_proto(provenance: dict[str, Any]) -> pb.Provenance:
    return pb.Provenance(
        trainer=provenance.get("trainer", ""),
        datasets=provenance.get("datasets", []),
        contributors=[
            pb.Contributor(id=c["id"], role=pb.Role.Value(c["role"]), share=c["share"])
            for c in provenance.get("contributors", [])
        ],
    )


def visibility_name(value: int) -> str:
    return "PUBLIC" if value == pb.PUBLIC else "PRIVATE"


def info_to_proto(manifest: Manifest) -> pb.AdapterInfo:
    info = pb.AdapterInfo(
        id=manifest["id"],
        version=manifest["version"],
        digest=manifest["digest"],
        base_model=manifest["base_model"],
        rank=manifest["rank"],
        alpha=manifest["alpha"],
        target_modules=manifest["target_modules"],
        size_bytes=manifest["size_bytes"],
        owner=manifest["owner"],
        visibility=pb.Visibility.Value(manifest["visibility"]),
        provenance=provenance_to_proto(manifest["provenance"]),
        chat_template=manifest.get("chat_template", ""),  # manifests before templates have none
    )
    info.created_at.FromDatetime(datetime.datetime.fromisoformat(manifest["created_at"]))
    return info


def base_model_to_proto(spec: BaseModelSpec) -> pb.BaseModel:
    return pb.BaseModel(
        name=spec.name,
        num_layers=spec.num_layers,
        model_type=spec.model_type,
        modules=[
            pb.ModuleShape(name=m.name, in_features=m.in_features, out_features=m.out_features)
            for m in spec.modules.values()
        ],
    )
