"""Running and administering a gateway: `serve`, `root-key-init`, `kmsgate token`, and the
local checks `audit verify` and `policy test`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from kmsgate.cli.common import (
    AddrOpt,
    ProgressBar,
    TokenOpt,
    call,
    done_already,
    err,
    fail,
    fail_api,
    json_errors,
    name_values,
    out,
    print_json,
    print_line,
    print_out,
    print_table,
    read_text,
    writing_stdout,
)
from kmsgate.client import ApiError, Client
from kmsgate.errors import ConfigError

token_app = typer.Typer(no_args_is_help=True, help="API tokens.")
audit_app = typer.Typer(no_args_is_help=True, help="The audit log.")
policy_app = typer.Typer(no_args_is_help=True, help="Rego policies.")

# -- serve -----------------------------------------------------------------------------------


def serve(
    dev: Annotated[
        bool, typer.Option("--dev", help="Dev mode: local data dir, root token.")
    ] = False,
    data_dir: Annotated[Path | None, typer.Option(envvar="KMSGATE_DATA_DIR")] = None,
    host: Annotated[str | None, typer.Option(envvar="KMSGATE_HOST")] = None,
    port: Annotated[int | None, typer.Option(envvar="KMSGATE_PORT")] = None,
    config: Annotated[Path | None, typer.Option(envvar="KMSGATE_CONFIG")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    log_level: Annotated[str, typer.Option()] = "warning",
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="HTTPS (settings `tls`; with --dev and none configured: a certificate from "
            "the dev CA, client certificates optional).",
        ),
    ] = False,
) -> None:
    """Run the gateway (127.0.0.1:8200 by default)."""
    from kmsgate.serve import serve as run_server

    try:
        run_server(
            dev=dev,
            data_dir=data_dir,
            host=host,
            port=port,
            config=config,
            workers=workers,
            log_level=log_level,
            tls=tls,
            console=err,
        )
    except ConfigError as exc:
        fail(str(exc))


# -- health ----------------------------------------------------------------------------------


def health(
    ready: Annotated[
        bool, typer.Option("--ready", help="Readiness: the store and every backend answer.")
    ] = False,
    addr: AddrOpt = None,
) -> None:
    """Check that a gateway answers (a container's or a unit's health check): prints `ok`,
    exit 0; otherwise one error line, exit 2."""
    try:
        with Client(addr, anonymous=True) as client:
            (client.ready if ready else client.health)()
    except ApiError as exc:
        fail_api(exc)
    print_out("ok")


# -- login -----------------------------------------------------------------------------------


def login(
    oidc_token: Annotated[
        Path | None,
        typer.Option(
            "--oidc-token",
            help="A file holding an OIDC JWT (a CI job's or a projected service-account token).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The whole answer, claims too.")] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Check a credential against the gateway: print the principal it authenticates as and
    the roles the policy maps it to (nothing is stored)."""
    with json_errors(as_json):  # an error is a JSON report on stdout too
        if oidc_token is not None:
            token = read_text(oidc_token).strip()
            if not token:
                fail(f"{oidc_token} is empty")
            if token.count(".") != 2 or token.startswith("kmg."):
                fail(f"{oidc_token} holds no JWT (an API token goes in --token or KMSGATE_TOKEN)")
        identity = call(addr, token, Client.whoami)
    if as_json:
        print_json(identity)
        return
    claims = identity["claims"]
    rows = [
        ["principal", identity["id"]],
        ["kind", identity["kind"]],
        ["tenant", identity["tenant"] or "-"],
        ["roles", ",".join(identity["roles"]) or "-"],
    ]
    rows += [[name, _claim_text(claims[name])] for name in _SHOWN_CLAIMS if name in claims]
    print_out("".join(f"{name + ':':<14}{value}\n" for name, value in rows), end="")


_SHOWN_CLAIMS = ("iss", "sub", "aud", "exp", "ca", "profile", "serial", "forwarded_by")


def _claim_text(value: object) -> str:
    """A claim as one line: a list (an `aud` of several audiences) comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


"""The claims `login` prints besides the principal (OIDC issuer and subject, certificate
facts); `--json` shows them all."""


# -- tokens ----------------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    role: Annotated[list[str], typer.Option("--role", help="Repeatable.")],
    ttl: Annotated[str | None, typer.Option(help="e.g. 12h, 30d")] = None,
    description: Annotated[str, typer.Option()] = "",
    orphan: Annotated[
        bool,
        typer.Option(
            help="Keep it working when the token that makes it is revoked (e.g. to replace "
            "that token); without it, revoking the maker revokes this one too."
        ),
    ] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create an API token; the token is printed once on stdout. Revoking the token that
    made it revokes it too, unless it is made with --orphan."""
    result = call(addr, token, Client.create_token, role, ttl, description, orphan=orphan)
    err.print(f"token id {result['id']} roles {','.join(result['roles'])}")
    with done_already(
        f"token {result['id']} was created: revoke it (kmsgate token revoke {result['id']})"
    ):
        print_out(result["token"])


