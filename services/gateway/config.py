from pydantic_settings import SettingsConfigDict

from services.common.config import Port, ServiceSettings


class GatewaySettings(ServiceSettings):
    """Settings of the gateway (`openlora gateway serve`)."""

    model_config = SettingsConfigDict(env_prefix="OPENLORA_GATEWAY_")

    port: Port = 50051
    """TCP port clients connect to; 0 picks a free port."""
