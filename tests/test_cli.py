"""The `kmsgate` command line against a real dev gateway, as a new user would run it.

A module-scoped fixture starts `kmsgate serve --dev --data-dir <tmp> --port <free>` as a
subprocess; every command then runs as its own process through the installed `kmsgate`
script, configured only by `KMSGATE_ADDR` / `KMSGATE_TOKEN`. Nothing is mocked: the files the
CLI writes are checked with `openssl` and the audit log the server wrote is checked with
`kmsgate audit verify`.

The tests at the end ("known bugs") describe behaviour the CLI should have and does not yet;
they fail until kmsgate/cli/ is fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from rich.console import Console

from kmsgate.backends.softkms import create_root_key_file
from kmsgate.bootstrap import stale_root_token
from kmsgate.cli import common
from tests.components import LOOPBACK, free_port
from tests.gateway import open_gateway

REPO = Path(__file__).resolve().parent.parent
CLI_TIMEOUT = 60.0  # seconds, per CLI process
START_TIMEOUT = 30.0  # seconds until the gateway accepts connections
START_ATTEMPTS = 3  # a new port each time: another process may grab the free port first
TOKEN_LINE = re.compile(r"Root token \(admin\), shown once: (\S+)")
MAX_INPUT_BYTES = 64 * 1024  # the default limits.max_input_bytes


def kmsgate_script() -> str:
    """The `kmsgate` console script of the interpreter running the tests."""
    beside = Path(sys.executable).with_name("kmsgate")
    if beside.is_file():
        return str(beside)
    found = shutil.which("kmsgate")
    if found is None:
        pytest.fail("no `kmsgate` script: run `pip install -e '.[dev]'`", pytrace=False)
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without KMSGATE_* (a developer's own token or address
    must not leak in) and without COLUMNS (tables render as they do in a pipe)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGATE_") and k != "COLUMNS"}
    env.update(extra)
    return env


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished CLI process."""

    args: tuple[str, ...]
    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"kmsgate {' '.join(self.args)} -> {self.rc}\nstdout: {self.out}\nstderr: {self.err}"


