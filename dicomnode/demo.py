"""``dicomnode demo``: Orthanc as the PACS, the node, a generated study sent by storescu, the fused result.

Everything runs on loopback with free ports inside ``workdir``; nothing from the user's config
but the fusion settings and rules is used, and ``DICOMNODE_*`` environment overrides are ignored,
so the demo never touches a real PACS or database.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from dicomnode.config import isolated_settings, load_settings


def _wait(predicate, timeout: float, what: str, poll: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _fused_series_in_orthanc(orthanc) -> list[dict]:  # type: ignore[no-untyped-def]
    found = []
    for s in orthanc.rest("/series?expand"):
        desc = s["MainDicomTags"].get("SeriesDescription", "")
        if desc.startswith("FUSED"):
            study = orthanc.rest(f"/studies/{s['ParentStudy']}")
            found.append(
                {
                    "patient": study["PatientMainDicomTags"].get("PatientName", ""),
                    "patient_id": study["PatientMainDicomTags"].get("PatientID", ""),
                    "study_uid": study["MainDicomTags"].get("StudyInstanceUID", ""),
                    "series_description": desc,
                    "instances": len(s["Instances"]),
                    "orthanc_id": s["ID"],
                    "instance_ids": s["Instances"],
                }
            )
    return found


def _preview(orthanc, series: dict, study_dir: Path, out_png: Path) -> None:  # type: ignore[no-untyped-def]
    """A fused slice from Orthanc beside its MR source and the moving source on the same slice."""
    import pydicom  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from dicomnode.fusion.pipeline import intensity_window, window  # noqa: PLC0415
    from dicomnode.fusion.resample import resample_to  # noqa: PLC0415
    from dicomnode.runner.batch import read_series_dir  # noqa: PLC0415

    # show the slice with the most to see (hot lesion, structure), not just the middle one
    best, best_std = None, -1.0
    for iid in series["instance_ids"]:
        ds = pydicom.dcmread(io.BytesIO(orthanc.rest(f"/instances/{iid}/file", raw=True)))
        px = np.asarray(ds.pixel_array, dtype=np.float32)
        # RGB (PET/SPECT): most high-uptake pixels (Hot Iron turns yellow only for hot spots)
        std = float((px[..., 1] > 128).sum()) if px.ndim == 3 else float(px.std())
        if std > best_std:
            best, best_std = ds, std
    fused = best
    fused_px = fused.pixel_array
    ref_uid = str(fused.SourceImageSequence[0].ReferencedSOPInstanceUID)
    moving_mod = series["series_description"].split("+")[1].split()[0]
    mr = read_series_dir(study_dir / "MR")
    mov = read_series_dir(study_dir / moving_mod)
    k = mr.sop_instance_uids.index(ref_uid)
    mr_slice = window(mr.array[k], *intensity_window(mr.array, "MR"))
    one = type(mr)(array=mr.array[k : k + 1], affine=mr.slice_affine(k), modality="MR")
    fill = -1000.0 if mov.modality == "CT" else 0.0
    mov_slice = resample_to(mov, one, fill=fill)[0]
    mov_slice = window(mov_slice, *intensity_window(mov.array, mov.modality))

    def rgb(a: np.ndarray) -> np.ndarray:
        if a.ndim == 2:
            a = np.clip(a * 255 if a.dtype != np.uint8 else a, 0, 255).astype(np.uint8)
            a = np.stack([a] * 3, axis=-1)
        return a

    if mov.modality in ("PT", "NM"):
        from dicomnode.fusion.colour import apply_hot_iron  # noqa: PLC0415

        mov_img = apply_hot_iron(mov_slice)
    else:
        mov_img = rgb(mov_slice)
    panels = [rgb(mr_slice), mov_img, rgb(fused_px)]
    h = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, h - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    Image.fromarray(np.concatenate(panels, axis=1)).resize(
        (sum(p.shape[1] for p in panels) * 2, h * 2), Image.Resampling.NEAREST
    ).save(out_png)


def run_demo(
    workdir: Path, scale: float = 1.0, modalities: list[str] | None = None, config: str | None = None
) -> int:
    from dicomnode.admin import collect_status, format_status  # noqa: PLC0415
    from dicomnode.node import Node  # noqa: PLC0415
    from dicomnode.testing import generate_study  # noqa: PLC0415
    from dicomnode.testing.peers import Orthanc, free_port, have_dcmtk, have_orthanc, storescu  # noqa: PLC0415

    modalities = [m.strip().upper() for m in (modalities or ["MR", "CT", "PT"])]
    if "MR" not in modalities or len(modalities) < 2:
        print("error: --modalities needs MR and at least one of CT, PT, NM", file=sys.stderr)
        return 2
    if not (have_orthanc() and have_dcmtk()):
        print("error: the demo needs Orthanc and dcmtk (apt-get install orthanc dcmtk)", file=sys.stderr)
        return 2
    workdir = workdir.resolve()
    if workdir.exists():
        import shutil  # noqa: PLC0415

        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    base = load_settings(config) if config else load_settings(None)
    print(f"[demo] working in {workdir}")
    with Orthanc(workdir / "orthanc") as orthanc:
        print(f"[demo] Orthanc (the PACS) on DICOM port {orthanc.dicom_port}, REST {orthanc.url}")
        # the environment's DICOMNODE_* overrides (a production PACS, its database) must not apply here
        settings = isolated_settings(
            node={"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port()},
            storage={
                "spool_dir": str(workdir / "spool"),
                "database_url": f"sqlite:///{workdir}/dicomnode.db",
            },
            assembly={"series_stable_seconds": 2, "pair_window_hours": 24, "poll_seconds": 0.5},
            rules=[r.model_dump() for r in base.rules],
            destinations=[
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
            ],
            fusion=base.fusion.model_dump() | {"poll_seconds": 0.5},
            dispatch={"poll_seconds": 0.5, "backoff_initial_seconds": 1},
            admin={"http_host": "127.0.0.1", "http_port": free_port()},
        )
        node = Node(settings)
        node.start()
        try:
            print(
                f"[demo] dicomnode listening as DICOMNODE on port {settings.node.port}; "
                f"dashboard on http://127.0.0.1:{settings.admin.http_port}/"
            )
            t0 = time.monotonic()
            study = generate_study(workdir / "study", modalities=tuple(modalities), scale=scale)
            counts = {m: len(s.paths) for m, s in study.series.items()}
            print(f"[demo] generated a head study {counts} in {time.monotonic() - t0:.1f} s")
            t0 = time.monotonic()
            res = storescu(
                [workdir / "study"], settings.node.port, called_aet="DICOMNODE", calling_aet="SCANNER"
            )
            if res.returncode != 0:
                print(f"[demo] storescu failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                return 1
            print(
                f"[demo] scanner (storescu) sent {sum(counts.values())} instances "
                f"in {time.monotonic() - t0:.1f} s"
            )
            expected = {m for m in modalities if m != "MR"}
            per_rule = {r.moving: r for r in settings.rules if r.reference == "MR"}
            wanted = {m for m in expected if m in per_rule}

            def arrived() -> list[dict] | None:
                found = _fused_series_in_orthanc(orthanc)
                mods = {f["series_description"].split("+")[1].split()[0] for f in found}
                complete = all(f["instances"] == counts["MR"] for f in found)
                return found if mods >= wanted and complete else None

            found = _wait(arrived, timeout=900, what="the fused series in Orthanc", poll=1.0)
            print(f"[demo] fused series arrived in Orthanc {time.monotonic() - t0:.1f} s after sending:\n")
            print(f"  {'patient':<16} {'study instance uid':<40} {'series description':<40} instances")
            for f in found:
                print(
                    f"  {f['patient']:<16} {f['study_uid'][:40]:<40} "
                    f"{f['series_description']:<40} {f['instances']}"
                )
            print()
            for f in found:
                mod = f["series_description"].split("+")[1].split()[0]
                png = workdir / f"preview_MR_{mod}.png"
                _preview(orthanc, f, workdir / "study", png)
                print(f"[demo] preview (MR | {mod} | fused) written to {png}")
            with node.sessionmaker() as s:
                st = collect_status(s, settings=settings)
            print()
            print(format_status(st))
            (workdir / "status.json").write_text(json.dumps(st, indent=1))
        finally:
            node.stop()
    return 0
