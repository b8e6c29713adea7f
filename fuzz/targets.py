"""The fuzz targets: one per decoder the engine feeds with bytes from the network.

Each target is a name, the check it runs on one input (raising
:class:`~fuzz.oracle.Violation`) and its bounds. Codec targets use a small
``max_frame_size`` so the buffering rules are reachable with short inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from metaprotocol_dubbo import DubboCodec
from metaprotocol_thrift import ThriftCodec

from metaprotocol_sdk.codec import Codec
from metaprotocol_sdk.examples.kv import KVCodec

from .bounds import Bounds
from .config_oracle import check_config
from .hessian_oracle import check_hessian
from .oracle import check_codec

#: ``max_frame_size`` of every codec target.
FRAME_LIMIT = 16 * 1024


@dataclass(frozen=True)
class Target:
    """One fuzz target."""

    name: str
    about: str
    check: Callable[[bytes], None]
    bounds: Bounds = field(default_factory=Bounds)
    #: Inputs the quick CI run tries (about a second each at the machine's speed).
    quick_runs: int = 2000


def _codec(name: str, about: str, factory: Callable[[], Codec]) -> Target:
    return Target(name, about, partial(check_codec, factory))


def _thrift(transport: str = "auto", strict: bool = True) -> Callable[[], Codec]:
    return partial(ThriftCodec, max_frame_size=FRAME_LIMIT, transport=transport, strict=strict)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _codec("dubbo", "DubboCodec.decode", partial(DubboCodec, max_frame_size=FRAME_LIMIT)),
        _codec("thrift-auto", "ThriftCodec, transport and protocol detected", _thrift()),
        _codec(
            "thrift-framed",
            "ThriftCodec, framed transport, binary (non-strict too) or compact",
            _thrift(transport="framed", strict=False),
        ),
        _codec(
            "thrift-unframed",
            "ThriftCodec, unframed (buffered) transport, binary (non-strict too) or compact",
            _thrift(transport="unframed", strict=False),
        ),
        _codec("thrift-header", "ThriftCodec, THeader transport", _thrift(transport="header")),
        _codec("kv", "the example KV codec", partial(KVCodec, max_frame_size=FRAME_LIMIT)),
        Target("hessian", "Hessian 2.0 Decoder: read, skip, skip then read", check_hessian),
        # YAML builds many objects per input byte; the per-byte allowance says so.
        Target(
            "config",
            "loads_config on any text",
            check_config,
            Bounds(memory_per_byte=4096, seconds_per_byte=200e-6),
            quick_runs=500,
        ),
    )
}
