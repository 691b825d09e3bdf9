"""Fixtures that build a real gateway: store (SQLite or PostgreSQL), softkms, shipped
policies, audit log, served through the real FastAPI app."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kmsgate.api.app import create_app
from kmsgate.bootstrap import build_service, prepare_dev_data_dir
from kmsgate.config import Settings, load_settings
from kmsgate.service import Service

__all__ = [
    "AdminApi",
    "Api",
    "admin",
    "api",
    "gateway_settings",
    "make_token",
    "open_gateway",
    "service",
]


@pytest.fixture
def gateway_settings(tmp_path: Path) -> Settings:
    """Dev-mode settings on a fresh data dir and a fresh SQLite database. The API and the
    use cases are storage-blind: the store, caches, tokens and jobs are tested on SQLite
    and PostgreSQL in tests/test_store.py and tests/test_replicas.py."""
    settings = load_settings(
        dev=True,
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'kmsgate.db'}",
        env="test",
    )
    prepare_dev_data_dir(settings)
    return settings


@pytest.fixture
def service(gateway_settings: Settings) -> Iterator[Service]:
    svc = build_service(gateway_settings)
    yield svc
    svc.close()


class Api:
    """A TestClient with helpers: `as_(token)` sets the bearer token."""

    def __init__(self, client: TestClient, service: Service) -> None:
        self.client = client
        self.service = service

    def call(self, method: str, path: str, token: str | None, **kwargs: Any) -> Any:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        headers.update(kwargs.pop("headers", {}))
        return self.client.request(method, path, headers=headers, **kwargs)


@pytest.fixture
def api(service: Service) -> Iterator[Api]:
    with TestClient(create_app(service)) as client:
        yield Api(client, service)


@pytest.fixture
def make_token(service: Service) -> Callable[..., str]:
    def make(*roles: str) -> str:
        return service.tokens.create(list(roles), ttl=None)[1]

    return make


@pytest.fixture
def admin(make_token: Callable[..., str]) -> str:
    return make_token("admin")


class AdminApi:
    """An Api whose every call carries one (admin) token."""

    def __init__(self, api: Api, token: str) -> None:
        self.api = api
        self.client = api.client
        self.token = token

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.api.call(method, path, self.token, **kwargs)


@contextlib.contextmanager
def open_gateway(base: Path, **overrides: Any) -> Iterator[tuple[Api, str]]:
    """A real gateway on SQLite under `base` (dev mode, env `test`, shipped policies; settings
    `overrides` such as `backends` or `database_url`) through the real app, with an admin
    token. Two gateways opened on one `base` share the root key and the audit chain. For tests that
    need one gateway for a module or their own backends."""
    overrides.setdefault("database_url", f"sqlite:///{base / 'kmsgate.db'}")
    settings = load_settings(dev=True, data_dir=base / "data", env="test", **overrides)
    prepare_dev_data_dir(settings)
    service = build_service(settings)
    try:
        with TestClient(create_app(service)) as client:
            yield Api(client, service), service.tokens.create(["admin"], ttl=None)[1]
    finally:
        service.close()
