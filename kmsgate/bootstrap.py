"""Start-up wiring: build the service from settings, and prepare a dev data dir.

`build_service` is the only place that knows how the parts fit; `create_app` and the tests
call it. Nothing happens at import time.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path

from kmsgate.audit import AuditEvent, AuditLog
from kmsgate.backends import backend_class
from kmsgate.backends.base import KeyBackend, Registry
from kmsgate.backends.softkms import SoftKmsBackend, create_root_key_file, read_root_key_file
from kmsgate.catalogue import Catalogue
from kmsgate.config import ROOT_TOKEN_FILE, BackendSettings, Settings
from kmsgate.errors import BackendError, ConfigError
from kmsgate.policy import PolicyEngine
from kmsgate.service import Service
from kmsgate.store import Store
from kmsgate.tokens import TokenRegistry

_ROOT_CHECK = b"kmsgate root key check"


def _check_root_key(store: Store, softkms: SoftKmsBackend) -> None:
    """Refuse to start with a root key other than the one the store was sealed under."""
    sealed = softkms.seal(_ROOT_CHECK, "__root_check__", 0).hex()
    stored = store.init_meta("softkms.root_check", sealed)
    try:
        ok = softkms.unseal(bytes.fromhex(stored), "__root_check__", 0) == _ROOT_CHECK
    except BackendError:
        ok = False
    if not ok:
        raise ConfigError("the root key does not match the one this store was sealed with")


def _build_backend(name: str, cfg: BackendSettings, settings: Settings, store: Store) -> KeyBackend:
    if cfg.type == "softkms":
        backend = SoftKmsBackend(name, read_root_key_file(settings.resolved_root_key_file()))
        _check_root_key(store, backend)
        return backend
    return backend_class(cfg.type).from_config(name, cfg)


def build_service(settings: Settings) -> Service:
    """Open the store (migrating it), the backends, the policy and the audit log.

    Raises ConfigError if anything is misconfigured (bad policy, wrong root key, ...).
    """
    settings.check_production()
    store = Store(settings.resolved_database_url())
    store.migrate()
    registry = Registry(
        {
            name: _build_backend(name, cfg, settings, store)
            for name, cfg in settings.backends.items()
        },
        settings.default_backend,
    )
    return Service(
        settings=settings,
        catalogue=Catalogue(store, refresh_seconds=settings.cache_refresh_seconds),
        registry=registry,
        policy=PolicyEngine.load(settings.policy_dir),
        audit=AuditLog(
            settings.resolved_audit_path(), fsync_interval=settings.audit_fsync_interval
        ),
        tokens=TokenRegistry(store, refresh_seconds=settings.cache_refresh_seconds),
    )


def prepare_dev_data_dir(settings: Settings) -> None:
    """Create the dev data dir (0700) and its root key (0600) on first run."""
    assert settings.dev and settings.data_dir is not None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    root_key = settings.resolved_root_key_file()
    if not root_key.exists():
        create_root_key_file(root_key)


def bootstrap_token(settings: Settings, roles: list[str], description: str) -> str:
    """Create a token directly in the store (first admin of a production gateway), audited
    as the local operator. Raises ConfigError or InvalidRequest."""
    service = build_service(settings)
    try:
        info, token = service.tokens.create(roles, ttl=None, description=description)
        service.audit.append(
            AuditEvent(
                action="token.bootstrap",
                decision="allow",
                outcome="ok",
                request_id="cli",
                principal=f"local:{getpass.getuser()}",
                principal_kind="local",
                resource={"kind": "token", "name": info.id},
                policy_digest=service.policy.digest,
                detail={"roles": list(info.roles)},
            )
        )
    finally:
        service.close()
    return token


def ensure_root_token(service: Service, data_dir: Path) -> str | None:
    """On first dev run, create an `admin` token, write it to `data_dir/root-token` (0600)
    and return it; None if the file already exists."""
    path = data_dir / ROOT_TOKEN_FILE
    if path.exists():
        return None
    _, token = service.tokens.create(["admin"], ttl=None, description="dev root token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
