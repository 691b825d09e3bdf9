"""`kmsgate exception`: JIT exceptions, time-limited grants another principal approves."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kmsgate.cli.common import (
    AddrOpt,
    TokenOpt,
    call,
    err,
    print_json,
    print_out,
    print_table,
)
from kmsgate.client import Client

exception_app = typer.Typer(
    no_args_is_help=True,
    help="JIT exceptions: time-limited grants that another principal approves.",
)


@exception_app.command("request")
def request(
    action: Annotated[list[str], typer.Option("--action", help="Repeatable: sign, decrypt, ...")],
    resource: Annotated[
        str, typer.Option(help="A key name or glob (release-*), or purpose:<purpose>.")
    ],
    duration: Annotated[str, typer.Option(help="From activation: 90s, 15m, 8h.")],
    ticket: Annotated[str, typer.Option(help="The change or incident ticket.")],
    reason: Annotated[str, typer.Option(help="Why, for the approver and the audit.")],
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Ask for a grant for yourself; prints its id (pending until approved)."""
    grant = call(addr, token, Client.request_exception, action, resource, duration, ticket, reason)
    err.print(
        f"exception {grant['id']} pending: {', '.join(grant['actions'])} on {grant['resource']} "
        f"for {duration} once approved (kmsgate exception approve {grant['id']})",
        highlight=False,
        soft_wrap=True,  # one line: the command in it stays whole
    )
    print_out(grant["id"])


@exception_app.command("approve")
def approve(grant_id: str, addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """Approve another principal's grant (never your own)."""
    print_json(call(addr, token, Client.approve_exception, grant_id))


@exception_app.command("revoke")
def revoke(grant_id: str, addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """End a grant now (every replica within a second)."""
    print_json(call(addr, token, Client.revoke_exception, grant_id))


@exception_app.command("show")
def show(grant_id: str, addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """One grant as JSON: its state, approvals and times."""
    print_json(call(addr, token, Client.get_exception, grant_id))


@exception_app.command("list")
def list_grants(
    state: Annotated[str | None, typer.Option(help="pending, active, expired or revoked.")] = None,
    mine: Annotated[bool, typer.Option("--mine", help="Only the grants you asked for.")] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Grants, oldest first (a table; tab-separated lines when piped)."""

    def grants(client: Client) -> list[dict[str, Any]]:
        owner = client.whoami()["id"] if mine else None
        return client.list_exceptions(state, owner)

    rows = [
        [
            g["id"],
            g["state"],
            g["principal"],
            ",".join(g["actions"]),
            g["resource"],
            g["ticket"],
            g["expires_at"] or g["pending_until"],
        ]
        for g in call(addr, token, grants)
    ]
    print_table(["id", "state", "principal", "actions", "resource", "ticket", "until"], rows)
