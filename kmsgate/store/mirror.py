"""`StoreMirror`: an in-memory copy of one aggregate that follows the aggregate's change feed,
and the budget that bounds how often its misses read through to the database."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import ClassVar

from kmsgate.ratelimit import TokenBucket
from kmsgate.store.store import Store

READ_THROUGH_PER_SECOND = 200.0
"""Cache misses a process reads through to the store per second (burst the same); beyond
that a miss answers "unknown" without a query, so unknown names cannot load the database."""


MOST_ITEM_READS = 500
"""The most changed items a refresh reads one by one; beyond, it reloads the aggregate in one
read (a purge of 10,000 tokens cost every other process 10,000 reads, 3.7 s on SQLite)."""


class StoreMirror(ABC):
    """An in-memory copy of one aggregate of the store, following its change feed.

    Readers use the copy and never wait on the database, except on a miss, which a subclass
    reads through (`_read_through`, within `READ_THROUGH_PER_SECOND`). `refresh` (called by
    a background thread every `cache_refresh_seconds`) reloads only the items that changed
    since the copy's epoch, and the whole aggregate when the feed no longer reaches back
    that far, or more than `MOST_ITEM_READS` items changed of a mirror that reads them one by
    one. `full_reloads` and `item_reloads`
    count the work done (for /metrics).
    """

    aggregate: ClassVar[str]
    _epoch: int
    """The last change the copy holds. Its content is never older: a refresh swaps in the
    content first, then the epoch (read the epoch first, then the content)."""

    def __init__(
        self, store: Store, *, read_through_per_second: float = READ_THROUGH_PER_SECOND
    ) -> None:
        self._store = store
        self._epoch = -1
        self._lock = threading.RLock()
        self._misses = TokenBucket(read_through_per_second, read_through_per_second)
        self.full_reloads = 0
        self.item_reloads = 0
        self.reload()

    @abstractmethod
    def _load(self) -> None:
        """Replace the copy with the store's content. Raises Unavailable."""

    @abstractmethod
    def _load_item(self, item: str) -> None:
        """Replace (or drop) one item of the copy from the store. Raises Unavailable."""

    reads_in_batches: ClassVar[bool] = False
    """Whether `_load_items` reads many items in a few statements: then a refresh never
    reloads the whole aggregate for their number."""

    def _load_items(self, items: list[str]) -> None:
        """Replace (or drop) each of `items` from the store (`_load_item` each, unless a
        mirror reads in batches). Raises Unavailable."""
        for item in items:
            self._load_item(item)

    def _read_through(self, item: str) -> bool:
        """Load `item`, which the copy does not hold, from the store, unless the miss budget
        is spent. Returns whether the store was asked. Raises Unavailable."""
        if not self._misses.take():
            return False
        with self._lock:  # the store's state is at least as new as any cached write
            self._load_item(item)
        return True

    def reload(self) -> None:
        """Reload the whole aggregate now. Raises Unavailable if the store is down."""
        with self._lock:
            epoch = self._store.feed.epoch(self.aggregate)
            self._load()
            self._epoch = epoch
            self.full_reloads += 1

    def changed_since(self, epoch: int) -> bool:
        """Whether the aggregate has had a change committed after `epoch` (one cheap read of
        its counter). Raises Unavailable."""
        return self._store.feed.epoch_now(self.aggregate) != epoch

    def refresh(self) -> None:
        """Apply the changes committed since the copy's epoch. Raises Unavailable."""
        if not self.changed_since(self._epoch):
            return
        with self._lock:
            if not self.changed_since(self._epoch):
                return  # another thread (the refresher, a read-through) caught up meanwhile
            changes = self._store.feed.changes_since(self.aggregate, self._epoch)
            items = list(dict.fromkeys(item for _, item in changes))
            many = len(items) > MOST_ITEM_READS and not self.reads_in_batches
            if not changes or changes[0][0] != self._epoch + 1 or many:
                self.reload()  # pruned past our epoch, or more items than one read is worth
                return
            self._load_items(items)
            self.item_reloads += len(items)
            self._epoch = changes[-1][0]
