"""The audit writer: every state change appends one Event row in the caller's transaction."""

from __future__ import annotations

from sqlalchemy.orm import Session

from dicomnode.db.models import Event


def record(
    session: Session,
    stage: str,
    entity: str,
    entity_id: object,
    old_state: str | None,
    new_state: str | None,
    reason: str | None = None,
    actor: str | None = None,
) -> Event:
    """Add an audit event to ``session`` (committed with the state change it describes).

    ``actor`` names who asked for the change when a person did (admin actions), e.g. a token name.
    """
    ev = Event(
        stage=stage,
        entity=entity,
        entity_id=str(entity_id),
        old_state=old_state,
        new_state=new_state,
        reason=reason,
        actor=actor,
    )
    session.add(ev)
    return ev
