"""The live view (redrawn in place on a terminal, periodic single lines otherwise) and the
final summary: observed split against the configured one, per protocol and route."""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass
from typing import TextIO

from metaprotocol_sdk.cli._output import table

from .clients import Tally
from .configs import ROUTES

VERSIONS = ("v1", "v2")


@dataclass(frozen=True)
class RouteRow:
    """Observed traffic on one route of one protocol."""

    protocol: str
    route: str
    counts: dict[str, int]
    configured: dict[str, int]

    @property
    def total(self) -> int:
        """Requests answered on this route."""
        return sum(self.counts.values())

    def share(self, version: str) -> float:
        """Observed fraction served by ``version``."""
        return self.counts.get(version, 0) / self.total if self.total else 0.0

    def within_bound(self, sigmas: float = 4.5) -> bool:
        """Whether every version's share is within ``sigmas`` binomial standard deviations
        (plus half a request) of its configured weight."""
        if not self.total:
            return False
        for version in {*VERSIONS, *self.counts}:
            p = self.configured.get(version, 0) / 100
            bound = sigmas * math.sqrt(p * (1 - p) / self.total) + 0.5 / self.total
            if abs(self.share(version) - p) > bound:
                return False
        return True

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready view."""
        return {
            "protocol": self.protocol,
            "route": self.route,
            "total": self.total,
            "counts": self.counts,
            "observed": {v: round(self.share(v), 4) for v in sorted({*VERSIONS, *self.counts})},
            "configured": {v: self.configured.get(v, 0) / 100 for v in VERSIONS},
            "within_bound": self.within_bound(),
        }


def route_rows(tallies: dict[str, Tally]) -> list[RouteRow]:
    """One row per protocol and configured route."""
    rows = []
    for protocol, tally in tallies.items():
        for route, configured in ROUTES.items():
            counts = {v: n for (r, v), n in sorted(tally.counts.items()) if r == route}
            rows.append(RouteRow(protocol, route, counts, configured))
    return rows


def _cell(row: RouteRow, version: str) -> str:
    return f"{row.counts.get(version, 0):>6} {100 * row.share(version):5.1f}%"


def render(tallies: dict[str, Tally], elapsed: float) -> str:
    """The live table."""
    rows = [
        [
            r.protocol,
            r.route,
            r.total,
            *(_cell(r, v) for v in VERSIONS),
            " / ".join(f"{r.configured.get(v, 0)}%" for v in VERSIONS),
        ]
        for r in route_rows(tallies)
    ]
    errors = "  ".join(f"{p} errors: {t.errors}" for p, t in tallies.items())
    last = "".join(
        f"\n  last {p} error: {t.last_error[:100]}" for p, t in tallies.items() if t.last_error
    )
    header = ["PROTOCOL", "ROUTE", "REQUESTS", *(v.upper() for v in VERSIONS), "WANTED v1/v2"]
    return f"{table(header, rows)}\n{elapsed:5.1f}s  {errors}{last}"


#: Printed once before the progress lines, which say counts without naming them.
PROGRESS_LEGEND = "progress: requests per route, as v1/v2"


def progress_lines(tallies: dict[str, Tally], elapsed: float) -> str:
    """The non-terminal progress: one short line per protocol with each route's requests as
    v1/v2 counts (:data:`PROGRESS_LEGEND`), within 80 columns."""
    lines = []
    for protocol, tally in tallies.items():
        rows = route_rows({protocol: tally})
        routes = "  ".join(
            f"{r.route} " + "/".join(str(r.counts.get(v, 0)) for v in VERSIONS) for r in rows
        )
        lines.append(f"[{elapsed:5.1f}s] {protocol:<6} {routes}  errors {tally.errors}")
    return "\n".join(lines)


class LiveView:
    """Redraws the table in place on a terminal; otherwise prints short progress lines (one per
    protocol) every few seconds, which read well in a log."""

    def __init__(self, out: TextIO, *, tty: bool, line_every: float = 2.0) -> None:
        self.out = out
        self.tty = tty
        self.line_every = line_every
        self._drawn_lines = 0
        self._last_line = -math.inf

    def update(self, tallies: dict[str, Tally], elapsed: float) -> None:
        """Show the current counts."""
        if self.tty:
            # Lines are cut to the terminal width so that none wraps: the redraw moves the
            # cursor up by the number of lines written.
            width = max(20, shutil.get_terminal_size().columns - 1)
            text = "\n".join(line[:width] for line in render(tallies, elapsed).splitlines())
            # Move to the start of the previous drawing and clear to the end of the screen.
            prefix = f"\x1b[{self._drawn_lines}F\x1b[J" if self._drawn_lines else ""
            self.out.write(prefix + text + "\n")
            self._drawn_lines = text.count("\n") + 1
        elif elapsed - self._last_line >= self.line_every:
            self.out.write(progress_lines(tallies, elapsed) + "\n")
            self._last_line = elapsed
        self.out.flush()


_SERIES = re.compile(r'^metaprotocol_requests_total\{listener="([^"]*)",route="([^"]*)".*\} (\d+)$')


def proxy_counts(prometheus: str, protocols: dict[str, str]) -> dict[tuple[str, str], int]:
    """Requests per (protocol, route) as the engine's ``/stats`` counts them.

    ``protocols`` maps a service host to its protocol; the listener label starts with it.
    """
    counts: dict[tuple[str, str], int] = {}
    for line in prometheus.splitlines():
        match = _SERIES.match(line)
        if not match:
            continue
        listener, route, value = match.groups()
        protocol = protocols.get(listener.rpartition(":")[0], listener)
        counts[protocol, route] = counts.get((protocol, route), 0) + int(value)
    return counts


def summary(
    tallies: dict[str, Tally],
    elapsed: float,
    proxy: dict[tuple[str, str], int] | None = None,
) -> str:
    """The final table: observed split against configured, per protocol and route, with the
    engine's own request count per route (from ``/stats``) when given."""
    rows = []
    for r in route_rows(tallies):
        observed = " / ".join(f"{100 * r.share(v):.1f}%" for v in VERSIONS)
        wanted = " / ".join(f"{r.configured.get(v, 0)}%" for v in VERSIONS)
        verdict = "ok" if r.within_bound() else ("no traffic" if not r.total else "OFF")
        seen = "-" if proxy is None else proxy.get((r.protocol, r.route), 0)
        rows.append([r.protocol, r.route, r.total, seen, observed, wanted, verdict])
    errors = sum(t.errors for t in tallies.values())
    total = sum(t.total for t in tallies.values())
    head = ["PROTOCOL", "ROUTE", "ANSWERED", "PROXY /stats", "OBSERVED v1/v2", "CONFIGURED v1/v2"]
    head.append("SPLIT")
    rate = total / elapsed if elapsed > 0 else 0.0
    return (
        f"summary after {elapsed:.1f}s: {total} requests ({rate:.0f}/s), {errors} errors\n"
        + table(head, rows)
    )
