"""Versioned stage result records: the localize command writes its settings through
`LocalizationSettings`, fidelity and intervene their results through `FidelityRecord` and
`InterveneRecord`, and the report reads them back through the same classes; files written before
(by the main branch's writers, frozen below and in tests/fixtures/) still read and render."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mammo_sae.analysis.localize import SCHEMA_VERSION, BoxRule, LocalizationSettings
from mammo_sae.analysis.results import SCHEMA_VERSION as RESULTS_VERSION
from mammo_sae.analysis.results import FidelityRecord, InterveneRecord
from mammo_sae.errors import MammoSaeError
from mammo_sae.io import write_json
from mammo_sae.layout import RunLayout
from mammo_sae.report.build import build_report

# localization.json as `mammo-sae localize` wrote it before this record existed (key order kept).
WRITTEN_BY_MAIN = {
    "schema_version": 1,
    "settings": {
        "concept": "Mass",
        "threshold": "relmax:0.3",
        "threshold_on": "frame",
        "upsample": "bilinear",
        "min_mass": 0.0,
        "min_box_area": 10,
        "box_score": "mean",
        "iou_threshold": 0.3,
        "split": "validation",
        "image_set": "positive",
        "match": "voc",
        "ap": "voc-all-point",
        "align": "receptive-field",
        "n_images": 4,
        "n_gt": 5,
    },
    "latents": [{"rank": 1, "latent": 7, "ap": 0.5}, {"rank": 2, "latent": 3, "ap": 0.25}],
    "baselines": {"chance": {"ap": 0.1}},
}


def test_settings_read_and_write_the_files_of_today() -> None:
    record = LocalizationSettings.from_json(WRITTEN_BY_MAIN)
    assert record.schema_version == SCHEMA_VERSION == 1
    assert (record.threshold, record.align, record.iou_threshold) == (
        "relmax:0.3",
        "receptive-field",
        0.3,
    )
    # Written back, the same object, key for key and in order.
    assert json.dumps(record.to_json()) == json.dumps(WRITTEN_BY_MAIN["settings"])
    assert record.box_rule() == BoxRule.from_settings(WRITTEN_BY_MAIN["settings"])


def test_older_settings_get_the_defaults_they_ran_with() -> None:
    record = LocalizationSettings.from_json({"settings": {"threshold": "p99"}})
    assert (record.threshold, record.align, record.iou_threshold, record.split) == (
        "p99",
        "even",
        0.25,
        "",
    )


def test_a_newer_or_broken_file_is_refused_by_name() -> None:
    newer = {**WRITTEN_BY_MAIN, "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(MammoSaeError, match=r"x\.json: schema_version 2, newer than"):
        LocalizationSettings.from_json(newer, where="x.json")
    with pytest.raises(MammoSaeError, match="`settings` is not an object"):
        LocalizationSettings.from_json({"schema_version": 1, "settings": [1]})


def _run_with(tmp_path: Path, localization: dict) -> Path:
    run = tmp_path / "run"
    layout = RunLayout(run)
    layout.stages_dir.mkdir(parents=True)
    layout.config.write_text("name: t\nextract:\n  eval_split: validation\n")
    write_json(
        layout.model_analysis_dir("localize", "Mass-finetuned") / "localization.json", localization
    )
    return run


def test_report_renders_the_localization_of_today(tmp_path: Path) -> None:
    run = _run_with(tmp_path, WRITTEN_BY_MAIN)
    index = build_report(run, strict=True, latent_pages=False, progress=False)
    data = json.loads(RunLayout(run).report_json.read_text())
    assert data["table2"]["Mass-finetuned"]["settings"] == WRITTEN_BY_MAIN["settings"]
    text = index.read_text(encoding="utf-8")
    assert "AP@IoU 0.3 of each latent" in text
    assert "threshold relmax:0.3, validation split, positive images" in text
    assert "at their receptive-field positions" in text


def test_report_names_a_localization_it_cannot_read(tmp_path: Path) -> None:
    run = _run_with(tmp_path, {**WRITTEN_BY_MAIN, "schema_version": SCHEMA_VERSION + 1})
    build_report(run, latent_pages=False, progress=False)
    problem = json.loads(RunLayout(run).report_json.read_text())["problems"]["localize"]
    assert "localization.json: schema_version 2, newer than this mammo-sae reads" in problem


# ------------------------------------------------------------------ fidelity.json, intervene.json
# Written by main's `mammo-sae fidelity` / `mammo-sae intervene` (before these records existed) on
# the tiny run of tests/test_report.py (tmp paths cut to run-relative ones).
FIXTURES = Path(__file__).parent / "fixtures"
FIDELITY_BY_MAIN = json.loads((FIXTURES / "main_fidelity.json").read_text(encoding="utf-8"))
INTERVENE_BY_MAIN = json.loads((FIXTURES / "main_intervene.json").read_text(encoding="utf-8"))


def test_fidelity_and_intervene_records_read_and_write_the_files_of_today() -> None:
    fid = FidelityRecord.from_json(FIDELITY_BY_MAIN)
    row = fid.results["Mass-finetuned"]
    main_row = FIDELITY_BY_MAIN["results"]["Mass-finetuned"]
    assert (row.concept, row.n, row.original.auroc_low, row.sae.auprc_high, row.fvu) == (
        "Mass",
        main_row["n"],
        main_row["original"]["auroc_low"],
        main_row["sae"]["auprc_high"],
        main_row["fvu"],
    )
    sweep = InterveneRecord.from_json(INTERVENE_BY_MAIN)
    assert (sweep.concept, sweep.n, sweep.path) == ("Mass", 10, "pooled-identity")
    off = [p for p in INTERVENE_BY_MAIN["results"] if p["mode"] == "off"]
    assert sweep.curves()["off"]["auroc"].tolist() == [p["auroc"] for p in off]
    # Written back: the same objects, key for key and in order.
    for record, doc in ((fid, FIDELITY_BY_MAIN), (sweep, INTERVENE_BY_MAIN)):
        assert json.dumps(record.to_json()) == json.dumps(doc)


def test_fidelity_and_intervene_files_newer_or_broken_are_refused_by_name() -> None:
    newer = {**FIDELITY_BY_MAIN, "schema_version": RESULTS_VERSION + 1}
    with pytest.raises(MammoSaeError, match=r"f\.json: schema_version 2, newer than"):
        FidelityRecord.from_json(newer, "f.json")
    broken = json.loads(json.dumps(INTERVENE_BY_MAIN))
    del broken["results"][1]["union_size"]
    with pytest.raises(MammoSaeError, match=r"i\.json\.results\[1\]: missing 'union_size'"):
        InterveneRecord.from_json(broken, "i.json")
    broken = json.loads(json.dumps(FIDELITY_BY_MAIN))
    broken["results"]["Mass-pretrained"]["sae"]["auroc"] = "high"
    with pytest.raises(MammoSaeError, match=r"Mass-pretrained\.sae\.auroc: expected a number"):
        FidelityRecord.from_json(broken, "f.json")


def test_report_renders_the_fidelity_and_intervene_files_of_today(tmp_path: Path) -> None:
    run = _run_with(tmp_path, WRITTEN_BY_MAIN)
    layout = RunLayout(run)
    write_json(layout.stage_dir("fidelity") / "fidelity.json", FIDELITY_BY_MAIN)
    intervene = layout.model_analysis_dir("intervene", "Mass-finetuned") / "intervene.json"
    write_json(intervene, INTERVENE_BY_MAIN)
    build_report(run, strict=True, latent_pages=False, progress=False)
    data = json.loads(layout.report_json.read_text())
    table1 = {r["model"]: r for r in data["table1"]}
    for name, r in FIDELITY_BY_MAIN["results"].items():
        assert table1[name]["auroc_sae"] == r["sae"]["auroc"]
        assert table1[name]["auroc_original_high"] == r["original"]["auroc_high"]
        assert table1[name]["dead_fraction"] == r["dead_fraction"]
    curves = data["figure2"]["Mass-finetuned"]
    on = [p for p in INTERVENE_BY_MAIN["results"] if p["mode"] == "on"]
    assert curves["on"]["ks"] == [p["k"] for p in on]
    assert curves["on"]["auroc_low"] == [p["auroc_low"] for p in on]
