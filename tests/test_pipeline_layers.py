"""SAEs on more than one layer in `mammo-sae run` (issue 17, item 1): `extract.layers`.

The default (`[final]`) changes no stage key, so runs made before the key existed are skipped;
each extra layer adds `<stage>@<layer>` stages writing under RUN/layers/<layer>/, and the report
shows their Table 2. The end-to-end test runs the tiny phantom (128x80, one Mass linear probe,
a 1x SAE for two epochs) first on the final layer alone, then with blocks.3 added.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import train_mass_linear_probe, write_checkpoint_config

from mammo_sae.errors import MammoSaeError
from mammo_sae.layout import LAYER_STAGES, STAGE_NAMES, RunLayout
from mammo_sae.pipeline import (
    PACKAGE_CONFIGS,
    Pipeline,
    RunConfig,
    load_pipeline_config,
    run_pipeline,
)

LAYER = "blocks.3"  # stride 16 on the phantom encoder: an 8x5 map at 128x80 (final: 4x3)


def _packaged(tmp_path: Path, name: str, **extract: object) -> Path:
    """phantom.yaml with its extract.layers left out (the demo taps blocks.2; `final` alone is
    the default) and `extract` keys added."""
    data = yaml.safe_load((PACKAGE_CONFIGS / "phantom.yaml").read_text(encoding="utf-8"))
    data.setdefault("extract", {}).pop("layers", None)
    data["extract"].update(extract)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _keys(config: Path, run: Path) -> dict[str, str]:
    pipeline = Pipeline(load_pipeline_config(config), run, progress=False)
    return {item.stage.name: item.key for item in pipeline.runner.plan()}


def test_the_default_layers_change_no_stage_key(tmp_path: Path) -> None:
    """`extract.layers: [final]` (the default) keys every stage as a config without it; an
    extra layer changes only the report's key among the existing stages."""
    plain = _keys(_packaged(tmp_path, "plain.yaml"), tmp_path / "run")
    assert list(plain) == list(STAGE_NAMES)
    assert _keys(_packaged(tmp_path, "final.yaml", layers=["final"]), tmp_path / "run") == plain
    two = _keys(_packaged(tmp_path, "two.yaml", layers=["final", LAYER]), tmp_path / "run")
    added = [f"{name}@{LAYER}" for name in LAYER_STAGES]
    assert list(two) == [*STAGE_NAMES[:-1], *added, "report"]
    assert {n: two[n] for n in STAGE_NAMES if n != "report"} == {
        n: plain[n] for n in STAGE_NAMES if n != "report"
    }
    assert two["report"] != plain["report"]


def test_layer_stages_depend_on_their_own_layer(tmp_path: Path) -> None:
    config = _packaged(tmp_path, "two.yaml", layers=["final", LAYER])
    stages = {s.name: s for s in Pipeline(load_pipeline_config(config), tmp_path).runner.stages}
    assert stages[f"extract@{LAYER}"].deps == ("models",)
    assert stages[f"sae@{LAYER}"].deps == (f"extract@{LAYER}",)
    assert stages[f"localize@{LAYER}"].deps == (f"probe@{LAYER}",)
    assert stages[f"localize@{LAYER}"].outputs == (f"layers/{LAYER}/analysis/localize",)
    assert stages[f"intervene@{LAYER}"].deps == (f"probe@{LAYER}",)
    assert stages[f"fidelity@{LAYER}"].deps == (f"summaries@{LAYER}",)
    for name in ("intervene", "fidelity", "localize"):
        assert f"{name}@{LAYER}" in stages["report"].deps
    # Separation and the atlas read the final layer only.
    assert not any(n in stages for n in (f"separation@{LAYER}", f"atlas@{LAYER}"))


@pytest.mark.parametrize(
    ("extract", "message"),
    [
        ({"layers": [LAYER]}, "must include final"),
        ({"layers": ["final", LAYER, LAYER]}, "lists a layer twice"),
        ({"layers": ["final", "blocks/3"]}, "'blocks/3' is not a layer"),
        ({"layers": ["final", LAYER], "options": {"layer": "blocks.2"}}, "both choose layers"),
    ],
)
def test_bad_layer_lists_are_refused_naming_the_problem(
    tmp_path: Path, extract: dict, message: str
) -> None:
    with pytest.raises(MammoSaeError, match=message):
        load_pipeline_config(_packaged(tmp_path, "bad.yaml", **extract))


# ------------------------------------------------------------------ end to end


def _tiny_config(path: Path, data: Path, classifier: Path, layers: list[str] | None) -> Path:
    # float32 stores: the layer's fidelity is compared with the final layer's exactly
    extract: dict = {"options": {"workers": 0, "dtype": "float32"}}
    if layers is not None:
        extract["layers"] = layers
    checkpoints = {"Mass": {"finetuned": str(classifier)}}
    return write_checkpoint_config(
        path, data, checkpoints, name="layers", pointing=True, extract=extract
    )


