"""The store and the catalogue cache on SQLite and a real PostgreSQL: migrations, atomic
writes, uniqueness enforced by the database, and cache invalidation across replicas."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import sqlite3
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from kmsgate.algorithms import KeyType
from kmsgate.auth import Credentials, TokenRegistry
from kmsgate.catalogue import Catalogue, Key, KeyState, KeyVersion
from kmsgate.config import Settings, with_database_driver
from kmsgate.errors import ConfigError, Conflict, NotFound, Unauthenticated, Unavailable
from kmsgate.grants import ActiveGrants, approve, new_grant
from kmsgate.store import Store, engine, tables
from kmsgate.store import certificates as certificates_module
from kmsgate.store.certificates import CertQuery
from tests.components import free_port, fresh_postgres_database


@pytest.fixture
def store(database_url):
    s = Store(database_url)
    s.migrate()
    yield s
    s.close()


def make_key(name: str = "k") -> Key:
    now = datetime.now(UTC)
    version = KeyVersion(version=1, backend_ref=f"softkms:{name}/1", created_at=now, material=b"m1")
    return Key(
        name=name,
        type=KeyType.ED25519,
        purpose="p",
        backend="local",
        state=KeyState.ENABLED,
        labels={"env": "x"},
        primary_version=1,
        min_decrypt_version=1,
        versions={1: version},
        created_at=now,
        updated_at=now,
    )


def test_migrate_is_idempotent(store):
    store.migrate()
    inspector = sa.inspect(store.engine)
    assert {"keys", "key_versions", "tokens", "meta", "alembic_version"} <= set(
        inspector.get_table_names()
    )


def _migrate_after(url: str, barrier: threading.Barrier) -> None:
    """Migrate `url` from a Store of this (spawned) process, once every process is ready."""
    store = Store(url)
    try:
        barrier.wait(timeout=60)
        store.migrate()
    finally:
        store.close()


def _assert_schema_current(url: str) -> None:
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    store = Store(url)
    try:
        with store.engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_heads()
        assert current == tuple(ScriptDirectory(str(engine._MIGRATIONS)).get_heads())
        assert store.get_meta("epoch:keys") == "0"  # seeded by a migration
    finally:
        store.close()


def _migrate_at_once(url: str, processes: int = 3) -> None:
    """`processes` replicas start at the same instant on the empty database `url`."""
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(processes)
    workers = [spawn.Process(target=_migrate_after, args=(url, barrier)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0] * processes
    _assert_schema_current(url)


@pytest.mark.postgres
def test_replicas_started_at_once_on_an_empty_postgres_database_all_migrate(postgres_server):
    """A Deployment's replicas on a fresh database: one migrates, the others wait for it (an
    advisory lock) and then find the schema current, instead of failing on duplicate rows
    and types."""
    for _ in range(5):
        with fresh_postgres_database(postgres_server) as url:
            _migrate_at_once(url)


def test_workers_started_at_once_on_an_empty_sqlite_database_all_migrate(tmp_path):
    """The same on SQLite: the writer lock file beside the database serialises them."""
    for n in range(3):
        _migrate_at_once(f"sqlite:///{tmp_path / f'kmsgate-{n}.db'}")


def _startup_error(url: str) -> str:
    """The one-line reason `Store(url).migrate()` (what start-up runs) gives for failing."""
    with pytest.raises(ConfigError) as caught:
        store = Store(url)
        try:
            store.migrate()
        finally:
            store.close()
    message = str(caught.value)
    assert "\n" not in message and PASSWORD not in message
    return message


PASSWORD = "correct-horse-battery"  # a test's


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg"])
def test_a_refused_port_says_so_and_names_the_database_without_its_password(scheme):
    port = free_port()
    message = _startup_error(f"{scheme}://kmsgate:{PASSWORD}@127.0.0.1:{port}/kmsgate")
    assert message.startswith(
        f"cannot connect to the database at postgresql://kmsgate:***@127.0.0.1:{port}/kmsgate: "
        "Connection refused (Is the server running"
    ), message


def test_a_database_url_of_no_known_database_says_so():
    message = _startup_error(f"oracle2://kmsgate:{PASSWORD}@db/kms")
    assert message == (
        "database_url oracle2://kmsgate:***@db/kms: kmsgate has no driver for 'oracle2' "
        "(use sqlite:///PATH or postgresql://...)"
    )
    for malformed in (f"::{PASSWORD}::", f"postgresql://k:{PASSWORD}@db:port/kms"):
        assert _startup_error(malformed) == (
            "database_url is not a database URL "
            "(sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE)"
        )
    for stray in ("x@db/kms", "9/x@db/kms", "[x]@db/kms", "db/kms?x@y=1"):
        assert _startup_error(f"postgresql://k:{PASSWORD}@{stray}") == (
            "database_url: an '@' in the user or password must be percent-encoded (%40)"
        ), stray


def test_a_sqlite_database_in_a_missing_directory_says_so(tmp_path):
    message = _startup_error(f"sqlite:///{tmp_path / 'gone' / 'kmsgate.db'}")
    assert message == (
        f"cannot open the database's lock file {tmp_path / 'gone' / 'kmsgate.db'}.write.lock: "
        "No such file or directory"
    )


def test_the_driver_reason_never_carries_a_password():
    """A driver may echo what it was given: the password (and a query value named like one)
    is replaced wherever it appears, as it is or percent-encoded."""
    url = sa.engine.make_url(
        "postgresql+psycopg://u:p%40ss%2Fw0rd@db/kms?sslpassword=key-pass&sslmode=require"
    )
    said = 'FATAL:  no "p@ss/w0rd" nor p%40ss%2Fw0rd\nHINT: key-pass?'
    exc = sa.exc.OperationalError("SELECT 1", {"password": "p@ss/w0rd"}, Exception(said))
    assert engine.driver_reason(exc, url) == 'no "***" nor *** (HINT: ***?)'
    assert engine.shown_url(url) == "postgresql://u:***@db/kms?sslmode=require&sslpassword=***"
    in_query = sa.engine.make_url("postgresql:///kms?host=db&user=u&password=S3cret")
    assert engine.shown_url(in_query) == "postgresql:///kms?host=db&password=***&user=u"


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgres://u:p@db:5432/kms", "postgresql+psycopg://u:p@db:5432/kms"),
        ("postgresql://u@db/kms?sslmode=require", "postgresql+psycopg://u@db/kms?sslmode=require"),
        ("PostgreSQL://u@db/kms", "postgresql+psycopg://u@db/kms"),
        ("postgresql+psycopg://u@db/kms", "postgresql+psycopg://u@db/kms"),
        ("sqlite:////var/lib/kmsgate/kmsgate.db", "sqlite:////var/lib/kmsgate/kmsgate.db"),
    ],
)
def test_postgres_urls_get_the_installed_driver(given, used):
    assert with_database_driver(given) == used
    assert Settings(database_url=given).resolved_database_url() == used


@pytest.fixture
def password_role(postgres_server):
    """A role `pwcheck` (password PASSWORD) that must give its password over TCP: the test
    server trusts everyone else. Yields its name; the rule goes at the end."""
    import psycopg

    hba = postgres_server.data_dir / "pg_hba.conf"
    rules = hba.read_text()
    with psycopg.connect(postgres_server.conninfo(), autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS pwcheck")
        conn.execute(f"CREATE ROLE pwcheck LOGIN PASSWORD '{PASSWORD}'")
        hba.write_text(f"host all pwcheck all scram-sha-256\n{rules}")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield "pwcheck"
    finally:
        hba.write_text(rules)
        with psycopg.connect(postgres_server.conninfo(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("DROP ROLE IF EXISTS pwcheck")


@pytest.mark.postgres
def test_a_wrong_password_says_so_without_either_password(postgres_server, password_role):
    host, port = postgres_server.host, postgres_server.port
    wrong = f"{PASSWORD}-not"
    url = f"postgresql://{password_role}:{wrong}@{host}:{port}/postgres"
    message = _startup_error(url)
    assert wrong not in message
    assert message == (
        f"cannot connect to the database at postgresql://pwcheck:***@{host}:{port}/postgres: "
        'password authentication failed for user "pwcheck"'
    )
    right = f"postgres://{password_role}:{PASSWORD}@{host}:{port}/postgres"
    store = Store(right)  # the rule holds: the right password gets in
    try:
        assert store.ping() is None
    finally:
        store.close()


@pytest.mark.postgres
def test_a_missing_database_says_so(postgres_server):
    host, port = postgres_server.host, postgres_server.port
    message = _startup_error(f"postgresql://postgres:{PASSWORD}@{host}:{port}/no_such_db")
    assert message == (
        f"cannot connect to the database at postgresql://postgres:***@{host}:{port}/no_such_db: "
        'database "no_such_db" does not exist'
    )


@pytest.mark.postgres
def test_a_postgres_url_migrates_with_the_installed_driver(postgres_server):
    """`postgres://` (as DATABASE_URL secrets spell it) works as `postgresql+psycopg://`."""
    with fresh_postgres_database(postgres_server) as url:
        given = url.replace("postgresql+psycopg://", "postgres://", 1)
        store = Store(given)
        try:
            store.migrate()
        finally:
            store.close()
        _assert_schema_current(url)


def test_round_trip_and_epoch(store):
    before, tokens_before = store.feed.epoch("keys"), store.feed.epoch("tokens")
    catalogue = Catalogue(store)
    catalogue.insert(make_key())
    assert store.feed.epoch("keys") == before + 1
    assert store.feed.epoch("tokens") == tokens_before
    assert store.feed.changes_since("keys", before) == [(before + 1, "k")]
    fresh = Catalogue(store).get("k")
    assert fresh == catalogue.get("k")
    assert fresh.versions[1].material == b"m1"
    assert fresh.created_at.tzinfo is not None


def test_duplicate_key_rejected_and_nothing_partial(store):
    catalogue = Catalogue(store)
    catalogue.insert(make_key())
    other = replace(make_key(), type=KeyType.ECDSA_P256)
    with pytest.raises(Conflict) as caught:  # as when another replica made it a moment ago
        catalogue.insert(other)
    assert caught.value.detail == "a key named 'k' exists"  # no retry would help
    assert caught.value.headers() == {}
    with store.engine.connect() as conn:
        assert (
            conn.execute(sa.select(sa.func.count()).select_from(tables.key_versions)).scalar() == 1
        )
    assert Catalogue(store).get("k").type is KeyType.ED25519


def test_version_uniqueness_is_enforced_by_the_database(store):
    a, b = Catalogue(store), Catalogue(store)
    a.insert(make_key())
    b.reload()
    key_a, key_b = a.get("k"), b.get("k")
    now = datetime.now(UTC)
    a.add_version(key_a, KeyVersion(version=2, backend_ref="r2", created_at=now), now)
    with pytest.raises(Conflict) as caught:
        b.add_version(key_b, KeyVersion(version=2, backend_ref="r2b", created_at=now), now)
    assert caught.value.headers() == {"retry-after": "1"}  # the race lost: try again
    reloaded = Catalogue(store).get("k")
    assert reloaded.primary_version == 2
    assert reloaded.versions[2].backend_ref == "r2"


@pytest.mark.parametrize("state", [KeyState.DISABLED, KeyState.PENDING_DELETION])
def test_a_rotation_that_began_before_a_disable_adds_no_version(store, state):
    """Another replica disables the key (or schedules its deletion) while this one makes
    the new version: the rotation fails, the key keeps its one version, and signs no more."""
    a, b = Catalogue(store), Catalogue(store)
    a.insert(make_key())
    b.reload()
    rotating = a.get("k")  # read, enabled, before the other replica's change
    now = datetime.now(UTC)
    b.update(b.get("k"), state=state, updated_at=now)
    with pytest.raises(Conflict):
        a.add_version(rotating, KeyVersion(version=2, backend_ref="r2", created_at=now), now)
    stored = Catalogue(store).get("k")
    assert (stored.state, sorted(stored.versions), stored.primary_version) == (state, [1], 1)


def test_concurrent_rotations_yield_one_winner_per_version(store):
    Catalogue(store).insert(make_key())
    replicas = [Catalogue(store) for _ in range(4)]
    outcomes: list[str] = []
    now = datetime.now(UTC)

    def rotate(cat: Catalogue) -> None:
        key = cat.get("k")
        try:
            cat.add_version(
                key, KeyVersion(version=2, backend_ref=str(id(cat)), created_at=now), now
            )
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=rotate, args=(c,)) for c in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["conflict", "conflict", "conflict", "ok"]
    assert sorted(Catalogue(store).get("k").versions) == [1, 2]


def test_state_change_guarded_by_expected_state(store):
    a, b = Catalogue(store), Catalogue(store)
    a.insert(make_key())
    b.reload()
    now = datetime.now(UTC)
    a.update(a.get("k"), state=KeyState.DISABLED, updated_at=now)
    with pytest.raises(Conflict):
        b.update(b.get("k"), state=KeyState.PENDING_DELETION, updated_at=now)


def test_replica_cache_reads_misses_through_and_follows_the_feed(store):
    writer = Catalogue(store)
    reader = Catalogue(store)
    writer.insert(make_key("new"))
    assert reader.find("new") is not None  # a miss reads through: usable at once
    assert reader.find("never-made") is None
    writer.update(writer.get("new"), labels={"env": "y"}, updated_at=datetime.now(UTC))
    assert reader.get("new").labels == {"env": "x"}  # cached until the feed is followed
    reader.refresh()
    assert reader.get("new").labels == {"env": "y"}
    assert (reader.full_reloads, reader.item_reloads) == (1, 1)  # only the changed key


def test_token_writes_never_reload_the_key_catalogue(store):
    catalogue = Catalogue(store)
    catalogue.insert(make_key("k"))
    catalogue.refresh()
    before = (catalogue.full_reloads, catalogue.item_reloads)
    tokens = TokenRegistry(store)
    for _ in range(100):
        tokens.create(["admin"], ttl=None)
    catalogue.refresh()
    assert (catalogue.full_reloads, catalogue.item_reloads) == before


def test_a_pruned_feed_falls_back_to_one_full_reload(store):
    writer = Catalogue(store)
    reader = Catalogue(store)
    writer.insert(make_key("a"))
    writer.insert(make_key("b"))
    assert store.feed.prune(datetime.now(UTC) + timedelta(seconds=1)) >= 2
    writer.update(writer.get("a"), labels={"env": "z"}, updated_at=datetime.now(UTC))
    reader.refresh()  # its epoch is older than what the feed still holds
    assert reader.full_reloads == 2 and reader.item_reloads == 0
    assert reader.get("a").labels == {"env": "z"} and reader.find("b") is not None


def test_a_token_created_on_one_replica_authenticates_on_another_at_once(store):
    a = TokenRegistry(store)
    b = TokenRegistry(store)  # not refreshed in this test
    info, token = a.create(["admin"], ttl=None)
    assert b.authenticate(Credentials(bearer=token)).id == f"token:{info.id}"
    with pytest.raises(Unauthenticated):
        b.authenticate(Credentials(bearer=f"kmg.{'0' * 16}.nope"))


def test_token_revocation_reaches_other_replicas(store):
    a = TokenRegistry(store)
    b = TokenRegistry(store)
    info, token = a.create(["admin"], ttl=None)
    b.refresh()
    assert b.authenticate(Credentials(bearer=token)).id == f"token:{info.id}"
    a.revoke(info.id)
    b.refresh()
    with pytest.raises(Unauthenticated):
        b.authenticate(Credentials(bearer=token))
    stored = store.tokens.all()[0]
    assert token.split(".")[2] not in str(stored)


def _made(tokens: TokenRegistry, maker: str, *, orphan: bool = False) -> str:
    """A token made by the token `maker` (an orphan: revoking `maker` leaves it)."""
    info, _ = tokens.create(
        ["ci"], ttl=None, created_by=f"token:{maker}", parent=None if orphan else maker
    )
    return info.id


def test_revoking_a_token_revokes_what_it_made_down_the_line_but_not_orphans(store):
    """root makes a, a makes b and an orphan, b makes c; revoking a ends a, b and c (on
    every replica), leaves the orphan and root, and says which it ended."""
    tokens, other = TokenRegistry(store), TokenRegistry(store)
    root = tokens.create(["admin"], ttl=None, created_by="system")[0].id
    a = _made(tokens, root)
    b = _made(tokens, a)
    orphan = _made(tokens, a, orphan=True)
    c = _made(tokens, b)
    other.refresh()
    revoked, others = tokens.revoke(a)
    assert (revoked.id, list(others)) == (a, [b, c])
    other.refresh()
    live = {info.id for info in other.list() if info.revoked_at is None}
    assert live == {root, orphan}
    assert other.get(c).created_by == f"token:{b}" and other.get(orphan).parent is None
    with pytest.raises(NotFound):
        tokens.revoke(b)  # already revoked, with a


def test_a_token_that_made_thousands_is_revoked_in_one_transaction(store):
    """5,010 tokens made by one (three levels): its revocation ends them all, in a few
    statements per 500 tokens (before, three per token: on PostgreSQL it outlasted a
    transaction's deadline, and the token could not be revoked at all)."""
    tokens = TokenRegistry(store)
    root = tokens.create(["admin"], ttl=None)[0].id
    now = datetime.now(UTC)
    rows, parents = [], [root]
    for level in range(3):
        made = [f"{level}{n:015x}" for n in range(len(parents) * (10 if level < 2 else 49))]
        for n, made_id in enumerate(made):
            parent = parents[n % len(parents)]
            rows.append(
                {"id": made_id, "secret_hash": "0" * 64, "roles": ["ci"], "description": "",
                 "created_at": now, "parent": parent, "created_by": f"token:{parent}"}
            )  # fmt: skip
        parents = made
    with store.transaction() as conn:
        conn.execute(sa.insert(tables.tokens), rows)
    revoked, others = tokens.revoke(root)
    assert revoked.id == root and sorted(others) == sorted(row["id"] for row in rows)
    assert len(others) == 5_010
    assert all(row["revoked_at"] is not None for row in store.tokens.all())


def test_tokens_ended_before_a_moment_are_deleted_and_every_replica_forgets_them(store):
    """Revoked or expired before the moment: deleted, at most `most` at a time, and gone
    from another replica's memory once it follows the store; a token live, or ended
    after the moment, stays."""
    maker = TokenRegistry(store)
    now = datetime.now(UTC)
    live = maker.create(["ci"], ttl=None)[0].id
    recent = maker.create(["ci"], ttl=None)[0].id
    maker.revoke(recent)
    old_rows = [
        {"id": f"{n:016x}", "secret_hash": "0" * 64, "roles": ["ci"], "description": "",
         "created_at": now - timedelta(days=60), "expires_at": now - timedelta(days=40 + n % 2),
         "revoked_at": now - timedelta(days=35) if n % 3 == 0 else None}
        for n in range(7)
    ]  # fmt: skip
    with store.transaction() as conn:
        conn.execute(sa.insert(tables.tokens), old_rows)
    tokens, other = TokenRegistry(store), TokenRegistry(store)  # each loads every row
    moment = now - timedelta(days=30)
    assert tokens.any_ended_before(moment) and other.any_ended_before(moment)
    first = tokens.delete_ended(moment, 5)
    rest = tokens.delete_ended(moment, 5)
    assert (len(first), sorted([*first, *rest])) == (5, sorted(row["id"] for row in old_rows))
    assert tokens.delete_ended(moment, 5) == [] and not tokens.any_ended_before(moment)
    other.refresh()
    assert (
        {info.id for info in other.list()}
        == {live, recent}
        == {row["id"] for row in store.tokens.all()}
    )


def test_a_refresh_after_many_changes_reads_them_in_batches_or_reloads_once(store, monkeypatch):
    """A purge of 10,000 tokens made every other process read them back one by one (3.7 s
    on SQLite, holding the copy's lock), and then, reloading all its tokens instead, stall
    signing for 100-400 ms a minute. Tokens are now read 500 to a statement; a mirror that
    reads one by one reloads in one read beyond `MOST_ITEM_READS` changed items."""
    from kmsgate.store import mirror

    monkeypatch.setattr(mirror, "MOST_ITEM_READS", 3)
    tokens, other = TokenRegistry(store), TokenRegistry(store)
    made = [tokens.create(["ci"], ttl=None)[0].id for _ in range(7)]
    statements: list[list[str]] = []
    get_many = store.tokens.get_many
    monkeypatch.setattr(
        store.tokens, "get_many", lambda ids: (statements.append(ids), get_many(ids))[1]
    )
    other.refresh()
    assert (other.full_reloads, other.item_reloads, len(statements)) == (1, 7, 1)
    assert {info.id for info in other.list()} == set(made)
    writer, reader = Catalogue(store), Catalogue(store)
    for n in range(4):
        writer.insert(make_key(f"k{n}"))
    reader.refresh()
    assert (reader.full_reloads, reader.item_reloads) == (2, 0)
    assert {key.name for key in reader.all()} == {f"k{n}" for n in range(4)}


def test_a_token_is_not_made_under_a_parent_revoked_meanwhile(store):
    """A maker authenticated, then revoked before its new token is written: the write is
    refused and nothing is stored (else the new token would escape the revocation)."""
    tokens = TokenRegistry(store)
    maker = tokens.create(["admin"], ttl=None)[0].id
    store.tokens.revoke(maker, datetime.now(UTC))  # through another replica
    with pytest.raises(Unauthenticated):
        _made(tokens, maker)
    assert [row["id"] for row in store.tokens.all()] == [maker]


def _store_at(tmp_path: Path, revision: str, *rows: tuple[str, dict[str, object]]) -> str:
    """The URL of a new SQLite store migrated to `revision` only (an earlier release's),
    then changed by `rows`: (a statement in that revision's schema, its parameters)."""
    from alembic import command
    from alembic.config import Config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(engine._MIGRATIONS))
    old = sa.create_engine(url)
    with old.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        for statement, parameters in rows:
            conn.execute(sa.text(statement), parameters)
    old.dispose()
    return url


