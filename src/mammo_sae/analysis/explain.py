"""Explain single images: a classifier's concept score, decomposed over SAE latents.

For each image the classifier gives its logit; the SAE encodes every position of the final map,
and by the pooled identity (docs/architecture.md, `intervene.sae_readout`)

    SAE logit = Σ_j v_j · mean_hw(z_j) + c,    v = W_decᵀ w,  c = w · b_dec + b

so latent j *contributes* `v_j · mean activation_j` to the logit (sign kept), and the
contributions of all latents plus the constant c add up to the logit of the SAE-reconstructed
map. The top latents by |contribution| and by mean activation get a heatmap (`maps.upsample` +
`figures.save_panel_grid`) and their off-breast share (activation mass on cells the breast mask
covers less than half, the `summaries` definition). Inputs are prepared as the model saw its
training data: a PNG goes through `to_model_input`; a DICOM first through `preprocess`'s
Mammo-CLIP steps (border crop, MONOCHROME1 inversion, min-max to uint8, breast crop, resize to
the PNG frame), exactly the PNG `ingest` / `preprocess` would write.

What comes out is the model's view of the image, not a diagnosis.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, MammoSaeError
from ..protocols import SAELike

SCHEMA_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
VERDICT = (
    "This is what one model computes from the pixels, not a diagnosis: the score is the "
    "classifier's estimate for one concept, the latents are the SAE's reading of its "
    "features. It has not been validated for clinical use."
)
DEFAULT_FRAME_HW = (1520, 912)  # Mammo-CLIP's PNG frame (preprocess / ingest default)


@dataclass
class Explainer:
    """A classifier + SAE pair ready to explain images."""

    classifier: Any
    sae: SAELike
    v_h: np.ndarray  # float64 (h,): logit weight of each latent's mean
    c: float  # constant of the SAE logit
    size_hw: tuple[int, int]  # model input size
    device: torch.device
    frame_hw: tuple[int, int] = DEFAULT_FRAME_HW  # PNG frame a DICOM is converted to first
    crop: bool = True  # DICOM breast crop
    concept: str | None = None
    latent_names: dict[int, str] = field(default_factory=dict)
    class_top: dict[str, list[int]] = field(default_factory=dict)  # "0"/"1" -> top-10 latents

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str],
        sae: str | os.PathLike[str],
        *,
        size_hw: tuple[int, int],
        device: torch.device,
        **kw: Any,
    ) -> Explainer:
        from ..models.checkpoints import load_classifier
        from ..sae.checkpoints import load_sae
        from .intervene import head_from_classifier, sae_readout

        clf = load_classifier(model).to(device).to(memory_format=torch.channels_last).eval()
        ae = load_sae(sae, device)
        head = head_from_classifier(clf)
        if ae.d != clf.encoder.out_channels:
            raise MammoSaeError(
                f"SAE {sae} reads d = {ae.d} features but classifier {model} has "
                f"{clf.encoder.out_channels} channels (wrong model/SAE pair?)"
            )
        v_h, c = sae_readout(ae, head)
        return cls(clf, ae, v_h, c, size_hw, device, concept=head.concept, **kw)


# ---------------------------------------------------------------------------- inputs


def find_images(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Image files among `paths`; folders are searched recursively (PNG/JPEG/TIFF by suffix,
    DICOM by suffix or magic, hidden entries skipped)."""
    from ..data.images import is_dicom

    if not paths:
        raise DataError("no images given: pass image files or folders")
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    f = Path(dirpath) / name
                    if name.startswith("."):
                        continue
                    if f.suffix.lower() in IMAGE_SUFFIXES or is_dicom(f):
                        found.append(f)
        else:
            raise DataError(f"not found: {p}")
    if not found:
        raise DataError(f"no PNG/JPEG/TIFF or DICOM files in {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def model_input(
    path: Path,
    size_hw: tuple[int, int],
    *,
    frame_hw: tuple[int, int] = DEFAULT_FRAME_HW,
    crop: bool = True,
) -> tuple[torch.Tensor, str]:
    """(x_3hw, "dicom" | "image"): the encoder input of one file."""
    import cv2

    from ..data.images import is_dicom, read_dicom, read_image, to_model_input
    from ..data.preprocess import mammo_clip_u8

    if is_dicom(path):
        raw, photometric = read_dicom(path, invert_monochrome1=False)
        u8, _, _ = mammo_clip_u8(raw, photometric, path, crop=crop)
        png = cv2.resize(u8, (frame_hw[1], frame_hw[0]), interpolation=cv2.INTER_AREA)
        return to_model_input(png, size_hw), "dicom"
    return to_model_input(read_image(path), size_hw), "image"


