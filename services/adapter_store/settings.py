from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import MiB, Port, ServiceSettings


def _default_data_dir() -> Path:
    import os

    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "openlora" / "adapter-store"


class StoreSettings(ServiceSettings):
    """Settings of the adapter store (`openlora store serve`)."""

    model_config = SettingsConfigDict(env_prefix="OPENLORA_STORE_")

    port: Port = 50053
    """TCP port workers and the gateway connect to; 0 picks a free port."""

    backend: Literal["local", "s3"] = "local"
    """Where blobs and the catalog live: `local` (a directory, the embedded default) or `s3`."""

    local_dir: Path = Field(default_factory=_default_data_dir)
    """Directory of the `local` backend."""

    s3_bucket: str = "openlora-adapters"
    """Bucket of the `s3` backend; created at start-up when missing."""

    s3_prefix: str = ""
    """Key prefix inside the bucket, so several stores can share one bucket."""

    s3_endpoint_url: str | None = None
    """S3 endpoint (MinIO, SeaweedFS, ...); None means AWS."""

    s3_region: str = "us-east-1"
    """S3 region."""

    s3_access_key_id: str | None = None
    """S3 access key; None uses boto3's usual chain (env, profile, instance role)."""

    s3_secret_access_key: str | None = None
    """S3 secret key, paired with `s3_access_key_id`."""

    s3_addressing_style: Literal["auto", "path", "virtual"] = "path"
    """`path` works with every S3 clone; AWS also accepts `virtual`."""

    max_rank: int = Field(default=128, ge=1, le=4096)
    """Largest LoRA rank accepted."""

    max_adapter_bytes: int = Field(default=1024 * MiB, ge=1024)
    """Largest upload or import accepted (all files together)."""

    max_concurrent_ingests: int = Field(default=2, ge=1)
    """Uploads and imports taken at once; more wait their turn, before their bytes are accepted.
    Their validation runs on threads of its own, so Get, List and Download keep answering however
    heavy the uploads."""

    max_waiting_ingests: int = Field(default=64, ge=0)
    """Uploads and imports that may wait for their turn; one more is refused RESOURCE_EXHAUSTED
    with a retry hint."""

    allowed_dtypes: tuple[Literal["F32", "F16", "BF16"], ...] = ("F32", "F16", "BF16")
    """Tensor dtypes accepted in adapter weights."""

    download_chunk_bytes: int = Field(default=1 * MiB, ge=4096)
    """Size of each data message of a Download stream."""

    page_size: int = Field(default=50, ge=1, le=1000)
    """Default and largest page of `List`."""

    import_schemes: list[str] = Field(default_factory=lambda: ["hf", "s3", "https"])
    """Source URI schemes `Import` may fetch from (`file` and `http` must be added explicitly)."""

    import_allowed_hosts: list[str] = Field(default_factory=list)
    """Hosts `https://` imports may reach (`example.com` or `*.example.com`); empty means any public host."""

    import_allow_private_networks: bool = False
    """Let `https://` imports reach loopback, private and link-local addresses (off: SSRF protection)."""

    import_file_roots: list[Path] = Field(default_factory=list)
    """Directories `file://` imports may read from (needs `file` in import_schemes)."""

    import_timeout_s: float = Field(default=60.0, gt=0)
    """Network timeout of one import fetch."""

    import_proxy_url: str | None = None
    """`http://host:port` of an egress proxy web imports go through (environment proxies are never
    used). The store still checks each URL's host against the allow-list and its addresses, but the
    proxy resolves it again when it connects: keeping it from internal networks is then the proxy's job."""

    import_s3_buckets: list[str] = Field(default_factory=list)
    """Buckets `s3://` imports may read (`team-loras` or `team-*`); empty refuses every s3 import.
    They connect with the `import_s3_*` settings below, never with the store's own bucket credentials,
    so a tenant cannot import from the store's bucket or any other its identity may read."""

    import_s3_endpoint_url: str | None = None
    """S3 endpoint of `s3://` import sources; None is AWS."""

    import_s3_region: str = "us-east-1"
    """Region of `s3://` import sources."""

    import_s3_access_key_id: str | None = None
    """Access key for `s3://` import sources; None sends unsigned requests (public buckets only)."""

    import_s3_secret_access_key: str | None = None
    """Secret key paired with `import_s3_access_key_id`."""

    @model_validator(mode="after")
    def _check_store(self) -> Self:
        if self.backend == "s3" and not self.s3_bucket:
            raise ValueError("s3_bucket is required with backend=s3")
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("s3_access_key_id and s3_secret_access_key must be set together")
        if "file" in self.import_schemes and not self.import_file_roots:
            raise ValueError("file imports need import_file_roots (the directories they may read)")
        return self