def test_an_sqlite_store_from_before_0009_keeps_its_key_versions_through_the_migrations(
    tmp_path,
):
    """Migration 0009 rebuilds `keys` on SQLite (copy, drop, rename), and with foreign keys
    enforced on the migrating connection the drop deleted every key version (ON DELETE
    CASCADE): a store made before it lost all its key material when a newer kmsgate
    started on it. Migrations now run with foreign keys off, and check them after."""
    now = datetime.now(UTC)
    key = (
        "INSERT INTO keys (name, type, purpose, backend, state, labels, primary_version, "
        "min_decrypt_version, verify_only, created_at, updated_at) "
        "VALUES ('k', 'ed25519', 'p', 'local', 'enabled', '{}', 2, 1, 0, :now, :now)"
    )
    version = (
        "INSERT INTO key_versions (key_name, version, backend_ref, material, created_at, "
        "adopted) VALUES ('k', :v, :ref, :material, :now, 0)"
    )
    url = _store_at(
        tmp_path,
        "0008",
        (key, {"now": now}),
        *(
            (version, {"v": n, "ref": f"softkms:k/{n}", "material": b"m", "now": now})
            for n in (1, 2)
        ),
    )
    store = Store(url)
    try:
        store.migrate()
        [(key, versions)] = store.keys.all()
        assert key["primary_version"] == 2
        assert [(v["version"], v["backend_ref"]) for v in versions] == [
            (1, "softkms:k/1"),
            (2, "softkms:k/2"),
        ]
        with store.transaction() as conn:  # enforced again for the gateway's own writes
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.close()


