"""Tests of kmsgate.policy: the shipped Rego policies, the engine wrapper and the input document."""

from __future__ import annotations

import gc
import hashlib
import logging
import re
import shutil
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kmsgate.errors import ConfigError, InvalidRequest
from kmsgate.policy import (
    ACTIONS,
    Decision,
    PolicyEngine,
    PolicyTestResult,
    policy_input,
)
from tests.gateway import open_gateway

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "policies"
NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
SESSION_START = "2026-01-02T03:00:00Z"
"""A session that began four minutes before NOW."""

ML_SEC_REASON = "role ml-sec: sign with a model-sign key in prod, session under 1h"


def write(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def doc(
    *,
    roles: Sequence[str] | None = (),
    action: str = "sign",
    name: str | None = "release-signer",
    purpose: str | None = "model-sign",
    env: str = "prod",
    exceptions: Sequence[Mapping[str, object]] = (),
) -> dict[str, object]:
    principal: dict[str, object] = (
        {}
        if roles is None
        else {
            "id": "tok-1",
            "kind": "token",
            "roles": list(roles),
            "claims": {"session_start": SESSION_START},
        }
    )
    return policy_input(
        principal=principal,
        action=action,
        resource={"kind": "key", "name": name, "purpose": purpose, "type": "ecdsa-p256"},
        request={"algorithm": "ecdsa-sha256"},
        env=env,
        now=NOW,
        exceptions=exceptions,
    )


@pytest.fixture(scope="module")
def shipped() -> PolicyEngine:
    return PolicyEngine.load(SHIPPED)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A private copy of the shipped policies that a test may edit."""
    target = tmp_path / "policies"
    shutil.copytree(SHIPPED, target)
    return target


# ---------------------------------------------------------------------------------------------
# Shipped policies


def test_shipped_rego_tests_all_pass(shipped: PolicyEngine) -> None:
    results = shipped.run_tests()
    assert len(results) >= 10
    failed = [r for r in results if not r.passed]
    assert failed == []
    assert all(isinstance(r, PolicyTestResult) and r.error is None for r in results)
    names = {r.name for r in results}
    assert len(names) == len(results)
    assert "data.kmsgate.authz_test.test_admin_may_sign" in names
    assert all(n.startswith("data.kmsgate.authz_test.test_") for n in names)


def test_shipped_files_and_digest(shipped: PolicyEngine) -> None:
    assert shipped.files == [
        "admin.rego",
        "authz.rego",
        "ca_keys.rego",
        "data_plane.rego",
        "exceptions.rego",
        "identity.rego",
        "model_signing.rego",
        "pki.rego",
        "roles.rego",
        "tenants.rego",
        "tokens.rego",
    ]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", shipped.digest)
    assert shipped.loaded_at.tzinfo is not None
    assert shipped.policy_dir == SHIPPED


def test_roles_are_what_the_policy_maps_a_principal_to(
    shipped: PolicyEngine, tmp_path: Path
) -> None:
    assert shipped.roles(doc(roles=["ci", "admin", "ci"])) == ("admin", "ci")
    assert shipped.roles(doc(roles=[])) == ()
    no_roles = tmp_path / "p"
    no_roles.mkdir()
    (no_roles / "a.rego").write_text("package kmsgate.authz\nimport rego.v1\nallow := true\n")
    assert PolicyEngine.load(no_roles).roles(doc(roles=["admin"])) == ()


EX_42 = {"id": "ex-42", "actions": ["sign", "verify"], "resource": "release-*"}

DECISIONS = [
    # (case, input, allow, reasons)
    ("admin signs", doc(roles=["admin"]), True, ("role admin",)),
    (
        "admin any action",
        doc(roles=["admin"], action="key.delete", env="dev"),
        True,
        ("role admin",),
    ),
    ("admin and ml-sec", doc(roles=["ml-sec", "admin"]), True, ("role admin", ML_SEC_REASON)),
    ("ml-sec signs in prod", doc(roles=["ml-sec"]), True, (ML_SEC_REASON,)),
    ("ml-sec in dev", doc(roles=["ml-sec"], env="dev"), False, ()),
    ("ml-sec wrong purpose", doc(roles=["ml-sec"], purpose="envelope-data"), False, ()),
    ("ml-sec no purpose", doc(roles=["ml-sec"], purpose=None), False, ()),
    ("ml-sec verify", doc(roles=["ml-sec"], action="verify"), False, ()),
    ("ml-sec unknown action", doc(roles=["ml-sec"], action="frobnicate"), False, ()),
    ("wrong role", doc(roles=["ml-ops", "reader"]), False, ()),
    ("no roles", doc(roles=[]), False, ()),
    ("missing principal", doc(roles=None), False, ()),
    ("exception", doc(exceptions=[EX_42]), True, ("exception ex-42",)),
    ("exception verify", doc(action="verify", exceptions=[EX_42]), True, ("exception ex-42",)),
    ("exception other action", doc(action="decrypt", exceptions=[EX_42]), False, ()),
    ("exception other resource", doc(name="prod-ca", exceptions=[EX_42]), False, ()),
    ("exception no resource name", doc(name=None, exceptions=[EX_42]), False, ()),
    (
        "two exceptions",
        doc(exceptions=[EX_42, {**EX_42, "id": "ex-7", "resource": "*"}]),
        True,
        ("exception ex-42", "exception ex-7"),
    ),
]


@pytest.mark.parametrize(
    ("input_doc", "allow", "reasons"),
    [case[1:] for case in DECISIONS],
    ids=[case[0] for case in DECISIONS],
)
def test_shipped_decisions(
    shipped: PolicyEngine, input_doc: dict[str, object], allow: bool, reasons: tuple[str, ...]
) -> None:
    assert shipped.decide(input_doc) == Decision(allow=allow, reasons=reasons)


def test_raw_documents_without_fields_are_denied(shipped: PolicyEngine) -> None:
    assert shipped.decide({}) == Decision(False, ())
    assert shipped.decide({"action": "sign", "env": "prod"}) == Decision(False, ())
    assert shipped.decide({"principal": {"roles": "admin"}, "exceptions": None}).allow is False
    assert shipped.decide({"principal": {"roles": ["admin"]}}).allow is True


def test_admin_test_lists_every_gateway_action() -> None:
    text = (SHIPPED / "admin_test.rego").read_text()
    block = text.split("gateway_actions := [", 1)[1].split("]", 1)[0]
    assert set(re.findall(r'"([^"]+)"', block)) == ACTIONS


def test_docs_list_every_action() -> None:
    text = (REPO / "docs" / "policy.md").read_text()
    missing = [a for a in sorted(ACTIONS) if f"`{a}`" not in text]
    assert missing == []


# ---------------------------------------------------------------------------------------------
# Deny by default and non-boolean results


@pytest.mark.parametrize(
    "source",
    [
        "package kmsgate.authz\n",
        "package something.else\n\nimport rego.v1\n\nallow := true\n",
        "package kmsgate.authz\n\nimport rego.v1\n\nother := true\n",
    ],
    ids=["empty-package", "other-package", "no-allow-rule"],
)
def test_policy_defining_nothing_denies(tmp_path: Path, source: str) -> None:
    engine = PolicyEngine.load(write(tmp_path, {"empty.rego": source}))
    assert engine.decide(doc(roles=["admin"])) == Decision(False, ())
    assert engine.run_tests() == []


@pytest.mark.parametrize("value", ['"yes"', "1", "[true]", "{true}", '{"allow": true}', "null"])
def test_non_boolean_allow_denies(tmp_path: Path, value: str) -> None:
    source = f"package kmsgate.authz\n\nimport rego.v1\n\nallow := {value}\n"
    engine = PolicyEngine.load(write(tmp_path, {"p.rego": source}))
    assert engine.decide(doc(roles=["admin"])).allow is False


def test_reasons_are_sorted_strings_only(tmp_path: Path) -> None:
    source = """package kmsgate.authz

import rego.v1

allow := true

reasons contains "zeta"
reasons contains "alpha"
reasons contains 3
"""
    engine = PolicyEngine.load(write(tmp_path, {"p.rego": source}))
    assert engine.decide(doc()) == Decision(True, ("alpha", "zeta"))


def test_reasons_that_are_not_a_set_are_ignored(tmp_path: Path) -> None:
    source = 'package kmsgate.authz\n\nimport rego.v1\n\nallow := true\n\nreasons := "because"\n'
    engine = PolicyEngine.load(write(tmp_path, {"p.rego": source}))
    assert engine.decide(doc()) == Decision(True, ())


# ---------------------------------------------------------------------------------------------
# Loading errors


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("package kmsgate.authz\n\nallow if {\n", "expecting expression"),
        ("package kmsgate.authz\n\nallow { true }\n", "`if` keyword is required"),
        ("package kmsgate.authz\nimport rego.v1\nallow if input.x ==\n", ""),
        ("allow := true\n", ""),
    ],
    ids=["unterminated", "rego-v0", "dangling-operator", "no-package"],
)
def test_invalid_policy_is_refused_naming_the_file(
    tmp_path: Path, source: str, message: str
) -> None:
    write(tmp_path, {"good.rego": "package kmsgate.authz\n", "sub/bad.rego": source})
    with pytest.raises(ConfigError, match=re.escape("sub/bad.rego")) as info:
        PolicyEngine.load(tmp_path)
    assert message in str(info.value)
    assert "Stack backtrace" not in str(info.value)
    assert "\n" not in str(info.value)  # one line, as a CLI error or a problem's detail is


@pytest.mark.parametrize(
    "source",
    [
        # two complete definitions with different values: a conflict error
        "package kmsgate.authz\nimport rego.v1\nallow := true\nallow := false\n",
        # an unknown function is found at evaluation
        "package kmsgate.authz\nimport rego.v1\nallow if no.such_function(1)\n",
        # reasons, the second entry point, also has to evaluate
        "package kmsgate.authz\nimport rego.v1\nreasons contains x if x := 1 / 0\n",
    ],
    ids=["conflict", "unknown-function", "reasons-error"],
)
def test_policy_whose_entry_points_cannot_be_evaluated_is_refused(
    tmp_path: Path, source: str
) -> None:
    write(tmp_path, {"p.rego": source})
    with pytest.raises(ConfigError, match="cannot be evaluated") as info:
        PolicyEngine.load(tmp_path)
    assert "\n" not in str(info.value)


def test_no_policy_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no \.rego policy file"):
        PolicyEngine.load(tmp_path)
    write(tmp_path, {"only_test.rego": "package x_test\n", ".hidden/p.rego": "package a\n"})
    with pytest.raises(ConfigError, match=r"no \.rego policy file"):
        PolicyEngine.load(tmp_path)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PolicyEngine.load(tmp_path / "nope")
    (tmp_path / "authz.rego").write_text("package kmsgate.authz\n")
    with pytest.raises(ConfigError, match=r"authz\.rego is a file, not a directory"):
        PolicyEngine.load(tmp_path / "authz.rego")  # `kmsgate policy test FILE`


def test_non_utf8_policy_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_bytes(b"package kmsgate.authz\n# \xff\n")
    with pytest.raises(ConfigError, match=r"p\.rego.*UTF-8"):
        PolicyEngine.load(tmp_path)


def test_files_are_found_recursively_sorted_without_tests_or_hidden(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "z.rego": "package kmsgate.authz\n",
            "a/b.rego": "package kmsgate.a\n",
            "a/b_test.rego": "package kmsgate.a_test\n",
            "m.rego": "package kmsgate.m\n",
            ".git/x.rego": "not rego at all",
            "..2026_01_01/z.rego": "package kmsgate.authz\nallow := true\n",
            "notes.txt": "hello",
        },
    )
    assert PolicyEngine.load(tmp_path).files == ["a/b.rego", "m.rego", "z.rego"]


# ---------------------------------------------------------------------------------------------
# Digest


def expected_digest(root: Path, files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for rel in files:
        name, content = rel.encode(), (root / rel).read_bytes()
        for part in (name, content):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
    return "sha256:" + h.hexdigest()


def test_digest_follows_the_documented_construction(policy_dir: Path) -> None:
    engine = PolicyEngine.load(policy_dir)
    assert engine.digest == expected_digest(policy_dir, engine.files)


def test_digest_is_stable_and_ignores_tests(policy_dir: Path) -> None:
    first = PolicyEngine.load(policy_dir).digest
    assert PolicyEngine.load(policy_dir).digest == first
    (policy_dir / "admin_test.rego").write_text(
        (policy_dir / "admin_test.rego").read_text() + "\n# more\n"
    )
    assert PolicyEngine.load(policy_dir).digest == first
    engine = PolicyEngine.load(policy_dir)
    assert engine.reload() == first
    assert engine.digest == first


def test_digest_changes_with_content_and_names(policy_dir: Path) -> None:
    first = PolicyEngine.load(policy_dir).digest
    admin = policy_dir / "admin.rego"
    admin.write_text(admin.read_text() + "\n")
    second = PolicyEngine.load(policy_dir).digest
    assert second != first
    admin.rename(policy_dir / "admin2.rego")
    assert PolicyEngine.load(policy_dir).digest not in (first, second)


# ---------------------------------------------------------------------------------------------
# Reload


def test_reload_swaps_policy_and_returns_new_digest(policy_dir: Path) -> None:
    engine = PolicyEngine.load(policy_dir)
    before, loaded_at = engine.digest, engine.loaded_at
    verify = doc(roles=["ml-sec"], action="verify")
    assert engine.decide(verify).allow is False  # builds this thread's engine
    write(
        policy_dir,
        {
            "verify.rego": (
                'package kmsgate.authz\nimport rego.v1\n\nallow if input.action == "verify"\n'
            )
        },
    )
    after = engine.reload()
    assert after == engine.digest != before
    assert engine.loaded_at >= loaded_at
    assert "verify.rego" in engine.files
    assert engine.decide(verify).allow is True


def test_reload_with_broken_file_keeps_the_old_policy(policy_dir: Path) -> None:
    engine = PolicyEngine.load(policy_dir)
    before, files = engine.digest, engine.files
    write(policy_dir, {"broken.rego": "package kmsgate.authz\nallow if {\n"})
    with pytest.raises(ConfigError, match=r"broken\.rego"):
        engine.reload()
    assert engine.digest == before
    assert engine.files == files
    assert engine.decide(doc(roles=["admin"])).allow is True
    assert engine.decide(doc(roles=["viewer"])).allow is False
    # fixing the file makes the next reload succeed
    (policy_dir / "broken.rego").unlink()
    assert engine.reload() == before


def test_reload_reaches_every_thread(policy_dir: Path) -> None:
    engine = PolicyEngine.load(policy_dir)
    go, ready = threading.Event(), threading.Barrier(3)
    seen: list[bool] = []

    def worker() -> None:
        seen.append(engine.decide(doc(roles=["viewer"])).allow)
        ready.wait()
        go.wait()
        seen.append(engine.decide(doc(roles=["viewer"])).allow)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    ready.wait()
    write(policy_dir, {"all.rego": "package kmsgate.authz\nimport rego.v1\n\nallow if true\n"})
    engine.reload()
    go.set()
    for t in threads:
        t.join()
    assert sorted(seen) == [False, False, True, True]


# ---------------------------------------------------------------------------------------------
# Evaluation errors, concurrency


def test_evaluation_error_denies_and_logs_without_input(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On the VM, a failing built-in leaves its body undefined (as in OPA); on the
    interpreter (the Rego tests, a bundle the compiler refuses) it is an error, which denies
    and is logged by type and location, never with input data."""
    source = """package kmsgate.authz

import rego.v1

allow if 10 / input.request.divisor > 1
"""
    engine = PolicyEngine.load(write(tmp_path, {"div.rego": source}))
    ok = policy_input(
        principal={"id": "secret-principal-id"},
        action="sign",
        resource={"name": "secret-key-name"},
        request={"divisor": 2},
        env="prod",
        now=NOW,
    )
    failing = {**ok, "request": {"divisor": 0}}
    assert engine.decide(ok).allow is True
    assert engine.decide(failing) == Decision(False, ())  # the VM: undefined, no rule allows
    engine = PolicyEngine.load(tmp_path, compiled=False)
    assert engine.decide(ok).allow is True
    with caplog.at_level(logging.ERROR, logger="kmsgate.policy"):
        decision = engine.decide(failing)
    assert decision == Decision(False, (), failed=True)
    assert "div.rego:5" in caplog.text
    assert "RuntimeError" in caplog.text
    assert "secret" not in caplog.text


def test_input_that_is_not_json_denies(shipped: PolicyEngine) -> None:
    admin = doc(roles=["admin"])
    assert shipped.decide({**admin, "request": {"blob": b"\x00"}}).allow is False
    assert shipped.decide({**admin, "request": {1: "x"}}).allow is False


def test_failures_leave_no_engine_for_another_thread_to_drop(tmp_path: Path) -> None:
    """regorus engines must be dropped on their own thread; a traceback kept in a reference
    cycle (here: by the test) must not hold one for the garbage collector of another thread."""
    caught: list[str] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: caught.append(str(u.exc_value))
    try:
        for source in [
            "package kmsgate.authz\nallow if {\n",
            "package kmsgate.authz\nallow := 1 / 0\n",
        ]:
            (tmp_path / "p.rego").write_text(source)
            with pytest.raises(ConfigError) as info:
                PolicyEngine.load(tmp_path)
            cycle: list[object] = [info.value]
            cycle.append(cycle)
            del info, cycle
        (tmp_path / "p.rego").write_text("package kmsgate.authz\n")
        (tmp_path / "p_test.rego").write_text("package t\ntest_x if {\n")
        with pytest.raises(ConfigError) as info:
            PolicyEngine.load(tmp_path).run_tests()
        cycle = [info.value]
        cycle.append(cycle)
        del info, cycle
        collector = threading.Thread(target=gc.collect)
        collector.start()
        collector.join()
    finally:
        sys.unraisablehook = old_hook
    assert caught == []


def test_concurrent_decisions_are_consistent(shipped: PolicyEngine) -> None:
    cases = [(case[1], Decision(case[2], case[3])) for case in DECISIONS]
    errors: list[str] = []
    barrier = threading.Barrier(8)

    def worker(offset: int) -> None:
        barrier.wait()
        for i in range(2000):
            input_doc, expected = cases[(i + offset) % len(cases)]
            got = shipped.decide(input_doc)
            if got != expected:
                errors.append(f"{i}: {got} != {expected}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_decisions_stay_consistent_across_reloads(policy_dir: Path) -> None:
    engine = PolicyEngine.load(policy_dir)
    extra = policy_dir / "extra.rego"
    stop = threading.Event()
    errors: list[str] = []

    def worker() -> None:
        while not stop.is_set():
            if engine.decide(doc(roles=["admin"])) != Decision(True, ("role admin",)):
                errors.append("admin")
            if engine.decide(doc(roles=["viewer"], action="verify")).allow not in (True, False):
                errors.append("viewer")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            extra.write_text(f"package kmsgate.authz\nimport rego.v1\n\nx := {i}\n")
            engine.reload()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []


# ---------------------------------------------------------------------------------------------
# run_tests on custom test files


def test_run_tests_reports_failures_and_errors(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "p.rego": 'package kmsgate.authz\nimport rego.v1\n\nallow if input.x == "a"\n',
            "p_test.rego": """package kmsgate.authz_test

import rego.v1

test_passes if data.kmsgate.authz.allow with input as {"x": "a"}

test_fails if data.kmsgate.authz.allow with input as {"x": "b"}

test_not_true := 1

test_errors if {
	x := 0
	1 / x == 1
}

helper if true

test_function(x) if x
""",
            "nested/q_test.rego": 'package other["odd-name"]\nimport rego.v1\n\ntest_q if true\n',
        },
    )
    engine = PolicyEngine.load(tmp_path)
    assert engine.files == ["p.rego"]
    results = {r.name: r for r in engine.run_tests()}
    prefix = "data.kmsgate.authz_test."
    assert set(results) == {
        prefix + "test_passes",
        prefix + "test_fails",
        prefix + "test_not_true",
        prefix + "test_errors",
        'data.other["odd-name"].test_q',
    }
    assert results[prefix + "test_passes"] == PolicyTestResult(prefix + "test_passes", True, None)
    assert results[prefix + "test_fails"].passed is False
    assert results[prefix + "test_fails"].error is None
    assert results[prefix + "test_not_true"].passed is False
    errored = results[prefix + "test_errors"]
    assert errored.passed is False
    assert errored.error is not None and "divide by zero" in errored.error
    assert results['data.other["odd-name"].test_q'].passed is True


def test_run_tests_with_broken_test_file_raises(tmp_path: Path) -> None:
    write(
        tmp_path, {"p.rego": "package kmsgate.authz\n", "p_test.rego": "package t\ntest_x if {\n"}
    )
    engine = PolicyEngine.load(tmp_path)
    with pytest.raises(ConfigError, match=r"p_test\.rego"):
        engine.run_tests()


# ---------------------------------------------------------------------------------------------
# Input document


def test_policy_input_fills_defaults() -> None:
    got = policy_input(
        principal={"id": "tok-1"},
        action="key.read",
        resource={"name": "k1"},
        request=None,
        env="dev",
        now=NOW,
    )
    assert got == {
        "principal": {"id": "tok-1", "kind": None, "roles": [], "claims": {}, "tenant": None},
        "action": "key.read",
        "resource": {
            "kind": None,
            "name": "k1",
            "purpose": None,
            "type": None,
            "backend": None,
            "labels": {},
        },
        "request": {},
        "env": "dev",
        "now": "2026-01-02T03:04:05.000000Z",
        "exceptions": [],
    }


def test_policy_input_converts_values() -> None:
    plus_two = timezone(timedelta(hours=2))
    got = policy_input(
        principal={"id": "x", "kind": "oidc", "roles": ("a", "b"), "claims": {"aud": ["k"]}},
        action="cert.issue",
        resource={"kind": "ca", "name": "dev", "labels": {"env": "dev"}, "state": "enabled"},
        request={"sans": ("a.lab",), "not_after": datetime(2026, 1, 1, 2, tzinfo=plus_two)},
        env="prod",
        now=datetime(2026, 1, 1, 2, 0, 0, tzinfo=plus_two),
        exceptions=[{"id": "ex-1", "actions": {"sign"}, "resource": "*"}],
    )
    assert got["now"] == "2026-01-01T00:00:00.000000Z"
    assert got["principal"] == {
        "id": "x",
        "kind": "oidc",
        "roles": ["a", "b"],
        "claims": {"aud": ["k"]},
        "tenant": None,
    }
    resource = got["resource"]
    assert isinstance(resource, dict)
    assert resource["state"] == "enabled"  # extra fields pass through
    assert got["request"] == {"sans": ["a.lab"], "not_after": "2026-01-01T00:00:00.000000Z"}
    assert got["exceptions"] == [{"id": "ex-1", "actions": ["sign"], "resource": "*"}]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"action": ""},
        {"principal": {"roles": "admin"}},
        {"principal": {"roles": [1]}},
        {"principal": {"claims": []}},
        {"resource": {"labels": ["a"]}},
        {"resource": "k1"},
        {"request": {"data": b"bytes"}},
        {"request": {"n": float("nan")}},
        {"request": {1: "x"}},
        {"request": {"t": datetime(2026, 1, 1)}},
        {"now": datetime(2026, 1, 1)},
        {"exceptions": ["ex-1"]},
        {"exceptions": "ex-1"},
        {"exceptions": [{"actions": "sign", "resource": "k"}]},  # a grant's shape, as
        {"exceptions": [{"actions": ["sign"], "resource": 5}]},  # what-if input can have
        {"exceptions": [{"actions": ["sign"]}]},
        {"exceptions": [{"actions": [1], "resource": "k"}]},
        {"exceptions": [{"id": 7, "actions": ["sign"], "resource": "k"}]},
    ],
)
def test_policy_input_rejects_bad_values(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "principal": {},
        "action": "sign",
        "resource": {},
        "request": None,
        "env": "prod",
        "now": NOW,
    }
    args.update(kwargs)
    with pytest.raises(InvalidRequest):
        policy_input(**args)  # type: ignore[arg-type]


