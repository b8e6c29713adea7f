"""Several engines' stats as one: what the supervisor of ``--workers N`` shows.

Each worker's series (its own admin endpoint's ``/stats?format=worker``, read line by line:
:class:`WorkerFeed`) are merged into families. Counters and histograms are summed series by
series; a gauge is shown per worker, with a ``worker`` label, and summed without it. The
workers' form writes a histogram's labels once (its Prometheus text repeats them on each of
its 21 lines: at ``maxStatsSeries`` series of Istio's labels, 463 MiB of text), so the
supervisor holds each merged series once, and makes the Prometheus text in pieces as it
sends it (:meth:`MergedStats.prometheus_parts`). Prometheus text (the supervisor's own
series) is read by :meth:`MergedStats.add`: the exposition format's simple case, one
``# TYPE`` line before each family's samples, no timestamps.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

from .stats import PART_SERIES

#: Label added to the per-worker series of a gauge.
WORKER_LABEL = "worker"


@dataclass
class Family:
    """One metric family: its type, help text and samples (``'name{labels}' -> value``)."""

    name: str
    kind: str
    help: str
    samples: dict[str, float] = field(default_factory=dict)
    #: Gauges only: each worker's own samples, the ``worker`` label added.
    per_worker: dict[str, float] = field(default_factory=dict)
    #: Histograms read in the workers' form, by ``(labels, le values)``.
    histograms: dict[tuple[str, str], Buckets] = field(default_factory=dict)


class Buckets:
    """One merged histogram series: per-bucket counts (not cumulative) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, counts: list[float], total: float) -> None:
        self.counts = counts
        self.sum = total

    def add(self, counts: list[float], total: float) -> None:
        """Add another worker's counts (the same buckets)."""
        if len(counts) != len(self.counts):
            raise ValueError("a histogram's buckets differ between workers")
        self.counts = list(map(operator.add, self.counts, counts))
        self.sum += total


def with_label(series: str, name: str, value: str) -> str:
    """``series`` (``name`` or ``name{...}``) with one more label."""
    extra = f'{name}="{value}"'
    if series.endswith("}"):
        return f"{series[:-1]},{extra}}}"
    return f"{series}{{{extra}}}"


def _number(value: float) -> str:
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


