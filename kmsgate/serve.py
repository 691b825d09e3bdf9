"""`kmsgate serve`: prepare the data dir, print the dev root token once, run uvicorn.

Worker processes rebuild the service from the environment (`create_app_from_env`), so the
settings given as flags are passed on as `KMSGATE_*` variables.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import resource
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from rich.console import Console
from sqlalchemy.engine import make_url
from uvicorn.supervisors import Multiprocess

from kmsgate.api.app import create_app
from kmsgate.api.metrics import SNAPSHOT_DIR_ENV
from kmsgate.bootstrap import (
    build_service,
    ensure_root_token,
    prepare_dev_data_dir,
    stale_root_token,
)
from kmsgate.config import (
    ROOT_TOKEN_FILE,
    Settings,
    dev_data_dir,
    dev_tls,
    load_settings,
    misspelt_variables,
    with_database_driver,
)
from kmsgate.errors import ConfigError
from kmsgate.http_protocol import HttpToolsOneWrite
from kmsgate.logs import LEVEL_ENV, UVICORN_LOG_CONFIG
from kmsgate.logs import configure as configure_logs
from kmsgate.loopback import is_loopback_host
from kmsgate.servertls import provision, renewal_job
from kmsgate.service import Service
from kmsgate.store.engine import shown_url

SWITCH_INTERVAL = 0.0005
"""Seconds a thread may hold the interpreter lock while another waits for it (Python's
default: 5 ms). The event loop waits for it whenever it comes back from a system call while
a helper thread (the inventory writer, the audit fsync) runs Python: certificate issuance
measured 6-7% faster with 0.5 ms, key operations the same."""


SERVER_OPTIONS: dict[str, Any] = {
    "http": HttpToolsOneWrite,
    "loop": "kmsgate.http_protocol:HandshakeBoundLoop",  # uvloop; TLS handshakes end in time
    # uvicorn would otherwise take the client address from X-Forwarded-For on every
    # connection from 127.0.0.1: any local process could claim another address
    "proxy_headers": False,
    "server_header": False,  # no "server: uvicorn" in every reply
    # SIGTERM: stop accepting, finish the requests in flight for at most this long, then
    # close the service (the audit sinks flush); under a 30 s termination grace period
    "timeout_graceful_shutdown": 20,
    "log_config": UVICORN_LOG_CONFIG,  # JSON lines, as the gateway's own
    "access_log": False,  # kmsgate.requests logs every request, with its request id
}


def _long_lived(app: FastAPI, settings: Settings) -> FastAPI:
    """`app`, with everything built so far (modules, the app, the service and its caches)
    moved out of the garbage collector's reach: a full collection then scans only what
    requests allocate, instead of pausing every worker ~100 ms to walk the whole heap. Also
    sets this worker's `SWITCH_INTERVAL` and the time its clients have to send a request
    head (`limits.body_read_seconds`, as for the body)."""
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL)
    HttpToolsOneWrite.head_read_seconds = settings.limits.body_read_seconds
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: settings from KMSGATE_* and KMSGATE_CONFIG."""
    configure_logs(os.environ.get(LEVEL_ENV, "warning"))
    config = os.environ.get("KMSGATE_CONFIG")
    settings = load_settings(Path(config) if config else None)
    service = build_service(settings)
    return _long_lived(create_app(service, _leader_jobs(service, settings)), settings)


def _leader_jobs(service: Service, settings: Settings) -> list[Callable[[], None]]:
    """The jobs this gateway's leader runs every second besides the standard ones: the
    renewal of its own HTTPS certificate (`tls.ca`)."""
    if settings.tls is None or settings.tls.ca is None:
        return []
    return [functools.partial(renewal_job, service, settings)]