def test_a_store_migrated_by_a_newer_kmsgate_is_refused_with_what_to_do(tmp_path):
    url = _store_at(tmp_path, "head", ("UPDATE alembic_version SET version_num = '0999'", {}))
    store = Store(url)
    try:
        with pytest.raises(ConfigError, match=r"migrated by a newer kmsgate .*'0999'.*run that"):
            store.migrate()
    finally:
        store.close()


def test_tokens_made_before_makers_were_recorded_keep_working_after_the_migration(tmp_path):
    """A store at revision 0009 (no token lineage) with a token: the migration keeps it,
    with no maker and no parent, and revoking it revokes nothing else."""
    token = (
        "INSERT INTO tokens (id, secret_hash, roles, description, created_at) "
        "VALUES ('00000000000000aa', :hash, '[\"admin\"]', 'old', :now)"
    )
    url = _store_at(tmp_path, "0009", (token, {"hash": "0" * 64, "now": datetime.now(UTC)}))
    store = Store(url)
    try:
        store.migrate()
        tokens = TokenRegistry(store)
        kept = tokens.get("00000000000000aa")
        assert (kept.created_by, kept.parent, kept.roles) == (None, None, ("admin",))
        _made(tokens, "00000000000000aa", orphan=True)
        revoked, others = tokens.revoke("00000000000000aa")
        assert (revoked.id, list(others)) == ("00000000000000aa", [])
    finally:
        store.close()


