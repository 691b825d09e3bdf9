"""Token buckets: rates of requests, kept in memory, one process at a time."""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections.abc import Sequence

from kmsgate.errors import RateLimited

__all__ = ["BucketMap", "FailureLimit", "RequestRates", "TokenBucket"]


class TokenBucket:
    """`rate` tokens per second, at most `capacity` saved up (the burst). Thread-safe."""

    __slots__ = ("_lock", "_stamp", "_tokens", "capacity", "rate")

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def reserve(self, max_wait: float = 0.0) -> float:
        """Take a token, possibly ahead of time: the seconds to wait before using it (0.0:
        at once). Raises RateLimited (nothing taken; `retry_after` in whole seconds) if
        that wait would exceed `max_wait`."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            wait = max(0.0, (1.0 - self._tokens) / self.rate)
            if wait > max_wait:
                raise RateLimited(retry_after=max(1, math.ceil(wait)))
            self._tokens -= 1.0
            return wait

    def take(self) -> bool:
        """Take a token if one is there now; whether one was."""
        try:
            self.reserve()
        except RateLimited:
            return False
        return True

    def full(self) -> bool:
        """Whether the bucket has refilled (forgetting it would change nothing)."""
        with self._lock:
            saved = self._tokens + (time.monotonic() - self._stamp) * self.rate
            return saved >= self.capacity


class BucketMap:
    """A bucket per name (a principal, a key), made on first use. At most `max_names` are
    kept: beyond that, the full ones (as good as new) are forgotten."""

    def __init__(self, rate: float, capacity: float, max_names: int = 10_000) -> None:
        self.rate, self.capacity, self.max_names = rate, capacity, max_names
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, name: str) -> None:
        """A token of `name`'s bucket, now. Raises RateLimited."""
        self.bucket(name).reserve()

    def bucket(self, name: str) -> TokenBucket:
        """`name`'s bucket (made now if it has none)."""
        bucket = self._buckets.get(name)
        if bucket is None:
            if len(self._buckets) >= self.max_names:
                self._buckets = {n: b for n, b in self._buckets.items() if not b.full()}
            bucket = self._buckets.setdefault(name, TokenBucket(self.rate, self.capacity))
        return bucket


class RequestRates:
    """This process's request rates per principal and per key (`limits.principal_rate`,
    `limits.key_rate`; 0 is off)."""

    def __init__(self, per_principal: float, per_key: float, burst_seconds: float) -> None:
        self._principals = (
            BucketMap(per_principal, per_principal * burst_seconds) if per_principal else None
        )
        self._keys = BucketMap(per_key, per_key * burst_seconds) if per_key else None

    def admit_principal(self, principal: str) -> None:
        """Raises RateLimited when `principal` is over its rate."""
        if self._principals is not None:
            self._principals.take(principal)

    def admit_key(self, key: str) -> None:
        """Raises RateLimited when key `key` is over its rate."""
        if self._keys is not None:
            self._keys.take(key)


class FailureLimit:
    """Failed authentications per client address (`limits.failed_auth_rate`), so that a
    client trying token after token cannot grow the audit log at line rate. Past the rate a
    failure is answered 429 and only the first of such a run is audited; the next audited
    failure of that address says how many went unrecorded, and `unrecorded` counts them
    all (for /metrics). An IPv6 address counts with its /64 (one host's addresses); the
    `exempt` networks (trusted proxies, whose clients all share their address) are never
    held back."""

    def __init__(self, rate: float, burst_seconds: float, exempt: Sequence[str] = ()) -> None:
        self._buckets = BucketMap(rate, rate * burst_seconds) if rate else None
        self._exempt = [ipaddress.ip_network(n, strict=False) for n in exempt]
        self._held: dict[str, int] = {}
        """Addresses past the rate -> failures refused unrecorded since."""
        self.unrecorded = 0

    def failed(self, address: str | None) -> tuple[bool, bool, int]:
        """Count a failed authentication from `address`: (whether it is within the rate,
        whether to audit it, how many of the address's failures went unrecorded before it).
        Every failure within the rate is audited, and the first past it."""
        source = self._source(address)
        if self._buckets is None or source is None:
            return True, True, 0
        if self._buckets.bucket(source).take():
            return True, True, self._held.pop(source, 0)
        if source in self._held:
            self._held[source] += 1
            self.unrecorded += 1
            return False, False, 0
        if len(self._held) >= self._buckets.max_names:
            self._held.clear()
        self._held[source] = 0
        return False, True, 0

    def _source(self, address: str | None) -> str | None:
        """What `address` is counted as: itself (also when it is no IP address), its /64
        for IPv6; None if exempt or unknown."""
        if not address:
            return None
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if any(ip in network for network in self._exempt):
            return None
        if ip.version == 6:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)
