"""`mammo-sae report` on a folder of stand-alone command outputs (no `mammo-sae run`).

The individual commands write self-describing folders: `extract` a store (`manifest.json`),
`sae train` an SAE (`cfg.json`), `probe` / `intervene` / `fidelity` / `localize` / `separation`
their JSON (`probe.json`, `intervene.json`, `fidelity.json`, `localization.json`,
`separation.json`, each with the `config` it ran with), `classifier eval` an `eval*.json`,
`explain` an `explain.json`. This module finds them under DIR (by those files), ties each
analysis to its store and concept through the recorded config, lays them out as a run directory
in a temporary folder (analysis files copied, stores and the SAE linked, since they are large)
and builds the usual report from it into DIR/report. The report's first section lists what was
found and which parts are missing, with the command that makes each.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import html_blocks as H
from ..errors import MammoSaeError
from ..io import read_json, write_json
from ..layout import ModelEntry, RunLayout
from .build import ReportBuilder

# Output kind -> (file that marks it, command that writes it, report part it feeds).
KINDS = {
    "store": ("manifest.json", "mammo-sae extract", "latent pages (with the SAE)"),
    "sae": ("cfg.json", "mammo-sae sae train", "SAE training, latent pages"),
    "eval": ("eval*.json", "mammo-sae classifier eval", "Classifiers"),
    "probe": ("probe.json", "mammo-sae probe", "Top latents"),
    "intervene": ("intervene.json", "mammo-sae intervene", "Figure 2"),
    "fidelity": ("fidelity.json", "mammo-sae fidelity", "Table 1"),
    "localize": ("localization.json", "mammo-sae localize", "Figure 3 · Table 2"),
    "separation": ("separation.json", "mammo-sae separation", "Figures 4/5"),
    "explain": ("explain.json", "mammo-sae explain", "linked, not summarised"),
}
MAX_DEPTH = 6


@dataclass
class Found:
    kind: str
    path: Path  # the output folder (the JSON file itself for `eval`)
    doc: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # why it is not shown, when it is not

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.doc.get("config")
        return cfg if isinstance(cfg, dict) else {}


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = read_json(path)
    except (MammoSaeError, OSError):
        return {}
    return doc if isinstance(doc, dict) else {}


def discover(root: Path, skip: Path | None = None) -> list[Found]:
    """Every stand-alone output under `root` (stores and SAEs are not searched inside)."""
    from ..activations.store import STORE_FORMAT
    from ..sae.checkpoints import NATIVE_FORMAT

    found: list[Found] = []
    root = root.resolve()
    skip = skip.resolve() if skip is not None else None
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and here / d != skip and depth < MAX_DEPTH
        )
        names = set(files)
        if "manifest.json" in names and _read(here / "manifest.json").get("format") == STORE_FORMAT:
            found.append(Found("store", here, _read(here / "manifest.json")))
            dirs[:] = []
            continue
        if "cfg.json" in names and _read(here / "cfg.json").get("format") == NATIVE_FORMAT:
            found.append(Found("sae", here, _read(here / "cfg.json")))
            dirs[:] = []
            continue
        for kind in ("probe", "intervene", "fidelity", "localize", "separation", "explain"):
            if KINDS[kind][0] in names:
                found.append(Found(kind, here, _read(here / KINDS[kind][0])))
        for name in sorted(files):
            if name.startswith("eval") and name.endswith(".json"):
                doc = _read(here / name)
                if {"model", "concept", "split", "n"} <= set(doc):
                    found.append(Found("eval", here / name, doc))
    return found


def _same_path(recorded: Any, target: Path, root: Path) -> bool:
    """Whether a path recorded in a config names `target`: the same file, or (a relative path
    recorded from another working directory) the same trailing folder names."""
    if not recorded:
        return False
    path = Path(str(recorded))
    for base in (Path.cwd(), root):
        candidate = path if path.is_absolute() else base / path
        try:
            if candidate.exists() and candidate.resolve() == target.resolve():
                return True
        except OSError:
            continue
    tail = tuple(p for p in path.parts if p not in (".", "..", path.anchor))
    return bool(tail) and target.resolve().parts[-len(tail) :] == tail


def _same(recorded: Any, item: Found, root: Path) -> bool:
    return _same_path(recorded, item.path, root)


def _match(recorded: Any, items: list[Found], root: Path) -> Found | None:
    return next((item for item in items if _same(recorded, item, root)), None)


class Inventory:
    """The found outputs tied together: models (one per store and concept), the SAE, the
    evaluation split, and each output's place in the run layout."""

    def __init__(self, root: Path, found: list[Found]) -> None:
        self.root = root
        self.found = found
        self.of = {k: [f for f in found if f.kind == k] for k in KINDS}
        self.sae = self._choose_sae()
        analyses = [f for k in ("probe", "intervene", "localize") for f in self.of[k]]
        for f in analyses + self.of["fidelity"] + self.of["separation"]:
            sae = f.config.get("sae")
            if self.sae is not None and sae and not _same(sae, self.sae, root):
                f.note = f"made with another SAE ({sae}) than the one shown"
        # A model = (store, concept); named by its concept, plus the store folder when needed.
        keys: dict[tuple[str, str], Found | None] = {}
        for f in analyses:
            if f.note:
                continue
            keys.setdefault(self._key(f), _match(f.config.get("store"), self.of["store"], root))
        per_concept = Counter(concept for _, concept in keys)
        self.models: dict[tuple[str, str], ModelEntry] = {}
        self.stores: dict[str, Found] = {}
        taken: set[str] = set()
        for (store_key, concept), store in keys.items():
            name = concept or Path(store_key).name
            if per_concept[concept] > 1 or name in taken:
                name = f"{name}-{Path(store_key).name}"
            while name in taken:
                name += "_"
            taken.add(name)
            self.models[(store_key, concept)] = ModelEntry(name, concept, "", "", encoder_key=name)
            if store is not None:
                self.stores[name] = store
        for f in self.of["intervene"]:  # the classifier a model's logit came from
            m = self.model_of(f)
            if m is not None and not m.classifier and f.config.get("classifier"):
                m.classifier = str(f.config["classifier"])
        for name, store in self.stores.items():
            made_by = store.doc.get("model") or {}
            model = next(m for m in self.models.values() if m.name == name)
            if made_by.get("kind") == "classifier" and not model.classifier:
                model.classifier = str(made_by.get("source") or "")
        evaluated = self.of["localize"] + self.of["intervene"]
        splits = Counter(
            str(f.config.get("split")) for f in evaluated if f.config.get("split") and not f.note
        )
        self.eval_split = splits.most_common(1)[0][0] if splits else "test"

    def _choose_sae(self) -> Found | None:
        saes = self.of["sae"]
        if not saes:
            return None
        used = Counter()
        for f in self.found:
            hit = _match(f.config.get("sae"), saes, self.root)
            if hit is not None:
                used[str(hit.path)] += 1
        best = max(saes, key=lambda s: used[str(s.path)])
        for s in saes:
            if s is not best:
                s.note = f"another SAE ({best.path.relative_to(self.root)} is shown)"
        return best

    def _key(self, f: Found) -> tuple[str, str]:
        """(store, concept) of an analysis output: the model it belongs to."""
        store = _match(f.config.get("store"), self.of["store"], self.root)
        concept = str(f.config.get("concept") or f.doc.get("concept") or "")
        return (str(store.path) if store else str(f.config.get("store")), concept)

    def model_of(self, f: Found) -> ModelEntry | None:
        return self.models.get(self._key(f))

    # ------------------------------------------------------------------ staging
    def stage(self, run: Path) -> dict[str, Any]:
        """Lay the outputs out as a run directory under `run`; returns the report's config."""
        layout = RunLayout(run)
        placed: Counter[tuple[str, str]] = Counter()
        for kind in ("probe", "intervene", "localize"):
            for f in self.of[kind]:
                m = None if f.note else self.model_of(f)
                if m is None:
                    f.note = f.note or "its store and concept match no model"
                    continue
                placed[(kind, m.name)] += 1
                if placed[(kind, m.name)] == 1:
                    target = layout.model_analysis_dir(kind, m.name)
                elif kind == "localize":  # the report shows sub-settings as <model>/<setting>
                    target = layout.model_analysis_dir(kind, m.name) / f.path.name
                else:
                    target = layout.model_analysis_dir(kind, f"{m.name}-{f.path.name}")
                _copy_files(f.path, target)
        for i, f in enumerate(x for x in self.of["fidelity"] if not x.note):
            _copy_files(f.path, layout.stage_dir("fidelity") / f"{i}-{f.path.name}")
        for f in self.of["separation"]:
            if not f.note:
                concept = str(f.doc.get("concept") or f.config.get("concept") or f.path.name)
                _copy_files(f.path, layout.separation_dir(concept))
        metrics: dict[str, Any] = {}
        models = list(self.models.values())
        for f in self.of["eval"]:
            same = [m for m in models if m.concept == f.doc.get("concept")]
            m = next(
                (m for m in same if _same_path(f.doc["model"], Path(m.classifier), self.root)), None
            )
            if m is None and len(same) == 1 and not same[0].classifier:
                m = same[0]
                m.classifier = str(f.doc["model"])
            if m is None:
                concept, path = str(f.doc["concept"]), str(f.doc["model"])
                m = ModelEntry(f"{concept}-{Path(path).name}", concept, "", path)
                models.append(m)
            metrics[m.name] = {k: f.doc.get(k) for k in ("auroc", "auprc", "n", "n_pos")}
        write_json(
            layout.models_json,
            {
                "schema_version": 1,
                "test_metrics": metrics,
                "models": [
                    {
                        "name": m.name,
                        "concept": m.concept,
                        "variant": m.variant,
                        "classifier": m.classifier,
                        "encoder_key": m.encoder_key,
                    }
                    for m in models
                ],
            },
        )
        links_ok = True
        if self.sae is not None:
            links_ok &= _link(self.sae.path, layout.sae_dir)
            from ..analysis.summaries import default_cache_dir

            cache = default_cache_dir(self.sae.path)
            if cache.is_dir():  # the commands' summaries cache: latent pages reuse it
                links_ok &= _link(cache, layout.stage_dir("summaries"))
        for name, store in self.stores.items():
            links_ok &= _link(store.path, layout.store_dir(name, self.eval_split))
        if not links_ok:
            self.link_problem = (
                "this file system refused symbolic links: no SAE curves or latent pages"
            )
        threshold = next(
            (f.config["threshold"] for f in self.of["localize"] if f.config.get("threshold")), None
        )
        config: dict[str, Any] = {
            "name": self.root.name,
            "extract": {"eval_split": self.eval_split},
        }
        if threshold:
            config["analysis"] = {"localize": {"threshold": threshold}}
        return config

    link_problem = ""

    def missing(self) -> list[dict[str, str]]:
        """The report parts no found output feeds, with the command that makes them."""
        out = []
        for kind, (marker, command, part) in KINDS.items():
            if kind != "explain" and not any(not f.note for f in self.of[kind]):
                out.append({"output": kind, "command": command, "feeds": part, "marker": marker})
        return out


