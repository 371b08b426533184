"""Config: the shipped config.yaml validates, env overrides apply, bad keys/values are named."""

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


def test_isolated_settings_ignore_the_environment(monkeypatch):
    """The demo's settings: a production host's DICOMNODE_* overrides must not send test data to its PACS."""
    from dicomnode.config import isolated_settings

    monkeypatch.setenv(
        "DICOMNODE_DESTINATIONS", '[{"name": "prod", "ae_title": "PACS", "host": "pacs", "port": 104}]'
    )
    monkeypatch.setenv("DICOMNODE_STORAGE__DATABASE_URL", "sqlite:////var/lib/dicomnode/dicomnode.db")
    assert [d.name for d in load_settings(None).destinations] == ["prod"]
    demo = isolated_settings(
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}]
    )
    assert [d.name for d in demo.destinations] == ["pacs"]
    assert demo.storage.database_url == "sqlite:///./var/dicomnode.db"