def test_policy_input_rejects_deep_nesting() -> None:
    deep: dict[str, object] = {}
    node = deep
    for _ in range(40):
        child: dict[str, object] = {}
        node["a"] = child
        node = child
    with pytest.raises(InvalidRequest, match="deeply"):
        policy_input(principal={}, action="sign", resource={}, request=deep, env="prod", now=NOW)


def test_the_shipped_examples_pass_their_tests_beside_the_shipped_policies(tmp_path: Path) -> None:
    examples = SHIPPED.parent / "examples" / "policies"
    directory = tmp_path / "policies"
    shutil.copytree(SHIPPED, directory)
    for example in examples.glob("*.rego"):
        shutil.copy(example, directory)
    results = PolicyEngine.load(directory).run_tests()
    failed = [r for r in results if not r.passed]
    assert results and failed == []
    assert any(r.name.endswith("test_a_service_account_gets_its_own_spiffe_id") for r in results)


def test_seed_004s_policy_loads_as_written_and_decides_as_its_text_says(tmp_path: Path) -> None:
    """examples/policies/seed004: the seed's Rego v0 file, unmodified, beside the shipped
    policies and the adapter that asks it about sign requests."""
    seed = SHIPPED.parent / "examples" / "policies" / "seed004"
    directory = tmp_path / "policies"
    shutil.copytree(SHIPPED, directory)
    shutil.copytree(seed, directory / "seed004")
    text = (seed / "z8_kms.v0.rego").read_text()
    assert text.startswith("package z8.kms\ndefault allow = false\nallow {")  # v0, as written
    engine = PolicyEngine.load(directory)
    now_ns = time.time_ns()

    def decide(claims: dict[str, object], *, env: str = "prod", purpose: str = "model-sign",
               action: str = "sign") -> bool:  # fmt: skip
        return engine.decide(
            policy_input(
                principal={"id": "ci:x", "kind": "oidc", "roles": [], "claims": claims},
                action=action,
                resource={"kind": "key", "name": "m", "purpose": purpose},
                request=None,
                env=env,
                now=datetime.now(UTC),
            )
        ).allow

    fresh = {"role": "ml-sec", "session_start": now_ns - 5 * 60 * 10**9}
    assert decide(fresh)
    assert not decide({**fresh, "session_start": now_ns - 2 * 3600 * 10**9})
    assert not decide({**fresh, "role": "dev"})
    assert not decide(fresh, env="dev")
    assert not decide(fresh, purpose="envelope-data")
    assert not decide(fresh, action="key.delete")
    results = engine.run_tests()
    assert [r for r in results if not r.passed] == []
    assert any(r.name.endswith("test_a_session_older_than_an_hour_is_denied") for r in results)
    # the same text without the .v0 name is not Rego v1: a clear error naming the file
    (directory / "seed004" / "z8_kms.v0.rego").rename(directory / "seed004" / "z8_kms.rego")
    with pytest.raises(ConfigError, match=r"z8_kms\.rego"):
        PolicyEngine.load(directory)


