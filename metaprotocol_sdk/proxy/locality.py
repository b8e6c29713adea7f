"""Locality failover for endpoints of the configuration's files, as istiod computes it.

istiod sends a sidecar each endpoint's failover priority from the sidecar's locality and the
endpoint's (``applyLocalityFailover``); the engine does the same for the endpoints of its
``ServiceEntry`` files, whose ``locality`` it reads, so that a cluster prefers the endpoints
nearest to it and fails over to the next ones when outlier detection ejects them (the
priority levels of :mod:`~metaprotocol_sdk.proxy.priority`):

* 0: same region, zone and subzone; 1: same region and zone; 2: same region; 3: another
  region, or 4 when a ``failover`` rule of this region names another one than the
  endpoint's; then the levels in use are numbered from 0 without gaps;
* only with outlier detection on the cluster (without it no endpoint is ever ejected, so a
  lower level would never take a request: istiod then sends none; it asks only whether the
  rule has ``outlierDetection``, even one that ejects nothing), the engine's locality
  known, and ``localityLbSetting.enabled`` not false (istiod's mesh default enables it).

With ``failoverPriority``, the endpoints' labels order them instead (see
:func:`failover_priorities`). Computed when a cluster is built, never per request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .config.models import LocalityLbSetting

#: The pod labels istiod reads a workload's locality from, the first one set (dots in a label
#: value stand for ``/``, which label values cannot hold).
LOCALITY_LABELS = ("topology.istio.io/locality", "istio-locality")


def locality_of_labels(labels: dict[str, str]) -> str:
    """A workload's locality from its pod labels, as istiod reads them (``""``: none; a
    fourth part and beyond are not read, as istiod's ``SplitLocalityLabel``)."""
    for key in LOCALITY_LABELS:
        value = labels.get(key)
        if value:
            parts = (value if "/" in value else value.replace(".", "/")).split("/")[:3]
            return "/".join(parts) if parts[0] else ""
    return ""


def locality_parts(locality: str) -> tuple[str, str, str]:
    """``(region, zone, subzone)`` of ``region/zone/subzone`` (missing parts empty)."""
    region, _, rest = locality.partition("/")
    zone, _, subzone = rest.partition("/")
    return region, zone, subzone


def _distance(mine: tuple[str, str, str], theirs: tuple[str, str, str]) -> int:
    """istiod's ``LbPriority``: 0 to 3, by the first of region, zone, subzone that differs."""
    for level, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if a != b:
            return 3 - level
    return 0


#: The labels istiod adds to a workload's and an endpoint's own from their locality, which
#: ``failoverPriority`` may name (``AugmentLabels``).
TOPOLOGY_LABELS = (
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.istio.io/subzone",
)


def with_topology(labels: Mapping[str, str], locality: str) -> dict[str, str]:
    """``labels`` with the region, zone and subzone of ``locality`` under Kubernetes' and
    Istio's topology labels (the parts it has), as istiod augments them."""
    out = dict(labels)
    for key, part in zip(TOPOLOGY_LABELS, locality_parts(locality), strict=True):
        if part:
            out[key] = part
    return out


def failover_priorities(
    own: str,
    localities: Sequence[str],
    setting: LocalityLbSetting | None,
    own_labels: Mapping[str, str] | None = None,
    labels: Sequence[Mapping[str, str]] | None = None,
) -> list[int] | None:
    """The failover priority of each endpoint (``localities``, and their ``labels``) seen
    from this workload (locality ``own``, labels ``own_labels``); ``None``: failover does
    not apply, every endpoint stays at priority 0.

    With ``failoverPriority`` (istiod's ``applyFailoverPriorities``) an endpoint's priority
    is 0 when it has every listed label as the workload has it (or as the list's
    ``label=value`` says), else the number of labels from the first that differs to the end;
    the locality's priorities are added (times 5) only with explicit ``failover`` rules.
    Without it, the locality's alone. Then the levels in use are numbered from 0 without
    gaps. The caller checks the cluster has outlier detection. Linear in the endpoints."""
    if setting is not None and not setting.enabled:
        return None
    ranked = setting.failover_priority if setting is not None else ()
    if not ranked:
        raw = _by_locality(own, localities, setting)
    else:
        assert labels is not None
        raw = _by_labels(own, own_labels or {}, localities, labels, ranked)
        if setting is not None and setting.failover:
            near = _by_locality(own, localities, setting)
            if near is not None:
                base = raw or [0] * len(near)
                raw = [label * 5 + locality for label, locality in zip(base, near, strict=True)]
    if raw is None:
        return None
    levels = {priority: rank for rank, priority in enumerate(sorted(set(raw)))}
    return [levels[priority] for priority in raw]


def _by_labels(
    own: str,
    own_labels: Mapping[str, str],
    localities: Sequence[str],
    labels: Sequence[Mapping[str, str]],
    ranked: Sequence[tuple[str, str | None]],
) -> list[int] | None:
    """Each endpoint's priority by ``failoverPriority`` (``None``: the workload has no
    labels, and istiod then sets none)."""
    if not own_labels:
        return None
    mine = with_topology(own_labels, own)
    wanted = [(label, mine.get(label, "") if value is None else value) for label, value in ranked]
    out = []
    for locality, theirs in zip(localities, labels, strict=True):
        theirs = with_topology(theirs, locality)
        priority = 0
        for j, (label, value) in enumerate(wanted):
            if theirs.get(label, "") != value:
                priority = len(wanted) - j
                break
        out.append(priority)
    return out


def _by_locality(
    own: str, localities: Sequence[str], setting: LocalityLbSetting | None
) -> list[int] | None:
    """Each endpoint's priority by locality (``None``: this workload's or every endpoint's
    locality unknown)."""
    if not own or not any(localities):
        return None
    mine = locality_parts(own)
    failover = {} if setting is None else dict(setting.failover)
    elsewhere = failover.get(mine[0])  # the region this region fails over to, if named
    raw = []
    for locality in localities:
        theirs = locality_parts(locality)
        priority = _distance(mine, theirs)
        if priority == 3 and elsewhere is not None and theirs[0] != elsewhere:
            priority = 4
        raw.append(priority)
    return raw
