"""A page per listed latent (`report/latents/<idx>.html`) from the run's stores, SAE and classifiers.

A latent is listed by a model when it is in one of that model's Table-2 rows (ranked or
pointing-chosen) or, for a model without one, in the top of its class-1 probe ranking. The page
has one section per model that lists it, each seen through that model's own features:
- top-activating images of the evaluation split (by per-image mean activation) with the latent's
  heatmap, GT boxes (white) and boxes at the threshold and cell alignment the model's localize
  stage recorded (cyan; solid = hit), drawn with `analysis.figures`;
- top-activating patches: the strongest cell of each of the `TOP_PATCHES` images with the highest
  per-image max activation, cropped from the image around the cell's receptive-field centre
  (evenly laid cells when the store's architecture is unknown), with its activation;
- the histogram of per-image mean activations by class;
- class association for every concept of the run (class means, AUROC of the mean activation);
- effect on each model's logit: v_j = w · W_dec[:, j] (the pooled identity: a unit of mean
  activation moves the logit by v_j), its rank by |v| and v_j × the mean activation on positives;
- off-breast and confounder scores (share of its activation mass outside the breast / inside the
  phantom's marker box);
and, for all models, the effect on each logit and the separation-stage flags, each naming the
model whose separation raised it.
Each part is built on its own; one that cannot be (e.g. no classifier checkpoint) gives a note.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import html_blocks as H
from ..errors import MammoSaeError
from ..html_blocks import short_id
from ..io import write_text_atomic
from .figures import plot_activation_histogram

if TYPE_CHECKING:
    from .build import ModelInfo, ReportBuilder

TOP_IMAGES = 6
TOP_PATCHES = 8
CROP_CELLS = 2  # a patch crop spans this many cell strides on each axis


def crop_window(centre: float, size: int, length: int) -> tuple[int, int]:
    """[start, stop) of a `size`-pixel window centred on `centre`, shifted to lie inside
    [0, length) (the whole axis when it is shorter than the window)."""
    size = min(size, length)
    start = int(round(centre - size / 2))
    start = min(max(start, 0), length - size)
    return start, start + size


# The page builder a forked worker inherits (set only while `write_pages` runs a pool).
_FORKED_PAGES: LatentPages | None = None


def _can_fork() -> bool:
    import multiprocessing
    import sys

    # fork is safe here on Linux only (macOS's system libraries are not fork-safe).
    return sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()


def _init_page_worker() -> None:
    import torch

    torch.set_num_threads(1)  # the workers are the parallelism


def _forked_page(j: int) -> tuple[int, dict[str, Any], dict[str, str], list[str]]:
    pages = _FORKED_PAGES
    assert pages is not None, "latent page worker started without a page builder"
    report = pages.report
    problems_before, figures_before = dict(report.problems), len(report.figures)
    info = pages.write_page(j)
    new_problems = {k: v for k, v in report.problems.items() if problems_before.get(k) != v}
    return j, info, new_problems, report.figures[figures_before:]


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run a block with torch on `n` threads (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def list_model(label: str) -> str:
    """The model of a latent list: Table-2 labels are `<model>` or `<model>/<selection>`."""
    return label.split("/")[0]


class LatentPages:
    """Lazily opens the SAE, stores, summaries and heads the pages need (each once)."""

    def __init__(self, report: ReportBuilder, lists: dict[str, list[int]]) -> None:
        self.report = report
        self.run = report.run
        self.lists = lists
        self._cache: dict[tuple[str, str], Any] = {}

    def listing(self, j: int) -> dict[str, dict[str, int]]:
        """{model: {list label: 1-based rank}} of the lists holding latent j, in list order."""
        out: dict[str, dict[str, int]] = {}
        for label, lats in self.lists.items():
            if j in lats:
                out.setdefault(list_model(label), {})[label] = lats.index(j) + 1
        return out

    def localize_settings(self, model: str) -> dict[str, Any]:
        """What the localize stage recorded for the model's own row (else any of its rows)."""
        table2 = self.report.data.get("table2", {})
        labels = [model] + [k for k in table2 if list_model(k) == model]
        return next((dict(table2[k]["settings"]) for k in labels if k in table2), {})

    def split_of(self, m: ModelInfo) -> str:
        return str(self.localize_settings(m.name).get("split") or self.report.eval_split)

    # ------------------------------------------------------------------ lazy inputs
    def _cached(self, key: tuple[str, str], make: Any) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = make()
            except Exception as exc:  # remember any failure so every page does not retry it
                self._cache[key] = exc
        value = self._cache[key]
        if isinstance(value, Exception):
            raise value
        return value

    def sae_path(self) -> Path:
        candidates = [
            p.parent
            for p in sorted(self.report.layout.sae_dir.rglob("cfg.json"))
            if "summaries" not in p.parts
        ]
        if not candidates:
            raise MammoSaeError(f"no SAE checkpoint (cfg.json) under {self.report.layout.sae_dir}")
        return candidates[0]

    def sae(self) -> Any:
        from ..analysis.summaries import open_sae

        return self._cached(("sae", ""), lambda: open_sae(self.sae_path(), "cpu"))

    def model(self, name: str) -> ModelInfo:
        return self.report.model_info(name)

    def _key(self, m: ModelInfo) -> str:
        return f"{m.encoder_key or m.name}-{self.split_of(m)}"

    def store_path(self, m: ModelInfo) -> Path:
        path = self.report.layout.store_dir(m.encoder_key or m.name, self.split_of(m))
        if not path.is_dir():
            raise MammoSaeError(f"activation store not found: {path}")
        return path

    def store(self, m: ModelInfo) -> Any:
        from ..analysis.summaries import open_store

        return self._cached(("store", self._key(m)), lambda: open_store(self.store_path(m)))

    def records(self, m: ModelInfo) -> list[Any]:
        return self._cached(("records", self._key(m)), lambda: list(self.store(m).records()))

    def summaries(self, m: ModelInfo) -> Any:
        """The summaries stage's cached summaries of this store (computed here if absent)."""
        from ..analysis.summaries import sae_hash, summaries_for, summarize

        def make() -> Any:
            # The summaries stage caches (store hash, SAE hash)-named files in analysis/summaries/
            # (or a per-store folder in it); summaries_for reuses them, else computes and caches.
            root = self.report.layout.stage_dir("summaries")
            cache = root / self._key(m) if (root / self._key(m)).is_dir() else root
            if cache.is_dir():
                return summaries_for(
                    self.store_path(m), self.sae_path(), cache_dir=cache, progress=False
                )
            store = self.store(m)
            return summarize(
                store,
                self.sae(),
                store_sha=store.manifest_sha256,
                sae_sha=sae_hash(self.sae_path()),
                cache_dir=None,
                progress=False,
            )

        return self._cached(("summaries", self._key(m)), make)

    def labelled(self, m: ModelInfo, concept: str) -> tuple[np.ndarray, np.ndarray]:
        from ..analysis.summaries import labelled_rows

        store = self.store(m)
        level = store.manifest.get("level", "image")
        return self._cached(
            ("labels", f"{self._key(m)}/{concept}"),
            lambda: labelled_rows(store.images, concept, split=self.split_of(m), store_level=level),
        )

    def readout(self, m: ModelInfo) -> np.ndarray:
        """v_h = W_decᵀ w of this model's concept head."""
        from ..analysis.intervene import load_head, sae_readout

        def make() -> np.ndarray:
            if not m.classifier:
                raise MammoSaeError(f"models.json names no classifier for {m.name}")
            return sae_readout(self.sae(), load_head(m.classifier))[0]

        return self._cached(("readout", m.name), make)

    # ------------------------------------------------------------------ pages
    def write_all(self) -> dict[int, dict[str, Any]]:
        latents = list(dict.fromkeys(j for lats in self.lists.values() for j in lats))
        out = self.write_pages(latents)
        self.report.data["latents"] = {str(j): v for j, v in out.items()}
        return out

    def write_pages(self, latents: list[int]) -> dict[int, dict[str, Any]]:
        """`write_page` for each latent, in order. Drawing is single-threaded Python
        (matplotlib), so with `report.workers` > 1 the pages are drawn by that many forked
        processes; each page is drawn the same way either way (torch on one thread), and the
        report's problem notes and figure list are gathered back."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(latents), desc="latent pages", disable=not self.report.progress)
        workers = min(self.report.workers, len(latents))
        out: dict[int, dict[str, Any]] = {}
        if workers <= 1 or not _can_fork():
            with _torch_threads(1):
                for j in latents:
                    out[j] = self.write_page(j)
                    bar.update()
            bar.close()
            return out
        import multiprocessing

        global _FORKED_PAGES
        _FORKED_PAGES = self
        try:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(workers, initializer=_init_page_worker) as pool:
                for j, info, problems, figures in pool.imap(_forked_page, latents):
                    out[j] = info
                    self.report.problems.update(problems)
                    self.report.figures.extend(figures)
                    bar.update()
        finally:
            _FORKED_PAGES = None
            bar.close()
        return out

    def guarded(self, j: int, part: str, section: H.Section, fill: Any) -> None:
        from ..errors import SECTION_ERRORS

        try:
            fill(section)
        except SECTION_ERRORS as exc:
            if self.report.strict:
                raise
            self.report.problems[f"latent {j}/{part}"] = f"{type(exc).__name__}: {exc}"
            section.add(H.note(f"not available: {exc}"))

    def flags(self, j: int) -> list[dict[str, str]]:
        """Separation-stage flags of latent j, each with the model whose separation raised it."""
        known = {m.name for m in self.report.models}
        out = []
        for folder, results in self.report.separation_results.items():
            for name, r in results.items():
                model = name if name in known or folder == "all" else f"{folder}-{name}"
                for e in r.get("flagged", []) or []:
                    if isinstance(e, dict) and e.get("index") == j:
                        out.extend({"flag": str(f), "model": model} for f in e.get("flags", []))
        return out

    def write_page(self, j: int) -> dict[str, Any]:
        listing = self.listing(j)
        info: dict[str, Any] = {
            "latent": j,
            "listed_by": listing,
            "models": {},
            "ranks": {label: r for ranks in listing.values() for label, r in ranks.items()},
        }
        info["flags"] = self.flags(j)
        overview = H.Section("overview", "Overview")
        overview.add(
            H.note(
                f"Latent {j}. Listed by: "
                + "; ".join(
                    f"{model} ({', '.join(f'{label} #{r}' for label, r in ranks.items())})"
                    for model, ranks in listing.items()
                )
                + ". Each model's section shows the latent through that model's own features."
            )
        )
        if info["flags"]:
            overview.add(
                '<p class="flag">Flagged by the separation stage: '
                + H.esc(", ".join(f"{f['flag']} (raised by {f['model']})" for f in info["flags"]))
                + "</p>"
            )
            overview.add(
                H.note(
                    "'associated': in that model's separation, the latent's image-mean "
                    "activation tells concept-negative images with the attribute (the "
                    "phantom's marker) from those without."
                )
            )
        sections = [overview]
        for n, model in enumerate(listing):
            m = self.report.model_info(model)
            section = H.Section(f"model-{n}", f"Through {m.name}")
            mine: dict[str, Any] = {"ranks": listing[model], "split": self.split_of(m)}
            info["models"][m.name] = mine
            for part, fill in (
                ("images", self.fill_images),
                ("patches", self.fill_patches),
                ("histogram", self.fill_histogram),
                ("association", self.fill_association),
                ("scores", self.fill_scores),
            ):
                self.guarded(
                    j,
                    f"{m.name}/{part}",
                    section,
                    lambda s, fill=fill, m=m, mine=mine: fill(j, m, s, mine),
                )
            sections.append(section)
        logit = H.Section("logit", "Effect on the logit")
        self.guarded(j, "logit", logit, lambda s: self.fill_logit(j, s, info))
        sections.append(logit)
        html = H.page(
            f"Latent {j}",
            "listed by " + ", ".join(listing),
            sections,
            back=("../index.html", "← report"),
        )
        write_text_atomic(self.report.layout.report_latent(j), html)
        info["page"] = f"latents/{j}.html"
        return info

    def activations(
        self, j: int, m: ModelInfo, concept: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(store rows, labels, per-image mean activation of j) for the split's labelled images."""
        rows, y = self.labelled(m, concept)
        sums = self.summaries(m)
        if not 0 <= j < sums.h:
            raise MammoSaeError(f"latent {j} is outside the SAE's {sums.h} latents")
        act = np.asarray(sums.mean_nh[rows][:, j].toarray(), dtype=np.float64).ravel()
        return rows, y, act

    def fill_images(self, j: int, m: ModelInfo, s: H.Section, info: dict[str, Any]) -> None:
        from ..analysis.figures import LatentPanel, display_image, save_panel_grid
        from ..analysis.localize import BoxRule, map_boxes, match_image, unique_boxes
        from ..analysis.maps import heatmap_centres, iter_latent_maps

        split = self.split_of(m)
        s.add("<h3>Top-activating images</h3>")
        rows, y, act = self.activations(j, m, m.concept)
        order = [int(k) for k in np.argsort(-act, kind="stable")[:TOP_IMAGES] if act[k] > 0]
        if not order:
            s.add(H.note(f"latent {j} is never active on the {split} split through {m.name}"))
            return
        # Boxes as the model's localize stage drew them: its recorded threshold, alignment, IoU
        # (the paper's defaults where the stage has not run for this model).
        loc = self.localize_settings(m.name)
        rule = BoxRule.from_settings(loc)
        threshold, align = rule.threshold.spec, str(loc.get("align", "even"))
        iou, match = float(loc.get("iou_threshold", 0.25)), str(loc.get("match", "voc"))
        info.update(threshold=threshold, align=align, from_localize=bool(loc))
        records, store = self.records(m), self.store(m)
        indices = [int(rows[k]) for k in order]
        panels = []
        for k, i, maps_lhw in zip(
            order, indices, iter_latent_maps(store, self.sae(), [j], indices), strict=True
        ):
            rec = records[i]
            centres = heatmap_centres(store, rec.frame_hw, maps_lhw.shape[-2:], align)
            heat, pred, scores = map_boxes(maps_lhw[0], rec.frame_hw, centres, rule)
            gt = unique_boxes(rec.boxes_of(m.concept))
            hits = match_image(pred, scores, gt, iou, match)  # type: ignore[arg-type]
            mark = "" if not len(gt) else (" · HIT" if hits.any() else " · miss")
            title = f"{short_id(rec.image_id)}\nmean {act[k]:.3g} · y={int(y[k])}{mark}"
            panels.append(
                LatentPanel(display_image(rec.path, rec.frame_hw), heat, gt, pred, title, hits=hits)
            )
        name = f"latent_{j}_{_safe(m.name)}_top.png"
        save_panel_grid(
            [panels],
            self.report.figure_path(name),
            suptitle=f"latent {j} through {m.name}: top {len(panels)} {split} images",
        )
        self.report.made_figure(name)
        where = "its localize stage's" if loc else "the default (localize has not run for it)"
        fig = H.figure(
            f"../figures/{name}",
            f"The {len(panels)} {split} images with the highest "
            f"mean activation of latent {j} through {m.name}; y = the image's "
            f"{m.concept} label; GT boxes white, boxes at {where} threshold "
            f"{threshold} cyan (solid: hit at IoU {iou:g}, dashed: miss), cells at "
            f"their {align} positions.",
        )
        s.add(H.details(f"Top {len(panels)} images through {m.name}", fig, open_=True))
        info["top_images"] = [
            {"image_id": records[i].image_id, "mean_activation": float(act[k]), "label": int(y[k])}
            for k, i in zip(order, indices, strict=True)
        ]
        s.add(
            H.table(
                info["top_images"],
                ["image_id", "label", "mean_activation"],
                headers=["image id", m.concept, "mean activation"],
                digits=4,
            )
        )

    def fill_patches(self, j: int, m: ModelInfo, s: H.Section, info: dict[str, Any]) -> None:
        """A strip of crops around the latent's strongest cells: one per image, from the images
        with the highest per-image max activation (the summaries' max, so only these few images
        are encoded)."""
        from ..analysis.explain import write_thumbnail
        from ..analysis.figures import display_image
        from ..analysis.maps import cell_centres, iter_latent_maps, receptive_field_centres

        s.add("<h3>Top-activating patches</h3>")
        rows, _, _ = self.activations(j, m, m.concept)  # also checks that j is in range
        peak = np.asarray(self.summaries(m).max_nh[rows][:, j].toarray(), dtype=np.float64).ravel()
        order = [int(k) for k in np.argsort(-peak, kind="stable")[:TOP_PATCHES] if peak[k] > 0]
        if not order:
            s.add(
                H.note(
                    f"latent {j} is never active on the {self.split_of(m)} split through {m.name}"
                )
            )
            return
        records, store = self.records(m), self.store(m)
        indices = [int(rows[k]) for k in order]
        items, crops, layouts = [], [], set()
        maps = iter_latent_maps(store, self.sae(), [j], indices)
        for n, (i, maps_lhw) in enumerate(zip(indices, maps, strict=True)):
            rec = records[i]
            (gh, gw), (fh, fw) = maps_lhw.shape[-2:], rec.frame_hw
            r, c = np.unravel_index(int(np.argmax(maps_lhw[0])), (gh, gw))
            centres = receptive_field_centres(store, rec.frame_hw, (gh, gw))
            layouts.add("receptive-field" if centres is not None else "even")
            if centres is None:  # architecture unknown: cells laid evenly over the frame
                centres = (cell_centres(gh, fh), cell_centres(gw, fw))
            cy, cx = float(centres[0][r]), float(centres[1][c])
            entry = {
                "image_id": rec.image_id,
                "activation": float(maps_lhw[0, r, c]),
                "cell": [int(r), int(c)],
                "centre_yx": [cy, cx],
            }
            image = display_image(rec.path, rec.frame_hw)
            if image is not None:
                y0, y1 = crop_window(cy, max(8, round(CROP_CELLS * fh / gh)), image.shape[0])
                x0, x1 = crop_window(cx, max(8, round(CROP_CELLS * fw / gw)), image.shape[1])
                name = f"latent_{j}_{_safe(m.name)}_patch{n}.png"
                write_thumbnail(image[y0:y1, x0:x1], self.report.figure_path(name))
                self.report.made_figure(name)
                entry["crop"] = f"figures/{name}"
                items.append(
                    (f"../figures/{name}", f"{entry['activation']:.3g} · {short_id(rec.image_id)}")
                )
            crops.append(entry)
        info["top_patches"] = crops
        s.add(H.strip(items) if items else H.note("no image files to crop the patches from"))
        s.add(
            H.note(
                f"The strongest cell of latent {j} in each of the {len(crops)} "
                f"{self.split_of(m)} images where its largest activation is highest, cropped "
                f"{CROP_CELLS} cell strides wide around the cell's "
                f"{' / '.join(sorted(layouts))} centre (even: the store's architecture is "
                "unknown, so cells are laid evenly); under each: its activation · image id."
            )
        )

    def fill_histogram(self, j: int, m: ModelInfo, s: H.Section, info: dict[str, Any]) -> None:
        s.add("<h3>Activation histogram</h3>")
        _, y, act = self.activations(j, m, m.concept)
        name = f"latent_{j}_{_safe(m.name)}_hist.png"
        plot_activation_histogram(
            {f"{m.concept} = 0": act[y == 0], f"{m.concept} = 1": act[y == 1]},
            self.report.figure_path(name),
            title=f"latent {j} through {m.name} ({self.split_of(m)})",
        )
        self.report.made_figure(name)
        info["active_fraction"] = float((act > 0).mean()) if len(act) else math.nan
        s.add(
            H.figure(
                f"../figures/{name}",
                f"Per-image mean activation of latent {j}; "
                f"active on {info['active_fraction']:.1%} of the images.",
            )
        )

    def fill_association(self, j: int, m: ModelInfo, s: H.Section, info: dict[str, Any]) -> None:
        from ..analysis.atlas import attribute_names
        from ..metrics import auroc

        s.add("<h3>Class association</h3>")
        rows_out = []
        # Findings of the run's models, then any per-image attribute the data boxes (the
        # phantom's planted marker): only labels the images carry.
        images = self.store(m).images
        attributes = sorted(attribute_names(images, np.arange(len(images))))
        for concept in dict.fromkeys(
            [m.concept] + [x.concept for x in self.report.models] + attributes
        ):
            try:
                _, y, act = self.activations(j, m, concept)
            except MammoSaeError:
                if concept in attributes:  # boxed on some images but not a label of the split
                    continue
                raise
            both = 0 < y.sum() < len(y)
            rows_out.append(
                {
                    "concept": concept,
                    "n_pos": int(y.sum()),
                    "n_neg": int(len(y) - y.sum()),
                    "mean_class0": float(act[y == 0].mean()) if (y == 0).any() else math.nan,
                    "mean_class1": float(act[y == 1].mean()) if (y == 1).any() else math.nan,
                    "auroc": auroc(y, act) if both else math.nan,
                }
            )
        info["association"] = rows_out
        s.add(
            H.note(
                "Mean of the per-image mean activation in each class, and the AUROC of that "
                "activation as a score for the concept (0.5 = no association)."
            )
        )
        s.add(
            H.table(
                rows_out,
                ["concept", "n_pos", "n_neg", "mean_class0", "mean_class1", "auroc"],
                headers=[
                    "concept",
                    "positives",
                    "negatives",
                    "mean (class 0)",
                    "mean (class 1)",
                    "AUROC",
                ],
                digits=4,
            )
        )

    def fill_logit(self, j: int, s: H.Section, info: dict[str, Any]) -> None:
        from ..errors import SECTION_ERRORS

        rows_out, problems = [], []
        for m in self.report.models:
            try:
                v_h = self.readout(m)
            except SECTION_ERRORS as exc:  # one model's missing head must not hide the others
                problems.append(f"{m.name}: {exc}")
                continue
            row = {
                "model": m.name,
                "v": float(v_h[j]),
                "rank_abs": int((np.abs(v_h) > abs(v_h[j])).sum()) + 1,
                "shift_pos": math.nan,
            }
            try:
                _, y, act = self.activations(j, m, m.concept)
                if (y == 1).any():
                    row["shift_pos"] = float(v_h[j] * act[y == 1].mean())
            except SECTION_ERRORS as exc:
                problems.append(f"{m.name} activations: {exc}")
            rows_out.append(row)
        if not rows_out:
            raise MammoSaeError("; ".join(problems) or "no models")
        info["logit_effect"] = rows_out
        s.add(
            H.note(
                "v = w · W_dec[:, j]: by the pooled identity, one unit of mean activation of this "
                "latent moves the model's concept logit by v. Shift = v × its mean activation on "
                "the model's own positive images."
            )
        )
        s.add(
            H.table(
                rows_out,
                ["model", "v", "rank_abs", "shift_pos"],
                headers=["model", "v (logit per unit)", "rank by |v|", "logit shift on positives"],
                digits=4,
            )
        )
        for p in problems:
            s.add(H.note(p))

    def fill_scores(self, j: int, m: ModelInfo, s: H.Section, info: dict[str, Any]) -> None:
        s.add("<h3>Off-breast and confounder scores</h3>")
        sums = self.summaries(m)
        info["off_breast_score"] = float(sums.off_breast_score()[j])
        info["confounder_score"] = float(sums.confounder_score()[j])
        s.add(
            H.kpis(
                {
                    "off-breast score": info["off_breast_score"],
                    "confounder score": info["confounder_score"],
                }
            )
        )
        s.add(
            H.note(
                "Off-breast: share of the latent's activation mass on cells with breast-tissue "
                "fraction < 0.5. Confounder: share of its mass on marker-carrying images that lies "
                "inside the marker's box (phantom only; — where the data has no marker)."
            )
        )
