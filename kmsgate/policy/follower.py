"""Policy reloads seen by every process: a reload announces the new digest on the store's
"policy" change feed, and every other worker and replica reloads its own policy files when
it sees a digest that is not the one it holds (within a cache refresh). A process whose
files give another digest than the one announced (at start, or after such a reload) logs a
warning: its decisions differ from the other replicas'."""

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
        else:
            self._compare(self._last_announced())
        self._following = True

    def _load_item(self, item: str) -> None:
        if item != self._policy.digest:
            self._reload()
            self._compare(item)

    def _last_announced(self) -> str | None:
        """The digest of the last reload announced by any process, if the feed has it."""
        epoch = self._store.feed.epoch(self.aggregate)
        changes = self._store.feed.changes_since(self.aggregate, epoch - 1) if epoch else []
        return changes[-1][1] if changes else None

    def _compare(self, announced: str | None) -> None:
        """Warn when this process's policy files give another bundle than the one another
        process announced: the replicas would decide differently (a replica started with
        other policy files, a rollout half done)."""
        if announced is not None and announced != self._policy.digest:
            log.warning(
                "this process's policy files give %s, but the last reload announced (by "
                "another process, or before a restart) gave %s: every worker and replica "
                "needs the same policy files; a reload makes every process read its own again",
                self._policy.digest,
                announced,
            )

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
