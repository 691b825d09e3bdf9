"""The `kmsgate` command line (typer + rich).

Every command but `serve`, `audit verify` and `policy test` talks to a gateway through
`kmsgate.client` (`--addr`/`KMSGATE_ADDR`, `--token`/`KMSGATE_TOKEN`). Failures print one
line on stderr and exit non-zero: 1 for a negative answer (invalid signature, failed check),
2 for an error.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kmsgate.algorithms import SIGN_ALGORITHMS, KeyType, default_sign_algorithm
from kmsgate.client import ApiError, Client
from kmsgate.errors import ConfigError
from kmsgate.schemas import b64decode_strict, b64encode

app = typer.Typer(no_args_is_help=True, add_completion=False, help="kmsgate: keys as a service.")
keys_app = typer.Typer(no_args_is_help=True, help="Create and manage keys.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens.")
audit_app = typer.Typer(no_args_is_help=True, help="The audit log.")
policy_app = typer.Typer(no_args_is_help=True, help="Rego policies.")
app.add_typer(keys_app, name="keys")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
app.add_typer(policy_app, name="policy")

out = Console()
err = Console(stderr=True)

AddrOpt = Annotated[str | None, typer.Option("--addr", envvar="KMSGATE_ADDR", help="Gateway URL.")]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="KMSGATE_TOKEN", help="API token.", show_default=False),
]
InputArg = Annotated[str, typer.Argument(help="File to read, or - for stdin.")]
DigestOpt = Annotated[
    bool, typer.Option("--digest", help="Hash the input locally and send only the digest.")
]


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}")


def _print_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A rich table on a terminal; tab-separated lines otherwise, so scripts get whole ids."""
    if not out.is_terminal:
        for row in [columns, *rows]:
            print("\t".join(row))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _client(addr: str | None, token: str | None) -> Client:
    return Client(addr, token)


