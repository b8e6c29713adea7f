"""Make ``proxy_kit.py`` (tests/proxy) and ``collector.py`` importable (importlib mode)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "proxy"))
