"""Backends for the database tests: SQLite always, PostgreSQL at ``$LSSTPIPE_TEST_PG_URL``.

The PostgreSQL cases are skipped when the URL is unset — except under ``CI=true``, where an unset URL
fails them, so that CI cannot pass by skipping. Each PostgreSQL test gets its own schema, dropped after.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import quote

import pytest

PG_URL_ENV = "LSSTPIPE_TEST_PG_URL"
BACKENDS = ["sqlite", "postgresql"]


def postgres_url(environ: Mapping[str, str]) -> str:
    """The test server's URL; skip without one, fail without one under CI=true."""
    url = environ.get(PG_URL_ENV)
    if url:
        return url
    message = (f"{PG_URL_ENV} is unset: start a server with eval \"$(.ci/postgres.sh start)\" "
               "(tests/run.sh does) to run the PostgreSQL cases")  # fmt: skip
    if environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {message}; CI must not skip them", pytrace=False)
    pytest.skip(message)


def backend_url(backend: str, tmp_path: Path, sqlite_name: str) -> Iterator[str]:
    """Yield a fresh database URL on ``backend`` (a file in ``tmp_path``, or a throw-away schema)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / sqlite_name}"
        return
    import psycopg

    base = postgres_url(os.environ)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{base}{'&' if '?' in base else '?'}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