class MergedStats:
    """Families summed over workers, in the order first seen."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}

    def family(self, name: str, kind: str, help_text: str = "") -> Family:
        """The family ``name``, created empty on first use."""
        found = self.families.get(name)
        if found is None:
            found = self.families[name] = Family(name, kind, help_text or name)
        return found

    def add(self, text: str, worker: str | None = None, skip: tuple[str, ...] = ()) -> None:
        """Add one engine's Prometheus text; ``worker`` labels its gauges (``None``: the
        supervisor's own series); families whose name starts with a ``skip`` prefix are left
        out."""
        helps: dict[str, str] = {}
        current: Family | None = None
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 4 and parts[1] == "HELP":
                    helps[parts[2]] = parts[3]
                elif len(parts) >= 4 and parts[1] == "TYPE":
                    name = parts[2]
                    current = (
                        None
                        if name.startswith(skip) and skip
                        else self.family(name, parts[3], helps.get(name, name))
                    )
                continue
            if current is None:
                continue
            series, _, raw = line.rpartition(" ")
            try:
                value = float(raw)
            except ValueError:
                continue
            samples = current.samples
            samples[series] = samples.get(series, 0.0) + value
            if current.kind == "gauge" and worker is not None:
                current.per_worker[with_label(series, WORKER_LABEL, worker)] = value

    def snapshot(self) -> dict[str, float]:
        """``{'name{labels}': value}`` for every series (as an engine's ``/stats?format=json``),
        the per-worker gauges included."""
        return {k: v for part in self.snapshot_parts() for k, v in part}

    def snapshot_parts(self) -> Iterator[list[tuple[str, float]]]:
        """:meth:`snapshot`'s pairs in pieces of about :data:`.stats.PART_SERIES` series."""
        pairs: list[tuple[str, float]] = []
        for family in self.families.values():
            for series, value in (*family.samples.items(), *family.per_worker.items()):
                pairs.append((series, _json_number(value)))
                if len(pairs) >= PART_SERIES:
                    yield pairs
                    pairs = []
            for (labels, les), buckets in family.histograms.items():
                for series, value in _histogram_lines(family.name, labels, les, buckets):
                    pairs.append((series, _json_number(value)))
                if len(pairs) >= PART_SERIES:
                    yield pairs
                    pairs = []
        yield pairs

    def prometheus(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        return "".join(self.prometheus_parts())

    def prometheus_parts(self) -> Iterator[str]:
        """:meth:`prometheus` in pieces of about :data:`.stats.PART_SERIES` series, made as
        they are sent (the event loop runs between them)."""
        lines: list[str] = []
        made = 0
        for family in self.families.values():
            lines.append(f"# HELP {family.name} {family.help}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for series, value in (*family.samples.items(), *family.per_worker.items()):
                lines.append(f"{series} {_number(value)}")
                made += 1
                if made % PART_SERIES == 0:
                    yield "\n".join(lines) + "\n"
                    lines = []
            for (labels, les), buckets in family.histograms.items():
                for series, value in _histogram_lines(family.name, labels, les, buckets):
                    lines.append(f"{series} {_number(value)}")
                made += 1
                if made % PART_SERIES == 0:
                    yield "\n".join(lines) + "\n"
                    lines = []
        yield "\n".join(lines) + "\n" if lines else ""


def _json_number(value: float) -> float:
    return int(value) if value.is_integer() else value


def _histogram_lines(
    name: str, labels: str, les: str, buckets: Buckets
) -> Iterator[tuple[str, float]]:
    """A merged histogram's Prometheus series: cumulative ``_bucket``s, ``_sum``, ``_count``."""
    bucket = f"{name}_bucket{{{labels}{',' if labels else ''}le="
    braced = f"{{{labels}}}" if labels else ""
    total = 0.0
    for le, n in zip(les.split(","), buckets.counts, strict=True):
        total += n
        yield f'{bucket}"{le}"}}', total
    yield f"{name}_sum{braced}", buckets.sum
    yield f"{name}_count{braced}", total


class WorkerFeed:
    """Reads one worker's ``/stats?format=worker`` (:meth:`.stats.Stats.worker_parts`) line
    by line into ``merged``; ``series`` counts the series read, and the families (a family
    line holds a family of the merge even without series: they are bounded as series are).
    A line that is not of that form raises ``ValueError``."""

    def __init__(self, merged: MergedStats, worker: str, skip: tuple[str, ...] = ()) -> None:
        self.merged = merged
        self.worker = worker
        self.skip = skip
        self.series = 0
        self._family: Family | None = None
        self._skipping = False

    def line(self, line: str) -> None:
        """Merge one line (without its newline)."""
        if line.startswith("# "):
            name, kind, help_text = [*line[2:].split(" ", 2), "", ""][:3]
            if kind not in ("counter", "gauge", "histogram"):
                raise ValueError(f"unknown kind {kind[:40]!r}")
            self.series += 1
            self._skipping = bool(self.skip) and name.startswith(self.skip)
            self._family = None if self._skipping else self.merged.family(name, kind, help_text)
            return
        if self._skipping:
            return
        family = self._family
        if family is None:
            raise ValueError("a series before its family")
        self.series += 1
        if family.kind == "histogram":
            labels, les, counts, total = line.rsplit("\t", 3)
            values: list[float] = list(map(float, counts.split(" ")))
            if len(values) != les.count(",") + 1:
                raise ValueError("a histogram's counts do not match its buckets")
            found = family.histograms.get((labels, les))
            if found is None:
                family.histograms[(labels, les)] = Buckets(values, float(total))
            else:
                found.add(values, float(total))
            return
        labels, tab, raw = line.rpartition("\t")
        if not tab:
            raise ValueError("a series without a value")
        value = float(raw)
        series = f"{family.name}{{{labels}}}" if labels else family.name
        samples = family.samples
        samples[series] = samples.get(series, 0.0) + value
        if family.kind == "gauge":
            family.per_worker[with_label(series, WORKER_LABEL, self.worker)] = value


class CounterFloor:
    """Keeps the supervisor's summed counters and histograms from going down between scrapes.

    A worker that does not answer a scrape (stuck, restarting) leaves its series out of the
    sums, and one started again after a crash counts from 0: the sums went down, which
    Prometheus takes for a counter reset, counting the whole new sum as an increase (a
    spike as large as every request ever counted). Here each counter series and histogram
    bucket is published at least at its last published value. A worker that did not answer
    comes back with its own counts, so that floor holds for one scrape; the counts a crashed
    worker took with it are added for good (an offset) at the first scrape every worker
    answers after a restart, taken from how far the sums fell below their floor then (what
    the other workers counted meanwhile is published one scrape late, or, in that scrape,
    not at all: never twice). A series that no worker sends in such a scrape is dropped with
    its floor (a reload removed it; see ``stats_pruning``). The floors are the last merge's
    own counter and histogram families (nothing is copied), and an offset is kept per series
    a crash lowered."""

    def __init__(self) -> None:
        #: The last published counter and histogram families, by name.
        self.families: dict[str, Family] = {}
        self.offsets: dict[str, dict[str, float]] = {}
        self.histogram_offsets: dict[str, dict[tuple[str, str], Buckets]] = {}
        #: Worker restarts already accounted for (see :meth:`apply`).
        self.restarts = 0

    def apply(self, merged: MergedStats, complete: bool, restarts: int) -> None:
        """Raise ``merged``'s counters and histograms to their floors, and make them the
        floors of the next scrape. ``complete``: every worker answered in full;
        ``restarts``: the workers' restarts so far (a crash's lost counts become offsets at
        the first complete scrape after it)."""
        bake = complete and restarts != self.restarts
        if bake:
            self.restarts = restarts
        floors: dict[str, Family] = {}
        for name, family in merged.families.items():
            if family.kind == "counter":
                self._counters(family, bake)
            elif family.kind == "histogram":
                self._histograms(family, bake)
            else:
                continue
            floors[name] = family
        if complete:  # a series no worker sent is gone: so is its offset
            for name, offsets in list(self.offsets.items()):
                now = floors.get(name)
                kept = {} if now is None else {k: v for k, v in offsets.items() if k in now.samples}
                if kept:
                    self.offsets[name] = kept
                else:
                    del self.offsets[name]
            for name, lost in list(self.histogram_offsets.items()):
                now = floors.get(name)
                held = {} if now is None else now.histograms
                left = {k: v for k, v in lost.items() if k in held}
                if left:
                    self.histogram_offsets[name] = left
                else:
                    del self.histogram_offsets[name]
        else:  # the series of a worker that did not answer: published as before
            for name, old in self.families.items():
                now = floors.get(name)
                if now is None:
                    now = floors[name] = merged.families[name] = Family(name, old.kind, old.help)
                for series, value in old.samples.items():
                    now.samples.setdefault(series, value)
                for key, buckets in old.histograms.items():
                    now.histograms.setdefault(key, buckets)
        self.families = floors

    def _counters(self, family: Family, bake: bool) -> None:
        old = self.families.get(family.name)
        offsets = self.offsets.get(family.name)
        if old is None and offsets is None:
            return
        floors = {} if old is None else old.samples
        samples = family.samples
        for series, value in samples.items():
            if offsets is not None:
                value += offsets.get(series, 0.0)
            floor = floors.get(series)
            if floor is not None and value < floor:
                if bake:
                    if offsets is None:
                        offsets = self.offsets[family.name] = {}
                    offsets[series] = offsets.get(series, 0.0) + floor - value
                value = floor
            samples[series] = value

    def _histograms(self, family: Family, bake: bool) -> None:
        old = self.families.get(family.name)
        offsets = self.histogram_offsets.get(family.name)
        if old is None and offsets is None:
            return
        floors = {} if old is None else old.histograms
        for key, buckets in family.histograms.items():
            offset = None if offsets is None else offsets.get(key)
            if offset is not None:
                buckets.add(offset.counts, offset.sum)
            floor = floors.get(key)
            if floor is None or (
                buckets.sum >= floor.sum and not any(map(operator.lt, buckets.counts, floor.counts))
            ):
                continue
            if bake:
                lost = Buckets(
                    [max(f - n, 0.0) for f, n in zip(floor.counts, buckets.counts, strict=True)],
                    max(floor.sum - buckets.sum, 0.0),
                )
                if offsets is None:
                    offsets = self.histogram_offsets[family.name] = {}
                if offset is None:
                    offsets[key] = lost
                else:
                    offset.add(lost.counts, lost.sum)
            buckets.counts = list(map(max, buckets.counts, floor.counts))
            buckets.sum = max(buckets.sum, floor.sum)
