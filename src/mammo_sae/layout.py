"""The run directory as a contract: its stages, its model entries and every path in it.

`mammo-sae run` writes a run directory (pipeline.py) and `mammo-sae report` reads it
(report/): both take the stage list, the model records and the paths from here, so the writer
and the reader cannot drift apart. docs/architecture.md ("Run directory") documents the layout
and tests/test_run_layout_spec.py holds it to this module.

A low-level module: it imports nothing of the pipeline, the analyses or the report.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import recorded_path, resolve_recorded

# ============================================================================ stages


@dataclass(frozen=True)
class StageSpec:
    """One stage of `mammo-sae run`: what it does, what it needs, where it writes."""

    name: str
    description: str
    deps: tuple[str, ...] = ()
    analysis: bool = False  # writes under analysis/<name>/ (and takes analysis.<name> options)
    folder: str = ""  # its output folder when not an analysis stage (default: its name)
    # Keeps resume-only files (training states, checkpoints) that are no part of its result.
    resumable: bool = True

    @property
    def output(self) -> str:
        """The folder it writes, relative to the run (what the runner records)."""
        return f"analysis/{self.name}" if self.analysis else (self.folder or self.name)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("data", "dataset (phantom generation or VinDr checks)", resumable=False),
    StageSpec("models", "pretrained/finetuned concept classifiers", ("data",)),
    StageSpec("extract", "activation stores", ("models",), folder="stores", resumable=False),
    StageSpec("sae", "train the sparse autoencoder", ("extract",)),
    StageSpec(
        "summaries", "per-image mean/max latent vectors of every store", ("sae",), analysis=True
    ),
    StageSpec("probe", "class-wise latent rankings", ("summaries",), analysis=True),
    StageSpec("intervene", "top-k activated/deactivated AUROC sweeps", ("probe",), analysis=True),
    StageSpec(
        "fidelity",
        "AUROC with original vs SAE-reconstructed features",
        ("summaries",),
        analysis=True,
    ),
    StageSpec("localize", "heatmaps, boxes, AP per latent", ("probe",), analysis=True),
    StageSpec("separation", "pretrained vs finetuned latent separation", ("probe",), analysis=True),
    StageSpec(
        "atlas",
        "every latent: associations, spatial profile, names, clusters",
        ("summaries",),
        analysis=True,
    ),
    StageSpec(
        "report",
        "static HTML report",
        ("intervene", "fidelity", "localize", "separation", "atlas"),
    ),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
ANALYSIS_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.analysis)


def stage(name: str) -> StageSpec:
    """The stage called `name`; a KeyError naming the stages otherwise."""
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def stage_list_text() -> str:
    """`data, models, … or report`: the stage names for help and error texts."""
    return f"{', '.join(STAGE_NAMES[:-1])} or {STAGE_NAMES[-1]}"


# ============================================================================ layers

FINAL_LAYER = "final"
# Layer taps `extract --layer` knows (EfficientNet.layer_info); they name folders, so no others.
LAYER_PATTERN = re.compile(r"final|stem|blocks\.\d+")
# The stages run again for every tapped layer other than the final one (`<stage>@<layer>`).
# Below the final layer intervene and fidelity run each edited map through the rest of the
# classifier's network (the pooled identity holds only at the final layer). Separation and the
# atlas stay final-layer stages.
LAYER_STAGES: tuple[str, ...] = (
    "extract",
    "sae",
    "summaries",
    "probe",
    "intervene",
    "fidelity",
    "localize",
)
# Of those, the ones the report reads at every layer.
LAYER_REPORTED: tuple[str, ...] = ("intervene", "fidelity", "localize")


def layer_stage_name(name: str, layer: str) -> str:
    """`probe` at `blocks.3` -> `probe@blocks.3`; at the final layer the stage's own name."""
    return name if layer == FINAL_LAYER else f"{name}@{layer}"


# ============================================================================ models