def test_concurrent_asks_never_pass_a_principals_open_grant_limit(store, database_url):
    """The count and the insert are one transaction serialised per principal: eight
    replicas (engines of their own) asking at once for one principal leave exactly the
    limit inserted, and another principal is not held up by it."""
    week = timedelta(days=7)

    def ask(principal: str) -> dict[str, object]:
        return new_grant(
            principal, ["decrypt"], "k", timedelta(hours=1), "T-1", "why",
            known_actions=frozenset({"decrypt"}), max_duration=week, pending_for=week,
            now=datetime.now(UTC),
        ).row()  # fmt: skip

    replicas = [Store(database_url) for _ in range(8)]
    start = threading.Barrier(len(replicas))
    outcomes: list[int | None] = []

    def race(replica: Store) -> None:
        start.wait()
        outcomes.append(replica.grants.insert(ask("token:flood"), open_limit=3))

    try:
        threads = [threading.Thread(target=race, args=(replica,)) for replica in replicas]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        for replica in replicas:
            replica.close()
    assert sorted(outcomes, key=lambda held: held or 0) == [None] * 3 + [3] * 5
    assert len(store.grants.query(principal="token:flood", open_only=True)) == 3
    assert store.grants.insert(ask("token:other"), open_limit=3) is None


def test_a_grant_revoked_through_another_replica_ends_at_once_without_a_refresh(
    store, database_url
):
    """`ActiveGrants.ended` answers from the copy while the grants' counter has not moved,
    and reads the store once it has: a revocation committed by another replica (its own
    engine and connections) counts at the next request, before any refresh."""
    now = datetime.now(UTC)
    week = timedelta(days=7)
    pending = new_grant(
        "token:x", ["decrypt"], "k", timedelta(hours=1), "T-1", "why",
        known_actions=frozenset({"decrypt"}), max_duration=week, pending_for=week, now=now,
    )  # fmt: skip
    grant = approve(pending, "token:y", required=1, max_duration=week, now=now)
    assert store.grants.insert(grant.row(), open_limit=16) is None
    grants = ActiveGrants(store)
    assert grants.ended([grant.id], now) == []
    other = Store(database_url)
    try:
        assert store.feed.epoch_now("grants") == other.feed.epoch("grants")
        other.grants.change(grant.id, lambda _row: {"revoked_at": now, "revoked_by": "token:y"})
        assert store.feed.epoch_now("grants") == other.feed.epoch("grants")
        assert grants.ended([grant.id], now) == [grant.id]
        assert grants.active_for("token:x", "decrypt", now) == []  # the copy caught up
        assert grants.ended([grant.id], now) == [grant.id]
    finally:
        other.close()


