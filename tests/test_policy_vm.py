"""Decisions run on regorus's compiled VM, the Rego tests on its interpreter: on the shipped
policies (and the shipped examples) both give the same decision for the same input, well
formed or not; the grant matching that avoids glob.match matches as glob.match does."""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import regorus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsgate.policy import ACTIONS, Decision, PolicyEngine, policy_input

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
FIXTURE = HealthCheck.function_scoped_fixture
"""The fixtures these tests take are module-scoped: the same for every generated example."""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped policies with the shipped OIDC example beside them."""
    directory = tmp_path_factory.mktemp("bundle") / "policies"
    shutil.copytree(REPO / "policies", directory)
    for example in (REPO / "examples" / "policies").glob("*.rego"):
        shutil.copy(example, directory)
    return directory


@pytest.fixture(scope="module")
def engines(bundle: Path) -> tuple[PolicyEngine, PolicyEngine]:
    """(the bundle as it decides, on the VM; the same bundle decided by the interpreter)."""
    compiled = PolicyEngine.load(bundle)
    assert compiled.compiled  # the shipped bundle compiles
    return compiled, PolicyEngine.load(bundle, compiled=False)


NAMES = st.sampled_from(["payroll-export", "payroll.v2", "release-signer", "ca-issuing", "x"])
PATTERNS = NAMES | st.sampled_from(
    ["payroll-*", "pay?oll-*", "*", "release-*", "*.v2", "purpose:model-sign",
     "purpose:envelope-data", "payroll-**"]
)  # fmt: skip
GRANTS = st.fixed_dictionaries(
    {"id": st.sampled_from(["e1", "e2", 3]), "actions": st.lists(st.sampled_from(sorted(ACTIONS)))
     | st.just("sign"), "resource": PATTERNS | st.none()},
    optional={"ticket": st.just("T-1"), "expires_at": st.just("2026-01-02T04:00:00Z")},
) | st.sampled_from(["junk", 5, None])  # fmt: skip
CLAIMS = st.fixed_dictionaries(
    {},
    optional={
        "session_start": st.sampled_from(["2026-01-02T02:50:00Z", "2026-01-01T00:00:00Z", "x", 5]),
        "iat": st.sampled_from([1767322800, "soon"]),
        "serial": st.sampled_from(["0a", "0b"]),
        "repository": st.sampled_from(["acme/models", "evil/fork"]),
        "ref": st.sampled_from(["refs/heads/main", "refs/tags/v1"]),
        "sub": st.sampled_from(["system:serviceaccount:ml:signer", "user"]),
    },
)
PRINCIPALS = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["token:a", "oidc:b", "spiffe://dev.lab/ns/ml/sa/signer"]),
        "kind": st.sampled_from(["token", "oidc", "mtls", "system"]),
        "roles": st.lists(
            st.sampled_from(["admin", "ml-sec", "data-plane", "approver", "dev", "ci", "workload"]),
            max_size=3,
        ),
        "claims": CLAIMS,
        "tenant": st.sampled_from([None, "t1", "t2"]),
    }
)
RESOURCES = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["key", "ca", "exception", "certificate"]),
        "name": NAMES | st.none(),
        "purpose": st.sampled_from(["model-sign", "envelope-data", "ca", "general", None]),
        "labels": st.fixed_dictionaries({}, optional={"tenant": st.sampled_from(["t1", "t2", 7])}),
    },
    optional={"owner": st.sampled_from(["token:a", "oidc:b"])},
)
REQUESTS = st.fixed_dictionaries(
    {},
    optional={
        "serial": st.sampled_from(["0a", "0b"]),
        "profile": st.sampled_from(["server", "client", "workload"]),
        "sans": st.lists(st.sampled_from(["dns:web.lab", "uri:spiffe://dev.lab/ns/ml/sa/signer"])),
        "ca": st.just("dev"),
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[FIXTURE])
@given(
    principal=PRINCIPALS,
    action=st.sampled_from(sorted(ACTIONS)),
    resource=RESOURCES,
    request=REQUESTS,
    env=st.sampled_from(["prod", "dev"]),
    grants=st.lists(GRANTS, max_size=3),
)
def test_the_vm_decides_as_the_interpreter_does(
    engines: tuple[PolicyEngine, PolicyEngine],
    principal: dict[str, Any],
    action: str,
    resource: dict[str, Any],
    request: dict[str, Any],
    env: str,
    grants: list[Any],
) -> None:
    doc = policy_input(
        principal=principal, action=action, resource=resource, request=request, env=env, now=NOW,
        exceptions=grants, trusted=True,
    )  # fmt: skip
    compiled, interpreted = engines
    assert compiled.decide(doc) == interpreted.decide(doc)


def test_the_differential_inputs_reach_allows_denials_and_vetoes(
    engines: tuple[PolicyEngine, PolicyEngine],
) -> None:
    """The comparison above is not only of denials: each kind of outcome, on both engines."""
    compiled, interpreted = engines

    def doc(
        roles: list[str], grants: list[dict[str, object]], labels: dict[str, str]
    ) -> dict[str, object]:
        return policy_input(
            principal={"id": "token:a", "kind": "token", "roles": roles, "tenant": "t1"},
            action="decrypt",
            resource={"kind": "key", "name": "payroll-export", "purpose": "general",
                      "labels": labels},
            request=None, env="prod", now=NOW, exceptions=grants,
        )  # fmt: skip

    grant: dict[str, object] = {"id": "e1", "actions": ["decrypt"], "resource": "payroll-*"}
    cases = {
        Decision(True, ("role admin",)): doc(["admin"], [], {}),
        Decision(True, ("exception e1",)): doc(["dev"], [grant], {}),
        Decision(False, ()): doc(["dev"], [], {}),
        Decision(False, ("denied: tenant isolation: the resource belongs to another tenant",)): (
            doc(["admin"], [], {"tenant": "t2"})
        ),
    }
    for expected, input_doc in cases.items():
        assert compiled.decide(input_doc) == interpreted.decide(input_doc) == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[FIXTURE])
@given(
    pattern=st.text("ab.-*?", min_size=1, max_size=6),
    name=st.text("ab.-", min_size=1, max_size=6),
)
def test_a_grant_matches_a_key_name_as_glob_match_does(
    engines: tuple[PolicyEngine, PolicyEngine], pattern: str, name: str
) -> None:
    """exceptions.rego matches an exact name and `prefix*` without calling glob.match."""
    reference = regorus.Engine()
    reference.add_policy(
        "g.rego", "package g\nimport rego.v1\nm if glob.match(input.p, [], input.n)"
    )
    reference.set_input_json(orjson.dumps({"p": pattern, "n": name}).decode())
    expected = reference.eval_rule("data.g.m") is True
    compiled, _ = engines
    doc = policy_input(
        principal={"id": "token:a", "kind": "token", "roles": []}, action="decrypt",
        resource={"kind": "key", "name": name, "purpose": "general"}, request=None, env="prod",
        now=NOW, exceptions=[{"id": "e1", "actions": ["decrypt"], "resource": pattern}],
    )  # fmt: skip
    assert compiled.decide(doc).allow is expected


def test_a_bundle_the_compiler_refuses_is_decided_by_the_interpreter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Rego v0 file does not compile for the VM: the interpreter decides, and says so."""
    (tmp_path / "authz.v0.rego").write_text(
        'package kmsgate.authz\ndefault allow = false\nallow { input.action == "sign" }\n'
    )
    with caplog.at_level(logging.INFO, logger="kmsgate.policy.engine"):
        engine = PolicyEngine.load(tmp_path)
    assert "decided by the regorus interpreter" in caplog.text and not engine.compiled
    common: dict[str, Any] = {
        "principal": {},
        "resource": {},
        "request": None,
        "env": "",
        "now": NOW,
    }
    assert engine.decide(policy_input(action="sign", **common)).allow
    assert not engine.decide(policy_input(action="verify", **common)).allow
