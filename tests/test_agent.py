"""`kmsgate agent` against a real HTTPS gateway: a certificate with a TTL of seconds kept
valid on disk across 20 renewals over mTLS, the reload command run after each swap, and a
recovery after the gateway was away for longer than the TTL."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import re
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from kmsgate.agent import Agent, AgentOptions
from kmsgate.client import ApiError, Client
from kmsgate.pki.csr import new_key_and_csr
from kmsgate.pki.files import CURRENT, LOCK, NotLinked, replace_private_files
from tests.components import LOOPBACK, free_port, require_component
from tests.helpers import self_signed
from tests.test_cli import Gateway, _stop, clean_env, kmsgate_script, running_gateway

TTL_SECONDS = 3
KEY_AND_CERT = ("key.pem", "cert.pem")
RENEWALS = 20


@contextlib.contextmanager
def https_gateway(data_dir: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`kmsgate serve --dev --tls` on `data_dir` and `port`, answering when this yields."""
    argv = [kmsgate_script(), "serve", "--dev", "--tls", "--data-dir", str(data_dir)]
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [*argv, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            with contextlib.suppress(httpx.HTTPError, OSError, ssl.SSLError):
                trust = ssl.create_default_context(cafile=str(data_dir / "dev-root.pem"))
                if httpx.get(f"https://{LOOPBACK}:{port}/v1/sys/health", verify=trust).is_success:
                    break
            time.sleep(0.1)
        yield proc
    finally:
        _stop(proc)


class Watch:
    """Reads the agent's set every 50 ms, as a careful reader does (`..data` resolved once),
    and records every moment its certificate was not valid or did not go with its key, and
    the serials seen."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.gaps: list[str] = []
        self.serials: set[int] = set()
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            if self.paused.is_set():
                continue
            try:
                current = (self.directory / CURRENT).resolve(strict=True)
                chain = x509.load_pem_x509_certificates((current / "chain.pem").read_bytes())
                key = serialization.load_pem_private_key((current / "key.pem").read_bytes(), None)
            except (OSError, ValueError) as exc:
                self.gaps.append(f"unreadable: {exc}")
                continue
            cert, now = chain[0], datetime.now(UTC)
            if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
                self.gaps.append(f"{cert.serial_number:x} not valid at {now}")
            if key.public_key() != cert.public_key():
                self.gaps.append(f"{cert.serial_number:x} read with another key")
            self.serials.add(cert.serial_number)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_the_agent_keeps_a_short_lived_certificate_valid_and_recovers(tmp_path: Path) -> None:
    data, out, swaps = tmp_path / "data", tmp_path / "svid", tmp_path / "swaps.txt"
    port = free_port()
    log = tmp_path / "gateway.log"
    with https_gateway(data, port, log) as gateway:
        agent_log = tmp_path / "agent.log"
        command = [
            kmsgate_script(), "agent", "--ca", "dev", "--profile", "workload",
            "--san", "spiffe://dev.lab/ns/ml/sa/server", "--dir", str(out),
            "--token-file", str(data / "root-token"), "--ttl", f"{TTL_SECONDS}s",
            "--renew-at", "0.4", "--on-renew", f"sh -c 'echo swapped >> {swaps}'",
        ]  # fmt: skip
        env = clean_env(
            KMSGATE_ADDR=f"https://localhost:{port}", KMSGATE_CACERT=str(data / "dev-root.pem")
        )
        with agent_log.open("wb") as sink:
            agent = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for((out / "cert.pem").exists, 30, "no first certificate")
            watch = Watch(out)
            agent.send_signal(signal.SIGHUP)  # what `pkill -HUP -f NAME` may send it too
            _wait_for(
                lambda: swaps.exists() and len(swaps.read_text().splitlines()) > RENEWALS,
                RENEWALS * TTL_SECONDS * 2,
                f"fewer than {RENEWALS} renewals:\n{agent_log.read_text()}",
            )
            assert watch.gaps == [], watch.gaps[:5]
            assert len(watch.serials) >= RENEWALS - 2
            # the gateway goes away for longer than the TTL
            watch.paused.set()
            _stop(gateway)
            time.sleep(TTL_SECONDS + 2)
            before = len(swaps.read_text().splitlines())
            with https_gateway(data, port, log):
                _wait_for(
                    lambda: len(swaps.read_text().splitlines()) > before + 2,
                    60,
                    f"no recovery:\n{agent_log.read_text()}",
                )
                watch.gaps.clear()
                watch.paused.clear()
                time.sleep(TTL_SECONDS * 2)
                assert watch.gaps == [], watch.gaps[:5]
            watch.stop()
        finally:
            agent.terminate()
            agent.wait(10)
    text = agent_log.read_text()
    assert "issued" in text and "renewed" in text and "retrying" in text, text
    names = ("key.pem", "cert.pem", "chain.pem", "ca.pem")
    assert all((out / name).stat().st_mode & 0o777 == 0o600 for name in names)
    assert all(os.readlink(out / name) == f"{CURRENT}/{name}" for name in names)
    machinery = [p.name for p in out.iterdir() if p.name.startswith("..")]
    assert len(machinery) == 4 and LOCK in machinery  # link, lock, set, one before


def test_an_agent_whose_key_no_longer_fits_its_certificate_gets_a_new_one(
    tmp_path: Path,
) -> None:
    """A run stopped between two of its writes leaves a key that does not go with the
    certificate: the next run gets a fresh certificate with the token instead of failing to
    load the pair until the certificate expires."""
    data, out = tmp_path / "data", tmp_path / "svid"
    port = free_port()
    with https_gateway(data, port, tmp_path / "gateway.log"):
        command = [
            kmsgate_script(), "agent", "--once", "--ca", "dev", "--profile", "workload",
            "--san", "spiffe://dev.lab/ns/ml/sa/server", "--dir", str(out),
            "--token-file", str(data / "root-token"), "--ttl", "5m",
        ]  # fmt: skip
        env = clean_env(
            KMSGATE_ADDR=f"https://localhost:{port}", KMSGATE_CACERT=str(data / "dev-root.pem")
        )
        first = subprocess.run(command, capture_output=True, env=env, timeout=60, check=False)
        assert first.returncode == 0, first.stderr
        serial = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes()).serial_number
        stray = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (out / "key.pem").write_bytes(stray)
        again = subprocess.run(command, capture_output=True, env=env, timeout=60, check=False)
        assert again.returncode == 0, again.stderr
        assert b"do not match" in again.stderr and b" issued" in again.stderr, again.stderr
        cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
        key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
        assert cert.serial_number != serial and key.public_key() == cert.public_key()


def test_an_agent_stops_on_what_asking_again_cannot_mend(tmp_path: Path) -> None:
    """An unknown CA is a mistake in the agent's options: it exits 2 naming it instead of
    retrying for ever; without a token it says which of its options gives one."""
    with running_gateway(tmp_path) as gw:
        base = [
            kmsgate_script(), "agent", "--profile", "workload",
            "--san", "spiffe://dev.lab/ns/ml/sa/x", "--dir", str(tmp_path / "svid"),
        ]  # fmt: skip
        env = gw.env(token="")
        unknown = subprocess.run(
            [*base, "--ca", "nosuchca", "--token-file", str(gw.data_dir / "root-token")],
            capture_output=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert unknown.returncode == 2, unknown.stderr
        assert b"not_found: no CA named 'nosuchca'" in unknown.stderr
        no_token = subprocess.run(
            [*base, "--ca", "dev"], capture_output=True, env=env, timeout=60, check=False
        )  # without --once too: nothing to renew with, nothing to bootstrap with
        assert no_token.returncode == 2
        assert b"and no --token-file or --oidc-token-file to get one" in no_token.stderr
        cleartext = subprocess.run(  # the token would cross the network in cleartext
            [*base, "--ca", "dev", "--token-file", str(gw.data_dir / "root-token")],
            capture_output=True, env={**env, "KMSGATE_ADDR": "http://192.0.2.10:1"},
            timeout=60, check=False,
        )  # fmt: skip
        assert cleartext.returncode == 2, cleartext.stderr
        assert b"invalid_request: refusing plain http://" in cleartext.stderr


def test_an_agent_started_with_other_names_gets_a_new_certificate(tmp_path: Path) -> None:
    """The directory holds a valid certificate for other names (the agent's options
    changed): it is replaced with the token, not renewed (a renewal keeps the names, and
    the gateway would refuse it on every start)."""
    with running_gateway(tmp_path) as gw:
        out = tmp_path / "svid"

        def run(san: str) -> subprocess.CompletedProcess[bytes]:
            command = [
                kmsgate_script(), "agent", "--once", "--ca", "dev", "--profile", "workload",
                "--san", san, "--dir", str(out), "--token-file", str(gw.data_dir / "root-token"),
            ]  # fmt: skip
            return subprocess.run(
                command, capture_output=True, env=gw.env(token=""), timeout=60, check=False
            )

        assert run("spiffe://dev.lab/ns/ml/sa/old").returncode == 0
        again = run("spiffe://dev.lab/ns/ml/sa/new")
        assert again.returncode == 0, again.stderr
        assert b"for other options" in again.stderr and b" issued" in again.stderr
        cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
            "spiffe://dev.lab/ns/ml/sa/new"
        ]


def _issued_count(gw: object) -> int:
    reply = httpx.get(
        f"{gw.addr}/v1/pki/certs",  # type: ignore[attr-defined]
        params={"limit": 1000},
        headers={"authorization": f"Bearer {gw.root_token}"},  # type: ignore[attr-defined]
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return len(reply.json()["certs"])


def test_a_restarted_agent_keeps_a_certificate_not_due_and_checks_its_dir_first(
    tmp_path: Path,
) -> None:
    """A restart mints nothing while the certificate on disk is not due (it used to renew
    at once and run the reload command); a --dir it cannot write to is refused before a
    certificate is issued; a --ttl too short to renew is refused up front."""
    with running_gateway(tmp_path) as gw:
        out, ran = tmp_path / "svid", tmp_path / "ran.txt"
        base = [
            kmsgate_script(), "agent", "--ca", "dev", "--profile", "workload",
            "--san", "spiffe://dev.lab/ns/ml/sa/x", "--token-file", str(gw.data_dir / "root-token"),
            "--on-renew", f"sh -c 'echo ran >> {ran}'",
        ]  # fmt: skip
        env = gw.env(token="")
        first = subprocess.run(
            [*base, "--dir", str(out), "--once", "--ttl", "5m"],
            capture_output=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert first.returncode == 0, first.stderr
        serial = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes()).serial_number
        issued = _issued_count(gw)
        agent = subprocess.Popen(
            [*base, "--dir", str(out), "--ttl", "5m"], env=env, stderr=subprocess.PIPE
        )
        time.sleep(3)
        agent.terminate()
        _, err = agent.communicate(timeout=10)
        assert agent.returncode == 0, err
        kept = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
        assert kept.serial_number == serial
        assert ran.read_text().splitlines() == ["ran"]  # the first run's swap only
        assert _issued_count(gw) == issued
        a_file = tmp_path / "a-file"
        a_file.write_text("")
        refused = subprocess.run(
            [*base, "--dir", str(a_file), "--once"], capture_output=True, env=env, timeout=60,
            check=False,
        )  # fmt: skip
        assert refused.returncode == 2
        assert refused.stderr.decode().strip() == f"error: {a_file}: not a directory"
        assert _issued_count(gw) == issued
        short = subprocess.run(
            [*base, "--dir", str(out), "--ttl", "2s"], capture_output=True, env=env, timeout=60,
            check=False,
        )  # fmt: skip
        assert short.returncode == 2 and b"--ttl must be at least 3s" in short.stderr


def test_a_new_set_prunes_only_its_own_older_sets(tmp_path: Path) -> None:
    """`replace_private_files` keeps the set before the current one and removes older sets
    of its own; another `..name` in the directory (a user's backup) is left alone."""
    backup = tmp_path / "..backup"
    backup.mkdir()
    (backup / "key.pem").write_text("keep me")
    for n in range(4):
        replace_private_files(tmp_path, {"key.pem": b"k%d" % n, "cert.pem": b"c%d" % n})
    ours = {p.name for p in tmp_path.iterdir() if p.name.startswith("..") and p.is_dir()}
    ours.discard(CURRENT)
    assert "..backup" in ours and len(ours - {"..backup"}) == 2  # the current set and one before
    assert os.readlink(tmp_path / CURRENT) in ours
    assert (backup / "key.pem").read_text() == "keep me"
    assert (tmp_path / "key.pem").read_bytes() == b"k3"


@contextlib.contextmanager
def small_tmpfs(path: Path, kib: int) -> Iterator[Path]:
    """A tmpfs of `kib` KiB mounted on `path` (a new directory) while this yields (needs
    root, as in CI)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0700", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        require_component("a tmpfs mount", mounted.stderr.strip() or "mount failed")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_an_agent_asks_for_no_certificate_while_its_directory_is_full(tmp_path: Path) -> None:
    """The directory's file system has room for less than a set: the agent keeps trying
    without getting a certificate it could not keep (it used to get one on every try, each
    lost when the write failed) and names the directory; with room again, it gets one."""
    with running_gateway(tmp_path) as gw, small_tmpfs(tmp_path / "svid", 128) as out:
        filler = out / "filler"
        with filler.open("wb") as sink:  # leaves 8 KiB: two of the set's five files
            sink.write(os.urandom(120 * 1024))
        issued = _issued_count(gw)
        command = [
            kmsgate_script(), "agent", "--ca", "dev", "--profile", "workload",
            "--san", "spiffe://dev.lab/ns/ml/sa/x", "--dir", str(out),
            "--token-file", str(gw.data_dir / "root-token"), "--ttl", "5m",
        ]  # fmt: skip
        agent = subprocess.Popen(command, env=gw.env(token=""), stderr=subprocess.PIPE)
        try:
            time.sleep(4)  # tries at 0, 0.5, 1.5 and 3.5 s
            assert _issued_count(gw) == issued
            filler.unlink()
            _wait_for((out / "cert.pem").exists, 15, "no certificate once there was room")
            assert _issued_count(gw) == issued + 1
        finally:
            agent.terminate()
            _, err = agent.communicate(timeout=10)
    full = f"No space left on device: no room for a certificate set (a 64 KiB test write): '{out}'"
    assert err.decode().count(full) >= 2, err.decode()  # tried again, still asked for none


def test_a_certificate_that_cannot_be_written_is_named_and_not_asked_for_again_at_once(
    tmp_path: Path,
) -> None:
    """The set cannot be switched to (`..data` became a directory) after the certificate
    was issued: the agent names the certificate and the directory, and backs off as for a
    gateway outage (0.5 s doubling) instead of getting a new one every 0.5 s until the
    short-lived certificate on disk ends and after."""
    with running_gateway(tmp_path) as gw:
        out = tmp_path / "svid"
        command = [
            kmsgate_script(), "agent", "--ca", "dev", "--profile", "workload",
            "--san", "spiffe://dev.lab/ns/ml/sa/x", "--dir", str(out),
            "--token-file", str(gw.data_dir / "root-token"), "--ttl", f"{TTL_SECONDS}s",
        ]  # fmt: skip
        env = gw.env(token="")
        first = subprocess.run([*command, "--once"], capture_output=True, env=env, timeout=60)
        assert first.returncode == 0, first.stderr
        current = out / CURRENT
        target = out / os.readlink(current)
        current.unlink()
        target.rename(current)  # the links still lead to the certificate through it
        issued = _issued_count(gw)
        agent = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
        time.sleep(8)
        agent.terminate()
        _, err = agent.communicate(timeout=10)
        text = err.decode()
        named = re.findall(rf"certificate (\w+) was issued but not written to {out} ", text)
        assert named and len(named) == _issued_count(gw) - issued <= 5, text
        assert f"revoke it (kmsgate cert revoke {named[0]})" in text


def _agent_command(gw: Gateway, out: Path) -> list[str]:
    """`kmsgate agent` for a workload certificate in `out`, bootstrapped with the root
    token."""
    return [
        kmsgate_script(), "agent", "--ca", "dev", "--profile", "workload",
        "--san", "spiffe://dev.lab/ns/ml/sa/x", "--dir", str(out),
        "--token-file", str(gw.data_dir / "root-token"),
    ]  # fmt: skip


def _agent_once(gw: Gateway, out: Path) -> subprocess.CompletedProcess[bytes]:
    """`_agent_command` with `--once`, its output captured."""
    command = [*_agent_command(gw, out), "--once"]
    return subprocess.run(command, env=gw.env(token=""), capture_output=True, timeout=60)


def test_an_agent_gets_no_certificate_while_another_writer_holds_the_directory(
    tmp_path: Path,
) -> None:
    """Another writer holds the directory's lock (stuck, or another user's agent): the
    agent asks for no certificate it could not write, and says why after waiting
    LOCK_WAIT_SECONDS (10 s) for it."""
    out = tmp_path / "svid"
    out.mkdir(mode=0o700)
    with running_gateway(tmp_path) as gw, open(out / LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        issued = _issued_count(gw)
        run = _agent_once(gw, out)
        assert run.returncode == 2, run.stderr
        assert b"held by another writer for over 10 s" in run.stderr, run.stderr
        assert _issued_count(gw) == issued


def test_a_set_made_current_whose_link_fails_is_kept_not_called_lost(tmp_path: Path) -> None:
    """The new set is current (`..data` switched) but one name cannot be linked to it (a
    directory in its way): the certificate is in use, so the agent says so and which
    link failed, and does not call it lost ("revoke it"). A running agent waits for that
    certificate's renewal: before, with `cert.pem` in the way, it found no current
    certificate through the names and asked for another every second."""
    out = tmp_path / "svid"
    (out / "cert.pem" / "x").mkdir(parents=True)
    out.chmod(0o700)
    with running_gateway(tmp_path) as gw:
        issued = _issued_count(gw)
        agent = subprocess.Popen(
            _agent_command(gw, out), env=gw.env(token=""), stderr=subprocess.PIPE
        )
        try:
            _wait_for((out / CURRENT).exists, 30, "no set made current")
            time.sleep(4)  # ~4 more certificates, before
        finally:
            agent.terminate()
        _, err = agent.communicate(timeout=10)
        assert _issued_count(gw) == issued + 1
    text = err.decode()
    installed = out / CURRENT / "cert.pem"
    serial = x509.load_pem_x509_certificate(installed.read_bytes()).serial_number
    assert f"certificate {serial:x} is current in {out}, but a link to it failed" in text, text
    assert f"{out / 'cert.pem'}: " in text and "revoke it" not in text, text
    for name in ("key.pem", "chain.pem", "ca.pem"):  # the names after it are linked too
        assert os.readlink(out / name) == f"{CURRENT}/{name}"


def test_a_name_in_the_way_neither_keeps_the_others_on_the_old_set_nor_older_sets(
    tmp_path: Path,
) -> None:
    """`replace_private_files` links every name it can and removes older sets even when one
    name cannot be linked, then raises NotLinked naming that one."""
    (tmp_path / "b" / "x").mkdir(parents=True)
    for n in range(4):
        with pytest.raises(NotLinked) as refused:
            replace_private_files(tmp_path, {"a": b"a%d" % n, "b": b"b%d" % n, "c": b"c%d" % n})
        assert refused.value.filename == str(tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == b"a3" and (tmp_path / "c").read_bytes() == b"c3"
    sets = [
        p for p in tmp_path.iterdir() if p.name.startswith("..") and p.name not in (CURRENT, LOCK)
    ]
    assert len(sets) == 2, sets  # the current set and the one before


def test_sigterm_stops_the_agent_and_its_on_renew_command_promptly(tmp_path: Path) -> None:
    """SIGTERM while `--on-renew` runs (a shell that started a command ignoring SIGTERM):
    the agent stops the command's process group (SIGTERM, then SIGKILL after 3 s to what
    is left of it, also once the shell itself has ended) and exits 0 within seconds, well
    inside Kubernetes' 30 s grace, instead of waiting up to 60 s for it."""
    hook_pid = tmp_path / "hook.pid"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"sh -c 'trap \"\" TERM; echo $$ > {hook_pid}; exec sleep 40' &\nwait\n")
    with running_gateway(tmp_path) as gw:
        command = [
            kmsgate_script(), "agent", "--ca", "dev", "--profile", "workload",
            "--san", "spiffe://dev.lab/ns/ml/sa/x", "--dir", str(tmp_path / "svid"),
            "--token-file", str(gw.data_dir / "root-token"), "--on-renew", f"sh {hook}",
        ]  # fmt: skip
        agent = subprocess.Popen(command, env=gw.env(token=""), stderr=subprocess.PIPE)
        try:
            _wait_for(lambda: hook_pid.exists() and hook_pid.read_text(), 30, "no hook")
            started = time.monotonic()
            agent.terminate()
            _, err = agent.communicate(timeout=15)
            took = time.monotonic() - started
        finally:
            agent.kill()
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(hook_pid.read_text()), signal.SIGKILL)  # if it outlived the agent
    assert agent.returncode == 0 and took < 6, (took, err.decode())
    assert b"on-renew command stopped: the agent is stopping" in err
    assert not _running(int(hook_pid.read_text()))


