"""Use cases: revocation as relying parties see it. Every active CA publishes a full and a
delta CRL and answers OCSP through a delegated responder; both are public (no token).

- **One builder.** CRLs are built only by the jobs leader (`publish_due`, ticked every
  `cache_refresh_seconds` by the refresher, see jobs.py), stored in the database (`crls`) and
  served from memory by every worker and replica, which follow the "crls" change feed.
- **When a CA is due.** It has no CRL yet; less than half of its CRL's validity is left; or
  it has had a revocation: when the "certs" feed moved, the CA's number of revoked
  certificates differs from the number its full CRL lists (a revocation is never undone, so
  the number only grows). Every revocation committed before a tick makes one build.
- **Large CRLs apart.** A full CRL of `APART_FROM` entries or more is built in a child
  process (`kmsgate.pki.crl_apart`; the CA key stays here and signs what it is sent), once
  that child is up: cryptography's encoder holds the interpreter lock for the whole CRL, and
  OCSP answers would wait behind it.
- **Full and delta.** A build publishes a full CRL N (every revoked certificate) and a delta
  CRL N+1 whose base is the previous full CRL and which lists what that one did not: a client
  holding the previous full CRL catches up with the small delta. (The first delta, and one
  that would list more than `DELTA_MAX_ENTRIES`, starts from N itself and is empty.)
- **OCSP.** Answers are signed by a responder certificate the CA issued (id-kp-OCSPSigning,
  nocheck) for a key of purpose `ocsp` on the `local` (softkms) backend, so a CA on an HSM
  signs once per responder, not per answer. The first OCSP request to a CA makes them (the
  certificate is recorded in the inventory, profile `ocsp-responder`, owner `system`); the
  leader renews the certificate at half-life; a revoked responder certificate is retired
  (the next request rotates the key and certifies the new version). An answer without a
  nonce is signed once and cached per serial until the certificate changes (the "certs"
  feed), its responder is revoked or it reaches half its validity; a nonce gets a fresh
  answer echoing it. A cached answer reads no database. Answers are not audited (public and
  frequent); builds and responder certificates are, as principal `system`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from kmsgate.auth import SYSTEM
from kmsgate.catalogue import Key
from kmsgate.errors import ConcurrentChange, Conflict, KmsgateError, NotFound, Unavailable
from kmsgate.pki import crl_apart
from kmsgate.pki.authorities import OCSP_PURPOSE, Authority, CaState, CaType
from kmsgate.pki.constraints import refuse_outside_constraints
from kmsgate.pki.crl import RevokedEntry, build_crl
from kmsgate.pki.crl_apart import APART_FROM, build_crl_apart
from kmsgate.pki.inventory import record_of, record_row
from kmsgate.pki.issuer import build_certificate, new_serial, serial_hex, signature_hash, validity
from kmsgate.pki.ocsp import (
    MalformedOcspRequest,
    Responder,
    build_response,
    issuer_matches,
    malformed_response,
    parse_request,
    request_nonce,
    try_later_response,
    unauthorized_response,
)
from kmsgate.pki.revocation import (
    CRL_VALIDITY,
    OCSP_VALIDITY,
    RESPONDER_PROFILE,
    RESPONDER_VALIDITY,
    Answer,
    CrlEntries,
    Document,
    OcspAnswers,
    PublishedDocuments,
    cert_status,
    listed_serials,
    past_half,
    responder_extensions,
    responder_key_name,
    responder_subject,
    responders_of_key,
)
from kmsgate.policy import Decision
from kmsgate.service.gate import Call, Ctx, Gate, Outcome, now
from kmsgate.service.pki import Pki
from kmsgate.service.requests import NewKey
from kmsgate.store import Store
from kmsgate.store.certificates import REVOKED
from kmsgate.store.crls import DELTA, FULL, RESPONDER

log = logging.getLogger("kmsgate.revocation")

RESPONDER_BACKEND = "local"
RESPONDER_KEY_TYPE = "ecdsa-p256"
DELTA_MAX_ENTRIES = 10_000
"""Beyond this many new revocations, a delta CRL starts from its own full CRL (and is empty):
relying parties fetch the full CRL, a delta that large saves them little."""
BUILD_SWITCH_INTERVAL = 0.0005
"""The GIL switch interval while a CRL is built (seconds; Python's default is 0.005)."""
RETRY_SECONDS = 30.0
"""How long a CA whose build failed waits before the next attempt."""
RESPONDER_RETRY = 5.0
"""How long a process whose attempt to make a CA's responder failed answers tryLater
before it tries (and audits an attempt) again: anonymous requests cannot fill the log."""

_PUBLISHING = Decision(allow=True, reasons=("revocation publishing by the gateway",))


class Revocation:
    """CRLs and OCSP of the active CAs (kmsgate-type CAs, whose key the gateway holds)."""

    def __init__(self, gate: Gate, pki: Pki, store: Store) -> None:
        self.gate = gate
        self.pki = pki
        self.store = store
        self.published = PublishedDocuments(store)
        self.answers = OcspAnswers(store)
        self._publishing = threading.Lock()
        self._provisioning = threading.Lock()
        self._certs_epoch = -1
        self._retry_at: dict[str, float] = {}
        self._responder_retry_at: dict[str, float] = {}  # CA -> no new responder before
        self._responders: dict[str, tuple[Responder, int]] = {}
        """CA -> its checked OCSP responder, and the count of its certificate's changes
        when it was checked (`OcspAnswers.watch`)."""
        self._serving: dict[str, Authority] = {}  # served CAs asked about (OCSP, CRL)
        self._listed: dict[str, tuple[int, frozenset[int]]] = {}  # CA -> full CRL's serials
        self._entries: dict[str, CrlEntries] = {}  # CA -> its entries, from build to build

    def refresh(self) -> None:
        """Follow the other processes: published documents, and changed certificates (whose
        cached OCSP answers are dropped). Raises Unavailable."""
        self.published.refresh()
        self.answers.refresh()

    def oldest_crl_age(self) -> float:
        """Seconds since the oldest current full CRL of the CAs the gateway publishes for
        was built (0 when none is published yet): for /metrics."""
        at = now()
        ages = [
            (at - published.full.this_update).total_seconds()
            for ca in self.pki.authorities.all()
            if _serves(ca)
            and (published := self.published.find(ca.name, read_through=False)) is not None
            and published.full is not None
        ]
        return max(ages, default=0.0)

    # -- relying parties (public) ----------------------------------------------------------

    def crl(self, ca_name: str, *, delta: bool = False) -> bytes:
        """The DER of the CA's current full (or delta) CRL. Raises NotFound (no such CA, or
        one whose key the gateway does not hold), Conflict (pending), Unavailable (not built
        yet: the next tick builds it)."""
        ca = self.pki.authorities.get(ca_name)
        ca.active_certificate()
        if ca.type is CaType.HASHIVAULT_PKI:  # Vault publishes its own CRLs
            return self.pki.engine(ca).crl(delta=delta)
        if not _serves(ca):
            raise NotFound(f"CA {ca_name!r} publishes no CRL through the gateway")
        self._serving[ca.name] = ca
        der = self._published_crl(ca_name, delta=delta, read_through=True)
        if der is None:
            raise Unavailable(f"CA {ca_name!r} has no CRL yet; retry shortly", retry_after=2)
        return der

    def crl_from_memory(self, ca_name: str, *, delta: bool = False) -> bytes | None:
        """`crl`'s answer if memory alone gives it (a CA asked about before whose CRL this
        process holds), else None: then call `crl`, off the event loop. Never raises."""
        if ca_name not in self._serving:
            return None
        return self._published_crl(ca_name, delta=delta, read_through=False)

    def _published_crl(self, ca_name: str, *, delta: bool, read_through: bool) -> bytes | None:
        """The DER of the CA's current full (or delta) CRL, None before the first build.
        Raises Unavailable (a read-through while the store is down)."""
        published = self.published.find(ca_name, read_through=read_through)
        document = (published.delta if delta else published.full) if published else None
        return document.der if document is not None else None

    def ocsp(self, ctx: Ctx, ca_name: str, der: bytes) -> bytes:
        """The DER OCSPResponse to the request `der` about a certificate of CA `ca_name`:
        malformedRequest, unauthorized (another issuer, a CA that is not active), tryLater
        (too many uncached serials), or a signed good / revoked / unknown answer. May read
        the store and, for the CA's first responder, sign with the CA's key; tryLater
        (logged) while no responder can sign (one is being made, by another process too; the
        store or the key's backend is away). Raises NotFound (no such CA)."""
        ca = self.pki.authorities.find(ca_name)
        if ca is None:
            raise NotFound(f"no CA named {ca_name!r}")
        if ca.type is CaType.HASHIVAULT_PKI:  # Vault answers for the certificates it signs
            return self._vault_ocsp(ca, der)
        if _serves(ca):
            self._serving[ca.name] = ca
        try:
            answer = self._respond(ctx, ca, der, memory_only=False)
        except KmsgateError:  # an OCSP client understands tryLater, not a problem
            return try_later_response()
        assert answer is not None  # only memory_only gives up
        return answer

    def _vault_ocsp(self, ca: Authority, der: bytes) -> bytes:
        """Vault's answer to a well-formed request; malformedRequest for another, as the
        gateway answers for its own CAs; tryLater (logged) when Vault cannot answer."""
        try:
            parse_request(der)
        except MalformedOcspRequest:
            return malformed_response()
        try:
            return self.pki.engine(ca).ocsp(der)
        except KmsgateError as exc:
            log.warning("OCSP for Vault CA %s: %s", ca.name, exc.code)
            return try_later_response()

    def ocsp_from_memory(self, ca_name: str, der: bytes) -> bytes | None:
        """`ocsp`'s answer if memory alone gives it (a CA answered for before, a cached
        status and a ready responder, whose softkms key signs in-process), else None: then
        call `ocsp`, off the event loop. Raises what signing with the responder raises."""
        ca = self._serving.get(ca_name)
        if ca is None:
            return None
        return self._respond(Ctx("ocsp"), ca, der, memory_only=True)

    # -- the jobs leader -------------------------------------------------------------------

    def publish_due(self, ctx: Ctx, at: datetime | None = None) -> list[str]:
        """Build and publish the CRLs of every active CA that is due (see the module's
        docstring) and renew responder certificates (made by the first OCSP request) at
        half-life. Returns the CAs whose CRLs were built. A CA that fails is logged and tried
        again after `RETRY_SECONDS`. Raises Unavailable if the store is down."""
        at = at or now()
        built: list[str] = []
        with self._publishing:
            epoch = self.store.feed.epoch_now("certs")
            moved, self._certs_epoch = epoch != self._certs_epoch, epoch
            for ca in self.pki.authorities.all():
                if not _serves(ca) or time.monotonic() < self._retry_at.get(ca.name, 0.0):
                    continue
                try:
                    trigger = self._trigger(ca, at, recheck=moved or ca.name in self._retry_at)
                    if trigger is not None:
                        self.build(ctx, ca, trigger, at)
                        built.append(ca.name)
                    published = self.published.find(ca.name, read_through=False)
                    responder = published.responder if published else None
                    if responder is not None and past_half(
                        responder.not_valid_before_utc, responder.not_valid_after_utc, at
                    ):
                        with self._provisioning:
                            self._provision_responder(ctx, ca, at)
                    self._retry_at.pop(ca.name, None)
                except Exception as exc:  # one CA's failure must not hold up the others
                    why = (
                        f"{exc.code}: {exc.detail}"
                        if isinstance(exc, KmsgateError)
                        else type(exc).__name__  # its text could be anything: logged by type
                    )
                    log.warning("revocation publishing for CA %s failed: %s", ca.name, why)
                    self._retry_at[ca.name] = time.monotonic() + RETRY_SECONDS
        return built

    def build(self, ctx: Ctx, ca: Authority, trigger: str, at: datetime | None = None) -> None:
        """Build and publish the CA's full and delta CRLs now (audited as `crl.build` by
        `system`). Raises Conflict (CA not active) and what the CA key's backend raises."""
        at = at or now()

        def build(outcome: Outcome) -> None:
            started = time.perf_counter()
            issuer = ca.active_certificate()
            signer = self.pki.signing_key(self.gate.catalogue.get(ca.key_name or ""))
            hash_alg = signature_hash(issuer.public_key())
            made = self._entries.setdefault(ca.name, CrlEntries())
            entries = made.of(self.store.crls.revoked(ca.name))
            number = self.store.cas.next_crl_number(ca.name)
            delta_number = self.store.cas.next_crl_number(ca.name)
            base_number, news = self._delta(ca, entries, number)
            next_update = at + CRL_VALIDITY
            public_url = self.pki.public_url
            freshest = f"{public_url}/v1/pki/cas/{ca.name}/crl?delta=1" if public_url else None

            def crl(builder: Callable[..., bytes], **fields: Any) -> bytes:
                return builder(
                    issuer=issuer,
                    key=signer,
                    this_update=at,
                    next_update=next_update,
                    hash_alg=hash_alg,
                    **fields,
                )

            # a large CRL is built in a child process, once it is up (see crl_apart)
            apart = len(entries) >= APART_FROM and crl_apart.ready()
            full = crl(
                build_crl_apart if apart else build_crl,
                revoked=entries,
                number=number,
                freshest_url=freshest,
            )
            delta = crl(build_crl, revoked=news, number=delta_number, delta_base=base_number)
            self.published.publish(
                ca.name,
                [
                    Document(FULL, full, at, next_update, len(entries), number),
                    Document(DELTA, delta, at, next_update, len(news), delta_number, base_number),
                ],
            )
            outcome.detail.update(
                number=number,
                entries=len(entries),
                delta_number=delta_number,
                delta=len(news),
                seconds=round(time.perf_counter() - started, 3),  # read, build, sign, store
            )

        call = Call(SYSTEM, ctx, "crl.build", ca.policy_resource(), {"trigger": trigger})
        with _yielding_to_requests():
            self.gate.run(call, build, decision=_PUBLISHING)

    # -- helpers ---------------------------------------------------------------------------

    def _delta(
        self, ca: Authority, entries: list[RevokedEntry], number: int
    ) -> tuple[int, list[RevokedEntry]]:
        """The base number and the entries of the delta CRL built with full CRL `number`
        (which lists `entries`): the previous full CRL and what it did not list, or, when
        there is none or it missed more than `DELTA_MAX_ENTRIES`, the new full CRL itself and
        nothing. Remembers what full CRL `number` lists, for the next build."""
        published = self.published.find(ca.name, read_through=False)
        base = published.full if published else None
        if base is None or base.number is None:
            return number, []
        remembered = self._listed.get(ca.name)
        if remembered is not None and remembered[0] == base.number:
            listed = remembered[1]
        else:  # another process built it: read it (~0.1 s for 100,000 entries)
            listed = listed_serials(base.der)
        self._listed[ca.name] = (number, frozenset(entry.serial for entry in entries))
        news = [entry for entry in entries if entry.serial not in listed]
        if len(news) > DELTA_MAX_ENTRIES:
            return number, []
        return base.number, news

    def _respond(self, ctx: Ctx, ca: Authority, der: bytes, *, memory_only: bool) -> bytes | None:
        """`ocsp`'s answer; with `memory_only`, None where the store or a new responder
        would be needed."""
        try:
            request = parse_request(der)
        except MalformedOcspRequest:
            return malformed_response()
        issuer = ca.certificate
        if not _serves(ca) or issuer is None or not issuer_matches(request, issuer):
            return unauthorized_response()
        serial = request.serial_number
        cert_id_hash = request.hash_algorithm.name
        with_nonce = request_nonce(request) is not None
        at = now()
        cached, epoch = self.answers.get(serial, ca.name, cert_id_hash)
        if cached is not None and not with_nonce and cached.der and at < cached.refresh_at:
            return cached.der  # a revoked responder's answers are dropped (OcspAnswers)
        status = cached.status if cached is not None else None
        if status is None:
            if memory_only:
                return None
            if not self.answers.take_miss():
                return try_later_response()
            status = cert_status(self.store.certs.get(serial_hex(serial)), ca.name)
        responder = self._current_responder(ca, at, memory_only=True)
        if responder is None:
            if memory_only:
                return None
            responder = self._responder(ctx, ca, at)
        next_update = min(at + OCSP_VALIDITY, responder.certificate.not_valid_after_utc)
        answer = build_response(
            request=request,
            responder=responder,
            status=status,
            this_update=at,
            next_update=next_update,
            include_nonce=with_nonce,
        )
        if not with_nonce:
            refresh_at = at + (next_update - at) / 2
            self.answers.put(
                serial, ca.name, cert_id_hash, Answer(status, answer, refresh_at), epoch
            )
        elif cached is None:
            self.answers.put(serial, ca.name, cert_id_hash, Answer(status), epoch)
        return answer

    def _trigger(self, ca: Authority, at: datetime, *, recheck: bool) -> str | None:
        """Why the CA's CRLs are due (`initial`, `schedule`, `revocation`), or None. With
        `recheck`, counts its revoked certificates (one query). Raises Unavailable."""
        published = self.published.find(ca.name, read_through=False)
        full = published.full if published else None
        if full is None:
            return "initial"
        if past_half(full.this_update, full.next_update, at):
            return "schedule"
        if recheck and self.store.crls.revoked_count(ca.name) != full.entries:
            return "revocation"
        return None

    def _responder(self, ctx: Ctx, ca: Authority, at: datetime) -> Responder:
        """The CA's responder certificate and key; made now if there is none that is valid
        (audited as `ocsp.responder`). Raises Unavailable, Conflict, a backend error."""
        current = self._current_responder(ca, at)
        if current is not None:
            return current
        if time.monotonic() < self._responder_retry_at.get(ca.name, 0.0):
            raise Unavailable(f"CA {ca.name!r} could not make an OCSP responder; retry later")
        with self._provisioning:
            self.published.fetch(ca.name)  # another process may have made one
            current = self._current_responder(ca, at)
            if current is None:
                try:
                    self._provision_responder(ctx, ca, at)
                except ConcurrentChange:  # another process published one first: use it
                    self.published.fetch(ca.name)
                except KmsgateError as exc:  # tried again (and audited) once a while
                    log.warning("OCSP responder for CA %s: %s", ca.name, exc.code)
                    self._responder_retry_at[ca.name] = time.monotonic() + RESPONDER_RETRY
                    raise
                current = self._current_responder(ca, at)
        if current is None:
            raise Unavailable(f"CA {ca.name!r} has no OCSP responder yet; retry shortly")
        return current

    def _current_responder(
        self, ca: Authority, at: datetime, *, memory_only: bool = False
    ) -> Responder | None:
        """The published responder certificate, if still valid, with a signer for its key
        (made and checked once per certificate, and again once the certificate changed in
        the inventory, unless `memory_only`); None if there is none, its key has moved on or
        it was revoked. Raises InvalidRequest (a responder certificate the CA did not
        issue), Unavailable."""
        published = self.published.find(ca.name, read_through=False)
        certificate = published.responder if published else None
        if certificate is None or certificate.not_valid_after_utc <= at:
            return None
        checked = self._responders.get(ca.name)
        serial = certificate.serial_number
        if (
            checked is not None
            and checked[0].certificate == certificate
            and not self.answers.changed_after(serial, checked[1])
        ):
            return checked[0]
        if memory_only:
            return None
        # the store's key, not this process's copy: another may have rotated it and
        # certified the new version, which this copy would not match
        key = self.gate.catalogue.find_current(responder_key_name(ca.name), change=False)
        if key is None:
            return None
        signer = self.pki.signing_key(key)
        if signer.public_key() != certificate.public_key():
            return None  # the key was rotated: a new certificate is due
        seen = self.answers.watch(serial)  # before the read: a later revocation counts
        if self.answers.revoked(serial_hex(serial)):
            self._responders.pop(ca.name, None)
            return None  # a new key and certificate are due
        responder = Responder.checked(ca.active_certificate(), certificate, signer)
        self._responders[ca.name] = (responder, seen)
        return responder

    def _provision_responder(self, ctx: Ctx, ca: Authority, at: datetime) -> None:
        """Issue (and publish) a responder certificate for the CA's `ocsp` key, creating the
        key on the first call, in place of the responder this process saw published.
        Audited as `ocsp.responder` by `system`. Raises Conflict (CA not active, the key of a
        revoked responder, another process published a responder first: then nothing is
        stored), InvalidRequest (CA expired) and what the backends raise."""
        published = self.published.find(ca.name, read_through=False)
        replacing = published.responder if published else None
        self._rotate_revoked_responder_key(ctx, ca)

        def provision(outcome: Outcome) -> None:
            issuer = ca.active_certificate()
            key = self._responder_key(ca)
            public_key = key.versions[key.primary_version].public_key()
            made_here = key.backend == RESPONDER_BACKEND and not any(
                version.adopted for version in key.versions.values()
            )  # a key made before such names were the PKI's may sit anywhere
            if not (
                key.purpose == OCSP_PURPOSE
                and made_here
                and isinstance(public_key, ec.EllipticCurvePublicKey)
            ):
                raise Conflict(f"key {key.name!r} exists and is not an OCSP responder key")
            if self._revoked_responder(ca, public_key) is not None:  # rotated elsewhere since
                raise Conflict(f"key {key.name!r} is a revoked responder's: retry")
            not_before, not_after = validity(issuer, RESPONDER_VALIDITY, at)
            subject = responder_subject(ca.name, issuer)
            refuse_outside_constraints(subject, (), (issuer, *ca.chain))
            ca_key = self.pki.signing_key(self.gate.catalogue.get(ca.key_name or ""))
            certificate = build_certificate(
                issuer=issuer,
                key=ca_key,
                subject=subject,
                public_key=public_key,
                serial=new_serial(),
                not_before=not_before,
                not_after=not_after,
                extensions=responder_extensions(public_key, issuer),
            )
            record = record_of(
                certificate,
                ca=ca.name,
                profile=RESPONDER_PROFILE,
                key_type=RESPONDER_KEY_TYPE,
                owner=SYSTEM.id,
            )
            der = certificate.public_bytes(serialization.Encoding.DER)
            document = Document(RESPONDER, der, not_before, not_after)
            self.published.publish_responder(
                ca.name, document, record_row(record), replacing=replacing
            )
            outcome.detail.update(serial=record.serial, key=key.name, not_after=str(not_after))
            if self._revoked_responder(ca, public_key) is not None:  # revoked while signing
                self.store.certs.revoke(record.serial, now(), "keyCompromise")
                outcome.detail["revoked"] = True
                raise Conflict(f"key {key.name!r} was revoked meanwhile: retry")

        call = Call(SYSTEM, ctx, "ocsp.responder", ca.policy_resource())
        self.gate.run(call, provision, decision=_PUBLISHING)

    def _rotate_revoked_responder_key(self, ctx: Ctx, ca: Authority) -> None:
        """Rotate the CA's responder key (audited `key.rotate` by `system`) if its current
        version is the key of one of the CA's revoked responder certificates: a revoked
        responder's key is never certified again. The key and the revoked certificates are
        read from the store (another process may have rotated or revoked since this one's
        copies). Raises Unavailable, Conflict (rotated elsewhere meanwhile), and what the
        backend raises."""
        key = self.gate.catalogue.find_current(responder_key_name(ca.name), change=True)
        if key is None:
            return
        revoked = self._revoked_responder(ca, key.versions[key.primary_version].public_key())
        if revoked is not None:
            self.pki.keys.rotate_as_system(ctx, key, {"responder_revoked": revoked})

    def _revoked_responder(self, ca: Authority, public_key: PublicKeyTypes | None) -> str | None:
        """The serial of a revoked responder certificate of `ca` for `public_key`, else
        None. Raises Unavailable."""
        revoked = responders_of_key(self.store, ca.name, public_key, REVOKED)
        return revoked[0] if revoked else None

    def _responder_key(self, ca: Authority) -> Key:
        """The CA's responder key as the store holds it, generated if it does not exist
        (another process may win that race: its key is then used). Raises Unavailable and
        what the backend raises."""
        name = responder_key_name(ca.name)
        key = self.gate.catalogue.find_current(name, change=True)
        if key is not None:
            return key
        new = NewKey(
            name=name,
            purpose=OCSP_PURPOSE,
            type=RESPONDER_KEY_TYPE,
            backend=RESPONDER_BACKEND,
            labels={"ca": ca.name},
        )
        try:
            return self.pki.keys.generate(new)
        except Conflict:
            return self.gate.catalogue.get(name)


@contextlib.contextmanager
def _yielding_to_requests() -> Iterator[None]:
    """Run a CRL build in the background without stalling this process's OCSP answers: the
    interpreter hands the GIL over every `BUILD_SWITCH_INTERVAL` (not 5 ms), and cyclic
    garbage collection pauses (a build makes a few hundred thousand objects, none in cycles;
    full collections over them held the GIL for up to 300 ms). Both settings are the
    process's; they are restored afterwards."""
    was_enabled, interval = gc.isenabled(), sys.getswitchinterval()
    gc.disable()
    sys.setswitchinterval(min(interval, BUILD_SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        if was_enabled:
            gc.enable()


def _serves(ca: Authority) -> bool:
    """Whether the gateway publishes revocation for the CA: active, with a key it holds."""
    return ca.state is CaState.ACTIVE and ca.type is CaType.KMSGATE and ca.key_name is not None
