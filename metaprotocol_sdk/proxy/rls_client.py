"""The gRPC client of a rate limit service: Envoy's ``RateLimitService/ShouldRateLimit``.

One client per ``rateLimitService`` cluster, with one channel (opened on the first call,
kept for the configuration's life, closed when a reload drops the cluster or the engine
stops). Its replies are capped at :data:`MAX_REPLY_BYTES`: a larger one fails the call, as
does a reply that does not decode. Needs the ``ratelimit`` extra (gRPC and ``xds-protos``);
the engine imports this module only when a MetaRouter sets ``globalRateLimit``.
"""

from __future__ import annotations

import ipaddress

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from .global_ratelimit import Descriptor, RateLimitServiceError

#: Largest reply accepted (a ``RateLimitResponse`` with a status per descriptor is a few
#: hundred bytes; headers and quotas it may add stay far below this).
MAX_REPLY_BYTES = 64 * 1024
#: Largest request sent (descriptor values come from request attributes).
MAX_REQUEST_BYTES = 1024 * 1024
#: Reconnect backoff towards an unreachable service, in milliseconds: calls fail at once
#: (``unavailable``) meanwhile, and a service that comes back is used again within the cap.
RECONNECT_BACKOFF_MS = (100, 2000)
_OVER_LIMIT = rls_pb2.RateLimitResponse.Code.OVER_LIMIT


def grpc_target(endpoints: tuple[tuple[str, int], ...]) -> str:
    """A gRPC target for ``endpoints``: IP addresses as an ``ipv4:``/``ipv6:`` list (gRPC
    balances over them), or one name resolved by DNS."""
    addresses = []
    for host, port in endpoints:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return f"dns:///{host}:{port}"  # the loader allows a name only alone
        addresses.append((ip, port))
    if all(ip.version == 4 for ip, _ in addresses):
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in addresses)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in addresses)


class RateLimitServiceClient:
    """Calls ``ShouldRateLimit`` on the endpoints of one cluster."""

    def __init__(self, name: str, endpoints: tuple[tuple[str, int], ...]) -> None:
        self.name = name
        self.endpoints = endpoints
        self.target = grpc_target(endpoints)
        self._channel: grpc.aio.Channel | None = None
        self._stub: rls_pb2_grpc.RateLimitServiceStub | None = None

    def _open(self) -> rls_pb2_grpc.RateLimitServiceStub:
        low, high = RECONNECT_BACKOFF_MS
        self._channel = grpc.aio.insecure_channel(
            self.target,
            options=[
                ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
                ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
                ("grpc.lb_policy_name", "round_robin"),
                ("grpc.enable_retries", 0),
                ("grpc.initial_reconnect_backoff_ms", low),
                ("grpc.min_reconnect_backoff_ms", low),
                ("grpc.max_reconnect_backoff_ms", high),
            ],
        )
        self._stub = rls_pb2_grpc.RateLimitServiceStub(self._channel)
        return self._stub

    async def should_rate_limit(
        self, domain: str, descriptors: list[Descriptor], timeout: float
    ) -> bool:
        """``True`` when the service answers ``OVER_LIMIT`` (any other code lets the
        request go, as Envoy's filter does)."""
        stub = self._stub or self._open()
        try:
            request = rls_pb2.RateLimitRequest(
                domain=domain,
                descriptors=[
                    ratelimit_pb2.RateLimitDescriptor(
                        entries=[
                            ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v)
                            for k, v in entries
                        ]
                    )
                    for entries in descriptors
                ],
                hits_addend=1,
            )
        except ValueError as exc:  # a value protobuf cannot send (a lone surrogate: not UTF-8)
            raise RateLimitServiceError("error", f"a descriptor cannot be sent: {exc}") from None
        try:
            reply = await stub.ShouldRateLimit(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                reason = "timeout"
            elif code is grpc.StatusCode.UNAVAILABLE:
                reason = "unavailable"
            else:
                reason = "error"
            raise RateLimitServiceError(reason, f"{code.name}: {exc.details()}") from None
        except Exception as exc:  # the call failed in some other way
            raise RateLimitServiceError("error", f"{type(exc).__name__}: {exc}") from None
        if reply is None:  # what grpc.aio returns for a reply that does not decode
            raise RateLimitServiceError("error", "the reply does not decode")
        return bool(reply.overall_code == _OVER_LIMIT)

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls still running get ``grace`` seconds, then are cancelled."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(grace)