def test_the_request_path_counter_read_survives_a_lost_connection(postgres_server):
    """The reader's own connection dropped by the server (a restart, a failover) is replaced
    at the next read, which answers; only a store that stays down is Unavailable."""
    with fresh_postgres_database(postgres_server) as database_url:
        store = Store(database_url)
        store.migrate()
        before = store.feed.epoch_now("keys")
        with store.transaction() as conn:
            dropped = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        assert dropped >= 1
        Catalogue(store).insert(make_key())
        assert store.feed.epoch_now("keys") == before + 1
        store.close()
    down = Store(database_url.replace(f":{postgres_server.port}/", ":1/"))
    with pytest.raises(Unavailable):
        down.feed.epoch_now("keys")
    down.close()


def test_a_write_during_a_reload_is_not_lost(store, monkeypatch):
    """Read-your-writes: a reload loads the rows, then swaps in its snapshot. A key inserted
    between the load and the swap must survive the swap (the reload is held in between, at
    most 1 s, so a fix that serialises writes with reloads cannot deadlock the test)."""
    catalogue = Catalogue(store)
    real_load = store.keys.all
    loaded, release = threading.Event(), threading.Event()

    def held_load():
        rows = real_load()
        loaded.set()
        release.wait(timeout=1.0)
        return rows

    monkeypatch.setattr(store.keys, "all", held_load)
    try:
        reload = threading.Thread(target=catalogue.reload)
        reload.start()
        assert loaded.wait(timeout=10)
        inserter = threading.Thread(target=catalogue.insert, args=(make_key("during"),))
        inserter.start()
        inserter.join(timeout=0.5)  # done at once without the lock; blocked with it
        release.set()
        inserter.join(timeout=10)
        reload.join(timeout=10)
    finally:
        release.set()
    assert catalogue.find("during") is not None


