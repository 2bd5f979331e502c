"""Image files -> arrays -> model inputs, exactly as Mammo-CLIP feeds its encoder.

* `read_image`: PNG/JPEG/TIFF (8- or 16-bit grayscale) or DICOM (pydicom; JPEG 2000, JPEG-LS and
  RLE through the pylibjpeg/openjpeg plugins; MONOCHROME1 is inverted as x_max - x, like
  Mammo-CLIP; no VOI LUT or windowing).
  Images over `max_image_pixels()` (default 100 Mpx, env `MAMMO_SAE_MAX_IMAGE_PIXELS`) are
  refused from the header's size, before any pixel is decoded.
* `to_model_input`: grayscale -> 3 identical channels, per-image min-max to [0, 1], then
  (x - MEAN) / STD. No resize when the image already has the requested size (the Mammo-CLIP
  evaluation path: PNGs are 1520x912 already). Another size is reached with area interpolation
  (`cv2.INTER_AREA`, the PNG preprocessing's resize) when shrinking and bilinear when enlarging,
  applied *before* the min-max so the result spans [0, 1] exactly.
* `RecordDataset`: records -> (x_3hw, index), optional Mammo-CLIP-style augmentation in torch.
* `breast_mask`: breast vs dark background; `scale_boxes`: boxes between frames.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from ..errors import DataError
from .records import Box, ImageRecord

# Mammo-CLIP config `base`: mean/std of the min-max-normalised VinDr PNGs.
MEAN = 0.3089279
STD = 0.25053555408335154
DICOM_SUFFIXES = (".dcm", ".dicom")

# A few-KB file can declare a size that decodes to gigabytes. Mammograms are at most a few
# tens of Mpx (VinDr PNGs 1520x912 = 1.4 Mpx, full-field DICOMs ~13 Mpx), so anything larger
# is refused from the header. The environment variable reaches DataLoader worker processes.
MAX_IMAGE_PIXELS = 100_000_000
MAX_IMAGE_PIXELS_ENV = "MAMMO_SAE_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    """The largest image (height x width x frames) read: $MAMMO_SAE_MAX_IMAGE_PIXELS or 100 Mpx."""
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(
            f"{MAX_IMAGE_PIXELS_ENV} must be a positive whole number of pixels, got {text!r}"
        )
    return value


def check_image_size(
    path: str | os.PathLike[str],
    height: int,
    width: int,
    *,
    frames: int = 1,
    max_pixels: int | None = None,
) -> None:
    """Raise DataError naming the image when its header's size is over the limit."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    pixels = int(height) * int(width) * max(1, int(frames))
    if pixels > limit:
        shape = f"{height}x{width}" + (f"x{frames} frames" if frames > 1 else "")
        raise DataError(
            f"{path}: image is {shape} pixels ({pixels / 1e6:.1f} Mpx), over the "
            f"limit of {limit / 1e6:g} Mpx; not decoded (a larger limit can be set "
            f"with {MAX_IMAGE_PIXELS_ENV})"
        )


# ---------------------------------------------------------------------------- reading


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """A `.dcm` / `.dicom` file, or any file (extension-less included) with the `DICM` magic."""
    return _is_dicom(Path(path))


def find_dicom_file(folder: str | os.PathLike[str], stem: str) -> Path | None:
    """`folder/stem` as a DICOM: `stem.dicom`, `stem.dcm` or the extension-less `stem` (checked
    for the DICOM magic); None when none exists."""
    folder = Path(folder)
    for name in (f"{stem}.dicom", f"{stem}.dcm"):
        if (folder / name).is_file():
            return folder / name
    bare = folder / stem
    return bare if bare.is_file() and _is_dicom(bare) else None


