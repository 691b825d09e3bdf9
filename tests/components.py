"""Fixtures and helpers that start real components (PostgreSQL, openssl, ...) for the tests.

Loaded as a pytest plugin from ``tests/conftest.py``. Every component is started on 127.0.0.1,
in a private temporary directory, with a timeout on every subprocess, and torn down at the end
of its scope even when the test or the start-up fails.

A component that cannot be found makes the test skip, or fail when ``KMSGATE_REQUIRE_ALL=1``
(set by ``.ci/run``): see :func:`require_component`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = [
    "ComponentMissingError",
    "PostgresServer",
    "check_postgres_prerequisites",
    "database_url",
    "find_postgres_bindir",
    "free_port",
    "fresh_postgres_database",
    "log_tail",
    "openssl_bin",
    "postgres_server",
    "postgres_stopped",
    "require_component",
    "require_postgres",
    "run_openssl",
    "running_postgres",
    "stop_process",
    "wait_for_port",
]

REQUIRE_ALL_ENV = "KMSGATE_REQUIRE_ALL"
LOOPBACK = "127.0.0.1"

# Bounds on every PostgreSQL subprocess (seconds). initdb takes ~1 s on the dev machines.
_INITDB_TIMEOUT = 120.0
_PG_CTL_WAIT = 60  # pg_ctl's own -t
_PG_CTL_TIMEOUT = 90.0  # our hard bound around pg_ctl
_CONNECT_TIMEOUT = 10  # psycopg connect_timeout
_START_ATTEMPTS = 3  # new port each time, in case another process grabs the free port first


class ComponentMissingError(Exception):
    """A real component (binary, library, system user) is not available on this machine."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} missing: {reason}")
        self.name = name
        self.reason = reason


