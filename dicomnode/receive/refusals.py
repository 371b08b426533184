"""Rate limits for refusal records: a peer that repeats the same bad request cannot flood the log or audit.

Every refusal is written (one audit event, one log line) until ``burst`` refusals of one kind
from one peer have been written within ``window`` seconds; later ones in that window are only
counted, and once the window has passed their number is written as one summary. The DICOM
status each request gets is never affected, only how often it is written down.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Window:
    started: float
    written: int = 0
    suppressed: int = 0
    last_reason: str = ""


@dataclass(frozen=True)
class Summary:
    """Refusals of one kind from one peer that were counted but not written one by one."""

    peer: str
    kind: str
    count: int
    window_seconds: float
    last_reason: str = field(default="")

    @property
    def reason(self) -> str:
        return (
            f"{self.count} more refusals like this from {self.peer} within {self.window_seconds:g} s "
            f"were not written one by one ({self.kind}); the last: {self.last_reason}"
        )


class RefusalLimiter:
    """Decides which refusals are written; thread safe, bounded memory (``max_keys`` peers x kinds)."""

    def __init__(
        self,
        burst: int = 5,
        window: float = 60.0,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: OrderedDict[tuple[str, str], _Window] = OrderedDict()
        self._due: list[Summary] = []

    def allow(self, peer: str, kind: str, reason: str = "") -> bool:
        """True when this refusal is to be written; False when it is only counted."""
        now = self._clock()
        key = (peer, kind)
        with self._lock:
            self._expire(now)
            w = self._windows.get(key)
            if w is None:
                w = self._windows[key] = _Window(started=now)
                if len(self._windows) > self.max_keys:
                    self._close(*self._windows.popitem(last=False))
            if w.written < self.burst:
                w.written += 1
                return True
            w.suppressed += 1
            w.last_reason = reason
            return False

    def due(self, flush_all: bool = False) -> list[Summary]:
        """Summaries of windows that have ended (all windows with ``flush_all``), each returned once."""
        with self._lock:
            if flush_all:
                while self._windows:
                    self._close(*self._windows.popitem(last=False))
            else:
                self._expire(self._clock())
            due, self._due = self._due, []
            return due

    def _expire(self, now: float) -> None:
        # Windows are kept in the order they started, so the expired ones are at the front.
        while self._windows:
            key, w = next(iter(self._windows.items()))
            if now - w.started < self.window:
                break
            del self._windows[key]
            self._close(key, w)

    def _close(self, key: tuple[str, str], w: _Window) -> None:
        if w.suppressed:
            self._due.append(Summary(key[0], key[1], w.suppressed, self.window, w.last_reason))


class QuietLibraryLog(logging.Filter):
    """For pynetdicom's and pydicom's loggers: no tracebacks (a peer's bad bytes are not our bug) and
    at most ``burst`` lines per logger and level in ``window`` seconds (their messages embed the
    values they complain about, so the logger, not the text, is what is counted)."""

    def __init__(self, burst: int = 5, window: float = 60.0) -> None:
        super().__init__()
        self._limiter = RefusalLimiter(burst=burst, window=window, max_keys=1024)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text:
            record.exc_info = None
            record.exc_text = None
        return self._limiter.allow(record.name, record.levelname)


_QUIET = QuietLibraryLog()


def quiet_library_logs() -> None:
    """Install :class:`QuietLibraryLog` on every pynetdicom and pydicom logger (idempotent), and
    switch off pydicom's complaints about values it reads: they quote the value (which may be a
    patient's name) and the receive stage checks what it uses itself (:mod:`.header`)."""
    import pydicom.config  # noqa: PLC0415  -- the modules create their loggers on import
    import pynetdicom  # noqa: F401, PLC0415

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # pydicom logs what it also raises as a UserWarning: the (rate-limited) log line is enough.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")

    names = [
        n
        for n in logging.root.manager.loggerDict
        if n in ("pynetdicom", "pydicom") or n.startswith(("pynetdicom.", "pydicom."))
    ]
    for name in names:
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
