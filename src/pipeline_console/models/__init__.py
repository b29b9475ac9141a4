"""ORM models, one file per aggregate; importing this package registers every table."""

from pipeline_console.models.audit import AuditEvent
from pipeline_console.models.base import Base
from pipeline_console.models.records import (
    Anomaly,
    Correlation,
    EntityType,
    IngestionAttempt,
    ProductionRecord,
    RecordState,
    StagingRecord,
)

__all__ = [
    "Anomaly",
    "AuditEvent",
    "Base",
    "Correlation",
    "EntityType",
    "IngestionAttempt",
    "ProductionRecord",
    "RecordState",
    "StagingRecord",
]