def test_misses_read_through_only_within_the_budget(store, monkeypatch):
    """Unknown names cannot turn into one query each: past the budget a miss answers
    unknown from memory, and a later miss (budget refilled) reads through again."""
    reader = Catalogue(store, read_through_per_second=2.0)
    Catalogue(store).insert(make_key("late"))  # not in the reader's cache yet
    queries = []
    real_load_key = store.keys.get

    def counting_load_key(name):
        queries.append(name)
        return real_load_key(name)

    monkeypatch.setattr(store.keys, "get", counting_load_key)
    assert [reader.find(f"nope-{i}") for i in range(10)] == [None] * 10
    assert len(queries) == 2
    time.sleep(0.6)  # the bucket refills at 2 per second
    assert reader.find("late") is not None
    assert queries[-1] == "late"


def _cert_row(serial: str) -> dict[str, object]:
    now = datetime.now(UTC)
    return {
        "serial": serial,
        "ca": "burst",
        "subject": "",
        "sans": [f"dns:{serial}.lab"],
        "profile": "server",
        "key_type": "ecdsa-p256",
        "not_before": now,
        "not_after": now + timedelta(hours=1),
        "status": "valid",
        "revoked_at": None,
        "reason": None,
        "owner": "test",
        "fingerprint": "0" * 64,
        "certificate": "-",
    }


def _burst_ca(store: Store) -> None:
    """The CA `burst` that `_cert_row` certificates belong to."""
    now = datetime.now(UTC)
    store.cas.insert(
        {
            "name": "burst",
            "type": "kmsgate",
            "state": "active",
            "key_name": None,
            "backend": None,
            "options": None,
            "subject": "CN=Burst",
            "csr": None,
            "certificate": None,
            "chain": None,
            "not_after": None,
            "crl_number": 0,
            "created_at": now,
            "updated_at": now,
        }
    )


def test_concurrent_certificate_inserts_commit_together_and_a_clash_fails_alone(store):
    """Group commit: 40 threads insert at once; every row lands, the feed names each, and
    the one row whose serial is taken gets Conflict while its batch-mates succeed."""
    _burst_ca(store)
    store.certs.insert(_cert_row("aa"))
    before = store.feed.epoch("certs")
    start = threading.Barrier(40)
    errors: dict[str, Exception] = {}

    def insert(serial: str) -> None:
        start.wait(timeout=10)
        try:
            store.certs.insert(_cert_row(serial))
        except Exception as exc:
            errors[serial] = exc

    serials = [f"{i:02x}0" for i in range(39)] + ["aa"]  # "aa" is taken
    threads = [threading.Thread(target=insert, args=(s,)) for s in serials]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert list(errors) == ["aa"] and isinstance(errors["aa"], Conflict)
    stored = {row["serial"] for row in store.certs.search(CertQuery(ca="burst", limit=100))}
    assert stored == set(serials)
    assert store.feed.epoch("certs") == before + 39
    changes = store.feed.changes_since("certs", before)
    assert [epoch for epoch, _ in changes] == list(range(before + 1, before + 40))
    assert {serial for _, serial in changes} == set(serials) - {"aa"}