def run_cli(
    args: tuple[str, ...],
    env: Mapping[str, str],
    *,
    stdin: bytes | None = None,
    cwd: Path | None = None,
) -> Run:
    proc = subprocess.run(
        [kmsgate_script(), *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=dict(env),
        cwd=cwd,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    return Run(
        tuple(args),
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )


@dataclasses.dataclass(frozen=True)
class Gateway:
    """A running `kmsgate serve --dev` and what it printed."""

    addr: str
    root_token: str
    data_dir: Path
    output: Path  # the server's stdout and stderr
    process: subprocess.Popen[bytes] | None = None  # `kmsgate serve` (its group's leader)

    def env(self, token: str | None = None, **extra: str) -> dict[str, str]:
        """Client environment: this gateway's address and `token` (default: the root token;
        an empty string: no KMSGATE_TOKEN at all)."""
        env = clean_env(KMSGATE_ADDR=self.addr, **extra)
        token = self.root_token if token is None else token
        if token:
            env["KMSGATE_TOKEN"] = token
        return env

    def run(
        self,
        *args: str,
        token: str | None = None,
        stdin: bytes | None = None,
        cwd: Path | None = None,
        **extra_env: str,
    ) -> Run:
        return run_cli(args, self.env(token, **extra_env), stdin=stdin, cwd=cwd)

    def connect(self) -> socket.socket:
        """A raw TCP connection to this (plain HTTP) gateway."""
        host, port = self.addr.removeprefix("http://").split(":")
        return socket.create_connection((host, int(port)), timeout=10)

    def post_head(self, path: str, framing: str) -> bytes:
        """The request line and headers of a JSON POST to `path` with the root token;
        `framing` is the body's header line(s): `content-length: N`, ..."""
        return (
            f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {self.root_token}\r\n{framing}\r\n\r\n"
        ).encode()

    def ok(
        self,
        *args: str,
        token: str | None = None,
        stdin: bytes | None = None,
        cwd: Path | None = None,
        **extra_env: str,
    ) -> Run:
        """Run a command that must succeed."""
        result = self.run(*args, token=token, stdin=stdin, cwd=cwd, **extra_env)
        assert result.rc == 0, str(result)
        return result


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_until_serving(
    proc: subprocess.Popen[bytes],
    addr: str,
    output: Path,
    verify: Path | bool = True,
    token_file: Path | None = None,
) -> str | None:
    """The root token (shown in `output`, or, on a data dir started on before, in
    `token_file`) once the server answers a request made with it at `addr` (so that
    another process that grabbed the port cannot pass for it; over HTTPS, trusting
    `verify`); None if the server exited. Fails the test after START_TIMEOUT seconds."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        match = TOKEN_LINE.search(output.read_text(errors="replace"))
        token = match.group(1) if match else _read_token(token_file)
        if token:
            with contextlib.suppress(httpx.HTTPError):
                reply = httpx.get(
                    f"{addr}/v1/keys",
                    headers={"authorization": f"Bearer {token}"},
                    timeout=2.0,
                    verify=ssl.create_default_context(cafile=str(verify))
                    if isinstance(verify, Path)
                    else verify,
                )
                if reply.status_code == 200:
                    return token
        time.sleep(0.05)
    _stop(proc)
    pytest.fail(
        f"kmsgate serve did not answer at {addr} within {START_TIMEOUT:.0f} s:\n"
        f"{output.read_text(errors='replace')}",
        pytrace=False,
    )


def _read_token(token_file: Path | None) -> str | None:
    if token_file is None:
        return None
    try:
        return token_file.read_text().strip() or None
    except OSError:
        return None


@contextlib.contextmanager
def running_gateway(
    base: Path,
    *serve_args: str,
    https: bool = False,
    data_dir: Path | None = None,
    **extra_env: str,
) -> Iterator[Gateway]:
    """`kmsgate serve --dev [serve_args]` on a fresh data dir under `base` (or on
    `data_dir`, new or started on before) and a free port; stopped on exit, also
    when the start or a test fails. `https`: the server speaks TLS with a certificate from
    the dev CA (`Gateway.addr` is https://, trusting `<data_dir>/dev-root.pem`)."""
    given = data_dir
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        data_dir = given or base / f"data-{attempt}"  # a failed attempt may have used its own
        output = base / f"serve-{attempt}.log"
        argv = [kmsgate_script(), "serve", "--dev", "--data-dir", str(data_dir)]
        argv += ["--port", str(port), *serve_args]
        with output.open("wb") as sink:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=clean_env(**extra_env),
                start_new_session=True,  # its own process group: teardown stops all of it
            )
        try:
            addr = f"{'https' if https else 'http'}://{LOOPBACK}:{port}"
            root = data_dir / "dev-root.pem"
            verify = root if https else True
            token = _wait_until_serving(proc, addr, output, verify, data_dir / "root-token")
            if token is None:
                text = output.read_text(errors="replace")
                if "address already in use" in text.lower() and attempt < START_ATTEMPTS:
                    continue
                pytest.fail(f"kmsgate serve exited with {proc.returncode}:\n{text}", pytrace=False)
            yield Gateway(addr, token, data_dir, output, proc)
            return
        finally:
            _stop(proc)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A dev gateway (env `dev`) shared by the module; tests use distinct key names."""
    with running_gateway(tmp_path_factory.mktemp("gateway")) as gw:
        yield gw


@pytest.fixture(scope="module")
def prod_env_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A dev gateway whose policy environment is `prod` (`KMSGATE_ENV=prod`)."""
    with running_gateway(tmp_path_factory.mktemp("gateway-prod"), KMSGATE_ENV="prod") as gw:
        yield gw


def assert_one_line_error(result: Run, *needles: str, rc: int = 2) -> None:
    """Exit `rc`, exactly one line on stderr starting with `error:` and holding `needles`,
    and no traceback anywhere."""
    assert result.rc == rc, str(result)
    assert "Traceback" not in result.err + result.out, str(result)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, str(result)
    assert lines[0].startswith("error: "), str(result)
    for needle in needles:
        assert needle in lines[0], str(result)


def create_key(gw: Gateway, name: str, key_type: str, purpose: str = "general") -> dict:
    """Create a key with the CLI; the key as JSON."""
    return json.loads(gw.ok("keys", "create", name, "--type", key_type, "--purpose", purpose).out)


def setup_key(gw: Gateway, name: str, key_type: str, purpose: str = "general") -> None:
    """Create a key over REST: set-up for tests about other commands (saves a CLI start)."""
    reply = httpx.post(
        f"{gw.addr}/v1/keys",
        json={"name": name, "type": key_type, "purpose": purpose},
        headers={"authorization": f"Bearer {gw.root_token}"},
        timeout=CLI_TIMEOUT,
    )
    assert reply.status_code == 201, reply.text


def new_token(gw: Gateway, role: str) -> tuple[str, str]:
    """(token id, token) of a new token with `role`, read as a user would: the token on
    stdout, `token id <id> roles <roles>` on stderr."""
    result = gw.ok("token", "create", "--role", role, "--description", f"test {role}")
    match = re.fullmatch(rf"token id ([0-9a-f]{{16}}) roles {re.escape(role)}", result.err.strip())
    assert match, str(result)
    token = result.out.strip()
    assert token.startswith(f"kmg.{match.group(1)}."), str(result)
    return match.group(1), token


# --------------------------------------------------------------------------------------------
# the dev server
# --------------------------------------------------------------------------------------------


def test_dev_server_prints_the_root_token_once_and_writes_it_0600(gateway: Gateway) -> None:
    text = gateway.output.read_text()
    assert "(env dev, store sqlite:" in text
    assert len(TOKEN_LINE.findall(text)) == 1
    token_file = gateway.data_dir / "root-token"
    assert token_file.read_text().strip() == gateway.root_token
    for name in ("root-token", "root.key"):
        assert stat.S_IMODE((gateway.data_dir / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(gateway.data_dir.stat().st_mode) == 0o700
    assert (gateway.data_dir / "audit.log").is_file()


def test_a_dev_root_token_revoked_meanwhile_is_pointed_out_at_restart(tmp_path: Path) -> None:
    """The file a restart names would otherwise hold a token that only gets 401."""
    with open_gateway(tmp_path) as (api, admin):
        (tmp_path / "root-token").write_text(admin + "\n")
        assert stale_root_token(api.service, tmp_path) is None
        revoked = api.call("DELETE", f"/v1/sys/tokens/{admin.split('.')[1]}", admin)
        assert revoked.status_code == 200, revoked.text
        stale = stale_root_token(api.service, tmp_path)
        assert stale == (
            f"the token in {tmp_path / 'root-token'} is revoked or expired: remove the file "
            "and restart for a new one"
        )


# --------------------------------------------------------------------------------------------
# the acceptance flow: sign, verify with openssl, rotate, disable / enable
# --------------------------------------------------------------------------------------------


def openssl_verify(openssl: str, pem: Path, sig: Path, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [openssl, "dgst", "-sha256", "-verify", str(pem), "-signature", str(sig), str(data)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


@pytest.mark.interop
def test_openssl_verifies_cli_signatures_across_rotation(
    gateway: Gateway, openssl_bin: str, tmp_path: Path
) -> None:
    create_key(gateway, "interop-p256", "ecdsa-p256")
    data = tmp_path / "artifact.bin"
    data.write_bytes(b"model weights\n" * 1000)
    sig1, sig2, sig_digest = tmp_path / "v1.sig", tmp_path / "v2.sig", tmp_path / "d.sig"
    pub1, pub2 = tmp_path / "v1.pem", tmp_path / "v2.pem"

    signed = gateway.ok("sign", str(data), "-k", "interop-p256", "-o", str(sig1))
    assert signed.err.strip() == "key_version=1 algorithm=ecdsa-sha256"
    assert signed.out == ""  # with -o the raw signature goes to the file only
    gateway.ok("keys", "public-key", "interop-p256", "-o", str(pub1))
    checked = openssl_verify(openssl_bin, pub1, sig1, data)
    assert checked.returncode == 0, checked
    assert checked.stdout.strip() == "Verified OK"

    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(data.read_bytes() + b"x")
    assert openssl_verify(openssl_bin, pub1, sig1, tampered).returncode == 1

    gateway.ok("keys", "rotate", "interop-p256")
    signed = gateway.ok("sign", str(data), "-k", "interop-p256", "-o", str(sig2))
    assert "key_version=2" in signed.err
    gateway.ok("keys", "public-key", "interop-p256", "-o", str(pub2))  # primary = version 2
    assert (
        pub2.read_text() == gateway.ok("keys", "public-key", "interop-p256", "--version", "2").out
    )
    assert (
        pub1.read_text() == gateway.ok("keys", "public-key", "interop-p256", "--version", "1").out
    )
    assert openssl_verify(openssl_bin, pub2, sig2, data).returncode == 0
    assert openssl_verify(openssl_bin, pub1, sig2, data).returncode == 1  # a new key pair

    gateway.ok("sign", str(data), "-k", "interop-p256", "--digest", "-o", str(sig_digest))
    assert openssl_verify(openssl_bin, pub2, sig_digest, data).returncode == 0


def test_rotation_keeps_old_signatures_valid_and_disable_refuses(
    gateway: Gateway, tmp_path: Path
) -> None:
    key = create_key(gateway, "release-sign", "ecdsa-p256", "model-sign")
    assert (key["state"], key["primary_version"]) == ("enabled", 1)
    data = tmp_path / "model.bin"
    data.write_bytes(b"weights")
    old_sig, new_sig = tmp_path / "old.sig", tmp_path / "new.sig"
    gateway.ok("sign", str(data), "-k", "release-sign", "-o", str(old_sig))

    rotated = json.loads(gateway.ok("keys", "rotate", "release-sign").out)
    assert rotated["primary_version"] == 2
    assert [v["version"] for v in rotated["versions"]] == [1, 2]

    signed = gateway.ok("sign", str(data), "-k", "release-sign", "-o", str(new_sig))
    assert signed.err.strip() == "key_version=2 algorithm=ecdsa-sha256"
    old = gateway.ok("verify", str(data), "-k", "release-sign", "-s", str(old_sig))
    assert old.out.strip() == "valid (key version 1)"
    new = gateway.ok("verify", str(data), "-k", "release-sign", "-s", str(new_sig))
    assert new.out.strip() == "valid (key version 2)"

    other = tmp_path / "other.bin"
    other.write_bytes(b"weights!")
    bad = gateway.run("verify", str(other), "-k", "release-sign", "-s", str(old_sig))
    assert_one_line_error(bad, "signature is not valid", rc=1)

    assert json.loads(gateway.ok("keys", "disable", "release-sign").out)["state"] == "disabled"
    refused = gateway.run("sign", str(data), "-k", "release-sign")
    assert_one_line_error(refused, "key_disabled")
    assert refused.out == ""
    refused = gateway.run("verify", str(data), "-k", "release-sign", "-s", str(old_sig))
    assert_one_line_error(refused, "key_disabled")

    assert json.loads(gateway.ok("keys", "enable", "release-sign").out)["state"] == "enabled"
    again = gateway.ok("sign", str(data), "-k", "release-sign")
    assert "key_version=2" in again.err
    assert json.loads(gateway.ok("keys", "show", "release-sign").out)["state"] == "enabled"


def test_scheduled_deletion_refuses_and_cancel_brings_the_key_back_disabled(
    gateway: Gateway, tmp_path: Path
) -> None:
    setup_key(gateway, "to-delete", "ed25519")
    data = tmp_path / "f"
    data.write_bytes(b"x")
    too_soon = gateway.run("keys", "delete", "to-delete", "--pending-days", "3")
    assert too_soon.rc == 2  # a usage error: refused before any request
    pending = json.loads(gateway.ok("keys", "delete", "to-delete", "--pending-days", "7").out)
    assert pending["state"] == "pending_deletion"
    assert "deletion_date" in pending
    assert_one_line_error(gateway.run("sign", str(data), "-k", "to-delete"), "key_pending_deletion")
    assert_one_line_error(gateway.run("keys", "enable", "to-delete"), "conflict")
    cancelled = json.loads(gateway.ok("keys", "cancel-deletion", "to-delete").out)
    assert cancelled["state"] == "disabled"
    assert "deletion_date" not in cancelled
    gateway.ok("keys", "enable", "to-delete")
    gateway.ok("sign", str(data), "-k", "to-delete")


# --------------------------------------------------------------------------------------------
# authentication and policy
# --------------------------------------------------------------------------------------------


def test_without_a_token_every_call_is_unauthenticated(gateway: Gateway, tmp_path: Path) -> None:
    """With no token the error says how to give one and where the dev root token is; with a
    wrong token it does not (the user gave one)."""
    data = tmp_path / "f"
    data.write_bytes(b"x")
    hint = ("no API token given", "KMSGATE_TOKEN", str(gateway.data_dir / "root-token"))
    listing = gateway.run("keys", "list", token="", KMSGATE_DATA_DIR=str(gateway.data_dir))
    assert_one_line_error(listing, "unauthenticated", *hint)
    signing = gateway.run("sign", str(data), "-k", "any", token="")
    # the client cannot know the server's data dir: the hint names the default as such
    assert_one_line_error(
        signing, "unauthenticated", "KMSGATE_TOKEN", "DATA_DIR/root-token", "/.kmsgate/dev/"
    )
    forged = gateway.root_token[:-2] + ("AA" if not gateway.root_token.endswith("AA") else "BB")
    wrong = gateway.run("keys", "list", token=forged)
    assert_one_line_error(wrong, "unauthenticated")
    assert "KMSGATE_TOKEN" not in wrong.err


def test_a_token_without_a_granting_role_is_denied_even_for_unknown_keys(
    gateway: Gateway, tmp_path: Path
) -> None:
    setup_key(gateway, "denied-key", "ecdsa-p256")
    _, nobody = new_token(gateway, "nobody")
    data = tmp_path / "f"
    data.write_bytes(b"x")
    existing = gateway.run("sign", str(data), "-k", "denied-key", token=nobody)
    missing = gateway.run("sign", str(data), "-k", "no-such-key", token=nobody)
    assert_one_line_error(existing, "policy_denied")
    assert_one_line_error(missing, "policy_denied")
    # names cannot be probed: the replies differ only by the name the caller gave
    assert existing.err.replace("denied-key", "K") == missing.err.replace("no-such-key", "K")
    assert_one_line_error(gateway.run("keys", "show", "denied-key", token=nobody), "policy_denied")
    # an admin learns that the key does not exist
    assert_one_line_error(gateway.run("sign", str(data), "-k", "no-such-key"), "not_found")


def test_model_signing_role_signs_only_model_sign_keys_only_in_prod(
    gateway: Gateway, prod_env_gateway: Gateway, tmp_path: Path
) -> None:
    data = tmp_path / "model.bin"
    data.write_bytes(b"weights")
    setup_key(gateway, "ms-key", "ecdsa-p256", "model-sign")
    setup_key(prod_env_gateway, "ms-key", "ecdsa-p256", "model-sign")
    setup_key(prod_env_gateway, "ms-other", "ecdsa-p256", "general")
    assert "(env prod, store " in prod_env_gateway.output.read_text()

    _, signer = new_token(prod_env_gateway, "ml-sec")
    signed = prod_env_gateway.ok("sign", str(data), "-k", "ms-key", token=signer)
    assert "key_version=1" in signed.err
    wrong_purpose = prod_env_gateway.run("sign", str(data), "-k", "ms-other", token=signer)
    assert_one_line_error(wrong_purpose, "policy_denied")
    sig = tmp_path / "sig"
    sig.write_text(signed.out)
    no_verify = prod_env_gateway.run(
        "verify", str(data), "-k", "ms-key", "-s", str(sig), token=signer
    )
    assert_one_line_error(no_verify, "policy_denied")  # the role grants sign, nothing else

    _, dev_signer = new_token(gateway, "ml-sec")
    assert_one_line_error(
        gateway.run("sign", str(data), "-k", "ms-key", token=dev_signer), "policy_denied"
    )


# --------------------------------------------------------------------------------------------
# inputs: digests, stdin, MACs
# --------------------------------------------------------------------------------------------


def test_digest_signing_verifies_and_large_files_need_it(gateway: Gateway, tmp_path: Path) -> None:
    setup_key(gateway, "digest-key", "ecdsa-p384")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(MAX_INPUT_BYTES + 1))
    sig = tmp_path / "big.sig"

    too_large = gateway.run("sign", str(big), "-k", "digest-key")
    assert_one_line_error(too_large, "too_large", "digest")
    # past what one request carries, refused before it is read whole (a sparse 2 GB file
    # took 13 GB of memory, then got the body limit's 413 without a word about digests)
    huge = tmp_path / "huge.bin"
    with huge.open("wb") as sparse:
        sparse.truncate(2 * 1024**3)
    for command, instead in (
        (("sign", str(huge), "-k", "digest-key"), "(--digest)"),
        (("verify", str(huge), "-k", "digest-key", "-s", str(big)), "(--digest)"),
        (("mac", str(huge), "-k", "digest-key"), "MAC a digest of it"),
        (("encrypt", str(huge), "-k", "digest-key"), "use encrypt-file"),
    ):
        refused = gateway.run(*command)
        assert_one_line_error(refused, f"{huge} holds over 4 MiB", instead)

    signed = gateway.ok("sign", str(big), "-k", "digest-key", "--digest", "-o", str(sig))
    assert signed.err.strip() == "key_version=1 algorithm=ecdsa-sha384"
    checked = gateway.ok("verify", str(big), "-k", "digest-key", "-s", str(sig), "--digest")
    assert checked.out.strip() == "valid (key version 1)"

    small = tmp_path / "small.bin"
    small.write_bytes(b"small input")
    gateway.ok("sign", str(small), "-k", "digest-key", "--digest", "-o", str(sig), "--force")
    # a digest signature is an ordinary signature over the message
    gateway.ok("verify", str(small), "-k", "digest-key", "-s", str(sig))


def test_stdin_input_signs_and_verifies(gateway: Gateway, tmp_path: Path) -> None:
    setup_key(gateway, "stdin-key", "ed25519")
    message = b"from a pipe\n"
    signed = gateway.ok("sign", "-", "-k", "stdin-key", stdin=message)
    assert signed.err.strip() == "key_version=1 algorithm=ed25519"
    b64_sig = tmp_path / "sig.b64"
    b64_sig.write_text(signed.out)  # base64 text is accepted as well as raw bytes
    assert gateway.ok("verify", "-", "-k", "stdin-key", "-s", str(b64_sig), stdin=message).rc == 0
    wrong = gateway.run("verify", "-", "-k", "stdin-key", "-s", str(b64_sig), stdin=b"other")
    assert_one_line_error(wrong, "not valid", rc=1)


def test_an_empty_ttl_or_version_0_is_refused_not_taken_as_absent(gateway: Gateway) -> None:
    """`--ttl "$TTL"` with TTL unset must not mint a token that never expires, and
    `--version 0` must not read the primary version."""
    tokens = len(httpx.get(
        f"{gateway.addr}/v1/sys/tokens", headers={"authorization": f"Bearer {gateway.root_token}"}
    ).json()["tokens"])  # fmt: skip
    assert_one_line_error(
        gateway.run("token", "create", "--role", "admin", "--ttl", ""), "invalid duration"
    )
    setup_key(gateway, "zero", "ecdsa-p256")
    assert_one_line_error(gateway.run("keys", "public-key", "zero", "--version", "0"), "version")
    assert len(httpx.get(
        f"{gateway.addr}/v1/sys/tokens", headers={"authorization": f"Bearer {gateway.root_token}"}
    ).json()["tokens"]) == tokens  # fmt: skip


def test_mac_and_mac_check(gateway: Gateway, tmp_path: Path) -> None:
    setup_key(gateway, "webhook-mac", "hmac-sha256", "webhook")
    payload = tmp_path / "payload.json"
    payload.write_bytes(b'{"event": "push"}')
    tag = gateway.ok("mac", str(payload), "-k", "webhook-mac").out.strip()
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", tag), tag  # 32 bytes, base64

    assert (
        gateway.ok("mac", str(payload), "-k", "webhook-mac", "--check", tag).out.strip() == "valid"
    )
    assert (
        gateway.ok("mac", "-", "-k", "webhook-mac", stdin=payload.read_bytes()).out.strip() == tag
    )
    payload.write_bytes(b'{"event": "pull"}')
    wrong = gateway.run("mac", str(payload), "-k", "webhook-mac", "--check", tag)
    assert_one_line_error(wrong, "MAC is not valid", rc=1)
    assert_one_line_error(
        gateway.run("mac", str(payload), "-k", "webhook-mac", "--check", "not base64!"),
        "base64",
    )
    setup_key(gateway, "not-a-mac-key", "ecdsa-p256")
    assert_one_line_error(
        gateway.run("mac", str(payload), "-k", "not-a-mac-key"), "invalid_request"
    )


# --------------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------------


def test_token_list_and_revoke(gateway: Gateway) -> None:
    token_id, token = new_token(gateway, "admin")
    gateway.ok("keys", "list", token=token)
    listed = gateway.ok("token", "list", COLUMNS="250").out
    assert token_id in listed
    assert "test admin" in listed

    revoked = json.loads(gateway.ok("token", "revoke", token_id).out)
    assert revoked["id"] == token_id
    assert revoked["revoked_at"]
    row = next(
        line
        for line in gateway.ok("token", "list", COLUMNS="250").out.splitlines()
        if token_id in line
    )
    assert revoked["revoked_at"] in row

    assert_one_line_error(gateway.run("keys", "list", token=token), "unauthenticated")
    assert_one_line_error(gateway.run("token", "revoke", token_id), "not_found")
    gateway.ok("keys", "list")  # the root token still works


# --------------------------------------------------------------------------------------------
# local commands: audit verify, policy test
# --------------------------------------------------------------------------------------------


def test_audit_verify_passes_on_the_server_log_and_names_an_edited_line(
    gateway: Gateway, tmp_path: Path
) -> None:
    data = tmp_path / "f"
    data.write_bytes(b"audited")
    setup_key(gateway, "audited-key", "ecdsa-p256")
    gateway.ok("sign", str(data), "-k", "audited-key")

    log = gateway.data_dir / "audit.log"
    intact = run_cli(("audit", "verify", str(log)), clean_env())
    assert intact.rc == 0, str(intact)
    # then what its checkpoints prove (tests/test_audit_checkpoints.py)
    match = re.fullmatch(r"ok: (\d+) records, chain intact", intact.out.splitlines()[0])
    assert match, str(intact)
    assert int(match.group(1)) >= 3

    copy = tmp_path / "audit.log"
    shutil.copyfile(log, copy)
    lines = copy.read_bytes().splitlines(keepends=True)
    # the record of our sign operation; change one hex digit of its request id
    index = max(i for i, line in enumerate(lines) if b'"action":"sign"' in line)
    record = bytearray(lines[index])
    at = record.index(b'"request_id":"') + len(b'"request_id":"')
    record[at] = ord("0") if record[at] != ord("0") else ord("1")
    lines[index] = bytes(record)
    copy.write_bytes(b"".join(lines))

    broken = run_cli(("audit", "verify", str(copy)), clean_env())
    assert_one_line_error(broken, f"line {index + 1}", rc=1)
    # the server's own log is untouched and still verifies
    assert run_cli(("audit", "verify", str(log)), clean_env()).rc == 0
    # several logs (one per replica): each is checked and named; one broken fails them all
    both = run_cli(("audit", "verify", str(log), str(log)), clean_env())
    assert both.rc == 0 and both.out.count(f"{log}: ok:") == 2, str(both)
    assert_one_line_error(
        run_cli(("audit", "verify", str(log), str(copy)), clean_env()), f"line {index + 1}", rc=1
    )
    # every record names the replica that wrote it (by default the host name and a digest
    # of the audit log's path)
    replicas = {json.loads(line)["replica"] for line in log.read_text().splitlines()}
    digest = hashlib.sha256(str(log.absolute()).encode()).hexdigest()[:6]
    assert replicas == {re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:57] + f"-{digest}"}


def test_policy_test_passes_on_the_shipped_policies() -> None:
    result = run_cli(("policy", "test", "policies"), clean_env(), cwd=REPO)
    assert result.rc == 0, str(result)
    summary = result.out.strip().splitlines()[-1]
    passed = re.fullmatch(r"(\d+) passed, 0 failed", summary)
    assert passed, str(result)
    assert int(passed.group(1)) > 0
    assert "FAIL" not in result.out


# --------------------------------------------------------------------------------------------
# errors are one line, exit 2, no traceback
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("keys", "create", "x", "--type", "ecdsa-p256", "--label", "novalue"), ("name=value",)),
        (("keys", "create", "x", "--type", "nope"), ("invalid_request", "unknown key type")),
        (("sign", "{tmp}/missing.bin", "-k", "k"), ("cannot read", "missing.bin")),
        (("verify", "{tmp}/f", "-k", "k", "-s", "{tmp}/missing.sig"), ("cannot read",)),
        (("mac", "{tmp}/missing.bin", "-k", "k"), ("cannot read",)),
        (("keys", "compromised", "k", "1", "--since", "yesterday"), ("validation_failed",)),
    ],
    ids=[
        "bad-label",
        "bad-type",
        "missing-input",
        "missing-signature",
        "missing-mac-input",
        "bad-time",
    ],
)
def test_errors_are_one_line(
    gateway: Gateway, tmp_path: Path, args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    (tmp_path / "f").write_bytes(b"x")
    result = gateway.run(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert_one_line_error(result, *needles)


def test_version_is_the_installed_package_version() -> None:
    result = run_cli(("--version",), clean_env())
    assert (result.rc, result.out) == (0, f"kmsgate {importlib.metadata.version('kmsgate')}\n")


def test_the_client_commands_load_no_server_module() -> None:
    """`kmsgate` starts in a quarter of a second: loading the command line takes none of the
    server's store, settings or backends (sqlalchemy, alembic and pydantic-settings alone
    took 0.4 s, and a Ctrl-C meanwhile printed a traceback); the commands that need them
    load them when they run."""
    heavy = ("sqlalchemy", "alembic", "pydantic_settings", "kmsgate.store", "kmsgate.backends")
    probe = (
        "import sys, kmsgate.cli; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules if m.startswith({heavy!r})}}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_serve_on_a_busy_port_fails_before_it_prints_or_creates_anything(
    gateway: Gateway, tmp_path: Path
) -> None:
    port = gateway.addr.rsplit(":", 1)[1]
    data_dir = tmp_path / "second"
    result = run_cli(("serve", "--dev", "--data-dir", str(data_dir), "--port", port), clean_env())
    assert_one_line_error(result, f"cannot listen on {LOOPBACK}:{port}", "in use")
    assert "listening" not in result.out and "Root token" not in result.out
    assert not data_dir.exists()


def test_serve_on_a_database_it_cannot_reach_says_why_in_one_line(tmp_path: Path) -> None:
    """A refused port is no "migration failed", a `postgres://` URL (as DATABASE_URL secrets
    spell it) is PostgreSQL, and neither shows the password."""
    db_port = free_port()
    password = "correct-horse-battery"  # a test's
    for scheme in ("postgres", "postgresql"):
        url = f"{scheme}://kmsgate:{password}@{LOOPBACK}:{db_port}/kmsgate"
        result = run_cli(
            ("serve", "--dev", "--data-dir", str(tmp_path / scheme), "--port", str(free_port())),
            clean_env(KMSGATE_DATABASE_URL=url),
        )
        assert_one_line_error(
            result,
            f"cannot connect to the database at postgresql://kmsgate:***@{LOOPBACK}:{db_port}"
            "/kmsgate: Connection refused",
        )
        assert password not in result.err + result.out
        assert "listening" not in result.out


def test_help_has_no_type_labels_on_flags_and_rewraps_paragraphs() -> None:
    """Flags show no `<bool>`; a description is re-wrapped to the terminal, not broken where
    the docstring's source lines break."""
    env = clean_env(COLUMNS="80")
    for args in (("--help",), ("sign", "--help"), ("serve", "--help"), ("encrypt-file", "--help")):
        result = run_cli(args, env)
        assert result.rc == 0, str(result)
        assert "<bool>" not in result.out, str(result)
    help_text = run_cli(("encrypt-file", "--help"), env).out
    paragraph = help_text.split("\n\n")[1].splitlines()
    assert " ".join(line.strip() for line in paragraph) == (
        "Encrypt a file or stdin client-side with a fresh data key (C2SP chunked encryption,"
        " constant memory). The output appears only once complete."
    )
    assert all(60 <= len(line) <= 80 for line in paragraph[:-1]), paragraph


def test_agent_help_shows_the_renewal_default_as_docs_write_it() -> None:
    """It showed [default: 0.6666666666666666]."""
    shown = run_cli(("agent", "--help"), clean_env(COLUMNS="200")).out
    assert "0.666" not in shown and "(default 2/3, at most 0.8)" in shown, shown


def test_every_command_has_a_description_in_help() -> None:
    """`kmsgate GROUP --help` lists each command with the first line of its docstring; one
    without a docstring showed a bare name (`exception show`)."""
    import typer.main

    from kmsgate.cli import app

    def undescribed(group: typer.core.TyperGroup, path: str) -> Iterator[str]:
        for name, command in group.commands.items():
            if not command.help:
                yield f"{path} {name}"
            if isinstance(command, typer.core.TyperGroup):
                yield from undescribed(command, f"{path} {name}")

    root = typer.main.get_command(app)
    assert isinstance(root, typer.core.TyperGroup)
    assert list(undescribed(root, "kmsgate")) == []


def test_unreachable_gateway_is_a_one_line_error() -> None:
    env = clean_env(KMSGATE_ADDR=f"http://{LOOPBACK}:{free_port()}", KMSGATE_TOKEN="kmg.x.y")
    assert_one_line_error(run_cli(("keys", "list"), env), "unreachable")


def test_a_missing_cacert_is_an_error_for_a_client_command_not_for_serve(tmp_path: Path) -> None:
    """A client command names the unreadable file; `serve` does not read --cacert at all,
    so it gets past it (here to its own error, a missing config file) instead of refusing
    to start."""
    missing = str(tmp_path / "nope.pem")
    env = clean_env(KMSGATE_ADDR=f"https://{LOOPBACK}:{free_port()}", KMSGATE_CACERT=missing)
    assert_one_line_error(run_cli(("health",), env), "--cacert", "No such file")
    assert_one_line_error(run_cli(("--cacert", missing, "health"), clean_env()), "--cacert")
    served = run_cli(("serve", "--config", str(tmp_path / "none.yaml")), env)
    assert_one_line_error(served, "cannot read config file", "none.yaml")
    assert "--cacert" not in served.err


def test_a_missing_data_dir_is_named_with_how_to_create_it(tmp_path: Path) -> None:
    """A production `serve` or `token bootstrap` on a data dir that does not exist says so
    and how to make it; it used to name the database's lock file inside it."""
    root_key = tmp_path / "secrets" / "root.key"
    create_root_key_file(root_key)
    config = tmp_path / "kmsgate.yaml"
    config.write_text(f"root_key_file: {root_key}\nport: {free_port()}\n")
    missing = tmp_path / "nonexist"
    env = clean_env(KMSGATE_DATA_DIR=str(missing))
    for args in (("serve",), ("token", "bootstrap")):
        result = run_cli((*args, "--config", str(config)), env)
        assert_one_line_error(result, f"the data dir {missing} does not exist", "mkdir -m 700")
    assert not missing.exists()
    missing.write_text("")
    result = run_cli(("serve", "--config", str(config)), env)
    assert_one_line_error(result, f"the data dir {missing} is not a directory")


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"listen: [\n  bad: : x\n", ("not valid YAML", "found ':' at line 2, column 8")),
        (b"\xff\xfe\x00garbage", ("is not UTF-8 text",)),
    ],
)
def test_a_config_file_that_is_not_yaml_is_one_plain_line(
    tmp_path: Path, content: bytes, needles: tuple[str, ...]
) -> None:
    config = tmp_path / "broken.yaml"
    config.write_bytes(content)
    served = run_cli(("serve", "--config", str(config)), clean_env())
    assert_one_line_error(served, "broken.yaml", *needles)
    assert "\\n" not in served.err


