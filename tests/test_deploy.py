"""deploy/: the Dockerfile, the Compose demo, the Kubernetes manifests and the systemd unit
are checked as far as this machine can: parsed, cross-checked against each other and the
README, the settings they carry loaded by kmsgate itself, the unit verified by
`systemd-analyze verify` and the Compose file by `docker compose config` where they exist."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kmsgate.backends import BACKEND_TYPES
from kmsgate.config import Settings, load_settings
from kmsgate.secret_files import exposure
from kmsgate.store.engine import PING_SECONDS
from tests.components import require_component
from tests.test_cli import clean_env, run_cli, running_gateway

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
NON_ROOT_UID = 10001


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), " ".join(rest.split())))
    return out


def test_the_image_installs_as_the_readme_says_and_runs_unprivileged() -> None:
    steps = _dockerfile()
    runs = " && ".join(args for ins, args in steps if ins == "RUN")
    readme = (REPO / "README.md").read_text()
    run_row = next(line for line in readme.splitlines() if line.startswith("| **run** |"))
    for step in ("python3 -m venv", "pip install"):
        assert step in run_row and step in runs, step
    assert re.search(r"pip install --no-cache-dir '\.\[[\w,-]+\]'", runs)  # this checkout
    copied = {args.split()[0] for ins, args in steps if ins == "COPY"}
    # everything the package build reads: metadata, the package, the shipped policies
    assert {"pyproject.toml", "kmsgate", "policies"} <= copied
    assert all((REPO / path).exists() for path in copied)
    users = [args for ins, args in steps if ins == "USER"]
    assert users == [str(NON_ROOT_UID)]
    (health,) = [args for ins, args in steps if ins == "HEALTHCHECK"]
    assert health.endswith('CMD ["kmsgate", "health"]')
    (entry,) = [json.loads(args) for ins, args in steps if ins == "ENTRYPOINT"]
    assert entry == ["kmsgate", "serve"]
    assert ("VOLUME", '["/var/lib/kmsgate"]') in steps


def _image_extras() -> set[str]:
    """The extras the image's `pip install '.[...]'` installs, `all` and the like expanded
    through pyproject.toml."""
    runs = " && ".join(args for ins, args in _dockerfile() if ins == "RUN")
    (listed,) = re.findall(r"pip install [^&]*'\.\[([\w,-]+)\]'", runs)
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    extras: set[str] = set()
    todo = listed.split(",")
    while todo:
        extra = todo.pop()
        assert extra in optional, f"the Dockerfile installs an unknown extra {extra!r}"
        if extra not in extras:
            extras.add(extra)
            for requirement in optional[extra]:
                if match := re.fullmatch(r"kmsgate\[([\w,-]+)\]", requirement):
                    todo += match.group(1).split(",")
    return extras


def test_the_image_pins_the_versions_it_installs() -> None:
    """Pods of one rollout run the same code: deploy/constraints.txt pins every
    dependency of the image's extras (and, as generated, what they need in turn), each
    within pyproject.toml's range."""
    pins: dict[str, str] = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    direct = [*project["dependencies"], *(r for e in _image_extras() for r in optional[e])]
    for requirement in map(Requirement, direct):
        name = canonicalize_name(requirement.name)
        if name == "kmsgate":  # an extra naming others
            continue
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is outside {requirement}"
        )
    assert len(pins) > len(direct)  # what they need in turn, too


def _shipped_settings(tmp_path: Path) -> dict[str, Settings]:
    """The settings of every config file deploy/ ships, each with the database URL its
    deployment gives it (the compose environment's; a PostgreSQL one on Kubernetes)."""
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    compose_url = compose["x-kmsgate"]["environment"]["KMSGATE_DATABASE_URL"]
    configmap = next(
        d
        for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "kmsgate.yaml").read_text())
        if d["kind"] == "ConfigMap"
    )
    kubernetes = tmp_path / "kubernetes.yaml"
    kubernetes.write_text(configmap["data"]["kmsgate.yaml"])
    return {
        "compose": load_settings(DEPLOY / "compose" / "kmsgate.yaml", database_url=compose_url),
        "kubernetes": load_settings(kubernetes, database_url="postgresql+psycopg://u@pg/kms"),
    }


def test_the_image_installs_the_extras_of_every_shipped_config(tmp_path: Path) -> None:
    """A backend type whose extra is missing from the image stops every replica at start
    (`backend type 'hashivault' needs hvac`); so does a PostgreSQL URL without psycopg."""
    installed = _image_extras()
    for name, settings in _shipped_settings(tmp_path).items():
        for backend, config in settings.backends.items():
            extra = BACKEND_TYPES[config.type][2]
            assert extra is None or extra in installed, (
                f"{name}: backend {backend!r} ({config.type}) needs the extra {extra!r}; "
                f"the Dockerfile installs {sorted(installed)}"
            )
        if settings.resolved_database_url().startswith("postgresql"):
            assert "postgres" in installed, f"{name}: PostgreSQL needs the extra 'postgres'"