def test_a_deny_rule_overrides_every_allow(shipped: PolicyEngine) -> None:
    def admin_of(tenant: str | None, key_tenant: str) -> dict[str, object]:
        return policy_input(
            principal={"id": "oidc:a", "roles": ["admin"], "tenant": tenant},
            action="sign",
            resource={"kind": "key", "name": "k", "labels": {"tenant": key_tenant}},
            request=None,
            env="prod",
            now=NOW,
        )

    vetoed = shipped.decide(admin_of("acme", "globex"))
    assert not vetoed.allow
    assert vetoed.reasons == ("denied: tenant isolation: the resource belongs to another tenant",)
    assert shipped.decide(admin_of("acme", "acme")).reasons == ("role admin",)
    assert shipped.decide(admin_of(None, "globex")).allow


def shipped_and(tmp_path: Path, name: str, rules: str) -> Path:
    """A copy of the shipped policies under `tmp_path`, with the file `name` holding
    `rules` (in package kmsgate.authz, Rego v1) besides."""
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED, policies)
    (policies / name).write_text("package kmsgate.authz\nimport rego.v1\n" + rules)
    return policies


def test_a_token_maker_other_than_admin_hands_out_only_its_own_roles(tmp_path: Path) -> None:
    """tokens.rego: a team lets role `token-admin` create tokens; it still cannot mint a
    token with a role it lacks (admin, say), through the real gateway."""
    policies = shipped_and(
        tmp_path,
        "token_admin.rego",
        'allow if { input.action == "token.create"; "token-admin" in roles }\n',
    )
    with open_gateway(tmp_path, policy_dir=policies) as (api, admin):
        maker = api.call("POST", "/v1/sys/tokens", admin, json={"roles": ["token-admin", "ci"]})
        assert maker.status_code == 201, maker.text
        made = maker.json()["token"]
        for roles, status in ((["ci"], 201), (["admin"], 403), (["ci", "ml-sec"], 403)):
            reply = api.call("POST", "/v1/sys/tokens", made, json={"roles": roles})
            assert reply.status_code == status, (roles, reply.text)
        assert api.call("POST", "/v1/sys/tokens", admin, json={"roles": ["ml-sec"]}).is_success


