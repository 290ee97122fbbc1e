"""``fedscan fleet|model|rollout|keys`` against a state folder: tables, --json, refusals (exit 1,
store unchanged)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.keys import ensure_signing_key
from coordinator.store import open_store
from fedscan.cli import app
from protocol.manifest import Architecture, InputSpec, Manifest, TensorEntry
from protocol.signing import SigningKey


@pytest.fixture
def state(tmp_path: Path) -> Path:
    key = ensure_signing_key(tmp_path)
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    for i in range(4):
        store.enroll_agent(f"box-{i}", "xray-cxr-28", ["eu"] if i < 3 else ["us"])
        store.set_desired_version(f"box-{i}", "v0")
    for version, signer in (("v0", key), ("v1", key), ("v2", SigningKey.generate())):
        m = signer.sign_manifest(Manifest(version=version, architecture=Architecture(name="small_cnn"),
                                          classes=["a", "b"], input=InputSpec(channels=1, height=28, width=28),
                                          tensors=[TensorEntry(name="w", shape=(2,))], tensor_hash="cd" * 32,
                                          metrics={"val_accuracy": 0.8}))
        store.add_model(version=version, parent=None, round_id=None, manifest=m.model_dump(mode="json"),
                        participants=[], state="active" if version == "v0" else "candidate")
    store.close()
    return tmp_path


def run(state: Path, *args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, [*args, "--state", str(state)])
    return r.exit_code, r.output


def test_fleet_and_models(state: Path) -> None:
    code, out = run(state, "fleet", "ls")
    assert code == 0 and "box-3" in out and "xray-cxr-28" in out
    code, out = run(state, "fleet", "ls", "--json")
    assert [a["agent_id"] for a in json.loads(out)] == ["box-0", "box-1", "box-2", "box-3"]
    code, out = run(state, "model", "ls", "--json")
    models = {m["version"]: m for m in json.loads(out)}
    assert models["v1"]["state"] == "candidate" and models["v1"]["key_id"] == ensure_signing_key(state).key_id
    code, out = run(state, "model", "ls")
    assert code == 0 and "candidate" in out and "active" in out
    assert run(state, "model", "approve", "v1")[0] == 0
    code, out = run(state, "model", "approve", "v1", "--json")
    assert code == 1 and json.loads(out)["reason"] == "bad_transition"
    code, out = run(state, "model", "approve", "nope")
    assert code == 1 and "unknown_version" in out


def test_rollout_commands_and_refusals(state: Path) -> None:
    code, out = run(state, "rollout", "start", "v1", "--cohort-tags", "eu", "--json")
    assert code == 1 and json.loads(out)["reason"] == "not_approved"
    run(state, "model", "approve", "v1")
    run(state, "model", "approve", "v2")
    code, out = run(state, "rollout", "start", "v2", "--cohort-tags", "eu", "--json")
    assert code == 1 and json.loads(out)["reason"] == "untrusted_unknown_key"
    code, out = run(state, "rollout", "start", "v1", "--cohort-tags", "mars", "--json")
    assert code == 1 and json.loads(out)["reason"] == "empty_cohort"
    code, out = run(state, "rollout", "start", "v1", "--cohort-tags", "eu", "--stages", "50,x", "--json")
    assert code == 1 and json.loads(out)["reason"] == "bad_stages"
    code, out = run(state, "rollout", "start", "v1", "--cohort-tags", "eu", "--soak", "-1", "--json")
    assert code == 1 and json.loads(out)["reason"] == "bad_config"
    assert json.loads(run(state, "rollout", "status", "--all", "--json")[1]) == []

    code, out = run(state, "rollout", "start", "v1", "--cohort-tags", "eu", "--stages", "34,100", "--json")
    assert code == 0, out
    r = json.loads(out)
    assert r["stages"] == [2, 3] and sorted(r["agents"]) == ["box-0", "box-1", "box-2"] and r["state"] == "running"
    code, out = run(state, "rollout", "status")
    assert code == 0 and "running" in out and "box-0" in out
    assert json.loads(run(state, "rollout", "pause", "--json")[1])["state"] == "paused"
    code, out = run(state, "rollout", "pause", "--json")
    assert code == 1 and json.loads(out)["reason"] == "bad_state"
    assert json.loads(run(state, "rollout", "resume", "--json")[1])["state"] == "running"
    code, out = run(state, "rollout", "rollback", str(r["rollout_id"]), "--json")
    assert code == 0 and json.loads(out)["state"] == "rolling_back" and json.loads(out)["reason"] == "manual"
    assert {m["version"]: m["state"] for m in json.loads(run(state, "model", "ls", "--json")[1])}["v1"] == "approved"
    code, out = run(state, "rollout", "status", "99", "--json")
    assert code == 1 and json.loads(out)["reason"] == "unknown_rollout"


def test_keys(state: Path) -> None:
    before = json.loads(run(state, "keys", "ls", "--json")[1])
    code, out = run(state, "keys", "rotate", "--retire-old", "--json")
    assert code == 0
    ann = json.loads(out)
    after = json.loads(run(state, "keys", "ls", "--json")[1])
    assert ann["signed_by"] == before["current"] and after["current"] == ann["key_id"]
    assert after["retired"] == [before["current"]] and after["trusted"] == [ann["key_id"]]
    # models signed by the retired key can no longer be rolled out
    run(state, "model", "approve", "v1")
    code, out = run(state, "rollout", "start", "v1", "--json")
    assert code == 1 and json.loads(out)["reason"] == "untrusted_retired_key"


def test_missing_state_is_an_error(tmp_path: Path) -> None:
    code, out = run(tmp_path / "nothing-here", "fleet", "ls")
    assert code == 1 and "no_state" in out
