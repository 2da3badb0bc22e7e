"""The night on MPI: rank roles and layout, per-role communicators, and the messages between ranks."""

from lsstpipe.runtime.layout import (
    LayoutConfig,
    LayoutError,
    NightLayout,
    Pair,
    RankInfo,
    Role,
    full_layout,
    layout_for_world,
    multi_prog,
    scaled_layout,
)
from lsstpipe.runtime.messages import Heartbeat, JobAssignment, JobKind, JobResult, Stop, Tag
from lsstpipe.runtime.ranks import RankContext, split_roles

__all__ = [
    "Heartbeat", "JobAssignment", "JobKind", "JobResult", "LayoutConfig", "LayoutError", "NightLayout", "Pair",
    "RankContext", "RankInfo", "Role", "Stop", "Tag", "full_layout", "layout_for_world", "multi_prog",
    "scaled_layout", "split_roles",
]  # fmt: skip
