"""Fixtures that build a real gateway: store (SQLite or PostgreSQL), softkms, shipped
policies, audit log, served through the real FastAPI app."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kmsgate.api.app import create_app
from kmsgate.bootstrap import build_service, prepare_dev_data_dir
from kmsgate.config import Settings, load_settings
from kmsgate.service import Service

__all__ = ["admin", "api", "gateway_settings", "make_token", "service"]


@pytest.fixture
def gateway_settings(tmp_path: Path, database_url: str) -> Settings:
    """Dev-mode settings on a fresh data dir and a fresh database (SQLite and PostgreSQL)."""
    settings = load_settings(
        dev=True, data_dir=tmp_path / "data", database_url=database_url, env="test"
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
