"""The calibration database on both backends: SQLite (always) and PostgreSQL.

PostgreSQL cases connect to ``$LSSTPIPE_TEST_PG_URL`` and are skipped when it is unset — except under
``CI=true``, where an unset URL fails them (the rule of ``tests/test_control_db.py``). Each PostgreSQL test
gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db_support import BACKENDS, backend_url, postgres_url
from lsstpipe.db import ControlDatabase, DatabaseError
from lsstpipe.db.calib import CalibrationDatabase, CalibrationNotFound, CalibrationRecord, CalibrationType

DET = "R22_S11"


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from backend_url(request.param, tmp_path, "calib.sqlite3")


@pytest.fixture
def db(url: str) -> Iterator[CalibrationDatabase]:
    database = CalibrationDatabase(url)
    yield database
    database.close()


def certify(db: CalibrationDatabase, kind: str, start: float, end: float | None, *, run: str = "run1",
            filter: str | None = None, detector: str = DET, **overrides: Any) -> CalibrationRecord:  # fmt: skip
    args: dict[str, Any] = dict(path=f"/repo/{run}/{kind}/{detector}.fits",
                                checksum=hashlib.sha256(f"{run}{kind}{detector}{filter}{start}".encode()).hexdigest(),
                                inputs=[101, 102, 103], software_version="0.1.0",
                                parameters={"nsigma": 3.0, "method": "clipped_mean"}, run=run)  # fmt: skip
    args.update(overrides)
    return db.certify(kind, detector, filter, start, end, **args)


# ---- the CI rule ----------------------------------------------------------------------------------------
def test_unset_url_skips_locally_and_fails_under_ci() -> None:
    with pytest.raises(pytest.skip.Exception):
        postgres_url({})
    with pytest.raises(pytest.fail.Exception, match="CI=true but LSSTPIPE_TEST_PG_URL is unset"):
        postgres_url({"CI": "true"})


# ---- records and provenance -----------------------------------------------------------------------------
def test_certified_record_round_trips_with_provenance(url: str) -> None:
    with CalibrationDatabase(url, clock=lambda: 1.7e9) as db:
        rec = certify(db, "bias", 60000.0, 60030.0, checksum="AB" * 32)
        assert rec.calib_type is CalibrationType.BIAS and rec.filter is None
        assert rec.checksum == "ab" * 32  # stored normalised
        assert rec.inputs == (101, 102, 103) and rec.parameters == {"nsigma": 3.0, "method": "clipped_mean"}
        assert (rec.software_version, rec.run, rec.created) == ("0.1.0", "run1", 1.7e9)
    with CalibrationDatabase(url) as db:  # it outlives the connection; the schema is migrated once
        assert db.history("bias", DET) == [rec]
        assert db.schema_version == 1
        with db.db.read() as tx:
            assert tx.execute("SELECT COUNT(*) FROM schema_version").fetchone() == (1,)


# ---- validity lookups -----------------------------------------------------------------------------------
def test_interval_edges_start_included_end_excluded(db: CalibrationDatabase) -> None:
    rec = certify(db, "dark", 60000.0, 60010.0)
    assert db.lookup("dark", DET, None, 60000.0) == rec  # t == start: valid
    assert db.lookup(CalibrationType.DARK, DET, None, 60009.999999) == rec
    with pytest.raises(CalibrationNotFound, match=r"valid at MJD 60010.0; certified: \[60000.0, 60010.0\) run 'run1'"):
        db.lookup("dark", DET, None, 60010.0)  # t == end: not valid
    with pytest.raises(CalibrationNotFound, match=r"\[60000.0, 60010.0\)"):
        db.lookup("dark", DET, None, 59999.999999)


def test_open_ended_interval_is_valid_from_its_start_on(db: CalibrationDatabase) -> None:
    rec = certify(db, "defects", 60000.0, None)
    assert db.lookup("defects", DET, None, 60000.0) == rec
    assert db.lookup("defects", DET, None, 99999.0) == rec
    with pytest.raises(CalibrationNotFound, match=r"\[60000.0, open\)"):
        db.lookup("defects", DET, None, 59999.5)


def test_later_certification_supersedes_by_validity_without_rewriting(db: CalibrationDatabase) -> None:
    r1 = certify(db, "bias", 60000.0, 60020.0, run="run1")
    r2 = certify(db, "bias", 60010.0, None, run="run2")  # overlaps r1's second half, then open-ended
    r3 = certify(db, "bias", 60014.0, 60016.0, run="run3")  # a narrow re-certification inside both
    expected = {60000.0: r1, 60009.99: r1, 60010.0: r2, 60013.99: r2, 60014.0: r3, 60015.99: r3,
                60016.0: r2, 60019.99: r2, 60020.0: r2, 70000.0: r2}  # fmt: skip
    assert {t: db.lookup("bias", DET, None, t) for t in expected} == expected
    assert db.history("bias", DET) == [r1, r2, r3]  # the superseded records are still there, unchanged


def test_identical_interval_recertified_later_wins(db: CalibrationDatabase) -> None:
    certify(db, "crosstalk", 60000.0, 60100.0, run="run1")
    r2 = certify(db, "crosstalk", 60000.0, 60100.0, run="run2")
    assert db.lookup("crosstalk", DET, None, 60050.0) == r2


def test_filters_and_detectors_are_kept_apart(db: CalibrationDatabase) -> None:
    g = certify(db, "flat", 60000.0, None, filter="g")
    r = certify(db, "flat", 60005.0, None, filter="r")
    other = certify(db, "flat", 60000.0, None, filter="i", detector="R22_S12")
    assert db.lookup("flat", DET, "g", 60006.0) == g
    assert db.lookup("flat", DET, "r", 60006.0) == r
    assert db.lookup("flat", "R22_S12", "i", 60006.0) == other
    with pytest.raises(CalibrationNotFound, match=r"filter 'r'.*\[60000.0, open\) filter 'g'.*filter 'r'"):
        db.lookup("flat", DET, "r", 60001.0)  # the g flat is valid then, but it is not an r flat
    with pytest.raises(CalibrationNotFound, match=r"'R22_S11' filter 'i'.*certified: .*filter 'g'"):
        db.lookup("flat", DET, "i", 60006.0)
    assert db.history("flat", DET) == [g, r] and db.history("flat", DET, "r") == [r]


def test_not_found_says_when_nothing_is_certified(db: CalibrationDatabase) -> None:
    certify(db, "bias", 60000.0, None)
    with pytest.raises(CalibrationNotFound, match="none is certified for this detector"):
        db.lookup("bias", "R01_S00", None, 60001.0)
    with pytest.raises(CalibrationNotFound, match="none is certified"):
        db.lookup("dark", DET, None, 60001.0)  # a bias exists, but no dark


# ---- validation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "filter", "start", "end", "overrides", "message"), [
    ("superflat", None, 1.0, 2.0, {}, "unknown calibration type 'superflat'; one of bias, dark, flat"),
    ("flat", None, 1.0, 2.0, {}, "a flat is made per filter: give its filter"),
    ("fringe", "", 1.0, 2.0, {}, "a fringe is made per filter"),
    ("bias", "r", 1.0, 2.0, {}, "a bias does not depend on the filter"),
    ("bias", None, 2.0, 2.0, {}, r"valid_start must be before valid_end \(got \[2.0, 2.0\)\)"),
    ("bias", None, 3.0, 2.0, {}, "valid_start must be before valid_end"),
    ("bias", None, float("nan"), 2.0, {}, "valid_start must be a finite MJD"),
    ("bias", None, 1.0, float("inf"), {}, "valid_end must be a finite MJD"),
    ("bias", None, 1.0, 2.0, {"checksum": "a" * 63}, "checksum must be a sha256: 64 hexadecimal digits"),
    ("bias", None, 1.0, 2.0, {"checksum": "g" * 64}, "checksum must be a sha256"),
    ("bias", None, 1.0, 2.0, {"run": ""}, "give the run label"),
    ("bias", None, 1.0, 2.0, {"parameters": {"x": object()}}, "parameters must be JSON-serialisable"),
])  # fmt: skip
def test_bad_certifications_are_refused_and_write_nothing(tmp_path: Path, kind: str, filter: str | None, start: float,
                                                          end: float, overrides: dict[str, Any], message: str) -> None:  # fmt: skip
    with CalibrationDatabase(tmp_path / "calib.sqlite3") as db:
        with pytest.raises(ValueError, match=message):
            certify(db, kind, start, end, filter=filter, **overrides)
        with db.db.read() as tx:
            assert tx.execute("SELECT COUNT(*) FROM calibrations").fetchone() == (0,)


def test_lookup_validates_its_arguments(db: CalibrationDatabase) -> None:
    with pytest.raises(ValueError, match="unknown calibration type"):
        db.lookup("biass", DET, None, 1.0)
    with pytest.raises(ValueError, match="a flat is made per filter"):
        db.lookup("flat", DET, None, 1.0)


def test_the_table_checks_intervals_and_checksums_too(db: CalibrationDatabase) -> None:
    row = ("2", "bias", DET, None, 5.0, 4.0, "p", "a" * 64, "[]", "v", "{}", 0.0)
    with pytest.raises(DatabaseError), db.db.write() as tx:
        tx.execute("INSERT INTO calibrations (run, calib_type, detector, filter_name, valid_start, valid_end, path, "
                   "checksum, inputs, software_version, parameters, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   row)  # fmt: skip


# ---- append-only ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("statement", ["UPDATE calibrations SET valid_end = 60001.0",
                                       "UPDATE calibrations SET checksum = ?", "DELETE FROM calibrations",
                                       "DELETE FROM calibrations WHERE run = 'run1'"])  # fmt: skip
def test_an_attempt_to_rewrite_fails(db: CalibrationDatabase, statement: str) -> None:
    rec = certify(db, "bias", 60000.0, None)
    with pytest.raises(DatabaseError, match="append-only"), db.db.write() as tx:
        tx.execute(statement, ("0" * 64,) if "?" in statement else ())
    assert db.history("bias", DET) == [rec]
    assert db.lookup("bias", DET, None, 60002.0) == rec


def test_a_control_database_is_not_a_calibration_database(url: str) -> None:
    ControlDatabase(url).close()
    with pytest.raises(DatabaseError, match="is not a calibration database"):
        CalibrationDatabase(url)


# ---- concurrency ----------------------------------------------------------------------------------------
def _certifier(url: str, worker: int, n: int) -> None:
    with CalibrationDatabase(url) as db:
        for i in range(n):
            certify(db, "flat", 60000.0 + i, None, run=f"w{worker}", filter="ugrizy"[i % 6], inputs=[worker, i])


def test_concurrent_certify_from_four_processes_loses_nothing(url: str) -> None:
    CalibrationDatabase(url).close()  # the schema exists before the writers race
    n_workers, n = 4, 60
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_certifier, args=(url, w, n)) for w in range(n_workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n_workers
    with CalibrationDatabase(url) as db:
        records = db.history("flat", DET)
        assert len(records) == n_workers * n and len({r.id for r in records}) == n_workers * n
        for w in range(n_workers):
            assert [r.inputs for r in records if r.run == f"w{w}"] == [(w, i) for i in range(n)]
        # lookup agrees with a brute-force "last certified whose interval contains t"
        for flt in "ugrizy":
            for t in (60013.0, 60030.5, 60059.0, 61000.0):
                valid = [r for r in records if r.filter == flt and r.contains(t)]
                assert db.lookup("flat", DET, flt, t) == max(valid, key=lambda r: r.id)
