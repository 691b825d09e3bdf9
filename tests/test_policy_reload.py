"""Policy reloads across processes (kmsgate.policy.follower): a reload through the API is
seen by every worker within a refresh; an invalid bundle, or one that would not let its
reloader reload it again, is refused and the previous digest keeps serving everywhere.
Against a real gateway with two workers."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import httpx
import pytest

from kmsgate.policy import PolicyEngine
from kmsgate.policy.follower import PolicyFollower
from kmsgate.store import Store
from tests.test_cli import assert_one_line_error, run_cli, running_gateway

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
VIEWER = """package kmsgate.authz

import rego.v1

allow if {
    input.action == "key.list"
    "viewer" in input.principal.roles
}
"""

CONFLICT = 'package kmsgate.authz\n\nallow := "yes"\n'
"""A complete `allow` beside the shipped `allow if` rules: an error wherever one of them holds."""
FROZEN = """package kmsgate.authz

import rego.v1

deny contains "the policy is frozen" if input.action == "policy.reload"
"""


def test_a_reload_reaches_every_worker_and_a_bad_bundle_changes_nothing(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED, policies)
    with running_gateway(tmp_path, "--workers", "2", KMSGATE_POLICY_DIR=str(policies)) as gw:
        root = {"authorization": f"Bearer {gw.root_token}"}
        made = httpx.post(f"{gw.addr}/v1/sys/tokens", json={"roles": ["viewer"]}, headers=root)
        viewer = {"authorization": f"Bearer {made.json()['token']}"}

        def digests(count: int = 12) -> set[str]:
            """The digests the workers answer with (new connections spread over both)."""
            return {
                httpx.get(f"{gw.addr}/v1/sys/policy", headers=root).json()["digest"]
                for _ in range(count)
            }

        def viewer_lists() -> set[int]:
            return {httpx.get(f"{gw.addr}/v1/keys", headers=viewer).status_code for _ in range(8)}

        (before,) = digests()
        assert viewer_lists() == {403}

        (policies / "viewer.rego").write_text(VIEWER)
        reloaded = httpx.post(f"{gw.addr}/v1/sys/policy/reload", headers=root)
        assert reloaded.status_code == 200, reloaded.text
        after = reloaded.json()["digest"]
        assert after != before
        deadline = time.monotonic() + 3
        while digests() != {after} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert digests() == {after}
        assert viewer_lists() == {200}

        (policies / "broken.rego").write_text("package kmsgate.authz\nallow if {\n")
        refused = httpx.post(f"{gw.addr}/v1/sys/policy/reload", headers=root)
        assert refused.status_code == 400 and "broken.rego" in refused.json()["detail"]
        (policies / "broken.rego").unlink()

        # Bundles that load, yet would leave the policy impossible to reload: rules that
        # conflict once a rule allows (the default probe input allows nothing), and a veto.
        for name, text, reason in (
            ("conflict.rego", CONFLICT, "fails to decide policy.reload: conflict.rego:3:1: rule"),
            ("frozen.rego", FROZEN, "would deny policy.reload"),
        ):
            (policies / name).write_text(text)
            refused = httpx.post(f"{gw.addr}/v1/sys/policy/reload", headers=root)
            assert refused.status_code == 400, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert reason in refused.json()["detail"]
            assert_one_line_error(run_cli(("policy", "reload"), gw.env()), reason)
            (policies / name).unlink()

        time.sleep(1.5)  # a refresh later: nobody took anything from them
        assert digests() == {after}
        assert viewer_lists() == {200}
        again = run_cli(("policy", "reload"), gw.env())
        assert again.rc == 0 and again.out.strip() == after, str(again)
        # a refused bundle's engine was dropped on the thread that made it, not another
        assert "unsendable" not in gw.output.read_text()


def test_a_process_with_other_policy_files_than_the_announced_ones_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas on one store, the second started with one more rule: it warns at start
    (another process announced another digest), and again after following a reload whose
    files it does not have; a replica with the same files says nothing."""
    store = Store(f"sqlite:///{tmp_path / 'kmsgate.db'}")
    store.migrate()
    same, other = tmp_path / "same", tmp_path / "other"
    for directory in (same, other):
        shutil.copytree(SHIPPED, directory)
    (other / "extra.rego").write_text(FROZEN)
    try:
        first = PolicyFollower(store, PolicyEngine.load(same))
        first.announce(first._policy.digest)
        with caplog.at_level(logging.WARNING, logger="kmsgate.policy"):
            PolicyFollower(store, PolicyEngine.load(same))
            assert not caplog.records
            odd = PolicyFollower(store, PolicyEngine.load(other))
        (warning,) = caplog.records
        assert "the last reload announced" in warning.getMessage()
        assert odd._policy.digest in warning.getMessage()
        caplog.clear()
        (same / "viewer.rego").write_text(VIEWER)
        first.announce(first._policy.reload())
        with caplog.at_level(logging.WARNING, logger="kmsgate.policy"):
            odd.refresh()
        assert [r.getMessage().count("needs the same policy files") for r in caplog.records] == [1]
    finally:
        store.close()
