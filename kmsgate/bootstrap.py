"""Start-up wiring: build the service from settings, and prepare a dev data dir (its root
token and its dev CA).

`build_service` is the only place that knows how the parts fit; `create_app` and the tests
call it. Nothing happens at import time.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmsgate.audit import FileSink
from kmsgate.audit.checkpoint import CheckpointPolicy
from kmsgate.auth import SYSTEM, Credentials, Principal, TokenRegistry
from kmsgate.backends import backend_class
from kmsgate.backends.base import BackendKey, KeyBackend, Registry, RootKeyWrapper
from kmsgate.backends.softkms import (
    ROOT_KEY_BYTES,
    SoftKmsBackend,
    create_root_key_file,
    read_root_key_file,
)
from kmsgate.catalogue import AUDIT_PURPOSE, Catalogue
from kmsgate.config import ROOT_TOKEN_FILE, Settings
from kmsgate.errors import BackendError, ConfigError, KmsgateError, NotFound, Unauthenticated
from kmsgate.files import foreign_owner, write_new
from kmsgate.pki.authorities import CaState
from kmsgate.pki.root import (
    RootKey,
    init_root,
    load_root,
    sign_intermediate,
    write_private_file,
)
from kmsgate.policy import Decision, PolicyEngine
from kmsgate.service import Call, Ctx, Service
from kmsgate.service.checkpoints import CheckpointSigner
from kmsgate.service.gate import Outcome
from kmsgate.service.requests import NewCa, NewKey
from kmsgate.service.system import revoke_token_tree
from kmsgate.store import Store, sqlite_file

_ROOT_CHECK = b"kmsgate root key check"
_ROOT_WRAP_AAD = b"kmsgate/softkms/root-key/v1"

_log = logging.getLogger("kmsgate.bootstrap")


_ROOT_CHECK_META = "softkms.root_check"


def _check_root_key(store: Store, softkms: SoftKmsBackend) -> None:
    """Refuse to start with a root key other than the one the store was sealed under."""
    sealed = softkms.seal(_ROOT_CHECK, "__root_check__", 0).hex()
    stored = store.init_meta(_ROOT_CHECK_META, sealed)
    if not _seals(softkms, stored):
        raise ConfigError("the root key does not match the one this store was sealed with")


def _seals(softkms: SoftKmsBackend, stored: str) -> bool:
    """Whether `softkms`'s root key made the store's root check `stored`."""
    try:
        return softkms.unseal(bytes.fromhex(stored), "__root_check__", 0) == _ROOT_CHECK
    except (BackendError, ValueError):
        return False


def _stored_root_check(settings: Settings) -> str | None:
    """The root check of the store `settings` name, or None if it has none (an SQLite file
    not made yet, a store no gateway has started on). Raises ConfigError if the store
    cannot be opened."""
    url = settings.resolved_database_url()
    database = sqlite_file(url)
    if database is not None and not database.exists():
        return None
    store = Store(url)
    try:
        store.migrate()
        return store.get_meta(_ROOT_CHECK_META)
    finally:
        store.close()


def _root_kek(
    settings: Settings, others: dict[str, KeyBackend]
) -> tuple[RootKeyWrapper, BackendKey]:
    """The backend and key that wrap the root key (auto-unseal). Raises ConfigError."""
    wrap = settings.root_key_wrap
    assert wrap is not None
    backend = others.get(wrap.backend)
    if not isinstance(backend, RootKeyWrapper):
        raise ConfigError(f"root_key_wrap.backend {wrap.backend!r} cannot wrap the root key")
    try:
        return backend, backend.wrapping_key(wrap.kek)
    except KmsgateError as exc:
        raise ConfigError(f"root key wrapping key unavailable: {exc.detail}") from exc


def _root_key(settings: Settings, others: dict[str, KeyBackend]) -> bytes:
    """The softkms root key: from its file, or unwrapped by another backend. Raises ConfigError."""
    if settings.root_key_wrap is None:
        return read_root_key_file(settings.resolved_root_key_file())
    backend, kek = _root_kek(settings, others)
    try:
        return backend.unwrap(kek, settings.root_key_wrap.file.read_bytes(), _ROOT_WRAP_AAD)
    except OSError as exc:
        raise ConfigError(f"cannot read the wrapped root key: {exc.strerror}") from exc
    except KmsgateError as exc:
        raise ConfigError(f"cannot unwrap the root key: {exc.detail}") from exc


def init_wrapped_root_key(settings: Settings, existing: Path | None = None) -> Path:
    """Wrap a root key with `root_key_wrap`'s key and write it (0600): a new random one, or
    the one in the root key file `existing` (moving a store sealed with it to auto-unseal).

    Raises ConfigError if auto-unseal is not configured, the file exists or cannot be
    written (nothing is left behind), the store is sealed already and no `existing` key is
    given (a new key would not open it), or `existing` is not the key the store was sealed
    with (or not a private root key file).
    """
    wrap = settings.root_key_wrap
    if wrap is None:
        raise ConfigError("root_key_wrap is not configured")
    taken = ConfigError(f"{wrap.file} exists: refusing to replace a root key")
    if wrap.file.exists():  # before any backend or store is asked
        raise taken
    stored = _stored_root_check(settings)
    if existing is None:
        if stored is not None:
            raise ConfigError(
                "this store is sealed with a root key already: a new one would not open it; "
                "wrap that one with --from-file ROOT_KEY_FILE"
            )
        root_key = secrets.token_bytes(ROOT_KEY_BYTES)
    else:
        root_key = read_root_key_file(existing)
        if stored is not None and not _seals(SoftKmsBackend("local", root_key), stored):
            raise ConfigError(f"{existing} is not the root key this store was sealed with")
    others = _build_other_backends(settings)
    try:
        backend, kek = _root_kek(settings, others)
        blob = backend.wrap(kek, root_key, _ROOT_WRAP_AAD)
    finally:
        for backend_ in others.values():
            backend_.close()
    try:  # synced: for a new root key, this file is its only copy
        write_new(wrap.file, blob)
    except FileExistsError:  # made meanwhile
        raise taken from None
    except OSError as exc:  # nothing is left behind
        raise ConfigError(f"cannot write {wrap.file}: {exc.strerror}") from None
    return wrap.file


def _build_other_backends(settings: Settings) -> dict[str, KeyBackend]:
    backends = {
        name: backend_class(cfg.type).from_config(name, cfg)
        for name, cfg in settings.backends.items()
        if cfg.type != "softkms"
    }
    if settings.data_dir is not None:
        for backend in backends.values():
            backend.keep_state_in(settings.data_dir)
    return backends


def _build_backends(settings: Settings, store: Store) -> dict[str, KeyBackend]:
    """Every configured backend; softkms last, since its root key may need another one."""
    backends = _build_other_backends(settings)
    softkms_names = [n for n, cfg in settings.backends.items() if cfg.type == "softkms"]
    if softkms_names:
        root_key = _root_key(settings, backends)
        for name in softkms_names:
            softkms = SoftKmsBackend(name, root_key)
            _check_root_key(store, softkms)
            backends[name] = softkms
    return backends


def build_service(settings: Settings) -> Service:
    """Open the store (migrating it), the backends, the policy and the audit log.

    Raises ConfigError if anything is misconfigured (bad policy, wrong root key, ...).
    """
    settings.check_production()
    if settings.data_dir is not None:
        check_data_dir(settings.data_dir)
    _check_database_owner(settings.resolved_database_url())
    store = Store(settings.resolved_database_url())
    store.migrate()
    registry = Registry(_build_backends(settings, store), settings.default_backend)
    service = Service(
        settings=settings,
        store=store,
        catalogue=Catalogue(store),
        registry=registry,
        policy=PolicyEngine.load(settings.policy_dir),
        audit=FileSink(
            settings.resolved_audit_path(),
            fsync_interval=settings.audit_fsync_interval,
            replica=settings.resolved_replica_id(),
            reserve=settings.audit_reserve_bytes,
            anchors=store.audit_anchors.all(),
        ),
        tokens=TokenRegistry(store),
    )
    try:
        start_checkpoints(service)
        if not settings.dev:
            revoke_dev_root_tokens(service)
    except BaseException:
        service.close()
        raise
    return service


DEV_ROOT_TOKEN = "dev root token"  # noqa: S105 (a token's description, not a secret)
"""The description of the admin token `serve --dev` makes (`ensure_root_token`)."""


def revoke_dev_root_tokens(service: Service) -> None:
    """Outside dev mode, revoke the live tokens a dev gateway made as its root token
    (admin, no expiry, described `DEV_ROOT_TOKEN`), audited `token.revoke` by `system`:
    a data dir started in dev mode then served in production (its `root-token` file
    deleted, which production refuses) must not keep that admin token working. Raises
    AuditUnavailable, Unavailable."""
    for info in service.tokens.list():
        if not (
            info.description == DEV_ROOT_TOKEN
            and info.roles == ("admin",)
            and info.expires_at is None
            and info.revoked_at is None
        ):
            continue
        _log.warning("revoking token %s, a dev gateway's root token: not kept outside dev", info.id)
        resource = {"kind": "token", "name": info.id}
        call = Call(SYSTEM, Ctx("dev-root-token"), "token.revoke", resource)
        why = Decision(allow=True, reasons=("outside dev mode: a dev root token is revoked",))
        # another process of the gateway (a worker) may have revoked it a moment before
        with contextlib.suppress(NotFound):
            revoke = functools.partial(revoke_token_tree, service.tokens, info.id)
            service.gate.run(call, revoke, decision=why)


def start_checkpoints(service: Service) -> bool:
    """Have the audit sink sign checkpoints with `audit_checkpoint_key` and keep each in the
    store. True if started; False without the setting, or in dev mode while the key does
    not exist yet (`kmsgate serve --dev` creates it: `ensure_dev_audit_key`).

    Raises ConfigError if the key cannot sign checkpoints (unknown, wrong purpose,
    disabled), the chain file does not hold the store's last checkpoint of it (another
    gateway writes as this replica, or the file was cut or replaced), or a closed chain
    cannot be reopened (also for want of the setting); Unavailable if the store cannot be
    read.
    """
    settings, sink = service.settings, service.audit
    name = settings.audit_checkpoint_key
    if not isinstance(sink, FileSink):
        return False
    if name is None:
        if sink.closed_by is not None:  # a record after it would fail `audit verify`
            raise ConfigError(
                f"the audit log {sink.chain} ends with a final checkpoint signed by key "
                f"{sink.closed_by!r}: set audit_checkpoint_key (that key, or another of "
                "purpose audit) so that the gateway reopens the chain, or start a new log"
            )
        return False
    signer = CheckpointSigner(service.catalogue, service.registry, name)
    try:
        signer.check()
    except NotFound:
        if settings.dev:
            return False
        raise ConfigError(f"audit_checkpoint_key {name!r}: no such key") from None
    except KmsgateError as exc:
        raise ConfigError(f"audit_checkpoint_key {name!r}: {exc.detail}") from exc
    policy = CheckpointPolicy(
        sign=signer,
        every_records=settings.audit_checkpoint_records,
        every_seconds=settings.audit_checkpoint_seconds,
        anchor=service.store.audit_anchors.save,
    )
    stored = service.store.audit_anchors.find(settings.resolved_replica_id(), sink.chain.name)
    sink.start_checkpoints(policy, stored)
    return True


def prepare_dev_data_dir(settings: Settings) -> None:
    """Create the dev data dir (0700) and its root key (0600) on first run. Raises
    ConfigError for a data dir that is not the gateway's own (`check_data_dir`)."""
    assert settings.dev and settings.data_dir is not None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    check_data_dir(settings.data_dir)
    try:
        os.chmod(settings.data_dir, 0o700)
    except OSError as exc:  # root's, and this user may write in it through its group
        raise ConfigError(
            f"cannot make the dev data dir {settings.data_dir} private (0700): {exc.strerror}; "
            "use a directory of your own"
        ) from None
    root_key = settings.resolved_root_key_file()
    if not root_key.exists():
        create_root_key_file(root_key)


