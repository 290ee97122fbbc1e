"""Contract tests for coordinator.store, run against SQLite and PostgreSQL.

PostgreSQL: ``FEDSCAN_TEST_PG_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) names the server; a
database ``fedscan_test_<random>`` is created through the ``postgres``
database for this run and dropped afterwards, and each test gets its own
schema in it.  The PostgreSQL cases are skipped when the server is unreachable.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url

from coordinator.store import (
    BlobCorruptError,
    BlobStore,
    DuplicateError,
    NotFoundError,
    Store,
    StoreError,
    UpdateRecord,
    open_store,
)
from coordinator.store.db import head_revision, make_engine
from coordinator.store.schema import metadata

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("FEDSCAN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def pg_database() -> Iterator[sa.URL]:
    """A throwaway PostgreSQL database for this test run."""
    base = make_url(PG_URL)
    admin = sa.create_engine(
        base.set(database="postgres"), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    name = f"fedscan_test_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL unreachable at {base.render_as_string()}: {exc.orig}")
    try:
        yield base.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database on the parametrized backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'state.db'}"
    base: sa.URL = request.getfixturevalue("pg_database")
    schema = f"t_{secrets.token_hex(6)}"
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    engine.dispose()
    url = base.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = open_store(db_url)
    yield s
    s.close()


SHA_A = hashlib.sha256(b"a").hexdigest()


def _update_kwargs(round_id: int, agent_id: str, update_id: str, **over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "round_id": round_id,
        "agent_id": agent_id,
        "update_id": update_id,
        "sample_count": 10,
        "metrics": {"loss": 0.5},
        "blob_sha256": SHA_A,
        "nbytes": 1,
    }
    kw.update(over)
    return kw


def _seed(store: Store, agents: tuple[str, ...] = ("a1", "a2", "a3"), round_id: int = 1) -> None:
    for agent in agents:
        store.enroll_agent(agent, "jetson-orin", ["ct"])
    store.create_round(round_id, base_version="v0", config={"lr": 0.01}, deadline=time.time() + 60)


# --------------------------------------------------------------------------- schema / migrations


def test_open_is_idempotent_and_at_head(db_url: str) -> None:
    s1 = open_store(db_url)
    s1.enroll_agent("a1", "p", [])
    s2 = open_store(db_url)  # second open: no-op migration, data intact
    assert s2.get_agent("a1") is not None
    s1.close()
    s2.close()
    s3 = open_store(db_url)
    s3.close()
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head_revision() == "0003"
    finally:
        engine.dispose()


def test_schema_matches_migrations(db_url: str) -> None:
    """schema.py (used by queries) and the Alembic scripts describe the same schema."""
    open_store(db_url).close()
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, metadata) == []
    finally:
        engine.dispose()


def test_newer_database_is_refused(db_url: str) -> None:
    open_store(db_url).close()
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(StoreError, match="9999"):
        open_store(db_url)


def test_sqlite_pragmas(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    open_store(url).close()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        engine.dispose()


def test_concurrent_first_open_from_processes(db_url: str) -> None:
    """Several coordinators starting at once on an empty database all succeed."""
    code = "import sys; from coordinator.store import open_store; open_store(sys.argv[1]).close()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, db_url], cwd=REPO_ROOT, stderr=subprocess.PIPE) for _ in range(4)
    ]
    for proc in procs:
        with proc:
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    with open_store(db_url) as s:
        assert s.list_agents() == []


# --------------------------------------------------------------------------- agents


def test_agents(store: Store) -> None:
    assert store.get_agent("a1") is None
    assert store.list_agents() == []
    rec = store.enroll_agent("a1", "jetson-orin", ["ct", "site-a"], cert_fingerprint="sha256:aa")
    assert (rec.agent_id, rec.profile, rec.tags, rec.cert_fingerprint) == (
        "a1",
        "jetson-orin",
        ["ct", "site-a"],
        "sha256:aa",
    )
    assert rec.last_seen is None and rec.online is False
    assert rec.reported_version is None and rec.desired_version is None
    assert abs(rec.enrolled_at - time.time()) < 60
    assert store.get_agent("a1") == rec

    store.mark_seen("a1", online=True, at=1234.5)
    store.set_reported_version("a1", "v1")
    store.set_desired_version("a1", "v2")
    # re-enroll: profile/tags replaced, fingerprint kept when None, the rest preserved
    again = store.enroll_agent("a1", "rk3588", ["mr"])
    assert (again.profile, again.tags, again.cert_fingerprint) == ("rk3588", ["mr"], "sha256:aa")
    assert again.enrolled_at == rec.enrolled_at
    assert (again.last_seen, again.online, again.reported_version, again.desired_version) == (
        1234.5,
        True,
        "v1",
        "v2",
    )
    assert store.enroll_agent("a1", "rk3588", ["mr"], cert_fingerprint="sha256:bb").cert_fingerprint == "sha256:bb"

    store.mark_seen("a1", online=False)
    got = store.get_agent("a1")
    assert got is not None and got.online is False and got.last_seen is not None
    assert abs(got.last_seen - time.time()) < 60
    store.mark_seen("a1", at=99.0)  # online=None leaves it alone
    got = store.get_agent("a1")
    assert got is not None and got.online is False and got.last_seen == 99.0
    store.set_reported_version("a1", None)
    store.set_desired_version("a1", None)
    got = store.get_agent("a1")
    assert got is not None and got.reported_version is None and got.desired_version is None

    store.enroll_agent("a0", "p", [])
    assert [a.agent_id for a in store.list_agents()] == ["a0", "a1"]
    store.remove_agent("a1")
    assert store.get_agent("a1") is None
    assert [a.agent_id for a in store.list_agents()] == ["a0"]

    for call in (
        lambda: store.remove_agent("nope"),
        lambda: store.mark_seen("nope"),
        lambda: store.set_reported_version("nope", "v"),
        lambda: store.set_desired_version("nope", "v"),
    ):
        with pytest.raises(NotFoundError):
            call()
    with pytest.raises(ValueError):
        store.enroll_agent("", "p", [])
    with pytest.raises(ValueError):
        store.enroll_agent("a2", "p", "ct")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- rounds


def test_rounds(store: Store) -> None:
    assert store.get_round(1) is None and store.latest_round() is None
    rec = store.create_round(1, base_version="v0", config={"lr": 0.01, "epochs": 2}, deadline=1000.0)
    assert (rec.round_id, rec.base_version, rec.config, rec.deadline, rec.mode, rec.status) == (
        1,
        "v0",
        {"lr": 0.01, "epochs": 2},
        1000.0,
        "sync",
        "collecting",
    )
    assert rec.result_version is None and rec.detail is None and rec.created_at == rec.updated_at
    assert store.get_round(1) == rec
    with pytest.raises(DuplicateError):
        store.create_round(1, base_version="v9", config={}, deadline=1.0)
    assert store.get_round(1) == rec

    store.create_round(3, base_version="v0", config={}, deadline=2000.0, mode="async")
    store.create_round(2, base_version="v0", config={}, deadline=3000.0)
    latest = store.latest_round()
    assert latest is not None and latest.round_id == 3 and latest.mode == "async"

    store.set_round_status(1, "aggregating")
    got = store.get_round(1)
    assert got is not None and got.status == "aggregating" and got.updated_at >= rec.updated_at
    store.set_round_status(1, "complete", result_version="v1", detail={"accepted": 3, "agents": ["a1"]})
    got = store.get_round(1)
    assert got is not None
    assert (got.status, got.result_version, got.detail) == (
        "complete",
        "v1",
        {"accepted": 3, "agents": ["a1"]},
    )
    store.set_round_status(2, "failed", detail={"reason": "quorum"})
    store.set_round_status(2, "failed")  # None keeps result_version/detail
    got = store.get_round(2)
    assert got is not None and got.detail == {"reason": "quorum"} and got.result_version is None

    with pytest.raises(ValueError):
        store.set_round_status(1, "done")
    with pytest.raises(NotFoundError):
        store.set_round_status(42, "failed")


# --------------------------------------------------------------------------- updates


def test_updates(store: Store) -> None:
    _seed(store)
    store.create_round(2, base_version="v1", config={}, deadline=1.0)
    assert store.list_updates(1) == [] and not store.has_update(1, "a1")

    order = ["a3", "a1", "a2"]  # acceptance order differs from id order
    recs = [
        store.add_update(**_update_kwargs(1, a, f"u-{a}", sample_count=i + 1, staleness=i)) for i, a in enumerate(order)
    ]
    assert [r.agent_id for r in store.list_updates(1)] == order
    assert store.list_updates(1) == recs
    r0 = recs[0]
    assert (
        r0.round_id,
        r0.update_id,
        r0.sample_count,
        r0.metrics,
        r0.blob_sha256,
        r0.nbytes,
        r0.staleness,
    ) == (
        1,
        "u-a3",
        1,
        {"loss": 0.5},
        SHA_A,
        1,
        0,
    )
    assert recs[0].seq < recs[1].seq < recs[2].seq
    assert store.has_update(1, "a1") and not store.has_update(2, "a1")
    assert store.get_update("a1", "u-a1") == recs[1] and store.get_update("a1", "nope") is None
    assert store.get_update("a2", "u-a1") is None  # ids are looked up per agent

    # second update of the same agent in the same round: rejected, nothing written
    with pytest.raises(DuplicateError):
        store.add_update(**_update_kwargs(1, "a1", "u-other"))
    # same update_id again from the same agent (even for another round): rejected
    with pytest.raises(DuplicateError):
        store.add_update(**_update_kwargs(2, "a1", "u-a1"))
    assert store.get_update("a1", "u-other") is None
    assert store.list_updates(1) == recs and store.list_updates(2) == []

    # the same agent may contribute to another round
    store.add_update(**_update_kwargs(2, "a1", "u-a1-r2"))
    assert [u.update_id for u in store.list_updates(2)] == ["u-a1-r2"]

    with pytest.raises(NotFoundError):
        store.add_update(**_update_kwargs(99, "a1", "u-x"))
    with pytest.raises(NotFoundError):
        store.add_update(**_update_kwargs(1, "ghost", "u-y"))
    with pytest.raises(ValueError):
        store.add_update(**_update_kwargs(2, "a2", "u-z", blob_sha256="../../etc/passwd"))
    with pytest.raises(ValueError):
        store.add_update(**_update_kwargs(2, "a2", "u-z", sample_count=-1))

    # removing an agent keeps its accepted updates (audit trail)
    store.remove_agent("a1")
    assert [u.agent_id for u in store.list_updates(1)] == order


def test_concurrent_duplicate_updates_accept_exactly_one(store: Store) -> None:
    _seed(store, agents=("a1",))
    outcomes: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            store.add_update(**_update_kwargs(1, "a1", f"u{i}"))
            result = "ok"
        except DuplicateError:
            result = "dup"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert sorted(outcomes) == ["dup"] * 7 + ["ok"]
    assert len(store.list_updates(1)) == 1


# --------------------------------------------------------------------------- models


def test_models(store: Store) -> None:
    assert store.latest_model() is None and store.list_models() == []
    store.create_round(1, base_version="v0", config={}, deadline=1.0)
    m0 = store.add_model(version="v0", parent=None, round_id=None, manifest={"sha256": SHA_A}, participants=[])
    assert (m0.version, m0.parent, m0.round_id, m0.manifest, m0.participants, m0.state) == (
        "v0",
        None,
        None,
        {"sha256": SHA_A},
        [],
        "candidate",
    )
    # version names chosen so creation order != lexical order
    store.add_model(version="z-v1", parent="v0", round_id=1, manifest={}, participants=["a2", "a1"], state="approved")
    store.add_model(version="b-v2", parent="z-v1", round_id=None, manifest={}, participants=[])
    assert [m.version for m in store.list_models()] == ["v0", "z-v1", "b-v2"]
    got = store.get_model("z-v1")
    assert got is not None and got.participants == ["a2", "a1"] and got.round_id == 1 and got.state == "approved"
    latest = store.latest_model()
    assert latest is not None and latest.version == "b-v2"

    store.set_model_state("v0", "active")
    got = store.get_model("v0")
    assert got is not None and got.state == "active" and got.updated_at >= got.created_at
    active = store.latest_model(state="active")
    assert active is not None and active.version == "v0"
    assert store.latest_model(state="canary") is None

    with pytest.raises(DuplicateError):
        store.add_model(version="v0", parent=None, round_id=None, manifest={}, participants=[])
    with pytest.raises(NotFoundError):
        store.add_model(version="v9", parent="missing", round_id=None, manifest={}, participants=[])
    with pytest.raises(NotFoundError):
        store.add_model(version="v9", parent=None, round_id=77, manifest={}, participants=[])
    with pytest.raises(ValueError):
        store.add_model(version="v9", parent=None, round_id=None, manifest={}, participants=[], state="live")
    with pytest.raises(ValueError):
        store.set_model_state("v0", "live")
    with pytest.raises(NotFoundError):
        store.set_model_state("nope", "retired")
    assert store.get_model("v9") is None and store.get_model("nope") is None


# --------------------------------------------------------------------------- events


def test_events(store: Store) -> None:
    assert store.list_events() == [] and store.count_events() == 0
    store.record_event("update_rejected", agent_id="a1", round_id=1, reason="stale", detail={"staleness": 5})
    store.record_event("update_rejected", agent_id="a2", round_id=1, reason="bad_signature")
    store.record_event("agent_enrolled", agent_id="a3")
    store.record_event("update_rejected", agent_id="ghost", round_id=404, reason="stale")

    all_events = store.list_events()
    assert [e.kind for e in all_events] == [
        "update_rejected",
        "update_rejected",
        "agent_enrolled",
        "update_rejected",
    ]
    e0 = all_events[0]
    assert (e0.agent_id, e0.round_id, e0.reason, e0.detail) == ("a1", 1, "stale", {"staleness": 5})
    assert all_events[2].round_id is None and all_events[2].reason is None and all_events[2].detail is None
    assert all(abs(e.at - time.time()) < 60 for e in all_events)

    rejected = store.list_events("update_rejected")
    assert [e.agent_id for e in rejected] == ["a1", "a2", "ghost"]
    # limit keeps the newest ones, still oldest first
    assert [e.agent_id for e in store.list_events("update_rejected", limit=2)] == ["a2", "ghost"]
    assert store.list_events(limit=0) == []

    assert store.count_events() == 4
    assert store.count_events("update_rejected") == 3
    assert store.count_events("update_rejected", "stale") == 2
    assert store.count_events(reason="bad_signature") == 1
    assert store.count_events("agent_enrolled", "stale") == 0


# --------------------------------------------------------------------------- JSON, durability, lifecycle

NESTED: dict[str, Any] = {
    "float": 0.1 + 0.2,
    "tiny": 5e-324,
    "big_int": 2**62 + 1,
    "neg": -7,
    "bool": True,
    "none": None,
    "text": 'Ünïcødé ✓ \u0000 "quoted" \\ back',
    "list": [1, "two", [3.5, {"four": 4}], None, False],
    "nested": {"a": {"b": {"c": []}}, "empty": {}},
    "z_first_then_a": {"z": 1, "a": 2},
}


def test_json_fields_round_trip(store: Store) -> None:
    _seed(store)
    store.create_round(7, base_version="v0", config=NESTED, deadline=1.0)
    store.set_round_status(7, "complete", detail=NESTED)
    store.add_update(**_update_kwargs(7, "a1", "u1", metrics=NESTED))
    store.add_model(version="v1", parent=None, round_id=7, manifest=NESTED, participants=["ä", "b"])
    store.record_event("k", detail=NESTED)
    rnd = store.get_round(7)
    assert rnd is not None and rnd.config == NESTED and rnd.detail == NESTED
    assert store.list_updates(7)[0].metrics == NESTED
    model = store.get_model("v1")
    assert model is not None and model.manifest == NESTED and model.participants == ["ä", "b"]
    assert store.list_events("k")[0].detail == NESTED
    assert list(rnd.config["z_first_then_a"]) == ["z", "a"]  # key order preserved

    with pytest.raises(ValueError):
        store.add_update(**_update_kwargs(7, "a2", "u2", metrics={"loss": float("nan")}))
    with pytest.raises(ValueError):
        store.record_event("k", detail={"obj": object()})
    assert not store.has_update(7, "a2")


def _snapshot(store: Store) -> dict[str, Any]:
    return {
        "agents": store.list_agents(),
        "rounds": [store.get_round(r) for r in (1, 2)],
        "updates": store.list_updates(1),
        "models": store.list_models(),
        "events": store.list_events(),
    }


def test_durable_across_close_and_reopen(db_url: str) -> None:
    s = open_store(db_url)
    _seed(s)
    s.create_round(2, base_version="v0", config={"x": [1, 2]}, deadline=5.0, mode="async")
    s.mark_seen("a1", online=True, at=42.0)
    s.set_desired_version("a2", "v1")
    s.add_update(**_update_kwargs(1, "a2", "u2"))
    s.add_update(**_update_kwargs(1, "a1", "u1"))
    s.add_model(version="v0", parent=None, round_id=None, manifest={"m": 1}, participants=[])
    s.add_model(version="v1", parent="v0", round_id=1, manifest={}, participants=["a1", "a2"], state="canary")
    s.set_round_status(1, "complete", result_version="v1", detail={"n": 2})
    s.record_event("update_rejected", agent_id="a3", round_id=1, reason="late")
    before = _snapshot(s)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError):
        s.get_agent("a1")

    with open_store(db_url) as reopened:
        assert _snapshot(reopened) == before
        assert reopened.count_events("update_rejected", "late") == 1
        # and it keeps working: acceptance order continues after the old rows
        reopened.add_update(**_update_kwargs(1, "a3", "u3"))
        assert [u.update_id for u in reopened.list_updates(1)] == ["u2", "u1", "u3"]


# --------------------------------------------------------------------------- crash consistency

_CRASH_CHILD = r"""
import os, sys
from coordinator.store import BlobStore, open_store

