"""What every long-lived gRPC stream to a control server shares (xDS, SDS): the reconnect
backoff and the HTTP/2 keepalive that notices a server gone without closing the connection."""

from __future__ import annotations


def backoff_delay(failures: int, initial: float, maximum: float, fraction: float) -> float:
    """Seconds to wait after ``failures`` failed streams in a row: doubling from ``initial``,
    capped at ``maximum``, then scaled by a random 50-100 % (``fraction``: jitter, so that
    replicas cut off together do not all come back in the same instant)."""
    delay = min(maximum, initial * float(2 ** min(failures - 1, 32)))
    return delay * (0.5 + 0.5 * fraction)


def keepalive_options(every: float, patience: float) -> list[tuple[str, int]]:
    """gRPC channel arguments for a PING after ``every`` seconds without one, the stream given
    up when one is not answered within ``patience`` seconds: a server that vanished without
    closing the connection (a node gone, a NAT entry expired) is noticed and the stream
    reopened, instead of believed connected for good."""
    wait = int(patience * 1000)
    return [
        ("grpc.keepalive_time_ms", int(every * 1000)),
        ("grpc.keepalive_timeout_ms", wait),
        # What ends the stream when the PING goes unanswered (gRPC's own default is a minute).
        ("grpc.http2.ping_timeout_ms", wait),
        # The streams are quiet for long stretches: keep pinging without data frames.
        ("grpc.http2.max_pings_without_data", 0),
        # No bandwidth probes (PINGs sent on received data, for bulk transfers): the keepalive
        # PINGs alone decide when a silent server is given up, at a known interval.
        ("grpc.http2.bdp_probe", 0),
    ]
