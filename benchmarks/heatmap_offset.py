"""Where do heatmaps peak relative to the planted lesion? Median offsets per concept on a run.

For every model of a finished run (default `runs/demo`, from `make demo`) and every positive
image of the evaluation split: the peak of the classifier's own activation map (w · f per cell)
and of each of its top localised latents, upsampled as `mammo-sae localize` does, minus the
centre of the nearest ground-truth box of the concept (on the phantom: the tight box of the
planted finding's changed pixels). Printed per model: median dy (+ = below the lesion) and dx
(+ = right; also "toward the nipple", i.e. away from the chest wall), with both cell
alignments (receptive-field centres, the default; `even`, the released code's). It also counts
the images where the classifier map's strongest cell is the row above the cell centred nearest
the lesion. A figure per model shows one image with the map, the GT box, the receptive-field
centres of the cells (dots) and the peaks. Run: `PYTHONPATH=src python benchmarks/heatmap_offset.py
[RUN] [--top 5] [--out DIR]`; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mammo_sae.activations.store import ActivationStore
from mammo_sae.analysis.intervene import load_head
from mammo_sae.analysis.localize import select_images, unique_boxes
from mammo_sae.analysis.maps import (
    LinearMap,
    heatmap_centres,
    iter_latent_maps,
    receptive_field_centres,
    upsample,
)
from mammo_sae.analysis.summaries import open_sae
from mammo_sae.config import load_yaml
from mammo_sae.io import read_json
from mammo_sae.layout import ModelEntry


def _peak(heat: np.ndarray) -> tuple[float, float]:
    """Centre of the pixels at the map's maximum (a plateau counts by its middle)."""
    rows, cols = np.nonzero(heat >= heat.max())
    return float(rows.mean()), float(cols.mean())


def _offset(
    peak: tuple[float, float], gt: np.ndarray, laterality: str
) -> tuple[float, float, float]:
    """(dy, dx, dx toward the nipple) from the nearest GT box centre, in pixel-centre units."""
    cy, cx = (gt[:, 1] + gt[:, 3]) / 2 - 0.5, (gt[:, 0] + gt[:, 2]) / 2 - 0.5
    k = int(np.argmin((cy - peak[0]) ** 2 + (cx - peak[1]) ** 2))
    dy, dx = peak[0] - cy[k], peak[1] - cx[k]
    return dy, dx, (-dx if laterality == "R" else dx)


def measure(run: Path, model: dict[str, Any], split: str, top: int, out: Path) -> dict[str, Any]:
    store = ActivationStore(run / "stores" / f"{model['encoder_key']}-{split}")
    sae = open_sae(run / "sae", "cpu")
    loc = run / "analysis" / "localize" / model["name"] / "localization.json"
    latents = [int(r["latent"]) for r in read_json(loc)["latents"]][:top] if loc.is_file() else []
    head = load_head(model["classifier"])
    indices, records = select_images(store, model["concept"], split, "positive")
    offsets: dict[str, list[tuple[float, float, float]]] = {}
    row_above, shown = 0, False
    cams = iter_latent_maps(store, LinearMap(head.w_d), [0], indices)
    lats = (
        iter_latent_maps(store, sae, latents, indices) if latents else iter([None] * len(indices))
    )
    for rec, cam, lat in zip(records, cams, lats, strict=True):
        gt = unique_boxes(rec.boxes_of(model["concept"]))
        if not len(gt):
            continue
        grid = cam.shape[-2:]
        for align in ("receptive-field", "even"):
            centres = heatmap_centres(store, rec.frame_hw, grid, align)
            heat = upsample(cam[0], rec.frame_hw, centres)
            offsets.setdefault(f"classifier map ({align})", []).append(
                _offset(_peak(heat), gt, rec.laterality)
            )
            if lat is not None:
                for m in upsample(lat, rec.frame_hw, centres):
                    if m.max() > 0:
                        offsets.setdefault(f"top-{len(latents)} latents ({align})", []).append(
                            _offset(_peak(m), gt, rec.laterality)
                        )
        rf = receptive_field_centres(store, rec.frame_hw, grid)
        if rf is not None:
            best_row = int(np.unravel_index(np.argmax(cam[0]), grid)[0])
            lesion_row = int(np.argmin(np.abs(rf[0] - ((gt[0, 1] + gt[0, 3]) / 2 - 0.5))))
            row_above += best_row == lesion_row - 1
            if not shown:
                _figure(rec, cam[0], rf, gt, out / f"heatmap_offset_{model['name']}.png")
                shown = True
    summary = {
        name: {
            "n": len(v),
            "median_dy": float(np.median([o[0] for o in v])),
            "median_dx": float(np.median([o[1] for o in v])),
            "median_dx_toward_nipple": float(np.median([o[2] for o in v])),
        }
        for name, v in offsets.items()
    }
    return {
        "model": model["name"],
        "concept": model["concept"],
        "images": len(indices),
        "classifier_peak_row_above_lesion_cell": row_above,
        "offsets": summary,
    }