def check_data_dir(data_dir: Path) -> None:
    """Raises ConfigError if the existing `data_dir` belongs to another user than the
    gateway's (or root), or every user may write in it: whoever made it could read or
    replace the root key, the store and the audit log (a dev data dir under /tmp made
    beforehand by another user)."""
    try:
        st = data_dir.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot read the data dir {data_dir}: {exc.strerror}") from None
    problem = foreign_owner(st)
    if problem is None and st.st_mode & stat.S_IWOTH:
        problem = "is writable by every user"
    if problem is not None:
        raise ConfigError(
            f"the data dir {data_dir} {problem}: use a directory of the gateway's user "
            f"(mkdir -m 700 DIR)"
        )


def _check_database_owner(url: str) -> None:
    """Raises ConfigError if the SQLite database file of `url` exists and belongs to another
    user than the gateway's (or root): made beforehand, it would let that user read what the
    gateway writes (SQLite gives its -wal and -shm files the database file's owner). A
    read-only check of a store (`audit verify`) does not come here."""
    database = sqlite_file(url)
    if database is None:
        return
    try:
        problem = foreign_owner(database.stat())
    except OSError:  # not made yet, or SQLite will say what is wrong
        return
    if problem is not None:
        raise ConfigError(f"the database {database} {problem}")


