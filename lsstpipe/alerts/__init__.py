"""Level 1 alerts in Rubin's Avro format: packets (:mod:`.packet`), FITS cutouts (:mod:`.cutouts`) and the
local alert distribution point with an optional Kafka producer (:mod:`.writer`)."""

from lsstpipe.alerts.cutouts import (
    CUTOUT_SIZE_ARCSEC,
    CcdCutouts,
    Cutout,
    Cutouts,
    CutoutWriter,
    ccd_cutouts,
    cutout_size_pixels,
    make_cutout,
    read_cutout,
)
from lsstpipe.alerts.packet import (
    HISTORY_DAYS,
    AlertSchemaError,
    SourceContext,
    complete_record,
    deserialize_alert,
    dia_forced_source_record,
    dia_source_record,
    load_schema,
    make_alert,
    record_fields,
    schema_id,
    select_history,
    serialize_alert,
    ss_source_record,
    validate_alert,
    wire_header,
)
from lsstpipe.alerts.writer import AlertProducer, AlertWriter, read_alerts, write_alert_file

__all__ = [
    "CUTOUT_SIZE_ARCSEC", "HISTORY_DAYS", "AlertProducer", "AlertSchemaError", "AlertWriter", "Cutout",
    "CcdCutouts", "CutoutWriter", "Cutouts", "SourceContext", "ccd_cutouts", "complete_record", "cutout_size_pixels", "deserialize_alert",
    "dia_forced_source_record", "dia_source_record", "load_schema", "make_alert", "make_cutout", "read_alerts",
    "read_cutout", "record_fields", "schema_id", "select_history", "serialize_alert", "ss_source_record",
    "validate_alert", "wire_header", "write_alert_file",
]  # fmt: skip
