"""kmsgate: a key-management and PKI gateway."""

__version__ = "0.1.0"
