"""Synthetic mammography phantom with planted findings and a planted confounder.

The phantom writes the Mammo-CLIP VinDr layout (`vindr_detection_v1_folds.csv` with its 33
columns + `images_png/<patient_id>/<image_id>.png`), so one reader serves real and synthetic
data. Five extra CSV columns hold the planted background marker (`confounder`, its box), and
`phantom.json` records every generation parameter.

Generation is two-stage:

1. `plan(cfg)` draws everything that is decided per patient or across the dataset (split,
   fold, laterality, density, findings in breast-normalised polar coordinates, which images
   carry the marker). It is cheap and serial, seeded by `cfg.seed` only.
2. `render_image(spec, ...)` draws the pixels of one image from a generator seeded by
   `(seed, image index)`, so images can be rendered in any order or in parallel and stay
   byte-identical. It returns every planted box, computed from the pixels the finding changed.

Only `Mass` and `Suspicious_Calcification` are planted; the other finding columns are 0.
See docs/phantom.md for the image model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from .. import __version__
from ..config import opt, progress_opt, result_settings
from ..errors import DataError
from ..io import atomic_path, read_json, write_json, write_text_atomic
from .records import FINDING_CONCEPTS, FOLDS_COLUMNS, Box, check_ids

SCHEMA_VERSION = 1
CSV_NAME = "vindr_detection_v1_folds.csv"
JSON_NAME = "phantom.json"
IMAGE_DIR = "images_png"

MASS = "Mass"
CALC = "Suspicious_Calcification"
PLANTED_CONCEPTS: tuple[str, ...] = (MASS, CALC)
CATEGORY_NAME = {MASS: "Mass", CALC: "Suspicious Calcification"}

# The folds CSV's columns (records.FOLDS_COLUMNS), then the phantom's marker columns.
CONFOUNDER_COLUMNS: tuple[str, ...] = (
    "confounder",
    "confounder_xmin",
    "confounder_ymin",
    "confounder_xmax",
    "confounder_ymax",
)
PHANTOM_COLUMNS: tuple[str, ...] = FOLDS_COLUMNS + CONFOUNDER_COLUMNS

# Density A-D: share of patients, and the share of the breast interior that is fibroglandular.
DENSITY_PROBS = (0.15, 0.35, 0.35, 0.15)
DENSITY_FRACTION = (0.08, 0.25, 0.48, 0.72)
DENSITY_NAMES = ("DENSITY A", "DENSITY B", "DENSITY C", "DENSITY D")

# Sizes below are in pixels of the reference frame 512x320 and scale with sqrt(H*W).
REFERENCE_HW = (512, 320)
# A planted finding's box holds every pixel where it adds at least this share of its contrast;
# weaker tails are cut to zero so that the box covers all pixels the finding changed.
PROFILE_CUT = 0.1
BACKGROUND_LEVEL = 0.03
GLAND_LEVEL = 0.26  # intensity added by fully dense fibroglandular tissue
NIPPLE_LEVEL = 0.92


DEFAULT_MARKER_SIZE = 17.0


@dataclass
class PhantomConfig:
    """Synthetic VinDr-layout dataset: breasts (L/R, CC+MLO per patient, density A-D) with
    planted masses and calcification clusters (exact boxes) and a background marker that is
    correlated with one concept in the training split and independent of all labels in test."""

    out: Path = opt(
        affects_result=False,
        help="output directory (gets vindr_detection_v1_folds.csv, images_png/, phantom.json)",
    )
    n_images: int = opt(
        200,
        help="number of images; two per patient (CC + MLO of one breast; an odd count gives the last patient one view)",
    )
    height: int = opt(512, help="image height in pixels")
    width: int = opt(320, help="image width in pixels")
    seed: int = opt(0, help="random seed; same arguments give byte-identical files")
    mass_prevalence: float = opt(0.25, help="share of patients with a mass (per split)")
    calc_prevalence: float = opt(
        0.25, help="share of patients with a suspicious calcification cluster (per split)"
    )
    test_fraction: float = opt(0.25, help="share of patients in the test split")
    confounder_concept: Literal["Mass", "Suspicious_Calcification", "none"] = opt(
        "Mass", help="concept the marker follows in the training split ('none': independent)"
    )
    confounder_strength: float = opt(
        0.8,
        help="training split: P(marker | positive) = (1+s)/2, P(marker | negative) = (1-s)/2; "
        "in test the marker is independent of all labels at the training marker rate",
    )
    # keyed_when_changed: same files as before the option existed keep phantom.json valid.
    marker_size: float = opt(
        DEFAULT_MARKER_SIZE,
        keyed_when_changed=True,
        help="side of the marker square in 512×320 reference pixels (±3, scaled with the image)",
    )
    # affects_result=False: kept out of phantom.json, which stays byte-identical.
    workers: int = opt(0, affects_result=False, help="render processes; 0 = one per CPU")
    overwrite: bool = opt(
        False, affects_result=False, help="replace a phantom made with other settings in --out"
    )
    figure: Path | None = opt(
        None, affects_result=False, help="also write a PNG grid of images with their boxes here"
    )
    progress: bool = progress_opt()


@dataclass(frozen=True)
class FindingSpec:
    """One planted finding, in breast-normalised polar coordinates (same for CC and MLO).

    `theta` is the angle from the chest-wall anchor (0 = towards the nipple, > 0 = down the
    image), `rho` the fraction of the way to the skin. `size` is the mass radius or the cluster
    radius in reference pixels; `shape_seed` fixes lobes, spicules and specks for both views.
    """

    concept: str
    theta: float
    rho: float
    size: float
    contrast: float
    shape: str  # round | oval | lobulated | spiculated | cluster
    birads: int
    shape_seed: int


@dataclass(frozen=True)
class ImageSpec:
    index: int
    image_id: str  # 32 hex digits, without ".png"
    patient_id: str
    series_id: str
    split: str
    fold: int
    view: str  # CC | MLO
    laterality: str  # L | R
    density: int  # 0-3 = A-D
    breast_birads: int
    findings: tuple[FindingSpec, ...]
    marker: bool
    marker_size: float = DEFAULT_MARKER_SIZE  # mean side in reference pixels

    def label(self, concept: str) -> int:
        return int(any(f.concept == concept for f in self.findings))


@dataclass
class RenderedImage:
    pixels_hw: np.ndarray  # uint8 (H, W)
    finding_boxes: list[Box]  # aligned with spec.findings
    marker_box: Box | None
    finding_masks: list[np.ndarray] = field(default_factory=list)  # bool (H, W), on request
    marker_mask: np.ndarray | None = None
    breast_mask_hw: np.ndarray | None = None


# --------------------------------------------------------------------------------------------
# validation and planning


def validate(cfg: PhantomConfig) -> None:
    """Raise DataError naming the first bad option."""
    if cfg.n_images < 2:
        raise DataError(
            f"--n-images must be at least 2 (one patient: CC + MLO); got {cfg.n_images}"
        )
    if not (64 <= cfg.height <= 8192 and 64 <= cfg.width <= 8192):
        raise DataError(
            f"--height/--width must be between 64 and 8192 pixels; got {cfg.height}x{cfg.width}"
        )
    if not (isinstance(cfg.marker_size, (int, float)) and 5.0 <= cfg.marker_size <= 60.0):
        # larger tags no longer fit the background corners
        raise DataError(f"--marker-size must be in [5, 60] reference pixels, got {cfg.marker_size}")
    for name in ("mass_prevalence", "calc_prevalence", "confounder_strength"):
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise DataError(f"--{name.replace('_', '-')} must be in [0, 1]; got {value}")
    if not 0.0 <= cfg.test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in [0, 1); got {cfg.test_fraction}")
    if cfg.confounder_concept not in (MASS, CALC, "none"):
        raise DataError(
            f"--confounder-concept must be one of {MASS}, {CALC}, none; got {cfg.confounder_concept!r}"
        )
    if cfg.test_fraction > 0 and _n_patients(cfg.n_images) < 2:
        raise DataError(
            f"a training/test split needs at least 2 patients (--n-images >= 3); got "
            f"{cfg.n_images} images; or pass --test-fraction 0"
        )
    if cfg.workers < 0:
        raise DataError(f"--workers must be >= 0; got {cfg.workers}")


def _n_patients(n_images: int) -> int:
    return (n_images + 1) // 2


def _hex_id(seed: int, kind: str, index: int) -> str:
    return hashlib.md5(f"mammo-sae-phantom:{seed}:{kind}:{index}".encode()).hexdigest()


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, *keys]))


def _choose(rng: np.random.Generator, items: Sequence[int], share: float) -> set[int]:
    """Exactly round(share * len) items (stratified prevalence keeps small datasets usable)."""
    k = int(round(share * len(items)))
    if share > 0 and k == 0 and len(items) >= 2:
        k = 1
    return set(int(i) for i in rng.permutation(np.asarray(items, dtype=np.int64))[:k])


def _draw_mass(rng: np.random.Generator) -> FindingSpec:
    shape = str(rng.choice(["round", "oval", "lobulated", "spiculated"]))
    theta, rho = _draw_position(rng, rho_range=(0.25, 0.72))
    return FindingSpec(
        concept=MASS,
        theta=theta,
        rho=rho,
        size=float(rng.uniform(14.0, 34.0)),
        contrast=float(rng.uniform(0.1, 0.35)),
        shape=shape,
        birads=int(rng.choice([3, 4, 5], p=[0.3, 0.5, 0.2])),
        shape_seed=int(rng.integers(2**31)),
    )


def _draw_calc(rng: np.random.Generator) -> FindingSpec:
    theta, rho = _draw_position(rng, rho_range=(0.2, 0.8))
    return FindingSpec(
        concept=CALC,
        theta=theta,
        rho=rho,
        size=float(rng.uniform(6.0, 13.0)),
        contrast=float(rng.uniform(0.35, 0.55)),
        shape="cluster",
        birads=int(rng.choice([3, 4, 5], p=[0.2, 0.6, 0.2])),
        shape_seed=int(rng.integers(2**31)),
    )


def _draw_position(rng: np.random.Generator, rho_range: tuple[float, float]) -> tuple[float, float]:
    return float(rng.uniform(-1.0, 1.1)), float(rng.uniform(*rho_range))


def plan(cfg: PhantomConfig) -> list[ImageSpec]:
    """Every per-patient and dataset-level decision; pixels come later from `render_image`."""
    validate(cfg)
    n_patients = _n_patients(cfg.n_images)
    rng = _rng(cfg.seed, 0)
    order = rng.permutation(n_patients)
    n_test = int(round(cfg.test_fraction * n_patients))
    if cfg.test_fraction > 0:
        n_test = min(max(n_test, 1), n_patients - 1)
    test_patients = set(int(p) for p in order[:n_test])
    fold_of = {int(p): rank % 4 for rank, p in enumerate(rng.permutation(n_patients))}
    split_of = {p: ("test" if p in test_patients else "training") for p in range(n_patients)}

    has: dict[str, set[int]] = {MASS: set(), CALC: set()}
    for split in ("training", "test"):
        members = [p for p in range(n_patients) if split_of[p] == split]
        has[MASS] |= _choose(rng, members, cfg.mass_prevalence)
        has[CALC] |= _choose(rng, members, cfg.calc_prevalence)

    specs: list[ImageSpec] = []
    for p in range(n_patients):
        prng = _rng(cfg.seed, 1, p)
        laterality = "L" if prng.random() < 0.5 else "R"
        density = int(prng.choice(4, p=DENSITY_PROBS))
        findings: list[FindingSpec] = []
        if p in has[MASS]:
            findings += [_draw_mass(prng) for _ in range(1 + int(prng.random() < 0.12))]
        if p in has[CALC]:
            findings += [_draw_calc(prng) for _ in range(1 + int(prng.random() < 0.1))]
        birads = max((f.birads for f in findings), default=int(prng.choice([1, 2], p=[0.6, 0.4])))
        series_id = _hex_id(cfg.seed, "series", p)
        for v, view in enumerate(("CC", "MLO")):
            index = 2 * p + v
            if index >= cfg.n_images:
                break
            specs.append(
                ImageSpec(
                    index=index,
                    image_id=_hex_id(cfg.seed, "image", index),
                    patient_id=_hex_id(cfg.seed, "patient", p),
                    series_id=series_id,
                    split=split_of[p],
                    fold=fold_of[p],
                    view=view,
                    laterality=laterality,
                    density=density,
                    breast_birads=birads,
                    findings=tuple(findings),
                    marker=False,
                )
            )
    return _assign_markers(specs, cfg, rng)


def _assign_markers(
    specs: list[ImageSpec], cfg: PhantomConfig, rng: np.random.Generator
) -> list[ImageSpec]:
    """Training: marker follows the chosen concept with the configured strength. Test: exactly
    the training marker rate within every (Mass, Calcification) label cell, so independent."""
    marked: set[int] = set()
    train = [s for s in specs if s.split == "training"]
    if cfg.confounder_concept == "none":
        marked |= _choose(rng, [s.index for s in train], 0.5)
    else:
        p_pos, p_neg = (1 + cfg.confounder_strength) / 2, (1 - cfg.confounder_strength) / 2
        marked |= _choose(rng, [s.index for s in train if s.label(cfg.confounder_concept)], p_pos)
        marked |= _choose(
            rng, [s.index for s in train if not s.label(cfg.confounder_concept)], p_neg
        )
    rate = len(marked) / len(train) if train else 0.5
    test = [s for s in specs if s.split == "test"]
    for cell in ((0, 0), (0, 1), (1, 0), (1, 1)):
        members = [s.index for s in test if (s.label(MASS), s.label(CALC)) == cell]
        exact = rate * len(members)
        k = int(math.floor(exact)) + int(rng.random() < exact - math.floor(exact))
        marked |= set(int(i) for i in rng.permutation(np.asarray(members, dtype=np.int64))[:k])
    return [
        dataclasses.replace(s, marker=s.index in marked, marker_size=cfg.marker_size) for s in specs
    ]


# --------------------------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class _Geometry:
    """Breast outline in the canonical frame (chest wall at x = 0, nipple towards +x)."""

    cy: float
    a: float  # extent towards the nipple
    b_up: float  # extent upwards (y < cy)
    b_down: float
    wobble: tuple[float, float, float, float]
    pectoral: tuple[float, float] | None  # (width at top, height at chest wall), MLO only

    def radius(self, theta: np.ndarray | float) -> np.ndarray:
        theta = np.asarray(theta, dtype=np.float32)
        b = np.where(theta < 0, self.b_up, self.b_down).astype(np.float32)
        r = 1.0 / np.sqrt((np.cos(theta) / self.a) ** 2 + (np.sin(theta) / b) ** 2)
        m1, p1, m2, p2 = self.wobble
        return r * (1 + m1 * np.sin(2 * theta + p1) + m2 * np.sin(3 * theta + p2))

    def point(self, theta: float, rho: float) -> tuple[float, float]:
        r = float(self.radius(theta)) * rho
        return r * math.cos(theta), self.cy + r * math.sin(theta)

    def in_pectoral(self, x: float, y: float, margin: float) -> bool:
        if self.pectoral is None:
            return False
        pw, ph = self.pectoral
        return x / pw + y / ph < 1.0 + margin


def _draw_geometry(rng: np.random.Generator, view: str, h: int, w: int) -> _Geometry:
    wobble = (
        float(rng.uniform(0, 0.03)),
        float(rng.uniform(0, 2 * np.pi)),
        float(rng.uniform(0, 0.02)),
        float(rng.uniform(0, 2 * np.pi)),
    )
    if view == "CC":
        b = h * rng.uniform(0.36, 0.44)
        return _Geometry(
            cy=h * rng.uniform(0.46, 0.54),
            a=w * rng.uniform(0.70, 0.86),
            b_up=b,
            b_down=b,
            wobble=wobble,
            pectoral=None,
        )
    return _Geometry(
        cy=h * rng.uniform(0.52, 0.60),
        a=w * rng.uniform(0.72, 0.86),
        b_up=h * rng.uniform(0.62, 0.72),
        b_down=h * rng.uniform(0.32, 0.38),
        wobble=wobble,
        pectoral=(w * rng.uniform(0.26, 0.40), h * rng.uniform(0.34, 0.46)),
    )


_FILTERS: dict[tuple[int, int, float, float], np.ndarray] = {}


def _powerlaw_noise(
    rng: np.random.Generator, h: int, w: int, beta: float = 2.7, stretch: float = 1.8
) -> np.ndarray:
    """Zero-mean, unit-std noise with power spectrum 1/f^beta (mammographic texture).

    `stretch` > 1 elongates structures along x, i.e. from the chest wall towards the nipple,
    like ducts and Cooper's ligaments. Frequencies are in cycles per reference pixel so the
    texture looks the same at every image size.
    """
    key = (h, w, beta, stretch)
    amp = _FILTERS.get(key)
    if amp is None:
        scale = math.sqrt(h * w / (REFERENCE_HW[0] * REFERENCE_HW[1]))
        fy = np.fft.fftfreq(h)[:, None] * scale
        fx = np.fft.rfftfreq(w)[None, :] * scale * stretch
        f = np.sqrt(fx**2 + fy**2)
        f[0, 0] = 1.0
        amp = (f ** (-beta / 2)).astype(np.float32)
        amp[0, 0] = 0.0
        _FILTERS[key] = amp
    white = rng.standard_normal((h, w), dtype=np.float32)
    field_hw = np.fft.irfft2(np.fft.rfft2(white) * amp, s=(h, w)).astype(np.float32)
    return field_hw / (field_hw.std() + 1e-8)


def _window(
    cx: float, cy: float, half: float, h: int, w: int
) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Pixel window around (cx, cy) clipped to the frame, with pixel-centre offsets dx, dy."""
    x0, x1 = max(int(math.floor(cx - half)), 0), min(int(math.ceil(cx + half)) + 1, w)
    y0, y1 = max(int(math.floor(cy - half)), 0), min(int(math.ceil(cy + half)) + 1, h)
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
    return slice(y0, y1), slice(x0, x1), dx, dy


