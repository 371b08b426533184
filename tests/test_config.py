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


def test_output_defaults_and_series_number_bases():
    s = load_settings(
        None, rules=[{"name": "a", "moving": "CT"}, {"name": "b", "moving": "PT", "series_number_base": 700}]
    )
    assert s.output.notice == "RESEARCH USE ONLY"
    assert s.output.notice_in_description and s.output.burn_in_notice
    assert not s.output.replace_previous and s.output.iod == "sc"
    assert s.series_number_base("a") == 9100
    assert s.series_number_base("b") == 700


def test_destination_types():
    s = load_settings(
        None,
        destinations=[
            {
                "name": "pacs",
                "ae_title": "ORTHANC",
                "host": "h",
                "port": 104,
                "orthanc": {"url": "http://h:8042/"},
            },
            {"name": "web", "type": "dicomweb", "url": "https://h/dicom-web/", "bearer_token": "t"},
            {"name": "web2", "type": "dicomweb", "url": "http://h/dw", "username": "u", "password": "p"},
        ],
    )
    pacs, web, web2 = s.destinations
    assert pacs.type == "dimse" and pacs.orthanc.url == "http://h:8042" and pacs.where == "ORTHANC@h:104"
    assert web.url == "https://h/dicom-web" and web.bearer_token == "t"
    assert web2.username == "u" and web2.where == "http://h/dw"


@pytest.mark.parametrize(
    "dest, message",
    [
        ({"name": "x", "type": "dicomweb"}, "needs url"),
        ({"name": "x", "ae_title": "A", "host": "h"}, "needs port"),
        ({"name": "x", "type": "dicomweb", "url": "ftp://h/"}, "http:// or https://"),
        ({"name": "x", "type": "dicomweb", "url": "http://u:p@h/"}, "credentials"),
        (
            {"name": "x", "type": "dicomweb", "url": "http://h/", "bearer_token": "t", "username": "u"},
            "either",
        ),
        ({"name": "x", "type": "dicomweb", "url": "http://h/", "password": "p"}, "needs a username"),
        ({"name": "x", "ae_title": "A", "host": "h", "port": 1, "bearer_token": "t"}, "type: dicomweb"),
        ({"name": "x", "type": "smtp", "url": "http://h/"}, "destinations.0.type"),
    ],
)
def test_bad_destination_is_named(dest, message):
    with pytest.raises(ConfigError) as err:
        load_settings(None, destinations=[dest])
    assert "destinations.0" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize(
    "output, key",
    [
        ({"notice": "A\\B"}, "output.notice"),
        ({"notice": "x" * 65}, "output.notice"),
        ({"replaces_text": "REPLACES {number}"}, "output.replaces_text"),
        ({"iod": "enhanced-mr"}, "output.iod"),
        ({"burn_in": True}, "output.burn_in"),
    ],
)
def test_bad_output_key_is_named(output, key):
    with pytest.raises(ConfigError) as err:
        load_settings(None, output=output)
    assert key in str(err.value)


def test_destination_names_are_unique():
    dest = {"name": "pacs", "ae_title": "A", "host": "h", "port": 104}
    with pytest.raises(ConfigError, match="destination names must be unique"):
        load_settings(None, destinations=[dest, dest])
