"""DICOM headers for generated series: the modules each IOD (MR, CT, PET, NM) asks for, filled plausibly."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
)

from dicomnode.testing.grid import Grid

SOP_CLASSES = {
    "MR": MRImageStorage,
    "CT": CTImageStorage,
    "PT": PositronEmissionTomographyImageStorage,
    "NM": NuclearMedicineImageStorage,
}
SERIES_DESCRIPTIONS = {"MR": "T1 3D AX", "CT": "CT HEAD", "PT": "PET FDG AC", "NM": "SPECT PERFUSION"}
SERIES_NUMBERS = {"MR": 3, "CT": 2, "PT": 4, "NM": 5}
SERIES_DELAY_MIN = {"MR": 5, "CT": 25, "PT": 45, "NM": 90}
EQUIPMENT = {
    "MR": ("SIEMENS", "Prisma", "MR-PRISMA-1", "syngo MR XA30"),
    "CT": ("GE MEDICAL SYSTEMS", "Revolution CT", "CT-REV-1", "revo_ct_22"),
    "PT": ("SIEMENS", "Biograph Vision 600", "PET-VISION-1", "VG80"),
    "NM": ("GE MEDICAL SYSTEMS", "Discovery NM/CT 670", "NM-670-1", "Xeleris 4.1"),
}
F18_HALF_LIFE_S = 6586.2


@dataclass
class StudyInfo:
    """Patient and study identity shared by every series of one generated study."""

    patient_id: str
    patient_name: str
    issuer_of_patient_id: str | None
    study_instance_uid: str
    study_datetime: datetime
    frame_of_reference_uid: str
    accession_number: str
    patient_birth_date: str = "19580417"
    patient_sex: str = "M"
    patient_age: str = "066Y"
    patient_weight_kg: float = 78.0
    patient_size_m: float = 1.78
    specific_character_set: str | list[str] = "ISO_IR 100"
    extra_attributes: dict[str, object] = field(default_factory=dict)  # set on every instance, last


def _da(t: datetime) -> str:
    return t.strftime("%Y%m%d")


def _tm(t: datetime) -> str:
    return t.strftime("%H%M%S")


def ds_str(value: float) -> str:
    """A Decimal String (max 16 chars) that parses back to the value the pixels were scaled with."""
    for digits in range(12, 3, -1):
        s = f"{value:.{digits}g}"
        if len(s) <= 16:
            return s
    raise ValueError(f"cannot encode {value} as DS")  # pragma: no cover


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue = value
    c.CodingSchemeDesignator = scheme
    c.CodeMeaning = meaning
    return c


def series_template(modality: str, study: StudyInfo, series_uid: str, grid: Grid) -> Dataset:
    """Everything that is the same on every slice of one series (pixels and per-slice tags come later)."""
    series_time = study.study_datetime + timedelta(minutes=SERIES_DELAY_MIN[modality])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "DICOMNODE_GEN1"
    ds.SpecificCharacterSet = study.specific_character_set
    image_type = {
        "MR": ["ORIGINAL", "PRIMARY", "OTHER"],
        "CT": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "PT": ["ORIGINAL", "PRIMARY"],
        "NM": ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"],
    }
    ds.ImageType = image_type[modality]
    ds.InstanceCreationDate = _da(series_time)
    ds.InstanceCreationTime = _tm(series_time)
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.StudyDate = _da(study.study_datetime)
    ds.SeriesDate = _da(series_time)
    ds.AcquisitionDate = _da(series_time)
    ds.ContentDate = _da(series_time)
    ds.StudyTime = _tm(study.study_datetime)
    ds.SeriesTime = _tm(series_time)
    ds.AcquisitionTime = _tm(series_time)
    ds.ContentTime = _tm(series_time)
    ds.AccessionNumber = study.accession_number
    ds.Modality = modality
    manufacturer, model, station, software = EQUIPMENT[modality]
    ds.Manufacturer = manufacturer
    ds.InstitutionName = "Dicomnode Demo Hospital"
    ds.ReferringPhysicianName = "Referrer^Demo"
    ds.StationName = station
    ds.StudyDescription = "HEAD MULTIMODALITY"
    ds.SeriesDescription = SERIES_DESCRIPTIONS[modality]
    ds.OperatorsName = "Tech^Demo"
    ds.ManufacturerModelName = model
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    if study.issuer_of_patient_id:
        ds.IssuerOfPatientID = study.issuer_of_patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.PatientAge = study.patient_age
    ds.PatientSize = ds_str(study.patient_size_m)
    ds.PatientWeight = ds_str(study.patient_weight_kg)
    ds.BodyPartExamined = "HEAD"
    ds.DeviceSerialNumber = str(40000 + SERIES_NUMBERS[modality])
    ds.SoftwareVersions = software
    ds.ProtocolName = {
        "MR": "t1_mprage_sag_iso",
        "CT": "HEAD ROUTINE",
        "PT": "PET BRAIN FDG",
        "NM": "BRAIN PERFUSION SPECT",
    }[modality]
    if modality in ("MR", "CT"):  # PET/NM carry the coded patient orientation instead
        ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = SERIES_NUMBERS[modality]
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [ds_str(v) for v in grid.orientation]
    ds.PixelSpacing = [ds_str(grid.pixel_spacing[0]), ds_str(grid.pixel_spacing[1])]
    ds.SliceThickness = ds_str(grid.thickness)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = grid.rows
    ds.Columns = grid.columns
    ds.BitsAllocated = 16
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    {"MR": _mr, "CT": _ct, "PT": _pet, "NM": _nm}[modality](ds, study, grid, series_time)
    for keyword, value in study.extra_attributes.items():
        setattr(ds, keyword, value)
    return ds


def _mr(ds: Dataset, study: StudyInfo, grid: Grid, t: datetime) -> None:
    ds.ScanningSequence = ["GR", "IR"]
    ds.SequenceVariant = ["SK", "SP", "MP"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.SequenceName = "*tfl3d1_16ns"
    ds.AngioFlag = "N"
    ds.SpacingBetweenSlices = ds_str(grid.slice_spacing)
    ds.RepetitionTime = "2300"
    ds.EchoTime = "2.98"
    ds.InversionTime = "900"
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.25"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = "3"
    ds.EchoTrainLength = "1"
    ds.FlipAngle = "9"
    ds.PixelBandwidth = "240"
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "600"
    ds.WindowWidth = "1200"


def _ct(ds: Dataset, study: StudyInfo, grid: Grid, t: datetime) -> None:
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    fov = max(grid.rows * grid.pixel_spacing[0], grid.columns * grid.pixel_spacing[1])
    ds.ReconstructionDiameter = ds_str(fov)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "1000"
    ds.XRayTubeCurrent = "250"
    ds.Exposure = "250"
    ds.FilterType = "BODY FILTER"
    ds.ConvolutionKernel = "STANDARD"
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = ["40", "600"]
    ds.WindowWidth = ["80", "2800"]
    ds.WindowCenterWidthExplanation = ["BRAIN", "BONE"]


def _patient_orientation(ds: Dataset) -> None:
    orient = _code("102538003", "SCT", "recumbent")
    orient.PatientOrientationModifierCodeSequence = Sequence([_code("40199007", "SCT", "supine")])
    ds.PatientOrientationCodeSequence = Sequence([orient])
    ds.PatientGantryRelationshipCodeSequence = Sequence([_code("102540008", "SCT", "headfirst")])


def _pet(ds: Dataset, study: StudyInfo, grid: Grid, t: datetime) -> None:
    injection = t - timedelta(minutes=60)
    dose_bq = 250e6
    ds.Units = "GML"  # SUVbw in g/ml: the rescaled pixel values are SUVs
    ds.SUVType = "BW"
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.CorrectedImage = ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"]
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "CT-based"
    ds.ScatterCorrectionMethod = "Model-based"
    ds.DecayCorrection = "START"
    ds.ReconstructionMethod = "OSEM 4i5s"
    ds.NumberOfSlices = grid.n_slices
    ds.CollimatorType = "NONE"
    ds.FrameReferenceTime = "0"
    ds.ActualFrameDuration = 600000
    ds.DecayFactor = ds_str(2.0 ** ((t - injection).total_seconds() / F18_HALF_LIFE_S))
    ds.DoseCalibrationFactor = "1"
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.WindowCenter = "6"
    ds.WindowWidth = "12"
    rp = Dataset()
    rp.Radiopharmaceutical = "Fluorodeoxyglucose"
    rp.RadiopharmaceuticalRoute = "Intravenous route"
    rp.RadiopharmaceuticalStartTime = _tm(injection)
    rp.RadiopharmaceuticalStartDateTime = injection.strftime("%Y%m%d%H%M%S")
    rp.RadionuclideTotalDose = ds_str(dose_bq)
    rp.RadionuclideHalfLife = ds_str(F18_HALF_LIFE_S)
    rp.RadionuclidePositronFraction = "0.9686"
    rp.RadionuclideCodeSequence = Sequence([_code("77004003", "SCT", "^18^Fluorine")])
    rp.RadiopharmaceuticalCodeSequence = Sequence([_code("35321007", "SCT", "Fluorodeoxyglucose F^18^")])
    ds.RadiopharmaceuticalInformationSequence = Sequence([rp])
    _patient_orientation(ds)


def _nm(ds: Dataset, study: StudyInfo, grid: Grid, t: datetime) -> None:
    injection = t - timedelta(minutes=40)
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00540080  # Slice Vector
    # one slice per instance: each file is a one-slice reconstruction, placed by Image Position (Patient)
    ds.NumberOfSlices = 1
    ds.SliceVector = [1]
    ds.SpacingBetweenSlices = ds_str(grid.slice_spacing)
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.CountsAccumulated = 0
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT"]
    ds.WindowCenter = "200"
    ds.WindowWidth = "400"
    ds.NumberOfEnergyWindows = 1
    ew = Dataset()
    rng = Dataset()
    rng.EnergyWindowLowerLimit = "126.45"
    rng.EnergyWindowUpperLimit = "154.55"
    ew.EnergyWindowRangeSequence = Sequence([rng])
    ew.EnergyWindowName = "Tc99m"
    ds.EnergyWindowInformationSequence = Sequence([ew])
    rp = Dataset()
    rp.Radiopharmaceutical = "Tc-99m exametazime (HMPAO)"
    rp.RadiopharmaceuticalStartTime = _tm(injection)
    rp.RadionuclideTotalDose = "740"  # MBq, as the NM IOD counts it
    hmpao = _code("77313009", "SCT", "Technetium Tc^99m^ exametazime")
    rp.RadiopharmaceuticalCodeSequence = Sequence([hmpao])
    rp.RadionuclideCodeSequence = Sequence([_code("72454006", "SCT", "^99m^Technetium")])
    ds.RadiopharmaceuticalInformationSequence = Sequence([rp])
    ds.NumberOfDetectors = 2
    ds.DetectorInformationSequence = Sequence()
    ds.NumberOfRotations = 1
    rot = Dataset()
    rot.StartAngle = "0"
    rot.AngularStep = "3"
    rot.RotationDirection = "CW"
    rot.ScanArc = "360"
    rot.ActualFrameDuration = 20000
    rot.NumberOfFramesInRotation = 120
    ds.RotationInformationSequence = Sequence([rot])
    ds.TypeOfDetectorMotion = "STEP AND SHOOT"
    ds.ReconstructionDiameter = ds_str(grid.columns * grid.pixel_spacing[1])
    ds.ConvolutionKernel = "BUTTERWORTH"
    _patient_orientation(ds)


def set_slice(
    ds: Dataset,
    modality: str,
    grid: Grid,
    k: int,
    sop_uid: str,
    pixels: np.ndarray,
    rescale_slope: str | None = None,
) -> None:
    """Per-slice tags: identity, position, instance number, pixel data (and PET's slope)."""
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    pos = grid.slice_origin(k)
    ds.ImagePositionPatient = [ds_str(round(float(v), 4)) for v in pos]
    _, _, normal = grid.directions()
    ds.SliceLocation = ds_str(round(float(pos @ normal), 4))
    ds.InstanceNumber = k + 1
    if modality == "PT":
        ds.ImageIndex = k + 1
        ds.RescaleSlope = rescale_slope
    if modality == "NM":
        det = Dataset()
        det.ImagePositionPatient = ds.ImagePositionPatient
        det.ImageOrientationPatient = ds.ImageOrientationPatient
        det.CollimatorGridName = "LEHR"
        det.CollimatorType = "PARA"
        ds.DetectorInformationSequence = Sequence([det])
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
