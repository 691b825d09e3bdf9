"""The REST API: create_app() and thin routers over the service layer."""

from kmsgate.api.app import create_app

__all__ = ["create_app"]
