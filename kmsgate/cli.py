"""The `kmsgate` command line (typer + rich).

Every command but `serve`, `audit verify` and `policy test` talks to a gateway through
`kmsgate.client` (`--addr`/`KMSGATE_ADDR`, `--token`/`KMSGATE_TOKEN`). Failures print one
line on stderr and exit non-zero: 1 for a negative answer (invalid signature, failed check),
2 for an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, BinaryIO, NoReturn

import typer
from rich.markup import escape
from rich.table import Table

from kmsgate import __version__
from kmsgate.algorithms import SIGN_ALGORITHMS, KeyType, default_sign_algorithm
from kmsgate.chunked import Progress
from kmsgate.cli_common import AddrOpt, TokenOpt, err, fail, fail_api, out
from kmsgate.cli_model import model_app
from kmsgate.client import ApiError, Client
from kmsgate.encoding import b64decode_strict, b64encode
from kmsgate.envelope import FileHeader
from kmsgate.errors import ConfigError, DecryptionFailed, KmsgateError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags without type labels, paragraphs re-wrapped
    context_settings={"max_content_width": 120},
    help="kmsgate: keys as a service.",
)
keys_app = typer.Typer(no_args_is_help=True, help="Create and manage keys.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens.")
audit_app = typer.Typer(no_args_is_help=True, help="The audit log.")
policy_app = typer.Typer(no_args_is_help=True, help="Rego policies.")
app.add_typer(keys_app, name="keys")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
app.add_typer(policy_app, name="policy")
app.add_typer(model_app, name="model")


def _print_version(value: bool) -> None:
    if value:
        print(f"kmsgate {__version__}")
        raise typer.Exit


@app.callback()
def _global_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """kmsgate: keys as a service."""


InputArg = Annotated[str, typer.Argument(help="File to read, or - for stdin.")]
DigestOpt = Annotated[
    bool, typer.Option("--digest", help="Hash the input locally and send only the digest.")
]


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
        fail_api(exc)


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


def _create_key(
    addr: str | None,
    token: str | None,
    name: str,
    key_type: str | None,
    purpose: str,
    backend: str | None,
    labels: list[str],
    **source: str | None,
) -> None:
    """POST /v1/keys (created, imported or adopted, by `source`) and print the key."""
    key = _call(
        addr,
        token,
        Client.create_key,
        name,
        key_type,
        purpose,
        backend=backend,
        labels=_parse_labels(labels),
        **source,
    )
    _print_json(key)


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
    _create_key(addr, token, name, type, purpose, backend, label, public_key=pem)


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


# -- envelope encryption ---------------------------------------------------------------------

ContextOpt = Annotated[
    list[str],
    typer.Option("--context", "-c", help="Encryption context entry name=value; repeatable."),
]
FILE_SUFFIX = ".kmsgate"


def _parse_context(entries: list[str]) -> dict[str, str]:
    context: dict[str, str] = {}
    for item in entries:
        name, sep, value = item.partition("=")
        if not sep or not name:
            fail(f"context entry {item!r} must read name=value")
        if name in context:
            fail(f"context entry {name!r} given twice")
        context[name] = value
    return context


@app.command()
def encrypt(
    source: InputArg,
    key: Annotated[str, typer.Option("--key", "-k")],
    context: ContextOpt = [],  # noqa: B006
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the raw ciphertext here.")
    ] = None,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Encrypt a small input on the gateway (up to limits.max_input_bytes, 64 KiB by
    default); prints the base64 ciphertext. For files use encrypt-file."""
    result = _call(addr, token, Client.encrypt, key, _read_input(source), _parse_context(context))
    if output:
        _write(output, result["ciphertext"])
    else:
        print(b64encode(result["ciphertext"]))
    err.print(f"key_version={result['key_version']}")


