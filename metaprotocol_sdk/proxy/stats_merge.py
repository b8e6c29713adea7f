"""Several engines' stats as one: what the supervisor of ``--workers N`` shows.

Each worker's Prometheus text (its own admin endpoint's ``/stats``) is read back into
families. Counters and histograms (every ``_bucket``, ``_sum`` and ``_count`` series) are
summed series by series; a gauge is shown per worker, with a ``worker`` label, and summed
without it. The text is the engine's own output, so the reading is the exposition format's
simple case: one ``# TYPE`` line before each family's samples, no timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        out: dict[str, float] = {}
        for family in self.families.values():
            out.update(family.samples)
            out.update(family.per_worker)
        return {k: int(v) if v.is_integer() else v for k, v in out.items()}

    def prometheus(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        for family in self.families.values():
            lines.append(f"# HELP {family.name} {family.help}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for series, value in (*family.samples.items(), *family.per_worker.items()):
                lines.append(f"{series} {_number(value)}")
        return "\n".join(lines) + "\n"
