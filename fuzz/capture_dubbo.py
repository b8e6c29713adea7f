"""Capture Dubbo sessions with varied arguments from real peers for the seeds (run by hand).

    .venv/bin/python -m fuzz.capture_dubbo && .venv/bin/python -m fuzz.seeds

The codec tests' harness starts the sofa-rpc-node provider and relays (through our codec,
nothing changed) the calls of two real consumers: dubbo-ssl-python 0.9.6, whose arguments are
ints, longs, doubles, booleans, strings long and short and lists of one type (it cannot write null
or maps), with attachments, and sofa-rpc-node with many attachments, a failing call and an exception
result. The golden vectors hold one frame of each kind with string arguments only. Frames are
written per consumer and direction to ``fuzz/captures/dubbo/<consumer>-{requests,replies}.hex``,
one per line, in order.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "captures" / "dubbo"

PYTHON_CALLS: list[dict[str, Any]] = [
    {"method": "sayHello", "args": [7, -70000, 2**40, 2.5, True]},
    {"method": "sayHello", "args": [[1, 2, -3], ["a", "b"], [2.0, 0.5], [True, False]]},
    {"method": "sayHello", "args": ["é" * 40, "x" * 1500], "context": {"x-tenant": "t1"}},
    {"method": "attachments", "args": [], "context": {f"k{i}": "v" * i for i in range(12)}},
    {"method": "fail", "args": ["boom"]},
    {"method": "noSuchMethod", "args": [["x", "y"], 3]},
]
NODE_CALLS: list[dict[str, Any]] = [
    {"method": "sayHello", "args": ["node"], "props": {"x-route": "canary", "empty": ""}},
    {"method": "attachments", "props": {f"p{i}": str(i) * 20 for i in range(20)}},
    {"method": "exceptionResult", "args": ["bad"]},
    {"method": "fail", "args": ["boom" * 50]},
]


def _harness() -> Any:
    sys.path.insert(0, str(ROOT / "codecs" / "dubbo" / "tests"))
    return importlib.import_module("dubbo_harness")


def main() -> None:
    harness = _harness()
    OUT.mkdir(parents=True, exist_ok=True)
    provider, port = harness.start_node_provider()
    relay = harness.Relay(port, rewrite_ids=False)
    consumers = {
        "dubbo-ssl-python": (harness.start_python_consumer(relay.port), PYTHON_CALLS),
        "sofa-rpc-node": (harness.start_node_consumer(relay.port), NODE_CALLS),
    }
    try:
        for name, (consumer, calls) in consumers.items():
            relay.reset()
            for call in calls:
                result = consumer.call(**call)
                try:  # a call the consumer could not encode never reaches the relay
                    relay.wait_for(lambda s: s.direction == "up", timeout=3)
                except AssertionError:
                    print(f"{name} {call['method']}: no reply relayed ({result})")
            for direction, label in (("down", "requests"), ("up", "replies")):
                frames = [s.metadata.frame.hex() for s in relay.seen if s.direction == direction]
                (OUT / f"{name}-{label}.hex").write_text("\n".join(frames) + "\n")
                print(f"{name}-{label}: {len(frames)} frames")
    finally:
        for consumer, _ in consumers.values():
            consumer.close()
        relay.close()
        provider.close()


if __name__ == "__main__":
    main()
