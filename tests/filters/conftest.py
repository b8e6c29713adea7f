"""Make ``proxy_kit`` (tests/proxy) importable here: the example filter also runs in the
engine, over real sockets (pytest runs in importlib mode)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "proxy"))
