"""What every `kmsgate` command module shares: consoles, the address and token options,
and the one-line failure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from kmsgate.client import ApiError

out = Console()
err = Console(stderr=True)

AddrOpt = Annotated[str | None, typer.Option("--addr", envvar="KMSGATE_ADDR", help="Gateway URL.")]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="KMSGATE_TOKEN", help="API token.", show_default=False),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` as one line on stderr (never as markup) and exit with `code`."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def fail_api(exc: ApiError, note: str = "", code: int = 2) -> NoReturn:
    """`fail` for a gateway error: `code: detail`, then `note`. A 401 to a request that carried
    no token says how to give one and where a dev server keeps its root token."""
    message = f"{exc.code}: {exc.detail}"
    if exc.code == "unauthenticated" and not exc.token_sent:
        message += f" (no API token given: set KMSGATE_TOKEN or pass --token; {_root_token_hint()})"
    fail(message + (f" ({note})" if note else ""), code)


def _root_token_hint() -> str:
    from kmsgate.config import ROOT_TOKEN_FILE, dev_data_dir

    data_dir = os.environ.get("KMSGATE_DATA_DIR")
    path = (Path(data_dir) if data_dir else dev_data_dir()) / ROOT_TOKEN_FILE
    return f"a dev server's root token is in {path}"
