"""What every `kmsgate` command module shares: consoles, common options and arguments, the
one-line failure, and reading, writing and printing helpers."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, BinaryIO, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import TextColumn
from rich.table import Column, Table
from rich.text import Text

from kmsgate.client import ApiError, Client
from kmsgate.encoding import b64encode
from kmsgate.errors import ConfigError, KmsgateError
from kmsgate.files import rename_new, write_all
from kmsgate.text import shown

out = Console(markup=False)  # what is printed (a path, a name, a reason) is text, not markup
err = Console(stderr=True, markup=False)

AddrOpt = Annotated[str | None, typer.Option("--addr", envvar="KMSGATE_ADDR", help="Gateway URL.")]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="KMSGATE_TOKEN", help="API token.", show_default=False),
]
InputArg = Annotated[str, typer.Argument(help="File to read, or - for stdin.")]


JSON_ERRORS: ContextVar[bool] = ContextVar("JSON_ERRORS", default=False)
"""Set by a command asked for `--json`: `fail` then also prints the error as a JSON report
on stdout (`{ok: false, exit_code, error: {code, detail}}`), so a pipe into `jq` gets one."""


@contextlib.contextmanager
def json_errors(enabled: bool) -> Iterator[None]:
    """`JSON_ERRORS` set to `enabled` within the block."""
    token = JSON_ERRORS.set(enabled)
    try:
        yield
    finally:
        JSON_ERRORS.reset(token)


DONE_ALREADY: ContextVar[str] = ContextVar("DONE_ALREADY", default="")
"""Set (`done_already`) once a command has changed something on the gateway and has its
files left to write: `fail` then adds it to the message, so the user learns what to undo
or fetch again (an issued certificate's serial, a pending CA)."""


@contextlib.contextmanager
def done_already(note: str) -> Iterator[None]:
    """`DONE_ALREADY` set to `note` within the block."""
    token = DONE_ALREADY.set(note)
    try:
        yield
    finally:
        DONE_ALREADY.reset(token)


def fail(message: str, code: int = 2, *, problem: str = "error") -> NoReturn:
    """Print `error: message` as one line on stderr and exit with `code`. The message is
    text: a control character in it (a file name's newline or escape sequence) is printed
    as its escape, and "[...]" is no markup. Under `JSON_ERRORS`, also the JSON report,
    whose `error.code` is `problem` (the gateway's problem code, for `fail_api`). Under
    `DONE_ALREADY`, the message ends with what was done: `(... but <note>)`."""
    if note := DONE_ALREADY.get():
        message += f" (but {note})"
    said = escape(shown(message))
    err.print(f"[red]error:[/red] {said}", markup=True, highlight=False, soft_wrap=True)
    if JSON_ERRORS.get():
        error = {"code": problem, "detail": message}
        print(json.dumps({"ok": False, "exit_code": code, "error": error}))
    raise typer.Exit(code)


def name_values(entries: Sequence[str], what: str) -> dict[str, str]:
    """`name=value` entries (`--label`, `--context`, ...) as a dict; exits through `fail`
    for an entry without `=` or a name, and for a name given twice."""
    pairs: dict[str, str] = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not sep or not name:
            fail(f"{what} {entry!r} must read name=value")
        if name in pairs:
            fail(f"{what} {name!r} given twice")
        pairs[name] = value
    return pairs


def fail_api(exc: ApiError, note: str = "", *, credential_hint: str = "") -> NoReturn:
    """`fail` for a gateway error: `code: detail`, then `note`; exit status 1 for a negative
    answer (`decryption_failed`: the ciphertext or its context is not what was encrypted),
    else 2. A 401 to a request that carried no token says how to give one
    (`credential_hint`, by default KMSGATE_TOKEN or --token) and where a dev server keeps
    its root token."""
    code = 1 if exc.code == "decryption_failed" else 2
    message = f"{exc.code}: {exc.detail}"
    if exc.code == "unauthenticated" and not exc.token_sent:
        how = credential_hint or "set KMSGATE_TOKEN or pass --token"
        message += f" (no API token given: {how}; {_root_token_hint()})"
    fail(message + (f" ({note})" if note else ""), code, problem=exc.code)


def _root_token_hint() -> str:
    from kmsgate.config import ROOT_TOKEN_FILE, dev_data_dir

    data_dir = os.environ.get("KMSGATE_DATA_DIR")
    if data_dir:
        return f"a dev server's root token is in {Path(data_dir) / ROOT_TOKEN_FILE}"
    default = dev_data_dir() / ROOT_TOKEN_FILE
    return f"a dev server keeps its root token in DATA_DIR/{ROOT_TOKEN_FILE} (default {default})"


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")


_PRIVATE_KEY_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
"""A PEM private key's first line: PKCS#8 (`PRIVATE KEY`, `ENCRYPTED PRIVATE KEY`), PKCS#1
and SEC 1 (`RSA PRIVATE KEY`, `EC PRIVATE KEY`), OpenSSH's."""


def read_public_pem(path: Path, wanted: str) -> str:
    """The text of `path` (`read_text`), to be sent to the gateway as `wanted` (a public
    key, a CSR). Exits through `fail`, having sent nothing, when it holds a PEM private
    key: the gateway would refuse it, but would have received it."""
    text = read_text(path)
    if _PRIVATE_KEY_PEM.search(text):
        fail(f"{path} holds a private key, which was not sent: give {wanted}")
    return text


ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]