def split_model_name(name: str) -> tuple[str, str]:
    """`Mass-finetuned` -> (`Mass`, `finetuned`); names without a variant -> (name, "")."""
    concept, sep, variant = name.rpartition("-")
    return (concept, variant) if sep and variant in ("pretrained", "finetuned") else (name, "")


@dataclass
class ModelEntry:
    """One concept classifier of the run and the encoder whose features it reads: an entry of
    RUN/models/models.json (field names are the file's)."""

    name: str  # "<Concept>-<variant>"
    concept: str
    variant: str  # pretrained | finetuned | any variant the config names ("" when unknown)
    # Path of the classifier (our dir or a Mammo-CLIP .pth); in models.json relative to the run
    # when inside it (`recorded_path`); read back by `from_record`, a usable path.
    classifier: str = ""
    encoder_key: str = ""  # stores are shared by models with the same encoder
    arch: str = ""  # the encoder architecture (read from the checkpoint when loaded)

    def to_record(self, run_dir: str | Path) -> dict[str, Any]:
        """The models.json entry: the classifier relative to the run when inside it."""
        rel = recorded_path(self.classifier, run_dir) if self.classifier else ""
        return dataclasses.asdict(dataclasses.replace(self, classifier=rel))

    @classmethod
    def from_record(cls, record: Mapping[str, Any], run_dir: str | Path) -> ModelEntry:
        """A models.json entry with a usable classifier path (from any working directory; files
        written before runs were relocatable are found by `resolve_recorded`). Missing concept
        or variant come from the name (`Mass-finetuned`); unknown fields are ignored."""
        name = str(record["name"])
        concept, variant = split_model_name(name)
        classifier = str(record.get("classifier") or "")
        return cls(
            name,
            str(record.get("concept", concept)),
            str(record.get("variant", variant)),
            str(resolve_recorded(classifier, run_dir)) if classifier else "",
            str(record.get("encoder_key") or ""),
            str(record.get("arch") or ""),
        )


# ============================================================================ paths


