"""`kmsgate agent`: keep a workload certificate current in a directory (kmsgate.agent)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from kmsgate.cli.common import AddrOpt, fail, fail_api


def agent(
    ca: Annotated[str, typer.Option(help="The issuing CA.")],
    profile: Annotated[str, typer.Option(help="workload, client, server, ...")],
    san: Annotated[list[str], typer.Option("--san", help="A name to certify (repeatable).")],
    directory: Annotated[
        Path, typer.Option("--dir", help="Where key.pem, cert.pem, chain.pem, ca.pem go.")
    ],
    token_file: Annotated[
        Path | None, typer.Option(help="An API token to bootstrap with (re-read each time).")
    ] = None,
    oidc_token_file: Annotated[
        Path | None,
        typer.Option(help="An OIDC token to bootstrap with (re-read each time: it rotates)."),
    ] = None,
    cn: Annotated[
        str | None,
        typer.Option(
            help="Common name, one of the SANs (default: the first DNS name, unless a SAN "
            "is a SPIFFE ID). A client certificate needs one to renew itself over mTLS."
        ),
    ] = None,
    ttl: Annotated[str | None, typer.Option(help="Lifetime, e.g. 1h (the profile's).")] = None,
    renew_at: Annotated[
        float,
        typer.Option(
            help="Renew at this share of the lifetime (default 2/3, at most 0.8).",
            show_default=False,  # not 0.6666666666666666
        ),
    ] = 2 / 3,
    on_renew: Annotated[
        str | None, typer.Option(help="A command to run after each swap (e.g. kill -HUP PID).")
    ] = None,
    once: Annotated[bool, typer.Option(help="Get one certificate and exit (CI jobs).")] = False,
    addr: AddrOpt = None,
) -> None:
    """Keep a certificate for --san in --dir: bootstrap with a token, renew over mTLS."""
    from kmsgate.agent import Agent, AgentOptions, default_common_name
    from kmsgate.client import ApiError

    if token_file and oidc_token_file:
        fail("give --token-file or --oidc-token-file, not both")
    cacert = os.environ.get("KMSGATE_CACERT")
    try:
        worker = Agent(
            AgentOptions(
                addr=addr,
                ca=ca,
                profile=profile,
                sans=tuple(san),
                directory=directory,
                token_file=token_file or oidc_token_file,
                ttl=ttl,
                renew_at=renew_at,
                on_renew=on_renew,
                cacert=Path(cacert) if cacert else None,
                cn=cn or default_common_name(tuple(san)),
            )
        )
    except ValueError as exc:
        fail(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kmsgate agent: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per renewal is enough
    stop = worker.stop
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # SIGHUP is what --on-renew commands send their servers (`pkill -HUP -f NAME` can match
    # the agent's own command line): the agent outlives it. A handler, not SIG_IGN, which
    # the commands it runs would inherit.
    signal.signal(signal.SIGHUP, lambda *_: None)
    try:
        worker.run(once=once)
    except ApiError as exc:
        fail_api(exc, credential_hint="give the agent --token-file or --oidc-token-file")
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{exc.strerror or exc}")
    except ValueError as exc:
        fail(str(exc))