def refuse_existing(
    force: bool,
    *paths: Path | None,
    never_replaced: Sequence[Path | None] = (),
    reads: Sequence[Path | None] = (),
) -> None:
    """Exit through `fail` unless each output path given can be written: its directory
    exists and takes a new file (tried: a read-only file system or a full directory is
    found now), and no file is there, or a regular file and `force`, and no two outputs
    name one file (compared resolved: a key and its certificate, a certificate and its
    chain). An output written in place (`_in_place`: /dev/stdout, a character device, a
    FIFO) needs no `force`. A symbolic link to anything else is refused, even with `force`:
    the rename would replace the link, not write the file it points to. `never_replaced`:
    outputs that no file may be at, even with `force` (a private key, the offline root's
    files). `reads`: the files the command reads (an offline root's key, a CSR): no output
    is one of them, even with `force`. Commands call it before asking the gateway for
    anything, so a refused output costs no operation."""
    read = {path.resolve() for path in reads if path is not None}
    files: set[Path] = set()
    outputs = [(path, False) for path in paths] + [(path, True) for path in never_replaced]
    for path, kept in outputs:
        if path is None:
            continue
        if kept and os.path.lexists(path):
            fail(f"{path} exists: refusing to replace it (never replaced, even with --force)")
        if path.is_dir():
            fail(f"{path} is a directory: give the file to write")
        if _in_place(path):
            continue
        if path.is_symlink():
            fail(
                f"{path} is a symbolic link: refusing to replace it "
                f"(give the file it points to, {os.path.realpath(path)}, or another path)"
            )
        if path.resolve() in files:
            fail(f"{path} is given for two outputs: give each its own file")
        if path.resolve() in read:
            fail(f"{path} is an input of this command: refusing to write over it")
        files.add(path.resolve())
        if path.exists() and not path.is_file():
            fail(f"{path} is not a regular file, a character device or a FIFO")
        if path.exists() and not force:
            fail(f"{path} exists (use --force to replace it)")
        _try_a_new_file_beside(path)


def _descriptor(path: Path) -> int | None:
    """The descriptor of this process that `path` names (/dev/stdout, /dev/stderr, /dev/fd/N,
    /proc/self/fd/N, or a symbolic link to one of them), or None. Followed link by link:
    the file that such a path resolves to (a redirect's file) is not the descriptor."""
    own = Path(f"/proc/{os.getpid()}/fd")
    for _ in range(40):  # the kernel's MAXSYMLINKS
        try:
            parent = path.parent.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if parent == own and path.name.isdigit():
            return int(path.name)
        try:
            path = parent / os.readlink(parent / path.name)
        except OSError:  # not a link (or not there)
            return None
    return None


def _in_place(path: Path) -> bool:
    """Whether `path` is an output written to as it is, not replaced by a rename: one of
    this process's descriptors (/dev/stdout: a redirect's file is written through it), a
    character device or a FIFO (/dev/null, a pipe), also through a symbolic link."""
    return _descriptor(path) is not None or path.is_char_device() or path.is_fifo()


def _try_a_new_file_beside(path: Path) -> None:
    """Exit through `fail` unless the directory of `path` takes a new file. Tried with an
    unnamed file (O_TMPFILE), which nobody sees and which goes with its descriptor, or
    where the system or the file system has none, a temporary file removed at once."""
    flag = getattr(os, "O_TMPFILE", 0)
    try:
        if flag:
            try:
                os.close(os.open(path.parent, flag | os.O_WRONLY | os.O_CLOEXEC, 0o600))
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR):  # EISDIR: an old kernel
                    raise
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}")


def refuse_to_replace(*paths: Path | None) -> None:
    """`refuse_existing` for files never replaced, even with --force (a private key, the
    offline root's files): any file there is refused. Exits through `fail`."""
    refuse_existing(False, never_replaced=paths)


