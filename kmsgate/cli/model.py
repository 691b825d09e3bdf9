"""`kmsgate model`: sign and verify model directories.

Conventions as in the other command modules: one `error: ...` line on stderr for a failure, a
rich progress bar on stderr only when it is a terminal. `verify` exits 0 when the model
verifies, 2 when it could not run (unreadable input, gateway unreachable or refusing), and one
of the codes of `kmsgate.model_signing.Failure` (10-19) for a model that does not verify.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from kmsgate.cli.common import (
    AddrOpt,
    ForceOpt,
    ProgressBar,
    TokenOpt,
    err,
    fail,
    fail_api,
    json_errors,
    name_values,
    out,
    print_out,
    refuse_existing,
    write_bytes,
    writing_stdout,
)
from kmsgate.client import ApiError, Client
from kmsgate.model_signing import (
    BuildInfo,
    BundleError,
    GatewaySigner,
    GatewayTrust,
    ManifestError,
    ModelVerificationError,
    PublicKeyTrust,
    SigningError,
    TrustBundle,
    VerifyOptions,
    export_trust_bundle,
    sign_model,
    verify_model,
)
from kmsgate.model_signing.sign import DEFAULT_BUNDLE_NAME
from kmsgate.model_signing.trust import Trust

model_app = typer.Typer(
    no_args_is_help=True, help="Sign and verify ML models (model_signing format)."
)

WorkersOpt = Annotated[int | None, typer.Option("--workers", min=1, help="Hashing threads.")]


def _dump_json(value: Any) -> None:
    """Plain `json.dumps` (str() for dates and paths), unlike `common.print_json`."""
    print_out(json.dumps(value, indent=2, default=str))


def _parse_params(entries: list[str], params_file: Path | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_file is not None:
        try:
            loaded = json.loads(params_file.read_bytes())
        except (OSError, ValueError) as exc:
            fail(f"cannot read --params-file {params_file}: {exc}")
        if not isinstance(loaded, dict):
            fail("--params-file must hold a JSON object")
        params.update(loaded)
    params.update(name_values(entries, "--param"))
    return params


@model_app.command("sign")
def sign(
    model: Annotated[Path, typer.Argument(help="Model directory.")],
    key: Annotated[str, typer.Option("--key", help="Gateway signing key (logical name).")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Bundle path [default: DIR/model.sig].")
    ] = None,
    provenance_out: Annotated[
        Path | None, typer.Option("--provenance-out", help="[default: BUNDLE.provenance.json]")
    ] = None,
    no_provenance: Annotated[bool, typer.Option("--no-provenance")] = False,
    no_checksums: Annotated[
        bool, typer.Option("--no-checksums", help="Do not write DIR/checksums.json.")
    ] = False,
    ignore: Annotated[
        list[str] | None, typer.Option("--ignore", help="Glob of paths to leave out (repeat).")
    ] = None,
    no_ignore_git_paths: Annotated[bool, typer.Option("--no-ignore-git-paths")] = False,
    allow_symlinks: Annotated[bool, typer.Option("--allow-symlinks")] = False,
    algorithm: Annotated[str | None, typer.Option("--algorithm")] = None,
    builder_id: Annotated[str | None, typer.Option("--builder-id")] = None,
    git_sha: Annotated[str | None, typer.Option("--git-sha")] = None,
    git_repo: Annotated[str | None, typer.Option("--git-repo")] = None,
    container_digest: Annotated[str | None, typer.Option("--container-digest")] = None,
    dataset_snapshot: Annotated[str | None, typer.Option("--dataset-snapshot")] = None,
    dataset_digest: Annotated[str | None, typer.Option("--dataset-digest")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", help="Training parameter KEY=VALUE (repeat).")
    ] = None,
    params_file: Annotated[Path | None, typer.Option("--params-file")] = None,
    workers: WorkersOpt = None,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Hash DIR locally, sign its model_signing statement and SLSA provenance with KEY."""
    _require_directory(model)
    for path in (output, provenance_out):
        if path is not None and path.is_dir():
            fail(f"{path} is a directory: give the file to write")
    build = BuildInfo(
        builder_id=builder_id,
        git_sha=git_sha,
        git_repo=git_repo,
        container_digest=container_digest,
        dataset_snapshot=dataset_snapshot,
        dataset_digest=dataset_digest,
        parameters=_parse_params(param or [], params_file),
    )
    bar = ProgressBar(f"hashing {model.name}")
    try:
        with Client(addr, token) as client, bar.shown():
            result = sign_model(
                model,
                GatewaySigner(client, key, algorithm),
                bundle_path=output,
                provenance_path=provenance_out,
                provenance=not no_provenance,
                checksums=not no_checksums,
                ignore=ignore or [],
                ignore_git_paths=not no_ignore_git_paths,
                allow_symlinks=allow_symlinks,
                build=build,
                workers=workers,
                progress=bar.advance,
                on_total=bar.set_total,
            )
    except ApiError as exc:
        fail_api(exc)
    except (ManifestError, SigningError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{getattr(exc, 'filename', '') or model}: {exc.strerror or exc}")
    _dump_json(result.to_dict())
    if result.left_out:
        err.print(
            f"note: earlier signatures left out of this one: {', '.join(result.left_out)}",
            highlight=False,
            soft_wrap=True,
        )
    if not result.algorithm.startswith("ecdsa-"):
        err.print(
            "note: the stock model_signing verifier takes ECDSA keys only; this "
            f"{result.algorithm} bundle verifies with `kmsgate model verify`",
            highlight=False,
            soft_wrap=True,
        )


def _require_directory(model: Path) -> None:
    """Exit 2 unless `model` is a directory."""
    if not model.is_dir():
        fail(f"{model}: {'not a directory' if model.exists() else 'no such directory'}")


def _trust(
    public_key: Path | None,
    trust_bundle: Path | None,
    gateway: str | None,
    key: str | None,
    token: str | None,
    client_box: list[Client],
) -> Trust:
    chosen = [x for x in (public_key, trust_bundle, gateway or key) if x]
    if len(chosen) != 1:
        fail("give exactly one of --public-key, --trust-bundle or --gateway/--key")
    try:
        if public_key is not None:
            return PublicKeyTrust.from_pem(public_key.read_bytes())
        if trust_bundle is not None:
            return TrustBundle.load(trust_bundle)
    except OSError as exc:
        fail(f"cannot read {public_key or trust_bundle}: {exc.strerror}")
    except (BundleError, ValueError) as exc:
        fail(str(exc))
    if not key:
        fail("--gateway needs --key NAME")
    client = Client(gateway, token)
    client_box.append(client)
    return GatewayTrust(client, key)


@model_app.command("verify")
def verify(
    model: Annotated[Path, typer.Argument(help="Model directory.")],
    bundle: Annotated[
        Path | None, typer.Option("--bundle", "-b", help="[default: DIR/model.sig]")
    ] = None,
    public_key: Annotated[Path | None, typer.Option("--public-key", help="PEM public key.")] = None,
    gateway: Annotated[
        str | None, typer.Option("--gateway", envvar="KMSGATE_ADDR", help="Gateway URL.")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Gateway key name.")] = None,
    trust_bundle: Annotated[
        Path | None, typer.Option("--trust-bundle", help="Offline kmsgate trust bundle (JSON).")
    ] = None,
    provenance: Annotated[
        Path | None, typer.Option("--provenance", help="[default: BUNDLE.provenance.json]")
    ] = None,
    require_provenance: Annotated[bool, typer.Option("--require-provenance")] = False,
    policy: Annotated[Path | None, typer.Option("--policy", help="Rego acceptance policy.")] = None,
    expect_policy_digest: Annotated[str | None, typer.Option("--expect-policy-digest")] = None,
    algorithm: Annotated[
        str | None, typer.Option("--algorithm", help="For RSA keys (default rsa-pss-sha256).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the JSON report.")] = False,
    workers: WorkersOpt = None,
    token: TokenOpt = None,
) -> None:
    """Check the signature, every file, the key's status at signing time, the provenance and
    optionally an acceptance policy."""
    with json_errors(json_out):  # an error (exit 2) is a JSON report on stdout too
        _require_directory(model)
        clients: list[Client] = []
        bundle_path = bundle or model / DEFAULT_BUNDLE_NAME
        # --gateway falls back to KMSGATE_ADDR: only a gateway source when --key is given too
        trust = _trust(public_key, trust_bundle, gateway if key else None, key, token, clients)
        bar = ProgressBar(f"hashing {model.name}")
        try:
            with bar.shown():
                options = VerifyOptions(
                    provenance_path=provenance,
                    require_provenance=require_provenance,
                    policy=policy,
                    expect_policy_digest=expect_policy_digest,
                    algorithm=algorithm,
                    workers=workers,
                    progress=bar.advance,
                )
                report = verify_model(model, bundle_path, trust, options)
        except ModelVerificationError as exc:
            if json_out:
                _dump_json(exc.report.to_dict())
            with json_errors(False):  # the report above is the JSON
                fail(f"{exc.failure.code}: {exc.detail}", int(exc.failure))
        except ApiError as exc:
            fail_api(exc)
        finally:
            for client in clients:
                client.close()
        if json_out:
            _dump_json(report.to_dict())
        else:
            ref = report.key  # unnamed with --public-key and no provenance: keyids are unsigned
            signer = (
                f"{ref.name} v{ref.version}" if ref and ref.name else f"the key in {public_key}"
            )
            with writing_stdout():
                out.print(
                    f"verified: {report.model_name} {report.model_digest} ({report.files} files), "
                    f"signed by {signer}",
                    highlight=False,
                    soft_wrap=True,
                )


@model_app.command("trust-bundle")
def trust_bundle_cmd(
    keys: Annotated[list[str], typer.Argument(help="Key names.")],
    output: Annotated[Path | None, typer.Option("-o", "--output")] = None,
    force: ForceOpt = False,
    addr: AddrOpt = None,
    token: TokenOpt = None,
) -> None:
    """Export an offline trust bundle (public keys and validity windows; needs key.read)."""
    refuse_existing(force, output)
    try:
        with Client(addr, token) as client:
            doc = export_trust_bundle(client, keys)
    except ApiError as exc:
        fail_api(exc)
    except ValueError as exc:
        fail(str(exc))
    data = (json.dumps(doc, indent=2) + "\n").encode()
    if output is None:
        print_out(data.decode(), end="")
        return
    write_bytes(output, data, force=force)
