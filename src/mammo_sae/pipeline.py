"""`mammo-sae run CONFIG` and `mammo-sae demo`: every stage of the method, in order, cached.

The stages, their order, dependencies and output folders are `layout.STAGES` (listed in
docs/architecture.md); `Pipeline.stage_<name>` runs each. Each stage calls the same library
function as its own CLI command, with the config section of the YAML as overrides of that
command's options (so there is one way to set each option).
The runner (`runner.py`) skips a stage whose settings and upstream stages are unchanged and
reruns it with everything downstream when they change; a crash resumes where it stopped.
The run directory's paths are `layout.RunLayout`'s (documented in docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    check_options,
    device_opt,
    dump_yaml,
    from_dict,
    load_yaml,
    opt,
    parse_image_size,
    progress_opt,
    result_settings,
    to_dict,
)
from .errors import MammoSaeError
from .io import (
    LOCK_NAME,
    read_json,
    sha256_json,
    write_json,
    write_text_atomic,
    writer_lock,
)
from .layout import (
    FINAL_LAYER,
    LAYER_PATTERN,
    LAYER_REPORTED,
    LAYER_STAGES,
    STAGES,
    ModelEntry,
    RunLayout,
    layer_stage_name,
    stage_list_text,
)
from .layout import stage as stage_spec
from .runner import Runner, Stage

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
VARIANTS = ("pretrained", "finetuned")


# ============================================================================ config


@dataclass
class DataSection:
    kind: str = "phantom"  # phantom | folds
    path: str | None = None  # folds: data dir (CSV + images_png/) or CSV
    phantom: dict[str, Any] = field(default_factory=dict)  # PhantomConfig overrides
    level: str = "image"  # image | row
    image_size: list[int] | None = None  # H, W; None = as stored


@dataclass
class ModelsSection:
    kind: str = "train-phantom"  # train-phantom | checkpoints
    arch: str = "efficientnet-phantom"
    concepts: list[str] = field(default_factory=lambda: ["Mass", "Suspicious_Calcification"])
    pretrain: dict[str, Any] = field(default_factory=dict)  # PretrainConfig overrides
    linear_probe: dict[str, Any] = field(default_factory=dict)  # ClassifierTrainConfig overrides
    finetune: dict[str, Any] = field(default_factory=dict)  # ClassifierTrainConfig overrides
    # checkpoints: {Concept: {variant: path, ...}} (Mammo-CLIP .pth or ours): any variants per
    # concept, e.g. {finetuned: path} alone or the paper's {pretrained: ..., finetuned: ...}
    checkpoints: dict[str, dict[str, str]] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)  # EvalConfig overrides


@dataclass
class ExtractSection:
    options: dict[str, Any] = field(default_factory=dict)  # ExtractConfig overrides
    sae_source: str = "Suspicious_Calcification/finetuned"  # whose features train the SAE
    sae_split: str = "training"
    sae_subsample: float = opt(1.0, gt=0.0, max=1.0)
    sae_max_images: int | None = opt(None, min=1)
    rank_split: str = "training"  # split the rankings are computed on
    # Share of each image's patches kept in the ranking stores (the reference ranked on its 25 %
    # SAE sample); the evaluation stores always keep every patch.
    rank_subsample: float = opt(1.0, gt=0.0, max=1.0)
    eval_split: str = "test"  # split every evaluation uses
    # Tapped layers (final | stem | blocks.N), each with its own stores, SAE, summaries, probe
    # and localisation (RUN/layers/<layer>/); intervene, fidelity, separation and atlas read
    # the final layer only. Here, not under `sae:` (which is `sae train`'s options): the layer
    # is chosen when features are extracted, and the stores record it.
    layers: list[str] = field(default_factory=lambda: [FINAL_LAYER])


@dataclass
class AnalysisSection:
    summaries: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    intervene: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    localize: dict[str, Any] = field(default_factory=dict)
    separation: dict[str, Any] = field(default_factory=dict)
    atlas: dict[str, Any] = field(default_factory=dict)
    # Also localise with latents chosen by the pointing game on the ranking split
    # (analysis/localize/<model>/pointing/); needs full-map ranking stores.
    localize_pointing: bool = True


@dataclass
class PipelineConfig:
    name: str = "run"
    seed: int = 0
    device: str = device_opt()
    # torch's intra-op threads for the whole run; None = torch's default (the core count). A
    # float reduction split over another number of threads rounds differently, so a fixed count
    # is what lets machines with other core counts reproduce a run (docs/determinism.md).
    threads: int | None = opt(None, min=1)
    data: DataSection = field(default_factory=DataSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    extract: ExtractSection = field(default_factory=ExtractSection)
    sae: dict[str, Any] = field(default_factory=dict)  # SAE train overrides
    analysis: AnalysisSection = field(default_factory=AnalysisSection)


def _empty_folder(folder: Path) -> None:
    """Delete what `folder` holds except its writer lock file (held by this process)."""
    for path in folder.iterdir():
        if path.name == LOCK_NAME:
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _check_section_options(cfg: PipelineConfig, where: str) -> None:
    """Type-check every command's options in the config now, so `--dry-run` catches a typo or a
    wrong value instead of the stage that would meet it hours later."""
    from .activations.extract import ExtractConfig
    from .analysis.atlas_commands import AtlasConfig
    from .analysis.commands import (
        FidelityConfig,
        InterveneConfig,
        ProbeConfig,
        SeparationConfig,
        SummarizeConfig,
    )
    from .analysis.localize_commands import LocalizeConfig
    from .data.phantom import PhantomConfig
    from .models.train import ClassifierTrainConfig, EvalConfig, PretrainConfig
    from .sae.train import SAETrainConfig

    m, a = cfg.models, cfg.analysis
    checks: list[tuple[str, type, Any, Callable[[dict[str, Any]], None]]] = [
        (
            "data.phantom",
            PhantomConfig,
            cfg.data.phantom,
            lambda v: setattr(cfg.data, "phantom", v),
        ),
        ("models.pretrain", PretrainConfig, m.pretrain, lambda v: setattr(m, "pretrain", v)),
        (
            "models.linear_probe",
            ClassifierTrainConfig,
            m.linear_probe,
            lambda v: setattr(m, "linear_probe", v),
        ),
        ("models.finetune", ClassifierTrainConfig, m.finetune, lambda v: setattr(m, "finetune", v)),
        ("models.eval", EvalConfig, m.eval, lambda v: setattr(m, "eval", v)),
        (
            "extract.options",
            ExtractConfig,
            cfg.extract.options,
            lambda v: setattr(cfg.extract, "options", v),
        ),
        ("sae", SAETrainConfig, cfg.sae, lambda v: setattr(cfg, "sae", v)),
    ]
    for stage, cls in (
        ("summaries", SummarizeConfig),
        ("probe", ProbeConfig),
        ("intervene", InterveneConfig),
        ("fidelity", FidelityConfig),
        ("localize", LocalizeConfig),
        ("separation", SeparationConfig),
        ("atlas", AtlasConfig),
    ):
        checks.append(
            (
                f"analysis.{stage}",
                cls,
                getattr(a, stage),
                lambda v, stage=stage: setattr(a, stage, v),
            )
        )
    for name, cls, options, store in checks:
        store(check_options(cls, options or {}, where=f"{where}: {name}"))


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    # `phantom.yaml` / `configs/phantom.yaml` name a packaged config from any directory; any other
    # missing path is an error (a typo must not silently run a different file).
    packaged = PACKAGE_CONFIGS / path.name
    if not path.exists() and path.parent in (Path("."), Path("configs")) and packaged.exists():
        print(f"using the packaged config {packaged}", flush=True)
        path = packaged
    data = load_yaml(path)
    cfg = from_dict(PipelineConfig, data, where=str(path))
    for section, cls in (
        ("data", DataSection),
        ("models", ModelsSection),
        ("extract", ExtractSection),
        ("analysis", AnalysisSection),
    ):
        value = getattr(cfg, section)
        if isinstance(value, dict):
            setattr(cfg, section, from_dict(cls, value, where=f"{path}:{section}"))
    # Checked now (HxW, H,W or [H, W]) so that a bad size fails before the first stage.
    size_hw = parse_image_size(cfg.data.image_size, flag=f"{path}: data.image_size")
    cfg.data.image_size = list(size_hw) if size_hw else None
    if cfg.data.kind not in ("phantom", "folds"):
        raise MammoSaeError(f"{path}: data.kind must be phantom or folds, got {cfg.data.kind!r}")
    if cfg.models.kind not in ("train-phantom", "checkpoints"):
        raise MammoSaeError(
            f"{path}: models.kind must be train-phantom or checkpoints, got {cfg.models.kind!r}"
        )
    if cfg.data.kind == "folds" and not cfg.data.path:
        raise MammoSaeError(f"{path}: data.path is required when data.kind is folds")
    # User paths may use ~ and ${ENV_VARS}; relative paths are relative to the working directory.
    if cfg.data.path:
        cfg.data.path = _expand(cfg.data.path)
    cfg.models.checkpoints = {
        concept: {v: _expand(p) for v, p in variants.items()}
        for concept, variants in cfg.models.checkpoints.items()
    }
    _check_section_options(cfg, str(path))
    _check_layers(cfg.extract, str(path))
    if cfg.models.kind == "checkpoints":
        names = [f"{c}-{v}" for c, v, _ in checkpoint_paths(cfg.models, str(path))]
        if cfg.extract.sae_source.replace("/", "-") not in names:
            raise MammoSaeError(
                f"{path}: extract.sae_source {cfg.extract.sae_source!r} is not one "
                f"of the checkpoints; give one of "
                f"{', '.join(n.replace('-', '/', 1) for n in names)}"
            )
    if cfg.models.kind == "train-phantom":
        # The phantom recipe lives in one place (models/train.py); the config's values override it,
        # and RUN/config.yaml shows what ran.
        from .models.train import PHANTOM_FINETUNE, PHANTOM_LINEAR_PROBE, PHANTOM_PRETRAIN

        m = cfg.models
        m.pretrain = {**PHANTOM_PRETRAIN, **m.pretrain}
        m.linear_probe = {**PHANTOM_LINEAR_PROBE, **m.linear_probe}
        m.finetune = {**PHANTOM_FINETUNE, **m.finetune}
    return cfg


def _check_layers(e: ExtractSection, where: str) -> None:
    """extract.layers: known tap names, each once, the final layer among them (intervene and
    fidelity read it); a single tap for the whole run stays `extract.options.layer`."""
    bad = [layer for layer in e.layers if not LAYER_PATTERN.fullmatch(str(layer))]
    if bad:
        raise MammoSaeError(
            f"{where}: extract.layers: {bad[0]!r} is not a layer; give final, stem or blocks.N"
        )
    if len(set(e.layers)) != len(e.layers):
        raise MammoSaeError(f"{where}: extract.layers lists a layer twice: {e.layers}")
    if FINAL_LAYER not in e.layers:
        raise MammoSaeError(
            f"{where}: extract.layers must include final (intervene, fidelity, separation and "
            f"atlas read the final layer); got {e.layers}"
        )
    if len(e.layers) > 1 and "layer" in e.options:
        raise MammoSaeError(
            f"{where}: extract.options.layer and extract.layers both choose layers; list every "
            "layer in extract.layers"
        )


def checkpoint_paths(models: ModelsSection, where: str = "config") -> list[tuple[str, str, Path]]:
    """(concept, variant, path) of every checkpoint the config names, concepts in their order and
    pretrained before finetuned before any other variant. Any non-empty set of variants per
    concept is accepted (one finetuned model is the common case); nothing is read from disk."""
    unknown = sorted(set(models.checkpoints) - set(models.concepts))
    if unknown:
        raise MammoSaeError(
            f"{where}: models.checkpoints names {unknown}, which models.concepts "
            f"({', '.join(models.concepts)}) does not list"
        )
    out = []
    for concept in models.concepts:
        paths = models.checkpoints.get(concept) or {}
        if not paths:
            raise MammoSaeError(
                f"{where}: models.checkpoints.{concept} is missing: give at least "
                "one checkpoint, e.g. {finetuned: path/to/model}"
            )
        for variant in sorted(paths, key=lambda v: (VARIANTS + (v,)).index(v)):
            if not re.fullmatch(r"[A-Za-z0-9_.]+", variant):
                raise MammoSaeError(
                    f"{where}: models.checkpoints.{concept}.{variant}: a variant "
                    "name is letters, digits, '_' or '.' (it names folders)"
                )
            out.append((concept, variant, Path(paths[variant]).expanduser()))
    return out


def _expand(path: str) -> str:
    expanded = os.path.expanduser(os.path.expandvars(str(path)))
    if "$" in expanded:
        raise MammoSaeError(f"path {path!r} uses an environment variable that is not set")
    return expanded


def build_options(cls: type, overrides: dict[str, Any], where: str, **fixed: Any) -> Any:
    """A command's config dataclass from the pipeline's fixed values plus user overrides."""
    clash = sorted(set(overrides) & set(fixed))
    if clash:
        raise MammoSaeError(f"{where}: {clash} are set by the pipeline and cannot be overridden")
    return from_dict(cls, {**fixed, **overrides}, where=where)


# ============================================================================ the stages


class Pipeline:
    def __init__(self, cfg: PipelineConfig, run_dir: Path, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.run = Path(run_dir)
        self.layout = RunLayout(self.run)
        self.progress = progress
        self.runner = Runner(self.run, log=lambda s: print(s, flush=True))
        self._noted_old_paths = False
        self._declare()

    # ---------------------------------------------------------------- paths
    @property
    def data_dir(self) -> Path:
        return (
            self.layout.data_dir
            if self.cfg.data.kind == "phantom"
            else Path(self.cfg.data.path or "")
        )

    def store_dir(self, encoder_key: str, split: str) -> Path:
        return self.layout.store_dir(encoder_key, split)

    @property
    def sae_dir(self) -> Path:
        return self.layout.sae_dir

    def rel(self, path: str | Path) -> str:
        """`path` as the run's records store it: relative to the run directory when inside it."""
        return self.layout.rel(path)

    def models(self) -> list[ModelEntry]:
        """models.json's entries with usable classifier paths (from any working directory)."""
        entries = []
        for record in read_json(self.layout.models_json)["models"]:
            entry = ModelEntry.from_record(record, self.run)
            recorded = str(record.get("classifier") or "")
            if (
                not self._noted_old_paths
                and recorded
                and Path(entry.classifier) != self.run / recorded
                and not Path(recorded).is_absolute()
            ):
                # Written before runs were relocatable: relative to the first run's cwd.
                print(
                    f"    note: models.json names {recorded!r} (a path from before run "
                    f"directories were relocatable); using {entry.classifier}",
                    flush=True,
                )
                self._noted_old_paths = True
            entries.append(entry)
        return entries

    def encoders(self) -> dict[str, str]:
        """encoder_key -> a model path whose encoder gives those features."""
        out: dict[str, str] = {}
        for m in self.models():
            out.setdefault(m.encoder_key, m.classifier)
        return out

    # ---------------------------------------------------------------- declaration
    def _declare(self) -> None:
        """The stages of `layout.STAGES`, each with the settings its key hashes."""
        extra = self.extra_layers()
        for spec in STAGES:
            deps = spec.deps
            if spec.name == "report":
                # Each extra layer's stages, before the report that shows them.
                for layer in extra:
                    self._declare_layer(layer)
                deps += tuple(
                    layer_stage_name(name, layer) for layer in extra for name in LAYER_REPORTED
                )
            self.runner.add(
                Stage(
                    spec.name,
                    getattr(self, f"stage_{spec.name}"),
                    self._stage_settings(spec.name),
                    deps=deps,
                    description=spec.description,
                    outputs=(spec.output,),
                    transient=TRANSIENT_FILES if spec.resumable else (),
                )
            )

    def extra_layers(self) -> list[str]:
        """The tapped layers other than the final one, in the config's order."""
        return [layer for layer in self.cfg.extract.layers if layer != FINAL_LAYER]

    def _declare_layer(self, layer: str) -> None:
        """`<stage>@<layer>` for each of LAYER_STAGES: the final layer's stage with the same
        settings plus the layer, its dependencies at the same layer (extract's on `models`)."""
        layout = self.layout.at_layer(layer)
        for name in LAYER_STAGES:
            spec = stage_spec(name)
            self.runner.add(
                Stage(
                    layer_stage_name(name, layer),
                    functools.partial(getattr(self, f"stage_{name}"), layer=layer),
                    {**self._stage_settings(name), "layer": layer},
                    deps=tuple(
                        layer_stage_name(d, layer) if d in LAYER_STAGES else d for d in spec.deps
                    ),
                    description=f"{spec.description} ({layer})",
                    outputs=(layout.stage_output(name),),
                    transient=TRANSIENT_FILES if spec.resumable else (),
                )
            )

    def _stage_settings(self, name: str) -> dict[str, Any]:
        """Everything that changes a stage's result (hashed into its key: a change here reruns
        the stages of existing runs)."""
        c = self.cfg
        if name == "data":
            return {"data": to_dict(c.data), "seed": c.seed}
        if name == "models":
            return {"models": to_dict(c.models), "device": c.device}
        if name == "extract":
            # Which other layers are tapped changes no store of this one: `layers` is left out
            # (and so runs from before it existed keep their keys).
            extract = {k: v for k, v in to_dict(c.extract).items() if k != "layers"}
            return {
                "extract": extract,
                "image_size": c.data.image_size,
                "level": c.data.level,
            }
        settings: dict[str, Any] = {"sae": c.sae} if name == "sae" else {}
        if stage_spec(name).analysis:
            settings = {"options": getattr(c.analysis, name), "level": c.data.level}
            if name == "localize":
                settings["pointing"] = c.analysis.localize_pointing
                # v2: receptive-field-centred heatmaps and the baselines (rerun old results)
                settings["layout"] = 2
            if name == "separation":  # its debiasing edit runs with the intervene options
                settings["intervene_options"] = c.analysis.intervene
        if name == "separation":  # v2: its debiasing edit moved under analysis/separation
            settings["layout"] = 2
        return settings

    # ---------------------------------------------------------------- data
    def stage_data(self) -> dict[str, Any]:
        from .data.vindr import summarize_dataset

        if self.cfg.data.kind == "phantom":
            from .data.phantom import PhantomConfig, generate

            pcfg = build_options(
                PhantomConfig,
                self.cfg.data.phantom,
                "data.phantom",
                out=str(self.data_dir),
                overwrite=True,
                figure=str(self.layout.phantom_figure),
            )
            generate(pcfg, progress=self.progress)
        summary = summarize_dataset(self.data_dir, on_missing="error")
        write_json(self.layout.data_summary, summary)
        return {"data_dir": self.rel(self.data_dir), "summary": self.rel(self.layout.data_summary)}

    # ---------------------------------------------------------------- models
    def stage_models(self) -> dict[str, Any]:
        c = self.cfg.models
        entries: list[ModelEntry] = []
        if c.kind == "train-phantom":
            entries = self._train_phantom_models()
        else:
            entries = self._checkpoint_models()
        evals = self._evaluate_models(entries)
        # Paths relative to the run (absolute outside it): the run can move or be used from
        # another working directory.
        records = [e.to_record(self.run) for e in entries]
        write_json(
            self.layout.models_json,
            {"schema_version": 1, "models": records, "test_metrics": evals},
        )
        return {"models": [e.name for e in entries], "test_metrics": evals}

    def _checkpoint_models(self) -> list[ModelEntry]:
        """The config's checkpoints; files with the same content share one encoder_key, so their
        features are extracted (and stored) once."""
        from .models.checkpoints import checkpoint_sha256

        entries: list[ModelEntry] = []
        key_of: dict[str, str] = {}  # content hash -> the first model's encoder_key
        for concept, variant, path in checkpoint_paths(self.cfg.models):
            if not path.exists():
                raise MammoSaeError(
                    f"checkpoint not found: {path} (models.checkpoints.{concept}.{variant})"
                )
            key = key_of.setdefault(checkpoint_sha256(path), f"{concept}-{variant}")
            entries.append(
                ModelEntry(f"{concept}-{variant}", concept, variant, str(path), encoder_key=key)
            )
        return entries

    def check_checkpoints(self) -> None:
        """`--dry-run` for a checkpoints run: every named checkpoint exists and its header reads
        (our format's config.json, a torch file's container); no weights are loaded, nothing is
        written."""
        from .models.checkpoints import checkpoint_header

        if self.cfg.models.kind != "checkpoints":
            return
        for concept, variant, path in checkpoint_paths(self.cfg.models):
            where = f"models.checkpoints.{concept}.{variant}"
            try:
                header = checkpoint_header(path)
            except MammoSaeError as exc:
                raise MammoSaeError(f"{where}: {exc}") from None
            facts = ", ".join(f"{k} {v}" for k, v in header.items() if v)
            print(f"[    checked] {where}: {path} ({facts})", flush=True)

    def _train_phantom_models(self) -> list[ModelEntry]:
        from .models.train import ClassifierTrainConfig, PretrainConfig, pretrain, train_classifier

        c = self.cfg.models
        common = {
            "data": str(self.data_dir),
            "device": self.cfg.device,
            "overwrite": True,
            "progress": self.progress,
        }
        if self.cfg.data.image_size:
            common["image_size"] = self.cfg.data.image_size
        pcfg = build_options(
            PretrainConfig,
            c.pretrain,
            "models.pretrain",
            out=str(self.layout.pretext_dir),
            arch=c.arch,
            **common,
        )
        pretrain(pcfg)
        backbone = self.layout.pretext_dir / "model"
        entries = []
        for concept in c.concepts:
            for variant, mode, overrides in (
                ("pretrained", "linear-probe", c.linear_probe),
                ("finetuned", "finetune", c.finetune),
            ):
                out = self.layout.model_dir(f"{concept}-{variant}")
                tcfg = build_options(
                    ClassifierTrainConfig,
                    overrides,
                    f"models.{mode}",
                    out=str(out),
                    concept=concept,
                    mode=mode,
                    init=str(backbone),
                    level=self.cfg.data.level,
                    **common,
                )
                train_classifier(tcfg)
                # Linear probes share the frozen pretext backbone, hence one store for all.
                key = "pretrained" if variant == "pretrained" else f"{concept}-finetuned"
                entries.append(
                    ModelEntry(
                        f"{concept}-{variant}",
                        concept,
                        variant,
                        str(out / "model"),
                        encoder_key=key,
                        arch=c.arch,
                    )
                )
        return entries

    def _evaluate_models(self, entries: list[ModelEntry]) -> dict[str, Any]:
        from .models.train import EvalConfig, evaluate_classifier

        out: dict[str, Any] = {}
        for e in entries:
            fixed: dict[str, Any] = {
                "data": str(self.data_dir),
                "model": e.classifier,
                "concept": e.concept,
                "split": self.cfg.extract.eval_split,
                "level": self.cfg.data.level,
                "device": self.cfg.device,
                "out": str(self.layout.model_eval(e.name)),
                "progress": self.progress,
            }
            if self.cfg.data.image_size:
                fixed["image_size"] = self.cfg.data.image_size
            result = evaluate_classifier(
                build_options(EvalConfig, self.cfg.models.eval, "models.eval", **fixed)
            )
            e.arch = result.get("arch") or e.arch
            out[e.name] = {
                "auroc": result.get("auroc"),
                "auprc": result.get("auprc"),
                "n": result.get("n"),
                "n_pos": result.get("n_pos"),
            }
        return out

    # ---------------------------------------------------------------- extract
    def store_plan(self, layer: str = FINAL_LAYER) -> list[dict[str, Any]]:
        """Which stores to extract at `layer`: (encoder, split, subsample) for the SAE and every
        analysis."""
        e = self.cfg.extract
        layout = self.layout.at_layer(layer)
        sae_model = e.sae_source.replace("/", "-")
        by_name = {m.name: m for m in self.models()}
        if sae_model not in by_name:
            raise MammoSaeError(
                f"extract.sae_source {e.sae_source!r} is not a model of this run; "
                f"models: {', '.join(sorted(by_name))}"
            )
        plan = [
            {
                "role": "sae",
                "encoder_key": by_name[sae_model].encoder_key,
                "model": by_name[sae_model].classifier,
                "split": e.sae_split,
                "subsample": e.sae_subsample,
                "max_images": e.sae_max_images,
                "out": str(layout.sae_train_store),
            }
        ]
        for key, model in self.encoders().items():
            for split in dict.fromkeys((e.rank_split, e.eval_split)):
                subsample = e.rank_subsample if split != e.eval_split else 1.0
                plan.append(
                    {
                        "role": "analysis",
                        "encoder_key": key,
                        "model": model,
                        "split": split,
                        "subsample": subsample,
                        "max_images": None,
                        "out": str(layout.store_dir(key, split)),
                    }
                )
        return plan

    def stage_extract(self, layer: str = FINAL_LAYER) -> dict[str, Any]:
        from .activations.extract import ExtractConfig, extract

        done = []
        layout = self.layout.at_layer(layer)
        damaged = self.runner.changed_outputs(layer_stage_name("extract", layer))
        for item in self.store_plan(layer):
            self._drop_if_damaged(Path(item["out"]), damaged)
            fixed: dict[str, Any] = {
                "data": str(self.data_dir),
                "model": item["model"],
                "out": item["out"],
                "split": item["split"],
                "subsample": item["subsample"],
                "level": self.cfg.data.level,
                "device": self.cfg.device,
                "seed": self.cfg.seed,
            }
            if item["max_images"]:
                fixed["max_images"] = item["max_images"]
            if layer != FINAL_LAYER:  # the final layer's call is unchanged (options may set it)
                fixed["layer"] = layer
            if self.cfg.data.image_size:
                fixed["image_size"] = self.cfg.data.image_size
            print(
                f"    store {layout.rel(item['out'])}: {item['split']} split of "
                f"{item['encoder_key']}",
                flush=True,
            )
            extract(
                build_options(ExtractConfig, self.cfg.extract.options, "extract.options", **fixed),
                progress=self.progress,
            )
            done.append(item)
        write_json(
            layout.stores_json,
            {
                "schema_version": 1,
                "stores": [
                    {**d, "model": self.rel(d["model"]), "out": self.rel(d["out"])} for d in done
                ],
            },
        )
        return {"stores": [Path(d["out"]).name for d in done]}

    def _drop_if_damaged(self, store_dir: Path, changed: list[str]) -> None:
        """A complete store whose files changed since the extract stage recorded them is checked
        against its checksums; a damaged one is deleted so that extraction rebuilds it (a
        complete store is otherwise left as it is, damage included)."""
        from .activations.store import ActivationStore

        prefix = store_dir.relative_to(self.run).as_posix() + "/"
        if not any(rel.startswith(prefix) for rel in changed) or not store_dir.exists():
            return
        try:
            manifest = store_dir / "manifest.json"
            if manifest.is_file() and not read_json(manifest).get("complete"):
                return  # unfinished: extraction resumes it (finished shards are kept)
            ActivationStore(store_dir).verify(progress=self.progress)
        except MammoSaeError as exc:
            print(f"    store {store_dir.name} is damaged ({exc}); extracting it again", flush=True)
            with writer_lock(store_dir):
                _empty_folder(store_dir)

    # ---------------------------------------------------------------- sae
    def sae_train_config(self, layer: str = FINAL_LAYER) -> Any:
        """`sae train`'s config at `layer`: the `sae:` section over the pipeline's fixed values
        (the same section for every layer)."""
        from .sae.train import SAETrainConfig

        layout = self.layout.at_layer(layer)
        # `resume` is the pipeline's to decide (stage_sae): a user value is refused as "set by
        # the pipeline".
        return build_options(
            SAETrainConfig,
            self.cfg.sae,
            "sae",
            store=str(layout.sae_train_store),
            resume=False,
            out=str(layout.sae_dir),
            device=self.cfg.device,
            progress=self.progress,
        )

    def stage_sae(self, layer: str = FINAL_LAYER) -> dict[str, Any]:
        from .activations.store import ActivationStore
        from .sae.train import STATE_FILE, train_sae

        layout = self.layout.at_layer(layer)
        sae_dir = layout.sae_dir
        cfg = self.sae_train_config(layer)
        store = Path(str(cfg.store))
        # Same settings and data as an unfinished attempt: resume it (a crash costs nothing).
        # Anything else: the old SAE is stale, and the stage starts over. The key leaves out the
        # paths (the store is identified by its manifest): a moved run still resumes.
        key = sha256_json(
            {"settings": result_settings(cfg), "store": ActivationStore(store).manifest_sha256}
        )
        marker = layout.sae_pipeline_key
        with writer_lock(sae_dir):  # a foreign `sae train` there must not lose its files
            if (sae_dir / STATE_FILE).exists():
                same = marker.exists() and read_json(marker).get("key") == key
                if not same:
                    _empty_folder(sae_dir)
                cfg.resume = same
            write_json(marker, {"schema_version": 1, "key": key})
            train_sae(cfg)
        return {"sae": self.rel(sae_dir)}

    # ---------------------------------------------------------------- analyses
    def _analysis(self, name: str) -> Path:
        return self.layout.stage_dir(name)

    def _opts(
        self, cls: type, stage: str, where: str, layer: str = FINAL_LAYER, **fixed: Any
    ) -> Any:
        """A command config from the pipeline's values and the user's `analysis.<stage>` overrides
        (the same for every layer; the summaries cache is the layer's)."""
        common = {
            "device": self.cfg.device,
            "cache_dir": str(self.layout.at_layer(layer).stage_dir("summaries")),
            "progress": self.progress,
        }
        names = {f.name for f in dataclasses.fields(cls)}
        fixed = {**{k: v for k, v in common.items() if k in names}, **fixed}
        overrides = {k: v for k, v in getattr(self.cfg.analysis, stage).items() if k in names}
        unknown = sorted(set(getattr(self.cfg.analysis, stage)) - names)
        if unknown:
            raise MammoSaeError(
                f"analysis.{stage}: unknown option(s) {unknown}; valid: {sorted(names)}"
            )
        return build_options(cls, overrides, where, **fixed)

    def stage_summaries(self, layer: str = FINAL_LAYER) -> dict[str, Any]:
        from .analysis.commands import SummarizeConfig, run_summarize

        layout = self.layout.at_layer(layer)
        done = []
        for key in self.encoders():
            for split in dict.fromkeys((self.cfg.extract.rank_split, self.cfg.extract.eval_split)):
                store = layout.store_dir(key, split)
                run_summarize(
                    self._opts(
                        SummarizeConfig,
                        "summaries",
                        "analysis.summaries",
                        layer,
                        store=str(store),
                        sae=str(layout.sae_dir),
                    )
                )
                done.append(store.name)
        return {"stores": done}

    def stage_probe(self, layer: str = FINAL_LAYER) -> dict[str, Any]:
        from .analysis.commands import ProbeConfig, run_probe

        layout = self.layout.at_layer(layer)
        out = {}
        for m in self.models():
            target = layout.model_analysis_dir("probe", m.name)
            run_probe(
                self._opts(
                    ProbeConfig,
                    "probe",
                    "analysis.probe",
                    layer,
                    store=str(layout.store_dir(m.encoder_key, self.cfg.extract.rank_split)),
                    sae=str(layout.sae_dir),
                    concept=m.concept,
                    out=str(target),
                    split=self.cfg.extract.rank_split,
                    level=self.cfg.data.level,
                )
            )
            out[m.name] = self.rel(target)
        return out

    def stage_intervene(self, layer: str = FINAL_LAYER) -> dict[str, Any]:
        from .analysis.commands import InterveneConfig, run_intervene

        layout = self.layout.at_layer(layer)
        out = {}
        for m in self.models():
            target = layout.model_analysis_dir("intervene", m.name)
            run_intervene(
                self._opts(
                    InterveneConfig,
                    "intervene",
                    "analysis.intervene",
                    layer,
                    store=str(layout.store_dir(m.encoder_key, self.cfg.extract.eval_split)),
                    sae=str(layout.sae_dir),
                    classifier=m.classifier,
                    concept=m.concept,
                    out=str(target),
                    rankings=str(layout.model_analysis_dir("probe", m.name)),
                    split=self.cfg.extract.eval_split,
                    level=self.cfg.data.level,
                    label=m.name if layer == FINAL_LAYER else f"{m.name}@{layer}",
                )
            )
            out[m.name] = self.rel(target)
        return out

    def stage_fidelity(self, layer: str = FINAL_LAYER) -> dict[str, Any]:
        from .analysis.commands import FidelityConfig, run_fidelity

        layout = self.layout.at_layer(layer)
        models = self.models()
        target = layout.stage_dir("fidelity")
        run_fidelity(
            self._opts(
                FidelityConfig,
                "fidelity",
                "analysis.fidelity",
                layer,
                stores=[
                    str(layout.store_dir(m.encoder_key, self.cfg.extract.eval_split))
                    for m in models
                ],
                classifiers=[m.classifier for m in models],
                names=[m.name for m in models],
                concepts=[m.concept for m in models],
                sae=str(layout.sae_dir),
                out=str(target),
                split=self.cfg.extract.eval_split,
                level=self.cfg.data.level,
            )
        )
        return {"fidelity": self.rel(target)}

    def stage_localize(self, layer: str = FINAL_LAYER) -> dict[str, Any]:
        from .analysis.localize_commands import LocalizeConfig, run_localize

        layout = self.layout.at_layer(layer)
        e = self.cfg.extract
        out = {}
        for m in self.models():
            target = layout.model_analysis_dir("localize", m.name)
            # The probe folder: the localize section's own `score` picks the ranking in it.
            ranking = layout.model_analysis_dir("probe", m.name)
            fixed: dict[str, Any] = {
                "store": str(layout.store_dir(m.encoder_key, e.eval_split)),
                "sae": str(layout.sae_dir),
                "concept": m.concept,
                "split": e.eval_split,
            }
            # The classifier-map baseline applies the head to the final map: final layer only.
            if layer == FINAL_LAYER:
                fixed["classifier"] = m.classifier
            name = m.name if layer == FINAL_LAYER else f"{m.name}@{layer}"
            run_localize(
                self._opts(
                    LocalizeConfig,
                    "localize",
                    "analysis.localize",
                    layer,
                    **fixed,
                    out=str(target),
                    ranking=str(ranking),
                    label=name,
                )
            )
            out[m.name] = self.rel(target)
            if self._pointing_possible():
                # The same, with latents chosen by the pointing game on the ranking split.
                run_localize(
                    self._opts(
                        LocalizeConfig,
                        "localize",
                        "analysis.localize",
                        layer,
                        **fixed,
                        out=str(layout.pointing_dir(m.name)),
                        select="pointing",
                        select_split=e.rank_split,
                        select_store=str(layout.store_dir(m.encoder_key, e.rank_split)),
                        label=f"{name}/pointing",
                    )
                )
        return out

    def _pointing_possible(self) -> bool:
        e = self.cfg.extract
        if not self.cfg.analysis.localize_pointing:
            return False
        if e.rank_split == e.eval_split or e.rank_subsample < 1.0:
            print(
                "    pointing selection skipped: it needs full patch maps of a split other than the "
                f"evaluated one (rank_split {e.rank_split!r}, rank_subsample {e.rank_subsample})",
                flush=True,
            )
            return False
        return True

    def stage_separation(self) -> dict[str, Any]:
        from .analysis.commands import SeparationConfig, run_separation

        out = {}
        by_concept: dict[str, list[ModelEntry]] = {}
        for m in self.models():
            by_concept.setdefault(m.concept, []).append(m)
        for concept, models in by_concept.items():
            target = self.layout.separation_dir(concept)
            run_separation(
                self._opts(
                    SeparationConfig,
                    "separation",
                    "analysis.separation",
                    stores=[
                        str(self.store_dir(m.encoder_key, self.cfg.extract.rank_split))
                        for m in models
                    ],
                    names=[m.variant for m in models],
                    sae=str(self.sae_dir),
                    concept=concept,
                    out=str(target),
                    split=self.cfg.extract.rank_split,
                    level=self.cfg.data.level,
                )
            )
            out[concept] = self.rel(target)
            self._debias_edits(concept, models)
        return out

    def _debias_edits(self, concept: str, models: list[ModelEntry]) -> None:
        """Switch off each model's attribute-associated latents (found on the ranking split) and
        measure concept AUROC and the attribute shortcut on the evaluation split; written under
        the separation stage's own folder (`associated-off/<variant>/`), as every stage writes
        only under its own outputs."""
        from .analysis.commands import InterveneConfig, run_intervene

        found = read_json(self.layout.separation_dir(concept) / "separation.json")
        attribute = found["config"].get("attribute")
        for m in models:
            latents = found["models"].get(m.variant, {}).get("associated", [])
            target = self.layout.associated_off_dir(concept, m.variant)
            if not latents:
                shutil.rmtree(target, ignore_errors=True)  # an older run's edit would be stale
                continue
            run_intervene(
                self._opts(
                    InterveneConfig,
                    "intervene",
                    "analysis.intervene",
                    store=str(self.store_dir(m.encoder_key, self.cfg.extract.eval_split)),
                    sae=str(self.sae_dir),
                    classifier=m.classifier,
                    concept=m.concept,
                    out=str(target),
                    split=self.cfg.extract.eval_split,
                    level=self.cfg.data.level,
                    latents=latents,
                    mode="off",
                    attribute=attribute,
                    label=m.name,
                )
            )

    def stage_atlas(self) -> dict[str, Any]:
        """The latent atlas of the SAE on its own model's store of the ranking split, with every
        model's logit effect (v_j depends on the SAE and the head only, not on the store)."""
        from .analysis.atlas_commands import AtlasConfig, run_atlas

        models = self.models()
        source = self.cfg.extract.sae_source.replace("/", "-")
        home = next((m for m in models if m.name == source), models[0])
        target = self._analysis("atlas")
        run_atlas(
            self._opts(
                AtlasConfig,
                "atlas",
                "analysis.atlas",
                store=str(self.store_dir(home.encoder_key, self.cfg.extract.rank_split)),
                sae=str(self.sae_dir),
                out=str(target),
                split=self.cfg.extract.rank_split,
                level=self.cfg.data.level,
                classifiers=[m.classifier for m in models],
                names=[m.name for m in models],
            )
        )
        return {"atlas": str(target), "store": home.encoder_key}

    def stage_report(self) -> dict[str, Any]:
        from .report.build import build_report

        index = build_report(self.run, progress=self.progress)
        return {"report": self.rel(index)}