@contextlib.contextmanager
def atomic_output(target: Path, *, force: bool, private: bool) -> Iterator[BinaryIO]:
    """A temporary file beside `target`, renamed onto it only if the block succeeds and
    removed otherwise: a reader never sees part of an output, and a failure leaves what
    was there; without `force`, so does a file made at `target` while the block ran. Mode
    0600 when `private` (a plaintext), else 0666 less the umask. An output
    written in place (`_in_place`: /dev/stdout, a character device, a FIFO) is written to
    as it is: renaming a file onto it would replace it. Exits through `fail` for an output
    `refuse_existing` refuses."""
    refuse_existing(force, target)
    if _in_place(target):
        with _open_special(target, private=private, force=force) as stream:
            yield stream
        return
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror}")
    tmp = Path(tmp_name)
    try:
        if not private:
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        if force:
            os.replace(tmp, target)
        else:
            try:
                rename_new(tmp, target)
            except FileExistsError:
                fail(f"{target} was made while this command ran: left as it is, nothing written")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _open_special(target: Path, *, private: bool, force: bool) -> BinaryIO:
    """`target`, written in place (`_in_place`), opened for writing as it is (not created,
    not truncated): a descriptor of this process is duplicated (a redirect's file is
    written at its offset, appended to if opened so); anything else must open as a FIFO or
    a character device, so a file swapped in meanwhile is refused untouched. A plaintext
    (`private`) goes into a FIFO or a terminal of another user (whoever reads it gets it)
    only with `force`: checked before the open too, which for a FIFO waits for a reader.
    Exits through `fail`."""
    if (descriptor := _descriptor(target)) is not None:
        try:
            return os.fdopen(os.dup(descriptor), "wb")
        except OSError as exc:
            fail(f"cannot write {target}: {exc.strerror}")
    try:
        _refuse_special(target, os.stat(target), private=private, force=force)
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror}")
    try:
        _refuse_special(target, os.fstat(fd), private=private, force=force)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")


def _refuse_special(target: Path, st: os.stat_result, *, private: bool, force: bool) -> None:
    """Exit through `fail` unless `st` is a FIFO or a character device that `target` may
    be written to: for a plaintext (`private`) without `force`, this user's own, or a
    device of root's (/dev/null, /dev/tty), never another user's FIFO or terminal."""
    mode, owner = st.st_mode, st.st_uid
    if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        fail(f"{target} changed after it was checked: refusing to write it")
    fifo = stat.S_ISFIFO(mode)
    if private and not force and owner != os.getuid() and (fifo or owner != 0):
        kind = "FIFO" if fifo else "character device (a terminal?)"
        fail(f"{target} is another user's {kind}, whose reader would get the plaintext (--force)")


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes, *, force: bool, private: bool = False) -> None:
    """`data` into `path` (`write_files`). Exits through `fail` if it cannot."""
    write_files([(path, data)], force=force, private=private)


def write_files(
    outputs: Sequence[tuple[Path | None, bytes]], *, force: bool, private: bool = False
) -> None:
    """Each `(path, data)` of `outputs` (a None path is skipped), once `refuse_existing`
    passes, all or none: the regular files through `kmsgate.files.write_all` (temporary
    files, then renames; a failure leaves every path as it was), after each output written
    in place (`_in_place`: /dev/stdout, a character device, a FIFO). Mode 0600 when
    `private` (a plaintext), else 0666 less the umask. Exits through `fail`, naming the file
    it could not write."""
    given = [(path, data) for path, data in outputs if path is not None]
    refuse_existing(force, *(path for path, _ in given))
    regular = []
    for path, data in given:
        if not _in_place(path):
            regular.append((path, data))
            continue
        try:
            with _open_special(path, private=private, force=force) as stream:
                stream.write(data)
        except OSError as exc:
            fail(f"cannot write {path}: {exc.strerror}")
    try:
        write_all(regular, mode=0o600 if private else 0o666 & ~_umask())
    except OSError as exc:
        paths = exc.filename or ", ".join(str(path) for path, _ in regular)
        fail(f"cannot write {paths}: {exc.strerror or exc}")


@contextlib.contextmanager
def writing_stdout() -> Iterator[None]:
    """The block's writes on stdout, flushed at its end. Exits through `fail` (`cannot
    write stdout: <reason>`, exit 2) when a write or the flush fails (a full disk, a closed
    pipe); what was not written is dropped (stdout is sent to /dev/null), so that Python's
    last flush at exit does not fail again."""
    try:
        yield
        sys.stdout.flush()
    except OSError as exc:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        fail(f"cannot write stdout: {exc.strerror or exc}")


def print_out(text: str | bytes, end: str = "\n") -> None:
    """`text` and `end` on stdout (bytes as they are, without `end`), through
    `writing_stdout`. Exits through `fail` if it cannot be written."""
    with writing_stdout():
        if isinstance(text, bytes):
            sys.stdout.buffer.write(text)
        else:
            sys.stdout.write(text + end)


def print_line(text: str) -> None:
    """One line for a person on stdout (rich, not highlighted), through `writing_stdout`.
    Exits through `fail` if it cannot be written."""
    with writing_stdout():
        out.print(text, highlight=False)


