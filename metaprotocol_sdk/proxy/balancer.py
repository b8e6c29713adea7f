"""Load balancers: pick one upstream host of a cluster for a request."""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from typing import Generic, TypeVar
from typing import Protocol as TypingProtocol

from metaprotocol_sdk.metadata import Metadata

from .config.models import LoadBalancer


class Host(TypingProtocol):
    """What a balancer needs from a host: its in-flight request count and a key."""

    active: int

    @property
    def key(self) -> str: ...


H = TypeVar("H", bound=Host)


class Balancer(Generic[H]):
    """Base class: ``pick`` returns a host, or ``None`` when the cluster has none."""

    def __init__(self, hosts: Sequence[H]) -> None:
        self.hosts = list(hosts)

    def pick(self, metadata: Metadata) -> H | None:
        """The host for this request."""
        raise NotImplementedError


class RoundRobin(Balancer[H]):
    """Each host in turn."""

    def __init__(self, hosts: Sequence[H]) -> None:
        super().__init__(hosts)
        self._next = 0

    def pick(self, metadata: Metadata) -> H | None:
        hosts = self.hosts
        if not hosts:
            return None
        i = self._next
        if i >= len(hosts):
            i = 0
        self._next = i + 1
        return hosts[i]


class Random(Balancer[H]):
    """A uniformly random host (seedable for tests)."""

    def __init__(self, hosts: Sequence[H], seed: int | None = None) -> None:
        super().__init__(hosts)
        self._choice = random.Random(seed).choice

    def pick(self, metadata: Metadata) -> H | None:
        return self._choice(self.hosts) if self.hosts else None


class LeastRequest(Balancer[H]):
    """Power of two choices on in-flight requests (Envoy's default for LEAST_REQUEST)."""

    def __init__(self, hosts: Sequence[H], seed: int | None = None) -> None:
        super().__init__(hosts)
        self._rand = random.Random(seed)

    def pick(self, metadata: Metadata) -> H | None:
        hosts = self.hosts
        n = len(hosts)
        if n <= 2:
            if not n:
                return None
            return hosts[0] if n == 1 or hosts[0].active <= hosts[1].active else hosts[1]
        a, b = self._rand.sample(hosts, 2)
        return a if a.active <= b.active else b


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ConsistentHash(Balancer[H]):
    """A hash ring over one attribute's value; requests without it go round robin.

    The ring uses 64-bit BLAKE2b (stable across processes, unlike ``hash``; CRC32 is too linear
    to spread similar keys) with 100 points per host, so adding or removing a host moves only
    about ``1/n`` of the keys.
    """

    POINTS = 100

    def __init__(self, hosts: Sequence[H], attribute: str) -> None:
        super().__init__(hosts)
        self._key = attribute.lower()
        ring = sorted(
            (_hash(f"{host.key}#{i}".encode()), n)
            for n, host in enumerate(self.hosts)
            for i in range(self.POINTS)
        )
        self._points = [p for p, _ in ring]
        self._owners = [self.hosts[n] for _, n in ring]
        self._fallback: RoundRobin[H] = RoundRobin(hosts)

    def pick(self, metadata: Metadata) -> H | None:
        value = metadata.attributes.get_folded(self._key)
        if value is None or not self._points:
            return self._fallback.pick(metadata)
        # surrogatepass: a lone surrogate is a valid Java string (Hessian decodes one); strict
        # UTF-8 raised out of the read that carried the request.
        i = bisect.bisect(self._points, _hash(value.encode("utf-8", "surrogatepass")))
        return self._owners[i if i < len(self._owners) else 0]


def make_balancer(policy: LoadBalancer, hosts: Sequence[H]) -> Balancer[H]:
    """The balancer for a policy."""
    if policy.policy == "RANDOM":
        return Random(hosts)
    if policy.policy == "LEAST_REQUEST":
        return LeastRequest(hosts)
    if policy.policy == "CONSISTENT_HASH":
        assert policy.hash_attribute is not None
        return ConsistentHash(hosts, policy.hash_attribute)
    return RoundRobin(hosts)
