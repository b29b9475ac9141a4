"""ORM models, one file per aggregate; importing this package registers every table."""

from pipeline_console.models.audit import AuditEvent
from pipeline_console.models.auth import ApiToken, ConsoleSession, LoginCode
from pipeline_console.models.base import Base
from pipeline_console.models.delivery import (
    AmbiguousOutcome,
    Circuit,
    DeadLetter,
    Delivery,
    DeliveryAttempt,
    DownstreamSystem,
    SystemSecret,
    Worker,
)
from pipeline_console.models.intake import IntakeConsumer
from pipeline_console.models.jobs import JobRun, JobSchedule
from pipeline_console.models.records import (
    Anomaly,
    Correlation,
    EntityType,
    IngestionAttempt,
    ProductionRecord,
    RecordState,
    StagingRecord,
)
from pipeline_console.models.replay import ReplayExecution, ReplayItem, ReplayRequest

__all__ = [
    "AmbiguousOutcome",
    "Anomaly",
    "ApiToken",
    "AuditEvent",
    "Base",
    "Circuit",
    "ConsoleSession",
    "Correlation",
    "DeadLetter",
    "Delivery",
    "DeliveryAttempt",
    "DownstreamSystem",
    "EntityType",
    "IngestionAttempt",
    "IntakeConsumer",
    "JobRun",
    "JobSchedule",
    "LoginCode",
    "ProductionRecord",
    "RecordState",
    "ReplayExecution",
    "ReplayItem",
    "ReplayRequest",
    "StagingRecord",
    "SystemSecret",
    "Worker",
]
