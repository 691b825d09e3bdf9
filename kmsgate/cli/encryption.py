"""Encryption commands: `encrypt`/`decrypt` of small inputs on the gateway, and client-side
`encrypt-file`, `decrypt-file` and `rewrap` (streamed, written atomically)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
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

from kmsgate.cli.common import (
    AddrOpt,
    ForceOpt,
    InputArg,
    ProgressBar,
    TokenOpt,
    atomic_output,
    call,
    err,
    fail,
    fail_api,
    name_values,
    print_line,
    print_out,
    read_input,
    read_text,
    refuse_existing,
    write_bytes,
    write_or_print_b64,
)
from kmsgate.client import ApiError, Client
from kmsgate.encoding import b64decode_strict, b64encode
from kmsgate.envelope import FILE_MAGIC, FileHeader
from kmsgate.errors import DecryptionFailed, KmsgateError

ContextOpt = Annotated[
    list[str],
    typer.Option("--context", "-c", help="Encryption context entry name=value; repeatable."),
]
FILE_SUFFIX = ".kmsgate"


def encrypt(
    source: InputArg,
    key: Annotated[str, typer.Option("--key", "-k")],
    context: ContextOpt = [],  # noqa: B006
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the raw ciphertext here.")
    ] = None,
    force: ForceOpt = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Encrypt a small input on the gateway (up to limits.max_input_bytes, 64 KiB by
    default); prints the base64 ciphertext. For files use encrypt-file."""
    refuse_existing(force, output)
    result = call(
        addr,
        token,
        Client.encrypt,
        key,
        read_input(source, "use encrypt-file"),
        name_values(context, "context entry"),
    )
    write_or_print_b64(output, result["ciphertext"], force=force)
    err.print(f"key_version={result['key_version']}")


def decrypt(
    source: Annotated[str, typer.Argument(help="Ciphertext file (raw or base64), - for stdin.")],
    key: Annotated[str, typer.Option("--key", "-k")],
    context: ContextOpt = [],  # noqa: B006
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the plaintext here (0600).")
    ] = None,
    force: ForceOpt = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Decrypt a ciphertext from `encrypt` (or a data key from `datakey`) on the gateway."""
    refuse_existing(force, output)
    raw = read_input(source)
    try:
        ciphertext = b64decode_strict(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        ciphertext = raw
    result = call(
        addr, token, Client.decrypt, key, ciphertext, name_values(context, "context entry")
    )
    if output:
        write_bytes(output, result["plaintext"], force=force, private=True)
    else:
        print_out(result["plaintext"])


def _size(path: Path) -> int | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


@contextlib.contextmanager
def _output(target: Path | None, force: bool) -> Iterator[BinaryIO]:
    """`atomic_output` onto `target` (0600), or stdout if `target` is None."""
    if target is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with atomic_output(target, force=force, private=True) as sink:
        yield sink


@contextlib.contextmanager
def _opened(path: Path, mode: str) -> Iterator[BinaryIO]:
    """`path` opened in binary `mode` ("rb" or "wb"); a one-line error if it cannot be."""
    try:
        stream = path.open(mode)
    except OSError as exc:
        fail(f"cannot {'read' if 'r' in mode else 'write'} {path}: {exc.strerror}")
    with stream:
        yield stream  # type: ignore[misc]


@contextlib.contextmanager
def _input_stream(source: str) -> Iterator[BinaryIO]:
    if source == "-":
        yield sys.stdin.buffer
        return
    with _opened(Path(source), "rb") as stream:
        yield stream


_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE, errno.EROFS})
"""Errors of writing, not reading: a full disk, a quota, a file size limit, a closed pipe."""


def _stream_failed(exc: Exception, source: str, target: Path | None) -> NoReturn:
    """Exit through `fail` for what stopped a stream: the gateway's or the format's error,
    or the I/O error, naming the file written when writing failed (an existing file there
    is unchanged: the output is renamed onto it only once whole)."""
    if isinstance(exc, ApiError):
        fail_api(exc)
    if isinstance(exc, KmsgateError):
        fail(f"{exc.code}: {exc.detail}", code=1 if isinstance(exc, DecryptionFailed) else 2)
    assert isinstance(exc, OSError)
    why = exc.strerror or str(exc)
    if exc.errno not in _WRITE_ERRORS:
        fail(f"I/O error reading {source} or writing {target or 'stdout'}: {why}")
    if target is None:
        fail(f"cannot write stdout: {why}")
    fail(f"cannot write {target}: {why} (a file there before is unchanged)")


def encrypt_file(
    source: InputArg,
    key: Annotated[str, typer.Option("--key", "-k")],
    context: ContextOpt = [],  # noqa: B006
    output: Annotated[
        str | None,
        typer.Option("-o", "--output", help=f"Default: SOURCE{FILE_SUFFIX}; - for stdout."),
    ] = None,
    force: ForceOpt = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Encrypt a file or stdin client-side with a fresh data key (C2SP chunked encryption,
    constant memory). The output appears only once complete."""
    target = _output_path(output, source, lambda p: p + FILE_SUFFIX)
    if target is None and sys.stdout.isatty():
        fail("the ciphertext is binary: give -o FILE, or redirect stdout")
    ctx = name_values(context, "context entry")
    try:
        with (
            Client(addr, token) as client,
            _input_stream(source) as src,
            _output(target, force) as dst,
            ProgressBar(
                "encrypting", None if source == "-" else _size(Path(source))
            ).shown() as bar,
        ):
            result = client.encrypt_stream(key, src, dst, ctx, progress=bar.advance)
    except (ApiError, KmsgateError, OSError) as exc:
        _stream_failed(exc, source, target)
    where = "stdout" if target is None else str(target)
    err.print(f"encrypted {result['bytes']} bytes to {where} (key {key} v{result['key_version']})")


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
    force: ForceOpt = False,
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
    required = name_values(context, "context entry") if context else None
    try:
        with (
            Client(addr, token) as client,
            _input_stream(source) as src,
            _output(target, force) as dst,
            ProgressBar(
                "decrypting", None if source == "-" else _size(Path(source))
            ).shown() as bar,
        ):
            result = client.decrypt_stream(src, dst, required, progress=bar.advance)
    except (ApiError, KmsgateError, OSError) as exc:
        _stream_failed(exc, source, target)
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


