"""Which database the tests run on: SQLite (the embedded default) and a real PostgreSQL.

A test that takes ``db_url`` (a fresh database) or ``db_factory`` (fresh databases on demand) runs
once per selected backend, its id ending in ``[sqlite]`` or ``[postgresql]``. The selection comes
from ``--db`` or the environment variable ``DICOMNODE_TEST_DB``:

- unset / ``default`` (CI): SQLite for every such test, and PostgreSQL too for tests marked
  ``both_backends``: the migrations, what SQLite lets pass and PostgreSQL refuses, the receive
  index (stores, duplicates, concurrent associations, a reopened series), two receive processes
  on one port, assemble, the fuse stage's claims and recovery, the outbox's state machine and
  the one-process end-to-end run. The others (network refusals, transfer syntaxes, fusion
  geometry, the four-process end-to-end run) run no SQL those do not, and CI's time is bounded;
  they run on PostgreSQL when asked;
- ``sqlite`` or ``postgresql``: that backend only, for every such test;
- ``all``: both backends for every such test.

PostgreSQL is started once per session (``dicomnode.testing.postgres``). ``db_url`` is one database
per test module, emptied before every test (its other sessions ended, its schema dropped: far
cheaper than a new database); ``db_factory`` makes new databases, for module-scoped fixtures.
Without Debian's postgresql package those runs are skipped, saying so.

No lease renewal thread may outlive the test module that started it: a forgotten one keeps writing
to a database that its module has dropped (or a server the session has stopped).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from dicomnode.testing.postgres import PostgresServer, postgres_missing, start_postgres

BACKENDS = ("sqlite", "postgresql")
SELECTIONS = ("default", "sqlite", "postgresql", "all")
_names = itertools.count(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db",
        choices=SELECTIONS,
        default=None,
        help="database backends for tests that take db_url (default: env DICOMNODE_TEST_DB or 'default')",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_backends: by default run on PostgreSQL as well as SQLite (see tests/conftest.py)"
    )


def _selection(config: pytest.Config) -> str:
    value = config.getoption("--db") or os.environ.get("DICOMNODE_TEST_DB", "") or "default"
    if value not in SELECTIONS:
        raise pytest.UsageError(f"DICOMNODE_TEST_DB must be one of {', '.join(SELECTIONS)}, got {value!r}")
    return value


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_backend" not in metafunc.fixturenames:
        return
    selection = _selection(metafunc.config)
    if selection == "all":
        backends = BACKENDS
    elif selection in BACKENDS:
        backends = (selection,)
    elif metafunc.definition.get_closest_marker("both_backends"):
        backends = BACKENDS
    else:
        backends = ("sqlite",)
    metafunc.parametrize("db_backend", backends, scope="module")


def _renewal_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "leases" and t.is_alive()}


@pytest.fixture(scope="module", autouse=True)
def _no_renewal_thread_outlives_its_module() -> Iterator[None]:
    """Fails the module's last teardown when a ``WorkerLeases`` thread it started still runs."""
    before = _renewal_threads()
    yield
    deadline = time.monotonic() + 5.0
    while (left := _renewal_threads() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"{len(left)} lease renewal thread(s) started in this module still run: stop its stages"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL for the session (skips when it cannot run here)."""
    missing = postgres_missing()
    if missing:
        pytest.skip(missing)
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def db_factory(
    db_backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], str]]:
    """Makes fresh, empty databases on the backend under test; returns their SQLAlchemy URLs."""
    if db_backend == "sqlite":
        folder = tmp_path_factory.mktemp("sqlite")
        yield lambda: f"sqlite:///{folder}/node-{next(_names)}.db"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    made: list[str] = []

    def make() -> str:
        name = f"test_{os.getpid()}_{next(_names)}"
        made.append(name)
        return server.create_database(name)

    yield make
    for name in made:
        server.drop_database(name)


@pytest.fixture(scope="module")
def _module_database(db_factory: Callable[[], str]) -> str:
    return db_factory()


@pytest.fixture()
def db_url(db_backend: str, db_factory: Callable[[], str], request: pytest.FixtureRequest) -> str:
    """An empty database on the backend under test."""
    if db_backend == "sqlite":
        return db_factory()
    url: str = request.getfixturevalue("_module_database")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    server.reset_database(url.rsplit("/", 1)[1])
    return url
