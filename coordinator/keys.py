"""The coordinator's model-signing keys (Ed25519; separate from the fleet's TLS PKI).

Layout under the coordinator state folder::

    keys/signing.pem            current private key (0600), created on first start
    keys/trust.json             public keys agents should trust (TrustStore JSON); provision it to boxes
    keys/retired/{key_id}.pem   keys replaced by a rotation
    keys/announcements/*.json   KeyAnnouncements, in order: each new key signed by the one before it

``rotate`` makes a new current key, announced (signed) by the old one; with ``retire_old`` the
announcement also retires the old key, so models it signed stop being trusted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from protocol.signing import KeyAnnouncement, SigningKey, TrustStore

log = logging.getLogger("fedscan.coordinator.keys")


def keys_dir(state_dir: Path) -> Path:
    """Where the coordinator keeps its signing keys."""
    return Path(state_dir) / "keys"


def trust_path(state_dir: Path) -> Path:
    """The trust file agents are given (``keys/trust.json``)."""
    return keys_dir(state_dir) / "trust.json"


def load_trust(state_dir: Path) -> TrustStore:
    """The coordinator's trust store, loaded from its state folder."""
    p = trust_path(state_dir)
    return TrustStore.load(p) if p.exists() else TrustStore()


def ensure_signing_key(state_dir: Path) -> SigningKey:
    """The current signing key, created (and trusted) on first use."""
    path = keys_dir(state_dir) / "signing.pem"
    if path.exists():
        key = SigningKey.load(path)
    else:
        key = SigningKey.generate()
        key.save(path)
        log.info("created model-signing key %s in %s", key.key_id, path)
    trust = load_trust(state_dir)
    if not trust.is_trusted(key.key_id) and key.key_id not in trust.retired:
        trust.trust(key.public_raw)
        trust.save(trust_path(state_dir))
    return key


def rotate(state_dir: Path, *, retire_old: bool = False) -> KeyAnnouncement:
    """Replace the signing key; the announcement of the new key is signed by the old one."""
    old = ensure_signing_key(state_dir)
    new = SigningKey.generate()
    ann = KeyAnnouncement.create(new.public_raw, old, retires=[old.key_id] if retire_old else [])
    trust = load_trust(state_dir)
    trust.accept(ann)  # the same check an agent makes
    d = keys_dir(state_dir)
    (d / "retired").mkdir(parents=True, exist_ok=True)
    old.save(d / "retired" / f"{old.key_id}.pem")
    ann_dir = d / "announcements"
    ann_dir.mkdir(parents=True, exist_ok=True)
    n = len(list(ann_dir.glob("*.json"))) + 1
    (ann_dir / f"{n:04d}-{ann.key_id}.json").write_text(ann.model_dump_json(indent=1))
    new.save(d / "signing.pem")
    trust.save(trust_path(state_dir))
    log.info("rotated model-signing key %s -> %s%s", old.key_id, new.key_id, " (old retired)" if retire_old else "")
    return ann


def announcements(state_dir: Path) -> list[KeyAnnouncement]:
    """The key announcements recorded so far (rotation history)."""
    ann_dir = keys_dir(state_dir) / "announcements"
    if not ann_dir.exists():
        return []
    return [KeyAnnouncement.model_validate_json(p.read_text()) for p in sorted(ann_dir.glob("*.json"))]
