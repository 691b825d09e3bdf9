"""`Store`: the database with one object per aggregate, all sharing its engine."""

from __future__ import annotations

from kmsgate.store.cas import Cas
from kmsgate.store.certificates import Certificates
from kmsgate.store.checkpoints import AuditAnchors
from kmsgate.store.crls import Crls
from kmsgate.store.engine import Database
from kmsgate.store.feed import Feed
from kmsgate.store.grants import Grants
from kmsgate.store.keys import Keys
from kmsgate.store.tokens import Tokens
from kmsgate.store.usage import KeyUsageTable


class Store(Database):
    """The metadata store: `keys`, `tokens`, `cas`, `certs`, `grants` (each aggregate's queries and
    writes), `audit_anchors` and `feed` (the change feed they write to), over one engine (see
    `Database`)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.keys = Keys(self)
        self.tokens = Tokens(self)
        self.cas = Cas(self)
        self.certs = Certificates(self)
        self.crls = Crls(self)  # published CRLs and OCSP responders (service/revocation.py)
        self.grants = Grants(self)  # JIT exceptions (service/exceptions.py)
        self.key_usage = KeyUsageTable(self)  # per-version use counts (kmsgate/usage.py)
        self.audit_anchors = AuditAnchors(self)  # audit chains' last checkpoints
        self.feed = Feed(self)