def test_a_token_outlives_neither_the_token_that_made_it_nor_hands_out_approver(
    tmp_path: Path,
) -> None:
    """A team's `token-admin` token with a 1h ttl makes tokens for at most what it has
    left (400 beyond, and for none: before, a 60 s token made one that never expired);
    the policy sees the ttl asked (`request.ttl`) and the trail keeps it. A `token-admin`
    that holds `approver` makes no token: neither a second approver token nor one that
    asks for the JIT grants it then approves (four-eyes counts principals)."""
    policies = shipped_and(
        tmp_path,
        "token_admin.rego",
        'allow if { input.action == "token.create"; "token-admin" in roles }\n'
        'deny contains "a week at most" if {\n'
        '  input.action == "token.create"; input.request.ttl > 604800 }\n',
    )
    with open_gateway(tmp_path, policy_dir=policies) as (api, admin):
        body = {"roles": ["token-admin", "ci"], "ttl": "1h"}
        made = api.call("POST", "/v1/sys/tokens", admin, json=body).json()["token"]
        for ttl, status in ((None, 400), ("2h", 400), ("30m", 201)):
            asked = {"roles": ["ci"], **({"ttl": ttl} if ttl else {})}
            reply = api.call("POST", "/v1/sys/tokens", made, json=asked)
            assert reply.status_code == status, (ttl, reply.text)
        assert (
            "cannot outlive the token that creates it"
            in api.call("POST", "/v1/sys/tokens", made, json={"roles": ["ci"]}).text
        )
        week = api.call("POST", "/v1/sys/tokens", admin, json={"roles": ["ci"], "ttl": "8d"})
        assert week.status_code == 403, week.text  # a veto reads as any refusal
        seven = api.call("POST", "/v1/sys/tokens", admin, json={"roles": ["ci"], "ttl": "7d"})
        assert seven.status_code == 201, seven.text
        body = {"roles": ["token-admin", "approver"]}
        approver = api.call("POST", "/v1/sys/tokens", admin, json=body).json()["token"]
        for roles in (["approver"], ["token-admin"]):
            asked = {"roles": roles, "ttl": "5m"}
            refused = api.call("POST", "/v1/sys/tokens", approver, json=asked)
            assert refused.status_code == 403, refused.text
        records = api.service.audit.search(action="token.create").records
        assert records[-2]["reasons"] == [
            "denied: an approver makes no tokens (it would approve what they ask)",
            "denied: only an admin gives the approver role",
        ]
        made_ok = [r["detail"] for r in records if r["outcome"] == "ok" and r["detail"]["ttl"]]
        assert [d["ttl"] for d in made_ok] == [3600, 1800, 604800]
        assert all(d["expires_at"] for d in made_ok)