@pytest.fixture(scope="module")
def two_layer_run(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny run on the final layer alone, then again with blocks.3 added; the plans and
    the run directory."""
    root = tmp_path_factory.mktemp("layers_run")
    clf = train_mass_linear_probe(tiny_phantom, root, "--epochs", "2", "--image-size", "128x80")
    run = root / "run"
    one = _tiny_config(root / "one.yaml", tiny_phantom, clf, None)
    run_pipeline(RunConfig(config=one, out=run, progress=False))
    two = _tiny_config(root / "two.yaml", tiny_phantom, clf, ["final", LAYER])
    plan = Pipeline(load_pipeline_config(two), run, progress=False).runner.plan()
    run_pipeline(RunConfig(config=two, out=run, progress=False))
    again = Pipeline(load_pipeline_config(two), run, progress=False).runner.plan()
    return {"run": run, "added": plan, "again": again}


@pytest.mark.slow
def test_adding_a_layer_reruns_only_its_stages_and_the_report(two_layer_run: dict) -> None:
    actions = {item.stage.name: item.action for item in two_layer_run["added"]}
    layer_stages = {f"{name}@{LAYER}" for name in LAYER_STAGES}
    assert {n for n, a in actions.items() if a == "run"} == layer_stages | {"report"}
    assert all(item.action == "skip" for item in two_layer_run["again"])


@pytest.mark.slow
def test_an_extra_layer_has_its_own_stores_sae_probe_and_localisation(
    two_layer_run: dict,
) -> None:
    run: Path = two_layer_run["run"]
    final, at = RunLayout(run), RunLayout(run).at_layer(LAYER)
    manifest = json.loads((at.store_dir("Mass-finetuned", "test") / "manifest.json").read_text())
    assert (manifest["layer"], manifest["d"], manifest["grid"]) == (LAYER, 40, [8, 5])
    train = json.loads((at.sae_train_store / "manifest.json").read_text())
    assert train["layer"] == LAYER and (at.sae_train_store.parent == at.stores_dir)
    assert json.loads((at.sae_dir / "cfg.json").read_text())["d"] == 40  # final: 640
    for stage in ("probe", "intervene", "localize"):
        assert any(at.model_analysis_dir(stage, "Mass-finetuned").iterdir()), stage
    assert (at.pointing_dir("Mass-finetuned") / "localization.json").is_file()
    # Fidelity below the final layer runs the rest of the network: its "original" side is the
    # classifier itself, as at the final layer (same images; float32 stores).
    fid = {
        where: json.loads((lay.stage_dir("fidelity") / "fidelity.json").read_text())["results"][
            "Mass-finetuned"
        ]
        for where, lay in (("final", final), ("layer", at))
    }
    assert "path" not in fid["final"]  # the pooled identity: written as before layers existed
    assert fid["layer"]["path"] == f"network from {LAYER}"
    assert fid["layer"]["original"]["auroc"] == pytest.approx(fid["final"]["original"]["auroc"])
    inter = json.loads(
        (at.model_analysis_dir("intervene", "Mass-finetuned") / "intervene.json").read_text()
    )
    assert inter["path"] == f"network from {LAYER}"
    # Separation and the atlas stay final-layer analyses.
    assert not (at.analysis_dir / "separation").exists()
    # The final layer's classifier-map baseline only.
    loc_file = at.model_analysis_dir("localize", "Mass-finetuned") / "localization.json"
    loc = json.loads(loc_file.read_text())
    assert "classifier_map" not in loc.get("baselines", {})


@pytest.mark.slow
def test_the_report_shows_table2_per_layer(two_layer_run: dict) -> None:
    layout = RunLayout(two_layer_run["run"])
    html = layout.report_index.read_text(encoding="utf-8")
    assert "Table 2 by layer" in html and "Table 1 by layer" in html
    assert "Figure 2 by layer" in html and "figures/figure2_layers.png" in html
    assert f"Mass-finetuned @ {LAYER}" in html and "Mass-finetuned @ final" in html
    assert f"network from {LAYER}" in html
    data = json.loads(layout.report_json.read_text())
    paths = {r["label"]: r["path"] for r in data["table1_layers"]}
    assert paths == {
        "Mass-finetuned @ final": "pooled-identity",
        f"Mass-finetuned @ {LAYER}": f"network from {LAYER}",
    }
    assert set(data["figure2_layers"]) == {"Mass-finetuned @ final", f"Mass-finetuned @ {LAYER}"}
    rows = data["table2_layers"][LAYER]
    assert set(rows) == {"Mass-finetuned", "Mass-finetuned/pointing"}
    assert rows["Mass-finetuned"]["latents"]
    assert "layers" not in data["problems"]
    # The final layer's Table 2 (and its latent pages) keep the final layer's rows only.
    assert set(data["table2"]) == {"Mass-finetuned", "Mass-finetuned/pointing"}


@pytest.mark.slow
def test_a_layer_dropped_from_the_config_leaves_the_report(
    two_layer_run: dict, tmp_path: Path
) -> None:
    """Its folder stays behind (nothing is deleted), but the report shows the listed layers
    only."""
    from mammo_sae.report.build import build_report

    run = tmp_path / "run"
    shutil.copytree(two_layer_run["run"], run, ignore=shutil.ignore_patterns("report"))
    layout = RunLayout(run)
    cfg = yaml.safe_load(layout.config.read_text(encoding="utf-8"))
    assert cfg["extract"]["layers"] == ["final", LAYER]
    build_report(run, latent_pages=False, progress=False)
    assert "Table 2 by layer" in layout.report_index.read_text(encoding="utf-8")
    cfg["extract"]["layers"] = ["final"]
    layout.config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    build_report(run, latent_pages=False, progress=False)
    assert "Table 2 by layer" not in layout.report_index.read_text(encoding="utf-8")
    assert "table2_layers" not in json.loads(layout.report_json.read_text())
