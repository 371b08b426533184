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