def test_the_scheduler_purges_tokens_ended_longer_ago_than_their_retention(
    tmp_path: Path,
) -> None:
    """Every token ever made was kept in the store and in every worker's memory, and
    listed, for good (a CI job's token a run: millions). The scheduler now deletes those
    revoked or expired longer than `auth.token_retention` ago, with a `token.purge`
    record naming them; a token ended since, or live, stays; a run with nothing due
    records nothing."""
    import sqlalchemy as sa

    from kmsgate.jobs import Jobs, leader_lock
    from kmsgate.store import tables

    with open_gateway(tmp_path, auth={"token_retention": "1h"}) as (api, admin):
        made = [
            api.call("POST", "/v1/sys/tokens", admin, json={"roles": ["ci"]}).json()
            for _ in range(3)
        ]
        for token in made[:2]:
            api.call("DELETE", f"/v1/sys/tokens/{token['id']}", admin)
        two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
        with api.service.store.transaction() as conn:  # the first one ended two hours ago
            c = tables.tokens.c
            ended = sa.update(tables.tokens).where(c.id == made[0]["id"])
            conn.execute(ended.values(revoked_at=two_hours_ago))
        api.service.tokens.reload()
        jobs = Jobs(api.service, leader_lock(api.service.settings.database_url or ""))
        try:
            assert jobs.run_due() and jobs.run_due()  # the second has nothing to purge
        finally:
            jobs.close()
        listed = api.call("GET", "/v1/sys/tokens", admin).json()["tokens"]
        assert made[0]["id"] not in {t["id"] for t in listed}
        assert {made[1]["id"], made[2]["id"]} <= {t["id"] for t in listed}
        records = api.service.audit.search(action="token.purge").records
        assert [(r["principal"], r["outcome"]) for r in records] == [
            ("system", "started"),
            ("system", "ok"),
        ]
        assert records[1]["detail"]["purged"] == [made[0]["id"]]
        assert records[1]["detail"]["purged_count"] == 1


