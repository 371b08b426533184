"""Config: the shipped config.yaml validates, env overrides apply, bad keys/values are named."""

from datetime import timedelta
from pathlib import Path

import pytest

from dicomnode.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid():
    s = load_settings(ROOT / "config.yaml")
    assert s.node.ae_title == "DICOMNODE"
    assert [r.name for r in s.rules] == ["mr-ct", "mr-pet", "mr-spect"]
    assert s.rules[1].moving == "PT"
    assert s.destinations[0].port == 4242
    assert s.fusion.batch_size == 16
    assert s.dispatch.give_up_after == timedelta(days=7) and s.dispatch.max_attempts is None
    assert s.workers.lease_seconds == 30 and s.workers.worker_id is None


def test_env_override_beats_file(monkeypatch):
    monkeypatch.setenv("DICOMNODE_NODE__PORT", "11999")
    monkeypatch.setenv("DICOMNODE_FUSION__DEVICE", "cpu")
    s = load_settings(ROOT / "config.yaml")
    assert s.node.port == 11999
    assert s.node.ae_title == "DICOMNODE"  # the rest of the section is kept
    assert s.fusion.device == "cpu"


@pytest.mark.parametrize(
    "data, key",
    [
        ({"node": {"portt": 1}}, "node.portt"),
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"ae_title": "X" * 17}}, "node.ae_title"),
        ({"fusion": {"device": "tpu"}}, "fusion.device"),
        ({"rules": [{"name": "x", "reference": "MR", "moving": "XX"}]}, "rules.0.moving"),
        ({"bogus": {}}, "bogus"),
        ({"dispatch": {"give_up_after": "soon"}}, "dispatch.give_up_after"),
        ({"dispatch": {"give_up_after": 0}}, "dispatch.give_up_after"),
        ({"workers": {"lease_seconds": 0.1}}, "workers.lease_seconds"),
        ({"workers": {"worker_id": "a\tb"}}, "workers.worker_id"),
    ],
)
def test_bad_key_or_value_is_named(data, key):
    with pytest.raises(ConfigError) as err:
        load_settings(None, **data)
    assert key in str(err.value)


def test_bad_env_value_is_named(monkeypatch):
    monkeypatch.setenv("DICOMNODE_ASSEMBLY__SERIES_STABLE_SECONDS", "-3")
    with pytest.raises(ConfigError, match="assembly.series_stable_seconds"):
        load_settings(ROOT / "config.yaml")


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


@pytest.mark.parametrize(
    "text, seconds",
    [("90", 90), (3600, 3600), ("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600)],
)
def test_give_up_after_takes_units(text, seconds):
    s = load_settings(None, dispatch={"give_up_after": text})
    assert s.dispatch.give_up_after == timedelta(seconds=seconds)


def test_env_sets_worker_id_and_lease(monkeypatch):
    monkeypatch.setenv("DICOMNODE_WORKERS__WORKER_ID", "fuse-1")
    monkeypatch.setenv("DICOMNODE_WORKERS__LEASE_SECONDS", "12")
    s = load_settings(ROOT / "config.yaml")
    assert (s.workers.worker_id, s.workers.lease_seconds) == ("fuse-1", 12)
