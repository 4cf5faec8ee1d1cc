from pydantic_settings import SettingsConfigDict

from services.common.config import Port, ServiceSettings


class WorkerSettings(ServiceSettings):
    """Settings of an inference worker (`openlora worker serve`)."""

    model_config = SettingsConfigDict(env_prefix="OPENLORA_WORKER_")

    port: Port = 50052
    """TCP port the gateway connects to; 0 picks a free port."""