def bootstrap_token(settings: Settings, roles: list[str], description: str) -> str:
    """Create a token directly in the store (first admin of a production gateway), audited
    as the local operator. Raises ConfigError, InvalidRequest, AuditUnavailable."""
    operator = Principal(id=f"local:{getpass.getuser()}", kind="local", roles=())
    service = build_service(settings)
    try:
        why = "a local operator with the gateway's config makes a token"
        return _token_without_policy(service, operator, "cli", roles, description, why)
    finally:
        service.close()


def _token_without_policy(
    service: Service,
    principal: Principal,
    request_id: str,
    roles: list[str],
    description: str,
    why: str,
) -> str:
    """A token made outside the API, where no caller's request goes to the policy: audited
    `token.bootstrap` by `principal` with the fixed reason `why` (recorded before the token
    exists, and its outcome after). Raises InvalidRequest, AuditUnavailable."""

    def create(outcome: Outcome) -> str:
        info, token = service.tokens.create(
            roles, ttl=None, description=description, created_by=principal.id
        )
        outcome.detail.update(token_id=info.id, roles=list(info.roles))
        return token

    call = Call(principal, Ctx(request_id), "token.bootstrap", {"kind": "token"}, {"roles": roles})
    return service.gate.run(call, create, decision=Decision(allow=True, reasons=(why,)))