def read_dicom(
    path: str | os.PathLike[str], *, invert_monochrome1: bool = True, max_pixels: int | None = None
) -> tuple[np.ndarray, str]:
    """Stored pixels of a single-frame grayscale DICOM and its PhotometricInterpretation.

    With `invert_monochrome1`, MONOCHROME1 images (bright = low value) come back as max - x.
    Rows x Columns (x frames) over `max_pixels` (default `max_image_pixels()`) is refused
    before the pixel data is decoded.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    errors = (
        InvalidDicomError,
        OSError,
        ValueError,
        AttributeError,
        KeyError,
        RuntimeError,
        NotImplementedError,
        TypeError,
    )
    try:
        ds = pydicom.dcmread(path)  # reads the pixel data's bytes but does not decode them
        photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except errors as exc:
        raise DataError(f"cannot read DICOM {path}: {type(exc).__name__}: {exc}") from exc
    check_image_size(path, rows, columns, frames=frames, max_pixels=max_pixels)
    try:
        arr = ds.pixel_array
    except errors as exc:
        raise DataError(f"cannot read DICOM {path}: {type(exc).__name__}: {exc}") from exc
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(
            f"{path}: PhotometricInterpretation {photometric!r} is not grayscale "
            "(expected MONOCHROME1 or MONOCHROME2)"
        )
    if arr.ndim != 2:
        raise DataError(
            f"{path}: expected a single-frame 2-D image, got pixel array shape {arr.shape}"
        )
    if invert_monochrome1 and photometric == "MONOCHROME1":
        arr = arr.max() - arr
    return arr, photometric


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> np.ndarray:
    """(H, W) grayscale array of a PNG/JPEG/TIFF (uint8 or uint16) or DICOM (MONOCHROME1 inverted).

    Images over `max_pixels` (default `max_image_pixels()`) are refused from the header's size,
    before decoding.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    if _is_dicom(path):
        return read_dicom(path, max_pixels=max_pixels)[0]
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Our limit decides (just below); Pillow's own error over 2 x its
            # MAX_IMAGE_PIXELS (179 Mpx) is reported below like ours.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            check_image_size(path, img.height, img.width, max_pixels=max_pixels)
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L"):
                arr = np.asarray(img, dtype=np.uint16)
            elif img.mode in ("L", "I", "F"):
                arr = np.asarray(img)
            elif img.mode in ("RGB", "RGBA", "P", "LA"):
                arr = np.asarray(img.convert("L"))
            else:
                raise DataError(f"{path}: unsupported image mode {img.mode!r}")
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"{path}: not decoded: {exc} (Pillow's limit, PIL.Image.MAX_IMAGE_PIXELS; "
            f"ours is {max_image_pixels() if max_pixels is None else max_pixels} "
            "pixels)"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"{path}: expected a 2-D grayscale image, got shape {arr.shape}")
    return arr


# ---------------------------------------------------------------------------- preprocessing