@token_app.command("bootstrap")
def token_bootstrap(
    config: Annotated[Path, typer.Option(envvar="KMSGATE_CONFIG", help="Gateway config file.")],
    role: Annotated[list[str], typer.Option("--role", help="Repeatable.")] = ["admin"],  # noqa: B006
    description: Annotated[str, typer.Option()] = "bootstrap token",
) -> None:
    """Create a token directly in the store (first admin of a production gateway)."""
    from kmsgate.bootstrap import bootstrap_token
    from kmsgate.config import load_settings
    from kmsgate.errors import KmsgateError

    try:
        token = bootstrap_token(load_settings(config), role, description)
    except (ConfigError, KmsgateError) as exc:
        fail(str(exc))
    print_out(token)


def root_key_init(
    config: Annotated[Path, typer.Option(envvar="KMSGATE_CONFIG", help="Gateway config file.")],
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from-file",
            help="Wrap the root key in this file (the store is sealed with it) instead of "
            "a new one.",
        ),
    ] = None,
) -> None:
    """Create the softkms root key wrapped by `root_key_wrap`'s key (auto-unseal), or wrap
    an existing store's root key (--from-file)."""
    from kmsgate.bootstrap import init_wrapped_root_key
    from kmsgate.config import load_settings

    try:
        path = init_wrapped_root_key(load_settings(config), from_file)
    except ConfigError as exc:
        fail(str(exc))
    print_line(f"wrapped root key written to {path}")
    if from_file is not None:
        print_line(
            f"remove root_key_file from the config and start the gateway; once it has "
            f"started with {path}, shred {from_file} and its backups"
        )


