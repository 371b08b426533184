"""The receive index on SQLite: instances indexed by several associations at once share a commit
(group commit), and each caller still gets its own answer only after the commit holding its row."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import select
from test_db_backends import header  # an instance header in the open series by default

from dicomnode.db import Event, Instance, Series, make_sessionmaker
from dicomnode.receive.index import InstanceIndex

OPEN_SERIES = "1.2.826.0.1.3680043.8.498.100"  # header()'s default series
NEW_SERIES = "1.2.826.0.1.3680043.8.498.200"


def add(index: InstanceIndex, sop: str, series: str = OPEN_SERIES) -> bool:
    return index.add_instance(
        header(sop, series),
        relpath=f"incoming/{sop}.dcm",
        size=10,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        association_id=None,
    )


def test_instances_arriving_together_share_one_commit_and_each_gets_its_own_answer(tmp_path: Path) -> None:
    """While one association's commit is on its way to disk, the others queue; the next commit
    takes all of them: a duplicate is refused, a new series goes its own way, the rest count."""
    sm = make_sessionmaker(f"sqlite:///{tmp_path / 'db.sqlite'}")
    index = InstanceIndex(sm, receiver="n:1")
    assert add(index, "1.2.3.0")  # the series exists and is receiving
    group = index._group
    assert group is not None
    batches: list[list[str]] = []
    first_in_commit = threading.Event()
    others_queued = threading.Event()
    commit_batch = index._commit_batch

    def slow_commit(rows):  # type: ignore[no-untyped-def]
        batches.append([str(r["sop_instance_uid"]) for r in rows])
        if len(batches) == 1:  # the first commit is slow to reach the disk
            first_in_commit.set()
            assert others_queued.wait(30)
        return commit_batch(rows)

    index._commit_batch = slow_commit  # type: ignore[method-assign]
    group._commit = slow_commit
    results: dict[str, bool] = {}
    errors: list[BaseException] = []

    def receive(sop: str, series: str = OPEN_SERIES) -> None:
        try:
            results[sop] = add(index, sop, series)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    first = threading.Thread(target=receive, args=("1.2.3.1",))
    first.start()
    assert first_in_commit.wait(30)
    others = [
        threading.Thread(target=receive, args=("1.2.3.2",)),
        threading.Thread(target=receive, args=("1.2.3.3",)),
        threading.Thread(target=receive, args=("1.2.3.0",)),  # sent again: already indexed
        threading.Thread(target=receive, args=("1.2.4.1", NEW_SERIES)),
    ]
    for t in others:
        t.start()
    deadline = time.monotonic() + 30
    while len(group._queued) < len(others):
        assert time.monotonic() < deadline, "the callers did not queue behind the commit"
        time.sleep(0.01)
    others_queued.set()
    for t in [first, *others]:
        t.join(30)
    assert errors == []
    assert results == {"1.2.3.1": True, "1.2.3.2": True, "1.2.3.3": True, "1.2.3.0": False, "1.2.4.1": True}
    assert batches[0] == ["1.2.3.1"]
    assert sorted(batches[1]) == ["1.2.3.0", "1.2.3.2", "1.2.3.3", "1.2.4.1"]  # one commit for four
    with sm() as s:
        assert sorted(s.scalars(select(Instance.sop_instance_uid))) == [
            "1.2.3.0",
            "1.2.3.1",
            "1.2.3.2",
            "1.2.3.3",
            "1.2.4.1",
        ]
        counts = {uid: n for uid, n in s.execute(select(Series.series_instance_uid, Series.n_instances))}
        assert counts == {OPEN_SERIES: 4, NEW_SERIES: 1}
        new_series_events = s.scalars(select(Event).where(Event.entity_id == NEW_SERIES)).all()
        assert [e.new_state for e in new_series_events] == ["receiving"]
    index.close()
    sm.kw["bind"].dispose()


def test_a_failed_group_commit_fails_every_instance_in_it_and_the_next_one_works(tmp_path: Path) -> None:
    """A commit that fails (disk full, I/O error) answers each caller of its batch with the error
    (each then answers its peer 0xA700); nothing of the batch is indexed, the next commit works."""
    sm = make_sessionmaker(f"sqlite:///{tmp_path / 'db.sqlite'}")
    index = InstanceIndex(sm, receiver="n:1")
    assert add(index, "1.2.3.0")
    group = index._group
    assert group is not None
    commit_batch = index._commit_batch
    calls = []

    def failing_once(rows):  # type: ignore[no-untyped-def]
        calls.append(len(rows))
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return commit_batch(rows)

    group._commit = failing_once
    try:
        add(index, "1.2.3.1")
    except OSError as exc:
        assert exc.errno == 28
    else:
        raise AssertionError("the failed commit was not reported")
    assert add(index, "1.2.3.1")
    with sm() as s:
        assert s.scalar(select(Series.n_instances)) == 2
    index.close()
    sm.kw["bind"].dispose()
