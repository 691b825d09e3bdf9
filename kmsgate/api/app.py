"""create_app(): the FastAPI application over one Service."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import FastAPI

from kmsgate import __version__
from kmsgate.api import routes_exceptions, routes_keys, routes_pki, routes_revocation, routes_sys
from kmsgate.api.deadlines import BodyDeadlines
from kmsgate.api.docs import install_docs
from kmsgate.api.fastpath import FastRoute, GatewayApp
from kmsgate.api.metrics import Metrics, Work
from kmsgate.api.problems import GatewayMiddleware, RequestIds, install_error_handlers
from kmsgate.api.readiness import Readiness
from kmsgate.api.responses import JsonResponse
from kmsgate.api.threads import BackendThreads
from kmsgate.errors import KmsgateError
from kmsgate.jobs import Jobs, leader_lock
from kmsgate.service import Service
from kmsgate.store.listener import ChangeListener

log = logging.getLogger("kmsgate")
JOBS_TICK_SECONDS = 60.0
MIN_REFRESH_GAP_SECONDS = 0.05
"""The least time between two refreshes, whatever the rate of announced changes."""


def _surviving(what: str, work: Callable[..., None], *args: object) -> None:
    """Run `work(*args)` for a background thread that must go on whatever it raises: the
    error is logged by its type only (a driver's text can carry SQL and its values). Such a
    thread that died stopped the leader's jobs on every replica, as it kept the lock."""
    try:
        work(*args)
    except Exception as exc:
        log.error("%s failed: %s", what, type(exc).__name__)


class CacheRefresher:
    """Two background threads, keeping all database reads off the request path: one follows
    other workers' and replicas' changes (on PostgreSQL as soon as they are announced, else
    every `cache_refresh_seconds`); the other flushes the key usage counts and ticks the
    scheduled jobs as often (the full set every `JOBS_TICK_SECONDS`; only the leader among
    all processes runs them), so that a long job never delays a revocation's arrival."""

    def __init__(
        self, service: Service, jobs: Jobs, every_second: Callable[[], None] = lambda: None
    ) -> None:
        """`every_second`: more work for this thread each second (the metrics snapshot)."""
        self._service = service
        self._jobs = jobs
        self._every_second = every_second
        self._stop = threading.Event()
        self._threads = (
            threading.Thread(target=self._follow, name="kmsgate-refresh", daemon=True),
            threading.Thread(target=self._tick, name="kmsgate-jobs", daemon=True),
        )

    def start(self) -> None:
        self._service.gate.freshness.mark()  # the caches were loaded from the store just now
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._flush_usage()  # the last second's key uses

    def _flush_usage(self) -> None:
        try:
            self._service.gate.usage.flush()
        except KmsgateError as exc:
            log.warning("key usage not recorded: %s", exc.code)

    def _follow(self) -> None:
        interval = self._service.settings.cache_refresh_seconds
        listener = ChangeListener(self._service.settings.resolved_database_url(), self._stop)
        try:
            while not self._stop.is_set():
                listener.wait(interval)  # a change announced (PostgreSQL), or a poll's time
                if self._stop.is_set():
                    return
                _surviving("cache refresh", self._refresh)
                self._stop.wait(MIN_REFRESH_GAP_SECONDS)  # a stream of changes: 20 refreshes/s
        finally:
            listener.close()

    def _tick(self) -> None:
        interval = self._service.settings.cache_refresh_seconds
        next_tick = time.monotonic() + JOBS_TICK_SECONDS
        while not self._stop.wait(interval):  # once a second: usage, the metrics, the jobs
            every_job = time.monotonic() >= next_tick
            _surviving("the jobs' tick", self._tick_once, every_job)
            if every_job:
                next_tick = time.monotonic() + JOBS_TICK_SECONDS

    def _tick_once(self, every_job: bool) -> None:
        """Flush key usage, take the metrics, then run every job (`every_job`) or only
        the frequent ones (CRLs due after a revocation and the like)."""
        self._flush_usage()
        self._every_second()
        if every_job:
            self._jobs.run_due()
        else:
            self._jobs.run_revocation()

    def _refresh(self) -> None:
        """Every cache follows the store's change feed (a failure is logged, not raised)."""
        try:
            self._service.catalogue.refresh()
            self._service.tokens.refresh()
            self._service.client_certificates.refresh()
            self._service.pki.authorities.refresh()
            self._service.exceptions.active.refresh()  # JIT grants approved or revoked
            self._service.system.policy_follower.refresh()  # another process's reload
            self._service.revocation.refresh()  # revocation: published CRLs, OCSP answers
        except KmsgateError as exc:
            log.warning("cache refresh failed: %s", exc.code)
            return
        self._service.gate.freshness.mark()


def create_app(service: Service, leader_jobs: Sequence[Callable[[], None]] = ()) -> FastAPI:
    """The REST application over `service`; closes it on shutdown. `leader_jobs` run every
    second in the process that leads the scheduled jobs (see `Jobs`)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        jobs = Jobs(service, leader_lock(service.settings.resolved_database_url()), leader_jobs)
        metrics: Metrics = app.state.metrics
        refresher = CacheRefresher(service, jobs, metrics.snapshot)
        refresher.start()
        deadlines.start()
        try:
            yield
        finally:
            await deadlines.stop()
            refresher.stop()
            jobs.close()
            service.close()

    deadlines = BodyDeadlines(service.settings.limits.body_read_seconds)

    app = GatewayApp(
        title="kmsgate",
        version=__version__,
        description="Key-management and PKI gateway. The contract, in prose: docs/api.md.",
        lifespan=lifespan,
        default_response_class=JsonResponse,
        docs_url=None,
        redoc_url=None,
        # a trailing slash is another path (404), not a redirect to the Host header's server
        redirect_slashes=False,
        # kmsgate exports Prometheus metrics and its own audit log; FastAPI's OpenTelemetry
        # bridge would only look up (unconfigured) providers on every request
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    install_docs(app)
    app.state.service = service
    app.state.backend_threads = BackendThreads()
    app.state.readiness = Readiness(service, app.state.backend_threads)
    fast_routes: list[FastRoute] = []
    app.include(routes_sys.build_router())  # first: health checks stay cheap
    # revocation: the public CRLs and OCSP
    for routes in (routes_keys, routes_pki, routes_revocation):
        fast, router = routes.build_routes()
        fast_routes += fast
        app.include(router)
    app.include(routes_exceptions.build_router())
    install_error_handlers(app)
    app.state.metrics = Metrics(
        {
            "keys": service.catalogue,
            "tokens": service.tokens,
            "cas": service.pki.authorities,
            "grants": service.exceptions.active,
        },
        lambda: {**service.system.alerts(), "crl_age_seconds": service.revocation.oldest_crl_age()},
        Work(
            decisions=lambda: service.gate.decisions,
            fsyncs=lambda: (
                getattr(service.audit, "fsyncs", 0),
                getattr(service.audit, "fsync_seconds", 0.0),
            ),
            unsynced=lambda: getattr(service.audit, "unsynced", 0),
            backends=lambda: service.gate.backend_times.by_backend,
            unrecorded_failures=lambda: service.gate.failures.unrecorded,
        ),
    )
    gateway = {
        "max_body_bytes": service.settings.limits.max_body_bytes,
        "metrics": app.state.metrics,
        "ids": RequestIds(),
        "deadlines": deadlines,
    }
    app.add_middleware(GatewayMiddleware, **gateway)
    app.serve_fast(fast_routes, **gateway)
    return app
