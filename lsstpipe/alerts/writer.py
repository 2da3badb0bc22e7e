"""The local alert distribution point: Avro container files per visit and CCD, and optionally a Kafka topic.

:class:`AlertWriter` buffers alerts per (visit, detector) and writes each full batch of ``batch_size`` alerts
at once to ``OUT/alerts/{visit}/{detector}-{batch}.avro`` (batch 0, 1, ... per CCD), so the first alerts of a
CCD leave before its last ones are made even when the CCD runs late; :meth:`AlertWriter.flush` and
:meth:`AlertWriter.close` write the partial batches. A file is written under a temporary name in the same
directory, fsynced and renamed into place, so a reader never sees a partial file. Batch numbers restart at 0
for a CCD in a new writer; a CCD that is re-run after a fault should first be :meth:`AlertWriter.reset_ccd`
so that its files hold exactly one alert per DIASource.

With ``kafka`` (anything with ``produce(topic, key, value)``, e.g. a ``confluent_kafka.Producer``), every
alert is also produced at once to ``topic`` in Confluent's wire format (:func:`~lsstpipe.alerts.packet.serialize_alert`),
keyed by its ``diaSourceId`` in ASCII; the producer's own ``flush()``, if it has one, is called on close.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast, runtime_checkable

import fastavro

from lsstpipe.alerts.packet import load_schema, serialize_alert, validate_alert

__all__ = ["AlertProducer", "AlertWriter", "read_alerts", "write_alert_file"]


@runtime_checkable
class AlertProducer(Protocol):
    """What :class:`AlertWriter` needs of a Kafka producer."""

    def produce(self, topic: str, key: bytes | None, value: bytes) -> Any:
        """Queue ``value`` for ``topic`` with ``key``."""


def write_alert_file(path: str | os.PathLike, alerts: Iterable[Mapping[str, Any]], schema,
                     codec: str = "null") -> Path:  # fmt: skip
    """Write ``alerts`` as one Avro container file at ``path``, atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fastavro.writer(fh, schema.definition, list(alerts), codec=codec)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_alerts(source: str | os.PathLike | BinaryIO, schema=None) -> list[dict]:
    """The alerts of an Avro container file (ours or Rubin's, e.g. the package's sample ``fakeAlert.avro``).

    Decoded with the schema stored in the file, or resolved to ``schema`` (:func:`load_schema`) if given.
    """
    reader_schema = schema.definition if schema is not None else None
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            records = list(fastavro.reader(fh, reader_schema=reader_schema))
    else:
        records = list(fastavro.reader(source, reader_schema=reader_schema))
    if not all(isinstance(r, dict) for r in records):
        raise ValueError("the Avro file does not hold alert records; is it an alert container file?")
    return cast(list[dict], records)


class AlertWriter:
    """Writes alerts to ``out_dir/alerts/{visit}/{detector}-{batch}.avro`` and optionally to Kafka.

    Parameters
    ----------
    out_dir : path
        The night's output directory (files go under its ``alerts/``).
    schema_version : str, optional
        ``"11.1"``-style version of Rubin's schema (None: the latest shipped by ``lsst-alert-packet``).
    batch_size : int
        Alerts per file; a CCD's batch is written as soon as it is full.
    kafka : AlertProducer, optional
        Also produce every alert to ``topic``.
    topic : str
        Kafka topic.
    validate : bool
        Validate each alert against the schema when it is added (a bad alert raises at once, naming the
        field, instead of failing the whole batch's file).
    codec : str
        Avro container codec (``"null"`` or ``"deflate"``).
    """

    def __init__(self, out_dir: str | os.PathLike, schema_version: str | None = None, batch_size: int = 100,
                 kafka: AlertProducer | None = None, topic: str = "alerts", validate: bool = True,
                 codec: str = "null") -> None:  # fmt: skip
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if kafka is not None and not isinstance(kafka, AlertProducer):
            raise TypeError(f"kafka must have a produce(topic, key, value) method, got {type(kafka).__name__}")
        if codec not in ("null", "deflate"):
            raise ValueError(f"codec must be 'null' or 'deflate', got {codec!r}")
        self.root = Path(out_dir) / "alerts"
        self.schema = load_schema(schema_version)
        self.batch_size = batch_size
        self.kafka = kafka
        self.topic = topic
        self.validate = validate
        self.codec = codec
        self._buffers: dict[tuple[int, int], list[Mapping[str, Any]]] = {}
        self._next_batch: dict[tuple[int, int], int] = {}
        self.paths: list[Path] = []
        self.n_written = 0
        self._closed = False

    def __enter__(self) -> AlertWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, alert: Mapping[str, Any]) -> Path | None:
        """Queue one alert; returns the file written if this completed a batch."""
        if self._closed:
            raise RuntimeError("AlertWriter is closed; make a new one for more alerts")
        if self.validate:
            validate_alert(self.schema, alert)
        src = alert["diaSource"]
        key = (int(src["visit"]), int(src["detector"]))
        if self.kafka is not None:
            value = serialize_alert(self.schema, alert)
            self.kafka.produce(self.topic, str(alert["diaSourceId"]).encode("ascii"), value)
        buf = self._buffers.setdefault(key, [])
        buf.append(alert)
        if len(buf) >= self.batch_size:
            return self._write(key)
        return None

    def add_many(self, alerts: Iterable[Mapping[str, Any]]) -> list[Path]:
        """Queue several alerts; returns the files written meanwhile."""
        return [p for p in (self.add(a) for a in alerts) if p is not None]

    def _write(self, key: tuple[int, int]) -> Path:
        alerts = self._buffers.pop(key)
        batch = self._next_batch.get(key, 0)
        self._next_batch[key] = batch + 1
        path = write_alert_file(self.root / str(key[0]) / f"{key[1]}-{batch}.avro", alerts, self.schema,
                                self.codec)  # fmt: skip
        self.paths.append(path)
        self.n_written += len(alerts)
        return path

    def flush(self, visit: int | None = None, detector: int | None = None) -> list[Path]:
        """Write the partial batches (of one visit, or one CCD) now; returns the files written."""
        keys = [k for k in self._buffers
                if (visit is None or k[0] == visit) and (detector is None or k[1] == detector)]  # fmt: skip
        return [self._write(k) for k in keys]

    def reset_ccd(self, visit: int, detector: int) -> list[Path]:
        """Forget a CCD before it is re-run (after a fault): drop its queued alerts and delete its files, so
        the re-run's alerts replace the first attempt's instead of adding to them. Returns the files deleted.
        (Alerts already produced to Kafka stay there; consumers deduplicate on ``diaSourceId``.)"""
        key = (int(visit), int(detector))
        self._buffers.pop(key, None)
        self._next_batch.pop(key, None)
        removed = sorted((self.root / str(key[0])).glob(f"{key[1]}-*.avro"))
        for path in removed:
            path.unlink()
        self.paths = [p for p in self.paths if p not in removed]
        return removed

    def close(self) -> list[Path]:
        """Write every partial batch and flush the Kafka producer; the writer takes no more alerts."""
        if self._closed:
            return []
        paths = self.flush()
        flush = getattr(self.kafka, "flush", None)
        if callable(flush):
            flush()
        self._closed = True
        return paths

    @property
    def pending(self) -> int:
        """Alerts queued but not yet in a file."""
        return sum(len(b) for b in self._buffers.values())
