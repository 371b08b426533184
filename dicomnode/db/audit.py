"""The audit writer: every state change appends one Event row in the caller's transaction."""

from __future__ import annotations

from sqlalchemy.orm import Session

from dicomnode.db.models import Event

ENTITY_ID_WIDTH = Event.__table__.c.entity_id.type.length  # type: ignore[attr-defined]


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


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
    ``entity_id`` may come from the network (a refused instance's UID as the peer sent it): it is
    cut to the column's width, which PostgreSQL enforces, rather than losing the event.
    """
    ev = Event(
        stage=stage,
        entity=entity,
        entity_id=_fit(str(entity_id), ENTITY_ID_WIDTH),
        old_state=old_state,
        new_state=new_state,
        reason=reason,
        actor=actor,
    )
    session.add(ev)
    return ev
