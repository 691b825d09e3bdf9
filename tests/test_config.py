"""Settings layering and the production-mode refusals, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmsgate.auth import Credentials
from kmsgate.backends.softkms import create_root_key_file
from kmsgate.bootstrap import (
    bootstrap_token,
    build_service,
    ensure_root_token,
    prepare_dev_data_dir,
)
from kmsgate.config import load_settings, misspelt_variables
from kmsgate.errors import ConfigError
from kmsgate.loopback import https_or_loopback, is_loopback_host


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_layering_file_env_overrides(tmp_path, monkeypatch):
    cfg = write(tmp_path / "c.yaml", "port: 9000\nenv: staging\nlimits: {max_batch: 10}\n")
    assert load_settings(cfg).port == 9000
    monkeypatch.setenv("KMSGATE_PORT", "9100")
    monkeypatch.setenv("KMSGATE_LIMITS__MAX_INPUT_BYTES", "123")
    settings = load_settings(cfg, port=9200)
    assert (settings.port, settings.env) == (9200, "staging")
    assert (settings.limits.max_batch, settings.limits.max_input_bytes) == (10, 123)
    assert load_settings(cfg).port == 9100


def test_dev_mode_defaults_env_to_dev(tmp_path):
    assert load_settings(dev=True, data_dir=tmp_path).env == "dev"
    assert load_settings(dev=True, data_dir=tmp_path, env="prod").env == "prod"
    assert load_settings().env == "prod"


@pytest.mark.parametrize("text", ["port: [", "- a list\n", "port: 0\n", "unknown_setting: 1\n"])
def test_bad_config_files(tmp_path, text):
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path / "c.yaml", text))


def test_production_refuses_dev_state(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(ConfigError, match="root_key_file"):
        build_service(load_settings(data_dir=data))
    inside = data / "root.key"
    create_root_key_file(inside)
    with pytest.raises(ConfigError, match="data dir"):
        build_service(load_settings(data_dir=data, root_key_file=inside))
    (data / "root-token").write_text("x")
    outside = tmp_path / "keys" / "root.key"
    create_root_key_file(outside)
    with pytest.raises(ConfigError, match="root token"):
        build_service(load_settings(data_dir=data, root_key_file=outside))
    (data / "root-token").unlink()
    service = build_service(load_settings(data_dir=data, root_key_file=outside))
    service.close()


def test_root_key_file_checks(tmp_path):
    data = tmp_path / "data"
    settings = load_settings(dev=True, data_dir=data)
    prepare_dev_data_dir(settings)
    key = data / "root.key"
    assert key.stat().st_mode & 0o777 == 0o600
    build_service(settings).close()
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="must not be accessible by"):
        build_service(settings)
    key.unlink()
    create_root_key_file(key)
    with pytest.raises(ConfigError, match="does not match"):
        build_service(settings)


def test_dev_root_token_written_once(tmp_path):
    data = tmp_path / "data"
    settings = load_settings(dev=True, data_dir=data)
    prepare_dev_data_dir(settings)
    service = build_service(settings)
    token = ensure_root_token(service, data)
    assert token is not None
    assert (data / "root-token").read_text().strip() == token
    assert (data / "root-token").stat().st_mode & 0o777 == 0o600
    assert ensure_root_token(service, data) is None
    assert service.tokens.authenticate(Credentials(bearer=token)).roles == ("admin",)
    service.close()


def test_invalid_policy_refuses_start(tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    write(policies / "bad.rego", "package kmsgate.authz\nallow if {\n")
    settings = load_settings(dev=True, data_dir=tmp_path / "d", policy_dir=policies)
    prepare_dev_data_dir(settings)
    with pytest.raises(ConfigError):
        build_service(settings)


def test_bootstrap_token_for_production(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    key = tmp_path / "root.key"
    create_root_key_file(key)
    settings = load_settings(data_dir=data, root_key_file=key)
    token = bootstrap_token(settings, ["admin"], "first admin")
    service = build_service(settings)
    assert service.tokens.authenticate(Credentials(bearer=token)).roles == ("admin",)
    records = service.audit.search(action="token.bootstrap").records
    service.close()
    assert [r["outcome"] for r in records] == ["started", "ok"]  # recorded before it existed
    assert (
        records[-1]["principal"].startswith("local:") and records[-1]["principal_kind"] == "local"
    )
    assert records[-1]["detail"]["roles"] == ["admin"]


def test_the_dev_root_token_is_audited(tmp_path):
    settings = load_settings(dev=True, data_dir=tmp_path / "d")
    prepare_dev_data_dir(settings)
    service = build_service(settings)
    try:
        token = ensure_root_token(service, tmp_path / "d")
        assert token is not None
        assert ensure_root_token(service, tmp_path / "d") is None  # made once
        records = service.audit.search(action="token.bootstrap").records
        made = service.tokens.authenticate(Credentials(bearer=token))
    finally:
        service.close()
    assert [(r["principal"], r["outcome"]) for r in records] == [
        ("system", "started"),
        ("system", "ok"),
    ]
    assert records[-1]["detail"] == {"token_id": made.id.removeprefix("token:"), "roles": ["admin"]}


def test_a_settings_error_is_one_line_and_never_repeats_the_value(tmp_path):
    """What was wrong and where, on one line; not the value given (it may be a secret)."""
    config = tmp_path / "kmsgate.yaml"
    config.write_text("limits:\n  max_body_bytes: s3cr3t-value\nenv: [1, 2]\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    message = str(refused.value)
    assert "\n" not in message and "s3cr3t" not in message and "pydantic" not in message
    assert "limits.max_body_bytes:" in message and "env:" in message


@pytest.mark.parametrize(
    ("url", "trusted"),
    [
        ("https://kms.example", True),
        ("http://127.0.0.1:8200", True),
        ("http://127.9.9.9", True),
        ("http://[::1]:8200/v1", True),
        ("http://LOCALHOST:8200", True),
        ("http://localhost.:8200", True),
        ("http://10.1.2.3:8200", False),
        ("http://[::2]:8200", False),
        ("http://localhost.evil.example", False),
        ("http://0.0.0.0:8200", False),
        ("ftp://127.0.0.1", False),
        ("https://", False),
    ],
)
def test_https_or_loopback(url, trusted):
    """One rule for every outbound URL that carries secrets (Vault, AWS KMS, JWKS)."""
    assert https_or_loopback(url) is trusted


def test_is_loopback_host_resolves_names_only_when_asked():
    assert is_loopback_host("::1") and is_loopback_host("[::1]") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0", resolve=True)
    assert not is_loopback_host("nonexistent.invalid", resolve=True)


def test_a_variable_that_nearly_names_a_setting_is_pointed_out() -> None:
    """A typo in a KMSGATE_* name is ignored by the settings (a gateway on its own SQLite
    instead of the shared PostgreSQL): `serve` warns of it; variables far from any setting
    (a PIN kept in KMSGATE_HSM_PIN) and the right names are left alone."""
    environ = {
        "KMSGATE_DATABSE_URL": "postgresql://db/kms",
        "KMSGATE_POLICYDIR": "/etc/kmsgate/policies",
        "KMSGATE_DATABASE_URL": "postgresql://db/kms",
        "KMSGATE_LIMITS__MAX_BATCH": "5",
        "KMSGATE_HSM_PIN": "1234",
        "KMSGATE_ADDR": "https://gw:8200",
        "DATABSE_URL": "x",
    }
    assert misspelt_variables(environ) == [
        "KMSGATE_DATABSE_URL names no setting and is ignored (did you mean KMSGATE_DATABASE_URL?)",
        "KMSGATE_POLICYDIR names no setting and is ignored (did you mean KMSGATE_POLICY_DIR?)",
    ]


def test_a_nested_variable_naming_no_setting_is_refused(monkeypatch) -> None:
    """The file refuses an unknown key; `KMSGATE_LIMITS__MAX_BACH` was ignored instead (the
    gateway started with the default it meant to change)."""
    monkeypatch.setenv("KMSGATE_LIMITS__MAX_BACH", "3")
    monkeypatch.setenv("KMSGATE_BACKENDS__LOCAL__TYPE", "softkms")  # a backend's own name: free
    with pytest.raises(ConfigError) as caught:
        load_settings(dev=True)
    assert str(caught.value) == (
        "invalid configuration: KMSGATE_LIMITS__MAX_BACH: limits has no setting 'max_bach' "
        "(did you mean max_batch?)"
    )
    monkeypatch.delenv("KMSGATE_LIMITS__MAX_BACH")
    monkeypatch.setenv("KMSGATE_LIMITS__MAX_BATCH", "3")
    assert load_settings(dev=True).limits.max_batch == 3


def test_a_key_given_twice_in_the_file_is_refused_where_it_is(tmp_path) -> None:
    """PyYAML keeps the last of two equal keys silently: a second `port:` won unseen."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("port: 8300\nlimits:\n  max_batch: 5\nport: 8400\n")
    with pytest.raises(ConfigError, match=r"key 'port' given twice at line 4, column 1"):
        load_settings(twice)
    merged = tmp_path / "merged.yaml"  # a merge key's keys may be overridden beside it
    merged.write_text("limits:\n  <<: {max_batch: 5, max_input_bytes: 100}\n  max_batch: 7\n")
    limits = load_settings(merged).limits
    assert (limits.max_batch, limits.max_input_bytes) == (7, 100)


def test_a_softkms_backend_takes_no_settings(tmp_path) -> None:
    with pytest.raises(ConfigError, match="a softkms backend takes no settings but its type"):
        load_settings(dev=True, backends={"local": {"type": "softkms", "foo": 1}})