def serve(
    *,
    dev: bool,
    data_dir: Path | None,
    host: str | None,
    port: int | None,
    config: Path | None,
    workers: int,
    log_level: str,
    console: Console,
    tls: bool = False,
) -> None:
    """Run the gateway until interrupted.

    Raises ConfigError on bad settings or when the address cannot be bound (checked before
    anything is printed or created).
    """
    _no_core_dumps()
    settings = load_settings(config, dev=dev or None, data_dir=data_dir, host=host, port=port)
    for warning in misspelt_variables(os.environ):
        console.print(f"warning: {warning}", highlight=False, soft_wrap=True)
    configure_logs(log_level)
    os.environ[LEVEL_ENV] = log_level  # the workers' own
    if tls and settings.tls is None:
        if not settings.dev:
            raise ConfigError("--tls needs `tls` settings in the config file outside dev mode")
        settings.tls = dev_tls()
    _refuse_plain_http_off_loopback(settings)
    with _listen(settings.host, settings.port) as sock:
        if settings.dev:
            if settings.data_dir is None:
                settings.data_dir = dev_data_dir()
            prepare_dev_data_dir(settings)
        service = build_service(settings)
        token = None
        if settings.dev:
            assert settings.data_dir is not None
            token = ensure_root_token(service, settings.data_dir)
        server_tls = provision(service, settings) if settings.tls else None
        if settings.dev:  # printed once the settings have proved usable
            assert settings.data_dir is not None
            if token:
                console.print(
                    f"Root token (admin), shown once: {token}", highlight=False, soft_wrap=True
                )
            console.print(
                f"Root token file: {settings.data_dir / ROOT_TOKEN_FILE}", highlight=False
            )
            stale = None if token else stale_root_token(service, settings.data_dir)
            if stale:
                console.print(f"warning: {stale}", highlight=False, soft_wrap=True)
        options: dict[str, Any] = {**SERVER_OPTIONS, "ssl_context_factory": server_tls}
        scheme = "https" if server_tls else "http"
        store = shown_url(make_url(with_database_driver(settings.resolved_database_url())))
        console.print(
            f"kmsgate listening on {scheme}://{settings.host}:{settings.port} "
            f"(env {settings.env}, store {store})",
            highlight=False,
            soft_wrap=True,
        )
        if workers == 1:
            app = create_app(service, _leader_jobs(service, settings))
            in_process = uvicorn.Config(_long_lived(app, settings), log_level=log_level, **options)
            _Server(in_process).run(sockets=[sock])
            return
        service.close()
        os.environ.update(
            {
                "KMSGATE_DEV": "1" if settings.dev else "0",
                "KMSGATE_ENV": settings.env,
                **({"KMSGATE_DATA_DIR": str(settings.data_dir)} if settings.data_dir else {}),
                **({"KMSGATE_CONFIG": str(config)} if config else {}),
                **({"KMSGATE_TLS": settings.tls.model_dump_json()} if settings.tls else {}),
            }
        )
        per_worker = uvicorn.Config(
            "kmsgate.serve:create_app_from_env",
            factory=True,
            workers=workers,
            log_level=log_level,
            **options,
        )
        # the workers' request metrics, summed when any of them is scraped
        _remove_dead_supervisors_metrics()
        metrics_dir = tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-")
        os.environ[SNAPSHOT_DIR_ENV] = metrics_dir
        try:
            _Supervisor(per_worker, sockets=[sock]).run()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _no_core_dumps() -> None:
    """No core file for this process and its workers (RLIMIT_CORE 0, inherited): it would
    hold the root key, PINs and tokens, readable wherever the system keeps cores."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


_METRICS_PREFIX = "kmsgate-metrics-"
_METRICS_IDLE_SECONDS = 120.0
"""A metrics directory unchanged this long has no worker left: live workers rename a new
snapshot into theirs every second."""


def _remove_dead_supervisors_metrics() -> None:
    """Remove the metrics directories that supervisors killed without a chance to clean up
    (SIGKILL, OOM) left in the temp dir: ours by owner, their PID no longer running here
    and nothing written in them for `_METRICS_IDLE_SECONDS` (a supervisor in another PID
    namespace sharing the temp dir has a PID this one cannot see)."""
    tmp = Path(tempfile.gettempdir())
    for directory in tmp.glob(f"{_METRICS_PREFIX}*-*"):
        pid = directory.name.removeprefix(_METRICS_PREFIX).partition("-")[0]
        with contextlib.suppress(OSError, ValueError):
            info = directory.lstat()
            if info.st_uid != os.getuid() or not stat.S_ISDIR(info.st_mode):
                continue
            if time.time() - info.st_mtime < _METRICS_IDLE_SECONDS:
                continue
            if int(pid) <= 0 or _running(int(pid)):
                continue
            shutil.rmtree(directory, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether a process `pid` exists (signal 0: permission refused still means it does)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no PID is that large
        return False
    except PermissionError:
        return True
    return True


class _Supervisor(Multiprocess):
    """uvicorn's supervisor of several workers, which stops listening as soon as it stops
    them: each worker closes its copy of the listening socket as it shuts down, but the
    supervisor kept its own open until the workers had exited, and the kernel went on
    accepting connections no one would serve (reset, their requests sent, once it closed).
    Now they are refused, which a client may retry."""

    def terminate_all(self) -> None:
        for listening in self.sockets:
            listening.close()
        super().terminate_all()


class _Server(uvicorn.Server):
    """uvicorn's server, which exits 0 after a graceful shutdown on SIGTERM, as the
    supervisor of several workers does (uvicorn raises the signal again once it has shut
    down, and the process died of it: exit status 143)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def _refuse_plain_http_off_loopback(settings: Settings) -> None:
    """Plain HTTP only on a loopback address, or behind a TLS-terminating proxy named in
    `tls.trusted_proxies`. Raises ConfigError otherwise."""
    tls = settings.tls
    if tls is not None and (tls.serves_https or tls.trusted_proxies):
        return
    if not is_loopback_host(settings.host, resolve=True):
        raise ConfigError(
            f"refusing to serve plain HTTP on {settings.host}, which is not a loopback "
            "address: configure `tls` (a certificate, or `tls.ca`), or terminate TLS in a "
            "proxy named in `tls.trusted_proxies`"
        )


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, inheritable by worker processes (uvicorn listens on
    it). Raises ConfigError when the address cannot be bound (in use, not local, no
    permission)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP
    # (without it, replies wait ~40 ms on delayed ACKs)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
