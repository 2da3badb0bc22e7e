"""Faults injected into a simulated night: ``--inject FAULT@VISITS`` (LDM-230 §2.7's failure modes).

``VISITS`` counts the night's visits from 1 in the night's order; ``3`` is one visit, ``3-4`` a span.

=================  ===========================================================================================
``kill-worker``    a worker rank dies in the middle of a CCD job of each visit of the span (``os._exit``); its
                   job is rescheduled on a spare worker at a lower priority, reading the raw image cache
``kill-replicator`` a replicator rank dies while it holds a job of the first visit of the span; its images
                   are archived by the Catch-Up Archiver from the CDS buffer
``link-cut``       the replicator ↔ distributor link is down for the span: the pair moves to the local-only
                   pool, its images wait in the network outage buffer until the catch-up archiver moves them
``slow-link``      the link is slow for the span (each transfer stalls): the pair moves to the local-only pool
``corrupt``        an image's bytes are damaged in transit in each visit of the span: the distributor's
                   checksum check rejects them and the replicator sends them again
``fill-buffer``    the network outage buffer is full for the span: images go on to the Archive directly and
                   stay in the CDS buffer until archived, none is dropped
``restart-dmcs``   the DMCS crashes at the start of the span's first visit and a standby takes over from the
                   control database and the night's journal
=================  ===========================================================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["FAULT_KINDS", "Fault", "FaultError", "parse_faults"]

FAULT_KINDS = ("kill-worker", "kill-replicator", "link-cut", "slow-link", "corrupt", "fill-buffer", "restart-dmcs")

_SPEC = re.compile(r"^(?P<kind>[a-z-]+)@(?P<first>\d+)(?:-(?P<last>\d+))?$")


class FaultError(ValueError):
    """An ``--inject`` value that cannot be used (the message says the accepted form)."""


@dataclass(frozen=True)
class Fault:
    """One injected fault over visits ``first`` … ``last`` (counted from 1 in the night's order)."""

    kind: str
    first: int
    last: int

    def covers(self, number: int) -> bool:
        """Whether visit ``number`` (from 1) is in the span."""
        return self.first <= number <= self.last

    def __str__(self) -> str:
        return f"{self.kind}@{self.first}" + (f"-{self.last}" if self.last != self.first else "")


def parse_faults(specs: Iterable[str], n_visits: int | None = None) -> tuple[Fault, ...]:
    """Parse ``FAULT@VISITS`` values; with ``n_visits``, spans must lie inside the night.

    Raises
    ------
    FaultError
        Unknown fault, malformed span, or a span beyond the night's visits.
    """
    faults = []
    for spec in specs:
        m = _SPEC.match(spec.strip())
        if not m:
            raise FaultError(f"--inject {spec!r}: write FAULT@VISIT or FAULT@FIRST-LAST (visits from 1), e.g. "
                             "kill-worker@2 or link-cut@2-3")  # fmt: skip
        kind = m["kind"]
        if kind not in FAULT_KINDS:
            raise FaultError(f"--inject {spec!r}: unknown fault {kind!r}; faults are {', '.join(FAULT_KINDS)}")
        first, last = int(m["first"]), int(m["last"] or m["first"])
        if first < 1 or last < first:
            raise FaultError(f"--inject {spec!r}: visits count from 1 and a span goes forward (e.g. 2-3)")
        if n_visits is not None and last > n_visits:
            raise FaultError(f"--inject {spec!r}: the night has {n_visits} visit(s); the span must lie inside it")
        faults.append(Fault(kind, first, last))
    return tuple(faults)