# Files a stage needs only to resume itself (deleting them to save disk must not rerun it).
TRANSIENT_FILES = ("*/train_state.pt", "*/checkpoints/*", "*.tmp", "*.tmp/*")


# ============================================================================ commands


@dataclass
class RunConfig:
    """Run every stage of a pipeline config (YAML) in one run directory. Stages whose inputs
    and settings are unchanged are skipped; a crashed run resumes where it stopped."""

    config: Path = opt(
        help="pipeline YAML (e.g. configs/phantom.yaml, configs/vindr-mammoclip-b5.yaml)"
    )
    out: Path | None = opt(None, help="run directory (default: runs/<config name>)")
    only: str | None = opt(
        None,
        help=f"run only this stage: {stage_list_text()}",
    )
    # Spelled `--from` on the command line (`from` is a Python keyword).
    start: str | None = opt(
        None, flag="--from", help="rerun from this stage on (same names as --only)"
    )
    dry_run: bool = opt(False, help="print the plan and exit")
    progress: bool = progress_opt("progress bars")


@dataclass
class DemoConfig:
    """The phantom config end to end (CPU, a few minutes); prints the report's path."""

    out: Path = opt(Path("runs/demo"), help="run directory")
    progress: bool = progress_opt("progress bars")


def run_pipeline(cfg: RunConfig) -> Path:
    pcfg = load_pipeline_config(cfg.config)
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / pcfg.name
    _make_deterministic(pcfg)
    if cfg.dry_run:  # a dry run only reads: the plan must not touch the run it describes
        pipeline = Pipeline(pcfg, run_dir, progress=cfg.progress)
        pipeline.check_checkpoints()
        pipeline.runner.execute(only=cfg.only, start=cfg.start, dry_run=True)
        return run_dir
    with writer_lock(run_dir):  # one writer per run directory (docs/security.md)
        write_text_atomic(RunLayout(run_dir).config, dump_yaml(resolved_config(pcfg)))
        pipeline = Pipeline(pcfg, run_dir, progress=cfg.progress)
        t0 = time.perf_counter()
        pipeline.runner.execute(only=cfg.only, start=cfg.start, dry_run=False)
    print(f"run finished in {time.perf_counter() - t0:.1f} s: {run_dir}")
    return run_dir


def resolved_config(pcfg: PipelineConfig) -> dict[str, Any]:
    """RUN/config.yaml. `models.arch` only builds the phantom's models: a run that loads
    checkpoints takes each architecture from its file (recorded in models/models.json), so the
    unused default is left out rather than shown as if it had run."""
    out = to_dict(pcfg)
    if pcfg.models.kind == "checkpoints":
        out["models"].pop("arch", None)
    return out


def _make_deterministic(pcfg: PipelineConfig) -> None:
    """Same config, same machine -> the same bytes: a fixed thread count where the config sets
    one, and torch's deterministic kernels (on CPU they cost nothing measurable; CUDA needs
    more, see docs/determinism.md, so it is left to the user there)."""
    import torch

    if pcfg.threads is not None:
        torch.set_num_threads(pcfg.threads)
    if pcfg.device in ("auto", "cpu") and not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)


def run_demo(cfg: DemoConfig) -> int:
    t0 = time.perf_counter()
    run_dir = run_pipeline(
        RunConfig(config=PACKAGE_CONFIGS / "phantom.yaml", out=cfg.out, progress=cfg.progress)
    )
    report = RunLayout(run_dir).report_index
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    print(f"report: {report.resolve()}")
    return 0