def test_every_command_has_a_section_in_docs_cli_md() -> None:
    """docs/cli.md has a heading naming each top-level command (`## health`) or group
    (`## keys`, `## audit verify`)."""
    import typer.main

    from kmsgate.cli import app

    headings = (REPO / "docs" / "cli.md").read_text().splitlines()
    named = {
        part.split()[0]
        for line in headings
        if line.startswith(("## ", "### "))
        for part in line.lstrip("#").strip().split(", ")
    }
    missing = sorted(set(typer.main.get_group(app).commands) - named)
    assert not missing, f"docs/cli.md has no section for {missing}"


# --------------------------------------------------------------------------------------------
# known bugs: these fail until kmsgate/cli/ is fixed (see each docstring)
# --------------------------------------------------------------------------------------------


def test_python_dash_m_kmsgate_cli_runs_the_cli() -> None:
    """cli.py has no `if __name__ == "__main__": main()`: `python -m kmsgate.cli ...` does
    nothing and exits 0, so a script using it believes every command succeeded."""
    proc = subprocess.run(
        [sys.executable, "-m", "kmsgate.cli", "--help"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0
    assert "Usage" in proc.stdout


def test_ctrl_c_while_the_command_line_loads_exits_130_without_a_traceback() -> None:
    """The load is stopped where a real Ctrl-C would land most often: importing the CLI."""
    stop_the_load = (
        "import builtins, kmsgate.__main__ as entry\n"
        "real = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        "    if name == 'kmsgate.cli':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        "entry.main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", stop_the_load],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (130, "")


def test_importing_a_missing_public_key_file_is_a_one_line_error(
    gateway: Gateway, tmp_path: Path
) -> None:
    """keys_create reads --public-key with Path.read_text() outside any error handling."""
    result = gateway.run(
        "keys",
        "create",
        "imported",
        "--type",
        "ecdsa-p256",
        "--public-key",
        str(tmp_path / "no.pem"),
    )
    assert_one_line_error(result, "no.pem")


@pytest.mark.parametrize(
    "encoding", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
def test_a_private_key_given_for_a_public_key_or_a_csr_is_never_sent(
    tmp_path: Path, encoding: serialization.PrivateFormat
) -> None:
    """keys create --public-key and cert issue --csr sent a private key to the gateway (which
    refused it). The gateway here cannot be reached: a request would say so."""
    key = tmp_path / "key.pem"
    private = ec.generate_private_key(ec.SECP256R1())
    key.write_bytes(
        private.private_bytes(serialization.Encoding.PEM, encoding, serialization.NoEncryption())
    )
    env = clean_env(KMSGATE_ADDR="http://127.0.0.1:1", KMSGATE_TOKEN="kmg.x.y")
    for args in (
        ("keys", "create", "pub", "--public-key", str(key)),
        ("cert", "issue", "--ca", "dev", "--profile", "server", "--csr", str(key)),
    ):
        done = run_cli(args, env)
        assert_one_line_error(done, f"{key} holds a private key, which was not sent")


def test_policy_explain_takes_only_the_principal_kinds_there_are() -> None:
    """--kind bogus was sent to the gateway (here unreachable) as the principal's kind."""
    env = clean_env(KMSGATE_ADDR="http://127.0.0.1:1")
    done = run_cli(("policy", "explain", "--action", "sign", "--kind", "bogus"), env)
    assert done.rc == 2 and "Invalid value for '--kind'" in done.err, str(done)
    assert "'token', 'oidc', 'mtls'" in done.err, str(done)


def test_public_and_private_together_are_refused_not_the_last_taken() -> None:
    """keys update (and create) --public --private made the key private without a word.
    Refused before the gateway (here unreachable) is asked."""
    env = clean_env(KMSGATE_ADDR="http://127.0.0.1:1")
    for args in (("keys", "update", "k"), ("keys", "create", "k", "--type", "ed25519")):
        done = run_cli((*args, "--public", "--private"), env)
        assert_one_line_error(done, "give --public or --private, not both")


def test_an_unknown_algorithm_for_a_digest_is_named_with_the_valid_ones(tmp_path: Path) -> None:
    """It said "bogus has none" (as if bogus were an algorithm without a hash)."""
    data = tmp_path / "f"
    data.write_bytes(b"x")
    env = clean_env(KMSGATE_ADDR="http://127.0.0.1:1")
    done = run_cli(("sign", str(data), "-k", "k", "--algorithm", "bogus", "--digest"), env)
    assert_one_line_error(done, "unknown algorithm 'bogus': --digest takes one of ecdsa-sha256,")
    assert "rsa-pss-sha512" in done.err and "ed25519" not in done.err, str(done)
    hashless = run_cli(("sign", str(data), "-k", "k", "--algorithm", "ed25519", "--digest"), env)
    assert_one_line_error(hashless, "--digest needs an algorithm with a hash", "ed25519 has none")


def test_audit_verify_shows_a_progress_bar_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log of millions of records takes minutes to verify: on a terminal, stderr shows
    a bar over the bytes of all its chain files; the verdict on stdout is unchanged."""
    from typer.testing import CliRunner

    from kmsgate.audit import AuditEvent, FileSink
    from kmsgate.cli import app

    log = tmp_path / "audit.log"
    with FileSink(log) as sink:
        for n in range(50):
            sink.append(AuditEvent("sign", "allow", "ok", f"r{n}", principal="ci"))
    screen = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    monkeypatch.setattr(common, "err", screen)
    result = CliRunner().invoke(app, ["audit", "verify", str(log)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: 50 records, chain intact")
    shown = screen.file.getvalue()
    assert "verifying audit.log" in shown and f"{log.stat().st_size / 1000:.1f} kB" in shown


def test_audit_verify_of_a_missing_log_is_a_one_line_error(tmp_path: Path) -> None:
    """AuditFile.verify raises OSError; audit_verify lets it escape (traceback, exit 1, which
    also reads as "the log is broken")."""
    result = run_cli(("audit", "verify", str(tmp_path / "none.log")), clean_env())
    assert_one_line_error(result, "none.log")
    in_a_directory = run_cli(("audit", "verify", str(tmp_path)), clean_env())
    assert_one_line_error(in_a_directory, "is a directory", str(tmp_path / "audit.log"))


def test_sign_output_to_an_unwritable_path_is_a_one_line_error(
    gateway: Gateway, tmp_path: Path
) -> None:
    """sign -o (and keys public-key -o) write with Path.write_bytes()/write_text() outside
    any error handling."""
    setup_key(gateway, "out-key", "ed25519")
    data = tmp_path / "f"
    data.write_bytes(b"x")
    result = gateway.run("sign", str(data), "-k", "out-key", "-o", str(tmp_path / "no" / "sig"))
    assert_one_line_error(result, "cannot write")


def run_into_full(gw: Gateway, *args: str) -> Run:
    """The CLI with its stdout on /dev/full, where every write fails (ENOSPC) as on a full
    disk."""
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [kmsgate_script(), *args],
            stdin=subprocess.DEVNULL,
            stdout=full,
            stderr=subprocess.PIPE,
            env=gw.env(),
            timeout=CLI_TIMEOUT,
            check=False,
        )
    return Run(tuple(args), proc.returncode, "", proc.stderr.decode(errors="replace"))


@pytest.fixture(scope="module")
def full_key(gateway: Gateway) -> Gateway:
    """The gateway, holding the key `full-key` (ed25519)."""
    setup_key(gateway, "full-key", "ed25519")
    return gateway


@pytest.mark.parametrize(
    "command",
    [
        ("keys", "show", "full-key"),
        ("keys", "list"),
        ("keys", "public-key", "full-key"),
        ("sign", "-", "-k", "full-key"),
        ("login",),
        ("login", "--json"),
        ("ca", "chain", "dev"),
        ("policy", "explain", "--action", "sign", "--as", "admin"),
    ],
)
def test_a_failed_write_on_stdout_is_a_one_line_error(
    full_key: Gateway, command: tuple[str, ...]
) -> None:
    """A full disk under stdout was a traceback (exit 1), or Python's own complaint at exit."""
    done = run_into_full(full_key, *command)
    assert_one_line_error(done, "cannot write stdout: No space left on device")


def test_a_token_created_but_not_printed_is_named_to_revoke(gateway: Gateway) -> None:
    done = run_into_full(gateway, "token", "create", "--role", "nobody")
    assert done.rc == 2 and "Traceback" not in done.err, str(done)
    token_id = done.err.split("token id ")[1].split()[0]
    error = done.err.strip().splitlines()[-1]
    assert error.startswith("error: cannot write stdout: No space left on device"), str(done)
    assert f"token {token_id} was created: revoke it (kmsgate token revoke {token_id})" in error


def test_a_read_error_while_hashing_a_digest_is_a_one_line_error(gateway: Gateway) -> None:
    """/proc/self/mem opens and fails its first read (EIO), as a failing disk does part-way:
    the read loop of --digest let the OSError out (a traceback); the plain path did not."""
    setup_key(gateway, "digest-io-key", "ecdsa-p256")
    for digest in ((), ("--digest",)):
        done = gateway.run("sign", "/proc/self/mem", "-k", "digest-io-key", *digest)
        assert_one_line_error(done, "cannot read /proc/self/mem: Input/output error")


def test_login_json_reports_a_failure_as_json_on_stdout(gateway: Gateway, tmp_path: Path) -> None:
    """As the other --json commands do (model verify): stdout held nothing."""
    refused = gateway.run("login", "--json", token="kmg.0000000000000000.wrong")
    report = json.loads(refused.out)
    assert refused.rc == 2 and report["ok"] is False and report["exit_code"] == 2, str(refused)
    assert report["error"]["code"] == "unauthenticated"
    unread = gateway.run("login", "--json", "--oidc-token", str(tmp_path / "none.jwt"))
    assert json.loads(unread.out)["error"]["detail"].startswith("cannot read"), str(unread)


def test_keys_list_due_shows_the_period_in_its_largest_whole_unit(gateway: Gateway) -> None:
    """It showed the API's seconds (7776000s for 90d)."""
    for name, period in (("due-90d", "90d"), ("due-36h", "36h")):
        reply = httpx.post(
            f"{gateway.addr}/v1/keys",
            json={"name": name, "type": "ed25519", "purpose": "general", "rotation_period": period},
            headers={"authorization": f"Bearer {gateway.root_token}"},
            timeout=CLI_TIMEOUT,
        )
        assert reply.status_code == 201, reply.text
    rows = [line.split("\t") for line in gateway.ok("keys", "list", "--due").out.splitlines()]
    periods = {row[0]: row[1] for row in rows}
    assert (periods["due-90d"], periods["due-36h"]) == ("90d", "36h"), rows


def test_error_text_is_printed_literally_not_as_markup(gateway: Gateway, tmp_path: Path) -> None:
    """fail() hands the message to rich as markup: user text such as `[/x]` raises
    MarkupError (traceback) and `[bold]` disappears from the message."""
    result = gateway.run("keys", "create", "x", "--type", "ed25519", "--label", "[/x]")
    assert_one_line_error(result, "[/x]")
    result = gateway.run("sign", str(tmp_path / "[bold]missing"), "-k", "k")
    assert_one_line_error(result, "[bold]missing")


def test_token_list_shows_whole_ids_when_piped(gateway: Gateway) -> None:
    """`token list` (and `keys list`) render a rich table 80 columns wide when stdout is not
    a terminal, cutting ids to `378ea2ea031…`: the id `token revoke` needs cannot be read
    from the list in a script."""
    token_id, _ = new_token(gateway, "auditor")
    listed = gateway.ok("token", "list").out
    assert token_id in listed


def test_an_error_naming_a_file_is_one_line_whatever_the_name(tmp_path: Path) -> None:
    """A file name with a newline and a terminal escape sequence (which could print a fake
    "verified" line) is shown with escapes in the one error line."""
    name = "x\n\x1b[2Kverified: fake"
    result = run_cli(("sign", str(tmp_path / name), "-k", "k"), clean_env())
    assert_one_line_error(result, "x\\n\\x1b[2Kverified: fake")
    assert "\x1b" not in result.err


def test_an_unreachable_address_is_named_without_its_password() -> None:
    """A password in --addr (basic auth to a proxy) is never printed back."""
    result = run_cli(("keys", "list", "--addr", "http://u:s3cretpw@127.0.0.1:1"), clean_env())
    assert_one_line_error(result, "cannot reach http://***@127.0.0.1:1")
    assert "s3cretpw" not in result.err + result.out


def test_a_listing_prints_hidden_characters_and_markup_as_text(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value from elsewhere (an imported CA's issuer, a label stored before the API
    refused such characters) cannot forge a row or a column, nor restyle or crash the rich
    table with "[...]": piped, each hidden character is printed as its escape; on a
    terminal, the cell's text is shown as it is."""
    cell = "CN=x\nfake\tkmsgate\u202e[/bold]"
    common.print_table(["name", "subject"], [["a", cell]])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["name\tsubject", "a\tCN=x\\nfake\\tkmsgate\\u202e[/bold]"]
    screen = Console(file=io.StringIO(), force_terminal=True, width=200, color_system=None)
    monkeypatch.setattr(common, "out", screen)
    common.print_table(["name", "subject"], [["a", cell]])
    printed = screen.file.getvalue()
    assert "CN=x\\nfake\\tkmsgate\\u202e[/bold]" in printed and "\u202e" not in printed


def test_restricted_signer_can_sign_a_digest(prod_env_gateway: Gateway, tmp_path: Path) -> None:
    """A sign-only role (ml-sec) may not read the key to learn its algorithm: `sign --digest`
    then says to pass --algorithm, and works with it."""
    setup_key(prod_env_gateway, "ms-digest", "ecdsa-p256", "model-sign")
    _, signer = new_token(prod_env_gateway, "ml-sec")
    data = tmp_path / "model.bin"
    data.write_bytes(os.urandom(MAX_INPUT_BYTES + 1))
    unknown = prod_env_gateway.run("sign", str(data), "-k", "ms-digest", "--digest", token=signer)
    assert unknown.rc == 2
    assert "pass --algorithm" in unknown.err
    signed = prod_env_gateway.run(
        "sign",
        str(data),
        "-k",
        "ms-digest",
        "--digest",
        "--algorithm",
        "ecdsa-sha256",
        token=signer,
    )
    assert signed.rc == 0, str(signed)


def test_dev_mode_from_the_environment_uses_the_default_data_dir(tmp_path: Path) -> None:
    """serve.py applies the default dev data dir only for the `--dev` flag. With
    KMSGATE_DEV=1 instead, settings.dev is true but data_dir stays None, and
    prepare_dev_data_dir fails its assertion (a traceback, no server)."""
    port = free_port()
    output = tmp_path / "serve.log"
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            [kmsgate_script(), "serve", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(KMSGATE_DEV="1", HOME=str(tmp_path)),
            start_new_session=True,
        )
    try:
        token = _wait_until_serving(proc, f"http://{LOOPBACK}:{port}", output)
        assert token is not None, output.read_text(errors="replace")
        assert (tmp_path / ".kmsgate" / "dev" / "root-token").read_text().strip() == token
    finally:
        _stop(proc)


def test_the_listening_socket_is_tcp_so_asyncio_sets_nodelay() -> None:
    """asyncio turns on TCP_NODELAY only for sockets created with proto IPPROTO_TCP; without
    it every reply waited ~40 ms on a delayed ACK (measured: 720 req/s instead of 5,000)."""
    from kmsgate.serve import _listen

    with _listen(LOOPBACK, 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.get_inheritable()


def test_a_gateway_and_its_workers_write_no_core_file(tmp_path: Path) -> None:
    """A core dump would hold the root key, PINs and tokens: `serve` sets RLIMIT_CORE to 0,
    soft and hard, before anything is loaded, and its workers inherit it."""
    with running_gateway(tmp_path, "--workers", "2") as gw:
        assert gw.process is not None
        pids = [gw.process.pid, *_children(gw.process.pid)]
        assert len(pids) >= 3, pids  # the supervisor and its two workers
        for pid in pids:
            limits = Path(f"/proc/{pid}/limits").read_text()
            (line,) = [row for row in limits.splitlines() if row.startswith("Max core file size")]
            assert line.split()[4:6] == ["0", "0"], line


def _children(pid: int) -> list[int]:
    """The PIDs of `pid`'s child processes (from /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def test_serve_removes_the_metrics_dirs_of_supervisors_killed_before_cleaning_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A supervisor killed with SIGKILL leaves its workers' metrics directory behind; the
    next `serve --workers N` removes it, and leaves alone those of running supervisors."""
    from kmsgate.serve import _remove_dead_supervisors_metrics

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=CLI_TIMEOUT,
    )
    dead = tmp_path / f"kmsgate-metrics-{gone.stdout.strip()}-x1"
    alive = tmp_path / f"kmsgate-metrics-{os.getpid()}-x2"
    unrelated = tmp_path / "kmsgate-metrics-notapid-x3"
    huge = tmp_path / f"kmsgate-metrics-{10**20}-x4"
    # a PID this process cannot see (another PID namespace) whose workers still write
    fresh = tmp_path / f"kmsgate-metrics-{gone.stdout.strip()}-x5"
    idle = time.time() - 3600
    for directory in (dead, alive, unrelated, huge, fresh):
        directory.mkdir()
        (directory / "1.json").write_text("{}")
        if directory is not fresh:
            os.utime(directory, (idle, idle))
    _remove_dead_supervisors_metrics()
    assert not dead.exists() and not huge.exists()
    assert alive.exists() and unrelated.exists() and fresh.exists()


def test_the_cli_and_a_dev_gateway_work_without_any_extra(tmp_path: Path) -> None:
    """`pip install kmsgate` without extras (the README's first install) gives a CLI and a
    gateway that work with the local backend: no module of an extra (python-pkcs11, hvac,
    boto3, psycopg) is imported until a backend or a store needs it, and then the error
    names the extra. They are made unimportable here, as in such an install."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "for name in ('pkcs11', 'hvac', 'boto3', 'botocore', 'psycopg'):\n"
        "    sys.modules[name] = None\n"
    )
    env = clean_env(PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    assert run_cli(("--version",), env).rc == 0
    with running_gateway(tmp_path, **{"PYTHONPATH": env["PYTHONPATH"]}) as gw:
        body = {"name": "plain", "type": "ecdsa-p256", "purpose": "p"}
        auth = {"authorization": f"Bearer {gw.root_token}"}
        assert httpx.post(f"{gw.addr}/v1/keys", json=body, headers=auth).status_code == 201
    pin = tmp_path / "pin"
    pin.write_text("1234")
    token = (
        "pkcs11:token=root;object=root"
        f"?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:{pin}"
    )
    out = tmp_path / "root.pem"
    refused = run_cli(
        ("ca", "init-root", "--cert-out", str(out), "--subject", "Root", "--token", token), env
    )
    assert_one_line_error(refused, "pip install 'kmsgate[pkcs11]'", rc=2)


def test_a_whole_token_given_to_revoke_revokes_it_and_its_secret_is_kept_nowhere(
    gateway: Gateway,
) -> None:
    """Pasting the whole leaked token is the natural mistake: the CLI sends only its id,
    and the API refuses anything but an id before the audit record is written, without
    echoing it (the secret used to land in stderr and, for good, in the audit log)."""
    token_id, token = new_token(gateway, "admin")
    secret = token.split(".")[2]
    revoked = json.loads(gateway.ok("token", "revoke", token).out)
    assert revoked["id"] == token_id and revoked["revoked_at"]
    assert_one_line_error(gateway.run("keys", "list", token=token), "unauthenticated")
    _, other = new_token(gateway, "admin")
    root = {"authorization": f"Bearer {gateway.root_token}"}
    direct = httpx.delete(f"{gateway.addr}/v1/sys/tokens/{other}", headers=root)
    assert direct.status_code == 404 and other.split(".")[2] not in direct.text
    gateway.ok("keys", "list", token=other)  # still live
    refused = gateway.run("token", "revoke", "kmg.nothex.x")
    assert_one_line_error(refused, "not a token id", rc=2)
    audit = (gateway.data_dir / "audit.log").read_text()
    assert secret not in audit and other.split(".")[2] not in audit


def test_a_token_with_a_line_end_works_and_one_with_a_space_inside_is_never_shown(
    gateway: Gateway,
) -> None:
    """A token file saved with CRLF, or a pasted trailing space, still authenticates; a
    token broken by a space inside is refused by the CLI without being printed (httpx's
    error quoted the whole header)."""
    for padded in (f"{gateway.root_token}\r\n", f"{gateway.root_token} "):
        gateway.ok("keys", "list", token=padded)
    broken = gateway.root_token[:20] + " " + gateway.root_token[20:]
    refused = gateway.run("keys", "list", token=broken)
    assert_one_line_error(refused, "the token holds a space or a control character", rc=2)
    assert gateway.root_token[20:] not in refused.err and gateway.root_token[:20] not in refused.err


def test_the_test_command_explains_itself_and_runs_nothing() -> None:
    """`scripts/test.sh --help` ran the installs, the linters and `pytest --help`."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "test.sh"
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(script), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "KMSGATE_REQUIRE_ALL=1" in done.stdout and "extra arguments go to pytest" in done.stdout
    assert "==>" not in done.stdout + done.stderr  # no step started
    assert time.monotonic() - started < 5


def test_a_narrow_terminal_wraps_a_name_rather_than_cut_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """On 80 columns, rich cut long names to "k-hmac-s…", so two keys read alike."""
    names = ["k-hmac-sha256-production-eu", "k-hmac-sha512-production-eu"]
    screen = Console(file=io.StringIO(), force_terminal=True, width=40, color_system=None)
    monkeypatch.setattr(common, "out", screen)
    common.print_table(["name", "type", "purpose"], [[n, "hmac-sha256", "general"] for n in names])
    printed = screen.file.getvalue()
    first_column = [line.split("│")[1].strip() for line in printed.splitlines() if "│" in line]
    assert "…" not in printed
    assert "".join(first_column) == "".join(names)  # each name whole, over several lines


def test_keys_update_changes_the_minimum_the_schedule_the_labels_and_publicity(
    gateway: Gateway,
) -> None:
    """What the docs did with curl: each change shows in the key printed back."""
    setup_key(gateway, "updated-key", "aes-256-gcm")
    gateway.ok("keys", "rotate", "updated-key")

    def update(*args: str) -> dict[str, Any]:
        return dict(json.loads(gateway.ok("keys", "update", "updated-key", *args).out))

    assert update("--min-decrypt-version", "2")["min_decrypt_version"] == 2
    assert update("--min-decrypt-version", "1")["min_decrypt_version"] == 1
    assert update("--rotation-period", "90d")["rotation_period"] == "7776000s"
    assert "rotation_period" not in update("--no-rotation")
    assert update("--label", "team=ml", "--label", "env=prod")["labels"] == {
        "team": "ml",
        "env": "prod",
    }
    assert update("--clear-labels")["labels"] == {}
    for args, needle in (
        ((), "nothing to change"),
        (("--rotation-period", "1h", "--no-rotation"), "not both"),
        (("--min-decrypt-version", "9"), "cannot exceed the primary version"),
        (("--rotation-period", "10s"), "rotation_period"),
        (("--label", "novalue"), "name=value"),
    ):
        assert_one_line_error(gateway.run("keys", "update", "updated-key", *args), needle)
