"""`kmsgate serve`: prepare the data dir, print the dev root token once, run uvicorn.

Worker processes rebuild the service from the environment (`create_app_from_env`), so the
settings given as flags are passed on as `KMSGATE_*` variables.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from rich.console import Console
from uvicorn.supervisors import Multiprocess

from kmsgate.api.app import create_app
from kmsgate.bootstrap import build_service, ensure_root_token, prepare_dev_data_dir
from kmsgate.config import ROOT_TOKEN_FILE, dev_data_dir, load_settings
from kmsgate.errors import ConfigError
from kmsgate.http_protocol import HttpToolsOneWrite

SWITCH_INTERVAL = 0.0005
"""Seconds a thread may hold the interpreter lock while another waits for it (Python's
default: 5 ms). The event loop waits for it whenever it comes back from a system call while
a helper thread (the inventory writer, the audit fsync) runs Python: certificate issuance
measured 6-7% faster with 0.5 ms, key operations the same."""


SERVER_OPTIONS: dict[str, Any] = {
    "http": HttpToolsOneWrite,
    # uvicorn would otherwise take the client address from X-Forwarded-For on every
    # connection from 127.0.0.1: any local process could claim another address
    "proxy_headers": False,
    "server_header": False,  # no "server: uvicorn" in every reply
}


def _long_lived(app: FastAPI) -> FastAPI:
    """`app`, with everything built so far (modules, the app, the service and its caches)
    moved out of the garbage collector's reach: a full collection then scans only what
    requests allocate, instead of pausing every worker ~100 ms to walk the whole heap. Also
    sets this worker's `SWITCH_INTERVAL`."""
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL)
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: settings from KMSGATE_* and KMSGATE_CONFIG."""
    config = os.environ.get("KMSGATE_CONFIG")
    return _long_lived(create_app(build_service(load_settings(Path(config) if config else None))))


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
) -> None:
    """Run the gateway until interrupted.

    Raises ConfigError on bad settings or when the address cannot be bound (checked before
    anything is printed or created).
    """
    settings = load_settings(config, dev=dev or None, data_dir=data_dir, host=host, port=port)
    with _listen(settings.host, settings.port) as sock:
        if settings.dev:
            if settings.data_dir is None:
                settings.data_dir = dev_data_dir()
            prepare_dev_data_dir(settings)
        service = build_service(settings)
        if settings.dev:
            assert settings.data_dir is not None
            token = ensure_root_token(service, settings.data_dir)
            if token:
                console.print(
                    f"Root token (admin), shown once: {token}", highlight=False, soft_wrap=True
                )
            console.print(
                f"Root token file: {settings.data_dir / ROOT_TOKEN_FILE}", highlight=False
            )
        console.print(
            f"kmsgate listening on http://{settings.host}:{settings.port} (env {settings.env})",
            highlight=False,
        )
        if workers == 1:
            in_process = uvicorn.Config(
                _long_lived(create_app(service)), log_level=log_level, **SERVER_OPTIONS
            )
            uvicorn.Server(in_process).run(sockets=[sock])
            return
        service.close()
        os.environ.update(
            {
                "KMSGATE_DEV": "1" if settings.dev else "0",
                "KMSGATE_ENV": settings.env,
                **({"KMSGATE_DATA_DIR": str(settings.data_dir)} if settings.data_dir else {}),
                **({"KMSGATE_CONFIG": str(config)} if config else {}),
            }
        )
        per_worker = uvicorn.Config(
            "kmsgate.serve:create_app_from_env",
            factory=True,
            workers=workers,
            log_level=log_level,
            **SERVER_OPTIONS,
        )
        Multiprocess(per_worker, sockets=[sock]).run()


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
