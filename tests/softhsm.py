"""SoftHSM2 fixtures for the pkcs11 backend: a private SoftHSM configuration and fresh tokens.

SoftHSM reads `SOFTHSM2_CONF` when the module is initialised, and python-pkcs11 loads a module
once per process, so every token of a test session lives in one token directory: the first
user calls `softhsm_session`, which writes a private config under pytest's temp dir, points
`SOFTHSM2_CONF` at it for the rest of the session (restored at the end) and creates tokens in
it with `softhsm2-util` (a fresh label per purpose, random PINs in 0600 files). Nothing is
installed at test time: without `softhsm2-util` or the module the tests skip, or fail under
KMSGATE_REQUIRE_ALL=1 (see `tests.components.require_component`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.components import require_component

__all__ = [
    "SOFTHSM_MODULES",
    "SoftHsm",
    "SoftHsmToken",
    "find_softhsm_module",
    "softhsm",
    "softhsm_session",
    "softhsm_token",
]

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
_TOOL_TIMEOUT = 60.0


def find_softhsm_module() -> str | None:
    """The first SoftHSM2 module found in the usual places, or None."""
    return next((m for m in SOFTHSM_MODULES if Path(m).is_file()), None)


@dataclass(frozen=True)
class SoftHsm:
    """A private SoftHSM2 configuration (token dir, config file) for this test session."""

    base: Path
    conf: Path
    token_dir: Path
    module: str
    util: str

    def env(self) -> dict[str, str]:
        """The environment for subprocesses (softhsm2-util, pkcs11-tool, a gateway)."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def run(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a tool with this config, bounded in time. Raises RuntimeError on failure."""
        try:
            proc = subprocess.run(
                argv,
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=_TOOL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"timed out: {argv[0]}") from None
        if check and proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def init_token(self, label: str, *, pin: str | None = None) -> SoftHsmToken:
        """A fresh token `label` (max 32 chars) with a random SO PIN and user PIN (or `pin`),
        the user PIN in a 0600 file."""
        assert len(label) <= 32
        token = SoftHsmToken(
            hsm=self,
            label=label,
            pin_file=self.base / f"{label}.pin",
            so_pin=secrets.token_hex(8),
        )
        user_pin = pin or secrets.token_hex(8)
        fd = os.open(token.pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(user_pin + "\n")
        token.init()
        return token


@dataclass(frozen=True)
class SoftHsmToken:
    """One SoftHSM token of the session."""

    hsm: SoftHsm
    label: str
    pin_file: Path
    so_pin: str

    @property
    def pin(self) -> str:
        return self.pin_file.read_text().strip()

    def init(self) -> None:
        """(Re)create the token in a free slot, with the PIN in `pin_file`."""
        self.hsm.run(
            [
                self.hsm.util,
                "--init-token",
                "--free",
                "--label",
                self.label,
                "--so-pin",
                self.so_pin,
                "--pin",
                self.pin,
            ]
        )

    def delete(self) -> None:
        """Delete the token and its keys, as an operator would (`softhsm2-util --delete-token`)."""
        self.hsm.run([self.hsm.util, "--delete-token", "--token", self.label])

    def backend_config(self, **extra: Any) -> dict[str, Any]:
        """The `backends.<name>` entry of a kmsgate config for this token."""
        return {
            "type": "pkcs11",
            "module": self.hsm.module,
            "token": self.label,
            "pin_file": str(self.pin_file),
            **extra,
        }

    def pkcs11_tool(self, *args: str, login: bool = True) -> str:
        """Output of OpenSC's `pkcs11-tool` on this token. Raises RuntimeError."""
        tool = shutil.which("pkcs11-tool")
        if tool is None:
            require_component("opensc", "no 'pkcs11-tool' on PATH; apt-get install opensc")
        argv = [tool, "--module", self.hsm.module, "--token-label", self.label]
        if login:
            argv += ["--login", "--pin", self.pin]
        return self.hsm.run([*argv, *args]).stdout

    def list_objects(self) -> list[dict[str, str]]:
        """`pkcs11-tool --list-objects`, one dict per object: `kind` (its heading) and the
        indented `field: value` lines."""
        objects: list[dict[str, str]] = []
        for line in self.pkcs11_tool("--list-objects").splitlines():
            if re.match(r"^(Private Key|Public Key|Secret Key|Certificate|Data) Object", line):
                objects.append({"kind": line.strip()})
            elif objects and line.startswith(" ") and ":" in line:
                name, _, value = line.strip().partition(":")
                objects[-1][name.strip()] = value.strip()
        return objects


_SESSION: dict[str, Any] = {}


def _check_prerequisites() -> tuple[str, str]:
    missing: str | None = None
    util = shutil.which("softhsm2-util")
    module = find_softhsm_module()
    if util is None:
        missing = "no 'softhsm2-util' on PATH; apt-get install softhsm2"
    elif module is None:
        missing = f"no SoftHSM2 module in {', '.join(SOFTHSM_MODULES)}"
    elif importlib.util.find_spec("pkcs11") is None:
        missing = "python-pkcs11 is not importable; pip install -e '.[pkcs11]'"
    if missing is not None:
        require_component("softhsm2", missing)
    assert util is not None and module is not None
    return util, module


def softhsm_session(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    """The session's SoftHSM configuration, created on first use (see the module docstring).

    Skips (or fails under KMSGATE_REQUIRE_ALL=1) if SoftHSM2 or python-pkcs11 is missing.
    """
    util, module = _check_prerequisites()
    hsm: SoftHsm | None = _SESSION.get("hsm")
    if hsm is not None:
        return hsm
    base = tmp_path_factory.mktemp("softhsm")
    base.chmod(0o700)
    token_dir = base / "tokens"
    token_dir.mkdir(mode=0o700)
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    hsm = SoftHsm(base=base, conf=conf, token_dir=token_dir, module=module, util=util)
    _SESSION["hsm"] = hsm
    _SESSION["previous_conf"] = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return hsm


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Restore SOFTHSM2_CONF (the token dir goes with pytest's temp dirs)."""
    if "hsm" not in _SESSION:
        return
    previous = _SESSION.pop("previous_conf", None)
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@contextlib.contextmanager
def softhsm_token(tmp_path_factory: pytest.TempPathFactory, label: str) -> Iterator[SoftHsmToken]:
    """A fresh token `label` in the session's SoftHSM configuration, deleted on exit (close
    the backends using it first). Skips like `softhsm_session`."""
    token = softhsm_session(tmp_path_factory).init_token(label)
    try:
        yield token
    finally:
        with contextlib.suppress(RuntimeError):  # already deleted by the test
            token.delete()


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """The session's SoftHSM2 configuration (tokens: `softhsm.init_token(label)`)."""
    yield softhsm_session(tmp_path_factory)


def make_backend(name: str, hsm_token: SoftHsmToken, **extra: Any) -> Any:
    """A kmsgate pkcs11 backend named `name` on `hsm_token` (`extra`: more of its config)."""
    from kmsgate.backends.pkcs11 import Pkcs11Backend
    from kmsgate.config import BackendSettings

    return Pkcs11Backend.from_config(name, BackendSettings(**hsm_token.backend_config(**extra)))