def _insert_rows(url: str, prefix: str, count: int) -> None:
    """Insert `count` certificate rows through a Store of this (spawned) process."""
    store = Store(url)
    try:
        for n in range(count):
            store.certs.insert(_cert_row(f"{prefix}{n:03x}"))
    finally:
        store.close()


def test_two_processes_insert_certificates_into_one_database_at_once(store, database_url):
    """Two workers' inventory writers share the database: every row of both lands, and the
    feed counts each once (on SQLite the writers take turns on the writer lock file)."""
    _burst_ca(store)
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_insert_rows, args=(database_url, p, 150)) for p in "bc"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    stored = store.certs.search(CertQuery(ca="burst", limit=1000))
    assert len(stored) == 300
    assert store.feed.epoch("certs") == 300


def test_a_ca_activated_elsewhere_is_seen_at_once_by_issuance(store):
    """Another worker's cache holds the CA as pending until its next refresh; issuance asks
    `find_current`, which reads a pending CA again."""
    from kmsgate.pki.authorities import Authorities, CaState

    now = datetime.now(UTC)
    row = {
        "name": "late",
        "type": "kmsgate",
        "state": "pending",
        "key_name": None,
        "backend": None,
        "options": None,
        "subject": "CN=Late",
        "csr": None,
        "certificate": None,
        "chain": None,
        "not_after": None,
        "crl_number": 0,
        "created_at": now,
        "updated_at": now,
    }
    store.cas.insert(row)
    other_worker = Authorities(store)
    assert other_worker.find("late").state is CaState.PENDING
    store.cas.update("late", {"state": "active"}, expected_state="pending")
    assert other_worker.find("late").state is CaState.PENDING  # the cache, until it refreshes
    assert other_worker.find_current("late").state is CaState.ACTIVE


def test_the_inventory_writer_survives_a_failed_batch(store, monkeypatch):
    """A batch that fails with an unexpected error fails its callers, and the writer goes on
    serving the next records (no caller is left waiting on a dead thread)."""
    _burst_ca(store)
    real_write = store.certs._write
    failures = iter([RuntimeError("driver broke")])

    def flaky_write(batch):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        real_write(batch)

    monkeypatch.setattr(store.certs, "_write", flaky_write)
    with pytest.raises(RuntimeError, match="driver broke"):
        store.certs.submit(_cert_row("f1")).result(timeout=10)
    store.certs.submit(_cert_row("f2")).result(timeout=10)
    assert {row["serial"] for row in store.certs.search(CertQuery(ca="burst"))} == {"f2"}


def test_a_transaction_inside_a_transaction_is_refused_on_sqlite_not_a_deadlock(store):
    """SQLite has one writer: a second transaction on the thread holding the writer lock
    would wait for itself. PostgreSQL gives each its own connection."""
    with store.transaction():
        if store.engine.dialect.name == "sqlite":
            with pytest.raises(RuntimeError, match="inside another"):
                store.get_meta("anything")
        else:
            assert store.get_meta("anything") is None


def test_a_ca_update_that_lost_a_race_is_a_conflict(store):
    _burst_ca(store)
    with pytest.raises(Conflict, match="changed meanwhile"):
        store.cas.update("burst", {"state": "active"}, expected_state="pending")
    with pytest.raises(NotFound):
        store.cas.update("nobody", {"state": "active"}, expected_state="pending")


def test_a_held_writer_lock_file_makes_a_transaction_unavailable_not_stuck(
    store, database_url, monkeypatch
):
    """Another process holding the SQLite writer lock (a stopped CLI, say) delays a
    transaction at most the busy timeout, then it answers Unavailable."""
    if store.engine.dialect.name != "sqlite":
        assert store.get_meta("anything") is None  # PostgreSQL: no lock file at all
        return
    monkeypatch.setattr(engine, "WRITE_WAIT_SECONDS", 0.2)
    lock_path = f"{sa.engine.make_url(database_url).database}.write.lock"
    holder = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: conflicts like a process
        started = time.monotonic()
        with pytest.raises(Unavailable, match="busy"):
            store.get_meta("anything")
        assert 0.2 <= time.monotonic() - started < 2.0
    finally:
        os.close(holder)
    assert store.get_meta("anything") is None  # released: works again


def test_a_refresh_with_nothing_new_never_waits_for_the_writer(store, database_url, monkeypatch):
    """The refresher checks each cache's counter without a transaction: on SQLite, a held
    writer lock (a long write, a stopped CLI) neither delays it nor makes it fail."""
    catalogue = Catalogue(store)
    catalogue.insert(make_key("k"))
    catalogue.refresh()
    if store.engine.dialect.name != "sqlite":
        Catalogue(store).update(
            catalogue.get("k"), labels={"env": "y"}, updated_at=datetime.now(UTC)
        )
        catalogue.refresh()
        assert catalogue.get("k").labels == {"env": "y"}
        return
    monkeypatch.setattr(engine, "WRITE_WAIT_SECONDS", 0.2)
    lock_path = f"{sa.engine.make_url(database_url).database}.write.lock"
    holder = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        catalogue.refresh()
        assert time.monotonic() - started < 0.1
    finally:
        os.close(holder)


