"""`kmsgate encrypt` / `decrypt` / `encrypt-file` / `decrypt-file` / `rewrap` against a real
dev gateway (`kmsgate serve --dev` subprocess, CLI as separate processes, as in test_cli.py).

Tampering with any region, truncating, extending or swapping chunks must fail with a
non-zero exit and leave no output file. The slow test encrypts and decrypts a large file
(256 MiB; 2 GiB with KMSGATE_BIG=1) and checks the peak RSS of the CLI process.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import pty
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from rich.console import Console
from rich.progress import Progress

from kmsgate.chunked import HEADER_BYTES, SEALED_CHUNK_BYTES
from kmsgate.cli import encryption
from kmsgate.cli.common import atomic_output, bar_label
from kmsgate.envelope import FILE_MAGIC, FileHeader
from tests.test_cli import Gateway, clean_env, kmsgate_script, running_gateway, setup_key

RSS_LIMIT = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("encgw")) as gateway:
        for name in ("fk", "fk2", "fk3"):
            setup_key(gateway, name, "aes-256-gcm", "envelope-data")
        setup_key(gateway, "signer", "ecdsa-p256")
        yield gateway


def _no_temp_left(directory: Path) -> None:
    leftovers = [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_server_side_encrypt_decrypt(gw, tmp_path):
    data = tmp_path / "small"
    data.write_bytes(b"server side \x00\xff")
    enc = gw.ok("encrypt", str(data), "-k", "fk", "-c", "app=x")
    assert "key_version=1" in enc.err
    ct = enc.out.strip()
    base64.b64decode(ct, validate=True)
    out = tmp_path / "out"
    gw.ok("decrypt", "-", "-k", "fk", "-c", "app=x", "-o", str(out), stdin=ct.encode())
    assert out.read_bytes() == b"server side \x00\xff"
    # a wrong context is a negative answer (exit 1, as decrypt-file's), with no output file
    wrong = gw.run(
        "decrypt", "-", "-k", "fk", "-c", "app=y", "-o", str(tmp_path / "no"), stdin=ct.encode()
    )
    assert wrong.rc == 1 and "decryption_failed" in wrong.err
    assert not (tmp_path / "no").exists()
    absent = gw.run("decrypt", "-", "-k", "nokey", stdin=ct.encode())
    assert absent.rc == 2 and "not_found" in absent.err
    bad = gw.run("encrypt", str(data), "-k", "fk", "-c", "novalue")
    assert bad.rc == 2 and "name=value" in bad.err


@pytest.mark.parametrize("size", [0, 1, 16384, 16384 * 3 + 7, 1_000_000])
def test_file_round_trip(gw, tmp_path, size):
    src = tmp_path / "plain.bin"
    src.write_bytes(os.urandom(size))
    gw.ok("encrypt-file", str(src), "-k", "fk", "-c", "tenant=acme", "-c", "doc=1")
    enc = tmp_path / "plain.bin.kmsgate"
    header = FileHeader.read(enc.open("rb"))
    assert header.context == {"tenant": "acme", "doc": "1"}
    assert header.envelope().key_name == "fk"
    assert oct(enc.stat().st_mode & 0o777) == "0o600"
    src.rename(tmp_path / "orig.bin")
    gw.ok("decrypt-file", str(enc))
    assert src.read_bytes() == (tmp_path / "orig.bin").read_bytes()
    # the required context must match the header's
    other = gw.run("decrypt-file", str(enc), "-o", str(tmp_path / "x"), "-c", "tenant=evil")
    assert other.rc == 1 and not (tmp_path / "x").exists()
    # refuses to overwrite without --force
    again = gw.run("decrypt-file", str(enc))
    assert again.rc == 2 and "exists" in again.err
    gw.ok("decrypt-file", str(enc), "--force")
    _no_temp_left(tmp_path)


def test_stdin_stdout(gw, tmp_path):
    data = os.urandom(70_000)
    enc = subprocess.run(
        [kmsgate_script(), "encrypt-file", "-", "-k", "fk"],
        input=data,
        capture_output=True,
        env=gw.env(),
        timeout=60,
        check=True,
    ).stdout
    assert enc.startswith(b"KMSGATE\n")
    dec = subprocess.run(
        [kmsgate_script(), "decrypt-file", "-"],
        input=enc,
        capture_output=True,
        env=gw.env(),
        timeout=60,
        check=True,
    ).stdout
    assert dec == data


def _variants(ct: bytes, body: int) -> dict[str, bytes]:
    """Tampered copies: a flipped byte in every region, truncations, extension, swaps."""
    out: dict[str, bytes] = {}
    positions = {
        "magic": 0,
        "format": 8,
        "context": 12,
        "datakey": body - 20,
        "salt": body + 3,
        "commitment": body + 30,
        "chunk0": body + HEADER_BYTES + 100,
        "tag0": body + HEADER_BYTES + SEALED_CHUNK_BYTES - 1,
        "chunk1": body + HEADER_BYTES + SEALED_CHUNK_BYTES + 5,
        "last": len(ct) - 1,
    }
    for name, i in positions.items():
        flipped = bytearray(ct)
        flipped[i] ^= 0x04
        out[f"flip-{name}"] = bytes(flipped)
    for cut in (1, 16, 17, len(ct) - body - HEADER_BYTES - SEALED_CHUNK_BYTES):
        out[f"truncate-{cut}"] = ct[:-cut]
    out["truncate-header"] = ct[: body - 3]
    out["extend"] = ct + b"\x00" * 20
    c0 = body + HEADER_BYTES
    chunk0, chunk1 = (
        ct[c0 : c0 + SEALED_CHUNK_BYTES],
        ct[c0 + SEALED_CHUNK_BYTES : c0 + 2 * SEALED_CHUNK_BYTES],
    )
    out["swap"] = ct[:c0] + chunk1 + chunk0 + ct[c0 + 2 * SEALED_CHUNK_BYTES :]
    out["duplicate"] = ct[:c0] + chunk0 + chunk0 + ct[c0 + 2 * SEALED_CHUNK_BYTES :]
    return out


def test_tampering_fails_without_output(gw, tmp_path):
    src = tmp_path / "doc"
    src.write_bytes(os.urandom(3 * 16384 + 500))
    gw.ok("encrypt-file", str(src), "-k", "fk", "-c", "t=1")
    ct = (tmp_path / "doc.kmsgate").read_bytes()
    body = len(FileHeader.read((tmp_path / "doc.kmsgate").open("rb")).to_bytes())
    for name, bad in _variants(ct, body).items():
        path = tmp_path / f"{name}.kmsgate"
        path.write_bytes(bad)
        out = tmp_path / f"{name}.out"
        result = gw.run("decrypt-file", str(path), "-o", str(out))
        assert result.rc != 0, f"{name}: {result}"
        assert "Traceback" not in result.err, result
        assert not out.exists(), name
    _no_temp_left(tmp_path)


def test_wrong_key_type_and_unknown_key(gw, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    r = gw.run("encrypt-file", str(src), "-k", "signer")
    assert r.rc == 2 and "invalid_request" in r.err
    assert not (tmp_path / "f.kmsgate").exists()
    r = gw.run("encrypt-file", str(src), "-k", "nope")
    assert r.rc == 2 and not (tmp_path / "f.kmsgate").exists()
    _no_temp_left(tmp_path)


def test_rewrap_migration_resumes(gw, tmp_path):
    files = tmp_path / "tree"
    (files / "sub").mkdir(parents=True)
    originals = {}
    for i in range(5):
        p = files / ("sub" if i % 2 else ".") / f"f{i}"
        p.write_bytes(os.urandom(20_000 + i))
        originals[p.resolve()] = p.read_bytes()
        gw.ok("encrypt-file", str(p), "-k", "fk2", "-c", f"n={i}")
        p.unlink()
    other = files / "other.kmsgate"
    plain = files / "other"
    plain.write_bytes(b"other key")
    gw.ok("encrypt-file", str(plain), "-k", "fk", "-o", str(other))
    plain.unlink()
    bodies = {p: p.read_bytes()[-1000:] for p in files.rglob("*.kmsgate")}
    checkpoint = tmp_path / "cp"
    # a first run that stops after two files (simulated interruption: checkpoint pre-filled)
    first = sorted(p for p in files.rglob("*.kmsgate") if p.name.startswith("f"))[:2]
    gw.ok(
        "rewrap",
        str(first[0]),
        str(first[1]),
        "--from-key",
        "fk2",
        "--to-key",
        "fk3",
        "--checkpoint",
        str(checkpoint),
    )
    assert checkpoint.read_text().splitlines() == [str(p.resolve()) for p in first]
    run = gw.ok(
        "rewrap",
        str(files),
        "--from-key",
        "fk2",
        "--to-key",
        "fk3",
        "--checkpoint",
        str(checkpoint),
        "--rate",
        "100",
        "--batch",
        "2",
    )
    assert "rewrapped 3, skipped 3, failed 0" in run.out, run
    for p, tail in bodies.items():
        assert p.read_bytes()[-1000:] == tail  # bodies untouched
        header = FileHeader.read(p.open("rb"))
        assert header.envelope().key_name == ("fk" if p == other else "fk3")
    # old key can be disabled: the migrated files still decrypt
    gw.ok("keys", "disable", "fk2")
    for p, data in originals.items():
        gw.ok("decrypt-file", str(p) + ".kmsgate")
        assert p.read_bytes() == data
    _no_temp_left(files)


def _rss_child(gw: Gateway, args: list[str]) -> int:
    """Peak RSS (bytes) of one CLI process, via resource.getrusage in a wrapper process."""
    code = (
        "import resource, subprocess, sys\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        ["python", "-c", code, kmsgate_script(), *args],
        capture_output=True,
        env=gw.env(),
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return int(proc.stdout.decode().split()[-1]) * 1024  # ru_maxrss is KiB on Linux


@pytest.mark.slow
def test_big_file_constant_memory(gw, tmp_path):
    size = (2 << 30) if os.environ.get("KMSGATE_BIG") == "1" else (256 << 20)
    src = tmp_path / "big"
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with src.open("wb") as f:
        for i in range(size >> 20):
            chunk = block[i % 251 :] + block[: i % 251]  # distinct blocks, cheap to make
            f.write(chunk)
            h.update(chunk)
    expected = h.hexdigest()
    t0 = time.perf_counter()
    rss_enc = _rss_child(gw, ["encrypt-file", str(src), "-k", "fk"])
    t1 = time.perf_counter()
    src.unlink()
    rss_dec = _rss_child(gw, ["decrypt-file", str(src) + ".kmsgate"])
    t2 = time.perf_counter()
    got = hashlib.sha256()
    with src.open("rb") as f:
        while chunk := f.read(1 << 20):
            got.update(chunk)
    assert got.hexdigest() == expected
    print(
        f"\n{size >> 20} MiB: encrypt-file {size / (t1 - t0) / 1e6:.0f} MB/s, "
        f"peak RSS {rss_enc >> 20} MiB; decrypt-file {size / (t2 - t1) / 1e6:.0f} MB/s, "
        f"peak RSS {rss_dec >> 20} MiB"
    )
    assert rss_enc < RSS_LIMIT and rss_dec < RSS_LIMIT


@pytest.mark.parametrize(
    ("command", "signum"),
    [
        ("decrypt-file", signal.SIGTERM),
        ("decrypt-file", signal.SIGHUP),
        ("encrypt-file", signal.SIGTERM),
    ],
)
def test_a_run_stopped_by_a_signal_leaves_no_partial_output(gw, tmp_path, command, signum):
    """SIGTERM (timeout, systemd, Kubernetes and CI cancellation send it) and SIGHUP end a
    run as Ctrl-C does: exit 128 + the signal, no temporary file, no output (half a
    plaintext must never stay on disk)."""
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(96 << 20))
    if command == "decrypt-file":
        gw.ok("encrypt-file", str(src), "-k", "fk", "-o", str(tmp_path / "big.kmsgate"))
        src.unlink()
        args = [command, str(tmp_path / "big.kmsgate"), "-o", str(tmp_path / "out.bin")]
    else:
        args = [command, str(src), "-k", "fk", "-o", str(tmp_path / "out.bin")]
    proc = subprocess.Popen([kmsgate_script(), *args], env=gw.env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):  # it is writing
        assert proc.poll() is None and time.monotonic() < deadline, "it never started writing"
        time.sleep(0.005)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert b"Traceback" not in err
    assert not (tmp_path / "out.bin").exists()
    _no_temp_left(tmp_path)


def test_an_output_that_is_a_directory_is_refused_as_such(gw, tmp_path):
    src = tmp_path / "plain.bin"
    src.write_bytes(b"x")
    run = gw.run("encrypt-file", str(src), "-k", "fk", "-o", str(tmp_path), "--force")
    assert run.rc == 2 and f"{tmp_path} is a directory" in run.err
    _no_temp_left(tmp_path)


@pytest.mark.parametrize("when", ["while re-wrapping", "while copying the body"])
@pytest.mark.parametrize("writer", ["replaces", "rewrites in place"])
def test_rewrap_leaves_a_file_changed_meanwhile_as_it_is(gw, tmp_path, monkeypatch, writer, when):
    """A file written anew while its old data key was being re-wrapped (an application's
    `encrypt-file --force`, another migration) got the old header spliced onto its new
    body, reported `rewrapped`: the new data key was gone, and the new contents with it.
    Now the file is left as the writer made it, and counted as failed."""
    from typer.testing import CliRunner

    from kmsgate.cli import app
    from kmsgate.client import Client

    doc = tmp_path / "doc.kmsgate"
    new = b"written while the migration ran " * 2000
    with Client(gw.addr, gw.root_token) as client:
        with doc.open("wb") as out:
            client.encrypt_stream("fk", io.BytesIO(b"old " * 1000), out, {"p": "1"})
        fresh = io.BytesIO()
        client.encrypt_stream("fk", io.BytesIO(new), fresh, {"p": "1"})

    def write() -> None:
        if writer == "replaces":
            (tmp_path / "w.tmp").write_bytes(fresh.getvalue())
            os.replace(tmp_path / "w.tmp", doc)
        else:
            doc.write_bytes(fresh.getvalue())

    if when == "while re-wrapping":
        batch = Client.batch
        monkeypatch.setattr(Client, "batch", lambda *args: (write(), batch(*args))[1])
    else:
        copy = encryption.shutil.copyfileobj
        monkeypatch.setattr(encryption.shutil, "copyfileobj", lambda *a: (write(), copy(*a))[1])
    args = ["rewrap", str(doc), "--from-key", "fk", "--to-key", "fk3"]
    run = CliRunner().invoke(app, args, env=gw.env())
    assert run.exit_code == 1 and "rewrapped 0, skipped 0, failed 1" in run.stdout, run.output
    assert "changed by another program or migration" in run.stderr
    assert doc.read_bytes() == fresh.getvalue()
    _no_temp_left(tmp_path)
    gw.ok("decrypt-file", str(doc), "-o", str(tmp_path / "doc"))
    assert (tmp_path / "doc").read_bytes() == new


def test_rewrap_to_the_same_key_moves_files_to_its_primary_version_once(gw, tmp_path):
    gw.ok("keys", "create", "same", "--type", "aes-256-gcm")
    files = []
    for i in range(2):
        plain = tmp_path / f"s{i}"
        plain.write_bytes(os.urandom(5000))
        gw.ok("encrypt-file", str(plain), "-k", "same")
        files.append(tmp_path / f"s{i}.kmsgate")
    gw.ok("keys", "rotate", "same")
    for path in files:  # root migrating users' files leaves them theirs
        path.chmod(0o640)
        if os.getuid() == 0:
            os.chown(path, 65534, 65534)
    owners = [(st.st_uid, st.st_gid, st.st_mode) for st in map(os.stat, files)]
    args = ("rewrap", *map(str, files), "--from-key", "same", "--to-key", "same")
    assert "rewrapped 2, skipped 0, failed 0" in gw.ok(*args).out
    assert [(st.st_uid, st.st_gid, st.st_mode) for st in map(os.stat, files)] == owners
    again = gw.ok(*args)
    assert "rewrapped 0, skipped 2, failed 0" in again.out, again
    assert "no file to migrate" not in again.err
    for path in files:
        assert FileHeader.read(path.open("rb")).envelope().key_version == 2


def test_rewrap_fails_on_a_damaged_file_and_keeps_to_its_rate(gw, tmp_path):
    """A kmsgate file whose header is damaged is a failure (exit 1, named, not in the
    checkpoint: its data is still under the old key), not a quiet skip as a file of another
    kind in the directory is; --rate counts the files of the last, partial batch, and
    three files at one a second take no 50 s (a whole batch's worth)."""
    for name in ("rw-from", "rw-to"):
        setup_key(gw, name, "aes-256-gcm", "envelope-data")
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(3):
        plain = tree / f"f{i}"
        plain.write_bytes(b"x" * 100)
        gw.ok("encrypt-file", str(plain), "-k", "rw-from")
        plain.unlink()
    (tree / "notes.txt").write_text("not encrypted")
    damaged = tree / "damaged.kmsgate"
    damaged.write_bytes(FILE_MAGIC + b"\xff" * 40)
    checkpoint = tmp_path / "cp"
    started = time.monotonic()
    run = gw.run(
        "rewrap", str(tree), "--from-key", "rw-from", "--to-key", "rw-to",
        "--checkpoint", str(checkpoint), "--rate", "1",
    )  # fmt: skip
    assert time.monotonic() - started < 20
    assert run.rc == 1, run
    assert "rewrapped 3, skipped 1, failed 1" in run.out, run
    assert f"error: {damaged.resolve()}: damaged header" in run.err
    assert "notes.txt" not in run.err
    assert str(damaged.resolve()) not in checkpoint.read_text().splitlines()
    damaged.unlink()
    typo = gw.run("rewrap", str(tree), "--from-key", "rw-fromm", "--to-key", "rw-to")
    assert typo.rc == 0 and "warning: no file to migrate was under key rw-fromm" in typo.err


def test_a_path_is_printed_as_it_is(gw, tmp_path):
    """A file name holding "[/b]" or "{x}" is text to the CLI: rich read it as markup and
    failed (exit 1, after the file was written), or dropped "[red]" from the message."""
    (tmp_path / "mk[").mkdir()
    odd = tmp_path / "mk[" / "b]{x}[red]plain"  # the path holds "[/b]"
    odd.write_bytes(b"odd name")
    sealed = gw.ok("encrypt-file", str(odd), "-k", "fk")
    assert f"to {odd}.kmsgate" in sealed.err.replace("\n", ""), sealed
    odd.unlink()
    opened = gw.ok("decrypt-file", f"{odd}.kmsgate")
    assert f"to {odd}" in opened.err.replace("\n", "") and odd.read_bytes() == b"odd name"


def test_decrypting_to_dev_null_checks_a_file_and_leaves_the_device(gw, tmp_path):
    """`decrypt-file F -o /dev/null` checks a file's integrity: a character device (or a
    FIFO) is written to as it is, without --force, and stays what it was (with --force
    it was replaced by a regular file holding the plaintext)."""
    plain = tmp_path / "p"
    plain.write_bytes(b"y" * 50_000)
    gw.ok("encrypt-file", str(plain), "-k", "fk")
    checked = gw.ok("decrypt-file", f"{plain}.kmsgate", "-o", "/dev/null")
    assert "decrypted 50000 bytes to /dev/null" in checked.err
    assert Path("/dev/null").is_char_device()
    damaged = tmp_path / "damaged.kmsgate"
    data = bytearray(Path(f"{plain}.kmsgate").read_bytes())
    data[-5] ^= 1
    damaged.write_bytes(bytes(data))
    assert gw.run("decrypt-file", str(damaged), "-o", "/dev/null").rc == 1
    assert Path("/dev/null").is_char_device()


def _audited(gw: Gateway, action: str) -> int:
    log = (gw.data_dir / "audit.log").read_text().splitlines()
    return sum(json.loads(line)["action"] == action for line in log)


@pytest.mark.parametrize(
    ("action", "command", "private"),
    [
        ("decrypt", ("decrypt", "{ciphertext}", "-k", "fk"), True),
        ("encrypt", ("encrypt", "-", "-k", "fk"), False),
        ("sign", ("sign", "-", "-k", "signer"), False),
    ],
)
def test_an_output_file_is_replaced_only_with_force_and_before_any_operation(
    gw, tmp_path, action, command, private
):
    """`-o FILE` over an existing file is refused before the gateway is asked anything (no
    operation, no audit record, the file as it was); with --force the file is replaced
    whole. A plaintext is written 0600, a ciphertext or a signature 0666 less the umask."""
    ciphertext = tmp_path / "ct"
    gw.ok("encrypt", "-", "-k", "fk", "-o", str(ciphertext), stdin=b"small secret")
    argv = [arg.format(ciphertext=ciphertext) for arg in command]
    target = tmp_path / "out"
    target.write_text("important")
    before = _audited(gw, action)
    refused = gw.run(*argv, "-o", str(target), stdin=b"small secret")
    assert refused.rc == 2 and "exists (use --force" in refused.err
    assert target.read_text() == "important"
    gw.ok("keys", "list")  # a later request: a record of the refused one would be written by now
    assert _audited(gw, action) == before
    gw.ok(*argv, "-o", str(target), "--force", stdin=b"small secret")
    assert _audited(gw, action) == before + 1
    written = target.read_bytes()
    assert written != b"important" and (written == b"small secret") == (action == "decrypt")
    umask = os.umask(0o077)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == (0o600 if private else 0o666 & ~umask)
    _no_temp_left(tmp_path)


def test_encrypt_file_writes_no_ciphertext_to_a_terminal(tmp_path):
    """Binary ciphertext on a terminal is garbage that can set its modes: with stdout a
    terminal and no -o, encrypt-file refuses (one line, exit 2) before asking anything."""
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [kmsgate_script(), "encrypt-file", "-", "-k", "fk"],
            input=b"secret",
            stdout=follower,
            stderr=subprocess.PIPE,
            env=clean_env(KMSGATE_ADDR="http://127.0.0.1:1"),
            timeout=30,
            check=False,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert done.returncode == 2
    assert b"the ciphertext is binary: give -o FILE" in done.stderr


def test_a_context_too_large_for_the_file_header_is_one_error_line(tmp_path):
    """32 entries of 256 four-byte characters are within the API's limits but not within a
    file header's 65,535 bytes: a one-line error (exit 2) before the gateway is asked
    (a traceback came after the data key was made)."""
    plain = tmp_path / "p"
    plain.write_bytes(b"x")
    entries = [f"{chr(0x1F600 + i)}{'😀' * 255}={'😀' * 256}" for i in range(32)]
    args = [a for entry in entries for a in ("-c", entry)]
    done = subprocess.run(
        [kmsgate_script(), "encrypt-file", str(plain), "-k", "fk", *args],
        capture_output=True,
        env=clean_env(KMSGATE_ADDR="http://127.0.0.1:1"),
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert b"a file header holds at most 65535" in done.stderr
    assert b"Traceback" not in done.stderr and not (tmp_path / "p.kmsgate").exists()


def test_a_progress_bar_label_is_shown_as_it_is_not_as_markup() -> None:
    """The CLI's stderr console reads no markup: a label built as "[bold]..." showed the
    tag itself ("[bold]encrypting"). A file name's brackets, braces and control characters
    are shown as they are (escaped for the last)."""
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, markup=False, width=100, color_system=None)
    with Progress(bar_label("encrypting [x] {y}\x1b"), console=console) as bar:
        bar.add_task("t", total=None)
        bar.refresh()
    text = screen.getvalue()
    assert "encrypting [x] {y}\\x1b" in text and "[bold]" not in text


@pytest.mark.timeout(60)
def test_a_plaintext_goes_into_another_users_fifo_only_with_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever reads a FIFO gets what is written into it: a plaintext output that is a FIFO
    of another user is refused without --force, at once (the open of a FIFO waits for a
    reader: it hung until one came); one's own FIFO, and any FIFO for a public output, is
    written to as it is."""
    fifo = tmp_path / "plain"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def write(*, private: bool, force: bool) -> None:
        reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
        reader.start()
        try:
            with atomic_output(fifo, force=force, private=private) as sink:
                sink.write(b"secret")
        finally:
            reader.join(10)

    write(private=True, force=False)  # this user's own FIFO
    monkeypatch.setattr(os, "getuid", lambda: os.stat(fifo).st_uid + 1)  # now another user's
    with pytest.raises(typer.Exit), atomic_output(fifo, force=False, private=True) as sink:
        sink.write(b"secret")  # no reader: refused before the open, which would wait
    write(private=False, force=False)  # a ciphertext or a signature: no secret
    write(private=True, force=True)
    assert received == [b"secret", b"secret", b"secret"]


def test_a_plaintext_goes_into_another_users_terminal_only_with_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A terminal is a character device written in place, like /dev/null: a link to
    another user's terminal planted at the output path (in a directory that user can
    write) gets a plaintext only with --force; root's devices and one's own terminal as
    before."""
    master, slave = os.openpty()
    terminal = Path(os.ttyname(slave))
    planted = tmp_path / "report"
    planted.symlink_to(terminal)
    try:
        if os.getuid() == 0:
            os.chown(terminal, 65534, -1)  # nobody's terminal
        else:
            monkeypatch.setattr(os, "getuid", lambda: terminal.stat().st_uid + 1)
        with pytest.raises(typer.Exit), atomic_output(planted, force=False, private=True) as sink:
            sink.write(b"secret")
        with atomic_output(planted, force=False, private=False) as sink:
            sink.write(b"public ")  # a ciphertext or a signature: no secret
        with atomic_output(planted, force=True, private=True) as sink:
            sink.write(b"secret")
        seen = b""
        while len(seen) < len(b"public secret"):  # a read takes what one write left
            seen += os.read(master, 1024)
        assert seen == b"public secret"
        with atomic_output(Path(os.devnull), force=False, private=True) as sink:
            sink.write(b"secret")  # root's
    finally:
        os.close(slave)
        os.close(master)


def test_an_output_made_by_another_program_while_writing_is_kept(tmp_path: Path) -> None:
    """Without --force, an output was refused only when the command started: a file made
    under that name during a long encrypt-file was then replaced by the rename. It is now
    kept, the command fails and leaves nothing of its own; with --force it is replaced."""
    target = tmp_path / "out.kmsgate"
    with pytest.raises(typer.Exit), atomic_output(target, force=False, private=False) as sink:
        sink.write(b"ours")
        target.write_bytes(b"theirs")
    assert target.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.kmsgate"]
    with atomic_output(target, force=True, private=False) as sink:
        sink.write(b"ours")
    assert target.read_bytes() == b"ours"
    fresh = tmp_path / "fresh"
    with atomic_output(fresh, force=False, private=True) as sink:
        sink.write(b"new")
    assert (fresh.read_bytes(), fresh.stat().st_mode & 0o777) == (b"new", 0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out.kmsgate"]


def _run_into(gw: Gateway, args: list[str], stdout: Path) -> subprocess.CompletedProcess[bytes]:
    """The CLI with its stdout redirected to the file `stdout` (opened for appending)."""
    with stdout.open("ab") as sink:
        return subprocess.run(
            [kmsgate_script(), *args],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.PIPE,
            env=gw.env(),
            timeout=60,
            check=False,
        )


@pytest.mark.parametrize("force", [(), ("--force",)])
def test_dev_stdout_redirected_to_a_file_is_written_through_not_replaced(gw, tmp_path, force):
    """A link to /proc/self/fd/1 (what /dev/stdout is) with stdout redirected to a file: the
    output goes to the redirect's file (appended, as `>>` asks), with or without --force;
    the link stays a link (the rename replaced it with a 0600 file holding the plaintext,
    and the redirect's file stayed empty; without --force, "exists")."""
    plain = tmp_path / "p"
    plain.write_bytes(b"plaintext")
    gw.ok("encrypt-file", str(plain), "-k", "fk")
    link = tmp_path / "myout"
    link.symlink_to("/proc/self/fd/1")
    redirected = tmp_path / "real.txt"
    redirected.write_bytes(b"before:")
    outputs = [str(link)] if force else [str(link), "/dev/stdout"]  # never replace /dev/stdout
    for output in outputs:
        done = _run_into(gw, ["decrypt-file", f"{plain}.kmsgate", "-o", output, *force], redirected)
        assert done.returncode == 0, done.stderr
    signing = ["sign", str(plain), "-k", "signer", "-o", str(link), *force]
    signed = _run_into(gw, signing, redirected)
    assert signed.returncode == 0, signed.stderr
    expected = b"before:" + b"plaintext" * len(outputs)
    written = redirected.read_bytes()
    assert written.startswith(expected) and len(written) > len(expected)  # and the signature
    assert os.readlink(link) == "/proc/self/fd/1"


def test_an_output_that_is_a_symbolic_link_to_a_file_is_refused_even_with_force(gw, tmp_path):
    """The rename would replace the link with a file: refused before the gateway is asked,
    naming the file it points to; the link and its file stay as they were."""
    target = tmp_path / "real.sig"
    target.write_text("important")
    link, dangling = tmp_path / "out.sig", tmp_path / "dangling.sig"
    link.symlink_to(target.name)
    dangling.symlink_to("nowhere")
    before = _audited(gw, "sign")
    for output, pointee in ((link, target), (dangling, tmp_path / "nowhere")):
        refused = gw.run("sign", "-", "-k", "signer", "-o", str(output), "--force", stdin=b"x")
        said = refused.err.replace("\n", "")
        assert refused.rc == 2 and f"{output} is a symbolic link" in said, refused
        assert f"the file it points to, {pointee}," in said, refused
        assert output.is_symlink()
    gw.ok("keys", "list")  # a later request: a record of a refused one would be written by now
    assert _audited(gw, "sign") == before
    assert target.read_text() == "important"


def test_a_checkpoint_that_cannot_be_written_is_refused_before_any_file_changes(gw, tmp_path):
    """A checkpoint in a missing directory was a FileNotFoundError traceback."""
    plain = tmp_path / "data" / "p"
    plain.parent.mkdir()
    plain.write_bytes(b"x")
    gw.ok("encrypt-file", str(plain), "-k", "fk")
    plain.unlink()
    before = Path(f"{plain}.kmsgate").read_bytes()
    checkpoint = tmp_path / "nodir" / "ck.txt"
    refused = gw.run(
        "rewrap", str(plain.parent), "--from-key", "fk", "--to-key", "fk2",
        "--checkpoint", str(checkpoint),
    )  # fmt: skip
    assert refused.rc == 2 and "Traceback" not in refused.err, refused
    assert refused.err.strip() == f"error: cannot write {checkpoint}: No such file or directory"
    assert Path(f"{plain}.kmsgate").read_bytes() == before


def test_an_altered_header_exits_1_as_tampering_or_2_for_a_key_it_cannot_use(gw, tmp_path):
    """docs/cli.md's exit statuses for a header altered after encryption: a version the key
    never had, or another usable key, is tampering (decryption_failed, 1); a key the gateway
    does not have is not_found (2), as for a file whose key was deleted since."""
    setup_key(gw, "altered-other", "aes-256-gcm", "envelope-data")
    plain = tmp_path / "p"
    plain.write_bytes(b"secret")
    gw.ok("encrypt-file", str(plain), "-k", "fk")
    sealed = Path(f"{plain}.kmsgate").read_bytes()
    stream = io.BytesIO(sealed)
    header = FileHeader.read(stream)
    body, envelope = sealed[stream.tell() :], header.envelope()
    for altered, rc, code in (
        (dataclasses.replace(envelope, key_version=7), 1, "decryption_failed"),
        (dataclasses.replace(envelope, key_name="altered-other"), 1, "decryption_failed"),
        (dataclasses.replace(envelope, key_name="no-such-key"), 2, "not_found"),
    ):
        forged = tmp_path / "forged.kmsgate"
        forged.write_bytes(FileHeader(header.context, altered.to_bytes()).to_bytes() + body)
        out = tmp_path / "forged"
        done = gw.run("decrypt-file", str(forged), "-o", str(out))
        assert done.rc == rc and done.err.startswith(f"error: {code}: "), done
        assert not out.exists()


def test_a_write_that_fails_names_the_file_and_keeps_the_one_there(gw, tmp_path):
    """The file size limit reached part-way (a full disk alike): one line naming the file
    written (was "I/O error: ..."), the file there before unchanged, no temporary left."""
    plain, out = tmp_path / "plain.bin", tmp_path / "out.kmsg"
    plain.write_bytes(os.urandom(256 * 1024))
    out.write_bytes(b"kept")
    limited = subprocess.run(
        ["prlimit", "--fsize=65536", "--", kmsgate_script(), "encrypt-file", str(plain),
         "-k", "fk", "-o", str(out), "--force"],
        capture_output=True, env=gw.env(), timeout=60, check=False,
    )  # fmt: skip
    assert limited.returncode == 2, limited
    error = limited.stderr.decode()
    assert error.startswith(f"error: cannot write {out}: File too large"), error
    assert "a file there before is unchanged" in error and error.count("\n") == 1, error
    assert out.read_bytes() == b"kept"
    _no_temp_left(tmp_path)
