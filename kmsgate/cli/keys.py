"""`kmsgate keys` (create, import, list and manage keys) and the operations done with a key
on the gateway: `sign`, `verify` and `mac`."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kmsgate.algorithms import SIGN_ALGORITHMS, KeyType, default_sign_algorithm
from kmsgate.cli.common import (
    AddrOpt,
    ForceOpt,
    InputArg,
    TokenOpt,
    call,
    err,
    fail,
    name_values,
    print_json,
    print_line,
    print_out,
    print_table,
    read_input,
    read_public_pem,
    refuse_existing,
    write_bytes,
    write_or_print_b64,
)
from kmsgate.client import ApiError, Client
from kmsgate.encoding import b64decode_strict, b64encode

keys_app = typer.Typer(no_args_is_help=True, help="Create and manage keys.")

# -- keys ------------------------------------------------------------------------------------


def _key_rows(keys: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            key["name"],
            key["type"],
            key["purpose"],
            key["backend"],
            key["state"],
            str(key["primary_version"]),
            ",".join(f"{k}={v}" for k, v in key["labels"].items()),
        ]
        for key in keys
    ]


def _create_key(
    addr: str | None,
    token: str | None,
    name: str,
    key_type: str | None,
    purpose: str,
    backend: str | None,
    labels: list[str],
    public: bool | None = None,
    **source: str | None,
) -> None:
    """POST /v1/keys (created, imported or adopted, by `source`) and print the key."""
    key = call(
        addr,
        token,
        Client.create_key,
        name,
        key_type,
        purpose,
        backend=backend,
        labels=name_values(labels, "label"),
        public=public,
        **source,
    )
    print_json(key)


def _publicity(public: bool, private: bool) -> bool | None:
    """True for --public, False for --private, None for neither (the gateway's default, or
    no change). Exits through `fail` for both."""
    if public and private:
        fail("give --public or --private, not both")
    return True if public else False if private else None


@keys_app.command("create")
def keys_create(
    name: str,
    type: Annotated[str | None, typer.Option("--type", help="ecdsa-p256, ed25519, ...")] = None,
    purpose: Annotated[str, typer.Option(help="Free label used by policy.")] = "general",
    backend: Annotated[str | None, typer.Option()] = None,
    label: Annotated[list[str], typer.Option(help="name=value; repeatable.")] = [],  # noqa: B006
    public_key: Annotated[
        Path | None, typer.Option(help="Import this PEM public key as a verify-only key.")
    ] = None,
    rotation_period: Annotated[
        str | None, typer.Option(help="Rotate on schedule: 90d, 12h, 30m (at least 60s).")
    ] = None,
    public: Annotated[
        bool,
        typer.Option(
            "--public", help="Serve its public keys without a token (default: only model-sign)."
        ),
    ] = False,
    private: Annotated[bool, typer.Option("--private", help="Serve no JWKS.")] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a key (or import a verify-only public key)."""
    publicity = _publicity(public, private)
    wanted = "its public key (openssl pkey -in FILE -pubout)"
    pem = read_public_pem(public_key, wanted) if public_key else None
    _create_key(
        addr, token, name, type, purpose, backend, label, publicity,
        public_key=pem, rotation_period=rotation_period,
    )  # fmt: skip


