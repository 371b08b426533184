"""PET SUVbw: Bq/ml converted with the header's dose, decay and weight; kept and noted when impossible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.fusion.suv import suv_factor
from dicomnode.fusion.volume import load_volume
from dicomnode.testing import variants as V


@pytest.fixture(scope="module")
def pet(tmp_path_factory: pytest.TempPathFactory) -> V.GeneratedSeries:
    grid = V.small_grid("PT", n_slices=8, matrix=32, pixel_mm=6.0, slice_mm=6.0)
    return V.generate_series(tmp_path_factory.mktemp("pt"), "PT", grid, noise=True)


def test_generated_pet_is_already_suv(pet: V.GeneratedSeries) -> None:
    vol = load_volume(pet.paths)
    assert vol.units == "SUVbw g/ml"
    assert 10.0 < float(vol.array.max()) < 30.0  # lesion SUV of the phantom


@pytest.mark.parametrize("decay", ["START", "ADMIN"])
def test_bqml_is_converted_to_suvbw(decay: str, pet: V.GeneratedSeries, tmp_path: Path) -> None:
    ref = load_volume(pet.paths)
    paths = V.pet_to_bqml(pet.paths, tmp_path, decay=decay)
    raw = load_volume(paths)  # values are Bq/ml before conversion: much larger than SUV
    assert pydicom.dcmread(paths[0]).Units == "BQML"
    assert raw.units == "SUVbw g/ml" and any("SUVbw" in n for n in raw.notes)
    np.testing.assert_allclose(raw.array, ref.array, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("drop", "reason"),
    [
        ("PatientWeight", "Patient Weight"),
        ("RadionuclideTotalDose", "Total Dose"),
        ("RadionuclideHalfLife", "Half Life"),
        ("RadiopharmaceuticalStartDateTime", "Start Time"),
    ],
)
def test_missing_factors_keep_bqml_and_say_why(
    drop: str, reason: str, pet: V.GeneratedSeries, tmp_path: Path
) -> None:
    drops = [drop, "RadiopharmaceuticalStartTime"] if drop == "RadiopharmaceuticalStartDateTime" else [drop]
    paths = V.pet_to_bqml(pet.paths, tmp_path, drop=drops)
    vol = load_volume(paths)
    assert vol.units == "BQML"
    assert any(reason in n and "not SUVbw" in n for n in vol.notes)
    slope = float(pydicom.dcmread(paths[0]).RescaleSlope)
    stored = pydicom.dcmread(paths[0]).pixel_array
    np.testing.assert_allclose(vol.array[0], stored * slope, rtol=1e-6)


def test_suv_factor_reasons_for_other_units() -> None:
    ds = pydicom.Dataset()
    ds.Units = "CNTS"
    result = suv_factor(ds)
    assert result.factor is None and "CNTS" in result.reason