def _mass_profile(
    f: FindingSpec, radius: float, scale: float, dx: np.ndarray, dy: np.ndarray
) -> np.ndarray:
    """Mass intensity profile in [0, 1] on a window (before the cut and breast mask)."""
    rng = np.random.default_rng(f.shape_seed)
    angle = rng.uniform(0, np.pi)
    aspect = rng.uniform(1.4, 1.9) if f.shape == "oval" else 1.0
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) * aspect
    r = np.sqrt(u**2 + v**2)
    phi = np.arctan2(v, u)
    rb = np.float32(radius / math.sqrt(aspect))
    if f.shape == "lobulated":
        k = int(rng.integers(3, 6))
        rb = rb * (
            1
            + 0.16 * np.sin(k * phi + rng.uniform(0, 6.3))
            + 0.07 * np.sin((k + 2) * phi + rng.uniform(0, 6.3))
        )
    elif f.shape == "spiculated":
        rb = rb * (1 + 0.05 * np.sin(5 * phi + rng.uniform(0, 6.3)))
    core = np.clip(1 - (r / rb) ** 2, 0, 1)
    core = core if f.shape == "spiculated" else np.sqrt(core)
    if f.shape != "spiculated":
        return core
    n_spicules = int(rng.integers(8, 17))
    psi = rng.uniform(0, 2 * np.pi, n_spicules).astype(np.float32)[:, None, None]
    length = (radius * rng.uniform(1.6, 2.6, n_spicules)).astype(np.float32)[:, None, None]
    half_width = max(0.9, 1.4 * scale)
    along = dx[None] * np.cos(psi) + dy[None] * np.sin(psi)
    across = np.abs(-dx[None] * np.sin(psi) + dy[None] * np.cos(psi))
    taper = np.clip(1 - along / length, 0, 1)
    spikes = np.clip(1 - across / (half_width * taper + 1e-3), 0, 1) * taper * (along > 0)
    return np.maximum(core, 0.75 * spikes.max(axis=0))


