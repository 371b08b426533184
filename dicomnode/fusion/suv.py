"""PET body-weight SUV: the factor that turns rescaled PET values (Bq/ml) into SUVbw (g/ml).

SUVbw = activity concentration * weight / (injected dose decayed to the time the image is corrected to).
When the header does not allow it, the caller keeps the values and says why (``SUVResult.reason``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom.dataset import Dataset


@dataclass
class SUVResult:
    """Multiply rescaled values by ``factor`` to get ``units``; factor None = not convertible (see reason)."""

    factor: float | None
    units: str
    reason: str = ""


def _dt(date: object, time: object) -> datetime | None:
    """DICOM DA + TM (fractions allowed) as a datetime, None when missing or malformed."""
    d, t = str(date or "").strip(), str(time or "").strip()
    if len(d) != 8 or len(t) < 2:
        return None
    whole, _, frac = t.partition(".")
    whole = (whole + "0000")[:6]
    try:
        base = datetime.strptime(d + whole, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return base + timedelta(microseconds=int((frac + "000000")[:6])) if frac.isdigit() else base


def _parse_dt(value: object) -> datetime | None:
    s = str(value or "").strip()
    return _dt(s[:8], s[8:]) if len(s) >= 10 else None


def _injection_time(rp: Dataset, ds: Dataset) -> datetime | None:
    if rp.get("RadiopharmaceuticalStartDateTime"):
        return _parse_dt(rp.RadiopharmaceuticalStartDateTime)
    date = ds.get("SeriesDate") or ds.get("AcquisitionDate") or ds.get("StudyDate")
    return _dt(date, rp.get("RadiopharmaceuticalStartTime"))


def _reference_time(ds: Dataset, decay: str) -> datetime | None:
    """The time the values are decay corrected to: series start (START) or this image's acquisition."""
    if decay == "START":
        return _dt(ds.get("SeriesDate"), ds.get("SeriesTime")) or _dt(
            ds.get("AcquisitionDate"), ds.get("AcquisitionTime")
        )
    return _parse_dt(ds.get("AcquisitionDateTime") or ds.get("FrameAcquisitionDateTime")) or _dt(
        ds.get("AcquisitionDate"), ds.get("AcquisitionTime")
    )


def suv_factor(ds: Dataset) -> SUVResult:
    """SUVbw factor for one PET image (or per-frame header) from Units, Decay Correction and dose info."""
    units = str(ds.get("Units", "") or "").upper()
    if units == "GML":
        return SUVResult(1.0, "SUVbw g/ml")
    if units != "BQML":
        return SUVResult(None, units or "unknown", f"Units is {units or 'missing'}, not BQML")
    weight = float(ds.get("PatientWeight", 0) or 0)
    if weight <= 0:
        return SUVResult(None, "BQML", "Patient Weight is missing")
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        return SUVResult(None, "BQML", "Radiopharmaceutical Information is missing")
    rp = seq[0]
    dose = float(rp.get("RadionuclideTotalDose", 0) or 0)
    half_life = float(rp.get("RadionuclideHalfLife", 0) or 0)
    if dose <= 0:
        return SUVResult(None, "BQML", "Radionuclide Total Dose is missing")
    decay = str(ds.get("DecayCorrection", "") or "").upper()
    if decay == "ADMIN":
        return SUVResult(weight * 1000.0 / dose, "SUVbw g/ml")
    if decay not in ("START", "NONE"):
        return SUVResult(None, "BQML", f"Decay Correction is {decay or 'missing'}")
    if half_life <= 0:
        return SUVResult(None, "BQML", "Radionuclide Half Life is missing")
    injected = _injection_time(rp, ds)
    ref = _reference_time(ds, decay)
    if injected is None or ref is None:
        what = "Radiopharmaceutical Start Time" if injected is None else "series/acquisition time"
        return SUVResult(None, "BQML", f"{what} is missing")
    elapsed = (ref - injected).total_seconds()
    if elapsed < 0:
        return SUVResult(None, "BQML", "injection time is after the scan time")
    decayed_dose = dose * 2.0 ** (-elapsed / half_life)
    return SUVResult(weight * 1000.0 / decayed_dose, "SUVbw g/ml")
