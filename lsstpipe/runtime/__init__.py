"""The night on MPI: rank roles and layout, per-role communicators, and the messages between ranks."""

from lsstpipe.runtime.layout import (
    LayoutConfig,
    LayoutError,
    NightLayout,
    Pair,
    RankContext,
    RankInfo,
    Role,
    full_layout,
    layout_for_world,
    multi_prog,
    scaled_layout,
    split_roles,
)
from lsstpipe.runtime.messages import Heartbeat, JobAssignment, JobKind, JobResult, Stop, Tag

__all__ = [
    "Heartbeat", "JobAssignment", "JobKind", "JobResult", "LayoutConfig", "LayoutError", "NightLayout", "Pair",
    "RankContext", "RankInfo", "Role", "Stop", "Tag", "full_layout", "layout_for_world", "multi_prog",
    "scaled_layout", "split_roles",
]  # fmt: skip
