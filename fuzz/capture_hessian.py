"""Capture Hessian 2.0 values written by real peers for the seed corpus (run by hand).

    .venv/bin/python -m fuzz.capture_hessian && .venv/bin/python -m fuzz.seeds

Caucho Hessian 4.0.38 on OpenJDK 17 and hessian.js 2.11.0 encode their named samples (the
interop drivers of ``codecs/dubbo/tests/interop``: every value type, compact and long forms,
chunked strings and binaries, typed lists, maps, objects, references, enums). Samples up to
16 KiB are written to ``fuzz/captures/hessian/{java,node}.tsv`` as ``name<TAB>hex`` lines.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "captures" / "hessian"

#: Larger samples add little the fuzzer can use (it mutates inputs up to 4 KiB by default).
LARGEST = 16 * 1024


def _interop() -> Any:
    """The interop drivers' module (a test helper, not a package)."""
    sys.path.insert(0, str(ROOT / "codecs" / "dubbo" / "tests" / "interop"))
    return importlib.import_module("peers")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    peers = _interop()
    for peer, samples in (("java", peers.java_encoded()), ("node", peers.node_encoded())):
        lines = [f"{name}\t{data.hex()}" for name, data in sorted(samples.items())]
        kept = [line for line in lines if len(line.split("\t")[1]) <= 2 * LARGEST]
        (OUT / f"{peer}.tsv").write_text("\n".join(kept) + "\n")
        print(f"{peer}: {len(kept)} of {len(lines)} samples")


if __name__ == "__main__":
    main()
