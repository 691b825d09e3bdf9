"""The `kmsgate` command line (typer + rich): the app, its global options and every command.

Every command but `serve`, `audit verify`, `policy test` and the offline root ceremony
(`ca init-root`, `ca sign-intermediate`, `ca root-crl`) talks to a gateway through `kmsgate.client`
(`--addr`/`KMSGATE_ADDR`, `--token`/`KMSGATE_TOKEN`). Failures print one
line on stderr and exit non-zero: 1 for a negative answer (invalid signature, failed check),
2 for an error.
"""

from __future__ import annotations

import os
import signal
import ssl
from pathlib import Path
from typing import Annotated

import typer

from kmsgate import __version__
from kmsgate.cli import admin, ca, certs, encryption, keys
from kmsgate.cli.agent import agent
from kmsgate.cli.common import fail
from kmsgate.cli.exceptions import exception_app
from kmsgate.cli.model import model_app

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags without type labels, paragraphs re-wrapped
    context_settings={"max_content_width": 120},
    help="kmsgate: keys as a service.",
)
app.add_typer(keys.keys_app, name="keys")
app.add_typer(admin.token_app, name="token")
app.add_typer(admin.audit_app, name="audit")
app.add_typer(admin.policy_app, name="policy")
app.add_typer(model_app, name="model")
app.add_typer(ca.ca_app, name="ca")
app.add_typer(certs.cert_app, name="cert")
app.add_typer(exception_app, name="exception")

# top-level commands, in the order `kmsgate --help` lists them
app.command()(admin.serve)
app.command()(admin.login)
app.command()(admin.health)
app.command()(keys.sign)
app.command()(keys.verify)
app.command()(keys.mac)
app.command()(encryption.encrypt)
app.command()(encryption.decrypt)
app.command("encrypt-file")(encryption.encrypt_file)
app.command("decrypt-file")(encryption.decrypt_file)
app.command("rewrap")(encryption.rewrap_files)
app.command("root-key-init")(admin.root_key_init)
app.command()(agent)


def _print_version(value: bool) -> None:
    if value:
        print(f"kmsgate {__version__}")
        raise typer.Exit


DEBUG_VARIABLE = "KMSGATE_DEBUG"
"""Set (to anything) to see the traceback of an error no command foresaw, not one line."""

SERVER_COMMANDS = frozenset({"serve"})
"""Commands that run a gateway rather than talk to one: the client-side `--cacert` is no
concern of theirs (a replica's environment may name the dev CA file that `serve --dev`
writes on its first start, for its health check)."""


@app.callback()
def _global_options(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    cacert: Annotated[
        Path | None,
        typer.Option(
            "--cacert",
            envvar="KMSGATE_CACERT",
            help="Trust this CA certificate (PEM) for an https:// gateway (`serve` ignores it).",
        ),
    ] = None,
) -> None:
    """kmsgate: keys as a service."""
    if ctx.invoked_subcommand in SERVER_COMMANDS:
        return
    if cacert is not None:
        try:
            ssl.create_default_context(cafile=str(cacert))
        except (OSError, ssl.SSLError) as exc:
            fail(f"--cacert {cacert}: {getattr(exc, 'strerror', None) or exc}")
        os.environ["KMSGATE_CACERT"] = str(cacert)  # the SDK client trusts it


def main() -> None:
    """Entry point of the `kmsgate` script. SIGTERM and SIGHUP end a command as Ctrl-C does
    (exit 128 + the signal's number), through the same clean-up: a command writing a file
    removes its temporary file (`serve` and `agent` install their own handlers)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None
    except Exception as exc:  # what no command foresaw: one line, exit 2, not a traceback
        if os.environ.get(DEBUG_VARIABLE):
            raise
        try:
            fail(f"unexpected {type(exc).__name__}: {exc} (a bug? {DEBUG_VARIABLE}=1 shows where)")
        except typer.Exit as failed:
            raise SystemExit(failed.exit_code) from None


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)
