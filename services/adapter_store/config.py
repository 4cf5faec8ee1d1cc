from pydantic_settings import SettingsConfigDict

from services.common.config import Port, ServiceSettings


class StoreSettings(ServiceSettings):
    """Settings of the adapter store (`openlora store serve`)."""

    model_config = SettingsConfigDict(env_prefix="OPENLORA_STORE_")

    port: Port = 50053
    """TCP port workers and the gateway connect to; 0 picks a free port."""
