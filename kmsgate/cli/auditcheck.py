"""`kmsgate audit verify`'s sources of trust besides the files: the public key that checks
the checkpoints' signatures (a PEM file, or the gateway's public-key endpoint) and the
store's copy of each chain's last checkpoint; and the report it prints."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from kmsgate.audit import ChainCheckpoints, PublicKeys, VerifyReport
from kmsgate.audit.checkpoint import ChainIdentity, UntrustedKey
from kmsgate.audit.filereader import UNKNOWN_WRITER, chain_paths
from kmsgate.catalogue import AUDIT_PURPOSE
from kmsgate.cli.common import fail, fail_api
from kmsgate.client import ApiError, Client
from kmsgate.errors import ConfigError, KmsgateError
from kmsgate.store.checkpoints import AuditAnchor

__all__ = ["checkpoint_lines", "public_keys", "stored_anchors"]


def _pem_key(pem: bytes, source: str) -> PublicKeyTypes:
    try:
        return load_pem_public_key(pem)
    except (ValueError, TypeError):
        fail(f"{source} is not a PEM public key")


@contextlib.contextmanager
def public_keys(
    key_files: Sequence[Path], gateway: str | None, token: str | None
) -> Iterator[PublicKeys | None]:
    """The checkpoints' public keys: those of `key_files` for every key and version (a
    checkpoint verifies under any of them: one file per version of a rotated audit key),
    or each key version's public key fetched from `gateway` (once); None without either.
    Exits with a one-line error if both are given, a file is not a PEM public key, or the
    gateway refuses."""
    if key_files and gateway is not None:
        fail("give --key or --gateway, not both")
    if key_files:
        given = []
        for key_file in key_files:
            try:
                pem = key_file.read_bytes()
            except OSError as exc:
                fail(f"cannot read {key_file}: {exc.strerror}")
            given.append(_pem_key(pem, str(key_file)))
        keys = tuple(given)
        yield lambda _name, _version: keys
        return
    if gateway is None:
        yield None
        return
    fetched: dict[tuple[str, int], PublicKeyTypes] = {}
    with Client(gateway, token) as client:
        purposes: dict[str, str] = {}

        def from_gateway(name: str, version: int) -> tuple[PublicKeyTypes]:
            if name not in purposes:
                try:
                    purposes[name] = str(client.get_key(name).get("purpose"))
                except ApiError as exc:
                    fail_api(exc, f"key {name}")
            if purposes[name] != AUDIT_PURPOSE:  # any caller may sign with such a key
                raise UntrustedKey(
                    f"checkpoint signed with key {name!r}, of purpose {purposes[name]!r}, "
                    f"not {AUDIT_PURPOSE!r}"
                )
            if (name, version) not in fetched:
                try:
                    pem = client.public_key(name, version)
                except ApiError as exc:
                    fail_api(exc, f"public key of {name} v{version}")
                fetched[name, version] = _pem_key(pem.encode(), f"{name} v{version}")
            return (fetched[name, version],)

        yield from_gateway


def stored_anchors(
    data_dir: Path | None, config: Path | None, gateway: str | None, token: str | None
) -> tuple[list[AuditAnchor] | None, Callable[[Path], ChainIdentity]]:
    """The store's last checkpoint of every chain: read from the gateway's data dir or
    config file (never created or migrated), else asked of `gateway`; None without any.
    Also what a given log was written as: with a data dir or config, its own log's file
    name and replica id (the config's `replica_id`, else the default one when the store
    has checkpoints of it; a replica's other logs, verified beside it, are not known). Exits
    with a one-line error if the store or the gateway cannot be read."""
    if data_dir is None and config is None:
        anchors = None if gateway is None else _gateway_anchors(gateway, token)
        return anchors, lambda _path: UNKNOWN_WRITER
    from kmsgate.config import load_settings
    from kmsgate.store import Store, sqlite_file

    try:
        settings = load_settings(config, data_dir=data_dir)
        url = settings.resolved_database_url()
        own_log = settings.resolved_audit_path()
        derived = settings.resolved_replica_id()
    except ConfigError as exc:
        fail(str(exc))
    database = sqlite_file(url)
    if database is not None and not database.is_file():
        fail(f"no store at {database}")
    try:
        store = Store(url)
    except ConfigError as exc:
        fail(str(exc))
    try:
        anchors = store.audit_anchors.all()
    except KmsgateError as exc:
        fail(f"cannot read the store's audit checkpoints: {exc.detail} (is it migrated?)")
    finally:
        store.close()
    # the writer: the config's replica_id, else the default one (the host name and the
    # log's path) when the store knows it, i.e. verified on the gateway's host; elsewhere
    # the default differs, and the writer stays unknown
    known = settings.replica_id or any(a.replica == derived for a in anchors)
    writer = ChainIdentity(own_log.name, derived if known else None)
    return anchors, partial(_written_as, own_log, writer)


def _gateway_anchors(gateway: str, token: str | None) -> list[AuditAnchor]:
    with Client(gateway, token) as client:
        try:
            rows = client.audit_checkpoints()
        except ApiError as exc:
            fail_api(exc, "the store's audit checkpoints")
    try:
        return [AuditAnchor(**row) for row in rows]
    except TypeError:
        fail(f"{gateway} answered audit checkpoints this version cannot read")


def _written_as(own_log: Path, writer: ChainIdentity, path: Path) -> ChainIdentity:
    """`writer` for the gateway's own log, else unknown."""
    try:
        own = path.resolve() == own_log.resolve()
    except OSError:
        own = False
    return writer if own else UNKNOWN_WRITER


def checkpoint_lines(
    report: VerifyReport, keys_checked: bool, anchors: Sequence[AuditAnchor] | None
) -> Iterator[str]:
    """What an intact log's checkpoints prove, one line per chain (and the replica its
    checkpoints name), then the other replicas the store knows a chain of that name of,
    then what was not checked."""
    store_checked = anchors is not None
    for chain in report.checkpoints:
        written_as = f"written as {chain.name}, " if chain.name != chain.chain.name else ""
        replica = f"replica {chain.replica}" if chain.replica else "replica unnamed"
        summary = _chain_summary(chain, store_checked)
        yield f"  {chain.chain.name} ({written_as}{replica}): {summary}"
    names = {chain.name for chain in report.checkpoints}
    replicas = {chain.replica for chain in report.checkpoints}
    others = sorted({a.replica for a in anchors or () if a.chain in names} - replicas)
    if others:  # a sibling's log passes against its own checkpoints: is this the one meant?
        yield (
            f"  the store also holds chains of these names for replica(s) {', '.join(others)}: "
            "each replica's log verifies against its own checkpoints, so check that the "
            "replica above is the one whose log this should be (or set replica_id)"
        )
    if not keys_checked:
        yield "  checkpoint signatures not verified (give --key PEM or --gateway URL)"
    if not store_checked:
        yield (
            "  not compared with the store's checkpoints (give --data-dir, --config or --gateway)"
        )


def _chain_summary(chain: ChainCheckpoints, store_checked: bool) -> str:
    store = ""
    if store_checked:
        store = "; matches the store" if chain.anchored else "; no checkpoint in the store"
    if chain.last_line is None:
        return f"no checkpoint, all {chain.records} records unsigned{store}"
    verified = (
        f", {_count(chain.signatures_checked, 'signature')} verified"
        if chain.signatures_checked
        else ""
    )
    final = "final " if chain.last_final else ""
    return (
        f"{_count(chain.checkpoints, 'checkpoint')}{verified}; last: {final}record "
        f"{chain.last_line} (covers seq {chain.last_seq}, {chain.last_key}), "
        f"{_count(chain.unsigned, 'record')} unsigned after it{store}"
    )


def log_size(path: Path) -> int | None:
    """The bytes of all the chain files of the audit log at `path` (what `verify` reads),
    None if they cannot be listed."""
    try:
        return sum(chain.stat().st_size for chain in chain_paths(path))
    except OSError:
        return None


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