def ensure_root_token(service: Service, data_dir: Path) -> str | None:
    """Prepare a dev gateway's service: its audit checkpoint key (`ensure_dev_audit_key`),
    its dev CA (`ensure_dev_ca`) and, on the first run, an `admin` token written to
    `data_dir/root-token` (0600) and returned; None if the file already exists. Raises
    ConfigError if the audit key or the dev CA cannot be set up."""
    ensure_dev_audit_key(service)
    ensure_dev_ca(service, data_dir)
    path = data_dir / ROOT_TOKEN_FILE
    if path.exists():
        return None
    why = "dev mode: the gateway makes its root token"
    token = _token_without_policy(service, SYSTEM, "dev-root-token", ["admin"], DEV_ROOT_TOKEN, why)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def stale_root_token(service: Service, data_dir: Path) -> str | None:
    """Why the token in a dev gateway's `root-token` file no longer works (revoked, expired,
    unreadable), or None: a restart would otherwise point at a file whose token gets 401."""
    path = data_dir / ROOT_TOKEN_FILE
    try:
        token = path.read_text(encoding="utf-8").strip()
        service.tokens.authenticate(Credentials(bearer=token))
    except (OSError, UnicodeDecodeError):
        return f"{path} cannot be read"
    except Unauthenticated:
        return (
            f"the token in {path} is revoked or expired: remove the file and restart for a new one"
        )
    return None


_DEV_AUDIT_DECISION = Decision(
    allow=True, reasons=("dev mode: the gateway makes its audit checkpoint key",)
)