def _calc_profile(
    f: FindingSpec, radius: float, scale: float, dx: np.ndarray, dy: np.ndarray
) -> np.ndarray:
    """Several tiny bright specks (>= ~2 px across at any size), kept apart, in a small disc."""
    rng = np.random.default_rng(f.shape_seed)
    n = int(rng.integers(5, 15))
    speck_r = np.maximum(1.3, scale * rng.uniform(1.0, 1.6, n))
    weight = rng.uniform(0.6, 1.0, n)
    # At small image sizes the cluster must grow so that specks stay separate.
    radius = max(radius, 2.2 * float(speck_r.max()) * math.sqrt(n))
    centres: list[tuple[float, float, int]] = []
    for _ in range(40 * n):
        if len(centres) == n:
            break
        r_off, a_off = radius * math.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        cx, cy = r_off * math.cos(a_off), r_off * math.sin(a_off)
        i = len(centres)
        if all(
            math.hypot(cx - ox, cy - oy) > speck_r[i] + speck_r[j] + 1.5 for ox, oy, j in centres
        ):
            centres.append((cx, cy, i))
    out = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=np.float32)
    for cx, cy, i in centres:
        d2 = (dx - cx) ** 2 + (dy - cy) ** 2
        out = np.maximum(out, weight[i] * np.sqrt(np.clip(1 - d2 / speck_r[i] ** 2, 0, 1)))
    return out