def test_key_usage_adds_up_across_flushes_and_processes(store):
    """Two processes' counts (two KeyUsage objects) add up in the store; what one has not
    flushed yet counts in its own answer."""
    from kmsgate.usage import KeyUsage

    first, second = KeyUsage(store), KeyUsage(store)
    for _ in range(3):
        first.record("k", 1)
    second.record("k", 1, 4)
    second.record("k", 2)
    assert {v: n for v, (n, _) in first.of_key("k").items()} == {1: 3}  # not flushed: its own
    first.flush()
    second.flush()
    second.flush()  # nothing new: adds nothing
    uses = first.of_key("k")
    assert {v: n for v, (n, _) in uses.items()} == {1: 7, 2: 1}
    first.record("k", 2)
    assert first.of_key("k")[2][0] == 2
    assert first.of_key("other") == {}


def test_audit_anchors_keep_the_last_checkpoint_of_each_chain(store):
    """One row per replica and chain file, replaced by each new checkpoint."""
    from kmsgate.store.checkpoints import AuditAnchor

    first = AuditAnchor("r1", "audit.log", 11, "a" * 64, 10, "b" * 64, "t1", False, "k", 1)
    store.audit_anchors.save(first)
    store.audit_anchors.save(replace(first, chain="audit.1.log"))
    latest = replace(first, record_seq=22, record_hash="c" * 64, seq=21, final=True, key_version=2)
    store.audit_anchors.save(latest)
    assert store.audit_anchors.all() == [replace(first, chain="audit.1.log"), latest]


def test_a_new_sqlite_store_is_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "kmsgate.db"
    store = Store(f"sqlite:///{path}")
    try:
        store.migrate()
        registry = TokenRegistry(store)
        registry.create(["admin"], ttl=None, description="t")  # a write: the WAL exists
        files = [path, tmp_path / "kmsgate.db-wal", tmp_path / "kmsgate.db-shm"]
        assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {
            f.name: "0o600" for f in files
        }
    finally:
        store.close()


def test_an_sqlite_store_made_readable_by_others_is_made_private_again(tmp_path):
    """Early kmsgate made the database file 0644 and a newer one left it so: it is now
    made the owner's alone when the store is opened, with its -wal and -shm files."""
    path = tmp_path / "kmsgate.db"
    store = Store(f"sqlite:///{path}")
    store.migrate()
    TokenRegistry(store).create(["admin"], ttl=None)  # a write: the WAL exists
    store.close()
    files = [path, tmp_path / "kmsgate.db-wal", tmp_path / "kmsgate.db-shm"]
    for file in files:
        if file.exists():
            file.chmod(0o644)
    Store(f"sqlite:///{path}").close()
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files if f.exists()}
    assert path.name in modes and set(modes.values()) == {"0o600"}, modes


def test_every_sqlite_connection_overwrites_what_it_deletes() -> None:
    """secure_delete is turned on by the store, not left to the SQLite build's default
    (Debian's is on, SQLite's own off): a connection whose default is off gets it on."""
    raw = sqlite3.connect(":memory:")
    try:
        raw.execute("PRAGMA secure_delete=OFF")  # as a build without SQLITE_SECURE_DELETE
        engine._enable_sqlite_wal(raw, None)
        assert raw.execute("PRAGMA secure_delete").fetchone() == (1,)
    finally:
        raw.close()


def test_a_search_by_san_reads_only_the_certificates_that_may_have_it(store, monkeypatch):
    """2,000 certificates: a search by a name, by a domain's suffix, or by a name none has
    reads the certificates its index of names gives, not the inventory (before, every
    certificate in pages of 500: seconds at 50,000, the query that cuts off a stolen
    identity); the answers are those of the SAN rules (case, `*.`, a kind's prefix)."""
    _burst_ca(store)
    futures = [store.certs.submit(_cert_row(f"{n:04x}")) for n in range(2000)]
    for future in futures:
        future.result(timeout=30)
    read = []
    converted = certificates_module._row
    monkeypatch.setattr(certificates_module, "_row", lambda r: read.append(1) or converted(r))

    def serials(san: str) -> list[str]:
        read.clear()
        return [row["serial"] for row in store.certs.search(CertQuery(san=san, limit=100))]

    assert serials("00A1.LAB") == ["00a1"] and len(read) == 1
    assert serials("dns:*.00a1.lab") == [] and serials("uri:00a1.lab") == []
    assert serials(".lab") == [f"{n:04x}" for n in range(100)]
    assert serials("nobody.lab") == [] and not read
    assert serials("*.7cf.lab") == [] and serials(".07cf.lab") == []
    assert serials("07cf.lab") == ["07cf"] and len(read) == 1


def test_certificates_issued_before_the_index_of_names_are_found_by_san(tmp_path):
    """A store at revision 0010 with a certificate: the migration writes its names."""
    store = Store(_store_at(tmp_path, "0010"))
    try:
        _burst_ca(store)
        with store.transaction() as conn:  # as the writer did before the names
            conn.execute(sa.insert(tables.certificates), _cert_row("0b"))
        store.migrate()
        found = store.certs.search(CertQuery(san="0B.lab"))
        assert [row["serial"] for row in found] == ["0b"]
    finally:
        store.close()
