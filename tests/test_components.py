"""Tests of the component fixtures and helpers in ``tests/components.py`` themselves."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.components import (
    REQUIRE_ALL_ENV,
    PostgresServer,
    free_port,
    fresh_postgres_database,
    require_component,
    require_postgres,
    running_postgres,
    wait_for_port,
)

# --------------------------------------------------------------------------------------------
# require_component
# --------------------------------------------------------------------------------------------


def test_require_component_fails_under_require_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_ALL_ENV, "1")
    with pytest.raises(pytest.fail.Exception) as excinfo:
        require_component("softhsm2", "no libsofthsm2.so")
    assert str(excinfo.value) == "softhsm2 missing: no libsofthsm2.so (KMSGATE_REQUIRE_ALL=1)"


@pytest.mark.parametrize("value", [None, "", "0", "true"])
def test_require_component_skips_otherwise(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(REQUIRE_ALL_ENV, raising=False)
    else:
        monkeypatch.setenv(REQUIRE_ALL_ENV, value)
    with pytest.raises(pytest.skip.Exception) as excinfo:
        require_component("softhsm2", "no libsofthsm2.so")
    assert str(excinfo.value) == "softhsm2 missing: no libsofthsm2.so"


# --------------------------------------------------------------------------------------------
# free_port / wait_for_port
# --------------------------------------------------------------------------------------------


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_for_port_returns_once_listening() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        wait_for_port("127.0.0.1", port, timeout=5.0)


def test_wait_for_port_times_out_when_nothing_listens() -> None:
    port = free_port()
    with pytest.raises(TimeoutError, match=rf"127\.0\.0\.1:{port}"):
        wait_for_port("127.0.0.1", port, timeout=0.3)


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_server_answers_through_sqlalchemy(postgres_server: PostgresServer) -> None:
    assert postgres_server.host == "127.0.0.1"
    assert postgres_server.admin_url == (
        f"postgresql+psycopg://postgres@127.0.0.1:{postgres_server.port}/postgres"
    )
    engine = sa.create_engine(postgres_server.admin_url)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("select version()")).scalar_one()
            listen = conn.execute(sa.text("show listen_addresses")).scalar_one()
            fsync = conn.execute(sa.text("show fsync")).scalar_one()
            user = conn.execute(sa.text("select current_user")).scalar_one()
    finally:
        engine.dispose()
    assert version.startswith("PostgreSQL ")
    assert listen == "127.0.0.1"
    assert fsync == "off"
    assert user == "postgres"
    print(f"postgres server ready in {postgres_server.started_in:.2f} s: {version}")


def _table() -> tuple[sa.MetaData, sa.Table]:
    metadata = sa.MetaData()
    table = sa.Table(
        "roundtrip",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("blob", sa.LargeBinary, nullable=False),
    )
    return metadata, table


def test_database_url_table_round_trip(database_url: str, request: pytest.FixtureRequest) -> None:
    kind = request.node.callspec.params["database_url"]
    if kind == "sqlite":
        tmp_path: Path = request.getfixturevalue("tmp_path")
        assert database_url == f"sqlite:///{tmp_path / 'kmsgate.db'}"
    else:
        assert kind == "postgres"
        assert re.fullmatch(
            r"postgresql\+psycopg://postgres@127\.0\.0\.1:\d+/t_[0-9a-f]+", database_url
        )
    metadata, table = _table()
    engine = sa.create_engine(database_url)
    try:
        assert sa.inspect(engine).get_table_names() == []  # a fresh, empty database
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                table.insert(),
                [{"name": "a", "blob": b"\x00\xff"}, {"name": "b", "blob": b"kms"}],
            )
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(table.insert(), [{"name": "a", "blob": b""}])
        with engine.connect() as conn:
            rows = conn.execute(sa.select(table.c.name, table.c.blob).order_by(table.c.id)).all()
        assert [tuple(r) for r in rows] == [("a", b"\x00\xff"), ("b", b"kms")]
        assert engine.dialect.name == ("sqlite" if kind == "sqlite" else "postgresql")
    finally:
        engine.dispose()
    if kind == "sqlite":
        assert (request.getfixturevalue("tmp_path") / "kmsgate.db").is_file()


@pytest.mark.postgres
def test_fresh_database_is_dropped_even_with_a_connection_open(
    postgres_server: PostgresServer,
) -> None:
    admin = sa.create_engine(postgres_server.admin_url)
    exists = sa.text("select count(*) from pg_database where datname = :name")
    try:
        with fresh_postgres_database(postgres_server) as url:
            dbname = url.rsplit("/", 1)[1]
            with admin.connect() as conn:
                assert conn.execute(exists, {"name": dbname}).scalar_one() == 1
            engine = sa.create_engine(url)
            leaked = engine.connect()  # left open on purpose: the drop must not hang on it
            leaked.execute(sa.text("select 1"))
        with admin.connect() as conn:
            assert conn.execute(exists, {"name": dbname}).scalar_one() == 0
        leaked.invalidate()
        engine.dispose()
    finally:
        admin.dispose()


class _Boom(Exception):
    pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a container's PID 1 may not reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.postgres
def test_running_postgres_stops_and_cleans_up_when_the_body_fails() -> None:
    require_postgres()
    seen: dict[str, object] = {}
    with pytest.raises(_Boom), running_postgres() as server:
        seen["base_dir"] = server.base_dir
        seen["port"] = server.port
        seen["pid"] = int((server.data_dir / "postmaster.pid").read_text().splitlines()[0])
        engine = sa.create_engine(server.admin_url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar_one() == 1
        engine.dispose()
        raise _Boom
    base_dir = seen["base_dir"]
    assert isinstance(base_dir, Path)
    assert not base_dir.exists()
    pid = seen["pid"]
    assert isinstance(pid, int)
    assert not _alive(pid), f"postmaster {pid} still running"
    port = seen["port"]
    assert isinstance(port, int)
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", port, timeout=0.2)


# --------------------------------------------------------------------------------------------
# openssl
# --------------------------------------------------------------------------------------------


@pytest.mark.interop
def test_openssl_bin_runs(openssl_bin: str) -> None:
    assert Path(openssl_bin).is_absolute()
    result = subprocess.run(
        [openssl_bin, "version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert re.match(r"OpenSSL \d+\.\d+", result.stdout), result.stdout
