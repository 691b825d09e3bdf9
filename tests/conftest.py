"""Shared pytest configuration for the kmsgate test suite.

Fixtures that start real components (PostgreSQL, openssl, ...) live in ``tests/components.py``
and are loaded as a plugin here.
"""

pytest_plugins = [
    "tests.components",
    "tests.gateway",
    "tests.softhsm",
    "tests.openbao",
    "tests.moto",
]