def ensure_dev_audit_key(service: Service) -> bool:
    """Dev mode: unless it exists, create the key `audit_checkpoint_key` (ecdsa-p256,
    purpose `audit`, on the default backend) as SYSTEM with a fixed allow decision, then
    start the audit checkpoints. True if it created the key.

    Raises ConfigError if the key cannot be created or checkpoints cannot start.
    """
    name = service.settings.audit_checkpoint_key
    if name is None or service.catalogue.find(name) is not None:
        return False
    new = NewKey(
        name=name,
        type="ecdsa-p256",
        purpose=AUDIT_PURPOSE,
        backend=service.settings.default_backend,
        labels={},
    )
    try:
        service.keys.create(
            SYSTEM, Ctx(request_id="dev-audit-setup"), new, decision=_DEV_AUDIT_DECISION
        )
    except KmsgateError as exc:
        raise ConfigError(f"cannot create the dev audit key: {exc.detail}") from exc
    start_checkpoints(service)
    return True


DEV_CA = "dev"
DEV_ROOT_KEY_FILE = "dev-root-key.pem"
DEV_ROOT_PASSPHRASE_FILE = "dev-root-key.passphrase"  # noqa: S105 (a file name)
DEV_ROOT_CERT_FILE = "dev-root.pem"
DEV_ROOT_SUBJECT = "CN=kmsgate dev root (DEV ONLY - not for production)"
DEV_CA_SUBJECT = "CN=kmsgate dev intermediate (DEV ONLY - not for production)"
DEV_CA_DAYS = 5 * 365
_DEV_CA_DECISION = Decision(allow=True, reasons=("dev mode: the gateway makes its dev CA",))


def ensure_dev_ca(service: Service, data_dir: Path) -> bool:
    """Dev mode: unless CA `dev` is active, make the dev root in `data_dir` (unless there is
    one), create the intermediate `dev` (ecdsa-p256 on the default backend) as SYSTEM with a
    fixed allow decision, sign its CSR with the dev root and import it. True if it set
    anything up. Idempotent: a start interrupted half-way is finished by the next one.

    The root's key stays in `data_dir` for convenience only: the gateway never uses it again.
    Raises ConfigError if a step fails.
    """
    ca = service.pki.authorities.find(DEV_CA)
    if ca is not None and ca.state is CaState.ACTIVE:
        return False
    ctx = Ctx(request_id="dev-ca-setup")
    try:
        root_key, root_cert = _dev_root(data_dir)
        if ca is None:
            new = NewCa(DEV_CA, DEV_CA_SUBJECT, "ecdsa-p256", service.settings.default_backend)
            ca = service.pki.create_ca(SYSTEM, ctx, new, decision=_DEV_CA_DECISION)
        csr = x509.load_pem_x509_csr((ca.csr_pem or "").encode())
        cert = sign_intermediate(root_key, root_cert, csr, days=DEV_CA_DAYS)
        service.pki.import_certificate(
            SYSTEM, ctx, DEV_CA, cert, [root_cert], decision=_DEV_CA_DECISION
        )
    except KmsgateError as exc:
        raise ConfigError(f"cannot set up the dev CA: {exc.detail}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot set up the dev CA: {exc}") from exc
    return True


def _dev_root(data_dir: Path) -> tuple[RootKey, x509.Certificate]:
    """The dev root's key and certificate, made on first use: the key encrypted under a
    random passphrase kept beside it (both 0600). Raises OSError, ValueError, KmsgateError."""
    key_file = data_dir / DEV_ROOT_KEY_FILE
    passphrase_file = data_dir / DEV_ROOT_PASSPHRASE_FILE
    cert_file = data_dir / DEV_ROOT_CERT_FILE
    if cert_file.exists():
        root_key = load_root(key_file, passphrase_file.read_bytes())
        return root_key, x509.load_pem_x509_certificate(cert_file.read_bytes())
    for stale in (key_file, passphrase_file):  # left by a start stopped before the certificate
        stale.unlink(missing_ok=True)
    passphrase = secrets.token_urlsafe(32).encode()
    write_private_file(passphrase_file, passphrase)
    root_key, cert = init_root(key_file, passphrase, DEV_ROOT_SUBJECT)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return root_key, cert