def test_a_scheduled_job_that_fails_leaves_the_others_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One try block held every job of the minute: a store error in the first (key
    destruction) skipped the grant expiry, the token purge and the feed pruning, each
    minute for as long as it failed."""
    import sqlalchemy as sa

    from kmsgate.errors import Unavailable
    from kmsgate.jobs import Jobs, leader_lock
    from kmsgate.store import tables

    with open_gateway(tmp_path, auth={"token_retention": "1h"}) as (api, admin):
        made = api.call("POST", "/v1/sys/tokens", admin, json={"roles": ["ci"]}).json()
        with api.service.store.transaction() as conn:
            ended = sa.update(tables.tokens).where(tables.tokens.c.id == made["id"])
            conn.execute(ended.values(revoked_at=datetime.now(UTC) - timedelta(hours=2)))
        api.service.tokens.reload()

        def store_down(*_args: object) -> None:
            raise Unavailable("the metadata store cannot be reached")

        monkeypatch.setattr(api.service.keys, "destroy_due", store_down)
        jobs = Jobs(api.service, leader_lock(api.service.settings.database_url or ""))
        try:
            assert jobs.run_due()
        finally:
            jobs.close()
        assert "key destruction failed: unavailable" in caplog.text
        listed = api.call("GET", "/v1/sys/tokens", admin).json()["tokens"]
        assert made["id"] not in {t["id"] for t in listed}


def test_revoking_a_token_revokes_those_it_made_and_policy_sees_who_made_a_token(
    tmp_path: Path,
) -> None:
    """A team's `token-admin` makes tokens and may revoke those it made (a rule on
    `resource.created_by`), not others; it cannot make an orphan. Revoking it (by an
    admin) revokes the token it made, at once, and the reply and the trail name it; an
    admin's orphan stays."""
    policies = shipped_and(
        tmp_path,
        "token_admin.rego",
        'allow if { input.action == "token.create"; "token-admin" in roles }\n'
        'allow if { input.action == "token.revoke"; "token-admin" in roles\n'
        "  input.resource.created_by == input.principal.id }\n",
    )
    with open_gateway(tmp_path, policy_dir=policies) as (api, admin):

        def make(by: str, **body: object) -> httpx.Response:
            return api.call("POST", "/v1/sys/tokens", by, json={"roles": ["ci"], **body})

        maker = make(admin, roles=["token-admin", "ci"]).json()
        made = make(maker["token"]).json()
        spare = make(maker["token"]).json()
        assert (made["created_by"], made["parent"]) == (f"token:{maker['id']}", maker["id"])
        assert make(maker["token"], orphan=True).status_code == 403
        orphan = make(admin, orphan=True).json()
        assert orphan["parent"] is None and orphan["created_by"].startswith("token:")

        own = api.call("DELETE", f"/v1/sys/tokens/{spare['id']}", maker["token"])
        assert (own.status_code, own.json()["also_revoked_count"]) == (200, 0), own.text
        other = api.call("DELETE", f"/v1/sys/tokens/{orphan['id']}", maker["token"])
        assert other.status_code == 403, other.text

        revoked = api.call("DELETE", f"/v1/sys/tokens/{maker['id']}", admin)
        assert revoked.json()["also_revoked"] == [made["id"]], revoked.text
        assert revoked.json()["also_revoked_count"] == 1
        assert api.call("GET", "/v1/sys/whoami", made["token"]).status_code == 401
        assert api.call("GET", "/v1/sys/whoami", orphan["token"]).status_code == 200
        [record] = [
            r
            for r in api.service.audit.search(action="token.revoke").records
            if r["resource"]["name"] == maker["id"] and r["outcome"] == "ok"
        ]
        assert record["detail"]["also_revoked"] == [made["id"]]


