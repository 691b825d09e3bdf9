"""Readiness (`GET /v1/sys/ready`, public): every backend's status, the store and the audit
log, checked at once and shared. Each backend is asked in its own threads (a hung Vault
holds only its own), all of them together (their timeouts do not add up), and the callers
that come while a round is under way share its answer: however many unauthenticated
callers ask, one round at a time runs."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.concurrency import run_in_threadpool

from kmsgate.api.threads import BackendThreads
from kmsgate.backends.base import BackendStatus, KeyBackend
from kmsgate.errors import BackendUnavailable
from kmsgate.service import Service

Answer = tuple[dict[str, object], int]
"""The reply's body and status (200, or 503 when something is down)."""


class Readiness:
    """The readiness checks of one application (one event loop)."""

    def __init__(self, service: Service, threads: BackendThreads) -> None:
        self._service = service
        self._threads = threads
        self._round: asyncio.Future[Answer] | None = None

    async def check(self) -> Answer:
        """The answer of the round under way, or of a new one."""
        if self._round is None:
            self._round = asyncio.ensure_future(self._check())
            self._round.add_done_callback(self._done)
        return await asyncio.shield(self._round)

    def _done(self, _: asyncio.Future[Answer]) -> None:
        self._round = None

    async def _status(self, name: str, backend: KeyBackend) -> BackendStatus:
        if not backend.blocking:
            return backend.status()
        try:
            return await self._threads.run(name, backend.status)
        except BackendUnavailable as exc:  # its threads are all taken: it is not keeping up
            return BackendStatus(False, exc.detail)

    async def _check(self) -> Answer:
        """200 when every configured backend answers, the audit log takes records (else
        every operation is refused) and the caches follow the store; also while the store
        cannot be reached but the caches may still serve key operations
        (`max_staleness_seconds`: every replica shares the store, and leaving them all out
        of rotation would refuse what they can still do), with status `degraded`; else 503."""
        service = self._service
        named = service.registry.items()
        statuses, problem = await asyncio.gather(
            asyncio.gather(*(self._status(name, backend) for name, backend in named)),
            run_in_threadpool(service.store.ping),
        )
        backends = {
            name: {"type": backend.scheme, "ok": status.ok, "detail": status.detail}
            for (name, backend), status in zip(named, statuses, strict=True)
        }
        stale = service.gate.freshness.stale()
        if problem is None and stale:
            problem = "the caches have not followed the store yet"
        degraded = problem is not None and not stale
        if degraded:
            problem = f"{problem}; key operations go on from the caches for now"
        store = {"ok": problem is None, "detail": problem or "ok"}
        refused = service.audit.problem()
        audit = {"ok": refused is None, "detail": refused or "ok"}
        parts: dict[str, Any] = {"audit": audit, **{f"backend {n}": b for n, b in backends.items()}}
        if not degraded:
            parts["store"] = store
        down = [f"{part}: {state['detail']}" for part, state in parts.items() if not state["ok"]]
        body: dict[str, object] = {
            "status": "unavailable" if down else "degraded" if degraded else "ok",
            "store": store,
            "audit": audit,
            "backends": backends,
        }
        if down:  # what a client that reads problem replies (the CLI) shows
            body.update(code="not_ready", detail="; ".join(down))
        return body, 503 if down else 200
