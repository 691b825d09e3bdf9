"""`kmsgate cert`: issue a certificate from a gateway CA (for a CSR, or for a key made here),
inspect, list and revoke certificates."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

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
    read_public_pem,
    refuse_existing,
    write_files,
)
from kmsgate.client import Client
from kmsgate.pki.csr import new_key_and_csr
from kmsgate.pki.root import write_private_file

cert_app = typer.Typer(no_args_is_help=True, help="Certificates: issue, list, revoke.")

PEM = serialization.Encoding.PEM
PKCS8 = serialization.PrivateFormat.PKCS8


def _new_key_and_csr(sans: list[str], cn: str | None) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh P-256 key and a CSR for it naming `sans` (and `cn` as the subject's common
    name), PEM. Fails when there are no SANs or one is malformed."""
    if not sans:
        fail("--key-out needs at least one --san")
    try:
        key, csr = new_key_and_csr(sans, cn)
    except ValueError as exc:
        fail(f"--san: {exc}")
    return key, csr.public_bytes(PEM).decode()


@cert_app.command("issue")
def cert_issue(
    ca: Annotated[str, typer.Option(help="The issuing CA.")],
    profile: Annotated[str, typer.Option(help="server, client, workload, ...")],
    csr: Annotated[Path | None, typer.Option(help="Certify this CSR's key (PEM).")] = None,
    key_out: Annotated[
        Path | None, typer.Option(help="Make a P-256 key here (0600) and a CSR from --san.")
    ] = None,
    san: Annotated[
        list[str], typer.Option(help="dns:NAME, ip:ADDR, uri:URI or a bare name; repeatable.")
    ] = [],  # noqa: B006
    cn: Annotated[str | None, typer.Option(help="Common name (one of the SANs).")] = None,
    ttl: Annotated[str | None, typer.Option(help="e.g. 12h, 7d (default: the profile's).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the certificate here.")
    ] = None,
    chain_out: Annotated[Path | None, typer.Option(help="Write the CA chain here.")] = None,
    force: ForceOpt = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Issue a certificate: for a CSR, or for a new local key (--key-out with --san).
    --force replaces an existing --out or --chain-out, never a key."""
    if (csr is None) == (key_out is None):
        fail("give either --csr FILE or --key-out FILE with --san")
    refuse_existing(force, out, chain_out, never_replaced=[key_out])
    if key_out is None:
        assert csr is not None
        if san or cn:
            fail("--san and --cn go with --key-out; a CSR names itself")
        request = read_public_pem(csr, "a CSR (openssl req -new -key FILE), or use --key-out")
        issued = call(addr, token, Client.issue_certificate, ca, request, profile, ttl=ttl)
    else:
        key, request = _new_key_and_csr(san, cn)
        with local_errors(key_out, "write"):
            write_private_file(key_out, key.private_bytes(PEM, PKCS8, serialization.NoEncryption()))
        try:
            issued = call(addr, token, Client.issue_certificate, ca, request, profile, ttl=ttl)
        except BaseException:
            key_out.unlink(missing_ok=True)  # no certificate: the new key is of no use
            raise
    serial = issued["serial"]
    if key_out is None:
        note = f"certificate {serial} was issued: kmsgate cert show {serial} has it"
    else:
        note = (
            f"certificate {serial} was issued for the key {key_out}, which is removed: "
            f"revoke the certificate (kmsgate cert revoke {serial})"
        )
    try:
        with done_already(note):
            if out is None:  # first: a certificate that cannot be printed leaves no file either
                print_out(issued["certificate"], end="")
            written = [(out, issued["certificate"].encode()), (chain_out, issued["chain"].encode())]
            write_files(written, force=force)
    except BaseException as exc:  # a failure, or an interrupt (Ctrl-C, SIGTERM) meanwhile
        if key_out is not None:
            with contextlib.suppress(OSError):
                key_out.unlink()  # the key without its certificate is of no use
        if not isinstance(exc, typer.Exit):  # `fail` said it already
            err.print(f"interrupted, but {note}", highlight=False, soft_wrap=True)
        raise
    err.print(
        f"serial {serial} not_after {issued['not_after']}",
        highlight=False,
        soft_wrap=True,
    )


@cert_app.command("show")
def cert_show(serial: str, addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """One certificate's record as JSON (status, SANs, owner, the PEM)."""
    print_json(call(addr, token, Client.get_certificate, serial))


CERT_COLUMNS = ["serial", "ca", "profile", "status", "not_after", "sans", "owner"]


def _print_certs(certs: list[dict[str, Any]]) -> None:
    print_rows(CERT_COLUMNS, [{**c, "sans": ",".join(c["sans"])} for c in certs])


@cert_app.command("list")
def cert_list(
    ca: Annotated[str | None, typer.Option()] = None,
    profile: Annotated[str | None, typer.Option()] = None,
    san: Annotated[str | None, typer.Option(help="A SAN value, or a suffix: .lab")] = None,
    status: Annotated[str | None, typer.Option(help="valid, revoked or expired")] = None,
    owner: Annotated[str | None, typer.Option(help="Principal that had it issued.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Per page.")] = 100,
    all_pages: Annotated[bool, typer.Option("--all", help="Every page, not only the first.")] = (
        False
    ),
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """The certificate inventory, by serial (a table; tab-separated lines when piped)."""
    filters: dict[str, Any] = {
        "ca": ca,
        "profile": profile,
        "san": san,
        "status": status,
        "owner": owner,
        "limit": limit,
    }

    def fetch(client: Client) -> list[dict[str, Any]]:
        if all_pages:
            return list(client.iter_certificates(**filters))
        page = client.list_certificates(**filters)
        if page.get("next"):
            err.print(
                "more certificates: use --all or a larger --limit", highlight=False, soft_wrap=True
            )
        certs: list[dict[str, Any]] = page["certs"]
        return certs

    _print_certs(call(addr, token, fetch))


@cert_app.command("expiring")
def cert_expiring(
    within: Annotated[str, typer.Option(help="e.g. 7d, 12h")],
    ca: Annotated[str | None, typer.Option()] = None,
    profile: Annotated[str | None, typer.Option()] = None,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Valid certificates whose not_after falls within the given time from now."""
    try:
        from kmsgate.durations import parse_duration_setting  # pydantic: slow to load

        horizon = datetime.now(UTC) + parse_duration_setting(within)
    except ValueError as exc:
        fail(f"--within: {exc}")
    filters = {"ca": ca, "profile": profile, "status": "valid", "expires_before": horizon}

    def fetch(client: Client) -> list[dict[str, Any]]:
        return [c for c in client.iter_certificates(**filters) if c["status"] == "valid"]

    certs = call(addr, token, fetch)
    _print_certs(sorted(certs, key=lambda c: str(c["not_after"])))


@cert_app.command("revoke")
def cert_revoke(
    serial: str,
    reason: Annotated[str, typer.Option(help="RFC 5280 name: keyCompromise, superseded, ...")] = (
        "unspecified"
    ),
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Revoke a certificate; prints its record as JSON."""
    print_json(call(addr, token, Client.revoke_certificate, serial, reason))