def test_a_rule_tells_adopting_a_backend_key_from_importing_a_public_key(tmp_path: Path) -> None:
    """Both are `key.import`; `request.adopt` says which, so a team can refuse adoption (a
    key on its HSM or KMS used from now on) while public keys are imported as before."""
    policies = shipped_and(
        tmp_path,
        "no_adoption.rego",
        'deny contains "keys are not adopted here" if {\n'
        '  input.action == "key.import"; input.request.adopt }\n',
    )
    with open_gateway(tmp_path, policy_dir=policies) as (api, admin):
        pem = (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        public = {"name": "pub", "purpose": "model-sign", "public_key": pem}
        imported = api.call("POST", "/v1/keys", admin, json=public)
        assert imported.status_code == 201, imported.text
        adopted = api.call("POST", "/v1/keys", admin, json={
            "name": "hsm", "purpose": "model-sign", "type": "ecdsa-p256", "uri": "pkcs11:id=%01"
        })  # fmt: skip
        assert (adopted.status_code, adopted.json()["code"]) == (403, "policy_denied"), adopted.text
        records = api.service.audit.search(action="key.import").records
        assert {(r["decision"], r["resource"]["name"]) for r in records} == {
            ("allow", "pub"), ("deny", "hsm")
        }  # fmt: skip
