"""Level 1 products scored against the simulator's truth: the SSObject table a perfect daytime MOPS would
have made, and :func:`score_association`, which scores a whole APDB (variables and transients kept on one
DIAObject, DIAObjects merging true sources, Solar System detections on the right SSObject).

Used by the tests and by people checking a simulated night; the night itself (:mod:`lsstpipe.pipelines.level1`)
never reads the truth.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from lsstpipe.db.apdb import Level1Database
from lsstpipe.pipelines.level1 import id_column
from lsstpipe.pipelines.mops_orbits import SSOBJECT_DTYPE

__all__ = ["score_association", "ssobjects_from_truth"]


def ssobjects_from_truth(repo: Any) -> np.ndarray:
    """:data:`~lsstpipe.pipelines.mops_orbits.SSOBJECT_DTYPE` rows of a simulated repository's true orbits
    (``truth/ssos.csv``), ``ssObjectId`` = the simulator's id: the SSObject table a perfect daytime MOPS
    would have produced, for :func:`~lsstpipe.pipelines.mops_orbits.nightly_coefficients`."""
    path = Path(getattr(repo, "root", repo)) / "truth" / "ssos.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {path.parent.parent} a repository made by lsstpipe.sim?")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    out = np.zeros(len(rows), SSOBJECT_DTYPE)
    for ours, col in (("ssObjectId", "id"), ("a", "a"), ("e", "e"), ("inc", "inc"), ("node", "node"),
                      ("argPeri", "arg_peri"), ("ma", "mean_anomaly"), ("epoch", "epoch_mjd_tdb")):  # fmt: skip
        out[ours] = [float(r[col]) if ours != "ssObjectId" else int(r[col]) for r in rows]
    return out


def _table(apdb: Level1Database, name: str) -> Any:
    import pandas as pd
    import sqlalchemy

    config = apdb.apdb.getConfig()
    engine = sqlalchemy.create_engine(config.db_url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            return pd.read_sql_table(
                f"{config.prefix}{name}", conn, schema=config.namespace, dtype_backend="numpy_nullable"
            )  # 64-bit ids stay exact with NULLs
    finally:
        engine.dispose()


def _truth_segments(root: Path, exposures: list[dict], detector: str) -> dict[str, np.ndarray]:
    """True sources of one CCD over a visit's snaps: fixed sources at their position, Solar System objects
    as the segment from their position at the first snap's opening to the last snap's closing."""
    seen: dict[int, dict] = {}
    for e in sorted(exposures, key=lambda r: r["snap"]):
        paths = list(root.glob(f"truth/exposures/*/{e['obsid']}/{e['obsid']}_{detector}_sources.csv"))
        if not paths:
            raise FileNotFoundError(f"no truth table of {e['obsid']} {detector} under {root}/truth: score a "
                                    "repository made by lsstpipe.sim")  # fmt: skip
        with paths[0].open() as fh:
            for r in csv.DictReader(fh):
                i = int(r["id"])
                if i not in seen:
                    seen[i] = {"id": i, "kind": r["kind"], "x0": float(r["x"]), "y0": float(r["y"])}
                seen[i]["x1"], seen[i]["y1"] = float(r["x_end"]), float(r["y_end"])
    rows = list(seen.values())
    out = {k: np.array([r[k] for r in rows], float) for k in ("x0", "y0", "x1", "y1")}
    out["id"] = np.array([r["id"] for r in rows], np.int64)
    out["kind"] = np.array([r["kind"] for r in rows], dtype=object)
    return out


def _segment_distance(px, py, t: dict[str, np.ndarray]) -> np.ndarray:
    dx, dy = t["x1"] - t["x0"], t["y1"] - t["y0"]
    length2 = np.maximum(dx * dx + dy * dy, 1e-12)
    u = np.clip(((px[:, None] - t["x0"]) * dx + (py[:, None] - t["y0"]) * dy) / length2, 0.0, 1.0)
    return np.hypot(px[:, None] - (t["x0"] + u * dx), py[:, None] - (t["y0"] + u * dy))


def score_association(repo: Any, apdb: Level1Database, *, match_radius_pix: float = 2.5) -> dict:
    """Score the association stored in ``apdb`` against a simulated repository's truth.

    Every stored DiaSource is matched to the nearest true source of its visit and CCD (pixel distance to
    the source, or to the trail of a Solar System object across the visit's snaps) within
    ``match_radius_pix``; unmatched DiaSources (noise, artefacts) are left out of every score.

    Returns
    -------
    dict
        ``n_dia_sources``, ``n_matched``; for ``kind`` in ``variable`` and ``transient``:
        ``{kind}_sources`` (matched DiaSources of that kind), ``{kind}_on_one_object`` (the fraction of them
        on their true source's most common DIAObject, NULL ``diaObjectId`` counting as off it),
        ``{kind}_unassociated`` (how many have no DIAObject), ``{kind}_associated_on_one_object`` (the same
        fraction among those with a DIAObject); ``n_objects`` (DIAObjects with a matched
        DiaSource), ``n_merged`` and ``merged_fraction`` (those holding DiaSources of two or more true
        sources); ``sso_sources``, ``sso_correct`` and ``sso_matched_fraction`` (Solar System detections
        carrying the right ``ssObjectId``).
    """
    from lsstpipe.camera import get_camera
    from lsstpipe.repo import Repository

    repo = repo if isinstance(repo, Repository) else Repository(repo)
    names = {d.id: d.name for d in get_camera(repo.read_config()["camera"])}
    by_visit: dict[int, list[dict]] = defaultdict(list)
    for e in repo.exposures("OBJECT"):
        by_visit[int(e["visit"])].append(e)
    src = _table(apdb, "DiaSource")
    n = len(src)
    obj = id_column(src["diaObjectId"]) if n else np.zeros(0, np.int64)
    ssid = id_column(src["ssObjectId"]) if n else np.zeros(0, np.int64)
    tid = np.zeros(n, np.int64)
    kind = np.full(n, "", dtype=object)
    visits, dets = (src[c].to_numpy(np.int64) if n else np.zeros(0, np.int64) for c in ("visit", "detector"))
    for v, d in sorted(set(zip(visits.tolist(), dets.tolist()))):
        sel = np.flatnonzero((visits == v) & (dets == d))
        truth = _truth_segments(repo.root, by_visit[v], names[d])
        if not len(truth["id"]):
            continue
        dist = _segment_distance(src["x"].to_numpy(float)[sel], src["y"].to_numpy(float)[sel], truth)
        best = dist.argmin(axis=1)
        ok = dist[np.arange(len(sel)), best] <= match_radius_pix
        tid[sel[ok]], kind[sel[ok]] = truth["id"][best[ok]], truth["kind"][best[ok]]
    out: dict[str, Any] = {"n_dia_sources": n, "n_matched": int(np.sum(tid != 0))}
    for k in ("variable", "transient"):
        sel = kind == k
        on = 0
        for t in np.unique(tid[sel]):
            objs = obj[sel & (tid == t)]
            objs = objs[objs != 0]
            on += int(np.bincount(np.unique(objs, return_inverse=True)[1]).max()) if objs.size else 0
        n_k, n_null = int(sel.sum()), int(np.sum(sel & (obj == 0)))
        out[f"{k}_sources"], out[f"{k}_unassociated"] = n_k, n_null
        out[f"{k}_on_one_object"] = on / n_k if n_k else np.nan
        out[f"{k}_associated_on_one_object"] = on / (n_k - n_null) if n_k > n_null else np.nan
    has = (obj != 0) & (tid != 0)
    members: dict[int, set] = defaultdict(set)
    for o, t in zip(obj[has], tid[has]):
        members[int(o)].add(int(t))
    out["n_objects"] = len(members)
    out["n_merged"] = sum(len(s) > 1 for s in members.values())
    out["merged_fraction"] = out["n_merged"] / len(members) if members else np.nan
    sso = kind == "sso"
    out["sso_sources"] = int(sso.sum())
    out["sso_correct"] = int(np.sum(sso & (ssid == tid)))
    out["sso_matched_fraction"] = out["sso_correct"] / out["sso_sources"] if sso.any() else np.nan
    return out
