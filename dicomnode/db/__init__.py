"""Database: models, engine/session setup, audit writer."""

from dicomnode.db.audit import record
from dicomnode.db.engine import init_db, make_engine, make_sessionmaker
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
    "Series",
    "SeriesDecision",
    "Worker",
    "SeriesRemoval",
    "init_db",
    "make_engine",
    "make_sessionmaker",
    "record",
    "utcnow",
]