def _copy_files(src: Path, dst: Path) -> None:
    """The output folder's own files (not its sub-folders, which may be other outputs)."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            shutil.copyfile(path, dst / path.name)


def _link(src: Path, dst: Path) -> bool:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src.resolve(), dst, target_is_directory=True)
    except OSError:
        return False
    return True


class StandaloneReport(ReportBuilder):
    """The run report, with the summary replaced by the inventory of found and missing outputs."""

    def __init__(
        self, staging: Path, out: Path, inventory: Inventory, config: dict[str, Any], **kw: Any
    ) -> None:
        super().__init__(staging, out, **kw)
        self.inventory = inventory
        self.config = config

    def section_summary(self, s: H.Section) -> None:
        inv = self.inventory
        rows = []
        for f in inv.found:
            path = f.path.resolve()
            rel = path.relative_to(inv.root) if path.is_relative_to(inv.root) else path
            rows.append(
                {
                    "output": f.kind,
                    "path": str(rel),
                    "command": KINDS[f.kind][1],
                    "shown": "no: " + f.note if f.note else "yes",
                }
            )
        missing = inv.missing()
        self.data["run"] = {
            "name": inv.root.name,
            "standalone": True,
            "stages": [],
            "not_run": [m["output"] for m in missing],
        }
        self.data["standalone"] = {"found": rows, "missing": missing, "eval_split": inv.eval_split}
        s.add(
            H.note(
                f"Not a `mammo-sae run` directory: a report of the stand-alone command "
                f"outputs found under {inv.root.name}/ (evaluation split: "
                f"{inv.eval_split})."
            )
        )
        s.add("<h3>Found</h3>")
        s.add(H.table(rows, ["output", "path", "command", "shown"], left=4))
        if missing:
            s.add("<h3>Missing</h3>")
            parts = "; ".join(f"{m['command']} → {m['feeds']}" for m in missing)
            s.add(
                H.note(
                    "No output of these commands was found, so the parts they feed are "
                    f"empty: {parts}"
                )
            )
        if inv.link_problem:
            s.add(H.note(inv.link_problem))
        explained = inv.of["explain"]
        if explained:
            s.add("<h3>Explained images (mammo-sae explain)</h3>")
            links = []
            for f in explained:
                index = f.path / "index.html"
                href = os.path.relpath(index, self.out.resolve()) if index.is_file() else ""
                n = len(f.doc.get("images") or [])
                links.append(
                    f"<li>{H.link(href, f.path.name) if href else H.esc(f.path.name)}: "
                    f"{n} image(s), concept {H.esc(f.doc.get('concept') or '?')}</li>"
                )
            s.add("<ul>" + "".join(links) + "</ul>")


def build_standalone_report(root: Path, out: Path | None = None, **kw: Any) -> Path:
    """The report of the stand-alone outputs under `root` (default out: ROOT/report)."""
    root = Path(root)
    out = Path(out) if out is not None else RunLayout(root).report_dir
    found = discover(root, skip=out)
    if not found:
        raise MammoSaeError(
            f"{root} is not a mammo-sae run directory (no config.yaml, stages/, models/models.json "
            "or analysis/) and holds no outputs of the stand-alone commands (extract, sae train, "
            "classifier eval, probe, intervene, fidelity, localize, separation, explain); pass "
            "the --out of `mammo-sae run`, or a folder holding those commands' --out folders"
        )
    inventory = Inventory(root.resolve(), found)
    with tempfile.TemporaryDirectory(prefix="mammo-sae-report-") as tmp:
        staging = Path(tmp) / root.resolve().name
        staging.mkdir()
        config = inventory.stage(staging)
        return StandaloneReport(staging, out, inventory, config, **kw).build()
