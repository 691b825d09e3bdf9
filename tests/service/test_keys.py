"""Key lifecycle use cases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kmsgate.algorithms import KeyType
from kmsgate.backends.base import KeySpec
from kmsgate.catalogue import Key, KeyState
from kmsgate.errors import Conflict, InvalidRequest, KeyDestroyed, KeyDisabled, Unavailable
from kmsgate.service.gate import Outcome
from kmsgate.service.requests import KeyChanges, NewKey, SignInput
from kmsgate.service.results import Signature
from tests.service.conftest import ADMIN, CTX


@pytest.mark.parametrize("public_key", ["", "not a pem", "-----BEGIN PUBLIC KEY-----\n"])
def test_importing_a_malformed_public_key_is_a_clear_error(service, public_key):
    with pytest.raises(InvalidRequest, match="PEM"):
        service.keys.create(ADMIN, CTX, NewKey(name="i", purpose="p", public_key=public_key))
    assert service.catalogue.find("i") is None


def test_a_name_is_taken_once(service, new_key):
    new_key("k")
    with pytest.raises(Conflict):
        new_key("k")


def test_rotation_period_and_labels_are_domain_values(service, new_key):
    key = new_key("k", rotation_period=timedelta(days=90), labels={"team": "ml"})
    assert key.rotation_period == timedelta(days=90)
    changed = service.keys.update(ADMIN, CTX, "k", KeyChanges(rotation_period=timedelta(hours=1)))
    assert changed.rotation_period == timedelta(hours=1)
    assert changed.labels == {"team": "ml"}


def test_a_rotation_period_under_the_minimum_is_refused_and_none_stops_rotation(service, new_key):
    with pytest.raises(InvalidRequest, match="rotation_period must be at least 60 seconds"):
        new_key("fast", rotation_period=timedelta(seconds=59))
    assert service.catalogue.find("fast") is None
    new_key("k", rotation_period=timedelta(minutes=1))
    with pytest.raises(InvalidRequest, match="at least 60 seconds"):
        service.keys.update(ADMIN, CTX, "k", KeyChanges(rotation_period=timedelta(seconds=1)))
    assert service.catalogue.get("k").rotation_period == timedelta(minutes=1)
    stopped = service.keys.update(ADMIN, CTX, "k", KeyChanges(stop_rotation=True))
    assert stopped.rotation_period is None and stopped.next_rotation() is None
    assert service.catalogue.get("k").rotation_period is None


def test_a_disabled_key_refuses_operations_until_enabled(service, new_key):
    new_key("k")
    service.keys.disable(ADMIN, CTX, "k")
    with pytest.raises(KeyDisabled):
        service.crypto.sign(ADMIN, CTX, service.gate.target("k"), [SignInput(b"m")], False)
    service.keys.enable(ADMIN, CTX, "k")
    service.crypto.sign(ADMIN, CTX, service.gate.target("k"), [SignInput(b"m")], False)


def test_destruction_when_due_is_idempotent(service, new_key):
    new_key("k")
    service.keys.rotate(ADMIN, CTX, "k")
    service.keys.schedule_deletion(ADMIN, CTX, "k", 7)
    assert service.keys.destroy_due(CTX) == []
    later = datetime.now(UTC) + timedelta(days=8)
    assert service.keys.destroy_due(CTX, later) == ["k"]
    assert service.keys.destroy_due(CTX, later) == []
    key = service.catalogue.get("k")
    assert key.state is KeyState.DESTROYED
    assert all(v.material is None and v.destroyed_at for v in key.versions.values())


def test_a_rotation_that_loses_a_race_leaves_the_winners_key_signing(service, new_key):
    """Two rotations read version 1 and each make a version 2 under one reference; the
    catalogue takes the winner's. The loser's private key is never what that reference
    signs with, neither between the loser's creation and its undo nor after it:
    signatures verify under the version 2 public key the catalogue holds."""
    new_key("k", key_type="ecdsa-p256")
    stale = service.catalogue.get("k")  # what the losing rotation read
    service.keys.rotate(ADMIN, CTX, "k")
    public = service.catalogue.get("k").versions[2].public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)

    def signs_as_version_2() -> None:
        target = service.gate.target("k")
        (signed,) = service.crypto.sign(ADMIN, CTX, target, [SignInput(b"m")], False)
        assert isinstance(signed, Signature) and signed.key_version == 2
        public.verify(signed.signature, b"m", ec.ECDSA(hashes.SHA256()))

    backend = service.gate.registry.holding(stale.backend)
    backend.create_key(KeySpec("k", 2, KeyType.ECDSA_P256))  # the loser's, before its undo
    signs_as_version_2()
    with pytest.raises(Conflict):
        service.keys._rotate(stale, Outcome())
    signs_as_version_2()


def _stored_versions(service) -> list[tuple[int, bool, bool]]:
    """(version, material is gone, destroyed_at is set) of each stored version of `k`."""
    _, versions = service.store.keys.get("k")
    return [(v["version"], v["material"] is None, v["destroyed_at"] is not None) for v in versions]


def test_a_deletion_cancelled_while_the_job_runs_destroys_nothing_or_everything(
    service, new_key, monkeypatch
):
    """The operator cancels a due deletion as the job starts: the job marks the key
    destroyed first, and only from the deletion it found due, so either the cancel wins
    (409 for the job, nothing destroyed) or the job does (409 for the cancel, every
    version destroyed). Before, the job destroyed the versions after the cancel had said
    the key was back, then failed on the key's state: a disabled key none of whose
    versions works, and a trail saying the destruction failed."""
    new_key("k")
    service.keys.rotate(ADMIN, CTX, "k")
    service.keys.schedule_deletion(ADMIN, CTX, "k", 7)
    later = datetime.now(UTC) + timedelta(days=8)
    every_key = service.catalogue.all

    def cancel_once_read() -> list[Key]:  # the job has read the keys: the cancel lands
        keys = every_key()
        monkeypatch.setattr(service.catalogue, "all", every_key)
        assert service.keys.cancel_deletion(ADMIN, CTX, "k").state is KeyState.DISABLED
        return keys

    monkeypatch.setattr(service.catalogue, "all", cancel_once_read)
    with pytest.raises(Conflict):
        service.keys.destroy_due(CTX, later)
    assert _stored_versions(service) == [(1, False, False), (2, False, False)]
    service.keys.enable(ADMIN, CTX, "k")
    service.crypto.sign(ADMIN, CTX, service.gate.target("k"), [SignInput(b"m")], False)

    service.keys.schedule_deletion(ADMIN, CTX, "k", 7)
    destroy = service.gate.registry.holding("local").destroy
    cancelled: list[Exception] = []

    def destroy_then_cancel(backend_key: object) -> None:
        destroy(backend_key)
        if not cancelled:
            with pytest.raises(Conflict) as refused:
                service.keys.cancel_deletion(ADMIN, CTX, "k")
            cancelled.append(refused.value)

    monkeypatch.setattr(service.gate.registry.holding("local"), "destroy", destroy_then_cancel)
    assert service.keys.destroy_due(CTX, later) == ["k"]
    assert "is destroyed" in str(cancelled[0])
    assert service.catalogue.get("k").state is KeyState.DESTROYED
    assert _stored_versions(service) == [(1, True, True), (2, True, True)]


def test_a_destruction_a_backend_cut_short_is_finished_by_the_next_run(
    service, new_key, monkeypatch
):
    """The backend fails after the first version: the key stays destroyed (nothing brings
    it back) and the next run destroys what is left."""
    new_key("k")
    service.keys.rotate(ADMIN, CTX, "k")
    service.keys.schedule_deletion(ADMIN, CTX, "k", 7)
    backend = service.gate.registry.holding("local")
    destroy, calls = backend.destroy, []

    def fails_the_second_time(backend_key: object) -> None:
        calls.append(backend_key)
        if len(calls) == 2:
            raise Unavailable("the backend went away")
        destroy(backend_key)

    monkeypatch.setattr(backend, "destroy", fails_the_second_time)
    later = datetime.now(UTC) + timedelta(days=8)
    with pytest.raises(Unavailable):
        service.keys.destroy_due(CTX, later)
    assert service.catalogue.get("k").state is KeyState.DESTROYED
    assert _stored_versions(service) == [(1, True, True), (2, False, False)]
    assert service.keys.destroy_due(CTX, later) == ["k"]
    assert _stored_versions(service) == [(1, True, True), (2, True, True)]
    assert service.keys.destroy_due(CTX, later) == []


def test_a_compromise_decided_before_a_destruction_does_not_bring_its_material_back(
    service, new_key, monkeypatch
):
    """A compromise mark read the key, then the destruction ran, then the mark wrote its
    version: the write is refused (409) and the material stays gone. Before, the mark wrote
    the whole version row from its earlier copy: the sealed material back, `destroyed_at`
    cleared. A destroyed key is refused any further change (compromise, labels)."""
    new_key("k", key_type="ed25519")
    service.keys.schedule_deletion(ADMIN, CTX, "k", 7)
    store = service.store.keys
    write = store.update_version

    def destroy_first(name: str, version: int, values: dict, **expected: object) -> None:
        if "compromised_since" in values:
            monkeypatch.setattr(store, "update_version", write)
            assert service.keys.destroy_due(CTX, datetime.now(UTC) + timedelta(days=8)) == ["k"]
        write(name, version, values, **expected)

    monkeypatch.setattr(store, "update_version", destroy_first)
    with pytest.raises(Conflict):
        service.keys.mark_compromised(ADMIN, CTX, "k", 1, datetime(2020, 1, 1, tzinfo=UTC))
    assert _stored_versions(service) == [(1, True, True)]
    with pytest.raises(KeyDestroyed, match="is destroyed"):
        service.keys.mark_compromised(ADMIN, CTX, "k", 1, datetime(2020, 1, 1, tzinfo=UTC))
    with pytest.raises(KeyDestroyed, match="is destroyed"):
        service.keys.update(ADMIN, CTX, "k", KeyChanges(labels={"zombie": "yes"}))
    assert service.catalogue.get("k").labels == {}
