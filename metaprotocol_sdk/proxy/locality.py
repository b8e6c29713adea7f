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
:func:`failover_priorities`). With ``distribute`` there is no failover: each locality gets a
weight instead (:func:`distribute_weights`, istiod's ``applyLocalityWeights``), which the
cluster's balancer honours as Envoy's locality weighted load balancing does
(:mod:`~metaprotocol_sdk.proxy.priority`). Computed when a cluster is built, never per
request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .config.models import Endpoint, LocalityDistribute, LocalityLbSetting

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
    if setting is not None and (not setting.enabled or setting.distribute):
        return None  # istiod applies distribute or failover, never both
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


# -- distribute ----------------------------------------------------------------------------------


def pattern_parts(pattern: str) -> tuple[str, ...]:
    """The exact parts of a valid locality pattern, ``*`` left out: ``r1/*`` and ``r1`` are
    ``("r1",)`` (any zone of ``r1``), ``*`` is ``()``. A locality matches it when its parts
    begin with these (istiod's ``LocalityMatch``)."""
    return tuple(p for p in pattern.split("/") if p != "*")


def pattern_problem(pattern: str) -> str | None:
    """What is wrong with a ``distribute`` locality pattern (``None``: nothing), in istiod's
    words where it has them (``validateLocalities``)."""
    parts = pattern.split("/")
    if any(not p for p in parts):
        return f"locality {pattern} must not contain empty region/zone/subzone info"
    if pattern.count("*") > 1 or ("*" in pattern and not pattern.endswith("*")):
        return f"locality {pattern} wildcard '*' number can not exceed 1 and must be in the end"
    if len(parts) > 3:
        return f"locality {pattern} has more than three parts (region/zone/subzone)"
    if parts[-1] != "*" and "*" in parts[-1]:
        return f"locality {pattern}: '*' stands for a whole region, zone or subzone"
    return None


def ordered_overlap(patterns: Sequence[str]) -> int | None:
    """The index of the first of ``patterns`` (a rule list's ``from``, valid patterns) that
    overlaps one before it as istiod's ``validateLocalities`` refuses it: one before matches
    every locality it matches, or it matches every locality of one before and does not end
    with ``*`` (``r1`` after ``r1/z1``; ``r1/*`` or ``*`` after it is a fallback). Linear."""
    seen: set[tuple[str, ...]] = set()
    below: set[tuple[str, ...]] = set()  # the proper prefixes of those seen
    for i, pattern in enumerate(patterns):
        parts = pattern_parts(pattern)
        if any(parts[:n] in seen for n in range(len(parts) + 1)):
            return i
        if not pattern.endswith("*") and parts in below:
            return i
        seen.add(parts)
        below.update(parts[:n] for n in range(len(parts)))
    return None


def unordered_overlap(patterns: Sequence[str]) -> tuple[str, str] | None:
    """Two of ``patterns`` (a rule's ``to``, valid patterns) that some locality matches both
    of, more general first (``None``: none): the engine refuses them whatever their order,
    as istiod tries a ``to`` map's patterns in a random order. Linear."""
    by_parts: dict[tuple[str, ...], str] = {}
    for pattern in patterns:
        other = by_parts.setdefault(pattern_parts(pattern), pattern)
        if other != pattern:
            return other, pattern
    for parts, pattern in by_parts.items():
        for n in range(len(parts)):
            general = by_parts.get(parts[:n])
            if general is not None:
                return general, pattern
    return None


def _rule_for(own: str, rules: Sequence[LocalityDistribute]) -> LocalityDistribute | None:
    """The first rule whose ``from`` matches the locality ``own``."""
    mine = locality_parts(own)
    for rule in rules:
        parts = pattern_parts(rule.origin)
        if mine[: len(parts)] == parts:
            return rule
    return None


def distribute_weights(
    own: str, localities: Sequence[str], weights: Sequence[int], setting: LocalityLbSetting | None
) -> list[int] | None:
    """Each endpoint's locality weight (``localities``, their ``weights``) seen from this
    workload (locality ``own``), as istiod's ``applyLocalityWeights`` sets the
    ``load_balancing_weight`` of each locality; 0: the rule's ``to`` names the endpoint's
    locality in no pattern, and istiod sends it no endpoint of it. ``None``: no
    ``distribute``, or no rule's ``from`` matches ``own`` (every endpoint stays, unweighted).

    A pattern's percent is split between the localities it matches in proportion to their
    endpoints' weights, each rounded up. Linear in the endpoints and the rules."""
    if setting is None or not setting.enabled or not setting.distribute:
        return None
    rule = _rule_for(own, setting.distribute)
    if rule is None:
        return None
    sums: dict[str, int] = {}  # each locality's endpoint weights
    for locality, weight in zip(localities, weights, strict=True):
        sums[locality] = sums.get(locality, 0) + weight
    percents = {pattern_parts(pattern): percent for pattern, percent in rule.to}
    matched: dict[str, tuple[str, ...]] = {}
    totals: dict[tuple[str, ...], int] = {}
    for locality, total in sums.items():
        theirs = locality_parts(locality)
        # The patterns do not overlap (the loader refuses it): at most one matches.
        parts = next((theirs[:n] for n in range(4) if theirs[:n] in percents), None)
        if parts is not None:
            matched[locality] = parts
            totals[parts] = totals.get(parts, 0) + total
    share = {
        locality: -(-sums[locality] * percents[parts] // totals[parts])
        for locality, parts in matched.items()
    }
    return [share.get(locality, 0) for locality in localities]


def cluster_localities(
    own: str,
    endpoints: list[Endpoint],
    setting: LocalityLbSetting | None,
    port: int,
    subset: str | None,
) -> tuple[list[Endpoint], list[tuple[str, int]] | None]:
    """The endpoints of the cluster of ``port`` and ``subset``, and each one's (locality,
    locality weight) for locality weighted balancing: by ``distribute``
    (:func:`distribute_weights`; the endpoints of a locality it weighs 0 are left out, as
    istiod sends none), else as xDS sent them
    (:meth:`~.config.models.Endpoint.locality_weight_in`; a locality without a weight stays,
    and takes requests only if none has one, as in Envoy); ``None``: neither, the cluster
    balances without localities."""
    weights = distribute_weights(
        own, [ep.locality for ep in endpoints], [ep.weight for ep in endpoints], setting
    )
    if weights is not None:
        kept = [(ep, w) for ep, w in zip(endpoints, weights, strict=True) if w]
        return [ep for ep, _ in kept], [(ep.locality, w) for ep, w in kept]
    sent = [ep.locality_weight_in(port, subset) for ep in endpoints]
    if not any(s is not None and s[1] for s in sent):
        return endpoints, None
    return endpoints, [("", 0) if s is None else s for s in sent]
