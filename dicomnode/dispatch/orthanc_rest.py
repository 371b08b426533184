"""Orthanc's REST API as an optional capability of a destination (``destinations[].orthanc``).

Used to list the Series Numbers of a study (so a fused series takes a free number) and to delete
a fused series that a re-fusion replaced (``output.replace_previous``). Only series this node made
are deleted: the series' instances must carry Manufacturer ``dicomnode``.
"""

from __future__ import annotations

from typing import Any

from dicomnode.config import OrthancRestConfig
from dicomnode.dispatch.web_client import HttpClient, HttpError

OUR_MANUFACTURER = "dicomnode"


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value[:10_000] if isinstance(v, dict)] if isinstance(value, list) else []


class OrthancRest:
    """One Orthanc's REST API; every method raises HttpError when Orthanc does not answer usably."""

    def __init__(self, cfg: OrthancRestConfig, timeout: float) -> None:
        self.client = HttpClient(cfg.url, cfg, timeout)
        self.url = cfg.url

    def close(self) -> None:
        self.client.close()

    def series_numbers(self, study_uid: str) -> set[int]:
        """Series Numbers of the series Orthanc holds in the study."""
        found = self.client.json_request(
            "POST",
            "/tools/find",
            {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True, "Limit": 10_000},
        )
        numbers = set()
        for series in _dicts(found):
            tags = series.get("MainDicomTags")
            value = tags.get("SeriesNumber") if isinstance(tags, dict) else None
            try:
                numbers.add(int(str(value).strip()))
            except (TypeError, ValueError):
                continue
        return numbers

    def find_series(self, series_uid: str) -> str | None:
        """Orthanc's ID of the series with this Series Instance UID, or None."""
        found = self.client.json_request("POST", "/tools/lookup", series_uid.encode("ascii"))
        for item in _dicts(found):
            if item.get("Type") == "Series" and isinstance(item.get("ID"), str):
                return str(item["ID"])
        return None

    def made_by_us(self, orthanc_id: str) -> bool:
        """True when the series' instances say they were made by dicomnode."""
        series = self.client.json_request("GET", f"/series/{orthanc_id}")
        instances = series.get("Instances") if isinstance(series, dict) else None
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], str):
            return False
        tags = self.client.json_request("GET", f"/instances/{instances[0]}/simplified-tags")
        return isinstance(tags, dict) and str(tags.get("Manufacturer", "")).strip() == OUR_MANUFACTURER

    def delete_series(self, orthanc_id: str) -> None:
        self.client.json_request("DELETE", f"/series/{orthanc_id}")


__all__ = ["HttpError", "OrthancRest"]