@token_app.command("list")
def token_list(addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """API tokens (a table; tab-separated lines when piped)."""
    rows = [
        [
            t["id"],
            ",".join(t["roles"]),
            t["description"],
            t["created_at"],
            t["expires_at"] or "-",
            t["revoked_at"] or "-",
            t.get("created_by") or "-",  # unknown: made before makers were recorded
            t.get("parent") or "-",
        ]
        for t in call(addr, token, Client.list_tokens)
    ]
    columns = ["id", "roles", "description", "created", "expires", "revoked", "by", "parent"]
    print_table(columns, rows)


@token_app.command("revoke")
def token_revoke(token_id: str, addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """Revoke a token at once (every replica within a second), and the tokens it made (but
    orphans), theirs and so on: its id, or the whole token (only its id is sent)."""
    from kmsgate.auth import token_id_of  # its package loads the store: a third of a second

    named = token_id_of(token_id)
    if named is None:
        fail("not a token id (16 hex digits) or a token (kmg.<id>.<secret>)")
    print_json(call(addr, token, Client.revoke_token, named))


# -- audit and policy (local) ----------------------------------------------------------------


@audit_app.command("verify")
def audit_verify(
    paths: Annotated[list[Path], typer.Argument(help="Audit logs: one per replica, say.")],
    key: Annotated[
        list[Path],
        typer.Option(
            "--key",
            help="PEM public key of the checkpoint key (signatures checked); repeat it for "
            "each version of a rotated audit key.",
        ),
    ] = [],  # noqa: B006
    gateway: Annotated[
        str | None,
        typer.Option("--gateway", help="Gateway URL to fetch the checkpoint key's public key."),
    ] = None,
    token: TokenOpt = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="The gateway's data dir: compare with its store."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="The gateway's config: compare with its store.")
    ] = None,
) -> None:
    """Check the hash chains of audit logs (each file and the chain files of the other
    writer processes beside it) and their signed checkpoints; names the first broken
    record. With --key or --gateway, checks every checkpoint's signature; with --data-dir,
    --config or --gateway, that no chain lost the checkpoint the store recorded. Exit 1 if a
    log is broken."""
    from kmsgate.audit import AuditFile, log_of_chain
    from kmsgate.cli.auditcheck import checkpoint_lines, log_size, public_keys, stored_anchors

    logs: list[Path] = []
    for given in paths:
        log = log_of_chain(given)
        if log == given:
            logs.append(given)
            continue
        err.print(
            f"{given} is a chain file of {log}: verifying that log, all its chain files",
            highlight=False,
            soft_wrap=True,
        )
        if log not in paths and log not in logs:
            logs.append(log)
    anchors, written_as = stored_anchors(data_dir, config, gateway, token)
    with public_keys(key, gateway, token) as keys:
        for path in logs:
            if path.is_dir():
                fail(f"{path} is a directory: give the audit log in it ({path / 'audit.log'})")
            try:
                with ProgressBar(f"verifying {path.name}", log_size(path)).shown() as bar:
                    report = AuditFile(path).verify(
                        keys=keys,
                        anchors=anchors or (),
                        written_as=written_as(path),
                        progress=bar.advance,
                    )
            except (OSError, ValueError) as exc:
                fail(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
            if not report.ok:
                where = report.chain or path
                fail(
                    f"audit log {where} broken at line {report.first_bad_line}: {report.reason}",
                    code=1,
                )
            prefix = f"{path}: " if len(logs) > 1 else ""
            if report.chains == 1:
                summary = f"{prefix}ok: {report.records} records, chain intact"
            else:
                summary = (
                    f"{prefix}ok: {report.records} records in {report.chains} chains, "
                    "every chain intact"
                )
            lines = (summary, *checkpoint_lines(report, keys is not None, anchors))
            with writing_stdout():
                for line in lines:
                    out.print(line, highlight=False, soft_wrap=True)


class PrincipalKind(StrEnum):
    """`policy explain --kind`: how the principal authenticated."""

    token = "token"  # noqa: S105 (a kind of credential, not a secret)
    oidc = "oidc"
    mtls = "mtls"


@policy_app.command("explain")
def policy_explain(
    action: Annotated[str, typer.Option(help="sign, decrypt, key.rotate, ...")],
    role: Annotated[
        list[str], typer.Option("--as", help="A role of the principal; repeatable.")
    ] = [],  # noqa: B006
    principal: Annotated[str, typer.Option(help="The principal's id.")] = "explain",
    kind: Annotated[PrincipalKind, typer.Option(help="How it authenticates.")] = (
        PrincipalKind.token
    ),
    key: Annotated[str | None, typer.Option(help="The key (its attributes are read).")] = None,
    env: Annotated[str | None, typer.Option(help="Default: the gateway's env.")] = None,
    claim: Annotated[
        list[str],
        typer.Option(help="A claim of the principal, name=value (string); repeatable."),
    ] = [],  # noqa: B006
    with_grants: Annotated[
        bool,
        typer.Option(
            "--with-grants",
            help="Also the JIT grants --principal holds now (needs exception.read).",
        ),
    ] = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """What the loaded policy would decide for a principal with these roles (action
    `policy.evaluate`): allow or deny, the rules' reasons, the roles it maps to, the grants
    it relied on. Nothing is performed. Exit 0 for allow, 1 for deny."""

    claims = name_values(claim, "claim")

    def explain(client: Client) -> dict[str, Any]:
        resource: dict[str, Any] = {"kind": "key", "name": key} if key else {}
        if key:
            try:
                resource = client.get_key(key)
            except ApiError as exc:  # unknown, or not readable by this token
                err.print(f"key {key}: {exc.code}; deciding on its name only", highlight=False)
        who = {"id": principal, "kind": kind.value, "roles": role, "claims": claims}
        grants = _active_grants(client, principal, action) if with_grants else []
        return client.evaluate_policy(
            who, action, _policy_resource(resource), env=env, exceptions=grants
        )

    verdict = call(addr, token, explain)
    lines = [
        f"{'allow' if verdict['allow'] else 'deny'}: {action}" + (f" on key {key}" if key else "")
    ]
    lines += [f"  because: {reason}" for reason in verdict["reasons"]]
    lines += [f"  exception: {grant}" for grant in verdict.get("exceptions_used") or []]
    if not verdict["allow"]:
        lines.append("  no rule allows it")
    lines.append(f"  roles: {', '.join(verdict['roles']) or '-'}")
    print_out("\n".join(lines))
    raise typer.Exit(0 if verdict["allow"] else 1)


def _active_grants(client: Client, principal: str, action: str) -> list[dict[str, Any]]:
    """`principal`'s active grants that list `action`, as `input.exceptions` holds them."""
    return [
        {
            "id": g["id"],
            "actions": g["actions"],
            "resource": g["resource"],
            "ticket": g["ticket"],
            "approved_by": [a["by"] for a in g.get("approvals", [])],
            "expires_at": g["expires_at"],
        }
        for g in client.list_exceptions(state="active", principal=principal)
        if action in g["actions"]
    ]


def _policy_resource(key: dict[str, Any]) -> dict[str, Any]:
    """A key as the policy sees it (`resource`): kind, name, purpose, type, backend, labels."""
    fields = ("name", "purpose", "type", "backend", "labels")
    return {"kind": "key", **{f: key[f] for f in fields if f in key}}


@policy_app.command("reload")
def policy_reload(addr: AddrOpt = None, token: TokenOpt = None) -> None:
    """Have the gateway re-read its policy files (action `policy.reload`) and print the
    digest in force. An invalid bundle, or one that would not let you reload it again, is
    refused and the old policy stays."""
    digest = call(addr, token, Client.reload_policy)
    print_line(digest)


@policy_app.command("test")
def policy_test(
    policy_dir: Annotated[Path, typer.Argument()] = Path("policies"),
) -> None:
    """Run the Rego tests (`test_*` rules in *_test.rego) of a policy directory."""
    from kmsgate.policy import PolicyEngine

    try:
        results = PolicyEngine.load(policy_dir).run_tests()
    except ConfigError as exc:
        fail(str(exc))
    failed = [r for r in results if not r.passed]
    with writing_stdout():
        for r in results:
            mark = "[green]PASS[/green]" if r.passed else "[red]FAIL[/red]"
            said = f"{r.name}" + (f" ({r.error})" if r.error else "")
            out.print(f"{mark} {escape(said)}", markup=True, highlight=False, soft_wrap=True)
        out.print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed or not results:
        raise typer.Exit(1)
