"""Runs on your own checkpoints (issue 15): `mammo-sae run` with one finetuned checkpoint per
concept, and `mammo-sae report` on the outputs of the individual commands.

One small run serves the pipeline tests: the tiny phantom as a `folds` dataset, and a Mass
linear probe (trained for a few epochs, saved in our format) named as the only model of both
concepts, the second time through a byte-identical copy. So each concept has one model (no pair
to compare) and both models have one encoder (one store per split).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import train_mass_linear_probe, write_checkpoint_config

from mammo_sae.cli import main
from mammo_sae.errors import MammoSaeError
from mammo_sae.pipeline import RunConfig, load_pipeline_config, run_pipeline

CONCEPTS = ("Mass", "Suspicious_Calcification")


@pytest.fixture(scope="module")
def classifier(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mass linear probe on a He-initialised phantom encoder (torch's default init would give
    every image the same features), in our model format."""
    root = tmp_path_factory.mktemp("one_model_ckpt")
    return train_mass_linear_probe(tiny_phantom, root, "--epochs", "2", "--image-size", "128x80")


@pytest.fixture(scope="module")
def one_model_run(
    classifier: Path, tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("one_model_run")
    copy = root / "calc_copy"
    shutil.copytree(classifier, copy)  # another path, the same bytes
    config = write_checkpoint_config(
        root / "one.yaml",
        tiny_phantom,
        {
            "Mass": {"finetuned": str(classifier)},
            "Suspicious_Calcification": {"finetuned": str(copy)},
        },
    )
    return run_pipeline(RunConfig(config=config, out=root / "run", progress=False))


def test_one_finetuned_model_per_concept_runs_end_to_end(one_model_run: Path) -> None:
    models = json.loads((one_model_run / "models" / "models.json").read_text())
    assert [m["name"] for m in models["models"]] == [f"{c}-finetuned" for c in CONCEPTS]
    assert all(m["arch"] == "efficientnet-phantom" for m in models["models"])  # from the file
    for stage in ("probe", "intervene", "localize"):
        for concept in CONCEPTS:
            assert any((one_model_run / "analysis" / stage / f"{concept}-finetuned").iterdir())
    for concept in CONCEPTS:
        sep = json.loads(
            (one_model_run / "analysis" / "separation" / concept / "separation.json").read_text()
        )
        assert list(sep["models"]) == ["finetuned"]
    assert (one_model_run / "report" / "index.html").is_file()


def test_identical_checkpoints_are_extracted_once(one_model_run: Path) -> None:
    models = json.loads((one_model_run / "models" / "models.json").read_text())["models"]
    assert {m["encoder_key"] for m in models} == {"Mass-finetuned"}
    stores = sorted(p.name for p in (one_model_run / "stores").iterdir() if p.is_dir())
    assert stores == ["Mass-finetuned-test", "Mass-finetuned-training", "sae-train"]


def test_report_says_which_comparisons_were_skipped(one_model_run: Path) -> None:
    report = json.loads((one_model_run / "report" / "report.json").read_text())
    assert [s["concept"] for s in report["skipped"]] == list(CONCEPTS)
    assert "Mass has one model (Mass-finetuned)" in report["skipped"][0]["reason"]
    text = (one_model_run / "report" / "index.html").read_text(encoding="utf-8")
    assert "Skipped: the comparison between variants" in text
    assert "No pretrained-vs-finetuned comparison for Suspicious_Calcification" in text


def test_resolved_config_shows_no_phantom_arch(one_model_run: Path) -> None:
    """models.arch builds phantom models only; a checkpoints run does not record it."""
    resolved = yaml.safe_load((one_model_run / "config.yaml").read_text())
    assert "arch" not in resolved["models"]
    assert "efficientnet-phantom" not in (one_model_run / "config.yaml").read_text()


def test_config_errors_name_the_checkpoint(tiny_phantom: Path, tmp_path: Path) -> None:
    ckpt = {"Mass": {"finetuned": "a.pth"}}
    with pytest.raises(MammoSaeError, match=r"models.checkpoints.Mass is missing"):
        load_pipeline_config(
            write_checkpoint_config(tmp_path / "a.yaml", tiny_phantom, {"Mass": {}})
        )
    with pytest.raises(MammoSaeError, match=r"names \['Calc'\], which models.concepts"):
        cfg = write_checkpoint_config(tmp_path / "b.yaml", tiny_phantom, ckpt)
        data = yaml.safe_load(cfg.read_text())
        data["models"]["checkpoints"]["Calc"] = {"finetuned": "b.pth"}
        cfg.write_text(yaml.safe_dump(data))
        load_pipeline_config(cfg)
    with pytest.raises(MammoSaeError, match=r"sae_source 'Suspicious_Calcification/finetuned'"):
        cfg = write_checkpoint_config(tmp_path / "c.yaml", tiny_phantom, ckpt)
        data = yaml.safe_load(cfg.read_text())
        del data["extract"]["sae_source"]
        cfg.write_text(yaml.safe_dump(data))
        load_pipeline_config(cfg)


def test_dry_run_checks_every_checkpoint_header(
    classifier: Path, tiny_phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_checkpoint_config(
        tmp_path / "good.yaml", tiny_phantom, {"Mass": {"finetuned": str(classifier)}}
    )
    run_pipeline(RunConfig(config=good, out=tmp_path / "run", dry_run=True, progress=False))
    out = capsys.readouterr().out
    assert "checked] models.checkpoints.Mass.finetuned" in out
    assert "arch efficientnet-phantom" in out
    assert not (tmp_path / "run" / "models").exists()  # nothing was run
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    for path, message in (
        (tmp_path / "absent.pth", "a model checkpoint not found"),
        (junk, "not a torch checkpoint"),
    ):
        cfg = write_checkpoint_config(
            tmp_path / "bad.yaml", tiny_phantom, {"Mass": {"finetuned": str(path)}}
        )
        with pytest.raises(MammoSaeError, match=f"models.checkpoints.Mass.finetuned: .*{message}"):
            run_pipeline(RunConfig(config=cfg, out=tmp_path / "run2", dry_run=True, progress=False))


# ------------------------------------------------------------------ stand-alone outputs


@pytest.fixture(scope="module")
def standalone(
    classifier: Path, tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """What a user gets from the individual commands, each with its own --out under one folder."""
    d = tmp_path_factory.mktemp("standalone") / "mine"
    common = ["--device", "cpu", "--no-progress"]
    assert (
        main(
            [
                "extract",
                "--data",
                str(tiny_phantom),
                "--model",
                str(classifier),
                "--split",
                "all",
                "--image-size",
                "128x80",
                "--workers",
                "0",
                "--out",
                str(d / "store"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "sae",
                "train",
                "--store",
                str(d / "store"),
                "--out",
                str(d / "sae"),
                "--expansion",
                "1",
                "--epochs",
                "2",
                "--batch-size",
                "256",
                "--resample-every",
                "0",
                "--eval-patches",
                "256",
                "--no-measure-matmul",
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "probe",
                "--store",
                str(d / "store"),
                "--sae",
                str(d / "sae"),
                "--concept",
                "Mass",
                "--split",
                "training",
                "--out",
                str(d / "probe"),
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "localize",
                "--store",
                str(d / "store"),
                "--sae",
                str(d / "sae"),
                "--concept",
                "Mass",
                "--ranking",
                str(d / "probe" / "ranking_class=1_centered.json"),
                "--top",
                "3",
                "--split",
                "test",
                "--figure-images",
                "1",
                "--out",
                str(d / "localize"),
                *common,
            ]
        )
        == 0
    )
    image = sorted((tiny_phantom / "images_png").rglob("*.png"))[0]
    assert (
        main(
            [
                "explain",
                "--model",
                str(classifier),
                "--sae",
                str(d / "sae"),
                "--image-size",
                "128x80",
                "--no-heatmaps",
                str(image),
                "--out",
                str(d / "explain"),
                *common,
            ]
        )
        == 0
    )
    return d


def test_report_of_standalone_outputs_builds_what_it_can(standalone: Path) -> None:
    assert main(["report", "--run", str(standalone), "--no-progress"]) == 0
    report = json.loads((standalone / "report" / "report.json").read_text())
    found = {(r["output"], r["path"], r["shown"]) for r in report["standalone"]["found"]}
    assert found == {
        ("store", "store", "yes"),
        ("sae", "sae", "yes"),
        ("probe", "probe", "yes"),
        ("localize", "localize", "yes"),
        ("explain", "explain", "yes"),
    }
    assert [m["output"] for m in report["standalone"]["missing"]] == [
        "eval",
        "intervene",
        "fidelity",
        "separation",
    ]
    assert report["standalone"]["eval_split"] == "test"
    assert [r["rank"] for r in report["table2"]["Mass"]["latents"]] == [1, 2, 3]
    assert len(report["top_latents"]["Mass"]) == 3  # latent pages from store + SAE
    assert report["sae"]["final_log_entry"]["epoch"] >= 1
    assert report["problems"] == {}
    text = (standalone / "report" / "index.html").read_text(encoding="utf-8")
    assert "mammo-sae classifier eval → Classifiers" in text
    assert 'href="../explain/index.html"' in text
    assert (standalone / "report" / "latents").is_dir()


def test_localize_accepts_split_all(standalone: Path) -> None:
    """`--split all` evaluates every split's positives, as `extract` and `probe` read `all`."""
    out = standalone.parent / "loc_all"
    assert (
        main(
            [
                "localize",
                "--store",
                str(standalone / "store"),
                "--sae",
                str(standalone / "sae"),
                "--concept",
                "Mass",
                "--latents",
                "0,1",
                "--split",
                "all",
                "--figure-images",
                "0",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    settings = json.loads((out / "localization.json").read_text())["settings"]
    test_only = json.loads((standalone / "localize" / "localization.json").read_text())["settings"]
    assert settings["split"] == "all" and settings["n_images"] > test_only["n_images"]


# ------------------------------------------------------------------ consistency fixes


def test_classifier_eval_on_one_class_still_writes_scores(
    classifier: Path, tiny_phantom: Path, tmp_path: Path
) -> None:
    """No phantom image has an architectural distortion: AUROC is null (with the reason), the
    per-image scores are written all the same."""
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "classifier",
                "eval",
                "--data",
                str(tiny_phantom),
                "--model",
                str(classifier),
                "--concept",
                "Architectural_Distortion",
                "--split",
                "test",
                "--image-size",
                "128x80",
                "--n-boot",
                "0",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["auroc"] is None and result["n_pos"] == 0
    assert "needs both classes; all 10 images are 0" in result["auroc_null_reason"]
    scores = pd.read_csv(out.with_suffix(".csv"))
    assert len(scores) == result["n"] == 10 and scores["score"].between(0, 1).all()


def test_a_checkpoint_without_a_concept_gets_a_warning(
    classifier: Path, tiny_phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mammo_sae.models.checkpoints import load_classifier, save_model

    model = load_classifier(classifier)
    model.concept = None  # as a Mammo-CLIP .pth
    save_model(model, tmp_path / "anonymous")
    assert (
        main(
            [
                "classifier",
                "eval",
                "--data",
                str(tiny_phantom),
                "--model",
                str(tmp_path / "anonymous"),
                "--concept",
                "Mass",
                "--split",
                "test",
                "--image-size",
                "128x80",
                "--n-boot",
                "0",
                "--out",
                str(tmp_path / "e.json"),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "records no concept; assuming it predicts 'Mass'" in capsys.readouterr().err
