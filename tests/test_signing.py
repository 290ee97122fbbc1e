"""Ed25519 manifest signatures, trust store, key rotation and retirement; the installer refuses
what the trust store refuses, and keeps serving what it had."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.keys import announcements, ensure_signing_key, load_trust, rotate
from edge_agent.installer import InstallError, ModelInstaller
from protocol.codec import Tensors
from protocol.errors import ManifestError
from protocol.manifest import Architecture, InputSpec, Manifest, Signature, TensorEntry
from protocol.signing import KeyAnnouncement, SignatureError, SigningKey, TrustStore, key_id_of
from protocol.tensors import tensor_hash

KWARGS = {"in_channels": 1, "num_classes": 2, "width": 4, "norm": "group"}


def _tensors(seed: int = 0) -> Tensors:
    import torch

    from learning.models import build_model
    from learning.state import get_tensors

    torch.manual_seed(seed)
    return get_tensors(build_model("small_cnn", **KWARGS))


def _manifest(version: str = "v1", tensors: Tensors | None = None, targets: list[str] | None = None) -> Manifest:
    tensors = tensors if tensors is not None else _tensors()
    return Manifest(version=version, architecture=Architecture(name="small_cnn", kwargs=KWARGS), classes=["a", "b"],
                    input=InputSpec(channels=1, height=28, width=28),
                    tensors=[TensorEntry(name=k, shape=tuple(v.shape)) for k, v in tensors.items()],
                    tensor_hash=tensor_hash(tensors), targets=targets, created_at=1.0)


def _reason(trust: TrustStore, m: Manifest, profile: str | None = None) -> str:
    with pytest.raises(SignatureError) as info:
        trust.verify_manifest(m, profile=profile)
    assert isinstance(info.value, ManifestError)
    return info.value.reason


def test_key_id_is_sha256_prefix_of_raw_public_key() -> None:
    import hashlib

    k = SigningKey.generate()
    assert len(k.public_raw) == 32
    assert k.key_id == hashlib.sha256(k.public_raw).hexdigest()[:16] == key_id_of(k.public)


def test_sign_verify_and_every_refusal_reason() -> None:
    key, foreign = SigningKey.generate(), SigningKey.generate()
    trust = TrustStore()
    trust.trust(key.public_raw)
    m = key.sign_manifest(_manifest())
    assert m.signature is not None and m.signature.key_id == key.key_id
    assert trust.verify_manifest(m) == key.key_id
    # the signature covers the canonical bytes only: it survives a JSON round trip
    assert trust.verify_manifest(Manifest.model_validate_json(m.to_bytes())) == key.key_id

    assert _reason(trust, _manifest()) == "unsigned"
    assert _reason(trust, foreign.sign_manifest(_manifest())) == "unknown_key"
    # tampered: any field change after signing (metrics, weights hash, targets) breaks it
    assert _reason(trust, m.model_copy(update={"metrics": {"val_accuracy": 0.99}})) == "bad_signature"
    assert _reason(trust, m.model_copy(update={"tensor_hash": "0" * 64})) == "bad_signature"
    # a foreign key's signature relabelled with the trusted key id
    forged = foreign.sign_manifest(_manifest())
    assert forged.signature is not None
    relabelled = forged.model_copy(update={"signature": Signature(key_id=key.key_id, value=forged.signature.value)})
    assert _reason(trust, relabelled) == "bad_signature"
    garbage = m.model_copy(update={"signature": Signature(key_id=key.key_id, value="!!not base64!!")})
    assert _reason(trust, garbage) == "bad_signature"
    # targets are signed too; a box outside them refuses, one inside accepts
    targeted = key.sign_manifest(_manifest(targets=["ct-head-64"]))
    assert _reason(trust, targeted, profile="xray-cxr-28") == "wrong_target"
    assert trust.verify_manifest(targeted, profile="ct-head-64") == key.key_id
    # retired
    trust.retire(key.key_id)
    assert _reason(trust, m) == "retired_key"


def test_rotation_announcement_accepted_only_from_a_trusted_key() -> None:
    old, new, foreign = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    trust = TrustStore()
    trust.trust(old.public_raw)
    before = trust.to_json()

    # signed by a key nobody trusts: refused, trust unchanged
    with pytest.raises(SignatureError) as info:
        trust.accept(KeyAnnouncement.create(new.public_raw, foreign))
    assert info.value.reason == "unknown_key"
    # tampered announcement (key swapped after signing): refused
    ann = KeyAnnouncement.create(new.public_raw, old)
    swapped = ann.model_copy(update={"public_key": base64.b64encode(foreign.public_raw).decode(),
                                     "key_id": foreign.key_id})
    with pytest.raises(SignatureError) as info:
        trust.accept(swapped)
    assert info.value.reason == "bad_signature"
    assert trust.to_json() == before

    # rotation with retirement: the new key is trusted, the old one is not, and cannot come back
    assert trust.accept(KeyAnnouncement.create(new.public_raw, old, retires=[old.key_id])) == new.key_id
    assert trust.verify_manifest(new.sign_manifest(_manifest())) == new.key_id
    assert _reason(trust, old.sign_manifest(_manifest())) == "retired_key"
    with pytest.raises(SignatureError) as info:
        trust.accept(KeyAnnouncement.create(old.public_raw, new))
    assert info.value.reason == "retired_key"
    with pytest.raises(SignatureError) as info:
        trust.trust(old.public_raw)
    assert info.value.reason == "retired_key"
    # the retired key can no longer announce anything either
    with pytest.raises(SignatureError) as info:
        trust.accept(KeyAnnouncement.create(foreign.public_raw, old))
    assert info.value.reason == "retired_key"


def test_trust_store_json_round_trip_and_bad_files(tmp_path: Path) -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    trust = TrustStore()
    trust.trust(a.public_raw)
    trust.trust(b.public_raw)
    trust.retire(b.key_id)
    trust.save(tmp_path / "trust.json")
    again = TrustStore.load(tmp_path / "trust.json")
    assert again.keys == {a.key_id: a.public_raw} and again.retired == {b.key_id}
    doc = json.loads((tmp_path / "trust.json").read_text())
    doc["keys"][b.key_id[::-1]] = doc["keys"][a.key_id]  # id does not match its key
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="does not match"):
        TrustStore.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(SignatureError):
        TrustStore.load(tmp_path / "junk.json")


def test_coordinator_key_files_and_rotation(tmp_path: Path) -> None:
    k1 = ensure_signing_key(tmp_path)
    assert ensure_signing_key(tmp_path).key_id == k1.key_id  # created once
    assert (tmp_path / "keys" / "signing.pem").stat().st_mode & 0o077 == 0
    assert set(load_trust(tmp_path).keys) == {k1.key_id}
    ann = rotate(tmp_path)
    k2 = ensure_signing_key(tmp_path)
    assert ann.key_id == k2.key_id != k1.key_id and ann.signed_by == k1.key_id
    assert set(load_trust(tmp_path).keys) == {k1.key_id, k2.key_id}
    rotate(tmp_path, retire_old=True)
    k3 = ensure_signing_key(tmp_path)
    trust = load_trust(tmp_path)
    assert set(trust.keys) == {k1.key_id, k3.key_id} and trust.retired == {k2.key_id}
    # an agent that trusted only k1 follows the announcement chain
    agent_trust = TrustStore()
    agent_trust.trust(k1.public_raw)
    for a in announcements(tmp_path):
        agent_trust.accept(a)
    assert agent_trust.is_trusted(k3.key_id) and not agent_trust.is_trusted(k2.key_id)


def test_installer_refuses_untrusted_and_keeps_serving(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key, foreign = SigningKey.generate(), SigningKey.generate()
    trust = TrustStore()
    trust.trust(key.public_raw)
    inst = ModelInstaller(tmp_path / "box", trust=trust, profile="xray-cxr-28")
    t0, t1 = _tensors(0), _tensors(1)
    inst.install(key.sign_manifest(_manifest("v0", t0)), t0)
    inst.activate("v0")
    for bad, reason in [(_manifest("v1", t1), "unsigned"), (foreign.sign_manifest(_manifest("v1", t1)), "unknown_key"),
                        (key.sign_manifest(_manifest("v1", t1)).model_copy(update={"participants": ["x"]}),
                         "bad_signature"),
                        (key.sign_manifest(_manifest("v1", t1, targets=["ct-head-64"])), "wrong_target")]:
        with pytest.raises(SignatureError) as info:
            inst.install(bad, t1)
        assert info.value.reason == reason
        assert not inst.has("v1") and inst.active_version == "v0"
    # a correctly signed manifest with tampered weights: the hash check still refuses
    with pytest.raises(InstallError) as info2:
        inst.install(key.sign_manifest(_manifest("v1", t1)), {k: v + np.float32(1e-3) for k, v in t1.items()})
    assert info2.value.reason == "hash_mismatch"
    # after retiring the key, even the already-signed good model is refused
    good = key.sign_manifest(_manifest("v1", t1))
    trust.retire(key.key_id)
    with pytest.raises(SignatureError) as info:
        inst.install(good, t1)
    assert info.value.reason == "retired_key"
    assert inst.active_version == "v0"
    # without a trust store every model is refused (fail closed) ...
    closed = ModelInstaller(tmp_path / "closed")
    with pytest.raises(SignatureError) as info:
        closed.install(key.sign_manifest(_manifest("v1", t1)), t1)
    assert info.value.reason == "no_trust_store" and not closed.has("v1")
    # ... unless the development-only insecure mode is asked for: then the log says signatures are not checked
    with caplog.at_level("WARNING"):
        open_box = ModelInstaller(tmp_path / "open", allow_unsigned=True)
    open_box.install(_manifest("v1", t1), t1)
    assert open_box.has("v1")
    assert any("NOT checked" in r.getMessage() for r in caplog.records)
