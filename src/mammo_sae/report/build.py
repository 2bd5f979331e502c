"""`mammo-sae report`: one static, offline HTML page of a run directory (and a page per top latent).

Reads only the run directory (layout: docs/architecture.md, "Run directory") and writes
`RUN/report/`: `index.html`, `latents/<idx>.html`, `figures/*.png` (linked relatively) and
`report.json` holding every number shown, and `atlas.html` (report/atlas.py). No network, and no
JavaScript except the atlas page's inline script: the folder opens anywhere.

Every section is built on its own: a stage that has not run gives a "not run" note, and a part
whose files are unreadable gives a "could not be built" note naming the problem (or, with
`strict=True`, raises), so a partial run still gets a report. Images are named by the dataset's
image ids only (hashed in VinDr-Mammo); patient ids and file paths are never shown.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import html_blocks as H
from ..analysis.figures import MODES, Curve, plot_topk_grid
from ..analysis.probe import RANKING_PREFERENCE, ranking_file_name
from ..analysis.results import FidelityRecord, FidelityResult, InterveneRecord
from ..errors import SECTION_ERRORS, MammoSaeError
from ..io import (
    atomic_path,
    read_json,
    write_json,
    write_text_atomic,
    writer_lock,
)
from ..layout import FINAL_LAYER, STAGE_NAMES, ModelEntry, RunLayout, split_model_name
from .figures import nice_ks, plot_training_curves, resample_positions, training_series

SCHEMA_VERSION = 1
BASELINE_COLUMNS = {
    "chance": "chance",
    "classifier_map": "classifier map",
    "oracle": "oracle (predicted size)",
}


# The report's name for a models.json entry (latents.py and standalone.py use it).
ModelInfo = ModelEntry


# =============================================================================== readers


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A JSON-lines log; a torn last line (run interrupted mid-write) is ignored."""
    import json

    rows: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == len(lines):
                break
            raise MammoSaeError(f"corrupt JSON on line {n} of {path}: {exc}") from exc
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _plain(value: Any) -> Any:
    """numpy scalars -> Python; NaN stays NaN."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _num(value: Any) -> float:
    """A number from JSON (None, strings and booleans -> NaN)."""
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def _metric(block: Any, name: str = "auroc") -> tuple[float, float, float]:
    """(value, CI low, CI high) of a classifier evaluation's metric (`classifier eval`'s JSON and
    models.json's `test_metrics`: `{auroc: {value, ci_low, ci_high}}`); NaN where missing."""
    inner = block.get(name) if isinstance(block, Mapping) else None
    if not isinstance(inner, Mapping):
        return math.nan, math.nan, math.nan
    return _num(inner.get("value")), _num(inner.get("ci_low")), _num(inner.get("ci_high"))


RECOVERED_RULE = (
    "shown only where the original classifier is meaningfully above chance: the "
    "lower end of its 95 % CI for AUROC above 0.5 (AUROC > 0.6 where there is no "
    "CI); elsewhere (AUROC_orig − 0.5) is near 0 and the ratio means nothing"
)


def recovered_shown(row: Mapping[str, Any]) -> float:
    """`recovered` where `RECOVERED_RULE` allows it, else NaN (shown as —)."""
    low, auroc = _num(row.get("auroc_original_low")), _num(row.get("auroc_original"))
    meaningful = low > 0.5 if math.isfinite(low) else auroc > 0.6
    return _num(row.get("recovered")) if meaningful else math.nan


def ci_text(value: float, low: float, high: float, digits: int = 3) -> str:
    if not math.isfinite(value):
        return "—"
    if math.isfinite(low) and math.isfinite(high):
        return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    return f"{value:.{digits}f}"


def _unwrap(data: Any, keys: Iterable[str] = ("models", "results", "rows", "table")) -> Any:
    if isinstance(data, Mapping):
        for key in keys:
            if key in data and isinstance(data[key], (Mapping, list)):
                return data[key]
    return data


def _named_results(data: Any, marker: str) -> dict[str, dict[str, Any]]:
    """`{name: result}` from a JSON holding per-model results (each a dict with `marker`), given as
    a mapping (possibly under models/results/rows) or a list of dicts with a `model`/`name` key."""
    data = _unwrap(data)
    out: dict[str, dict[str, Any]] = {}
    if isinstance(data, Mapping):
        if marker in data:
            return {str(data.get("model", data.get("name", ""))): dict(data)}
        for name, value in data.items():
            if isinstance(value, Mapping) and marker in value:
                out[str(name)] = dict(value)
    elif isinstance(data, list):
        for value in data:
            if isinstance(value, Mapping) and marker in value:
                out[str(value.get("model", value.get("name", len(out))))] = dict(value)
    return out


# =============================================================================== the report


