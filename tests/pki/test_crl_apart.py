"""Large CRLs built in a child process (kmsgate.pki.crl_apart): the same CRL as in-process,
signed by the parent's key, with every failure brought back to the caller."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from kmsgate.algorithms import KeyType
from kmsgate.backends.base import KeySpec
from kmsgate.backends.softkms import SoftKmsBackend
from kmsgate.errors import BackendError, BackendUnavailable, InvalidRequest
from kmsgate.pki import crl_apart
from kmsgate.pki.crl import RevokedEntry, build_crl
from kmsgate.pki.remote_key import RemotePrivateKey, remote_private_key
from tests.pki.ceremony import ca_key_usage

NOW = datetime.now(UTC).replace(microsecond=0)
FLAGS = [x509.ReasonFlags.key_compromise, x509.ReasonFlags.superseded, None]


class Flaky(SoftKmsBackend):
    """softkms that refuses to sign while `down`, and runs `before_signing` first."""

    down = False
    before_signing = staticmethod(lambda: None)

    def sign(self, key, data, alg, *, prehashed):
        self.before_signing()
        if self.down:
            raise BackendUnavailable("backend 'local' is unreachable")
        return super().sign(key, data, alg, prehashed=prehashed)


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, RemotePrivateKey, Flaky, list[int]]:
    backend = Flaky("local", os.urandom(32))
    held = backend.create_key(KeySpec("ca", 1, KeyType.ECDSA_P256, {}))
    assert held.public_key_pem is not None
    public = serialization.load_pem_public_key(held.public_key_pem.encode())
    signed: list[int] = []
    key = remote_private_key(backend, held, public, on_sign=lambda: signed.append(1))
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "apart CA")])
    issuer = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=9))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ca_key_usage(digital_signature=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return issuer, key, backend, signed


def fields(ca, entries, **extra):
    issuer, key, _, _ = ca
    return {
        "issuer": issuer,
        "key": key,
        "revoked": entries,
        "number": 7,
        "this_update": NOW,
        "next_update": NOW + timedelta(days=1),
        "hash_alg": hashes.SHA256(),
        **extra,
    }


def entries(count: int) -> list[RevokedEntry]:
    return [
        RevokedEntry((1 << 150) + n, NOW - timedelta(seconds=n), FLAGS[n % 3]) for n in range(count)
    ]


def test_the_child_builds_the_crl_the_parent_would_and_the_parent_signs_it(ca):
    issuer, _, _, signed = ca
    listed = entries(300)
    url = "https://pki.example/v1/pki/cas/apart/crl?delta=1"
    here = build_crl(**fields(ca, listed, freshest_url=url))
    before = len(signed)
    apart = crl_apart.build_crl_apart(**fields(ca, listed, freshest_url=url))
    assert len(signed) == before + 1  # one signature, made in this process by the real key
    ours, theirs = x509.load_der_x509_crl(here), x509.load_der_x509_crl(apart)
    assert theirs.tbs_certlist_bytes == ours.tbs_certlist_bytes
    assert theirs.is_signature_valid(issuer.public_key())
    delta = crl_apart.build_crl_apart(**fields(ca, listed[:2], number=8, delta_base=7))
    indicator = x509.load_der_x509_crl(delta).extensions.get_extension_for_class(
        x509.DeltaCRLIndicator
    )
    assert indicator.value.crl_number == 7


def test_the_next_build_in_the_child_lists_what_changed_since_the_last(ca):
    listed = entries(300)
    crl_apart.build_crl_apart(**fields(ca, listed))  # the child keeps these entries
    # one revoked since, one with another reason, one gone: the CRL the parent would build
    later = [*listed[:10], RevokedEntry(listed[10].serial, NOW, None), *listed[12:]]
    later.append(RevokedEntry(1 << 151, NOW, x509.ReasonFlags.key_compromise))
    here = x509.load_der_x509_crl(build_crl(**fields(ca, later, number=8)))
    apart = x509.load_der_x509_crl(crl_apart.build_crl_apart(**fields(ca, later, number=8)))
    assert apart.tbs_certlist_bytes == here.tbs_certlist_bytes
    assert len(apart) == 300


def test_what_the_build_or_the_key_refuses_reaches_the_caller(ca):
    _, _, backend, _ = ca
    twice = [*entries(3), entries(1)[0]]
    with pytest.raises(InvalidRequest, match="listed twice"):
        crl_apart.build_crl_apart(**fields(ca, twice))
    backend.down = True
    try:
        with pytest.raises(BackendUnavailable, match="unreachable"):
            crl_apart.build_crl_apart(**fields(ca, entries(3)))
    finally:
        backend.down = False
    assert x509.load_der_x509_crl(crl_apart.build_crl_apart(**fields(ca, entries(3))))


def test_a_child_that_dies_mid_build_is_an_error_and_the_next_build_starts_another(ca):
    _, _, backend, _ = ca
    crl_apart.build_crl_apart(**fields(ca, entries(3)))
    assert crl_apart.ready()
    child = crl_apart._builder[0]  # type: ignore[index]
    backend.before_signing = lambda: (child.kill(), child.join())
    try:
        with pytest.raises(BackendError, match="ended without a CRL"):
            crl_apart.build_crl_apart(**fields(ca, entries(3)))
    finally:
        backend.before_signing = lambda: None
    der = crl_apart.build_crl_apart(**fields(ca, entries(3)))  # a fresh child
    assert len(list(x509.load_der_x509_crl(der))) == 3
