"""The demo's mesh configuration: Aeraki and Istio resources, written as YAML text.

For each protocol: an ``ApplicationProtocol``, a ``ServiceEntry`` with endpoints v1 and v2, a
``DestinationRule`` with the two subsets, and a ``MetaRouter`` with Aeraki's two classic routes:
method ``sayHello`` goes to v2, everything else is split 20/80 between v1 and v2. One
``ProxyConfig`` binds a listener per service on 127.0.0.1 with an ephemeral port.
"""

from __future__ import annotations

from dataclasses import dataclass

#: route name -> {subset: weight percent}; what the summary compares observed traffic with.
ROUTES: dict[str, dict[str, int]] = {
    "sayhello-to-v2": {"v2": 100},
    "split-20-80": {"v1": 20, "v2": 80},
}
#: method -> the route the MetaRouter sends it to.
METHOD_ROUTE = {"sayHello": "sayhello-to-v2", "ping": "split-20-80"}


@dataclass(frozen=True)
class DemoService:
    """One protocol's service in the demo."""

    name: str  # resource name
    protocol: str  # Aeraki protocol name (thrift, dubbo, ...)
    codec: str  # ApplicationProtocol.codec
    host: str  # the ServiceEntry host clients address
    port: int  # the service port (the listener's key; never bound as such)
    endpoints: dict[str, int]  # version -> the real server's port on 127.0.0.1
    method_attribute: str = "method"


THRIFT_HOST = "thrift-sample-server.meta-thrift.svc.cluster.local"
DUBBO_HOST = "org.apache.dubbo.samples.basic.api.demoservice"


def thrift_service(endpoints: dict[str, int]) -> DemoService:
    """The Thrift ``Hello`` service (Aeraki's thrift sample names)."""
    return DemoService(
        "thrift-sample-server",
        "thrift",
        "aeraki.meta_protocol.codec.thrift",
        THRIFT_HOST,
        9090,
        endpoints,
    )


def dubbo_service(endpoints: dict[str, int]) -> DemoService:
    """The Dubbo ``DemoService`` (Aeraki's dubbo sample names)."""
    return DemoService(
        "dubbo-sample-provider",
        "dubbo",
        "aeraki.meta_protocol.codec.dubbo",
        DUBBO_HOST,
        20880,
        endpoints,
    )


def service_yaml(svc: DemoService) -> str:
    """The five Aeraki/Istio documents for one service."""
    name = svc.name
    port_name = f"tcp-metaprotocol-{svc.protocol}-server"
    endpoints = "".join(
        f"""
    - address: 127.0.0.1
      ports: {{{port_name}: {port}}}
      labels: {{version: {version}}}"""
        for version, port in sorted(svc.endpoints.items())
    )
    subsets = "".join(
        f"""
    - name: {version}
      labels: {{version: {version}}}"""
        for version in sorted(svc.endpoints)
    )
    routes = f"""
    - name: sayhello-to-v2
      match:
        attributes:
          {svc.method_attribute}: {{exact: sayHello}}
      route:
        - destination: {{host: {svc.host}, port: {{number: {svc.port}}}, subset: v2}}
    - name: split-20-80
      route:
        - destination: {{host: {svc.host}, port: {{number: {svc.port}}}, subset: v1}}
          weight: 20
        - destination: {{host: {svc.host}, port: {{number: {svc.port}}}, subset: v2}}
          weight: 80"""
    return f"""\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {{name: {svc.protocol}}}
spec:
  protocol: {svc.protocol}
  codec: {svc.codec}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{svc.host}]
  ports:
    - number: {svc.port}
      name: {port_name}
      protocol: TCP
  resolution: STATIC
  endpoints:{endpoints}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: {name}}}
spec:
  host: {svc.host}
  subsets:{subsets}
---
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata: {{name: {name}}}
spec:
  hosts: [{svc.host}]
  routes:{routes}
"""


def proxy_yaml(services: list[DemoService], *, admin: bool = True) -> str:
    """The engine's own document: one loopback listener per service, an admin endpoint."""
    listeners = "".join(
        f"""
    - host: {svc.host}
      port: {svc.port}
      bind: "127.0.0.1:0\""""
        for svc in services
    )
    admin_part = '\n  admin: {bind: "127.0.0.1:0"}' if admin else ""
    return f"""\
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {{name: demo}}
spec:
  listeners:{listeners}{admin_part}
  timeouts: {{connect: 1s, route: 5s, drain: 1s}}
  # Istio's standard metrics too, so Kiali and the Grafana dashboard's Istio panels fill.
  telemetry:
    istioMetrics: true
    workload: {{name: demo-client, namespace: demo, app: demo-client, version: v1}}
"""


def demo_yaml(services: list[DemoService]) -> str:
    """The whole demo configuration as one multi-document YAML text."""
    return "---\n".join([*(service_yaml(s) for s in services), proxy_yaml(services)])
