"""docs/architecture.md ("Run directory") is the run layout's spec: every path its code block
lists is one `layout.RunLayout` gives, every `RunLayout` path is listed, and its stage table is
`layout.STAGES`, which is what the pipeline's runner declares."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from mammo_sae.layout import (
    ANALYSIS_STAGES,
    LAYER_STAGES,
    STAGES,
    ModelEntry,
    RunLayout,
    layer_stage_name,
)

SPEC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
# What the placeholders of the documented paths stand for in the checks below.
SAMPLE = {
    "<stage>": "probe",
    "<Concept>": "Mass",
    "<variant>": "finetuned",
    "<encoder_key>": "pretrained",
    "<split>": "test",
    "<idx>": "7",
    "<layer>": "blocks.3",
}
MODEL = "Mass-finetuned"


def _at(r: RunLayout) -> RunLayout:
    """The layout of the sample tapped layer (`<layer>`)."""
    return r.at_layer("blocks.3")


# RunLayout member -> the documented paths it gives (with the SAMPLE values).
PATHS: dict[str, list[tuple[str, Callable[[RunLayout], Path]]]] = {
    "config": [("RUN/config.yaml", lambda r: r.config)],
    "stages_dir": [("RUN/stages/", lambda r: r.stages_dir)],
    "stage_record": [
        ("RUN/stages/<stage>.json", lambda r: r.stage_record("probe")),
        (
            "RUN/stages/<stage>@<layer>.json",
            lambda r: r.stage_record(layer_stage_name("probe", "blocks.3")),
        ),
    ],
    "data_dir": [("RUN/data/", lambda r: r.data_dir)],
    "phantom_figure": [("RUN/data/phantom.png", lambda r: r.phantom_figure)],
    "data_summary": [("RUN/data/summary.json", lambda r: r.data_summary)],
    "models_dir": [("RUN/models/", lambda r: r.models_dir)],
    "pretext_dir": [("RUN/models/pretrained/", lambda r: r.pretext_dir)],
    "model_dir": [("RUN/models/<Concept>-<variant>/", lambda r: r.model_dir(MODEL))],
    "model_eval": [("RUN/models/eval-<Concept>-<variant>.json", lambda r: r.model_eval(MODEL))],
    "models_json": [("RUN/models/models.json", lambda r: r.models_json)],
    "layers_dir": [("RUN/layers/", lambda r: r.layers_dir)],
    "layer_dir": [("RUN/layers/<layer>/", lambda r: r.layer_dir("blocks.3"))],
    "stores_dir": [
        ("RUN/stores/", lambda r: r.stores_dir),
        ("RUN/layers/<layer>/stores/", lambda r: _at(r).stores_dir),
    ],
    "store_dir": [
        ("RUN/stores/<encoder_key>-<split>/", lambda r: r.store_dir("pretrained", "test")),
        (
            "RUN/layers/<layer>/stores/<encoder_key>-<split>/",
            lambda r: _at(r).store_dir("pretrained", "test"),
        ),
    ],
    "sae_train_store": [
        ("RUN/stores/sae-train/", lambda r: r.sae_train_store),
        ("RUN/layers/<layer>/stores/sae-train/", lambda r: _at(r).sae_train_store),
    ],
    "stores_json": [
        ("RUN/stores/stores.json", lambda r: r.stores_json),
        ("RUN/layers/<layer>/stores/stores.json", lambda r: _at(r).stores_json),
    ],
    "sae_dir": [
        ("RUN/sae/", lambda r: r.sae_dir),
        ("RUN/layers/<layer>/sae/", lambda r: _at(r).sae_dir),
    ],
    "sae_pipeline_key": [
        ("RUN/sae/pipeline_key.json", lambda r: r.sae_pipeline_key),
        ("RUN/layers/<layer>/sae/pipeline_key.json", lambda r: _at(r).sae_pipeline_key),
    ],
    "analysis_dir": [
        ("RUN/analysis/", lambda r: r.analysis_dir),
        ("RUN/layers/<layer>/analysis/", lambda r: _at(r).analysis_dir),
    ],
    "stage_dir": [
        *[
            (f"RUN/analysis/{name}/", lambda r, name=name: r.stage_dir(name))
            for name in ("summaries", "fidelity", "atlas")
        ],
        ("RUN/layers/<layer>/analysis/summaries/", lambda r: _at(r).stage_dir("summaries")),
    ],
    "model_analysis_dir": [
        *[
            (
                f"RUN/analysis/{name}/<Concept>-<variant>/",
                lambda r, name=name: r.model_analysis_dir(name, MODEL),
            )
            for name in ("probe", "intervene", "localize")
        ],
        *[
            (
                f"RUN/layers/<layer>/analysis/{name}/<Concept>-<variant>/",
                lambda r, name=name: _at(r).model_analysis_dir(name, MODEL),
            )
            for name in ("probe", "localize")
        ],
    ],
    "pointing_dir": [
        ("RUN/analysis/localize/<Concept>-<variant>/pointing/", lambda r: r.pointing_dir(MODEL)),
        (
            "RUN/layers/<layer>/analysis/localize/<Concept>-<variant>/pointing/",
            lambda r: _at(r).pointing_dir(MODEL),
        ),
    ],
    "separation_dir": [("RUN/analysis/separation/<Concept>/", lambda r: r.separation_dir("Mass"))],
    "associated_off_dir": [
        (
            "RUN/analysis/separation/<Concept>/associated-off/<variant>/",
            lambda r: r.associated_off_dir("Mass", "finetuned"),
        )
    ],
    "report_dir": [("RUN/report/", lambda r: r.report_dir)],
    "report_index": [("RUN/report/index.html", lambda r: r.report_index)],
    "report_atlas": [("RUN/report/atlas.html", lambda r: r.report_atlas)],
    "report_json": [("RUN/report/report.json", lambda r: r.report_json)],
    "report_figures": [("RUN/report/figures/", lambda r: r.report_figures)],
    "report_latents": [("RUN/report/latents/", lambda r: r.report_latents)],
    "report_latent": [("RUN/report/latents/<idx>.html", lambda r: r.report_latent(7))],
}
# RunLayout members that name no single path (at_layer: another layer's layout, whose paths
# are the `RUN/layers/<layer>/...` ones above; stage_output: the runner's relative `outputs`).
NOT_PATHS = {"rel", "is_run", "markers", "at_layer", "stage_output"}


def _section() -> str:
    text = SPEC.read_text(encoding="utf-8")
    match = re.search(r"^## Run directory.*?\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "docs/architecture.md has no 'Run directory' section"
    return match.group(1)


def documented_paths() -> list[str]:
    """The first word of every line of the section's code block that starts with RUN/."""
    block = re.search(r"^```\n(.*?)^```", _section(), re.S | re.M)
    assert block, "the Run directory section has no code block"
    return [line.split()[0] for line in block.group(1).splitlines() if line.startswith("RUN/")]


