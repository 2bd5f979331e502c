"""`mammo-sae explain`: a classifier's concept score on your own images, decomposed over SAE
latents."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import device_opt, opt, progress_opt
from ..errors import MammoSaeError


@dataclass
class ExplainConfig:
    """For each image: the concept probability and logit, the top latents by contribution to the
    logit (v_j · mean activation, v = head weight · decoder direction) and by mean activation,
    a heatmap per top latent over the model input, the off-breast share of each latent's
    activation. DICOMs (.dcm, .dicom, extension-less) get Mammo-CLIP's preprocessing first
    (border crop, MONOCHROME1 inversion, min-max windowing, breast crop, resize to the PNG frame);
    PNGs are used as they are. Writes OUT/explain.json and OUT/index.html (static, offline).
    The result is a model's view of the image, not a diagnosis."""

    out: Path = opt(help="output directory (explain.json, index.html, images/)")
    paths: list[Path] = opt(
        [],
        help="image files (PNG/JPEG/TIFF/DICOM) or folders (searched recursively)",
        metavar="PATH",
    )
    model: Path | None = opt(None, help="classifier: our model dir or a Mammo-CLIP .pth")
    sae: Path | None = opt(None, help="SAE checkpoint (native dir, SAELens folder, MammoSAE .pt)")
    run: Path | None = opt(
        None,
        help="a `mammo-sae run` directory: takes --model-name's "
        "classifier, the run's SAE, input size and probe ranking",
    )
    model_name: str | None = opt(None, help="with --run: the model, e.g. Mass-finetuned")
    image_size: list[int] | None = opt(
        None, help="model input H,W or HxW; default: the run's, else 1520x912 (Mammo-CLIP)"
    )
    dicom_frame: list[int] | None = opt(
        None,
        help="PNG frame a DICOM is converted to before "
        "resizing (as ingest/preprocess); default: "
        "the run data's, else 1520x912",
    )
    crop: bool = opt(True, help="breast crop of DICOMs (--no-crop keeps the whole frame and warns)")
    top: int = opt(5, min=1, help="latents listed (and drawn) per ranking")
    latent_names: Path | None = opt(None, help="CSV latent,name: names shown beside latents")
    heatmaps: bool = opt(True, help="draw a heatmap per top latent (--no-heatmaps: numbers only)")
    batch_size: int = opt(4, min=1, help="images per forward pass")
    on_error: Literal["error", "skip"] = opt(
        "error", help="unreadable images: fail, or list them in explain.json and go on"
    )
    device: str = device_opt()
    progress: bool = progress_opt()


def _size(value: list[int] | None, name: str) -> tuple[int, int] | None:
    if not value:
        return None
    if len(value) != 2 or min(value) < 16:
        raise MammoSaeError(f"--{name} must be H,W with both >= 16; got {list(value)}")
    return int(value[0]), int(value[1])


def run_explain(cfg: ExplainConfig) -> int:
    import logging

    from ..devices import resolve_device
    from ..io import dumps_json
    from .explain import (
        DEFAULT_FRAME_HW,
        Explainer,
        explain_images,
        find_images,
        read_latent_names,
        run_frames,
        run_model,
    )

    meta: dict = {}
    class_top: dict[str, list[int]] = {}
    size, frame = _size(cfg.image_size, "image-size"), _size(cfg.dicom_frame, "dicom-frame")
    if cfg.run is not None:
        if not cfg.model_name:
            raise MammoSaeError("--run needs --model-name (e.g. Mass-finetuned)")
        model, sae, class_top, entry = run_model(cfg.run, cfg.model_name)
        model, sae = cfg.model or model, cfg.sae or sae
        run_size, run_frame = run_frames(cfg.run)
        size, frame = size or run_size or run_frame, frame or run_frame
        meta.update(run=str(cfg.run), model_name=cfg.model_name)
    elif cfg.model is None or cfg.sae is None:
        raise MammoSaeError("give --model and --sae, or --run RUN --model-name NAME")
    else:
        model, sae = cfg.model, cfg.sae
    paths = find_images(cfg.paths)
    if not cfg.crop:
        logging.getLogger(__name__).warning(
            "--no-crop: DICOMs are explained on their whole frame (only the 5-px border cut): "
            "background, film edges and labels enter the model input"
        )
    names = read_latent_names(cfg.latent_names) if cfg.latent_names else {}
    ex = Explainer.load(
        model,
        sae,
        size_hw=size or DEFAULT_FRAME_HW,
        device=resolve_device(cfg.device),
        frame_hw=frame or DEFAULT_FRAME_HW,
        crop=cfg.crop,
        latent_names=names,
        class_top=class_top,
    )
    if cfg.run is not None and not ex.concept and entry.get("concept"):
        from ..models.checkpoints import warn_assumed_concept

        warn_assumed_concept(model, ex.concept, entry["concept"])  # the run's concept for it
        ex.concept = entry["concept"]
    meta.update(model=str(model), sae=str(sae))
    result = explain_images(
        ex,
        paths,
        cfg.out,
        top=cfg.top,
        batch_size=cfg.batch_size,
        heatmaps=cfg.heatmaps,
        on_error=cfg.on_error,
        progress=cfg.progress,
        meta=meta,
    )
    brief = [
        {
            "image": e["image"],
            "score": e["score"],
            "logit": e["logit"],
            "top_latents": [t["latent"] for t in e["top_latents"]],
        }
        for e in result["images"]
    ]
    sys.stdout.write(
        dumps_json(
            {
                "out": str(cfg.out),
                "images": brief,
                "errors": len(result["errors"]),
                "note": result["note"],
            }
        )
    )
    return 0
