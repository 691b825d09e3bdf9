"""Loopback hosts, and the rule for a URL kmsgate sends secrets, keys or plaintext to:
https://, or plain http:// to a loopback host only."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def is_loopback_host(host: str, *, resolve: bool = False) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or `localhost`.

    With `resolve`, another name counts when every address it resolves to is loopback (for
    an address kmsgate binds at once; a URL kept for later calls is judged by its text, not
    by what its name resolves to today)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host.lower().rstrip(".") == "localhost":
        return True
    if not resolve:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def https_or_loopback(url: str) -> bool:
    """Whether `url` is https://, or http:// to a loopback host (see `is_loopback_host`): what
    kmsgate accepts for a service it sends secrets, keys or plaintext to."""
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and is_loopback_host(parts.hostname)


def plain_http_refused(url: str, what: str) -> str:
    """The one-line reason for refusing `url` (which failed `https_or_loopback`), naming its
    host but no user info that the URL may carry."""
    host = urlsplit(url).hostname or "?"
    return (
        f"refusing plain http:// to {host}, which is not a loopback address: {what} would "
        "cross the network in cleartext; use https:// (http:// is for 127.0.0.1, ::1 or "
        "localhost only)"
    )