url, blob_dir, mode, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = open_store(url)
blobs = BlobStore(blob_dir)
store.enroll_agent("crash-agent", "p", [])
for r in range(1, 1000):
    store.create_round(r, base_version="v0", config={"r": r}, deadline=0.0)
    frame = os.urandom(256 + r) + r.to_bytes(4, "big")
    sha = blobs.put(frame)
    rec = store.add_update(round_id=r, agent_id="crash-agent", update_id=f"u{r}", sample_count=r,
                           metrics={"r": r}, blob_sha256=sha, nbytes=len(frame))
    store.record_event("accepted", round_id=r, detail={"seq": rec.seq})
    print(r, flush=True)  # acknowledged: this update's call has returned
    if mode == "exit_mid_tx" and r == n:
        # open a write transaction, insert, and die without committing
        import sqlalchemy as sa
        from coordinator.store import schema
        conn = store._engine.connect()
        conn.execution_options(fedscan_store_write=True)
        conn.begin()
        conn.execute(sa.insert(schema.rounds).values(round_id=r + 1, base_version="v0", config={},
                     deadline=0.0, mode="sync", status="collecting", created_at=0.0, updated_at=0.0))
        conn.execute(sa.insert(schema.events).values(kind="uncommitted", at=0.0))
        os._exit(3)
