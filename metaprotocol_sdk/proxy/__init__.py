"""The protocol-free proxy engine: routes any codec's messages by their metadata.

Programmatic use::

    from metaprotocol_sdk.proxy import Engine, load_config

    engine = Engine(load_config(["mesh.yaml"]))
    await engine.start()
    print(engine.listener_addresses, engine.admin_address)
    ...
    await engine.stop(drain=5.0)
"""

from metaprotocol_sdk.errors import ConfigError

from .config import Config, load_config, loads_config
from .engine import Engine
from .stats import Stats

__all__ = ["Config", "ConfigError", "Engine", "Stats", "load_config", "loads_config"]