def _read_header(path: Path) -> tuple[FileHeader, int] | tuple[str, str]:
    """The file's kmsgate header and where its body starts, or the outcome it gets instead
    and why: "skipped" for a file that is not kmsgate's, "failed" for one that cannot be
    read or whose header is damaged (it is not migrated, so its key must stay)."""
    try:
        with path.open("rb") as f:
            if f.read(len(FILE_MAGIC)) != FILE_MAGIC:
                return "skipped", "not a kmsgate encrypted file"
            f.seek(0)
            header = FileHeader.read(f)
            return header, f.tell()
    except OSError as exc:
        return "failed", f"cannot read: {exc.strerror}"
    except KmsgateError as exc:
        return "failed", f"damaged header: {exc.detail}"


_CHANGED_MEANWHILE = (
    "changed by another program or migration while its data key was re-wrapped: left as it "
    "is; run again"
)


class _FileChanged(Exception):
    """The file no longer holds the header its data key was re-wrapped from."""


def _replace_header(path: Path, old: tuple[FileHeader, int], header: FileHeader) -> None:
    """Rewrite `path` with `header` in place of the header `old` (the header read before
    its data key was re-wrapped, and where the body starts) and the same body, atomically
    (temp file + rename), keeping its owner, group and mode (root migrating users' files
    leaves them theirs). An exclusive `flock` on the file makes another `rewrap` of it wait.
    Raises _FileChanged, `path` unchanged, if it no longer starts with `old`, or no longer
    names the file opened, or that file was written while its body was copied (a writer or
    another migration changed it: copying the body from the old header's offset would
    splice another data key's body under this header, and lose it; a writer's rename in
    the instant between the last check and this one's is not seen); OSError, `path`
    unchanged: one that cannot be read or replaced, or whose owner or group this user
    cannot give the new file."""
    with path.open("rb") as src:
        fcntl.flock(src.fileno(), fcntl.LOCK_EX)  # released when src is closed
        was = os.fstat(src.fileno())
        try:
            same = FileHeader.read(src) == old[0] and src.tell() == old[1]
        except KmsgateError:
            same = False
        if not same or _changed(was, os.stat(path)):
            raise _FileChanged
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as sink:
                new = os.fstat(sink.fileno())
                if (was.st_uid, was.st_gid) != (new.st_uid, new.st_gid):
                    os.fchown(sink.fileno(), was.st_uid, was.st_gid)
                os.fchmod(sink.fileno(), stat.S_IMODE(was.st_mode))
                sink.write(header.to_bytes())
                shutil.copyfileobj(src, sink, 1 << 20)
                sink.flush()
                os.fsync(sink.fileno())
            if _changed(was, os.fstat(src.fileno())) or _changed(was, os.stat(path)):
                raise _FileChanged  # written, or replaced, while its body was copied
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _changed(was: os.stat_result, now: os.stat_result) -> bool:
    """Whether `now` is another file than `was`, or the same one written since."""
    return (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (
        was.st_dev,
        was.st_ino,
        was.st_size,
        was.st_mtime_ns,
    )


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
    --checkpoint; files already under --to-key are skipped. With --to-key the same as
    --from-key, files move to the key's primary version (after a rotation), and those
    already there are skipped. Exit 1 if any file failed."""
    files = _expand(paths)
    named = {p.resolve() for p in paths if not p.is_dir()}
    done: set[str] = set()
    if checkpoint is not None and checkpoint.exists():
        done = set(read_text(checkpoint).splitlines())
    pending = [p for p in files if str(p) not in done]
    counts = {"rewrapped": 0, "skipped": len(files) - len(pending), "failed": 0}
    try:
        log = checkpoint.open("a", encoding="utf-8") if checkpoint is not None else None
    except OSError as exc:  # before any file is changed
        fail(f"cannot write {checkpoint}: {exc.strerror}")
    started = time.monotonic()

    def finished(path: Path, outcome: str, why: str = "") -> None:
        counts[outcome] += 1
        if why:
            level = "warning" if outcome == "skipped" else "error"
            err.print(f"{level}: {path}: {why}", soft_wrap=True)
        if log is not None and outcome != "failed":
            log.write(f"{path}\n")
            log.flush()

    under_from_key = 0
    try:
        with (
            Client(addr, token) as client,
            ProgressBar("rewrapping", len(pending), items=True).shown() as bar,
        ):
            current = _primary_version(client, to_key) if from_key == to_key else None
            for start in range(0, len(pending), batch):
                group: list[tuple[Path, FileHeader, int]] = []
                chunk = pending[start : start + batch]
                for path in chunk:
                    read = _read_header(path)
                    if isinstance(read[0], str):  # another file is quiet if found in a directory
                        outcome, why = read
                        quiet = outcome == "skipped" and path not in named
                        finished(path, outcome, "" if quiet else str(why))
                    elif (name := (envelope := read[0].envelope()).key_name) != from_key:
                        finished(path, "skipped", "" if name == to_key else f"under key {name}")
                    else:
                        under_from_key += 1
                        if envelope.key_version == current:  # nothing to move it to
                            finished(path, "skipped")
                        else:
                            group.append((path, *read))
                    bar.advance(1)
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
                        _replace_header(path, (header, offset), new)
                    except _FileChanged:
                        finished(path, "failed", _CHANGED_MEANWHILE)
                        continue
                    except OSError as exc:
                        finished(path, "failed", f"cannot rewrite: {exc.strerror}")
                        continue
                    finished(path, "rewrapped")
                if rate > 0 and start + batch < len(pending):  # files a second, from the start
                    ahead = (start + len(chunk)) / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
    except ApiError as exc:
        hint = "finished files are in the checkpoint; run again" if log is not None else ""
        fail_api(exc, hint)
    finally:
        if log is not None:
            log.close()
    if pending and not under_from_key:  # a misspelt --from-key, or a migration done
        err.print(f"warning: no file to migrate was under key {from_key}", soft_wrap=True)
    summary = ", ".join(f"{outcome} {count}" for outcome, count in counts.items())
    print_line(summary)
    if counts["failed"]:
        raise typer.Exit(1)


def _primary_version(client: Client, name: str) -> int | None:
    """Key `name`'s primary version, or None if the caller may not read the key (then
    every file under it is re-wrapped)."""
    try:
        version = client.get_key(name).get("primary_version")
    except ApiError:
        return None
    return version if isinstance(version, int) else None


def _output_path(output: str | None, source: str, default: Any) -> Path | None:
    """None for stdout: `-o -`, or reading stdin without -o."""
    if output == "-" or (output is None and source == "-"):
        return None
    return Path(output if output is not None else default(source))
