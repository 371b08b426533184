"""What the admin app's routes share: settings, the DB, who is asking, the actions, the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.registry import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.admin.actions import AdminActions
from dicomnode.admin.auth import Authenticator
from dicomnode.admin.metrics import make_registry
from dicomnode.config import Settings


@dataclass
class AdminContext:
    settings: Settings
    sessionmaker: sessionmaker[Session]
    auth: Authenticator = field(init=False)
    actions: AdminActions = field(init=False)
    registry: CollectorRegistry = field(init=False)

    def __post_init__(self) -> None:
        self.auth = Authenticator(self.settings.admin)
        self.actions = AdminActions(self.settings, self.sessionmaker)
        self.registry = make_registry(self.settings, self.sessionmaker)