def test_the_compose_demo_holds_together() -> None:
    compose_dir = DEPLOY / "compose"
    spec = yaml.safe_load((compose_dir / "compose.yaml").read_text())
    services: dict[str, Any] = spec["services"]
    assert {"postgres", "openbao", "kmsgate-1", "kmsgate-2", "kmsgate-3"} <= set(services)
    replicas = [s for name, s in services.items() if name.startswith("kmsgate-")]
    ports = set()
    for service in replicas:
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        build = service["build"]
        assert (compose_dir / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile"
        )
        for dependency in service["depends_on"]:
            assert dependency in services
        ports |= set(service["ports"])
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            assert source in spec["volumes"] or (compose_dir / source).exists(), volume
    assert len(ports) == 3
    settings = load_settings(compose_dir / "kmsgate.yaml")
    assert set(settings.backends) == {"local", "vault"}
    if shutil.which("docker") and _docker_compose():
        done = subprocess.run(
            ["docker", "compose", "-f", str(compose_dir / "compose.yaml"), "config", "-q"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr


def test_a_compose_replica_starts_on_a_fresh_volume_and_passes_its_health_check(
    tmp_path: Path,
) -> None:
    """The replica's environment names, for the image's `kmsgate health`, the dev root that
    `serve --dev` writes on its first start: `serve` must start without it (it is not a
    client), the health check then trusts it. Run here on loopback, without the demo's
    PostgreSQL and OpenBao (so without its config file)."""
    spec = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    replica = spec["services"]["kmsgate-1"]
    env: dict[str, str] = replica["environment"]
    assert {"--dev", "--tls"} <= set(replica["command"])
    volume = env["KMSGATE_DATA_DIR"]
    data = tmp_path / "volume"  # fresh: no dev root yet
    cacert = env["KMSGATE_CACERT"].replace(volume, str(data))
    assert cacert == str(data / "dev-root.pem")
    with running_gateway(tmp_path, "--tls", https=True, data_dir=data, KMSGATE_CACERT=cacert) as gw:
        port = gw.addr.rsplit(":", 1)[1]
        addr = env["KMSGATE_ADDR"].replace(":8200", f":{port}")
        health = run_cli(("health",), clean_env(KMSGATE_ADDR=addr, KMSGATE_CACERT=cacert))
        assert (health.rc, health.out) == (0, "ok\n"), str(health)


def _docker_compose() -> bool:
    done = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return done.returncode == 0


def test_the_kubernetes_manifests_hold_together(tmp_path: Path) -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "kmsgate.yaml").read_text()))
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {
        "ConfigMap", "StatefulSet", "PodDisruptionBudget", "Service", "NetworkPolicy",
    }  # fmt: skip
    deployment = by_kind["StatefulSet"]["spec"]
    pod = deployment["template"]["spec"]
    (container,) = pod["containers"]
    labels = deployment["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        selector = by_kind[kind]["spec"].get("selector") or by_kind[kind]["spec"]["podSelector"]
        assert selector["matchLabels"].items() <= labels.items()
    assert by_kind["Service"]["spec"]["selector"].items() <= labels.items()
    assert deployment["replicas"] > by_kind["PodDisruptionBudget"]["spec"]["minAvailable"] >= 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == NON_ROOT_UID
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v1/sys/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/sys/ready"
    port_names = {p["name"] for p in container["ports"]}
    assert by_kind["Service"]["spec"]["ports"][0]["targetPort"] in port_names
    mounted = {m["name"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in deployment["volumeClaimTemplates"]}
    assert mounted == {v["name"] for v in pod["volumes"]} | claims
    # the audit chains outlive the pod: the data dir is a claim of its own, not an emptyDir
    data_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/kmsgate")
    assert data_mount["name"] in claims
    assert deployment["serviceName"] == by_kind["Service"]["metadata"]["name"]
    # readiness waits for the store up to PING_SECONDS: a probe must wait longer
    assert container["readinessProbe"]["timeoutSeconds"] > PING_SECONDS
    # the settings the ConfigMap carries load (with the database URL the Secret gives)
    config = tmp_path / "kmsgate.yaml"
    config.write_text(by_kind["ConfigMap"]["data"]["kmsgate.yaml"])
    settings = load_settings(config, database_url="postgresql+psycopg://u@postgres/kms")
    assert settings.tls is not None and settings.tls.serves_https
    assert settings.env == "prod"
    # every file the gateway reads is in a volume that holds it: a Secret's key listed in
    # its items, or (the whole Secret mounted) named where the header describes the Secret
    assert settings.root_key_file is not None
    assert settings.tls.cert_file is not None and settings.tls.key_file is not None
    header = _kubernetes_secrets_header()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {Path(m["mountPath"]): m["name"] for m in container["volumeMounts"]}
    env_files = [e["value"] for e in container["env"] if str(e.get("value", "")).startswith("/")]
    for read in (settings.root_key_file, settings.tls.cert_file, settings.tls.key_file, *env_files):
        read = Path(read)
        directory = next((m for m in mounts if m in read.parents), None)
        assert directory is not None, f"{read}: in no volume"
        secret = volumes[mounts[directory]].get("secret")
        if secret is None:
            continue
        inside = str(read.relative_to(directory))
        if "items" in secret:
            assert inside in {item["path"] for item in secret["items"]}, read
        else:
            assert inside in header[secret["secretName"]], (read, header)
        # the kubelet makes Secret files root:<fsGroup> with the item's mode, else the
        # volume's defaultMode, else 0644: a mode the gateway's secret-file check refuses
        item = next((i for i in secret.get("items", []) if i["path"] == inside), {})
        mode = item.get("mode", secret.get("defaultMode", 0o644))
        fake = os.stat_result((stat.S_IFREG | mode, 0, 0, 1, 0, 10001, 32, 0, 0, 0))
        assert exposure(fake) is None, (read, oct(mode))
    # the probes ask over HTTP: no health-check command, so no client settings
    assert not {"KMSGATE_ADDR", "KMSGATE_CACERT"} & {e["name"] for e in container["env"]}


def _kubernetes_secrets_header() -> dict[str, set[str]]:
    """What the manifest's header says each Secret holds: its name -> the file names
    (words like `tls.crt`) of the first sentence of its bullet."""
    header = []
    for line in (DEPLOY / "kubernetes" / "kmsgate.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    held: dict[str, set[str]] = {}
    for bullet in " ".join(header).split(" - ")[1:]:
        if match := re.match(r"Secret ([\w-]+): (.*)", bullet):
            sentence = re.split(r"\.\s", match.group(2))[0]
            held[match.group(1)] = set(re.findall(r"\b[\w-]+\.(?:key|crt|pem)\b", sentence))
    return held


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "kmsgate.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert shlex.split(exec_start.removeprefix("ExecStart="))[1:] == ["serve", "--workers", "2"]
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                      "CapabilityBoundingSet=", "StateDirectory=kmsgate"):  # fmt: skip
        assert hardening in unit.splitlines(), hardening
    _the_documented_setup_fits_the_unit(unit)
    if shutil.which("systemd-analyze") is None:
        require_component("systemd-analyze", "not on this machine; the unit was parsed only")
    # verify with this environment's kmsgate in place of /opt/kmsgate's
    local = tmp_path / "kmsgate.service"
    script = Path(sys.executable).parent / "kmsgate"
    local.write_text(unit.replace("/opt/kmsgate/bin/kmsgate", str(script)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _the_documented_setup_fits_the_unit(unit: str) -> None:
    """operations.md's setup creates the unit's user, installs where ExecStart points (not
    editable: ProtectHome=yes hides a checkout under /home), gives that user its data dir
    and, through its group only, the root key: a mode kmsgate's own check accepts."""
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0].isalpha()
    )
    user, group = settings["User"], settings["Group"]
    prefix = Path(shlex.split(settings["ExecStart"])[0]).parent.parent
    text = (REPO / "docs" / "operations.md").read_text()
    start = text.index("### Setting up a production gateway")
    setup = text[start : text.index("\n### ", start + 1)]
    commands = [line.removeprefix("$ ") for line in setup.splitlines() if line.startswith("$ ")]
    creates_user = [
        c for c in commands if re.search(rf"useradd --system .*--user-group .* {user}$", c)
    ]
    assert creates_user, f"no documented step creates the unit's User={user}"
    assert f"sudo python3 -m venv {prefix}" in commands, f"no documented venv in {prefix}"
    installs = [c for c in commands if "pip install" in c]
    assert installs and all(c.startswith(f"sudo {prefix}/bin/pip install '.") for c in installs)
    assert any(f"-o {user} -g {group} -m 700 /var/lib/kmsgate" in c for c in commands)
    (key,) = [c for c in commands if c.endswith("/root.key") and " install " in c]
    mode = re.search(r"-o (\S+) -g (\S+) -m (\d+)", key)
    assert mode is not None and mode.group(2) == group, key
    owner_uid = 0 if mode.group(1) == "root" else 1000
    fake = os.stat_result(
        (stat.S_IFREG | int(mode.group(3), 8), 0, 0, 1, owner_uid, 0, 32, 0, 0, 0)
    )
    assert exposure(fake) is None, key
    assert int(mode.group(3), 8) & stat.S_IRGRP, f"{user} cannot read the root key: {key}"
    for command in commands:  # whatever writes the data dir runs as the service user
        if "kmsgate token bootstrap" in command or "kmsgate serve" in command:
            assert command.startswith(f"sudo -u {user} {prefix}/bin/kmsgate "), command
