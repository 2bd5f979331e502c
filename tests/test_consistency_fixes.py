"""Consistency fixes found on real data (issue 15, item 5): the report names the split it
evaluated, `preprocess` checks every CSV value before writing a PNG, the SAE's dead-latent window
fits small data. (`localize --split all`, single-class `classifier eval` and the no-concept
warning are in test_checkpoint_runs.py, which has a classifier and a store at hand.)"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_data_preprocess import OUT_HW, dicom_tree  # noqa: F401  (a fixture)

from mammo_sae.data.preprocess import preprocess_vindr
from mammo_sae.errors import DataError
from mammo_sae.io import write_json
from mammo_sae.report.build import build_report
from mammo_sae.sae.train import SAETrainConfig, TensorSource, train_sae


def test_report_headline_names_the_recorded_split(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: val\nextract: {eval_split: validation}\n")
    write_json(
        run / "models" / "models.json",
        {
            "schema_version": 1,
            "models": [
                {
                    "name": "Mass-finetuned",
                    "concept": "Mass",
                    "variant": "finetuned",
                    "classifier": "",
                    "encoder_key": "Mass-finetuned",
                }
            ],
            "test_metrics": {"Mass-finetuned": {"auroc": {"value": 0.8}, "n": 10, "n_pos": 3}},
        },
    )
    text = build_report(run, latent_pages=False, progress=False).read_text(encoding="utf-8")
    assert "validation AUROC (classifier)" in text
    assert "test AUROC" not in text


@pytest.mark.parametrize(
    "column,value,message",
    [
        ("xmax", "12O", r"row 2 has xmax = '12O', not a number"),
        ("breast_density", "DENSITY E", r"breast_density.*row 2 has 'DENSITY E'"),
    ],
)
def test_preprocess_checks_every_row_before_writing(
    dicom_tree: tuple[Path, Path, Path],  # noqa: F811  (the imported fixture)
    tmp_path: Path,
    column: str,
    value: str,
    message: str,
) -> None:
    root, findings_csv, breast_csv = dicom_tree
    df = pd.read_csv(findings_csv, dtype=str, keep_default_na=False)
    last = {**df.iloc[0].to_dict(), "image_id": "img2", column: value}  # a second finding
    pd.concat([df, pd.DataFrame([last])], ignore_index=True).to_csv(findings_csv, index=False)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        preprocess_vindr(
            root, findings_csv, out, breast_csv=breast_csv, out_hw=OUT_HW, progress=False
        )
    assert not list(out.rglob("*.png")) and not (out / "vindr_detection_v1_folds.csv").exists()


def test_sae_dead_window_is_capped_at_one_epoch(tmp_path: Path) -> None:
    """300 patches, the 10 M default window: dead latents used to show as 0 % in the log
    however many had died (the final in-sample figure said otherwise)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g).relu() + 0.1
    cfg = SAETrainConfig(
        out=tmp_path / "sae",
        expansion=8,
        batch_size=100,
        epochs=4,
        lr=3e-3,
        l1_coeff=0.3,
        resample_every=0,
        log_every=1,
        eval_patches=300,
        measure_matmul=False,
        progress=False,
    )
    train_sae(cfg, TensorSource(x))
    log = (tmp_path / "sae" / "train_log.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in log]
    final = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    in_sample = final["final_metrics"]["dead_fraction_in_sample"]
    assert in_sample > 0.05  # latents did die
    assert rows[-1]["dead_window_patches"] == 300 == final["training"]["dead_window_patches"]
    assert rows[-1]["dead_fraction"] == pytest.approx(in_sample, abs=0.05) and in_sample > 0
    assert rows[0]["dead_fraction"] == 0.0  # not before one epoch has passed
