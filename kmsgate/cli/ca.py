"""`kmsgate ca`: the offline root ceremony, intermediate CAs on the gateway, chains and CRLs
(`kmsgate cert`, in certs.py, issues from them).

`ca init-root`, `ca sign-intermediate` and `ca root-crl` run without a gateway, on the
machine that keeps the root key; every other command talks to a gateway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmsgate.cli.common import (
    AddrOpt,
    ForceOpt,
    TokenOpt,
    call,
    done_already,
    err,
    fail,
    local_errors,
    print_json,
    print_out,
    print_rows,
    read_input,
    read_text,
    refuse_existing,
    refuse_to_replace,
    write_bytes,
)
from kmsgate.client import Client
from kmsgate.errors import ConfigError
from kmsgate.pki.crl import CA_REVOCATION_REASONS, parse_reason
from kmsgate.pki.issuer import parse_serial
from kmsgate.pki.root import (
    ROOT_KEY_TYPES,
    RootKey,
    check_root_request,
    init_root,
    load_root,
    root_crl,
    self_signed_root,
    sha256_fingerprint,
    sign_intermediate,
)
from kmsgate.secret_files import read_secret_file
from kmsgate.text import utc_timestamp

if TYPE_CHECKING:  # python-pkcs11 is an extra, and the backends load slowly: `--token` only
    from kmsgate.backends.pkcs11 import Pkcs11Backend
    from kmsgate.pki.token_root import RootToken

ca_app = typer.Typer(no_args_is_help=True, help="Certificate authorities: root ceremony, CAs.")

PEM = serialization.Encoding.PEM
PKCS8 = serialization.PrivateFormat.PKCS8
PassphraseOpt = Annotated[
    Path | None,
    typer.Option(help="Read the root key's passphrase from this file (default: prompt)."),
]

# -- the offline root ------------------------------------------------------------------------


def _passphrase(path: Path | None, *, confirm: bool) -> bytes:
    """The passphrase from `path` (one line; its line ending dropped; `-`: stdin), or typed
    twice (once without `confirm`) with hidden input. Exits through `fail` if the file is
    not held as a secret file must be (`read_secret_file`)."""
    if path is None:
        return _typed("Root key passphrase", "--passphrase-file FILE", confirm=confirm).encode()
    try:
        text = read_input("-") if str(path) == "-" else read_secret_file(path, "passphrase")
    except ConfigError as exc:
        fail(str(exc))
    return text.rstrip(b"\r\n")


def _typed(prompt: str, instead: str, *, confirm: bool = False) -> str:
    """What is typed at `prompt` with hidden input (twice with `confirm`). Ctrl-C exits 130,
    as it does anywhere else; the end of the input (nothing typed, no terminal) exits
    through `fail`, naming `instead`, the option that gives it without a prompt."""
    if not sys.stdin.isatty():  # nothing to hide: the lines given (getpass would warn)
        return _lines_given(prompt, instead, confirm=confirm)
    try:
        typed: str = typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
    except typer.Abort as exc:  # for both: the exception it replaced tells which
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise typer.Exit(128 + signal.SIGINT) from None
        fail(f"no {prompt.lower()} typed (the input ended): give {instead}")
    return typed


def _lines_given(prompt: str, instead: str, *, confirm: bool) -> str:
    """`_typed` without a terminal: the next line of the input (the next two, the same,
    with `confirm`), the prompt on stderr."""
    answers = []
    for _ in range(2 if confirm else 1):
        err.print(f"{prompt}: ", end="", highlight=False)
        line = sys.stdin.readline()
        err.print()
        if not line:
            fail(f"no {prompt.lower()} typed (the input ended): give {instead}")
        answers.append(line.rstrip("\n"))
    if len(set(answers)) > 1:
        fail(f"the two {prompt.lower()}s typed differ")
    return answers[0]


def _load_pem(path: Path, what: str, loader: Any) -> Any:
    """`loader` applied to the PEM bytes of `path`; a one-line error if it does not parse."""
    try:
        return loader(read_text(path).encode())
    except (ValueError, x509.InvalidVersion):
        fail(f"{path} is not a PEM {what}")


def _report(cert: x509.Certificate, message: str) -> None:
    """`message` on stderr, and on stdout the line `openssl x509 -noout -fingerprint -sha256`
    prints for `cert`, to compare out of band."""
    err.print(message, highlight=False, soft_wrap=True)
    print_out(f"sha256 Fingerprint={sha256_fingerprint(cert)}")


TokenUriOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="The root key on a PKCS#11 token instead of a file: an RFC 7512 URI with "
        "module-path= (and pin-source=file:... or a prompt for the PIN).",
    ),
]
_TOKEN_PIN_ENV = "KMSGATE_ROOT_TOKEN_PIN"  # noqa: S105 (a variable name, not a PIN)
"""Where a prompted PIN waits for the token's login: this process's environment only."""


@contextlib.contextmanager
def _open_token(uri: str) -> Iterator[tuple[RootToken, Pkcs11Backend]]:
    """The root token the URI names and its backend, closed on exit; the PIN from
    `pin-source`, or typed (hidden) and held in this process's environment only while the
    token is open. The backend's own warnings stay quiet: the command reports its failures
    itself, once."""
    from kmsgate.pki.token_root import RootToken

    logging.getLogger("kmsgate.backends.pkcs11").setLevel(logging.ERROR)
    try:
        with local_errors(Path(uri), "open"):
            token = RootToken.parse(uri)
            if token.pin_file() is None:
                typed = _typed("Token user PIN", "pin-source=file:PATH in the URI")
                os.environ[_TOKEN_PIN_ENV] = typed
            backend = token.open(_TOKEN_PIN_ENV)
        with contextlib.closing(backend):
            yield token, backend
    finally:
        os.environ.pop(_TOKEN_PIN_ENV, None)


@ca_app.command("init-root")
def ca_init_root(
    cert_out: Annotated[Path, typer.Option(help="New self-signed root certificate (PEM).")],
    subject: Annotated[str, typer.Option(help="RFC 4514 name, or a bare common name.")],
    key_out: Annotated[
        Path | None, typer.Option(help="New encrypted root key file (0600).")
    ] = None,
    token: TokenUriOpt = None,
    days: Annotated[int, typer.Option(min=1, max=36500)] = 3650,
    key_type: Annotated[str, typer.Option(help=", ".join(ROOT_KEY_TYPES))] = "ecdsa-p384",
    path_length: Annotated[
        int | None, typer.Option(min=0, help="CA levels allowed below the root (default: any).")
    ] = None,
    passphrase_file: PassphraseOpt = None,
) -> None:
    """Create an offline root: its key (an encrypted file, or on a PKCS#11 token) and its
    self-signed certificate (no gateway)."""
    if (key_out is None) == (token is None):
        fail("give exactly one of --key-out (a key file) and --token (a PKCS#11 token)")
    refuse_to_replace(key_out, cert_out)  # a root is never replaced
    if token is not None:
        with local_errors(cert_out, "check"):
            name = check_root_request(subject, key_type, days, path_length)
        with _open_token(token) as (held, backend), local_errors(cert_out, "write"):
            from kmsgate.pki.token_root import create_root_key

            key, reference = create_root_key(backend, held, key_type)
            cert = self_signed_root(key, name, days=days, path_length=path_length)
        write_bytes(cert_out, cert.public_bytes(PEM), force=False)
        _report(
            cert,
            f"root key on the token: {reference} (sensitive, not extractable); "
            f"certificate: {cert_out}",
        )
        return
    assert key_out is not None
    passphrase = _passphrase(passphrase_file, confirm=True)
    with local_errors(key_out, "write"):
        _, cert = init_root(
            key_out, passphrase, subject, key_type=key_type, days=days, path_length=path_length
        )
    try:
        write_bytes(cert_out, cert.public_bytes(PEM), force=False)
    except BaseException:  # a failure, or an interrupt (Ctrl-C, SIGTERM) meanwhile
        key_out.unlink(missing_ok=True)  # a root key without its certificate is of no use
        raise
    _report(cert, f"root key: {key_out} (encrypted, 0600); certificate: {cert_out}")


@ca_app.command("sign-intermediate")
def ca_sign_intermediate(
    root_cert: Annotated[Path, typer.Option(help="The root's certificate (PEM).")],
    csr: Annotated[Path, typer.Option(help="The intermediate's CSR (from `ca create`).")],
    out: Annotated[Path, typer.Option(help="Where to write the intermediate's certificate.")],
    root_key: Annotated[Path | None, typer.Option(help="The root's encrypted key file.")] = None,
    token: TokenUriOpt = None,
    days: Annotated[int, typer.Option(min=1, max=36500)] = 1825,
    path_length: Annotated[int, typer.Option(min=0, help="CA levels allowed below it.")] = 0,
    permit_dns: Annotated[
        list[str],
        typer.Option(
            help="Name constraint: permitted DNS subtree (lab: it and the names below; "
            ".lab: only those below); repeatable."
        ),
    ] = [],  # noqa: B006
    crl_url: Annotated[
        str | None,
        typer.Option(help="Where the root's CRL (`ca root-crl`) is published: an http(s) URL."),
    ] = None,
    passphrase_file: PassphraseOpt = None,
    force: ForceOpt = False,
) -> None:
    """Sign an intermediate CA's CSR with the offline root (no gateway)."""
    certificate = _root_certificate(root_cert, root_key, token, out, force, (csr, passphrase_file))
    request = _load_pem(csr, "certificate signing request", x509.load_pem_x509_csr)
    key = _root_key(certificate, root_cert, root_key, token, passphrase_file)
    with key as root, local_errors(csr, "sign"):
        signed = sign_intermediate(
            root,
            certificate,
            request,
            days=days,
            path_length=path_length,
            permitted_dns=permit_dns or None,
            crl_url=crl_url,
        )
    write_bytes(out, signed.public_bytes(PEM), force=force)
    _report(
        signed,
        f"{signed.subject.rfc4514_string()} valid until "
        f"{utc_timestamp(signed.not_valid_after_utc)}: {out}",
    )


@ca_app.command("root-crl")
def ca_root_crl(
    root_cert: Annotated[Path, typer.Option(help="The root's certificate (PEM).")],
    out: Annotated[Path, typer.Option(help="Where to write the root's new CRL (PEM).")],
    root_key: Annotated[Path | None, typer.Option(help="The root's encrypted key file.")] = None,
    token: TokenUriOpt = None,
    revoke: Annotated[
        list[str],
        typer.Option(help="Serial of a certificate the root signed, to revoke; repeatable."),
    ] = [],  # noqa: B006
    reason: Annotated[
        str, typer.Option(help=f"Why, for every --revoke: {', '.join(CA_REVOCATION_REASONS)}.")
    ] = "unspecified",
    previous: Annotated[
        Path | None,
        typer.Option(help="The root's last CRL (PEM or DER): its entries stay, its number+1."),
    ] = None,
    first: Annotated[
        bool, typer.Option("--first", help="The root's first CRL: there is no --previous.")
    ] = False,
    days: Annotated[int, typer.Option(min=1, max=36500, help="Days until nextUpdate.")] = 90,
    passphrase_file: PassphraseOpt = None,
    force: ForceOpt = False,
) -> None:
    """Sign the offline root's CRL, listing the intermediates it revoked (no gateway)."""
    if (previous is None) == (not first):
        # without the last CRL, every revocation it lists would silently be lifted
        fail("give exactly one of --previous (the root's last CRL) and --first")
    certificate = _root_certificate(
        root_cert, root_key, token, out, force, (previous, passphrase_file)
    )
    last = _load_crl(previous) if previous is not None else None
    with local_errors(root_cert, "revoke"):
        why = parse_reason(reason, CA_REVOCATION_REASONS)
        revoked = [(parse_serial(serial), why) for serial in revoke]
    key = _root_key(certificate, root_cert, root_key, token, passphrase_file)
    with key as root, local_errors(root_cert, "sign the CRL of"):
        crl = root_crl(root, certificate, revoke=revoked, previous=last, days=days)
    write_bytes(out, crl.public_bytes(PEM), force=force)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    next_update = crl.next_update_utc
    err.print(
        f"CRL number {number}: {len(crl)} revoked, next update "
        f"{utc_timestamp(next_update) if next_update else '-'}: {out}",
        highlight=False,
        soft_wrap=True,
    )


def _root_certificate(
    root_cert: Path,
    root_key: Path | None,
    token: str | None,
    out: Path,
    force: bool,
    reads: tuple[Path | None, ...],
) -> x509.Certificate:
    """The root's certificate, for a command that signs with the root and writes `out`.
    Exits 2 unless exactly one of a key file and a token holds the root's key, `out` may
    be written (and is none of the root's files or the command's other inputs, `reads`:
    `--force` once wrote a certificate over the root's only key) and `root_cert` is a PEM
    certificate."""
    if (root_key is None) == (token is None):
        fail("give exactly one of --root-key (a key file) and --token (a PKCS#11 token)")
    refuse_existing(force, out, reads=(root_cert, root_key, *reads))
    certificate: x509.Certificate = _load_pem(
        root_cert, "certificate", x509.load_pem_x509_certificate
    )
    return certificate


@contextlib.contextmanager
def _root_key(
    certificate: x509.Certificate,
    root_cert: Path,
    key_file: Path | None,
    token: str | None,
    passphrase_file: Path | None,
) -> Iterator[RootKey]:
    """The key of the root `certificate` (read from `root_cert`): on the token `token`,
    logged in while the block runs, or from `key_file` with its passphrase. Exits 2 with
    one line when it cannot be had."""
    if token is not None:
        with _open_token(token) as (held, backend):
            with local_errors(root_cert, "use the root key of"):
                from kmsgate.pki.token_root import find_root_key

                key = find_root_key(backend, held, certificate)
            yield key
        return
    assert key_file is not None
    passphrase = _passphrase(passphrase_file, confirm=False)
    with local_errors(key_file, "read"):
        loaded = load_root(key_file, passphrase)
    yield loaded


def _load_crl(path: Path) -> x509.CertificateRevocationList:
    """The CRL in `path`, PEM or DER; a one-line error (exit 2) if it is neither."""
    data = read_input(str(path))
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        fail(f"{path} is not a CRL (PEM or DER)")


# -- CAs on the gateway ----------------------------------------------------------------------


@ca_app.command("create")
def ca_create(
    name: str,
    subject: Annotated[str, typer.Option(help="RFC 4514 name, or a bare common name.")],
    backend: Annotated[str | None, typer.Option(help="Default: the gateway's.")] = None,
    key_type: Annotated[str, typer.Option(help="ecdsa-p256, ecdsa-p384, rsa-3072, ...")] = (
        "ecdsa-p256"
    ),
    csr_out: Annotated[Path | None, typer.Option(help="Write the CSR here.")] = None,
    force: ForceOpt = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a pending intermediate CA on the gateway; prints (or writes) its CSR."""
    refuse_existing(force, csr_out)
    ca = call(addr, token, Client.create_ca, name, subject, key_type=key_type, backend=backend)
    with done_already(f"CA {name} was created, pending"):
        _write_or_print(csr_out, ca["csr"], force=force)
    err.print(
        f"CA {name} is pending: sign its CSR with the root (kmsgate ca sign-intermediate), "
        f"then run kmsgate ca import {name} --cert CERT --chain ROOT",
        highlight=False,
        soft_wrap=True,
    )


@ca_app.command("import")
def ca_import(
    name: str,
    cert: Annotated[Path, typer.Option(help="The CA's certificate signed by the root (PEM).")],
    chain: Annotated[Path, typer.Option(help="Its issuers up to the root, root last (PEM).")],
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Activate a pending CA with its signed certificate; prints the CA as JSON."""
    certificate, issuers = read_text(cert), read_text(chain)
    print_json(call(addr, token, Client.import_ca_certificate, name, certificate, issuers))


@ca_app.command("list")
def ca_list(addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """The CAs (a table; tab-separated lines when piped)."""
    cas = call(addr, token, Client.list_cas)
    print_rows(["name", "type", "state", "subject", "key", "parent", "not_after"], cas)


@ca_app.command("show")
def ca_show(name: str, addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """One CA as JSON."""
    print_json(call(addr, token, Client.get_ca, name))


OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file.")]


@ca_app.command("chain")
def ca_chain(
    name: str,
    out: OutOpt = None,
    force: ForceOpt = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """The CA's certificate and its issuers, PEM, root last (needs no token)."""
    refuse_existing(force, out)
    _write_or_print(out, call(addr, token, Client.ca_chain, name), force=force)


@ca_app.command("crl")
def ca_crl(
    name: str,
    delta: Annotated[bool, typer.Option("--delta", help="The delta CRL.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the DER here.")] = None,
    force: ForceOpt = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """The CA's CRL: DER into --out, or PEM on stdout (needs no token)."""
    refuse_existing(force, out)
    der = call(addr, token, Client.ca_crl, name, delta=delta)
    if out:
        write_bytes(out, der, force=force)
        return
    try:
        pem = x509.load_der_x509_crl(der).public_bytes(PEM).decode()
    except ValueError:
        fail("the gateway's answer is not a DER CRL")
    print_out(pem, end="")


def _write_or_print(path: Path | None, text: str, *, force: bool) -> None:
    if path:
        write_bytes(path, text.encode(), force=force)
    else:
        print_out(text, end="")