def resize_hw(arr_hw: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """float32 resize: area interpolation when shrinking, bilinear when enlarging."""
    h, w = arr_hw.shape
    out_h, out_w = size_hw
    if (h, w) == (out_h, out_w):
        return arr_hw.astype(np.float32, copy=False)
    shrinking = out_h * out_w < h * w
    return cv2.resize(
        arr_hw.astype(np.float32, copy=False),
        (out_w, out_h),
        interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR,
    )


def minmax_01(x: torch.Tensor) -> torch.Tensor:
    """Per-image (x - min) / (max - min); a constant image becomes all zeros (not NaN)."""
    lo, hi = x.min(), x.max()
    span = hi - lo
    if span <= 0:
        return torch.zeros_like(x)
    return (x - lo) / span


def to_model_input(
    arr_hw: np.ndarray, size_hw: tuple[int, int] | None = None, channels: int = 3
) -> torch.Tensor:
    """(3, H, W) float32 encoder input: 3 identical channels, min-max, (x - MEAN) / STD.

    channels=1 returns the single channel: the caller expands it to 3 where the pixels are
    consumed (`expand_channels`), so loaders move a third of the bytes.
    """
    if arr_hw.ndim != 2:
        raise DataError(f"expected a 2-D grayscale image, got shape {arr_hw.shape}")
    if size_hw is not None and tuple(size_hw) != arr_hw.shape:
        arr_hw = resize_hw(arr_hw, (int(size_hw[0]), int(size_hw[1])))
    x_hw = minmax_01(torch.from_numpy(np.ascontiguousarray(arr_hw, dtype=np.float32)))
    return _with_channels(((x_hw - MEAN) / STD).unsqueeze(0), channels)


def _check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return channels


def _with_channels(x_1hw: torch.Tensor, channels: int) -> torch.Tensor:
    return x_1hw if _check_channels(channels) == 1 else x_1hw.repeat(3, 1, 1)


def expand_channels(
    x_b1hw: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """(B, 1, H, W) → (B, 3, H, W) identical channels in one copy, bit-equal to
    `to_model_input`'s."""
    if x_b1hw.dim() != 4 or x_b1hw.shape[1] != 1:
        raise ValueError(f"expected a (B, 1, H, W) batch, got shape {tuple(x_b1hw.shape)}")
    return x_b1hw.expand(-1, 3, -1, -1).contiguous(memory_format=memory_format)


def scale_boxes(
    boxes: Sequence[Box], from_hw: tuple[int, int], to_hw: tuple[int, int]
) -> tuple[Box, ...]:
    """Boxes of a `from_hw` frame in a `to_hw` frame (the same image resized, aspect not kept)."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return tuple(Box(b.concept, b.x0 * sx, b.y0 * sy, b.x1 * sx, b.y1 * sy) for b in boxes)


def breast_mask(arr_hw: np.ndarray, *, threshold: float | None = None) -> np.ndarray:
    """Boolean (H, W) mask of the breast: the largest bright connected region, holes filled.

    The image is min-max scaled to [0, 255] and lightly blurred; pixels above `threshold`
    (default: Otsu's threshold, capped at 40 — Mammo-CLIP's background cut-off — so dense
    tissue never splits the breast) are foreground.
    """
    if arr_hw.ndim != 2 or arr_hw.size == 0:
        raise DataError(f"breast_mask expects a non-empty 2-D image, got shape {arr_hw.shape}")
    x = arr_hw.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(arr_hw.shape, dtype=bool)
    u8 = ((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    k = max(3, (min(u8.shape) // 100) | 1)
    u8 = cv2.GaussianBlur(u8, (k, k), 0)
    if threshold is None:
        otsu, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = min(float(otsu), 40.0)
    fg = (u8 > threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return np.zeros(arr_hw.shape, dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = (labels == largest).astype(np.uint8)
    # Fill holes: background = what a flood fill from the border reaches.
    padded = np.pad(mask, 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask.astype(bool) | holes


# ---------------------------------------------------------------------------- augmentation


def augment_mammo_clip(
    x_chw: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mammo-CLIP training augmentation in torch, each step with probability 0.5:
    horizontal flip, vertical flip, affine (rotation ±20°, translation ±10 %, scale 0.8–1.2,
    shear ±20°; zero = darkest fill), elastic (alpha 10, sigma 15 pixels).

    Deviation: albumentations treats scalar Affine arguments as fixed values (always 20°), which
    looks unintended; here they are ranges. Works on [0, 1] images (before mean/std).
    """

    def coin() -> bool:
        return bool(torch.rand((), generator=generator) < 0.5)

    def uniform(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=generator))

    if coin():
        x_chw = x_chw.flip(-1)
    if coin():
        x_chw = x_chw.flip(-2)
    _, h, w = x_chw.shape
    grid = None
    if coin():
        angle, shear = math.radians(uniform(-20, 20)), math.radians(uniform(-20, 20))
        scale = uniform(0.8, 1.2)
        tx, ty = uniform(-0.2, 0.2), uniform(-0.2, 0.2)  # ±10 % of the size = ±0.2 in [-1, 1]
        cos, sin = math.cos(angle), math.sin(angle)
        # Inverse map output -> input in normalised coordinates, aspect-corrected for rotation.
        rot_shear = torch.tensor(
            [[cos, -sin + cos * math.tan(shear)], [sin, cos + sin * math.tan(shear)]],
            dtype=torch.float64,
        )
        aspect = torch.tensor([[w / 2, 0.0], [0.0, h / 2]], dtype=torch.float64)
        fwd = aspect.inverse() @ rot_shear @ aspect * scale
        inv = torch.linalg.inv(fwd)
        offset = -inv @ torch.tensor([tx, ty], dtype=torch.float64)
        theta = torch.cat([inv, offset[:, None]], dim=1).float()[None]
        grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    if coin():
        if grid is None:
            grid = F.affine_grid(torch.eye(2, 3)[None], [1, 1, h, w], align_corners=False)
        noise = torch.rand((1, 2, h, w), generator=generator) * 2 - 1
        k = 61  # ~ 4 sigma, odd
        coords = torch.arange(k, dtype=torch.float32) - k // 2
        g = torch.exp(-(coords**2) / (2 * 15.0**2))
        g = g / g.sum()
        noise = F.conv2d(noise.reshape(2, 1, h, w), g.view(1, 1, 1, k), padding=(0, k // 2))
        noise = F.conv2d(noise, g.view(1, 1, k, 1), padding=(k // 2, 0)).reshape(1, 2, h, w)
        disp = noise.permute(0, 2, 3, 1) * 10.0 * torch.tensor([2.0 / w, 2.0 / h])
        grid = grid + disp
    if grid is not None:
        x_chw = F.grid_sample(
            x_chw[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )[0]
    return x_chw


# ---------------------------------------------------------------------------- dataset


class RecordDataset(Dataset):
    """`records[i]` -> (x_3hw float32, i). `size_hw=None` keeps each image's own size;
    `channels=1` gives x_1hw (see `expand_channels`).

    A missing or unreadable image raises DataError naming the image id and the file.
    With `augment=True` the Mammo-CLIP training augmentation is applied (torch RNG; DataLoader
    workers are seeded by torch).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        size_hw: tuple[int, int] | None = None,
        augment: bool = False,
        channels: int = 3,
    ) -> None:
        self.records = list(records)
        self.size_hw = tuple(size_hw) if size_hw is not None else None
        self.augment = augment
        self.channels = _check_channels(channels)
        for r in self.records:
            if r.path is None:
                raise DataError(f"image {r.image_id} has no file path")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        record = self.records[i]
        try:
            arr_hw = read_image(record.path)  # type: ignore[arg-type]
        except DataError as exc:
            raise DataError(f"image {record.image_id}: {exc}") from exc
        if not self.augment:
            return to_model_input(arr_hw, self.size_hw, self.channels), i
        if self.size_hw is not None and arr_hw.shape != self.size_hw:
            arr_hw = resize_hw(arr_hw, self.size_hw)
        x_1hw = minmax_01(torch.from_numpy(np.ascontiguousarray(arr_hw, dtype=np.float32)))[None]
        x_1hw = minmax_01(augment_mammo_clip(x_1hw))
        return _with_channels((x_1hw - MEAN) / STD, self.channels), i

    def collate(self, items: Sequence[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        """[x_bchw, indices], torch's default collate; images of different sizes in one
        batch are refused naming two of them (torch only says "stack expects each tensor to be
        equal size"). For training batches, which must share a size."""
        sizes: dict[tuple[int, ...], int] = {}  # size -> first image of that size
        for x, i in items:
            sizes.setdefault(tuple(x.shape[-2:]), i)
        if len(sizes) > 1:
            (a_hw, a), (b_hw, b) = list(sizes.items())[:2]
            raise DataError(
                f"images of different sizes in one batch: {self.records[a].image_id} is "
                f"{a_hw[0]}x{a_hw[1]}, {self.records[b].image_id} is {b_hw[0]}x{b_hw[1]}; pass "
                "--image-size HxW to resize every image to one size"
            )
        return default_collate(list(items))

    @staticmethod
    def collate_by_size(items: Sequence[tuple[torch.Tensor, int]]) -> list[list[torch.Tensor]]:
        """[[x_bchw, indices], ...], one batch per image size: for inference, where each image can
        run at its own size, as `extract` does without --image-size."""
        groups: dict[tuple[int, ...], list[tuple[torch.Tensor, int]]] = {}
        for x, i in items:
            groups.setdefault(tuple(x.shape), []).append((x, i))
        # default_collate stacks straight into shared memory inside a worker (no second copy)
        return [default_collate(g) for g in groups.values()]
