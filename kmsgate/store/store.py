"""`Store`: the database with one object per aggregate, all sharing its engine."""

from __future__ import annotations

from kmsgate.store.engine import Database
from kmsgate.store.feed import Feed
from kmsgate.store.keys import Keys
from kmsgate.store.tokens import Tokens


class Store(Database):
    """The metadata store: `keys` and `tokens` (each aggregate's queries and writes) and
    `feed` (the change feed they write to), over one engine (see `Database`)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.keys = Keys(self)
        self.tokens = Tokens(self)
        self.feed = Feed(self)
        # The former flat names, until kmsgate.catalogue, kmsgate.auth.tokens, kmsgate.jobs
        # and tests/test_store.py call the objects above; then these lines go.
        self.insert_key = self.keys.insert
        self.add_version = self.keys.add_version
        self.update_key = self.keys.update
        self.update_version = self.keys.update_version
        self.load_key = self.keys.get
        self.load_keys = self.keys.all
        self.insert_token = self.tokens.insert
        self.revoke_token = self.tokens.revoke
        self.load_token = self.tokens.get
        self.load_tokens = self.tokens.all
        self.epoch = self.feed.epoch
        self.changes_since = self.feed.changes_since
        self.prune_changes = self.feed.prune
