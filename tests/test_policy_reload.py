"""Policy reloads across processes (kmsgate.policy.follower): a reload through the API is
seen by every worker within a refresh; an invalid bundle is refused and the previous digest
keeps serving everywhere. Against a real gateway with two workers."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx

from tests.test_cli import running_gateway

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
VIEWER = """package kmsgate.authz

import rego.v1

allow if {
    input.action == "key.list"
    "viewer" in input.principal.roles
}
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
        time.sleep(1.5)  # a refresh later: nobody took anything from it
        assert digests() == {after}
        assert viewer_lists() == {200}