def _calc_reach(radius: float, scale: float) -> float:
    """Half-width of the window that holds the whole cluster (mirrors _calc_profile's growth)."""
    return max(radius, 2.2 * max(1.3, 1.6 * scale) * math.sqrt(14)) + 2 * max(1.3, 1.6 * scale) + 2


def _bbox(mask: np.ndarray, concept: str, y_off: int = 0, x_off: int = 0) -> Box | None:
    """Tight box in pixel-edge coordinates: covers pixel (r, c) as [c, c+1) x [r, r+1)."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    r0, r1 = np.flatnonzero(rows)[[0, -1]]
    c0, c1 = np.flatnonzero(cols)[[0, -1]]
    return Box(
        concept, float(c0 + x_off), float(r0 + y_off), float(c1 + 1 + x_off), float(r1 + 1 + y_off)
    )


def render_image(
    spec: ImageSpec, height: int, width: int, seed: int, *, return_masks: bool = False
) -> RenderedImage:
    """Pixels and exact boxes of one image (deterministic in (seed, spec.index))."""
    h, w = height, width
    rng = _rng(seed, 2, spec.index)
    scale = math.sqrt(h * w / (REFERENCE_HW[0] * REFERENCE_HW[1]))
    geo = _draw_geometry(rng, spec.view, h, w)

    # Breast outline in polar coordinates around the chest-wall anchor (canonical: wall at x=0).
    x = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    y = (np.arange(h, dtype=np.float32) + 0.5)[:, None] - np.float32(geo.cy)
    r = np.sqrt(x**2 + y**2)
    theta = np.arctan2(y, x)
    rb = geo.radius(theta)
    rho = r / rb
    edge = rb - r  # ~ pixels inside the skin
    nipple_theta = 0.0 if spec.view == "CC" else float(rng.uniform(0.05, 0.2))
    nx, ny = geo.point(nipple_theta, 1.0)
    nipple_r = float(rng.uniform(4.0, 7.0)) * scale
    nipple_edge = nipple_r - np.sqrt((x - nx) ** 2 + (y + geo.cy - ny) ** 2)
    edge = np.maximum(edge, nipple_edge)
    breast = np.clip(edge + 0.5, 0, 1)  # anti-aliased mask

    # Tissue: fat with thickness fall-off to the skin, plus fibroglandular texture by density.
    thick = np.clip(edge / (0.10 * geo.a), 0, 1)
    thick = thick * (2 - thick)
    texture = _powerlaw_noise(rng, h, w)
    fraction = float(np.clip(DENSITY_FRACTION[spec.density] * rng.uniform(0.85, 1.15), 0.02, 0.95))
    threshold = NormalDist().inv_cdf(1 - fraction)
    gland = 1 / (1 + np.exp(-(texture - threshold) / 0.35))
    envelope = np.clip((0.95 - rho) / 0.3, 0, 1) * thick
    gland_term = GLAND_LEVEL * gland * envelope
    tissue = 0.19 + 0.13 * thick + 0.025 * texture * thick + gland_term
    skin_w = 1.5 * scale + 0.5
    tissue += 0.08 * np.clip(1 - edge / skin_w, 0, 1)
    if geo.pectoral is not None:
        pw, ph = geo.pectoral
        q = x / pw + (y + geo.cy) / ph
        muscle = np.clip((1 - q) * min(pw, ph) / (1.5 * scale) + 0.5, 0, 1)
        tissue = (
            tissue * (1 - muscle) + (0.64 + 0.12 * np.clip(1 - q, 0, 1) + 0.02 * texture) * muscle
        )
        breast = np.maximum(breast, muscle)
    # The nipple is the densest anatomy in every image: it sets the intensity ceiling below,
    # which leaves headroom for findings brighter than fibroglandular tissue.
    nipple = np.clip(nipple_edge / (0.5 * nipple_r), 0, 1)
    tissue = tissue * (1 - nipple) + NIPPLE_LEVEL * nipple
    img = BACKGROUND_LEVEL + (tissue - BACKGROUND_LEVEL) * breast

    # Acquisition noise (signal-dependent, set by the anatomy). The final image is clipped to
    # the brightest anatomy pixel, so findings and the marker never change the image's min or
    # max: a per-image min-max normalisation carries no global cue about them.
    noise = rng.standard_normal((h, w), dtype=np.float32) * (
        0.010 + 0.012 * np.sqrt(np.clip(img, 0, 1))
    )
    ceiling = min(float((img + noise).max()), 1.0)

    # Planted findings: profiles cut at PROFILE_CUT so the box covers every changed pixel.
    finding_boxes: list[Box] = []
    finding_masks: list[np.ndarray] = []
    for f in spec.findings:
        theta_f = f.theta
        fx, fy = geo.point(theta_f, f.rho)
        if geo.in_pectoral(fx, fy, margin=0.15):
            theta_f = abs(theta_f) + 0.2  # below the muscle instead
            fx, fy = geo.point(theta_f, f.rho)
        radius = f.size * scale
        if f.concept == CALC:
            reach = _calc_reach(radius, scale)
        else:
            reach = radius * (3.7 if f.shape == "spiculated" else 1.1) + 2
        rows, cols, dx, dy = _window(fx, fy, reach, h, w)
        profile = (_calc_profile if f.concept == CALC else _mass_profile)(f, radius, scale, dx, dy)
        profile = profile * (breast[rows, cols] > 0.5)
        profile = np.where(profile >= PROFILE_CUT, profile, 0).astype(np.float32)
        if f.concept == MASS:
            # A mass is a homogeneous lump denser than fibroglandular tissue: it replaces the
            # local texture and stands `contrast` above the dense-tissue level.
            img[rows, cols] += profile * (GLAND_LEVEL + f.contrast - gland_term[rows, cols])
        else:
            img[rows, cols] += f.contrast * profile
        box = _bbox(profile > 0, f.concept, rows.start, cols.start)
        if box is None:  # cannot happen for positions inside the breast; keep the row honest
            raise AssertionError(f"finding {f} vanished in image {spec.image_id}")
        finding_boxes.append(box)
        if return_masks:
            full = np.zeros((h, w), dtype=bool)
            full[rows, cols] = profile > 0
            finding_masks.append(full)

    img = np.clip(img + noise, 0, ceiling)  # background clips to 0 somewhere

    # Marker: after the noise, below the image maximum so per-image min-max is unchanged by it.
    marker_box = None
    marker_mask = None
    if spec.marker:
        marker_box, marker_mask = _stamp_marker(rng, img, breast, scale, ceiling, spec.marker_size)

    if spec.laterality == "R":  # chest wall on the right
        img = img[:, ::-1]
        breast = breast[:, ::-1]
        finding_boxes = [_flip_box(b, w) for b in finding_boxes]
        finding_masks = [m[:, ::-1] for m in finding_masks]
        marker_box = _flip_box(marker_box, w) if marker_box else None
        marker_mask = marker_mask[:, ::-1] if marker_mask is not None else None
    pixels = np.ascontiguousarray(np.rint(img * 255).astype(np.uint8))
    return RenderedImage(
        pixels_hw=pixels,
        finding_boxes=finding_boxes,
        marker_box=marker_box,
        finding_masks=finding_masks if return_masks else [],
        marker_mask=marker_mask if return_masks else None,
        breast_mask_hw=np.ascontiguousarray(breast > 0.5) if return_masks else None,
    )


def _stamp_marker(
    rng: np.random.Generator,
    img: np.ndarray,
    breast: np.ndarray,
    scale: float,
    vmax: float,
    marker_size: float,
) -> tuple[Box, np.ndarray]:
    """A bright square tag with a dark core in a background corner away from the chest wall.

    Its brightness stays below `vmax`, the image's ceiling, so the image maximum (and so a
    per-image min-max normalisation) does not depend on whether the marker is there.
    """
    h, w = img.shape
    side = max(5, int(round(rng.uniform(marker_size - 3, marker_size + 3) * scale)))
    clearance = max(2, int(round(3 * scale)))
    corners = ["top", "bottom"]
    rng.shuffle(corners)
    for attempt in range(40):
        corner = corners[attempt % 2]
        x0 = int(w - side - round(rng.uniform(0.02, 0.12) * w))
        y0 = (
            int(round(rng.uniform(0.02, 0.08) * h))
            if corner == "top"
            else int(h - side - round(rng.uniform(0.02, 0.08) * h))
        )
        if x0 < 0 or y0 < 0 or x0 + side > w or y0 + side > h:
            continue
        ys = slice(max(y0 - clearance, 0), min(y0 + side + clearance, h))
        xs = slice(max(x0 - clearance, 0), min(x0 + side + clearance, w))
        if breast[ys, xs].max() < 0.01:
            break
    else:  # the outline never reaches the far corners; fail loudly if that ever changes
        raise AssertionError("no background corner free for the marker")
    tag = np.full((side, side), 0.92 * vmax, dtype=np.float32)
    core = max(1, side // 4)
    tag[core : side - core, core : side - core] = 0.45 * vmax
    tag += rng.normal(0, 0.01, tag.shape).astype(np.float32)
    img[y0 : y0 + side, x0 : x0 + side] = np.clip(tag, 0, vmax)
    mask = np.zeros((h, w), dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return Box("confounder", float(x0), float(y0), float(x0 + side), float(y0 + side)), mask


def _flip_box(box: Box, width: int) -> Box:
    return Box(box.concept, width - box.x1, box.y0, width - box.x0, box.y1)


# --------------------------------------------------------------------------------------------
# writing


def image_path(out: Path, spec: ImageSpec) -> Path:
    return out / IMAGE_DIR / spec.patient_id / f"{spec.image_id}.png"


def _encode_png(pixels_hw: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", pixels_hw, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise DataError("PNG encoding failed")
    return buf.tobytes()


def _render_and_write(
    job: tuple[ImageSpec, int, int, int, str],
) -> tuple[int, list[Box], Box | None]:
    spec, h, w, seed, out = job
    rendered = render_image(spec, h, w, seed)
    path = image_path(Path(out), spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic rename but no fsync per image: the CSV, written last, marks a finished dataset.
    with atomic_path(path) as tmp:
        tmp.write_bytes(_encode_png(rendered.pixels_hw))
    return spec.index, rendered.finding_boxes, rendered.marker_box


def _csv_rows(
    spec: ImageSpec, h: int, w: int, boxes: list[Box], marker: Box | None
) -> list[dict[str, Any]]:
    base: dict[str, Any] = {
        "patient_id": spec.patient_id,
        "series_id": spec.series_id,
        "image_id": f"{spec.image_id}.png",
        "laterality": spec.laterality,
        "view": spec.view,
        "height": h,
        "width": w,
        "breast_birads": f"BI-RADS {spec.breast_birads}",
        "breast_density": DENSITY_NAMES[spec.density],
        "split": spec.split,
        "fold": spec.fold,
        "density": spec.density,
        "confounder": int(marker is not None),
        "confounder_xmin": marker.x0 if marker else np.nan,
        "confounder_ymin": marker.y0 if marker else np.nan,
        "confounder_xmax": marker.x1 if marker else np.nan,
        "confounder_ymax": marker.y1 if marker else np.nan,
    }
    rows = []
    pairs: Iterable[tuple[FindingSpec | None, Box | None]] = (
        zip(spec.findings, boxes) if spec.findings else [(None, None)]
    )
    for finding, box in pairs:
        row = dict(base)
        concept = finding.concept if finding else "No_Finding"
        row.update({c: int(c == concept) for c in FINDING_CONCEPTS})
        if finding is None or box is None:
            row.update(finding_categories="['No Finding']", finding_birads=np.nan)
            coords = (np.nan,) * 4
        else:
            row.update(
                finding_categories=f"['{CATEGORY_NAME[concept]}']",
                finding_birads=f"BI-RADS {finding.birads}",
            )
            coords = (box.x0, box.y0, box.x1, box.y1)
        for prefix in ("", "resized_"):
            row.update(
                {f"{prefix}{k}": v for k, v in zip(("xmin", "ymin", "xmax", "ymax"), coords)}
            )
        rows.append(row)
    return rows


def _content_params(cfg: PhantomConfig) -> dict[str, Any]:
    return result_settings(cfg)


def _check_out_dir(cfg: PhantomConfig, params: dict[str, Any]) -> bool:
    """True when `out` already holds exactly this phantom; raise if it holds something else."""
    out = Path(cfg.out)
    meta_path, csv_path = out / JSON_NAME, out / CSV_NAME
    if not meta_path.exists():
        if csv_path.exists():
            raise DataError(
                f"{out} already has {CSV_NAME} but no {JSON_NAME}: not a phantom; "
                "choose an empty directory"
            )
        return False
    old = read_json(meta_path)
    if old.get("params") == params and old.get("version") == __version__ and csv_path.exists():
        if old.get("n_files") and all(
            (out / IMAGE_DIR / rel).is_file() for rel in old.get("files", [])
        ):
            return True
    if not cfg.overwrite:
        changed = sorted(
            k
            for k in set(params) | set(old.get("params", {}))
            if params.get(k) != old.get("params", {}).get(k)
        )
        raise DataError(
            f"{out} holds a phantom made with other settings "
            f"(differs in: {', '.join(changed) or 'version or files'}); pass --overwrite or choose another --out"
        )
    return False


def generate(cfg: PhantomConfig, *, progress: bool = True) -> dict[str, Any]:
    """Write the phantom dataset to `cfg.out` and return a summary (also in phantom.json).

    A directory that already holds the same phantom is left as it is (the summary says
    `"cached": true`).
    """
    from tqdm import tqdm

    validate(cfg)
    out = Path(cfg.out)
    params = _content_params(cfg)
    if _check_out_dir(cfg, params):
        summary = read_json(out / JSON_NAME)["summary"]
        if cfg.figure is not None:
            save_figure(out, cfg.figure)
        return {**summary, "cached": True}
    if (out / JSON_NAME).exists():  # ours (checked above): replace it
        (out / JSON_NAME).unlink()
        shutil.rmtree(out / IMAGE_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    specs = plan(cfg)
    h, w = cfg.height, cfg.width
    jobs = [(s, h, w, cfg.seed, str(out)) for s in specs]
    workers = cfg.workers or (os.cpu_count() or 1)
    results: dict[int, tuple[list[Box], Box | None]] = {}
    bar = tqdm(total=len(jobs), desc="phantom", unit="img", disable=not progress)
    if workers == 1 or len(jobs) < 8:
        for job in jobs:
            idx, boxes, marker = _render_and_write(job)
            results[idx] = (boxes, marker)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for idx, boxes, marker in pool.map(_render_and_write, jobs, chunksize=8):
                results[idx] = (boxes, marker)
                bar.update()
    bar.close()

    import pandas as pd

    rows = [row for s in specs for row in _csv_rows(s, h, w, *results[s.index])]
    frame = pd.DataFrame(rows, columns=list(PHANTOM_COLUMNS))
    summary = _summary(specs, frame)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "generator": "mammo_sae.data.phantom",
        "version": __version__,
        "height": h,
        "width": w,
        "seed": cfg.seed,
        "params": params,
        "planted_concepts": list(PLANTED_CONCEPTS),
        "box_convention": "pixel edges: a box [x0, x1) x [y0, y1) covers every pixel the finding changed",
        "summary": summary,
        "n_files": len(specs),
        "files": [f"{s.patient_id}/{s.image_id}.png" for s in specs],
    }
    write_text_atomic(
        out / CSV_NAME, frame.to_csv(index=False, lineterminator="\n", float_format="%.1f")
    )
    write_json(out / JSON_NAME, meta)
    if cfg.figure is not None:
        save_figure(out, cfg.figure)
    return {**summary, "cached": False}


def _summary(specs: list[ImageSpec], frame: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for split in ("training", "test"):
        part = [s for s in specs if s.split == split]
        summary[split] = {
            "images": len(part),
            "patients": len({s.patient_id for s in part}),
            "rows": int((frame["split"] == split).sum()),
            **{f"images_{c}": sum(s.label(c) for s in part) for c in PLANTED_CONCEPTS},
            "images_confounder": sum(s.marker for s in part),
        }
    return summary


# --------------------------------------------------------------------------------------------
# figure


def save_figure(data_dir: Path, path: Path, n: int = 8) -> Path:
    """Grid of phantom images with Mass (red), calcification (yellow) and marker (cyan) boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.patches import Rectangle

    from .images import read_image

    data_dir = Path(data_dir)
    frame = pd.read_csv(
        data_dir / CSV_NAME, dtype={"finding_birads": str, "patient_id": str, "image_id": str}
    )
    for column in ("patient_id", "image_id"):  # joined into the image paths below
        check_ids(frame[column], column, data_dir / CSV_NAME)
    by_image = frame.groupby("image_id", sort=False)
    wanted = [  # one of each kind first, then fill
        lambda g: g["Mass"].any() and g["confounder"].iloc[0] == 1,
        lambda g: g["Suspicious_Calcification"].any(),
        lambda g: g["Mass"].any() and g["Suspicious_Calcification"].any(),
        lambda g: g["view"].iloc[0] == "MLO" and g["Mass"].any(),
        lambda g: g["No_Finding"].all() and g["confounder"].iloc[0] == 1,
        lambda g: g["density"].iloc[0] == 0,
        lambda g: g["density"].iloc[0] == 3,
        lambda g: g["laterality"].iloc[0] == "R" and g["view"].iloc[0] == "MLO",
    ]
    chosen: list[str] = []
    for test in wanted:
        for image_id, g in by_image:
            if image_id not in chosen and test(g):
                chosen.append(image_id)
                break
    for image_id, _ in by_image:
        if len(chosen) >= n:
            break
        if image_id not in chosen:
            chosen.append(image_id)
    chosen = chosen[:n]
    colours = {"Mass": "red", "Suspicious_Calcification": "yellow", "confounder": "cyan"}
    n_cols = min(4, len(chosen))
    n_rows = -(-len(chosen) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 4.3 * n_rows), squeeze=False)
    for ax in axes.flat[len(chosen) :]:
        ax.axis("off")
    for ax, image_id in zip(axes.flat, chosen):
        g = by_image.get_group(image_id)
        first = g.iloc[0]
        pixels = read_image(data_dir / IMAGE_DIR / first["patient_id"] / image_id)
        ax.imshow(pixels, cmap="gray", vmin=0, vmax=255)
        for _, row in g.iterrows():
            for concept in ("Mass", "Suspicious_Calcification"):
                if row[concept] == 1:
                    _draw_box(
                        ax,
                        Rectangle,
                        row["resized_xmin"],
                        row["resized_ymin"],
                        row["resized_xmax"],
                        row["resized_ymax"],
                        colours[concept],
                    )
        if first["confounder"] == 1:
            _draw_box(
                ax,
                Rectangle,
                first["confounder_xmin"],
                first["confounder_ymin"],
                first["confounder_xmax"],
                first["confounder_ymax"],
                colours["confounder"],
            )
        ax.set_title(
            f"{first['laterality']}-{first['view']} {first['breast_density'][-1]} "
            f"{'train' if first['split'] == 'training' else 'test'}",
            fontsize=8,
        )
        ax.axis("off")
    fig.suptitle(
        "phantom: Mass (red), Suspicious Calcification (yellow), marker = confounder (cyan)",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def _draw_box(
    ax: Any, rect_cls: Any, x0: float, y0: float, x1: float, y1: float, colour: str
) -> None:
    ax.add_patch(
        rect_cls(
            (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=0.9
        )
    )