class ReportBuilder:
    """Collects sections, figures and numbers for one run; `build()` writes everything."""

    def __init__(
        self,
        run_dir: Path,
        out: Path,
        *,
        strict: bool = False,
        top_latents: int = 10,
        latent_pages: bool = True,
        progress: bool = True,
        workers: int | None = None,
    ) -> None:
        self.run = Path(run_dir)
        self.out = Path(out)
        self.layout = RunLayout(self.run, report_dir=self.out)
        self.strict = strict
        self.top_latents = top_latents
        self.latent_pages = latent_pages
        self.progress = progress
        self.workers = default_workers() if workers is None else workers
        self.data: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        self.problems: dict[str, str] = {}
        self.figures: list[str] = []
        self.config: dict[str, Any] = {}
        self.models: list[ModelEntry] = []
        self.model_metrics: dict[str, Any] = {}
        self.separation_results: dict[str, dict[str, dict[str, Any]]] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def analysis(self) -> Path:
        return self.layout.analysis_dir

    def figure_path(self, name: str) -> Path:
        return self.layout.report_figures / name

    def copy_figure(self, src: Path, name: str) -> str:
        """Copy a PNG into report/figures/ and return its link relative to index.html."""
        with atomic_path(self.figure_path(name)) as tmp:
            shutil.copyfile(src, tmp)
        self.figures.append(f"figures/{name}")
        return f"figures/{name}"

    def made_figure(self, name: str) -> str:
        self.figures.append(f"figures/{name}")
        return f"figures/{name}"

    def guarded(self, key: str, section: H.Section, fill: Callable[[H.Section], None]) -> H.Section:
        """Run `fill(section)`; a problem with the run's files becomes a note in that section."""
        try:
            fill(section)
        except SECTION_ERRORS as exc:
            if self.strict:
                raise
            self.problems[key] = f"{type(exc).__name__}: {exc}"
            section.add(H.note(f"This part could not be built: {exc}"))
        return section

    def model_info(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        concept, variant = split_model_name(name)
        return ModelEntry(name, concept, variant)

    def skipped_comparisons(self) -> list[dict[str, str]]:
        """Concepts with one model: the between-variant comparisons (pretrained vs finetuned in
        Figures 2 and 4/5) need two, so they are skipped, and the report says so."""
        by_concept: dict[str, list[str]] = {}
        for m in self.models:
            by_concept.setdefault(m.concept, []).append(m.name)
        return [
            {
                "analysis": "comparison between variants (Figures 2, 4/5)",
                "concept": concept,
                "reason": f"{concept} has one model ({names[0]}); a comparison needs two, so "
                "its curves, separation index and flags are that model's alone",
            }
            for concept, names in by_concept.items()
            if len(names) == 1
        ]

    @property
    def eval_split(self) -> str:
        extract = self.config.get("extract") if isinstance(self.config, Mapping) else None
        split = extract.get("eval_split") if isinstance(extract, Mapping) else None
        return str(split or "test")

    def model_dirs(self, stage: str, layer: str = FINAL_LAYER) -> list[Path]:
        """RUN/analysis/<stage>/<model>/ folders (of tapped `layer`) in models.json order, then
        any others."""
        root = self.layout.at_layer(layer).stage_dir(stage)
        if not root.is_dir():
            return []
        dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        order = {m.name: i for i, m in enumerate(self.models)}
        return sorted(dirs, key=lambda p: (order.get(p.name, len(order)), p.name))

    # ------------------------------------------------------------------ build
    def build(self) -> Path:
        if not self.run.is_dir():
            raise MammoSaeError(f"run directory not found: {self.run}")
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        # A previous build's pages and figures (e.g. of latents no longer on top) must not linger.
        for stale in [
            *self.layout.report_figures.glob("*.png"),
            *self.layout.report_latents.glob("*.html"),
        ]:
            stale.unlink()
        sections = [
            self.guarded("summary", H.Section("summary", "Run summary"), self.section_summary),
            self.guarded("models", H.Section("models", "Classifiers"), self.section_models),
            self.guarded("table1", H.Section("table1", "Table 1 · Fidelity"), self.section_table1),
            self.guarded(
                "figure2",
                H.Section("figure2", "Figure 2 · Top-k interventions"),
                self.section_figure2,
            ),
            self.guarded(
                "localize",
                H.Section("localize", "Figure 3 · Table 2 · Localisation"),
                self.section_localize,
            ),
            *(
                [
                    self.guarded(
                        "layers",
                        H.Section("layers", "By layer · Tables 1, 2 and Figure 2"),
                        self.section_layers,
                    )
                ]
                if self.tapped_layers()
                else []
            ),
            self.guarded(
                "separation",
                H.Section("separation", "Figures 4/5 · Latent separation"),
                self.section_separation,
            ),
            self.guarded("sae", H.Section("sae", "SAE training"), self.section_sae),
            self.guarded("latents", H.Section("latents", "Top latents"), self.section_latents),
            self.guarded("atlas", H.Section("atlas", "Latent atlas"), self.section_atlas),
        ]
        headlines = self.guarded(
            "headlines", H.Section("headlines", "Headline numbers"), self.section_headlines
        )
        sections.insert(0, headlines)
        self.data["problems"] = self.problems
        self.data["figures"] = sorted(set(self.figures))
        self.data["seconds"] = round(time.perf_counter() - t0, 2)
        name = (
            self.config.get("name", self.run.name)
            if isinstance(self.config, Mapping)
            else self.run.name
        )
        subtitle = (
            f"run {self.run.name} · built {time.strftime('%Y-%m-%d %H:%M')} · "
            "static page, no network access"
        )
        index = self.layout.report_index
        write_text_atomic(index, H.page(f"mammo-sae report: {name}", subtitle, sections))
        write_json(self.layout.report_json, self.data)
        return index

    # ------------------------------------------------------------------ headlines
    def section_headlines(self, s: H.Section) -> None:
        """One row per model from the other sections' numbers (built last, shown first)."""
        fid = {r["model"]: r for r in self.data.get("table1", [])}
        test = {r["model"]: r for r in self.data.get("models", [])}
        best = {
            label: max((r for r in entry["latents"]), key=lambda r: _num(r.get("ap")), default=None)
            for label, entry in self.data.get("table2", {}).items()
        }
        best_ap = {label: r for label, r in best.items() if "/" not in label}
        pointing = {
            label.split("/")[0]: r for label, r in best.items() if label.endswith("/pointing")
        }
        known = {m.name for m in self.models}
        separation = {}
        for folder, rows in self.data.get("separation", {}).items():
            for r in rows:  # the pipeline names separation rows by variant inside a concept folder
                name = r["model"] if r["model"] in known else f"{folder}-{r['model']}"
                separation[name] = r["separation"]
        names = list(dict.fromkeys([m.name for m in self.models] + list(fid) + list(best_ap)))
        rows = []
        for name in names:
            ap = best_ap.get(name)
            rows.append(
                {
                    "model": name,
                    "auroc_test": test.get(name, {}).get("auroc", math.nan),
                    "auroc_original": fid.get(name, {}).get("auroc_original", math.nan),
                    "auroc_sae": fid.get(name, {}).get("auroc_sae", math.nan),
                    "recovered": recovered_shown(fid[name]) if name in fid else math.nan,
                    "best_ap": _num(ap.get("ap")) if ap else math.nan,
                    "best_ap_latent": int(ap["latent"]) if ap else None,
                    "best_ap_pointing": _num(pointing[name].get("ap"))
                    if name in pointing
                    else math.nan,
                    "separation": separation.get(name, math.nan),
                }
            )
        self.data["headlines"] = rows
        self.data["skipped"] = self.skipped_comparisons()
        for skip in self.data["skipped"]:
            s.add(H.note(f"Skipped: the {skip['analysis']} for {skip['reason']}."))
        if not rows:
            s.add(H.note("no model results yet"))
            return
        s.add(
            H.table(
                rows,
                [
                    "model",
                    "auroc_test",
                    "auroc_original",
                    "auroc_sae",
                    "recovered",
                    "best_ap",
                    "best_ap_latent",
                    "best_ap_pointing",
                    "separation",
                ],
                headers=[
                    "model",
                    f"{self.eval_split} AUROC (classifier)",
                    "AUROC original (store)",
                    "AUROC SAE",
                    "recovered",
                    "best latent AP (top-10 ranked)",
                    "that latent",
                    "best AP (pointing-chosen)",
                    "separation index",
                ],
            )
        )
        s.add(
            H.note(
                "Recovered = (AUROC_SAE − 0.5)/(AUROC_orig − 0.5), "
                + RECOVERED_RULE
                + ". Separation index: see Figures 4/5. Every number here is in report.json."
            )
        )
        s.add(
            f'<p class="note">All numbers of this page: {H.link("report.json", "report.json")}</p>'
        )
        for concept, debias in self.data.get("debias", {}).items():
            for r in debias:
                if not r.get("in_top"):
                    continue
                s.add(
                    H.note(
                        f"Confounder check, {concept} {r['model']}: {r['n_associated']} latents follow the "
                        f"attribute among negatives ({r['in_top']} of the top ones); switching them off moves "
                        f"concept AUROC {H.fmt(r['auroc_plain'])} → {H.fmt(r['auroc_off'])} and the shortcut "
                        f"{H.fmt(r['shortcut_plain'])} → {H.fmt(r['shortcut_off'])} (Figures 4/5 section)."
                    )
                )

    # ------------------------------------------------------------------ summary
    def section_summary(self, s: H.Section) -> None:
        import yaml

        config_path = self.layout.config
        if config_path.is_file():
            text = config_path.read_text(encoding="utf-8")
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise MammoSaeError(f"invalid YAML in {config_path}: {exc}") from exc
            self.config = loaded if isinstance(loaded, dict) else {}
        else:
            text = ""
        stages = []
        total = 0.0
        for path in sorted(self.layout.stages_dir.glob("*.json")):
            rec = read_json(path)
            seconds = _num(rec.get("seconds")) if isinstance(rec, Mapping) else math.nan
            stage = str(rec.get("stage", path.stem)) if isinstance(rec, Mapping) else path.stem
            stages.append(
                {
                    "stage": stage,
                    "seconds": seconds,
                    "key": str(rec.get("key", ""))[:16] if isinstance(rec, Mapping) else "",
                }
            )
            total += seconds if math.isfinite(seconds) else 0.0
        rank = {name: i for i, name in enumerate(STAGE_NAMES)}
        stages.sort(key=lambda r: (rank.get(r["stage"], len(rank)), r["stage"]))
        done = {r["stage"] for r in stages}
        self.data["run"] = {
            "name": self.config.get("name", self.run.name),
            "stages": stages,
            "stage_seconds_total": total,
            "not_run": [n for n in STAGE_NAMES if n not in done and n != "report"],
        }
        kpi: dict[str, Any] = {"stages finished": len(stages), "stage time (min)": total / 60}
        summary_path = self.layout.data_summary
        dataset_rows = []
        if summary_path.is_file():
            summary = read_json(summary_path)
            splits = summary.get("splits", {}) if isinstance(summary, Mapping) else {}
            for split, info in splits.items() if isinstance(splits, Mapping) else []:
                if isinstance(info, Mapping):
                    pos = info.get("positives", {}).get("image") or {}
                    dataset_rows.append(
                        {
                            "split": split,
                            "images": info.get("images"),
                            "patients": info.get("patients"),
                            **{f"{c} +": n for c, n in pos.items()},
                        }
                    )
            empty = {k for k in dataset_rows[0] if k.endswith(" +")} if dataset_rows else set()
            empty = {k for k in empty if all(not r.get(k) for r in dataset_rows)}
            dataset_rows = [{k: v for k, v in r.items() if k not in empty} for r in dataset_rows]
            # Counts only: file paths of missing images may hold patient folder names.
            self.data["dataset"] = dataset_rows
            everything = next((r for r in dataset_rows if r["split"] == "all"), None)
            if everything and isinstance(everything.get("images"), int):
                kpi["images"] = everything["images"]
        s.add(H.kpis(kpi))
        missing = self.data["run"]["not_run"]
        if missing:
            s.add(H.note("Stages not run (yet): " + ", ".join(missing)))
        if dataset_rows:
            s.add("<h3>Dataset (image-level positives)</h3>")
            s.add(H.table(dataset_rows, list(dict.fromkeys(k for r in dataset_rows for k in r))))
        s.add("<h3>Stage timings</h3>")
        s.add(
            H.table(
                stages,
                ["stage", "seconds", "key"],
                headers=["stage", "seconds", "cache key"],
                digits=1,
            )
        )
        s.add("<h3>Resolved config (RUN/config.yaml)</h3>")
        s.add(H.pre(text) if text else H.note("not found: config.yaml"))

    # ------------------------------------------------------------------ classifiers
    def section_models(self, s: H.Section) -> None:
        path = self.layout.models_json
        if not path.is_file():
            s.add(H.note("not run: models/models.json is missing (models stage)"))
            return
        data = read_json(path)
        entries = data.get("models", []) if isinstance(data, Mapping) else []
        for e in entries:
            if isinstance(e, Mapping) and "name" in e:
                # Recorded relative to the run (older runs: to the first run's cwd).
                self.models.append(ModelEntry.from_record(e, self.run))
        metrics = data.get("test_metrics", {}) if isinstance(data, Mapping) else {}
        self.model_metrics = metrics if isinstance(metrics, Mapping) else {}
        rows = []
        for m in self.models:
            met = self.model_metrics.get(m.name, {})
            auroc, auprc = _metric(met, "auroc"), _metric(met, "auprc")
            rows.append(
                {
                    "model": m.name,
                    "concept": m.concept,
                    "variant": m.variant,
                    "n": met.get("n") if isinstance(met, Mapping) else None,
                    "n_pos": met.get("n_pos") if isinstance(met, Mapping) else None,
                    "auroc": auroc[0],
                    "auroc_low": auroc[1],
                    "auroc_high": auroc[2],
                    "auprc": auprc[0],
                    "auprc_low": auprc[1],
                    "auprc_high": auprc[2],
                }
            )
        self.data["models"] = rows
        shown = [
            {
                **r,
                "auroc": ci_text(*(r[k] for k in ("auroc", "auroc_low", "auroc_high"))),
                "auprc": ci_text(*(r[k] for k in ("auprc", "auprc_low", "auprc_high"))),
            }
            for r in rows
        ]
        s.add(
            H.note(
                f"Concept classifiers evaluated on the {self.eval_split} split "
                '(95 % bootstrap CIs). "pretrained" = a linear probe: a linear head trained '
                "on the frozen encoder of the pretext task (Mammo-CLIP's image encoder, or "
                "the phantom's self-supervised backbone), the encoder never seeing the "
                'concept\'s labels; "finetuned" = encoder and head trained end to end on '
                "the concept."
            )
        )
        s.add(
            H.table(
                shown,
                ["model", "concept", "variant", "n", "n_pos", "auroc", "auprc"],
                headers=["model", "concept", "variant", "images", "positives", "AUROC", "AUPRC"],
                left=3,
            )
        )
        s.add(self.sources_note([path]))

    # ------------------------------------------------------------------ Table 1
    def fidelity_rows(self, layer: str = FINAL_LAYER) -> list[dict[str, Any]]:
        """Table 1's rows from every fidelity.json of the stage (the standalone report places one
        per `mammo-sae fidelity` output), read through the record the command writes."""
        results: dict[str, FidelityResult] = {}
        root = self.layout.at_layer(layer).stage_dir("fidelity")
        for path in sorted(root.rglob("fidelity.json")):
            results.update(FidelityRecord.from_json(read_json(path), str(path)).results)
        rows = []
        for name, r in results.items():
            info = self.model_info(name)
            rows.append(
                {
                    "model": name,
                    "concept": r.concept or info.concept,
                    "variant": info.variant,
                    "n": r.n,
                    "n_pos": r.n_pos,
                    "auroc_original": r.original.auroc,
                    "auroc_original_low": r.original.auroc_low,
                    "auroc_original_high": r.original.auroc_high,
                    "auroc_sae": r.sae.auroc,
                    "auroc_sae_low": r.sae.auroc_low,
                    "auroc_sae_high": r.sae.auroc_high,
                    "recovered": r.recovered,
                    "fvu": r.fvu,
                    "l0": r.l0,
                    "dead_fraction": r.dead_fraction,
                    "path": r.path,
                    "warning": r.warning,
                }
            )
        order = {m.name: i for i, m in enumerate(self.models)}
        return sorted(rows, key=lambda r: (order.get(r["model"], len(order)), r["model"]))

    def section_table1(self, s: H.Section) -> None:
        if not (self.layout.stage_dir("fidelity")).is_dir():
            s.add(H.note("not run: analysis/fidelity/ is missing (fidelity stage)"))
            return
        rows = self.fidelity_rows()
        if not rows:
            raise MammoSaeError("analysis/fidelity/ holds no per-model fidelity results")
        for r in rows:
            r["recovered_shown"] = recovered_shown(r)
        self.data["table1"] = rows
        shown = [
            {
                **r,
                "orig": ci_text(
                    r["auroc_original"], r["auroc_original_low"], r["auroc_original_high"]
                ),
                "sae": ci_text(r["auroc_sae"], r["auroc_sae_low"], r["auroc_sae_high"]),
                "recovered": r["recovered_shown"],
            }
            for r in rows
        ]
        s.add(
            H.note(
                f"Concept AUROC ({self.eval_split} split, 95 % bootstrap CI) with the original "
                "features and with the SAE reconstruction in their place (no error term). "
                "Recovered = (AUROC_SAE − 0.5)/(AUROC_orig − 0.5), " + RECOVERED_RULE + ". "
                "FVU and L0 over the same images' patches; dead fraction = share of the SAE's "
                "latents that fire on none of these patches. (The SAE-training plot's dead "
                "fraction is another count: latents silent for the last dead-window of "
                "training patches, 0 by construction until that many patches have been seen; "
                "see the SAE training section.)"
            )
        )
        s.add(
            H.table(
                shown,
                ["concept", "variant", "orig", "sae", "recovered", "fvu", "l0", "dead_fraction"],
                headers=[
                    "concept",
                    "model",
                    "AUROC original",
                    "AUROC SAE",
                    "recovered",
                    "FVU",
                    "L0",
                    "dead fraction",
                ],
                left=2,
            )
        )
        for r in rows:
            if r["warning"]:
                s.add(H.note(f"{r['model']}: {r['warning']}"))
        root = self.layout.stage_dir("fidelity")
        s.add(self.sources_note(sorted([*root.rglob("fidelity.json"), *root.rglob("*.csv")])))

    # ------------------------------------------------------------------ Figure 2
    def sweep_curves(self, folder: Path) -> dict[str, dict[str, np.ndarray]]:
        """mode -> {ks, auroc, auroc_low, auroc_high} from a model's intervene.json."""
        path = folder / "intervene.json"
        if not path.is_file():
            return {}
        curves = InterveneRecord.from_json(read_json(path), str(path)).curves()
        for c in curves.values():
            c["ks"] = nice_ks(c["ks"])
        return curves

    def section_figure2(self, s: H.Section) -> None:
        dirs = self.model_dirs("intervene")
        if not dirs:
            s.add(H.note("not run: analysis/intervene/ is missing or empty (intervene stage)"))
            return
        grid: dict[str, dict[str, list[Curve]]] = {}
        data: dict[str, Any] = {}
        for folder in dirs:
            curves = self.sweep_curves(folder)
            if not curves:
                self.problems[f"figure2/{folder.name}"] = "no intervene.json with sweep points"
                continue
            info = self.model_info(folder.name)
            data[folder.name] = {
                mode: {k: v.tolist() for k, v in c.items()} for mode, c in curves.items()
            }
            for mode, c in curves.items():
                grid.setdefault(info.concept, {}).setdefault(mode, []).append(
                    Curve(
                        info.variant or info.name,
                        c["ks"],
                        c["auroc"],
                        c["auroc_low"],
                        c["auroc_high"],
                    )
                )
        self.data["figure2"] = data
        if grid:
            plot_topk_grid(grid, self.figure_path("figure2_topk.png"))
            fig = H.figure(
                self.made_figure("figure2_topk.png"),
                f"{self.eval_split.capitalize()} AUROC when only the top-k class-0 ∪ "
                "class-1 latents are kept (activated) "
                "or when they are zeroed (deactivated); bands: 95 % bootstrap CIs. "
                "k = 0 activated is a constant logit (0.5); deactivated k = 0 is the "
                "plain SAE.",
            )
            s.add(
                H.details("Figure 2 grid (a row per concept, a curve per model)", fig, open_=True)
            )
            points = (0, 1, 5, 10, 50, 100, 1000)
            rows = []
            for name, curves in data.items():
                for mode, c in curves.items():
                    row: dict[str, Any] = {"model": name, "mode": dict(MODES).get(mode, mode)}
                    row.update(
                        {
                            f"k={int(k)}": a
                            for k, a in zip(c["ks"], c["auroc"], strict=True)
                            if k in points
                        }
                    )
                    rows.append(row)
            columns = ["model", "mode"] + sorted(
                {k for r in rows for k in r if k.startswith("k=")}, key=lambda k: int(k[2:])
            )
            s.add("<h3>AUROC at selected k</h3>")
            s.add(H.table(rows, columns, left=2))
            s.add(
                self.sources_note(
                    sorted(
                        p
                        for folder in dirs
                        for p in [*folder.glob("*.json"), *folder.glob("*.csv")]
                    )
                )
            )
        else:  # nothing parseable: show the stage's own figures
            for folder in dirs:
                for png in sorted(folder.glob("*.png")):
                    fig = H.figure(
                        self.copy_figure(png, f"figure2_{folder.name}_{png.name}"), folder.name
                    )
                    s.add(H.details(f"{folder.name} · {png.name}", fig, open_=True))

    # ------------------------------------------------------------------ Figure 3 / Table 2
    def source_link(self, path: Path, text: str | None = None) -> str:
        """A link from the report page to a file of the run (relative, so the folder moves)."""
        import os

        href = Path(os.path.relpath(path, self.out)).as_posix()
        return H.link(href, text or path.relative_to(self.run).as_posix())

    def sources_note(self, paths: Iterable[Path]) -> str:
        links = [self.source_link(p) for p in paths if p.is_file()]
        return f'<p class="note">Data behind this table: {", ".join(links)}</p>' if links else ""

    def read_table2(
        self, root: Path
    ) -> tuple[list[Path], dict[str, dict[str, Any]], dict[str, Any]]:
        """The localization.json files under a localize folder (models.json order), their rows
        by label (`<model>` or `<model>/pointing`) and their settings records."""
        from ..analysis.localize import LocalizationSettings

        files = sorted(root.rglob("localization.json")) if root.is_dir() else []
        order = {m.name: i for i, m in enumerate(self.models)}
        files.sort(
            key=lambda p: (order.get(p.parent.relative_to(root).parts[0], len(order)), str(p))
        )
        by_model: dict[str, dict[str, Any]] = {}
        records: dict[str, LocalizationSettings] = {}
        for path in files:
            label = str(path.parent.relative_to(root)).replace("\\", "/")
            payload = read_json(path)
            if not isinstance(payload, Mapping):
                raise MammoSaeError(f"{path} is not a localization result (not a JSON object)")
            latents = payload.get("latents", [])
            # The record the localize command wrote (older files: their settings' defaults).
            settings = records[label] = LocalizationSettings.from_json(payload, where=str(path))
            baselines = payload.get("baselines", {}) if isinstance(payload, Mapping) else {}
            rows = [dict(r) for r in latents if isinstance(r, Mapping) and "latent" in r]
            rows.sort(key=lambda r: _num(r.get("rank")))
            by_model[label] = {
                "settings": settings.to_json(),
                "latents": rows,
                "baselines": baselines if isinstance(baselines, Mapping) else {},
            }
        return files, by_model, records

    @staticmethod
    def table2_rows(
        by_model: Mapping[str, Mapping[str, Any]], *, links: bool = True
    ) -> tuple[list[list[str]], list[str]]:
        """Table 2's rows (AP (#latent) per rank, then the baselines) and headers; `links`: each
        cell links to its latent's page (the final layer's SAE has the pages)."""
        ranks = sorted({int(_num(r.get("rank"))) for e in by_model.values() for r in e["latents"]})
        base_names = [
            b for b in BASELINE_COLUMNS if any(b in e["baselines"] for e in by_model.values())
        ]
        table = []
        for label, entry in by_model.items():
            cells = {int(_num(r.get("rank"))): r for r in entry["latents"]}
            row = [H.esc(label)]
            for k in ranks:  # every cell links to its latent's page (all Table-2 latents get one)
                r = cells.get(k)
                text = f"{_num(r.get('ap')):.3f} (#{int(r['latent'])})" if r else ""
                linked = r is not None and links
                row.append(H.link(f"latents/{int(r['latent'])}.html", text) if linked else text)
            row += [H.esc(H.fmt(_num(entry["baselines"].get(b, {}).get("ap")))) for b in base_names]
            table.append(row)
        headers = (
            ["setting"] + [f"rank {k}" for k in ranks] + [BASELINE_COLUMNS[b] for b in base_names]
        )
        return table, headers

    def section_localize(self, s: H.Section) -> None:
        root = self.layout.stage_dir("localize")
        files, by_model, records = self.read_table2(root)
        if not files:
            s.add(H.note("not run: no analysis/localize/*/localization.json (localize stage)"))
            return
        self.data["table2"] = by_model
        table, headers = self.table2_rows(by_model)
        first = next(iter(records.values()))
        s.add(
            H.note(
                f"AP@IoU {first.iou_threshold} of each latent's heatmap boxes (threshold "
                f"{first.threshold}, {first.split or '?'} split, "
                f"{first.image_set or '?'} images, cells placed at their "
                f"{first.align} positions; VOC all-point AP). Cells: AP (#latent), "
                "linked to the latent's page. A row named after a model scores the top latents of its "
                "class-1 probe ranking (the paper's choice); a row ending in /pointing scores the "
                "latents chosen by the pointing game instead: those whose strongest cell most often "
                "falls on a ground-truth box of the ranking split's positive images (chosen without "
                "the evaluated images)."
            )
        )
        s.add(
            H.note(
                "Baselines, through the same threshold, boxes and AP: chance = random boxes of the "
                "findings' own sizes centred in the breast (random scores, mean over draws); "
                "classifier map = the classifier's own activation map (w · f per cell, whose mean is "
                "its logit); oracle = one box per finding centred on the truth with the median size "
                "of the latents' predicted boxes, the best any latent can do with boxes that size."
            )
        )
        s.add("<h3>Table 2 · AP per latent</h3>")
        s.add(H.html_table(table, headers, left=1))
        s.add(
            self.sources_note(
                [
                    p
                    for f in files
                    for p in (f, f.parent / "localization.csv", f.parent / "table2.csv")
                ]
            )
        )
        s.add("<h3>Figure 3 · Heatmaps of the top latents</h3>")
        shown = 0
        for path in files:
            label = str(path.parent.relative_to(root)).replace("\\", "/")
            for png in sorted(path.parent.glob("*.png")):
                safe = label.replace("/", "_")
                fig = H.figure(
                    self.copy_figure(png, f"figure3_{safe}_{png.name}"),
                    f"{label}: first row the classifier's own map (when scored), then "
                    "the latents by rank; GT boxes white, predicted boxes cyan (solid: "
                    "hit a GT box at the IoU threshold, dashed: miss); each panel's "
                    "colours run from 0 to its own maximum.",
                )
                s.add(H.details(f"{label} · Figure 3 grid", fig, open_=shown == 0))
                shown += 1
        if not shown:
            s.add(H.note("no Figure-3 grids were written (localize figure_images = 0?)"))

    # ------------------------------------------------------------------ Table 2 by layer
    def tapped_layers(self) -> list[str]:
        """The run's tapped layers other than the final one that have a folder
        (RUN/layers/<layer>/): those the config lists (extract.layers), in its order (a layer
        dropped from the config leaves its folder behind: not shown); every folder by name
        when the config names no layers."""
        root = self.layout.layers_dir
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        extract = self.config.get("extract") if isinstance(self.config, Mapping) else None
        listed = extract.get("layers") if isinstance(extract, Mapping) else None
        if not isinstance(listed, list):
            return found
        return [str(x) for x in listed if str(x) in found]

    def section_layers(self, s: H.Section) -> None:
        """Tables 1 and 2 and Figure 2 of every tapped layer, rows labelled `<model> @ <layer>`,
        beside the final layer's own rows for comparison."""
        layers = self.tapped_layers()
        s.add(
            H.note(
                "Each tapped layer (config extract.layers) has its own stores, SAE, summaries, "
                "probe ranking, interventions, fidelity and localisation "
                "(RUN/layers/<layer>/), with the final layer's settings. Below the final layer "
                "the pooled identity does not hold, so fidelity and interventions run each "
                "stored, reconstructed or edited map through the rest of the classifier's "
                "network on the evaluation split (path “network from <layer>”). Separation, "
                "the atlas and the latent pages read the final layer's SAE, and the lower "
                "layers have no classifier-map baseline. Latent numbers are of that layer's SAE."
            )
        )
        self.layers_table1(s, layers)
        self.layers_figure2(s, layers)
        self.layers_table2(s, layers)

    def layers_table1(self, s: H.Section, layers: list[str]) -> None:
        rows = [
            {**r, "label": f"{r['model']} @ {layer}"}
            for layer in [FINAL_LAYER, *layers]
            for r in self.fidelity_rows(layer)
        ]
        self.data["table1_layers"] = rows
        if not rows:
            return
        shown = [
            {
                **r,
                "orig": ci_text(
                    r["auroc_original"], r["auroc_original_low"], r["auroc_original_high"]
                ),
                "sae": ci_text(r["auroc_sae"], r["auroc_sae_low"], r["auroc_sae_high"]),
                "recovered": recovered_shown(r),
            }
            for r in rows
        ]
        s.add("<h3>Table 1 by layer · fidelity</h3>")
        s.add(
            H.table(
                shown,
                ["label", "orig", "sae", "recovered", "fvu", "l0", "path"],
                headers=[
                    "model @ layer",
                    "AUROC original",
                    "AUROC SAE",
                    "recovered",
                    "FVU",
                    "L0",
                    "logit path",
                ],
                left=1,
            )
        )

    def layers_figure2(self, s: H.Section, layers: list[str]) -> None:
        grid: dict[str, dict[str, list[Curve]]] = {}
        data: dict[str, Any] = {}
        for layer in [FINAL_LAYER, *layers]:
            for folder in self.model_dirs("intervene", layer):
                curves = self.sweep_curves(folder)
                info = self.model_info(folder.name)
                label = f"{info.variant or info.name} @ {layer}"
                data[f"{folder.name} @ {layer}"] = {
                    mode: {k: v.tolist() for k, v in c.items()} for mode, c in curves.items()
                }
                for mode, c in curves.items():
                    grid.setdefault(info.concept, {}).setdefault(mode, []).append(
                        Curve(label, c["ks"], c["auroc"], c["auroc_low"], c["auroc_high"])
                    )
        self.data["figure2_layers"] = data
        if not grid:
            return
        plot_topk_grid(grid, self.figure_path("figure2_layers.png"))
        s.add("<h3>Figure 2 by layer · top-k interventions</h3>")
        s.add(
            H.figure(
                self.made_figure("figure2_layers.png"),
                "As Figure 2, a curve per model and layer: each layer's own SAE and rankings; "
                "k runs to that SAE's width.",
            )
        )

    def layers_table2(self, s: H.Section, layers: list[str]) -> None:
        by_label: dict[str, dict[str, Any]] = {}
        per_layer: dict[str, dict[str, Any]] = {}
        files: list[Path] = []
        for layer in [FINAL_LAYER, *layers]:
            root = self.layout.at_layer(layer).stage_dir("localize")
            found, by_model, _ = self.read_table2(root)
            if layer != FINAL_LAYER:
                per_layer[layer] = by_model
                files += found
                if not found:
                    where = self.layout.rel(root)
                    s.add(H.note(f"{layer}: not run (no {where}/*/localization.json)"))
            for label, entry in by_model.items():
                model, _, rest = label.partition("/")
                by_label[f"{model} @ {layer}" + (f"/{rest}" if rest else "")] = entry
        self.data["table2_layers"] = per_layer
        if not per_layer or not by_label:
            return
        table, headers = self.table2_rows(by_label, links=False)
        s.add("<h3>Table 2 by layer · AP per latent</h3>")
        s.add(H.html_table(table, headers, left=1))
        s.add(self.sources_note(files))

    # ------------------------------------------------------------------ Figures 4/5
    def section_separation(self, s: H.Section) -> None:
        root = self.layout.stage_dir("separation")
        folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if root.is_dir() and any(root.glob("*.json")):
            folders = [root] + folders
        if not folders:
            s.add(H.note("not run: analysis/separation/ is missing (separation stage)"))
            return
        for skip in self.skipped_comparisons():
            s.add(H.note(f"No pretrained-vs-finetuned comparison for {skip['reason']}."))
        data: dict[str, Any] = {}
        for folder in folders:
            label = folder.name if folder != root else "all"
            s.add(f"<h3>{H.esc(label)}</h3>")
            for png in sorted(folder.glob("*.png")):
                fig = H.figure(
                    self.copy_figure(png, f"separation_{label}_{png.name}"),
                    f"{label}: class-mean latent vectors z̄(1) (up) and z̄(0) (down); "
                    "dominant latents labelled, flagged latents marked",
                )
                s.add(H.details(f"{label} · {png.name}", fig, open_=True))
            results: dict[str, dict[str, Any]] = {}
            top = None
            for path in sorted(folder.glob("*.json")):
                doc = read_json(path)
                results.update(_named_results(doc, "separation"))
                top = top or (doc.get("config", {}) if isinstance(doc, dict) else {}).get("top")
            rows = []
            for name, r in results.items():
                dominant = r.get("class1_dominant", []) or []
                flagged = r.get("flagged", []) or []
                rows.append(
                    {
                        "model": name,
                        "separation": _num(r.get("separation")),
                        "dominant": ", ".join(str(e.get("index")) for e in dominant[:10]),
                        "flagged": ", ".join(
                            f"{e.get('index')} ({'/'.join(e.get('flags', []))})" for e in flagged
                        )
                        or "none",
                    }
                )
            data[label] = {"models": rows, "results": results}
            if rows:
                s.add(
                    H.note(
                        f"Separation index = the mean, over the {top or 10} latents most "
                        "dominant in class 1, of (z̄(1) − z̄(0)) / (z̄(1) + z̄(0)), where z̄(c) is "
                        "a latent's mean activation over the images of class c: 1 when those "
                        "latents fire only on the concept's images, near 0 when they fire on "
                        "both classes alike."
                    )
                )
                s.add(self.sources_note(sorted(folder.glob("*.json"))))
                s.add(
                    H.table(
                        rows,
                        ["model", "separation", "dominant", "flagged"],
                        headers=[
                            "model",
                            "separation index",
                            "most class-1-dominant latents",
                            "flagged (confounder / off-breast / associated)",
                        ],
                    )
                )
            debias = self._debias_rows(label, results)
            if debias:
                data[label]["debias"] = debias
                s.add(
                    H.note(
                        "Associated latents: image-mean activation tells images with the attribute "
                        "(the phantom's marker) from those without among concept-negative images "
                        "(AUROC ≥ 0.8 by default, on the ranking split). Switching them all off, evaluation split: "
                        "concept AUROC, and the shortcut (AUROC of the logit for the attribute among "
                        "concept negatives; 0.5 = no shortcut)."
                    )
                )
                s.add(
                    H.table(
                        debias,
                        [
                            "model",
                            "n_associated",
                            "in_top",
                            "auroc_plain",
                            "auroc_off",
                            "shortcut_plain",
                            "shortcut_off",
                        ],
                        headers=[
                            "model",
                            "associated latents",
                            f"of the top {top or 10}",
                            "concept AUROC (SAE)",
                            "… associated off",
                            "shortcut AUROC (SAE)",
                            "… associated off",
                        ],
                    )
                )
        self.data["separation"] = {k: v["models"] for k, v in data.items()}
        self.data["debias"] = {k: v["debias"] for k, v in data.items() if v.get("debias")}
        self.separation_results = {k: v["results"] for k, v in data.items()}

    def _debias_rows(
        self, concept: str, results: dict[str, dict[str, Any]]
    ) -> list[dict[str, Any]]:
        rows = []
        for variant, r in results.items():
            path = self.layout.associated_off_dir(concept, variant) / "edit.json"
            if not path.is_file():
                continue
            edit = read_json(path)
            if sorted(edit.get("latents", [])) != sorted(r.get("associated", [])):
                continue  # an edit from another separation result
            sc = edit.get("shortcut", {}).get("attribute_auroc_among_negatives", {})
            rows.append(
                {
                    "model": variant,
                    "n_associated": len(r.get("associated", [])),
                    "in_top": r.get("associated_in_top"),
                    "auroc_plain": _num(edit["plain_sae"].get("auroc")),
                    "auroc_off": _num(edit["edited"].get("auroc")),
                    "shortcut_plain": _num(sc.get("plain_sae")),
                    "shortcut_off": _num(sc.get("edited")),
                }
            )
        return rows

    # ------------------------------------------------------------------ SAE training
    def section_sae(self, s: H.Section) -> None:
        root = self.layout.sae_dir
        if not root.is_dir():
            s.add(H.note("not run: sae/ is missing (sae stage)"))
            return
        info: dict[str, Any] = {}
        cfg_files = sorted(root.rglob("cfg.json"))
        if cfg_files:
            cfg = read_json(cfg_files[0])
            if isinstance(cfg, Mapping):
                inner = cfg.get("config", {}) if isinstance(cfg.get("config"), Mapping) else {}
                info = {
                    "architecture": cfg.get("architecture"),
                    "d": cfg.get("d"),
                    "h": cfg.get("h"),
                    "l1_coeff": inner.get("l1_coeff"),
                    "k": inner.get("k") if cfg.get("architecture") != "relu-l1" else None,
                    "normalisation": inner.get("normalisation"),
                }
                info = {k: v for k, v in info.items() if v is not None}
        logs = sorted(root.rglob("*.jsonl"))
        self.data["sae"] = {"checkpoint": info}
        if info:
            s.add(H.kpis({k: v for k, v in info.items()}))
        if not logs:
            s.add(H.note("no SAE training log (*.jsonl) under sae/"))
            return
        rows = read_jsonl(logs[0])
        if not rows:
            raise MammoSaeError(f"{logs[0]} is empty")
        drawn = plot_training_curves(
            rows,
            self.figure_path("sae_training.png"),
            title=f"SAE training ({logs[0].name}, {len(rows)} entries)",
        )
        n_marks = len(resample_positions(rows, training_series(rows)[1]))
        marks = (
            f"; dotted lines: the {n_marks} logged steps by which dead latents were resampled"
            if n_marks
            else ""
        )
        s.add(
            H.figure(
                self.made_figure("sae_training.png"),
                "SAE training curves: " + ", ".join(drawn) + marks,
            )
        )
        if "dead_fraction" in drawn:
            window = next(
                (
                    read_json(p).get("dead_window_patches")
                    for p in sorted(root.rglob("train_config.json"))
                ),
                None,
            )
            seen = max(
                (
                    _num(r.get(k))
                    for r in rows
                    for k in ("patches_seen", "n_seen", "tokens")
                    if math.isfinite(_num(r.get(k)))
                ),
                default=math.nan,
            )
            s.add(
                H.note(
                    "Dead fraction while training = share of latents that have not fired for the last "
                    f"{H.fmt(window) if isinstance(window, int) else 'dead-window'} training patches "
                    "(dead_window_patches); until that many patches have been seen it is 0 by "
                    "construction"
                    + (f" (this run saw {H.fmt(int(seen))})" if math.isfinite(seen) else "")
                    + ". Table 1's dead fraction instead counts latents "
                    "that fire on none of the evaluation images' patches."
                )
            )
        s.add(self.sources_note([logs[0], *sorted(root.rglob("train_config.json"))]))
        last = rows[-1]
        final = {
            k: last[k]
            for k in last
            if isinstance(last[k], (int, float)) and not isinstance(last[k], bool)
        }
        self.data["sae"]["final_log_entry"] = final
        s.add("<h3>Last log entry</h3>")
        s.add(H.table([final]) if final else H.note("(no numeric fields)"))

    # ------------------------------------------------------------------ latents
    def latent_lists(self) -> dict[str, list[int]]:
        """Latent lists by label: every Table-2 row whole (each of its latents gets a page, linked
        from its cell), then, for a model without a row, the top of its class-1 probe ranking."""
        out: dict[str, list[int]] = {
            label: [int(r["latent"]) for r in entry["latents"]]
            for label, entry in self.data.get("table2", {}).items()
        }
        localised = {label.split("/")[0] for label in out}
        for folder in self.model_dirs("probe"):
            if folder.name in localised:
                continue
            for score in RANKING_PREFERENCE:
                path = folder / ranking_file_name(1, score)
                if path.is_file():
                    from ..analysis.probe import read_ranking

                    out[folder.name] = read_ranking(path)[0][: self.top_latents]
                    break
        return {label: lats for label, lats in out.items() if lats}

    def section_latents(self, s: H.Section) -> None:
        lists = self.latent_lists()
        if not lists:
            s.add(H.note("not run: no probe rankings or localisation results to pick latents from"))
            return
        self.data["top_latents"] = lists
        pages: dict[int, dict[str, Any]] = {}
        if self.latent_pages:
            from .latents import LatentPages

            pages = LatentPages(self, lists).write_all()
        rows = []
        for j in dict.fromkeys(j for lats in lists.values() for j in lats):
            ranks = [f"{label} #{lats.index(j) + 1}" for label, lats in lists.items() if j in lats]
            detail = pages.get(j, {})
            cell = H.link(f"latents/{j}.html", j) if detail.get("page") else H.esc(j)
            flags = ", ".join(f"{f['flag']} ({f['model']})" for f in detail.get("flags", []))
            rows.append([cell, H.esc(", ".join(ranks)), H.esc(flags)])
        s.add(
            H.note(
                "Every latent of Table 2 (ranked and pointing-chosen rows) and, for models "
                "without a Table-2 row, the top of the class-1 probe ranking. Each links to its "
                "page: one section per model that lists it (top-activating images with "
                "heatmaps, activation histogram, class association, off-breast and confounder "
                "scores, all through that model's features), and the effect on every logit. "
                "Flags name the model whose separation raised them."
            )
        )
        s.add(
            H.html_table(rows, ["latent", "listed by (rank)", "separation flags (model)"], left=2)
        )

    def section_atlas(self, s: H.Section) -> None:
        from .atlas import write_atlas_page

        write_atlas_page(self, s)  # atlas.html (its own module) and a link here


def default_workers() -> int:
    """Processes that draw latent pages: the cores this process may use, at most 4 (more gain
    little on a few dozen pages and multiply memory)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def build_report(
    run_dir: Path,
    out: Path | None = None,
    *,
    strict: bool = False,
    top_latents: int = 10,
    latent_pages: bool = True,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write the report of `run_dir` into `out` (default RUN/report/) and return its index.html.

    `strict=True` raises on the first unreadable part instead of noting it in the page;
    `workers` processes draw the latent pages (None: `default_workers()`).
    """
    if top_latents < 1:
        raise MammoSaeError(f"top_latents must be at least 1, got {top_latents}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():  # before the lock, which would create RUN/report/
        raise MammoSaeError(f"run directory not found: {run_dir}")
    if run_dir.is_dir() and not RunLayout(run_dir).is_run():
        # Outputs of the individual commands (extract, sae train, probe, ...): report those.
        from .standalone import build_standalone_report

        return build_standalone_report(
            run_dir,
            out,
            strict=strict,
            top_latents=top_latents,
            latent_pages=latent_pages,
            progress=progress,
            workers=workers,
        )
    out = Path(out) if out is not None else RunLayout(run_dir).report_dir
    with writer_lock(out):
        return ReportBuilder(
            run_dir,
            out,
            strict=strict,
            top_latents=top_latents,
            latent_pages=latent_pages,
            progress=progress,
            workers=workers,
        ).build()


__all__ = [
    "ModelEntry",
    "ModelInfo",
    "ReportBuilder",
    "build_report",
    "read_jsonl",
    "split_model_name",
]