def _display(x_3hw: torch.Tensor) -> np.ndarray:
    """The model input in [0, 1] (min-max of the normalised channel), as figures show it."""
    arr = x_3hw[0].numpy()
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


# ---------------------------------------------------------------------------- the numbers


@torch.inference_mode()
def explain_batch(
    ex: Explainer, x_b3hw: torch.Tensor
) -> list[tuple[float, np.ndarray, torch.Tensor]]:
    """Per image: (classifier logit, mean latent vector float64, codes (gh, gw, h) on the CPU)."""
    x = x_b3hw.to(ex.device).contiguous(memory_format=torch.channels_last)
    fmap = ex.classifier.features(x).float()  # (B, C, gh, gw)
    logits = ex.classifier.logits_from_map(fmap).double()
    logit_b = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
    b, ch, gh, gw = fmap.shape
    z = ex.sae.encode(fmap.permute(0, 2, 3, 1).reshape(-1, ch)).float().reshape(b, gh, gw, -1)
    mean_bh = z.sum(dim=(1, 2), dtype=torch.float64) / (gh * gw)
    return [(float(logit_b[i]), mean_bh[i].cpu().numpy(), z[i].cpu()) for i in range(b)]


def off_breast_share(z_hwl: torch.Tensor, display_hw: np.ndarray) -> np.ndarray:
    """Share of each chosen latent's activation mass on cells less than half covered by the
    breast mask (NaN for a latent silent on the image)."""
    from ..activations.extract import tissue_grid
    from ..data.images import breast_mask
    from .summaries import OFF_BREAST_TISSUE

    gh, gw, _ = z_hwl.shape
    tissue = tissue_grid(torch.from_numpy(breast_mask(display_hw)), (gh, gw)).numpy()
    off = tissue < OFF_BREAST_TISSUE
    z = z_hwl.numpy().astype(np.float64)
    total = z.sum(axis=(0, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = z[off].sum(axis=0) / total
    share[~(total > 0)] = np.nan
    return share


def top_latents(values_h: np.ndarray, k: int, *, by_abs: bool) -> np.ndarray:
    """Indices of the k largest (|values| when by_abs), ties by index; zeros are left out."""
    key = np.abs(values_h) if by_abs else values_h
    order = np.lexsort((np.arange(len(key)), -key))
    return np.asarray([j for j in order[:k] if key[j] > 0], dtype=np.int64)


# ---------------------------------------------------------------------------- outputs


def read_latent_names(path: str | os.PathLike[str]) -> dict[int, str]:
    """CSV `latent,name` (header optional) -> {latent: name}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"latent names file not found: {path}")
    names: dict[int, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or (i == 0 and row[0].strip().lower() == "latent"):
                continue
            if len(row) < 2 or not row[0].strip().isdigit():
                raise DataError(f"{path}: line {i + 1} is not `latent,name`: {row!r}")
            names[int(row[0])] = row[1].strip()
    return names


def _latent_entry(
    ex: Explainer, j: int, res: dict[str, Any], off: float, z_max: float
) -> dict[str, Any]:
    entry = {
        "latent": int(j),
        "activation": float(res["mean_h"][j]),
        "max_activation": z_max,
        "contribution": float(res["contrib_h"][j]),
        "off_breast": None if not np.isfinite(off) else float(off),
    }
    if j in ex.latent_names:
        entry["name"] = ex.latent_names[j]
    classes = [cls for cls, lats in sorted(ex.class_top.items()) if j in lats]
    if ex.class_top:
        entry["class_top10"] = classes
    return entry


def _heatmap(
    ex: Explainer, display_hw: np.ndarray, map_hw: np.ndarray, entry: dict[str, Any], path: Path
) -> None:
    from .figures import LatentPanel, panel_title, save_panel_grid
    from .maps import upsample

    title = panel_title(entry["latent"], entry["activation"])
    if entry.get("name"):
        title = f"{entry['name']}\n{title}"
    title += f"\ncontrib {entry['contribution']:+.3g}"
    empty = np.zeros((0, 4))
    panel = LatentPanel(display_hw, upsample(map_hw, ex.size_hw), empty, empty, title)
    save_panel_grid([[panel]], path, panel_inches=(2.2, 3.4))


def write_thumbnail(display_hw: np.ndarray, path: Path) -> None:
    import cv2

    from ..io import write_bytes_atomic

    ok, buf = cv2.imencode(".png", np.round(display_hw * 255).astype(np.uint8))
    if not ok:
        raise MammoSaeError(f"could not encode {path}")
    write_bytes_atomic(path, buf.tobytes())


def explain_images(
    ex: Explainer,
    paths: Sequence[Path],
    out: Path,
    *,
    top: int = 5,
    batch_size: int = 4,
    heatmaps: bool = True,
    on_error: str = "error",
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Explain every image; writes `out/explain.json`, `out/index.html` and `out/images/`."""
    from tqdm import tqdm

    from ..io import write_json

    out = Path(out)
    entries: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    bar = tqdm(total=len(paths), desc="explain", unit="img", disable=not progress)
    for batch in _batches(list(paths), batch_size):
        inputs = []
        for p in batch:
            try:
                x, kind = model_input(p, ex.size_hw, frame_hw=ex.frame_hw, crop=ex.crop)
                inputs.append((p, x, kind))
            except DataError as exc:
                if on_error == "error":
                    raise DataError(
                        f"{exc} (--on-error skip leaves unreadable images out)"
                    ) from exc
                errors.append({"image": str(p), "error": str(exc)})
                bar.update()
        if not inputs:
            continue
        outputs = explain_batch(ex, torch.stack([t for _, t, _ in inputs]))
        for (p, x, kind), (logit, mean_h, z_hwl) in zip(inputs, outputs, strict=True):
            folder = out / "images" / f"{len(entries):05d}"
            entries.append(_one(ex, p, kind, x, logit, mean_h, z_hwl, folder, out, top, heatmaps))
            bar.update()
    bar.close()
    result = {
        "schema_version": SCHEMA_VERSION,
        "note": VERDICT,
        "concept": ex.concept,
        "image_size": list(ex.size_hw),
        "dicom_frame": list(ex.frame_hw),
        "dicom_crop": ex.crop,
        "device": str(ex.device),
        "constant": ex.c,
        "n_latents": int(len(ex.v_h)),
        "top": top,
        "class_top10": ex.class_top or None,
        **(meta or {}),
        "images": entries,
        "errors": errors,
    }
    write_json(out / "explain.json", result)
    write_index(result, out)
    return result


def _batches(items: list[Path], n: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), max(1, n)):
        yield items[i : i + n]


def _one(
    ex: Explainer,
    path: Path,
    kind: str,
    x_3hw: torch.Tensor,
    logit: float,
    mean_h: np.ndarray,
    z_hwl: torch.Tensor,
    folder: Path,
    out: Path,
    top: int,
    heatmaps: bool,
) -> dict[str, Any]:
    contrib_h = ex.v_h * mean_h
    res = {"mean_h": mean_h, "contrib_h": contrib_h}
    by_contrib = top_latents(contrib_h, top, by_abs=True)
    by_act = top_latents(mean_h, top, by_abs=False)
    chosen = np.asarray(
        list(dict.fromkeys([*by_contrib.tolist(), *by_act.tolist()])), dtype=np.int64
    )
    display = _display(x_3hw)
    z_sel = z_hwl[:, :, torch.from_numpy(chosen)] if len(chosen) else z_hwl[:, :, :0]
    off = off_breast_share(z_sel, display)
    z_max = z_sel.amax(dim=(0, 1)).numpy() if len(chosen) else np.zeros(0)
    detail = {
        int(j): _latent_entry(ex, int(j), res, float(off[i]), float(z_max[i]))
        for i, j in enumerate(chosen)
    }
    thumb = folder / "input.png"
    write_thumbnail(display, thumb)
    if heatmaps:
        for i, j in enumerate(chosen):
            target = folder / f"latent_{int(j)}.png"
            _heatmap(ex, display, z_sel[:, :, i].numpy(), detail[int(j)], target)
            detail[int(j)]["heatmap"] = target.relative_to(out).as_posix()
    score = 1.0 / (1.0 + np.exp(-logit))
    return {
        "image": str(path),
        "kind": kind,
        "score": float(score),
        "logit": logit,
        "sae_logit": float(contrib_h.sum() + ex.c),
        "thumbnail": thumb.relative_to(out).as_posix(),
        "top_latents": [detail[int(j)] for j in by_contrib],
        "top_by_activation": [detail[int(j)] for j in by_act],
    }


# ---------------------------------------------------------------------------- run directories


def run_model(
    run: Path, model_name: str
) -> tuple[Path, Path, dict[str, list[int]], dict[str, Any]]:
    """(classifier, SAE, class top-10 latents, facts) of a `mammo-sae run` directory's model."""
    from ..io import read_json
    from ..layout import ModelEntry, RunLayout
    from .probe import RANKING_PREFERENCE, ranking_file_name, read_ranking

    layout = RunLayout(run)
    models_json = layout.models_json
    if not models_json.is_file():
        raise MammoSaeError(f"{run} is not a finished run directory: {models_json} is missing")
    models = {m["name"]: m for m in read_json(models_json)["models"]}
    if model_name not in models:
        from ..errors import choices_message

        raise MammoSaeError(choices_message("model", model_name, sorted(models)))
    sae_dirs = [
        p.parent for p in sorted(layout.sae_dir.rglob("cfg.json")) if "summaries" not in p.parts
    ]
    if not sae_dirs:
        raise MammoSaeError(f"no SAE checkpoint (cfg.json) under {layout.sae_dir}")
    class_top: dict[str, list[int]] = {}
    probe = layout.model_analysis_dir("probe", model_name)
    for score in RANKING_PREFERENCE:
        files = {cls: probe / ranking_file_name(int(cls), score) for cls in ("0", "1")}
        if all(f.is_file() for f in files.values()):
            class_top = {cls: read_ranking(f)[0][:10] for cls, f in files.items()}
            break
    # models.json records the classifier relative to the run: usable from any working directory.
    classifier = ModelEntry.from_record(models[model_name], run).classifier
    return Path(classifier), sae_dirs[0], class_top, models[model_name]


def run_frames(run: Path) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(model input size, PNG frame of the run's data) from RUN/config.yaml and the data's
    phantom.json / preprocess.json / ingest.json; None where the run does not say."""
    from ..config import load_yaml
    from ..data.vindr import _frame_from_meta
    from ..layout import RunLayout

    cfg_path = RunLayout(run).config
    cfg = load_yaml(cfg_path) if cfg_path.is_file() else {}
    data = (cfg or {}).get("data") or {}
    size = data.get("image_size")
    phantom = data.get("kind", "phantom") == "phantom"
    data_dir = RunLayout(run).data_dir if phantom else Path(data.get("path") or "")
    if data_dir.is_file():
        data_dir = data_dir.parent
    frame = _frame_from_meta(data_dir) if data_dir.is_dir() else None
    return (tuple(int(v) for v in size) if size else None), frame  # type: ignore[return-value]


# ---------------------------------------------------------------------------- HTML


def write_index(result: dict[str, Any], out: Path) -> Path:
    """`out/index.html`: static and offline, one section per image (thumbnail, scores, the
    top-latent table, a heatmap per latent)."""
    from .. import html_blocks as H
    from ..io import write_text_atomic

    sections = []
    intro = H.Section("about", "About")
    intro.add(f'<p class="flag">{H.esc(result["note"])}</p>')
    facts = {
        k: result.get(k)
        for k in (
            "model",
            "model_name",
            "sae",
            "concept",
            "image_size",
            "dicom_crop",
            "device",
            "constant",
        )
    }
    intro.add(
        H.table(
            [
                {"field": k, "value": "x".join(map(str, v)) if isinstance(v, list) else v}
                for k, v in facts.items()
                if v is not None
            ],
            ["field", "value"],
            left=2,
        )
    )
    intro.add(
        H.note(
            "contribution = v_j · mean activation_j (v = SAE decoder direction · head "
            "weight); contributions over all latents + constant = SAE logit. off-breast = "
            "share of the latent's activation on cells outside the breast mask."
        )
    )
    if result.get("errors"):
        intro.add(H.table(result["errors"], ["image", "error"], left=2))
    sections.append(intro)
    for i, img in enumerate(result["images"]):
        s = H.Section(f"img{i}", Path(img["image"]).name)
        s.add(H.note(img["image"]))
        s.add(H.figure(img["thumbnail"], "model input", width=200))
        s.add(
            H.kpis(
                {
                    "score (probability)": img["score"],
                    "logit": img["logit"],
                    "SAE logit": img["sae_logit"],
                }
            )
        )
        s.add(H.note("A model's view of this image, not a diagnosis."))
        for title, key in (
            ("Top latents by contribution to the logit", "top_latents"),
            ("Top latents by mean activation", "top_by_activation"),
        ):
            s.add(f"<h3>{H.esc(title)}</h3>")
            rows = [
                {
                    "latent": e["latent"],
                    "name": e.get("name", ""),
                    "class top-10": ",".join(e.get("class_top10", [])),
                    "contribution": e["contribution"],
                    "mean activation": e["activation"],
                    "max activation": e["max_activation"],
                    "off-breast": e["off_breast"],
                }
                for e in img[key]
            ]
            s.add(
                H.table(
                    rows,
                    [
                        "latent",
                        "name",
                        "class top-10",
                        "contribution",
                        "mean activation",
                        "max activation",
                        "off-breast",
                    ],
                    left=3,
                )
            )
        shown = {e["latent"]: e for e in [*img["top_latents"], *img["top_by_activation"]]}
        s.add(
            "".join(
                H.figure(e["heatmap"], f"latent {j}", width=220)
                for j, e in shown.items()
                if e.get("heatmap")
            )
        )
        sections.append(s)
    path = Path(out) / "index.html"
    title = f"mammo-sae explain: {result.get('concept') or 'concept'}"
    write_text_atomic(path, H.page(title, result["note"], sections))
    return path
