"""What judging a new connection costs against RBAC policies as istiod writes them (a DENY
filter of N AuthorizationPolicy rules: one port, a namespace regex and an IP block each),
the per-connection work of ``spec.xds.inboundListener``: best of 5 ``_enforced`` calls for a
connection matching none of them (every policy is looked at).

Run: ``.venv/bin/python tests/xds/bench_rbac.py [POLICIES]`` (default 5000).
"""

from __future__ import annotations

import ipaddress
import sys
import time

from envoy.extensions.filters.network.rbac.v3 import rbac_pb2
from google.protobuf import json_format

from metaprotocol_sdk.proxy.authorization import Facts, ListenerAuthorization
from metaprotocol_sdk.proxy.stats import Stats
from metaprotocol_sdk.proxy.xds.rbac import chain_policies
from metaprotocol_sdk.proxy.xds.translate import XdsRefused


def policies(count: int) -> bytes:
    """A DENY filter of ``count`` istiod-shaped policies."""
    by_name = {
        f"ns[foo]-policy[p{i}]-rule[0]": {
            "permissions": [
                {
                    "and_rules": {
                        "rules": [{"or_rules": {"rules": [{"destination_port": 9000 + i % 50}]}}]
                    }
                }
            ],
            "principals": [
                {
                    "and_ids": {
                        "ids": [
                            {
                                "or_ids": {
                                    "ids": [
                                        {
                                            "authenticated": {
                                                "principal_name": {
                                                    "safe_regex": {"regex": f".*/ns/n{i}/.*"}
                                                }
                                            }
                                        }
                                    ]
                                }
                            },
                            {
                                "or_ids": {
                                    "ids": [
                                        {
                                            "direct_remote_ip": {
                                                "address_prefix": "10.0.0.0",
                                                "prefix_len": 8,
                                            }
                                        }
                                    ]
                                }
                            },
                        ]
                    }
                }
            ],
        }
        for i in range(count)
    }
    body = {"rules": {"action": "DENY", "policies": by_name}}
    return json_format.ParseDict(body, rbac_pb2.RBAC()).SerializeToString()


def main(count: int) -> None:
    def refuse(path: str, why: str) -> XdsRefused:
        return XdsRefused("bench", path, why)

    authorization = chain_policies([("rbac", policies(count))], refuse).authorization()
    assert authorization is not None
    owner = ListenerAuthorization(authorization, Stats(), "bench")
    address = ipaddress.ip_address("10.1.2.3")
    cert = {"subjectAltName": (("URI", "spiffe://cluster.local/ns/bar/sa/x"),)}
    facts = Facts(port=9000, secure=True, peercert=cert, remote_ip=address, source_ip=address)
    best = min(_timed(owner, facts) for _ in range(5))
    print(f"{count} policies: {best * 1e3:.2f} ms per connection, {best / count * 1e9:.0f} ns each")


def _timed(owner: ListenerAuthorization, facts: Facts) -> float:
    start = time.perf_counter()
    assert owner._enforced(facts) is None  # judged by every policy, denied by none
    return time.perf_counter() - start


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
