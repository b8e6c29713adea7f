"""Real Dubbo consumer for the test suite: dubbo-ssl-python 0.9.6, direct connection.

Usage: python dubbo_ssl_consumer.py HOST:PORT
Prints {"ready": true}, then reads JSON lines on stdin, one call each:
  {"id": 1, "method": "sayHello", "args": ["x"], "context": {"k": "v"}, "timeout": 5}
  {"id": 2, "heartbeat_frames": true}   (the heartbeat frames this library writes, as hex)
and prints one JSON line per call: {"id": 1, "result": ...} or {"id": 1, "error": "..."}.
"""

from __future__ import annotations

import json
import logging
import sys


def main() -> None:
    """Serve calls from stdin until EOF."""
    logging.disable(logging.CRITICAL)  # the library logs every exception it reports
    # Imported here: dubbo_ssl starts daemon threads at import.
    from dubbo_ssl.client import DubboClient
    from dubbo_ssl.common import constants

    host = sys.argv[1]
    client = DubboClient("com.example.DemoService", group="", version="1.0.0", host=host)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        out: dict[str, object] = {"id": msg["id"]}
        if msg.get("heartbeat_frames"):
            request_id = [0, 0, 0, 0, 0, 0, 0, 9]
            out["request"] = bytes(
                constants.CLI_HEARTBEAT_REQ_HEAD + request_id + constants.CLI_HEARTBEAT_TAIL
            ).hex()
            out["reply"] = bytes(
                constants.CLI_HEARTBEAT_RES_HEAD + request_id + constants.CLI_HEARTBEAT_TAIL
            ).hex()
        else:
            try:
                out["result"] = client.call(
                    msg["method"],
                    msg.get("args", []),
                    context=msg.get("context"),
                    timeout=msg.get("timeout", 5),
                )
            except Exception as exc:  # reported to the test as data
                out["error"] = str(exc)
                out["type"] = type(exc).__name__
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