class RunLayout:
    """Every path of a run directory (docs/architecture.md, "Run directory").

    A layout is of one tapped layer: the final layer's stores, SAE and analyses are the run's
    own folders; another layer's (`at_layer`) mirror them under RUN/layers/<layer>/."""

    def __init__(
        self,
        run_dir: str | Path,
        report_dir: str | Path | None = None,
        *,
        layer: str = FINAL_LAYER,
    ) -> None:
        self.run = Path(run_dir)
        # `mammo-sae report --out` may write the report elsewhere; the run's own is RUN/report.
        self._report = Path(report_dir) if report_dir is not None else None
        if not LAYER_PATTERN.fullmatch(layer):
            raise KeyError(f"unknown layer {layer!r}; layers: final, stem or blocks.N")
        self.layer = layer
        # Where this layer's stores, SAE and analyses live.
        self._tree = self.run if layer == FINAL_LAYER else self.layer_dir(layer)

    def at_layer(self, layer: str) -> RunLayout:
        """The same run's layout of tapped layer `layer`."""
        return RunLayout(self.run, self._report, layer=layer)

    def stage_output(self, name: str) -> str:
        """The folder stage `name` writes at this layer, relative to the run (the runner's
        `outputs`)."""
        return (self._tree / stage(name).output).relative_to(self.run).as_posix()

    def rel(self, path: str | Path) -> str:
        """`path` as the run's records store it: relative to the run when inside it."""
        return recorded_path(path, self.run)

    # ---------------------------------------------------------------- top level
    @property
    def config(self) -> Path:
        return self.run / "config.yaml"

    @property
    def stages_dir(self) -> Path:
        return self.run / "stages"

    def stage_record(self, name: str) -> Path:
        return self.stages_dir / f"{name}.json"

    # ---------------------------------------------------------------- data
    @property
    def data_dir(self) -> Path:
        """The phantom's dataset (a run on real data keeps only summary.json here)."""
        return self.run / "data"

    @property
    def data_summary(self) -> Path:
        return self.data_dir / "summary.json"

    @property
    def phantom_figure(self) -> Path:
        return self.data_dir / "phantom.png"

    # ---------------------------------------------------------------- models
    @property
    def models_dir(self) -> Path:
        return self.run / "models"

    @property
    def models_json(self) -> Path:
        return self.models_dir / "models.json"

    @property
    def pretext_dir(self) -> Path:
        """The phantom's pretext encoder run (the frozen backbone of the linear probes)."""
        return self.models_dir / "pretrained"

    def model_dir(self, model: str) -> Path:
        return self.models_dir / model

    def model_eval(self, model: str) -> Path:
        return self.models_dir / f"eval-{model}.json"

    # ---------------------------------------------------------------- layers
    @property
    def layers_dir(self) -> Path:
        """The stores, SAEs and analyses of the tapped layers other than the final one."""
        return self.run / "layers"

    def layer_dir(self, layer: str) -> Path:
        return self.layers_dir / layer

    # ---------------------------------------------------------------- stores
    @property
    def stores_dir(self) -> Path:
        return self._tree / "stores"

    def store_dir(self, encoder_key: str, split: str) -> Path:
        return self.stores_dir / f"{encoder_key}-{split}"

    @property
    def sae_train_store(self) -> Path:
        return self.stores_dir / "sae-train"

    @property
    def stores_json(self) -> Path:
        return self.stores_dir / "stores.json"

    # ---------------------------------------------------------------- SAE
    @property
    def sae_dir(self) -> Path:
        return self._tree / "sae"

    @property
    def sae_pipeline_key(self) -> Path:
        return self.sae_dir / "pipeline_key.json"

    # ---------------------------------------------------------------- analyses
    @property
    def analysis_dir(self) -> Path:
        return self._tree / "analysis"

    def stage_dir(self, name: str) -> Path:
        """analysis/<name>/ of an analysis stage."""
        if not stage(name).analysis:
            raise KeyError(f"{name} is not an analysis stage; those are {ANALYSIS_STAGES}")
        return self.analysis_dir / name

    def model_analysis_dir(self, name: str, model: str) -> Path:
        """analysis/<name>/<model>/ of a per-model analysis stage (probe, intervene, localize)."""
        return self.stage_dir(name) / model

    def pointing_dir(self, model: str) -> Path:
        """Localisation with latents chosen by the pointing game on the ranking split."""
        return self.model_analysis_dir("localize", model) / "pointing"

    def separation_dir(self, concept: str) -> Path:
        return self.stage_dir("separation") / concept

    def associated_off_dir(self, concept: str, variant: str) -> Path:
        """The separation stage's debiasing edit of one model (its associated latents off)."""
        return self.separation_dir(concept) / "associated-off" / variant

    # ---------------------------------------------------------------- report
    @property
    def report_dir(self) -> Path:
        return self._report if self._report is not None else self.run / "report"

    @property
    def report_index(self) -> Path:
        return self.report_dir / "index.html"

    @property
    def report_atlas(self) -> Path:
        return self.report_dir / "atlas.html"

    @property
    def report_json(self) -> Path:
        return self.report_dir / "report.json"

    @property
    def report_figures(self) -> Path:
        return self.report_dir / "figures"

    @property
    def report_latents(self) -> Path:
        return self.report_dir / "latents"

    def report_latent(self, latent: int) -> Path:
        return self.report_latents / f"{latent}.html"

    # ---------------------------------------------------------------- what a run is
    @property
    def markers(self) -> tuple[Path, ...]:
        """Paths only a `mammo-sae run` directory has (any one of them marks one)."""
        return (self.config, self.stages_dir, self.models_json, self.analysis_dir)

    def is_run(self) -> bool:
        return any(p.exists() for p in self.markers)