def documented_stages() -> list[list[str]]:
    """The rows of the section's stage table: [stage, needs, writes, does]."""
    rows = []
    for line in _section().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith("`"):
            rows.append([c.strip("`") for c in cells])
    assert rows, "the Run directory section has no stage table"
    return rows


def _expected(doc: str, run: Path) -> Path:
    for placeholder, value in SAMPLE.items():
        doc = doc.replace(placeholder, value)
    return run / doc.removeprefix("RUN/").rstrip("/")


def test_every_documented_path_is_the_layouts(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    checked = [doc for entries in PATHS.values() for doc, _ in entries]
    assert sorted(checked) == sorted(documented_paths())
    for member, entries in PATHS.items():
        for doc, path_of in entries:
            assert path_of(layout) == _expected(doc, tmp_path), (member, doc)


def test_every_layout_path_is_documented() -> None:
    members = {
        name
        for name, value in inspect.getmembers(RunLayout)
        if not name.startswith("_") and (isinstance(value, property) or callable(value))
    }
    assert members - NOT_PATHS == set(PATHS)


def test_every_analysis_stage_has_a_documented_folder() -> None:
    documented = set(documented_paths())
    for name in ANALYSIS_STAGES:
        assert any(p.startswith(f"RUN/analysis/{name}/") for p in documented), name


def test_the_stage_table_is_the_layouts() -> None:
    expected = [[s.name, ", ".join(s.deps) or "—", f"{s.output}/", s.description] for s in STAGES]
    assert documented_stages() == expected


def test_the_runner_declares_the_layouts_stages(tmp_path: Path) -> None:
    from mammo_sae.pipeline import Pipeline, RunConfig, load_pipeline_config

    cfg = load_pipeline_config("phantom.yaml")
    cfg.extract.layers = ["final"]  # the final layer's stages alone (the demo taps another)
    runner = Pipeline(cfg, tmp_path, progress=False).runner
    declared = [(s.name, s.deps, s.description, s.outputs) for s in runner.stages]
    assert declared == [(s.name, s.deps, s.description, (s.output,)) for s in STAGES]
    only = next(f for f in RunConfig.__dataclass_fields__.values() if f.name == "only")
    assert all(s.name in only.metadata["help"] for s in STAGES)


def test_layer_stages_are_documented_and_declared_at_their_layer(tmp_path: Path) -> None:
    """Each of LAYER_STAGES is named in the section as `<stage>@<layer>`, and a two-layer run
    declares them writing that stage's folder under RUN/layers/<layer>/."""
    from mammo_sae.pipeline import Pipeline, load_pipeline_config

    section = _section()
    assert all(f"`{name}@<layer>`" in section for name in LAYER_STAGES)
    cfg = load_pipeline_config("phantom.yaml")
    cfg.extract.layers = ["final", "blocks.3"]
    declared = {s.name: s for s in Pipeline(cfg, tmp_path, progress=False).runner.stages}
    at = RunLayout(tmp_path).at_layer("blocks.3")
    for spec in STAGES:
        if spec.name in LAYER_STAGES:
            stage = declared[layer_stage_name(spec.name, "blocks.3")]
            assert stage.outputs == (at.stage_output(spec.name),)
            assert tmp_path / stage.outputs[0] == at.run / "layers/blocks.3" / spec.output
        else:
            assert layer_stage_name(spec.name, "blocks.3") not in declared


def test_stage_records_are_where_the_runner_writes_them(tmp_path: Path) -> None:
    from mammo_sae.runner import Runner, Stage

    runner = Runner(tmp_path, log=lambda s: None)
    runner.add(Stage("probe", lambda: {}, {}))
    runner.execute()
    assert RunLayout(tmp_path).stage_record("probe").is_file()


def test_stage_dir_refuses_a_stage_that_is_not_an_analysis(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="not an analysis stage"):
        RunLayout(tmp_path).stage_dir("sae")
    with pytest.raises(KeyError, match="unknown stage 'probes'"):
        RunLayout(tmp_path).stage_dir("probes")


def test_model_entry_round_trips_through_models_json(tmp_path: Path) -> None:
    inside = tmp_path / "models" / "Mass-finetuned" / "model"
    inside.mkdir(parents=True)
    entry = ModelEntry("Mass-finetuned", "Mass", "finetuned", str(inside), "Mass-finetuned", "b5")
    record = entry.to_record(tmp_path)
    # models.json's fields and the relocatable classifier path.
    assert list(record) == ["name", "concept", "variant", "classifier", "encoder_key", "arch"]
    assert record["classifier"] == "models/Mass-finetuned/model"
    assert ModelEntry.from_record(record, tmp_path) == entry
    # An entry of another writer (standalone report): no arch, no concept/variant.
    old = ModelEntry.from_record({"name": "Calc-pretrained", "classifier": ""}, tmp_path)
    assert (old.concept, old.variant, old.classifier, old.arch) == ("Calc", "pretrained", "", "")