def require_component(name: str, reason: str) -> NoReturn:
    """Skip the current test because component ``name`` is missing.

    Fails the test instead when the environment has ``KMSGATE_REQUIRE_ALL=1`` (CI), so that a
    component silently missing in CI cannot turn a suite of real checks into a suite of skips.
    """
    if os.environ.get(REQUIRE_ALL_ENV) == "1":
        pytest.fail(f"{name} missing: {reason} ({REQUIRE_ALL_ENV}=1)", pytrace=False)
    pytest.skip(f"{name} missing: {reason}", allow_module_level=True)


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that is free on ``host`` right now (bind to port 0 and release it).

    Another process can take the port before the caller binds it: starters retry on a bind error.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until a TCP connection to ``host:port`` succeeds.

    Raises:
        TimeoutError: nothing accepted a connection within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"nothing listening on {host}:{port} after {timeout:.1f} s "
                f"(last error: {last_error})"
            )
        try:
            with socket.create_connection((host, port), timeout=min(1.0, remaining)):
                return
        except OSError as exc:
            last_error = exc
            time.sleep(min(0.05, max(remaining, 0)))


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PostgresServer:
    """A running throwaway PostgreSQL cluster (superuser ``postgres``, trust auth, loopback)."""

    host: str
    port: int
    base_dir: Path  # removed at teardown
    data_dir: Path
    socket_dir: Path
    log_file: Path
    bin_dir: Path
    started_in: float  # seconds from nothing to the first successful query

    @property
    def admin_url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` maintenance database, as the superuser."""
        return self.url("postgres")

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of database ``dbname`` on this server."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{dbname}"

    def conninfo(self, dbname: str = "postgres") -> str:
        """libpq connection string for ``psycopg.connect``."""
        return (
            f"host={self.host} port={self.port} user=postgres dbname={dbname} "
            f"connect_timeout={_CONNECT_TIMEOUT}"
        )


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin/initdb; versions look like "15" or "9.6"
    version = path.parent.parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (-1,)


def find_postgres_bindir() -> Path | None:
    """The ``bin`` directory of the newest Debian-packaged PostgreSQL server, or ``None``."""
    candidates = [
        p
        for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if (p.parent / "pg_ctl").is_file()
    ]
    if not candidates:
        return None
    return max(candidates, key=_version_key).parent


def _run_bounded(argv: Sequence[str], *, timeout: float, cwd: Path, as_postgres: bool) -> str:
    """Run ``argv`` (as the ``postgres`` user if asked), return its combined output.

    The child gets its own session so that on timeout the whole group (su, pg_ctl, ...) is
    killed, not only the direct child.

    Raises:
        RuntimeError: non-zero exit status or timeout; the message carries the output.
    """
    cmd = list(argv)
    if as_postgres:
        cmd = ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RuntimeError(
            f"timed out after {timeout:.0f} s: {shlex.join(cmd)}\n{output}"
        ) from None
    if proc.returncode != 0:
        raise RuntimeError(f"exit status {proc.returncode}: {shlex.join(cmd)}\n{output}")
    return output


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _stop_postgres(bin_dir: Path, data_dir: Path, cwd: Path, as_postgres: bool) -> None:
    """Stop the postmaster of ``data_dir`` if one runs: fast, then immediate, then SIGKILL."""
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return
    pg_ctl = str(bin_dir / "pg_ctl")
    for mode in ("fast", "immediate"):
        try:
            _run_bounded(
                [pg_ctl, "-D", str(data_dir), "-m", mode, "-w", "-t", "30", "stop"],
                timeout=60.0,
                cwd=cwd,
                as_postgres=as_postgres,
            )
            return
        except RuntimeError:
            continue
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pid_file.read_text().splitlines()[0])
        # a stale pid file can name a reused pid: only kill a process that is a postgres
        if Path(f"/proc/{pid}/comm").read_text().strip() == "postgres":
            os.kill(pid, signal.SIGKILL)


def _pg_ctl_start(
    bin_dir: Path,
    data_dir: Path,
    log_file: Path,
    run_dir: Path,
    host: str,
    port: int,
    as_postgres: bool,
) -> None:
    """Start the cluster of ``data_dir`` on ``host:port`` (socket in ``run_dir``) and wait
    until it accepts connections. Raises RuntimeError (with pg_ctl's output)."""
    options = (
        f"-p {port} -k {run_dir} -c listen_addresses={host} -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off"
    )
    _run_bounded(
        [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log_file), "-o", options,
         "-w", "-t", str(_PG_CTL_WAIT), "start"],
        timeout=_PG_CTL_TIMEOUT,
        cwd=run_dir.parent,
        as_postgres=as_postgres,
    )  # fmt: skip


@contextlib.contextmanager
def postgres_stopped(server: PostgresServer) -> Iterator[None]:
    """Stop ``server`` (fast shutdown: connections are cut) for the block, then start it
    again on the same port. Raises RuntimeError if it does not come back."""
    bin_dir, as_postgres = check_postgres_prerequisites()
    _stop_postgres(bin_dir, server.data_dir, server.base_dir, as_postgres)
    try:
        yield
    finally:
        _pg_ctl_start(
            bin_dir, server.data_dir, server.log_file, server.socket_dir, server.host,
            server.port, as_postgres,
        )  # fmt: skip


@contextlib.contextmanager
def postgres_frozen(server: PostgresServer) -> Iterator[None]:
    """Freeze ``server`` (SIGSTOP to the postmaster and every backend) for the block, then
    let it go on (SIGCONT): its connections stay open and silent, as behind a network that
    drops nothing, and new ones are accepted by the kernel but never answered."""
    postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGSTOP)  # first: a stopped postmaster forks no new backend
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    frozen = [postmaster, *map(int, children)]
    for pid in frozen[1:]:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def check_postgres_prerequisites() -> tuple[Path, bool]:
    """Return (bin dir, run-as-postgres flag) or raise :class:`ComponentMissingError`."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise ComponentMissingError(
            "postgres", f"psycopg is not importable ({exc}); pip install -e '.[postgres]'"
        ) from exc
    bin_dir = find_postgres_bindir()
    if bin_dir is None:
        raise ComponentMissingError(
            "postgres", "no /usr/lib/postgresql/*/bin/initdb; apt-get install postgresql"
        )
    as_postgres = os.geteuid() == 0  # initdb refuses to run as root
    if as_postgres:
        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise ComponentMissingError(
                "postgres", "running as root but there is no 'postgres' system user"
            ) from exc
        if shutil.which("su") is None:
            raise ComponentMissingError("postgres", "running as root but 'su' is not on PATH")
    return bin_dir, as_postgres


def require_postgres() -> None:
    """:func:`require_component` unless :func:`check_postgres_prerequisites` passes."""
    missing: ComponentMissingError | None = None
    try:
        check_postgres_prerequisites()
    except ComponentMissingError as exc:
        missing = exc
    if missing is not None:  # outside the except block: no exception chain in the report
        require_component(missing.name, missing.reason)


@contextlib.contextmanager
def running_postgres(host: str = LOOPBACK) -> Iterator[PostgresServer]:
    """Start a throwaway PostgreSQL cluster in a temp dir; stop it and remove the dir on exit.

    Layout: ``<tmp>/kmsgate-pg-XXXX`` (mode 0711, so the ``postgres`` user can traverse it)
    holding ``pg/`` (owned by ``postgres``) with ``data/``, the Unix socket and the log.

    Raises:
        ComponentMissingError: psycopg, the server binaries or the postgres user are missing.
        RuntimeError: initdb or pg_ctl failed or timed out (message carries output and log).
    """
    import psycopg

    bin_dir, as_postgres = check_postgres_prerequisites()
    t0 = time.monotonic()
    base_dir = Path(tempfile.mkdtemp(prefix="kmsgate-pg-"))
    run_dir = base_dir / "pg"
    data_dir = run_dir / "data"
    log_file = run_dir / "postgres.log"
    try:
        base_dir.chmod(0o711)
        run_dir.mkdir(mode=0o700)
        if as_postgres:
            pg_user = pwd.getpwnam("postgres")
            os.chown(run_dir, pg_user.pw_uid, pg_user.pw_gid)
        _run_bounded(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            timeout=_INITDB_TIMEOUT,
            cwd=base_dir,
            as_postgres=as_postgres,
        )
        port = 0
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = free_port(host)
            try:
                _pg_ctl_start(bin_dir, data_dir, log_file, run_dir, host, port, as_postgres)
                break
            except RuntimeError as exc:
                log = _tail(log_file)
                _stop_postgres(bin_dir, data_dir, base_dir, as_postgres)
                if attempt < _START_ATTEMPTS and "could not bind" in log:
                    continue
                raise RuntimeError(f"{exc}\n--- {log_file} ---\n{log}") from None
        server = PostgresServer(
            host=host,
            port=port,
            base_dir=base_dir,
            data_dir=data_dir,
            socket_dir=run_dir,
            log_file=log_file,
            bin_dir=bin_dir,
            started_in=0.0,
        )
        with psycopg.connect(server.conninfo(), autocommit=True) as conn:
            conn.execute("select 1").fetchone()
        yield dataclasses.replace(server, started_in=time.monotonic() - t0)
    finally:
        try:
            _stop_postgres(bin_dir, data_dir, base_dir, as_postgres)
        finally:
            shutil.rmtree(base_dir, ignore_errors=True)


@contextlib.contextmanager
def fresh_postgres_database(server: PostgresServer) -> Iterator[str]:
    """Create an empty database ``t_<hex>`` on ``server``; yield its SQLAlchemy URL; drop it.

    The drop uses ``WITH (FORCE)``, so connections a test left open do not block it.
    """
    import psycopg
    from psycopg import sql

    dbname = f"t_{secrets.token_hex(8)}"
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    try:
        yield server.url(dbname)
    finally:
        with psycopg.connect(server.conninfo(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the test session (see :func:`running_postgres`)."""
    require_postgres()
    with running_postgres() as server:
        yield server


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLAlchemy URL of an empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kmsgate.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    with fresh_postgres_database(server) as url:
        yield url


# --------------------------------------------------------------------------------------------
# openssl CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def openssl_bin() -> str:
    """Absolute path of the ``openssl`` command-line tool."""
    path = shutil.which("openssl")
    if path is None:
        require_component("openssl", "no 'openssl' on PATH; apt-get install openssl")
    return path


def run_openssl(openssl_bin: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`openssl ARGS`, its output captured, bounded in time; the caller reads the status."""
    return subprocess.run(
        [openssl_bin, *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a component's log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a component by its PID: SIGTERM, then SIGKILL after `timeout` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
