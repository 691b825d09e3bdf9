"""Alembic migration environment for the kmsgate store."""