"""


@pytest.mark.parametrize("mode", ["sigkill", "exit_mid_tx"])
def test_killed_process_leaves_consistent_store(db_url: str, tmp_path: Path, mode: str) -> None:
    blob_dir = tmp_path / "blobs"
    n = 25
    acknowledged: list[int] = []
    with subprocess.Popen(
        [sys.executable, "-c", _CRASH_CHILD, db_url, str(blob_dir), mode, str(n)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acknowledged.append(int(line))
            if mode == "sigkill" and len(acknowledged) == n:
                proc.send_signal(signal.SIGKILL)  # lands somewhere inside the next iteration
                break
        rc = proc.wait(timeout=60)
        stderr = proc.stderr.read()
    assert len(acknowledged) == n, stderr
    assert rc == (-signal.SIGKILL if mode == "sigkill" else 3)

    with open_store(db_url) as store:
        if store.dialect == "sqlite":
            engine = make_engine(db_url)
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
                assert conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
            engine.dispose()
        blobs = BlobStore(blob_dir)
        latest = store.latest_round()
        assert latest is not None
        accepted: list[UpdateRecord] = []
        for r in range(1, latest.round_id + 1):
            assert store.get_round(r) is not None
            accepted.extend(store.list_updates(r))
        ids = [u.update_id for u in accepted]
        # every acknowledged update is there; at most the one in flight beyond
        assert ids[:n] == [f"u{r}" for r in acknowledged]
        assert len(ids) <= n + 1
        for upd in accepted:  # every accepted row is readable and its blob intact
            assert store.get_update(upd.agent_id, upd.update_id) == upd
            data = blobs.get(upd.blob_sha256)
            assert len(data) == upd.nbytes and int.from_bytes(data[-4:], "big") == upd.round_id
        if mode == "exit_mid_tx":
            assert latest.round_id == n and len(ids) == n
            assert store.count_events("uncommitted") == 0
        assert store.count_events("accepted") in (len(ids), len(ids) - 1)
        blobs.sweep_temp(max_age_s=0)
        assert not list(blob_dir.glob("*/.tmp-*"))
        # the store keeps working after the crash
        r = latest.round_id + 1
        store.create_round(r, base_version="v0", config={}, deadline=0.0)
        store.add_update(**_update_kwargs(r, "crash-agent", "after-crash"))
        assert store.has_update(r, "crash-agent")


# --------------------------------------------------------------------------- BlobStore


def test_blobstore_put_get_has_delete(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = os.urandom(1000)
    sha = blobs.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert blobs.has(sha) and blobs.get(sha) == data
    assert blobs.put(data) == sha  # idempotent
    assert blobs.put(b"") == hashlib.sha256(b"").hexdigest() and blobs.get(hashlib.sha256(b"").hexdigest()) == b""
    assert sorted(blobs.iter_shas()) == sorted([sha, hashlib.sha256(b"").hexdigest()])
    assert not list((tmp_path / "blobs").glob("*/.tmp-*"))  # no temp files left behind
    assert blobs.delete(sha) is True and blobs.delete(sha) is False
    assert not blobs.has(sha)
    with pytest.raises(NotFoundError):
        blobs.get(sha)
    for bad in ("../../etc/passwd", "A" * 64, "abc", sha + "0"):
        with pytest.raises(ValueError):
            blobs.has(bad)


def test_blobstore_detects_corruption_and_put_repairs(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    data = b"model update frame" * 100
    sha = blobs.put(data)
    path = blobs.path(sha)
    corrupted = bytearray(path.read_bytes())
    corrupted[10] ^= 0xFF  # same size, one bit-flipped byte
    path.write_bytes(bytes(corrupted))
    with pytest.raises(BlobCorruptError):
        blobs.get(sha)
    path.write_bytes(data[:-5])  # truncated
    with pytest.raises(BlobCorruptError):
        blobs.get(sha)
    assert issubclass(BlobCorruptError, StoreError)
    assert blobs.put(data) == sha  # re-put rewrites the damaged copy
    assert blobs.get(sha) == data


def test_blobstore_sweeps_stale_temp_files(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    sha = blobs.put(b"x")
    stale = blobs.path(sha).parent / ".tmp-leftover"
    stale.write_bytes(b"partial")
    assert blobs.sweep_temp(max_age_s=3600) == 0
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert blobs.sweep_temp(max_age_s=3600) == 1
    assert not stale.exists() and blobs.get(sha) == b"x"
    assert list(blobs.iter_shas()) == [sha]


def test_url_handling() -> None:
    from coordinator.store.db import normalize_url

    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    with pytest.raises(StoreError, match="unsupported"):
        open_store("mysql://u@h/db")
    with open_store("sqlite://") as mem:  # in-memory: handy for unit tests elsewhere
        mem.enroll_agent("a", "p", [])
        assert [a.agent_id for a in mem.list_agents()] == ["a"]


# --------------------------------------------------------------------------- states as enums


def test_states_are_enums_stored_as_the_same_strings(store: Store) -> None:
    from coordinator.states import ModelState, RolloutState, RoundMode, RoundStatus

    _seed(store)
    store.set_round_status(1, RoundStatus.AGGREGATING)
    rec = store.get_round(1)
    assert rec is not None and rec.status is RoundStatus.AGGREGATING and rec.mode is RoundMode.SYNC
    store.add_model(version="v1", parent=None, round_id=1, manifest={}, participants=[], state="canary")
    model = store.get_model("v1")
    assert model is not None and model.state is ModelState.CANARY
    r = store.create_rollout(version="v1", cohort={}, stages=[1], agents=["a1"], previous={}, config={})
    assert r.state is RolloutState.RUNNING
    with store._engine.connect() as conn:  # the database holds the very strings it always held
        assert conn.exec_driver_sql("SELECT status, mode FROM rounds").one() == ("aggregating", "sync")
        assert conn.exec_driver_sql("SELECT state FROM models").scalar() == "canary"
        assert conn.exec_driver_sql("SELECT state FROM rollouts").scalar() == "running"
    for bad in (lambda: store.set_round_status(1, "exploded"),
                lambda: store.set_model_state("v1", "shiny"),
                lambda: store.create_round(2, base_version="v0", config={}, deadline=1.0, mode="eventually"),
                lambda: store.update_rollout(r.rollout_id, state="sideways")):
        with pytest.raises(ValueError, match="expected one of"):
            bad()


def test_update_ids_belong_to_their_agent(store: Store) -> None:
    """Another agent's update id is no duplicate of mine (issue 15 item 1)."""
    _seed(store)
    store.create_round(2, base_version="v0", config={}, deadline=1.0)
    mine = store.add_update(**_update_kwargs(1, "a1", "u-1"))
    theirs = store.add_update(**_update_kwargs(1, "a2", "u-1"))  # was: DuplicateError, the victim told "duplicate"
    assert store.get_update("a1", "u-1") == mine and store.get_update("a2", "u-1") == theirs
    with pytest.raises(DuplicateError):
        store.add_update(**_update_kwargs(2, "a1", "u-1"))


