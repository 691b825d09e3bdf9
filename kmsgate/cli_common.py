"""What every `kmsgate` command module shares: consoles, the address and token options,
and the one-line failure."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

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
