"""Fuzz OIDC bearer-token verification (`OidcAuthenticator.authenticate`, kmsgate/auth/oidc.py):
a bearer is left to the API tokens (None), refused with Unauthenticated, or names an `oidc`
principal of a configured issuer; nothing else.

Bearers are the header's text (latin-1, as the server decodes it). Besides arbitrary text and
mutants of the corpus tokens, tokens are assembled here from drawn headers and claims (wrong
types, NaN and huge numbers, missing or extra fields, non-JSON payloads) and signed with the
issuer's real keys, so that the claim checks behind the signature are reached.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st
from jwt.algorithms import get_default_algorithms

from kmsgate.auth import Credentials
from kmsgate.auth.oidc import OidcAuthenticator
from kmsgate.config import OidcIssuer
from kmsgate.errors import Unauthenticated
from tests.fuzz.harness import CORPUS, FUZZ, Harness, Input, Target, check_corpus, corpus, feed
from tests.fuzz.seeds import JWKS_FILE
from tests.test_oidc import AUDIENCE, ISSUER, Issuer

ALGORITHMS = ["RS256", "ES256", "PS256", "EdDSA"]


@dataclass(frozen=True)
class JwtTarget:
    seeds: Sequence[bytes]
    authenticator: OidcAuthenticator

    def check(self, data: bytes) -> bool:
        """Whether the bearer authenticated."""
        try:
            principal = self.authenticator.authenticate(Credentials(bearer=data.decode("latin-1")))
        except Unauthenticated:
            return False
        if principal is None:
            return False
        assert principal.kind == "oidc" and principal.id.startswith("ci:"), principal
        return True


@functools.cache
def signer() -> Issuer:
    """The issuer whose keys sign the drawn tokens (made once, beside the corpus keys); its
    directory is removed when the interpreter exits."""
    directory = tempfile.mkdtemp(prefix="kmsgate-fuzz-jwt-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return Issuer(Path(directory))


def issuer_settings(jwks: Path) -> OidcIssuer:
    """Issuer `ci`, its keys written to `jwks`: the corpus tokens' and those of `signer()`."""
    keys = json.loads((CORPUS / JWKS_FILE).read_text())["keys"]
    keys += json.loads(signer().jwks.read_text())["keys"]
    jwks.write_text(json.dumps({"keys": keys}))
    return OidcIssuer(
        name="ci", issuer=ISSUER, audiences=[AUDIENCE], jwks_file=jwks, algorithms=ALGORITHMS
    )


@contextlib.contextmanager
def open_authenticator() -> Iterator[Target]:
    with tempfile.TemporaryDirectory() as tmp:
        issuer = issuer_settings(Path(tmp) / "jwks.json")
        seeds = [seed for _, seed in corpus(HARNESS.name)]
        yield JwtTarget(seeds, OidcAuthenticator([issuer]))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_NUMBERS = st.sampled_from([float("nan"), float("inf"), 1e308, 2**70, -1, True, "1"]) | st.floats()


@st.composite
def claim_values(draw: st.DrawFn, *usual: object) -> object:
    """One of `usual`, a number of any kind, or any JSON value."""
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=6,
    )
    return draw(st.sampled_from(usual) | _NUMBERS | json_values)


@st.composite
def signed_tokens(draw: st.DrawFn) -> bytes:
    """A token with a drawn header and claims (or payload bytes), signed by the issuer's RSA
    or EC key under the algorithm its header names or another one."""
    now = int(time.time())
    header: dict[str, Any] = {
        "alg": draw(claim_values("RS256", "ES256", "PS256", "HS256", "none")),
        "kid": draw(claim_values("rsa-1", "ec-1", None)),
    }
    header.update(draw(st.sampled_from([{}, {"typ": "JWT"}, {"crit": ["b64"], "b64": False}])))
    claims = {
        "iss": draw(claim_values(ISSUER, ISSUER, [ISSUER])),
        "aud": draw(claim_values(AUDIENCE, [AUDIENCE], [])),
        "sub": draw(claim_values("repo:acme/models", "", None)),
        "iat": draw(claim_values(now, now + 10_000)),
        "exp": draw(claim_values(now + 300, now - 300)),
        "nbf": draw(claim_values(now, now + 10_000, None)),
    }
    drop = draw(st.sets(st.sampled_from(sorted(claims))))
    payload = json.dumps({k: v for k, v in claims.items() if k not in drop}).encode()
    payload = draw(st.just(payload) | st.binary(max_size=20) | st.sampled_from([b"[]", b"1"]))
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(payload)}".encode()
    algorithm = draw(st.sampled_from(["RS256", "PS256", "ES256"]))
    key = signer().ec if algorithm == "ES256" else signer().rsa
    signature = get_default_algorithms()[algorithm].sign(signing_input, key)
    return signing_input + b"." + _b64(signature).encode()


HARNESS = Harness("jwt", open_authenticator, (signed_tokens(),))


def test_the_corpus_parses_as_labelled(target: Target) -> None:
    check_corpus(HARNESS, target)


@FUZZ
@given(value=HARNESS.inputs())
@example(value=b"..")
@example(value=b"e30.e30.")
@example(value=base64.urlsafe_b64encode(b"[" * 50_000) + b".e30.AAAA")  # deep JSON nesting
def test_a_bearer_is_an_oidc_principal_or_refused_as_unauthenticated(
    target: Target, value: Input
) -> None:
    feed(target, value)