def test_migration_0003_keeps_updates_and_moves_the_key(db_url: str) -> None:
    """A database at 0002 with updates upgrades in place: rows, their order and the sequence kept."""
    from alembic import command

    from coordinator.store.db import alembic_config

    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0002")
            conn.exec_driver_sql("INSERT INTO agents (agent_id, profile, tags, enrolled_at, online) "
                                 "VALUES ('a1', 'p', '[]', 0, false), ('a2', 'p', '[]', 0, false)")
            conn.exec_driver_sql("INSERT INTO rounds (round_id, base_version, config, deadline, mode, status, "
                                 "created_at, updated_at) VALUES (1, 'v0', '{}', 0, 'sync', 'collecting', 0, 0)")
            for agent in ("a2", "a1"):
                conn.exec_driver_sql(
                    "INSERT INTO updates (update_id, round_id, agent_id, sample_count, metrics, blob_sha256, nbytes, "
                    f"staleness, received_at) VALUES ('u-{agent}', 1, '{agent}', 3, '{{}}', '{SHA_A}', 1, 0, 0)")
    finally:
        engine.dispose()
    with open_store(db_url) as store:
        before = store.list_updates(1)
        assert [(u.agent_id, u.update_id) for u in before] == [("a2", "u-a2"), ("a1", "u-a1")]
        store.enroll_agent("a3", "p", [])
        later = store.add_update(**_update_kwargs(1, "a3", "u-a2"))  # a2's id, another agent: accepted
        assert later.seq > before[-1].seq


def test_blob_put_fsyncs_the_file_its_folder_and_a_new_folder_s_parent(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob that put() returned survives a power loss: file, shard folder and, when the shard
    folder is new, the root folder holding its entry are fsynced (issue 15 item 8)."""
    blobs = BlobStore(tmp_path / "blobs")
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    sha = blobs.put(b"first")
    final = blobs.path(sha)
    assert str(final.parent) in synced and str(blobs.root) in synced
    assert any(p.startswith(str(final.parent / ".tmp-")) for p in synced)  # the file, before its rename
    synced.clear()
    other = next(f"x{i}".encode() for i in range(100_000)
                 if hashlib.sha256(f"x{i}".encode()).hexdigest()[:2] == sha[:2])  # same shard folder
    blobs.put(other)
    assert str(final.parent) in synced and str(blobs.root) not in synced
