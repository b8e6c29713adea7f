"""Configuration: Istio/Aeraki-shaped YAML documents, validated into :class:`Config`."""

from .durations import parse_duration
from .loader import load_config, loads_config
from .models import (
    Admin,
    AttributeMatch,
    Config,
    Destination,
    DestinationRule,
    Endpoint,
    Limits,
    Listener,
    LoadBalancer,
    MetaRouter,
    Protocol,
    ProxySettings,
    Route,
    Service,
    ServicePort,
    Subset,
    Timeouts,
    Watchdog,
)

__all__ = [
    "Admin",
    "AttributeMatch",
    "Config",
    "Destination",
    "DestinationRule",
    "Endpoint",
    "Limits",
    "Listener",
    "LoadBalancer",
    "MetaRouter",
    "Protocol",
    "ProxySettings",
    "Route",
    "Service",
    "ServicePort",
    "Subset",
    "Timeouts",
    "Watchdog",
    "load_config",
    "loads_config",
    "parse_duration",
]
