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


def test_sources_and_fetch_missing_in_the_documented_shape():
    s = load_settings(
        None,
        sources=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242, "retrieve": "c-move"},
            {"name": "archive", "ae_title": "ARCHIVE", "host": "10.0.0.5", "port": 104, "retrieve": "c-get"},
        ],
        rules=[
            {
                "name": "mr-ct",
                "reference": "MR",
                "moving": "CT",
                "fetch_missing": {"enabled": True, "lookback_days": 365, "wait_minutes": 10},
            }
        ],
    )
    assert [(x.name, x.retrieve) for x in s.sources] == [("pacs", "c-move"), ("archive", "c-get")]
    fm = s.rules[0].fetch_missing
    assert (fm.enabled, fm.lookback_days, fm.wait_minutes) == (True, 365, 10)
    assert load_settings(None).rules[0].fetch_missing.enabled is False  # off unless configured


@pytest.mark.parametrize(
    "data, key",
    [
        (
            {"sources": [{"name": "p", "ae_title": "P", "host": "h", "port": 1, "retrieve": "ftp"}]},
            "sources.0.retrieve",
        ),
        ({"sources": [{"name": "p", "ae_title": "P" * 17, "host": "h", "port": 1}]}, "sources.0.ae_title"),
        (
            {"rules": [{"name": "x", "moving": "CT", "fetch_missing": {"enabled": True}}]},
            "rules.0.fetch_missing.enabled: no sources configured",
        ),
        (
            {"rules": [{"name": "x", "moving": "CT", "fetch_missing": {"wait_minutes": -1}}]},
            "rules.0.fetch_missing.wait_minutes",
        ),
        ({"retrieve": {"max_attempts": 0}}, "retrieve.max_attempts"),
    ],
)
def test_bad_source_or_fetch_key_is_named(data, key):
    with pytest.raises(ConfigError) as err:
        load_settings(None, **data)
    assert key in str(err.value)


def test_duplicate_source_names_are_refused():
    src = {"name": "pacs", "ae_title": "P", "host": "h", "port": 1}
    with pytest.raises(ConfigError, match="sources: .*source names must be unique"):
        load_settings(None, sources=[src, dict(src)])