def _figure(
    rec: Any, cam: np.ndarray, rf: tuple[np.ndarray, np.ndarray], gt: np.ndarray, path: Path
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from mammo_sae.analysis.figures import display_image

    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    for ax, (name, centres) in zip(
        fig.subplots(1, 2), (("receptive-field", rf), ("even", None)), strict=True
    ):
        heat = upsample(cam, rec.frame_hw, centres)
        image = display_image(rec.path, rec.frame_hw)
        if image is not None:
            ax.imshow(image, cmap="gray")
        ax.imshow(heat, cmap="jet", alpha=0.5)
        ys, xs = np.meshgrid(rf[0], rf[1], indexing="ij")
        ax.plot(xs.ravel(), ys.ravel(), "w.", ms=3, label="receptive-field centres")
        for x0, y0, x1, y1 in gt:
            ax.add_patch(
                Rectangle(
                    (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white", lw=1.5
                )
            )
        py, px = _peak(heat)
        ax.plot([px], [py], "m+", ms=12, mew=2, label="map peak")
        ax.set_title(f"{name} alignment", fontsize=9)
        ax.axis("off")
    ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"{rec.image_id}: classifier map, GT box white", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", type=Path, default=Path("runs/demo"))
    parser.add_argument("--top", type=int, default=5, help="top localised latents per model")
    parser.add_argument(
        "--out", type=Path, default=None, help="figures + JSON (default RUN/heatmap_offset)"
    )
    args = parser.parse_args(argv)
    models_json = args.run / "models" / "models.json"
    if not models_json.is_file() or not (args.run / "sae").is_dir():
        print(f"skipped: no finished run at {args.run} (run `make demo` first)")
        return 0
    config = load_yaml(args.run / "config.yaml") if (args.run / "config.yaml").is_file() else {}
    split = (config.get("extract") or {}).get("eval_split", "test")
    out = args.out or args.run / "heatmap_offset"
    # models.json's classifier paths are relative to the run: resolve them as the pipeline does.
    models = [
        {**m, "classifier": ModelEntry.from_record(m, args.run).classifier}
        for m in read_json(models_json)["models"]
    ]
    results = [measure(args.run, m, split, args.top, out) for m in models]
    for r in results:
        print(
            f"{r['model']} ({r['images']} positive {split} images; classifier map peaks in the "
            f"row above the lesion's cell in {r['classifier_peak_row_above_lesion_cell']})"
        )
        for name, o in r["offsets"].items():
            print(
                f"  {name:<36} n={o['n']:4d}  median dy {o['median_dy']:+6.1f} px  "
                f"dx {o['median_dx']:+6.1f} px  (toward nipple {o['median_dx_toward_nipple']:+6.1f})"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "heatmap_offset.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out}/heatmap_offset.json and heatmap_offset_<model>.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