@app.command()
def decrypt(
    source: Annotated[str, typer.Argument(help="Ciphertext file (raw or base64), - for stdin.")],
    key: Annotated[str, typer.Option("--key", "-k")],
    context: ContextOpt = [],  # noqa: B006
    output: Annotated[Path | None, typer.Option("-o", "--output")] = None,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Decrypt a ciphertext from `encrypt` (or a data key from `datakey`) on the gateway."""
    raw = _read_input(source)
    try:
        ciphertext = b64decode_strict(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        ciphertext = raw
    result = _call(addr, token, Client.decrypt, key, ciphertext, _parse_context(context))
    if output:
        _write(output, result["plaintext"])
    else:
        sys.stdout.buffer.write(result["plaintext"])
        sys.stdout.buffer.flush()


@contextlib.contextmanager
def _progress(label: str, total: int | None) -> Iterator[Progress | None]:
    """A rich progress bar on stderr when it is a terminal; None (no callback) otherwise."""
    if not err.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as Bar

    columns = [BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with Bar(f"[bold]{escape(label)}", *columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _size(path: Path) -> int | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


@contextlib.contextmanager
def _atomic_output(target: Path | None, force: bool) -> Iterator[BinaryIO]:
    """A temporary file beside `target` (mode 0600), renamed onto it only if the block
    succeeds and removed otherwise; stdout if `target` is None."""
    if target is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    if target.exists() and not force:
        fail(f"{target} exists (use --force to replace it)")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror}")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _input_stream(source: str) -> Iterator[BinaryIO]:
    if source == "-":
        yield sys.stdin.buffer
        return
    try:
        stream = Path(source).open("rb")  # noqa: SIM115
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror}")
    with stream:
        yield stream


def _stream_failed(exc: Exception) -> NoReturn:
    if isinstance(exc, ApiError):
        fail_api(exc, code=1 if exc.code == "decryption_failed" else 2)
    if isinstance(exc, KmsgateError):
        fail(f"{exc.code}: {exc.detail}", code=1 if isinstance(exc, DecryptionFailed) else 2)
    assert isinstance(exc, OSError)
    fail(f"I/O error: {exc.strerror or exc}")


@app.command("encrypt-file")
def encrypt_file(
    source: InputArg,
    key: Annotated[str, typer.Option("--key", "-k")],
    context: ContextOpt = [],  # noqa: B006
    output: Annotated[
        str | None,
        typer.Option("-o", "--output", help=f"Default: SOURCE{FILE_SUFFIX}; - for stdout."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Encrypt a file or stdin client-side with a fresh data key (C2SP chunked encryption,
    constant memory). The output appears only once complete."""
    target = _output_path(output, source, lambda p: p + FILE_SUFFIX)
    ctx = _parse_context(context)
    try:
        with (
            _client(addr, token) as client,
            _input_stream(source) as src,
            _atomic_output(target, force) as dst,
            _progress("encrypting", None if source == "-" else _size(Path(source))) as progress,
        ):
            result = client.encrypt_stream(key, src, dst, ctx, progress=progress)
    except (ApiError, KmsgateError, OSError) as exc:
        _stream_failed(exc)
    where = "stdout" if target is None else str(target)
    err.print(f"encrypted {result['bytes']} bytes to {where} (key {key} v{result['key_version']})")


@app.command("decrypt-file")
def decrypt_file(
    source: Annotated[str, typer.Argument(help="Encrypted file, or - for stdin.")],
    context: Annotated[
        list[str],
        typer.Option("--context", "-c", help="Require this context (name=value; repeatable)."),
    ] = [],  # noqa: B006
    output: Annotated[
        str | None,
        typer.Option("-o", "--output", help=f"Default: SOURCE without {FILE_SUFFIX}; - stdout."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Decrypt a file from encrypt-file (the key is named in its header). A failed decrypt
    exits 1 and leaves no output file; on stdout, check the exit status."""

    def strip(path: str) -> str:
        if not path.endswith(FILE_SUFFIX) or path == FILE_SUFFIX:
            fail(f"{path} does not end in {FILE_SUFFIX}: name the output with -o")
        return path[: -len(FILE_SUFFIX)]

    target = _output_path(output, source, strip)
    required = _parse_context(context) if context else None
    try:
        with (
            _client(addr, token) as client,
            _input_stream(source) as src,
            _atomic_output(target, force) as dst,
            _progress("decrypting", None if source == "-" else _size(Path(source))) as progress,
        ):
            result = client.decrypt_stream(src, dst, required, progress=progress)
    except (ApiError, KmsgateError, OSError) as exc:
        _stream_failed(exc)
    where = "stdout" if target is None else str(target)
    err.print(f"decrypted {result['bytes']} bytes to {where} (key {result['key']})")


def _expand(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        elif path.is_file():
            files.append(path)
        else:
            fail(f"{path}: no such file or directory")
    return [p.resolve() for p in files]


def _read_header(path: Path) -> tuple[FileHeader, int] | str:
    """The file's kmsgate header and where its body starts, or why it cannot be migrated."""
    try:
        with path.open("rb") as f:
            header = FileHeader.read(f)
            return header, f.tell()
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    except KmsgateError:
        return "not a kmsgate encrypted file"


def _replace_header(path: Path, body_offset: int, header: FileHeader) -> None:
    """Rewrite `path` with a new header and the same body, atomically (temp file + rename)."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as sink, path.open("rb") as src:
            sink.write(header.to_bytes())
            src.seek(body_offset)
            shutil.copyfileobj(src, sink, 1 << 20)
            sink.flush()
            os.fsync(sink.fileno())
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@app.command("rewrap")
def rewrap_files(
    paths: Annotated[list[Path], typer.Argument(help="Encrypted files or directories.")],
    from_key: Annotated[str, typer.Option("--from-key", help="Migrate files under this key.")],
    to_key: Annotated[str, typer.Option("--to-key", help="To this key (any backend).")],
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Record finished files here and skip them when run again."),
    ] = None,
    rate: Annotated[
        float, typer.Option(min=0, help="At most this many files per second (0: no limit).")
    ] = 0,
    batch: Annotated[int, typer.Option(min=1, max=1000, help="Files per rewrap request.")] = 50,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Migrate encrypt-file outputs to another key: only the headers are rewritten (the data
    key is re-wrapped on the gateway, the data is not re-encrypted). Resumable with
    --checkpoint; files already under --to-key are skipped. Exit 1 if any file failed."""
    files = _expand(paths)
    named = {p.resolve() for p in paths if not p.is_dir()}
    done: set[str] = set()
    if checkpoint is not None and checkpoint.exists():
        done = set(_read_text(checkpoint).splitlines())
    pending = [p for p in files if str(p) not in done]
    counts = {"rewrapped": 0, "skipped": len(files) - len(pending), "failed": 0}
    log = checkpoint.open("a", encoding="utf-8") if checkpoint is not None else None
    started = time.monotonic()

    def finished(path: Path, outcome: str, why: str = "") -> None:
        counts[outcome] += 1
        if why:
            err.print(f"{'warning' if outcome == 'skipped' else 'error'}: {path}: {why}")
        if log is not None and outcome != "failed":
            log.write(f"{path}\n")
            log.flush()

    try:
        with _client(addr, token) as client, _progress_count(len(pending)) as advance:
            for start in range(0, len(pending), batch):
                group: list[tuple[Path, FileHeader, int]] = []
                for path in pending[start : start + batch]:
                    read = _read_header(path)
                    if isinstance(read, str):  # quiet for files found in a directory
                        finished(path, "skipped", read if path in named else "")
                    elif (name := read[0].envelope().key_name) != from_key:
                        finished(path, "skipped", "" if name == to_key else f"under key {name}")
                    else:
                        group.append((path, *read))
                    advance()
                if not group:
                    continue
                items = [
                    {"ciphertext": b64encode(h.data_key), "context": h.context} for _, h, _ in group
                ]
                for (path, header, offset), result in zip(
                    group, client.batch(to_key, "rewrap", items), strict=True
                ):
                    if "error" in result:
                        error = result["error"]
                        finished(path, "failed", f"{error['code']}: {error['detail']}")
                        continue
                    new = FileHeader(header.context, b64decode_strict(result["ciphertext"]))
                    try:
                        _replace_header(path, offset, new)
                    except OSError as exc:
                        finished(path, "failed", f"cannot rewrite: {exc.strerror}")
                        continue
                    finished(path, "rewrapped")
                if rate > 0:  # files per second, averaged from the start
                    processed = start + batch
                    ahead = processed / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
    except ApiError as exc:
        fail_api(exc, "finished files are in the checkpoint; run again")
    finally:
        if log is not None:
            log.close()
    out.print(
        f"rewrapped {counts['rewrapped']}, skipped {counts['skipped']}, failed {counts['failed']}",
        highlight=False,
    )
    if counts["failed"]:
        raise typer.Exit(1)


@contextlib.contextmanager
def _progress_count(total: int) -> Iterator[Any]:
    """advance() for a file-count progress bar on a terminal (a no-op elsewhere)."""
    if not err.is_terminal:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    columns = [BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Bar("[bold]rewrapping", *columns, console=err, transient=True) as bar:
        task = bar.add_task("rewrap", total=total)
        yield lambda: bar.advance(task)


def _output_path(output: str | None, source: str, default: Any) -> Path | None:
    """None for stdout: `-o -`, or reading stdin without -o."""
    if output == "-" or (output is None and source == "-"):
        return None
    return Path(output if output is not None else default(source))


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