def write_or_print_b64(path: Path | None, data: bytes, *, force: bool) -> None:
    """`data` as raw bytes into `path` (`write_bytes`), or as base64 on stdout when there
    is no path (`print_out`)."""
    if path:
        write_bytes(path, data, force=force)
    else:
        print_out(b64encode(data))


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A rich table on a terminal (a cell too wide for it wraps, never cut); tab-separated
    lines otherwise, so scripts get whole ids.
    A control character or bidirectional override in a cell is printed as its escape: it
    could otherwise forge a row or a column. Exits through `fail` if stdout cannot be
    written (`writing_stdout`)."""
    rows = [[shown(cell) for cell in row] for row in rows]
    if not out.is_terminal:
        print_out("".join("\t".join(row) + "\n" for row in [columns, *rows]), end="")
        return
    # a narrow terminal wraps a cell rather than cut it: two names cut alike read as one
    table = Table(*(Column(header, overflow="fold") for header in columns))
    for row in rows:
        table.add_row(*map(Text, row))  # a cell's "[...]" is text, not rich markup
    with writing_stdout():
        out.print(table)


def call(addr: str | None, token: str | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one SDK call; an API error becomes a one-line message (`fail_api`)."""
    try:
        with Client(addr, token) as client:
            return fn(client, *args, **kwargs)
    except ApiError as exc:
        fail_api(exc)


WHOLE_INPUT_LIMIT = 4 * 1024 * 1024
"""The most a command sends whole in one request reads of its input (the gateway's
default body limit): a larger input would be refused anyway, after being read into memory
(a 2 GB file took 13 GB)."""


def read_input(source: str, instead: str | None = None) -> bytes:
    """The bytes of the file `source` (`-`: stdin), read whole. Exits through `fail` if it
    cannot be read, or holds more than `WHOLE_INPUT_LIMIT` bytes (`instead`: what to do
    then, such as sending a digest)."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read(WHOLE_INPUT_LIMIT + 1)
        else:
            with open(source, "rb") as file:
                data = file.read(WHOLE_INPUT_LIMIT + 1)
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror}")
    if len(data) > WHOLE_INPUT_LIMIT:
        mib = WHOLE_INPUT_LIMIT // (1024 * 1024)
        advice = f": {instead}" if instead else ""
        fail(f"{source} holds over {mib} MiB, more than one request carries{advice}")
    return data


def print_json(value: Any) -> None:
    """`value` as JSON on stdout; exits through `fail` if it cannot be written."""
    with writing_stdout():
        out.print_json(data=value)


class ProgressBar:
    """A rich progress bar on stderr while `shown` runs, when stderr is a terminal: of bytes
    (size, speed, time left) or, with `items`, of a count. Elsewhere nothing is drawn."""

    def __init__(self, label: str, total: int | None = None, *, items: bool = False) -> None:
        self._label = label
        self._total = total
        self._items = items
        self._bar: Any = None
        self._task: Any = None

    def advance(self, done: int) -> None:
        """Add `done` (bytes, or items) to the work done."""
        if self._bar is not None:
            self._bar.advance(self._task, done)

    def set_total(self, total: int) -> None:
        """The work to do, once known after the bar started."""
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    @contextlib.contextmanager
    def shown(self) -> Iterator[ProgressBar]:
        """The bar on screen within the block (removed after it)."""
        if not err.is_terminal:
            yield self
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        done: list[Any] = (
            [MofNCompleteColumn()] if self._items else [DownloadColumn(), TransferSpeedColumn()]
        )
        columns = [bar_label(self._label), BarColumn(), *done, TimeRemainingColumn()]
        with Progress(*columns, console=err, transient=True) as bar:
            self._bar, self._task = bar, bar.add_task(self._label, total=self._total)
            try:
                yield self
            finally:
                self._bar = None


def bar_label(text: str) -> TextColumn:
    """`text` as the label column of a rich progress bar: bold, and shown as it is (a file
    name's "[...]" is no markup, its "{...}" no format field, a control character its
    escape)."""
    return TextColumn(shown(text).replace("{", "{{").replace("}", "}}"), style="bold", markup=False)


@contextlib.contextmanager
def local_errors(path: Path, doing: str) -> Iterator[None]:
    """One-line failures (exit 2) for work done without a gateway: a KmsgateError's detail,
    an OSError as `cannot <doing> <path>: <reason>`."""
    try:
        yield
    except KmsgateError as exc:
        fail(exc.detail)
    except ConfigError as exc:  # a token's module or PIN source (messages carry no values)
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot {doing} {path}: {exc.strerror}")


def print_rows(columns: list[str], items: list[dict[str, Any]]) -> None:
    """`print_table` of these fields of each item (a missing or null field: empty)."""
    print_table(columns, [[str(item.get(c) or "") for c in columns] for item in items])
