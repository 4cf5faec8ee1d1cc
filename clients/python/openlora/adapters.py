"""The adapter store's tenant-facing calls in plain Python: what a caller passes and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from openlora.v1 import adapter_store_pb2 as pb
from openlora.v1 import common_pb2

VISIBILITIES = {"public": pb.PUBLIC, "private": pb.PRIVATE}
ROLES = {"trainer": pb.TRAINER, "data": pb.DATA}


def adapter_ref(adapter: str) -> common_pb2.AdapterRef:
    """`id` (the latest version) or `id@version`; a source URI (hf://org/repo@rev) keeps its `@`,
    which belongs to the URI."""
    if "://" in adapter:
        return common_pb2.AdapterRef(id=adapter)
    adapter_id, _, version = adapter.partition("@")
    return common_pb2.AdapterRef(id=adapter_id, version=version)


@dataclass(frozen=True)
class Contributor:
    id: str
    role: str
    """`trainer` or `data`."""
    share: float

    @classmethod
    def parse(cls, text: str) -> Contributor:
        """`id:role:share`, as the CLI takes it (`alice:trainer:0.7`); a ValueError says what is wrong."""
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or parts[1].lower() not in ROLES:
            raise ValueError(f"{text!r}: expected id:role:share with role trainer or data")
        try:
            return cls(parts[0], parts[1].lower(), float(parts[2]))
        except ValueError:
            raise ValueError(f"{text!r}: the share {parts[2]!r} is not a number") from None


@dataclass(frozen=True)
class Provenance:
    trainer: str = ""
    datasets: tuple[str, ...] = ()
    contributors: tuple[Contributor, ...] = ()

    def to_proto(self) -> pb.Provenance:
        for c in self.contributors:
            if c.role not in ROLES:
                raise ValueError(f"contributor {c.id!r}: role must be one of {', '.join(ROLES)}")
        return pb.Provenance(
            trainer=self.trainer,
            datasets=list(self.datasets),
            contributors=[
                pb.Contributor(id=c.id, role=ROLES[c.role], share=c.share) for c in self.contributors
            ],
        )

    @classmethod
    def from_proto(cls, message: pb.Provenance) -> Provenance:
        return cls(
            trainer=message.trainer,
            datasets=tuple(message.datasets),
            contributors=tuple(
                Contributor(c.id, pb.Role.Name(c.role).lower(), c.share) for c in message.contributors
            ),
        )


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    version: str
    digest: str
    """sha256 of the canonical weights."""
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    owner: str
    visibility: str
    """`public` or `private`."""
    provenance: Provenance = field(default_factory=Provenance)
    created_at: datetime | None = None
    chat_template: str = ""
    """The adapter's own chat template ("": the base model's applies)."""

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"

    @classmethod
    def from_proto(cls, info: pb.AdapterInfo) -> AdapterInfo:
        return cls(
            id=info.id,
            version=info.version,
            digest=info.digest,
            base_model=info.base_model,
            rank=info.rank,
            alpha=info.alpha,
            target_modules=tuple(info.target_modules),
            size_bytes=info.size_bytes,
            owner=info.owner,
            visibility=pb.Visibility.Name(info.visibility).lower(),
            provenance=Provenance.from_proto(info.provenance),
            created_at=info.created_at.ToDatetime(tzinfo=UTC) if info.HasField("created_at") else None,
            chat_template=info.chat_template,
        )


def visibility(public: bool) -> pb.Visibility.ValueType:
    return pb.PUBLIC if public else pb.PRIVATE


def upload_header(
    adapter_id: str, base_model: str, public: bool, provenance: Provenance | None
) -> pb.UploadHeader:
    return pb.UploadHeader(
        id=adapter_id,
        base_model=base_model,
        visibility=visibility(public),
        provenance=(provenance or Provenance()).to_proto(),
    )


def import_request(
    source_uri: str, adapter_id: str, base_model: str, public: bool, provenance: Provenance | None
) -> pb.ImportRequest:
    return pb.ImportRequest(
        source_uri=source_uri,
        id=adapter_id,
        base_model=base_model,
        visibility=visibility(public),
        provenance=(provenance or Provenance()).to_proto(),
    )


def list_request(base_model: str, owner: str, page_token: str) -> pb.ListAdaptersRequest:
    return pb.ListAdaptersRequest(base_model=base_model, owner=owner, page_token=page_token)
