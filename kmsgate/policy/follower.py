"""Policy reloads seen by every process: a reload announces the new digest on the store's
"policy" change feed, and every other worker and replica reloads its own policy files when
it sees a digest that is not the one it holds (within a cache refresh)."""

from __future__ import annotations

import logging

from kmsgate.errors import ConfigError
from kmsgate.policy.engine import PolicyEngine
from kmsgate.store import Store, StoreMirror

log = logging.getLogger("kmsgate.policy")


class PolicyFollower(StoreMirror):
    """Reloads `policy` when another process announces a reload."""

    aggregate = "policy"

    def __init__(self, store: Store, policy: PolicyEngine) -> None:
        self._policy = policy
        self._following = False
        super().__init__(store)

    def _load(self) -> None:
        if self._following:  # the feed was pruned past this copy: reload to be sure
            self._reload()
        self._following = True

    def _load_item(self, item: str) -> None:
        if item != self._policy.digest:
            self._reload()

    def _reload(self) -> None:
        """Reload the policy files; an invalid bundle keeps the current policy (logged)."""
        try:
            digest = self._policy.reload()
        except ConfigError as exc:
            log.error("announced policy reload failed here; the current policy stays: %s", exc)
            return
        log.info("policy reloaded after another process's reload: %s", digest)

    def announce(self, digest: str) -> None:
        """Tell the other processes that this one now holds `digest`. Raises Unavailable."""
        self._store.feed.announce(self.aggregate, digest)
