from pydantic_settings import SettingsConfigDict

from services.common.config import Port, ServiceSettings


class AttributionSettings(ServiceSettings):
    """Settings of the attribution service (`openlora attribution serve`)."""

    model_config = SettingsConfigDict(env_prefix="OPENLORA_ATTRIBUTION_")

    port: Port = 50054
    """TCP port workers connect to; 0 picks a free port."""