def _running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed and not yet reaped by its new parent,
    does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _write_sets(directory: str, seconds: float) -> None:
    """Replace the set in `directory` again and again for `seconds` (key and certificate
    alike, so that a reader can tell a set's two files went together)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tag = os.urandom(8).hex().encode()
        replace_private_files(Path(directory), {"key.pem": tag, "cert.pem": tag})


def test_two_writers_on_one_directory_never_leave_it_without_a_current_set(
    tmp_path: Path,
) -> None:
    """Two agents on one directory take turns (each used to remove every set but its own
    two, the one the other had just made current among them: `..data` then dangled, or a
    writer lost the set it was writing). Throughout, `..data` names a set that is there,
    whose key and certificate go together; neither writer fails."""
    spawn = multiprocessing.get_context("spawn")
    writers = [spawn.Process(target=_write_sets, args=(str(tmp_path), 3.0)) for _ in range(2)]
    for writer in writers:
        writer.start()
    dangling, mismatched, reads = [], [], 0
    while any(writer.is_alive() for writer in writers):
        with contextlib.suppress(FileNotFoundError):  # no set yet
            target = os.readlink(tmp_path / CURRENT)
            try:
                key, cert = ((tmp_path / target / name).read_bytes() for name in KEY_AND_CERT)
            except FileNotFoundError:  # gone: fine if `..data` moved on meanwhile (twice)
                if os.readlink(tmp_path / CURRENT) == target:
                    dangling.append(target)
                continue
            reads += 1
            if key != cert:
                mismatched.append(target)
    for writer in writers:
        writer.join(10)
    assert [writer.exitcode for writer in writers] == [0, 0]
    assert dangling == [] and mismatched == [] and reads > 0
    assert (tmp_path / "key.pem").read_bytes() == (tmp_path / "cert.pem").read_bytes()
    sets = {p.name for p in tmp_path.iterdir() if p.name.startswith("..") and p.is_dir()}
    assert len(sets - {CURRENT}) == 2 and os.readlink(tmp_path / CURRENT) in sets


def test_client_and_server_profile_certificates_renew_the_way_each_can(tmp_path: Path) -> None:
    """A client certificate names its holder (common name: its first DNS name), so it
    renews itself over mTLS with no token; a server certificate (no clientAuth) cannot, so
    the agent renews it with the token, and without one says so. A certificate the gateway
    refuses in the TLS handshake is reported as refused, not as a gateway out of reach."""
    data, port = tmp_path / "data", free_port()
    with https_gateway(data, port, tmp_path / "gateway.log"):
        env = clean_env(
            KMSGATE_ADDR=f"https://localhost:{port}", KMSGATE_CACERT=str(data / "dev-root.pem")
        )
        token = ["--token-file", str(data / "root-token")]

        def agent(profile: str, san: str, *extra: str) -> subprocess.CompletedProcess[str]:
            command = [
                kmsgate_script(), "agent", "--once", "--ca", "dev", "--profile", profile,
                "--san", san, "--dir", str(tmp_path / profile), *extra,
            ]  # fmt: skip
            return subprocess.run(
                command, capture_output=True, text=True, env=env, timeout=60, check=False
            )

        first = agent("client", "app.lab", *token)
        assert first.returncode == 0 and " issued" in first.stderr, first.stderr
        cert = x509.load_pem_x509_certificate((tmp_path / "client" / "cert.pem").read_bytes())
        assert cert.subject.rfc4514_string() == "CN=app.lab"
        renewed = agent("client", "app.lab")  # no token: the certificate itself
        assert renewed.returncode == 0 and " renewed" in renewed.stderr, renewed.stderr

        assert agent("server", "localhost", *token).returncode == 0
        again = agent("server", "localhost", *token)
        assert again.returncode == 0 and " issued" in again.stderr, again.stderr
        assert "unreachable" not in again.stderr and "refused" not in again.stderr
        stuck = agent("server", "localhost")
        assert stuck.returncode == 2 and "cannot authenticate to the gateway" in stuck.stderr

        stranger_key, stranger = self_signed(
            "stranger", extensions=[x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])]
        )
        pem = serialization.Encoding.PEM
        (tmp_path / "s.pem").write_bytes(stranger.public_bytes(pem))
        (tmp_path / "s.key").write_bytes(
            stranger_key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        context = ssl.create_default_context(cafile=str(data / "dev-root.pem"))
        context.load_cert_chain(tmp_path / "s.pem", tmp_path / "s.key")
        client = Client(env["KMSGATE_ADDR"], verify=context, anonymous=True)
        with client, pytest.raises(ApiError) as refused:
            client.whoami()
        assert refused.value.code == "tls_refused", refused.value


def test_an_agent_keeps_only_a_certificate_of_its_key_where_only_it_may_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory its group or others may write to is refused (whoever may write there
    could swap what the workload reads); a `..lock` planted there as a link is not followed;
    a reply whose certificate is for another key (a faulty gateway, or whoever answered) is
    not kept: before, the workload got a key and a certificate that do not go together,
    and a running agent asked for another every second. A token file others may read is
    used, with a warning."""
    data, port, san = tmp_path / "data", free_port(), "spiffe://dev.lab/ns/ml/sa/x"
    with https_gateway(data, port, tmp_path / "gateway.log"):
        options = {
            "addr": f"https://localhost:{port}", "ca": "dev", "profile": "workload",
            "sans": (san,), "token_file": data / "root-token", "cacert": data / "dev-root.pem",
        }  # fmt: skip
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        with pytest.raises(PermissionError, match="writable by its group or others"):
            Agent(AgentOptions(directory=shared, **options)).run(once=True)
        planted = tmp_path / "planted"
        planted.mkdir(mode=0o700)
        (planted / LOCK).symlink_to(tmp_path / "made-through-the-link")
        with pytest.raises(OSError, match=LOCK):
            Agent(AgentOptions(directory=planted, **options)).run(once=True)
        assert not (tmp_path / "made-through-the-link").exists()
        loose = tmp_path / "loose-token"
        loose.write_bytes((data / "root-token").read_bytes())
        loose.chmod(0o644)
        with caplog.at_level(logging.WARNING, logger="kmsgate"):
            Agent(AgentOptions(directory=tmp_path / "a", **options)).run(once=True)
            assert "whoever reads it" not in caplog.text  # the gateway's own: 0600
            kept = AgentOptions(directory=tmp_path / "b", **{**options, "token_file": loose})
            Agent(kept).run(once=True)
        assert f"token file {loose} must not be accessible by" in caplog.text

        issue = Client.issue_certificate

        def for_another_key(self: Client, ca: str, csr: str, profile: str, **kw: object) -> object:
            _, other = new_key_and_csr([san])
            return issue(self, ca, other.public_bytes(serialization.Encoding.PEM).decode(),
                         profile, **kw)  # fmt: skip

        monkeypatch.setattr(Client, "issue_certificate", for_another_key)
        out = tmp_path / "svid"
        with pytest.raises(ValueError, match="a certificate for another key: not kept"):
            Agent(AgentOptions(directory=out, **options)).run(once=True)
        assert not (out / "cert.pem").exists() and not (out / "key.pem").exists()