@keys_app.command("import")
def keys_import(
    name: str,
    backend: Annotated[str, typer.Option(help="Configured backend holding the key.")],
    uri: Annotated[str, typer.Option(help="The key's reference, e.g. pkcs11:token=...;object=...")],
    type: Annotated[str, typer.Option("--type", help="ecdsa-p256, rsa-3072, ...")],
    purpose: Annotated[str, typer.Option(help="Free label used by policy.")] = "general",
    label: Annotated[list[str], typer.Option(help="name=value; repeatable.")] = [],  # noqa: B006
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Adopt a key that already exists in a backend (made by a key ceremony)."""
    _create_key(addr, token, name, type, purpose, backend, label, uri=uri)


@keys_app.command("list")
def keys_list(
    purpose: Annotated[str | None, typer.Option()] = None,
    label: Annotated[list[str], typer.Option(help="name=value; repeatable.")] = [],  # noqa: B006
    due: Annotated[
        bool, typer.Option("--due", help="Only keys with a rotation_period, next rotation first.")
    ] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Keys you may read (a table; tab-separated lines when piped). `--due`: the keys the
    gateway rotates on schedule, next first."""
    keys = call(addr, token, Client.list_keys, purpose, name_values(label, "label"))
    if due:
        from kmsgate.durations import format_duration, parse_duration_setting  # pydantic: slow

        scheduled = sorted((k for k in keys if "next_rotation" in k), key=_next_rotation)
        rows = [
            [
                k["name"],
                format_duration(parse_duration_setting(k["rotation_period"])),  # 7776000s: 90d
                k["next_rotation"],
                str(k["primary_version"]),
            ]
            for k in scheduled
        ]
        print_table(["name", "rotation_period", "next_rotation", "primary"], rows)
        return
    columns = ["name", "type", "purpose", "backend", "state", "primary", "labels"]
    print_table(columns, _key_rows(keys))


def _next_rotation(key: dict[str, Any]) -> str:
    when: str = key["next_rotation"]  # RFC 3339 UTC with Z: sorts as text
    return when


@keys_app.command("update")
def keys_update(
    name: str,
    min_decrypt_version: Annotated[
        int | None,
        typer.Option(min=1, help="Retire older versions (lower it again to bring them back)."),
    ] = None,
    rotation_period: Annotated[
        str | None, typer.Option(help="Rotate on schedule: 90d, 12h, 30m (at least 60s).")
    ] = None,
    no_rotation: Annotated[
        bool, typer.Option("--no-rotation", help="Stop rotating on schedule.")
    ] = False,
    label: Annotated[
        list[str], typer.Option(help="name=value; repeatable; replaces every label.")
    ] = [],  # noqa: B006
    clear_labels: Annotated[bool, typer.Option("--clear-labels", help="Remove every label.")] = (
        False
    ),
    public: Annotated[
        bool, typer.Option("--public", help="Serve its public keys without a token.")
    ] = False,
    private: Annotated[bool, typer.Option("--private", help="Serve no JWKS.")] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Change a key's minimum decryption version, rotation schedule, labels or publicity;
    prints the key."""
    publicity = _publicity(public, private)
    if rotation_period is not None and no_rotation:
        fail("give --rotation-period or --no-rotation, not both")
    if label and clear_labels:
        fail("give --label or --clear-labels, not both")
    changes: dict[str, Any] = {}
    if min_decrypt_version is not None:
        changes["min_decrypt_version"] = min_decrypt_version
    if rotation_period is not None or no_rotation:
        changes["rotation_period"] = rotation_period
    if label or clear_labels:
        changes["labels"] = name_values(label, "label")
    if publicity is not None:
        changes["public"] = publicity
    if not changes:
        fail("nothing to change: give an option (see --help)")
    print_json(call(addr, token, Client.update_key, name, changes))


@keys_app.command("show")
def keys_show(name: str, addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """One key as JSON (versions, state, labels)."""
    print_json(call(addr, token, Client.get_key, name))


def _key_action(action: str, help_text: str) -> None:
    def command(name: str, addr: AddrOpt = None, token: TokenOpt = None) -> None:
        print_json(call(addr, token, Client.key_action, name, action))

    command.__doc__ = help_text
    keys_app.command(action)(command)


_key_action("rotate", "Create a new primary version; old versions keep verifying.")
_key_action("disable", "Refuse every operation until enabled again.")
_key_action("enable", "Re-enable a disabled key.")
_key_action("cancel-deletion", "Cancel a scheduled deletion (the key comes back disabled).")


@keys_app.command("delete")
def keys_delete(
    name: str,
    pending_days: Annotated[int, typer.Option(min=7, max=30)] = 30,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Schedule deletion: refused at once, material destroyed after the pending days."""
    body = {"pending_days": pending_days}
    print_json(call(addr, token, Client.key_action, name, "schedule-deletion", body))


@keys_app.command("compromised")
def keys_compromised(
    name: str,
    version: int,
    since: Annotated[str, typer.Option(help="RFC 3339 time of the compromise.")],
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Mark a version compromised since a time."""
    action = f"versions/{version}/compromised"
    print_json(call(addr, token, Client.key_action, name, action, {"since": since}))


@keys_app.command("public-key")
def keys_public_key(
    name: str,
    version: Annotated[int | None, typer.Option()] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output")] = None,
    force: ForceOpt = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """The PEM public key of a version (default: primary)."""
    refuse_existing(force, output)
    pem = call(addr, token, Client.public_key, name, version)
    if output:
        write_bytes(output, pem.encode(), force=force)
    else:
        print_out(pem, end="")


# -- operations ------------------------------------------------------------------------------

DigestOpt = Annotated[
    bool, typer.Option("--digest", help="Hash the input locally and send only the digest.")
]


def _hash_input(source: str, hash_name: str) -> bytes:
    """The `hash_name` digest of the file `source` (or stdin, "-"), read in chunks. Exits
    through `fail` if it cannot be opened or read to its end."""
    h = hashlib.new(hash_name)
    try:
        with sys.stdin.buffer if source == "-" else Path(source).open("rb") as stream:
            while chunk := stream.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror}")
    return h.digest()


def _default_algorithm(client: Client, key: str) -> str | None:
    """The key type's default algorithm; needs `key.read`, so a sign-only token is told to
    pass --algorithm instead."""
    try:
        key_type = client.get_key(key)["type"]
    except ApiError as exc:
        if exc.status == 403:
            fail("--digest needs the key's algorithm: pass --algorithm (no key.read here)")
        raise
    return default_sign_algorithm(KeyType(key_type))


_SEND_A_DIGEST = "sign and verify its digest (--digest)"


def _message(
    client: Client, key: str, source: str, digest: bool, algorithm: str | None
) -> dict[str, Any]:
    """`{data: ...}` or, with --digest, `{digest: ..., algorithm: ...}` for the key's algorithm."""
    if not digest:
        return {"data": read_input(source, _SEND_A_DIGEST), "algorithm": algorithm}
    name = algorithm or _default_algorithm(client, key)
    alg = SIGN_ALGORITHMS.get(name or "")
    hashed = ", ".join(n for n, a in SIGN_ALGORITHMS.items() if a.hash is not None)
    if alg is None and algorithm is not None:
        fail(f"unknown algorithm {algorithm!r}: --digest takes one of {hashed}")
    if alg is None or alg.hash is None:
        fail(f"--digest needs an algorithm with a hash ({hashed}); {name or f'key {key}'} has none")
    return {"digest": _hash_input(source, alg.hash.value), "algorithm": alg.name}


def sign(
    source: InputArg,
    key: Annotated[str, typer.Option("--key", "-k")],
    digest: DigestOpt = False,
    algorithm: Annotated[str | None, typer.Option()] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the raw signature here.")
    ] = None,
    force: ForceOpt = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Sign a file or stdin; prints the base64 signature (or writes it raw with -o)."""
    refuse_existing(force, output)

    def run(client: Client) -> dict[str, Any]:
        return client.sign(key, **_message(client, key, source, digest, algorithm))

    result = call(addr, token, run)
    write_or_print_b64(output, result["signature"], force=force)
    err.print(f"key_version={result['key_version']} algorithm={result['algorithm']}")


def verify(
    source: InputArg,
    key: Annotated[str, typer.Option("--key", "-k")],
    signature: Annotated[
        Path, typer.Option("--signature", "-s", help="Signature file: raw, or base64 text.")
    ],
    digest: DigestOpt = False,
    algorithm: Annotated[str | None, typer.Option()] = None,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Verify a signature over a file or stdin. Exit 0 if valid, 1 if not."""
    sig = _read_signature(signature)

    def run(client: Client) -> dict[str, Any]:
        return client.verify(key, sig, **_message(client, key, source, digest, algorithm))

    result = call(addr, token, run)
    if not result["valid"]:
        fail("signature is not valid", code=1)
    print_line(f"valid (key version {result['key_version']})")


def _read_signature(path: Path) -> bytes:
    raw = read_input(str(path))
    try:
        return b64decode_strict(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return raw


def mac(
    source: InputArg,
    key: Annotated[str, typer.Option("--key", "-k")],
    check: Annotated[
        str | None, typer.Option("--check", help="Verify this base64 MAC instead.")
    ] = None,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """HMAC a file or stdin (prints base64), or check a MAC with --check (exit 1 if wrong)."""
    data = read_input(source, "an HMAC covers its whole input, so MAC a digest of it")
    if check is None:
        result = call(addr, token, Client.mac, key, data)
        print_out(b64encode(result["mac"]))
        return
    try:
        expected = b64decode_strict(check)
    except ValueError:
        fail("--check must be standard base64")
    if not call(addr, token, Client.mac_verify, key, data, expected)["valid"]:
        fail("MAC is not valid", code=1)
    print_line("valid")