def _call(addr: str | None, token: str | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one SDK call; an API error becomes a one-line message and exit code 2."""
    try:
        with _client(addr, token) as client:
            return fn(client, *args, **kwargs)
    except ApiError as exc:
        fail(f"{exc.code}: {exc.detail}")


def _read_input(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror}")


def _hash_input(source: str, hash_name: str) -> bytes:
    h = hashlib.new(hash_name)
    try:
        stream = sys.stdin.buffer if source == "-" else Path(source).open("rb")  # noqa: SIM115
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror}")
    with stream:
        while chunk := stream.read(1 << 20):
            h.update(chunk)
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


def _message(
    client: Client, key: str, source: str, digest: bool, algorithm: str | None
) -> dict[str, Any]:
    """`{data: ...}` or, with --digest, `{digest: ..., algorithm: ...}` for the key's algorithm."""
    if not digest:
        return {"data": _read_input(source), "algorithm": algorithm}
    name = algorithm or _default_algorithm(client, key)
    alg = SIGN_ALGORITHMS.get(name or "")
    if alg is None or alg.hash is None:
        fail(f"--digest needs an algorithm with a hash; {name} has none")
    return {"digest": _hash_input(source, alg.hash.value), "algorithm": alg.name}


def _print_json(value: Any) -> None:
    out.print_json(data=value)


# -- serve -----------------------------------------------------------------------------------


@app.command()
def serve(
    dev: Annotated[
        bool, typer.Option("--dev", help="Dev mode: local data dir, root token.")
    ] = False,
    data_dir: Annotated[Path | None, typer.Option(envvar="KMSGATE_DATA_DIR")] = None,
    host: Annotated[str | None, typer.Option(envvar="KMSGATE_HOST")] = None,
    port: Annotated[int | None, typer.Option(envvar="KMSGATE_PORT")] = None,
    config: Annotated[Path | None, typer.Option(envvar="KMSGATE_CONFIG")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    log_level: Annotated[str, typer.Option()] = "warning",
) -> None:
    """Run the gateway (127.0.0.1:8200 by default)."""
    from kmsgate.serve import serve as run_server

    try:
        run_server(
            dev=dev,
            data_dir=data_dir,
            host=host,
            port=port,
            config=config,
            workers=workers,
            log_level=log_level,
            console=err,
        )
    except ConfigError as exc:
        fail(str(exc))


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


def _parse_labels(labels: list[str]) -> dict[str, str]:
    pairs = {}
    for item in labels:
        name, sep, value = item.partition("=")
        if not sep:
            fail(f"label {item!r} must read name=value")
        pairs[name] = value
    return pairs


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
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a key (or import a verify-only public key)."""
    pem = _read_text(public_key) if public_key else None
    key = _call(
        addr,
        token,
        Client.create_key,
        name,
        type,
        purpose,
        backend=backend,
        labels=_parse_labels(label),
        public_key=pem,
    )
    _print_json(key)


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
    key = _call(
        addr,
        token,
        Client.create_key,
        name,
        type,
        purpose,
        backend=backend,
        labels=_parse_labels(label),
        uri=uri,
    )
    _print_json(key)


@keys_app.command("list")
def keys_list(
    purpose: Annotated[str | None, typer.Option()] = None,
    label: Annotated[list[str], typer.Option(help="name=value; repeatable.")] = [],  # noqa: B006
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Keys you may read (a table; tab-separated lines when piped)."""
    keys = _call(addr, token, Client.list_keys, purpose, _parse_labels(label))
    columns = ["name", "type", "purpose", "backend", "state", "primary", "labels"]
    _print_table(columns, _key_rows(keys))


@keys_app.command("show")
def keys_show(name: str, addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """One key as JSON (versions, state, labels)."""
    _print_json(_call(addr, token, Client.get_key, name))


def _key_action(action: str, help_text: str) -> None:
    def command(name: str, addr: AddrOpt = None, token: TokenOpt = None) -> None:
        _print_json(_call(addr, token, Client.key_action, name, action))

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
    _print_json(_call(addr, token, Client.key_action, name, "schedule-deletion", body))


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
    _print_json(_call(addr, token, Client.key_action, name, action, {"since": since}))


@keys_app.command("public-key")
def keys_public_key(
    name: str,
    version: Annotated[int | None, typer.Option()] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output")] = None,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """The PEM public key of a version (default: primary)."""
    pem = _call(addr, token, Client.public_key, name, version)
    if output:
        _write(output, pem.encode())
    else:
        sys.stdout.write(pem)


# -- operations ------------------------------------------------------------------------------


@app.command()
def sign(
    source: InputArg,
    key: Annotated[str, typer.Option("--key", "-k")],
    digest: DigestOpt = False,
    algorithm: Annotated[str | None, typer.Option()] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the raw signature here.")
    ] = None,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Sign a file or stdin; prints the base64 signature (or writes it raw with -o)."""

    def run(client: Client) -> dict[str, Any]:
        return client.sign(key, **_message(client, key, source, digest, algorithm))

    result = _call(addr, token, run)
    if output:
        _write(output, result["signature"])
    else:
        print(b64encode(result["signature"]))
    err.print(f"key_version={result['key_version']} algorithm={result['algorithm']}")


@app.command()
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

    result = _call(addr, token, run)
    if not result["valid"]:
        fail("signature is not valid", code=1)
    out.print(f"valid (key version {result['key_version']})")


def _read_signature(path: Path) -> bytes:
    raw = _read_input(str(path))
    try:
        return b64decode_strict(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return raw


@app.command()
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
    data = _read_input(source)
    if check is None:
        result = _call(addr, token, Client.mac, key, data)
        print(b64encode(result["mac"]))
        return
    try:
        expected = b64decode_strict(check)
    except ValueError:
        fail("--check must be standard base64")
    if not _call(addr, token, Client.mac_verify, key, data, expected)["valid"]:
        fail("MAC is not valid", code=1)
    out.print("valid")


# -- tokens ----------------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    role: Annotated[list[str], typer.Option("--role", help="Repeatable.")],
    ttl: Annotated[str | None, typer.Option(help="e.g. 12h, 30d")] = None,
    description: Annotated[str, typer.Option()] = "",
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create an API token; the token is printed once on stdout."""
    result = _call(addr, token, Client.create_token, role, ttl, description)
    err.print(f"token id {result['id']} roles {','.join(result['roles'])}")
    print(result["token"])


@token_app.command("bootstrap")
def token_bootstrap(
    config: Annotated[Path, typer.Option(envvar="KMSGATE_CONFIG", help="Gateway config file.")],
    role: Annotated[list[str], typer.Option("--role", help="Repeatable.")] = ["admin"],  # noqa: B006
    description: Annotated[str, typer.Option()] = "bootstrap token",
) -> None:
    """Create a token directly in the store (first admin of a production gateway)."""
    from kmsgate.bootstrap import bootstrap_token
    from kmsgate.config import load_settings
    from kmsgate.errors import KmsgateError

    try:
        token = bootstrap_token(load_settings(config), role, description)
    except (ConfigError, KmsgateError) as exc:
        fail(str(exc))
    print(token)


@app.command("root-key-init")
def root_key_init(
    config: Annotated[Path, typer.Option(envvar="KMSGATE_CONFIG", help="Gateway config file.")],
) -> None:
    """Create the softkms root key wrapped by `root_key_wrap`'s key (auto-unseal)."""
    from kmsgate.bootstrap import init_wrapped_root_key
    from kmsgate.config import load_settings

    try:
        path = init_wrapped_root_key(load_settings(config))
    except ConfigError as exc:
        fail(str(exc))
    out.print(f"wrapped root key written to {path}", highlight=False)


@token_app.command("list")
def token_list(addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """API tokens (a table; tab-separated lines when piped)."""
    rows = [
        [
            t["id"],
            ",".join(t["roles"]),
            t["description"],
            t["created_at"],
            t["expires_at"] or "-",
            t["revoked_at"] or "-",
        ]
        for t in _call(addr, token, Client.list_tokens)
    ]
    _print_table(["id", "roles", "description", "created", "expires", "revoked"], rows)


@token_app.command("revoke")
def token_revoke(token_id: str, addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """Revoke a token at once (every replica within a second)."""
    _print_json(_call(addr, token, Client.revoke_token, token_id))


# -- audit and policy (local) ----------------------------------------------------------------


@audit_app.command("verify")
def audit_verify(path: Path) -> None:
    """Check the hash chain of an audit log; names the first broken record."""
    from kmsgate.audit import verify_file

    try:
        report = verify_file(path)
    except (OSError, ValueError) as exc:
        fail(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
    if not report.ok:
        fail(f"audit log broken at line {report.first_bad_line}: {report.reason}", code=1)
    out.print(f"ok: {report.records} records, chain intact")


@policy_app.command("test")
def policy_test(
    policy_dir: Annotated[Path, typer.Argument()] = Path("policies"),
) -> None:
    """Run the Rego tests (`test_*` rules in *_test.rego) of a policy directory."""
    from kmsgate.policy import PolicyEngine

    try:
        results = PolicyEngine.load(policy_dir).run_tests()
    except ConfigError as exc:
        fail(str(exc))
    failed = [r for r in results if not r.passed]
    for r in results:
        mark = "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]"
        out.print(f"{mark} {r.name}" + (f" ({r.error})" if r.error else ""), highlight=False)
    out.print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed or not results:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the `kmsgate` script."""
    app()


if __name__ == "__main__":
    main()
