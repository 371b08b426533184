"""Database: models, engine/session setup, audit writer."""

from dicomnode.db.audit import record
from dicomnode.db.engine import init_db, make_engine, make_sessionmaker, storage_sessionmaker
from dicomnode.db.models import (
    Association,
    Base,
    Delivery,
    DestinationState,
    Event,
    Instance,
    Job,
    Output,
    PriorFetch,
    PriorQuery,
    PriorRetrieve,
    QuarantinedInstance,
    Series,
    SeriesDecision,
    SeriesRemoval,
    Worker,
    utcnow,
)
from dicomnode.db.schema import SchemaError

__all__ = [
    "Association",
    "Base",
    "Delivery",
    "DestinationState",
    "Event",
    "Instance",
    "Job",
    "Output",
    "PriorFetch",
    "PriorQuery",
    "PriorRetrieve",
    "QuarantinedInstance",
    "SchemaError",
    "Series",
    "SeriesDecision",
    "Worker",
    "SeriesRemoval",
    "init_db",
    "make_engine",
    "make_sessionmaker",
    "record",
    "storage_sessionmaker",
    "utcnow",
]
