"""The night's cluster as the control plane sees it, and the night scheduler's settings.

:class:`NightCluster` is the :class:`~lsstpipe.control.cluster.SimulatedCluster` of the night's layout: the
batches the entities submit go to the scheduler on rank 0 (:class:`~lsstpipe.runtime.dmcs_night.NightDMCS`),
with the job counts of the night's plan. :class:`SchedulerSettings` is the ``scheduler`` section of the
night's configuration; it checks its values itself.
"""

from __future__ import annotations

import math
import queue
from dataclasses import dataclass
from typing import Any

from lsstpipe.camera.geometry import get_camera
from lsstpipe.control.cluster import JobCounts, SimulatedCluster
from lsstpipe.control.config import Pool
from lsstpipe.control.states import EntityName
from lsstpipe.runtime.checks import check_choice, check_number
from lsstpipe.runtime.layout import NightLayout, Role
from lsstpipe.runtime.plan import NightPlan

__all__ = ["NightCluster", "SchedulerSettings", "night_job_counts"]


def night_job_counts(layout: NightLayout, plan: NightPlan | None = None) -> JobCounts:
    """The jobs :class:`~lsstpipe.runtime.dmcs_night.NightDMCS` runs per event: per ``startIntegration`` one
    replicator job per science raft of the plan plus one for its wavefront sensors
    (:meth:`NightPlan.replicator_jobs`), per ``nextVisit`` or ``startExposure`` one worker job per detector of
    the plan; without a plan, those of the layout's whole camera (:meth:`JobCounts.of_camera`)."""
    if plan is not None:
        return JobCounts(len(plan.replicator_jobs()), len(plan.detectors))
    return JobCounts.of_camera(get_camera(layout.camera))


class NightCluster(SimulatedCluster):
    """The cluster the control plane sees: the night's layout; submitted batches go to the scheduler.

    Parameters
    ----------
    layout
        The night's ranks: the pools' pairs and the workers the configurations are checked against.
    plan
        The night's plan: how many jobs each event launches (:func:`night_job_counts`).
    """

    def __init__(self, layout: NightLayout, plan: NightPlan | None = None) -> None:
        pools = {Pool.FULLY_OPERATIONAL: sum(p.pool is Pool.FULLY_OPERATIONAL for p in layout.pairs),
                 Pool.LOCAL_ONLY: sum(p.pool is Pool.LOCAL_ONLY for p in layout.pairs),
                 Pool.CATCHUP: len(layout.catchup_pairs)}  # fmt: skip
        workers = len(layout.ranks_of(Role.WORKER)) + len(layout.spare_workers)
        super().__init__(pools, workers=workers, job_seconds=0.0, jobs=night_job_counts(layout, plan))
        self.events: queue.Queue = queue.Queue()

    def submit(self, entity: EntityName, label: str, n_jobs: int, event: Any = None):  # type: ignore[override]
        batch = super().submit(entity, label, n_jobs)
        if event is not None:
            self.events.put((entity, event))
        return batch


@dataclass(frozen=True)
class SchedulerSettings:
    ccd_timeout_s: float = 120.0
    """A CCD job not done this long after it started is late (killed, queued for later reprocessing)."""
    heartbeat_timeout_s: float = 10.0
    """A worker silent this long while it holds a job is dead."""
    warmup_grace_s: float = 120.0
    """Extra silence allowed before a worker's first result (numba compiles its kernels holding the GIL;
    a warm on-disk cache, ``NUMBA_CACHE_DIR``, makes it short)."""
    queue_limit: int = 1000
    """Most unexecuted CCD jobs kept; beyond, the oldest are dropped (recorded as skipped)."""
    sample_every: int = 1
    """Process every n-th visit (1: all); the others are archived but not processed (skipped, sampled)."""
    link_back_s: tuple[float, float] = (1.0, 3.0)
    """A pair whose link came back returns to the fully-operational pool after a random wait in this range."""
    catchup_after_s: float = 2.0
    """An image not archived this long after its replicator job ended goes to the Catch-Up Archiver."""
    reprocess: bool = True
    """Run late and data-unavailable CCD jobs again after the last visit (catch-up processing)."""
    raft_job_timeout_s: float = 60.0
    """A replicator job without a result this long is given up (its images go to the Catch-Up Archiver)."""
    catchup_timeout_s: float = 120.0
    """End of night: how long the Catch-Up Archiver may take to bring the last images."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ccd_timeout_s", "heartbeat_timeout_s", "raft_job_timeout_s", "catchup_timeout_s"):
            check_number(name, getattr(self, name), least=0.0, above=True)
        for name in ("warmup_grace_s", "catchup_after_s"):
            check_number(name, getattr(self, name), least=0.0)
        for name in ("queue_limit", "sample_every"):
            check_number(name, getattr(self, name), integer=True, least=1)
        check_number("seed", self.seed, integer=True)
        check_choice("reprocess", self.reprocess, (True, False))
        low_high = self.link_back_s
        if not (isinstance(low_high, tuple) and len(low_high) == 2 and all(
                not isinstance(v, bool) and isinstance(v, (int, float)) and 0 <= v < math.inf for v in low_high)
                and low_high[0] <= low_high[1]):  # fmt: skip
            shown = list(low_high) if isinstance(low_high, tuple) else low_high
            raise ValueError(f"link_back_s must be [LOW, HIGH] seconds with 0 ≤ LOW ≤ HIGH, not {shown!r}")
