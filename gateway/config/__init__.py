"""The YAML configuration: frozen dataclasses, one loader, errors with field paths.

``schema`` builds dataclasses from parsed YAML, ``values`` parses the values with a
syntax of their own, ``settings`` declares the fields, ``loading`` reads a file
(``${VAR}``, duplicate keys, checks across fields).
"""

from gateway.config.errors import ConfigError
from gateway.config.loading import load_settings, parse_settings
from gateway.config.settings import (
    AccessLogSettings,
    AdminSettings,
    CampaignSettings,
    CartSettings,
    GatewaySettings,
    IdentitySettings,
    JwtSettings,
    RedisSettings,
    Settings,
    UpstreamSettings,
)
from gateway.config.values import Route

__all__ = [
    "AccessLogSettings",
    "AdminSettings",
    "CampaignSettings",
    "CartSettings",
    "ConfigError",
    "GatewaySettings",
    "IdentitySettings",
    "JwtSettings",
    "RedisSettings",
    "Route",
    "Settings",
    "UpstreamSettings",
    "load_settings",
    "parse_settings",
]
