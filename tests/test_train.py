"""Concept classifier training: pretext, linear probe, finetune, eval (tiny phantom, CPU)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mammo_sae.cli import main
from mammo_sae.errors import MammoSaeError
from mammo_sae.models import train as T

SIZE = [128, 80]  # the tiny phantom is 256x160; half size keeps every run ~1 s


def _train_cfg(data: Path, out: Path, init: str, **kw: object) -> T.ClassifierTrainConfig:
    base = dict(
        data=data,
        concept="Mass",
        out=out,
        init=init,
        epochs=1,
        batch_size=8,
        lr=1e-3,
        image_size=SIZE,
        progress=False,
        val_fraction=0.3,
        seed=1,
    )
    base.update(kw)
    return T.ClassifierTrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pretext_encoder(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretext")
    rc = main(
        [
            "classifier",
            "pretrain",
            "--data",
            str(tiny_phantom),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--image-size",
            "128,80",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out / "model"


def _encoder_tensors(path: Path) -> dict[str, torch.Tensor]:
    from mammo_sae.models.checkpoints import load_image_encoder

    return {k: v.clone() for k, v in load_image_encoder(path).state_dict().items()}


def test_pretrain_writes_encoder_and_log(pretext_encoder: Path) -> None:
    run = pretext_encoder.parent
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1]
    assert {"loss", "val_accuracy", "lr", "images_per_s"} <= set(log[0])
    config = json.loads((pretext_encoder / "config.json").read_text())
    assert config["kind"] == "encoder" and config["pretext_tasks"] == [
        "density",
        "view",
        "laterality",
    ]


def test_cli_linear_probe_finetune_and_eval(
    tiny_phantom: Path, pretext_encoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for mode in ("linear-probe", "finetune"):
        out = tmp_path / mode
        rc = main(
            [
                "classifier",
                "train",
                "--data",
                str(tiny_phantom),
                "--concept",
                "Mass",
                "--mode",
                mode,
                "--init",
                str(pretext_encoder),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--lr",
                "1e-3",
                "--image-size",
                "128,80",
                "--no-progress",
            ]
        )
        assert rc == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["selection_split"] == "validation" and summary["mode"] == mode
        result_path = tmp_path / f"{mode}.json"
        rc = main(
            [
                "classifier",
                "eval",
                "--data",
                str(tiny_phantom),
                "--model",
                str(out / "model"),
                "--concept",
                "Mass",
                "--split",
                "test",
                "--image-size",
                "128,80",
                "--n-boot",
                "50",
                "--out",
                str(result_path),
                "--no-progress",
            ]
        )
        assert rc == 0
        result = json.loads(result_path.read_text())
        a = result["auroc"]
        assert 0.0 <= a["ci_low"] <= a["value"] <= a["ci_high"] <= 1.0
        assert result["split"] == "test" and result["n"] == 10 and result["model_concept"] == "Mass"
        scores = np.loadtxt(result_path.with_suffix(".csv"), delimiter=",", skiprows=1, usecols=3)
        assert scores.shape == (10,) and np.all((scores > 0) & (scores < 1))
    assert "AUROC" in capsys.readouterr().out


@pytest.mark.parametrize("precompute", [True, False])
def test_linear_probe_freezes_weights_and_bn_statistics(
    tiny_phantom: Path, pretext_encoder: Path, tmp_path: Path, precompute: bool
) -> None:
    from mammo_sae.models.checkpoints import load_classifier

    before = _encoder_tensors(pretext_encoder)
    cfg = _train_cfg(
        tiny_phantom,
        tmp_path,
        str(pretext_encoder),
        mode="linear-probe",
        precompute_features=precompute,
        epochs=2,
    )
    T.train_classifier(cfg)
    model = load_classifier(tmp_path / "model")
    after = model.encoder.state_dict()
    assert any("running_var" in k for k in before)
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert changed == []
    # The checkpoint of the last epoch, too (what a resume continues from).
    assert _encoder_tensors(tmp_path / "checkpoints" / "last").keys() == before.keys()


def test_finetune_moves_weights_and_bn_statistics(
    tiny_phantom: Path, pretext_encoder: Path, tmp_path: Path
) -> None:
    """The counterpart of the linear-probe test: the same comparison does detect changes."""
    before = _encoder_tensors(pretext_encoder)
    T.train_classifier(_train_cfg(tiny_phantom, tmp_path, str(pretext_encoder), mode="finetune"))
    after = _encoder_tensors(tmp_path / "checkpoints" / "last")
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert any(k.endswith("running_mean") for k in changed)
    assert any(k.endswith("weight") and "bn" not in k for k in changed)


def test_resume_reproduces_an_uninterrupted_run(
    tiny_phantom: Path, pretext_encoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = dict(mode="finetune", epochs=2, init=str(pretext_encoder))
    straight = _train_cfg(tiny_phantom, tmp_path / "straight", **kw)  # type: ignore[arg-type]
    T.train_classifier(straight)

    real_save = T._save_checkpoint
    calls = {"n": 0}

    def save_then_crash(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)  # type: ignore[arg-type]
        calls["n"] += 1
        raise KeyboardInterrupt  # "killed" right after the first epoch's checkpoint

    monkeypatch.setattr(T, "_save_checkpoint", save_then_crash)
    interrupted = dataclasses.replace(straight, out=tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        T.train_classifier(interrupted)
    monkeypatch.setattr(T, "_save_checkpoint", real_save)
    with pytest.raises(MammoSaeError, match="--resume"):
        T.train_classifier(interrupted)
    with pytest.raises(MammoSaeError, match="lr"):
        T.train_classifier(dataclasses.replace(interrupted, resume=True, lr=0.5))
    T.train_classifier(dataclasses.replace(interrupted, resume=True))

    a = _encoder_tensors(tmp_path / "straight" / "checkpoints" / "last")
    b = _encoder_tensors(tmp_path / "resumed" / "checkpoints" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = [
        json.loads(x) for x in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()
    ]
    log_b = [
        json.loads(x) for x in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [e["loss"] for e in log_a] == [e["loss"] for e in log_b] and len(log_b) == 2


def test_validation_split_is_patient_disjoint_and_never_test(tiny_phantom: Path) -> None:
    from mammo_sae.data.vindr import load_records

    records = load_records(tiny_phantom, level="row")
    assert {r.split for r in records} == {"training", "test"}
    y = T.concept_targets(records, "Mass")
    train, val = T.split_train_val(records, val_fraction=0.3, seed=0, strata=y)
    assert {r.split for r in train + val} == {"training"}
    assert {r.patient_id for r in train}.isdisjoint({r.patient_id for r in val})
    assert len(train) + len(val) == sum(r.split == "training" for r in records)
    assert {r.labels["Mass"] for r in val} == {0, 1}  # stratified: both classes to select on
    # Order-independent (hash of patient id), different seeds give different splits.
    train_rev, val_rev = T.split_train_val(records[::-1], val_fraction=0.3, seed=0, strata=y[::-1])
    assert {r.image_id for r in val_rev} == {r.image_id for r in val}
    folds = sorted({r.fold for r in records if r.split == "training"})
    _, val_fold = T.split_train_val(records, val_fraction=0.3, seed=0, val_fold=folds[0])
    patients = {r.patient_id for r in val_fold}
    assert {r.fold for r in records if r.patient_id in patients} == {folds[0]}
    with pytest.raises(MammoSaeError, match="--val-fold"):
        T.split_train_val(records, val_fraction=0.3, seed=0, val_fold=99)


def test_select_on_test_says_so(
    tiny_phantom: Path, pretext_encoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _train_cfg(
        tiny_phantom, tmp_path, str(pretext_encoder), mode="linear-probe", select_on="test"
    )
    summary = T.train_classifier(cfg)
    assert summary["selection_split"] == "test" and "TEST" in summary["warning"]
    assert "TEST split" in capsys.readouterr().out
    result = T.evaluate_classifier(
        T.EvalConfig(
            data=tiny_phantom,
            model=tmp_path / "model",
            concept="Mass",
            image_size=SIZE,
            n_boot=0,
            progress=False,
        )
    )
    assert "TEST" in result["model_selection"]


def test_bad_concept_lists_valid_ones(
    tiny_phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "classifier",
            "train",
            "--data",
            str(tiny_phantom),
            "--concept",
            "Masss",
            "--init",
            "efficientnet-phantom",
            "--out",
            str(tmp_path / "x"),
            "--no-progress",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "Masss" in err and "Mass" in err and "Suspicious_Calcification" in err
    rc = main(
        [
            "classifier",
            "train",
            "--data",
            str(tiny_phantom),
            "--concept",
            "Mass",
            "--init",
            "no-such-arch",
            "--out",
            str(tmp_path / "y"),
            "--no-progress",
        ]
    )
    assert rc == 2 and "efficientnet-phantom" in capsys.readouterr().err


def _classifier(out: Path) -> Path:
    """A random-weight Mass classifier (its final map is ~0: every image scores about the same)."""
    from mammo_sae.models.checkpoints import save_model
    from mammo_sae.models.classifier import ConceptClassifier
    from mammo_sae.models.registry import create_encoder

    torch.manual_seed(0)
    return save_model(
        ConceptClassifier(create_encoder("efficientnet-phantom"), 1, concept="Mass"), out
    )


def test_ids_that_are_paths_are_refused(
    tiny_phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_extract import _with_image_id

    data = _with_image_id(tiny_phantom, tmp_path / "d" / "data", 0, "../../../outside")
    model = _classifier(tmp_path / "model")
    for argv in (
        ["classifier", "eval", "--model", str(model), "--split", "training"],
        ["classifier", "train", "--init", "efficientnet-phantom", "--out", str(tmp_path / "run")],
    ):
        rc = main([*argv, "--data", str(data), "--concept", "Mass", "--no-progress"])
        assert rc == 2 and "column 'image_id' row" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_runs_images_of_mixed_sizes_and_training_names_them(
    tiny_phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    import cv2

    from mammo_sae.data.images import read_image, to_model_input
    from mammo_sae.data.vindr import load_records

    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data)
    records = load_records(data)
    for i, r in enumerate(records):  # the phantom is 256x160: images at 128x80 and 64x40
        hw = (128, 80) if i % 2 else (64, 40)
        small = cv2.resize(read_image(r.path), hw[::-1], interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(r.path), small)
    test = [r for r in records if r.split == "test"]
    assert {read_image(r.path).shape for r in test} == {(128, 80), (64, 40)}
    out = tmp_path / "eval.json"
    model = _classifier(tmp_path / "model")
    rc = main(
        [
            "classifier",
            "eval",
            "--data",
            str(data),
            "--model",
            str(model),
            "--concept",
            "Mass",
            "--split",
            "test",
            "--batch-size",
            "4",
            "--n-boot",
            "0",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and json.loads(out.read_text())["n"] == len(test) == 10

    # Each image runs at its own size and its output lands on its own row: a stand-in model
    # whose logit is the input's mean, and an identity "encoder" for the pooled features.
    class MeanLogit(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.double().mean(dim=(1, 2, 3))[:, None]

    expected = np.array([to_model_input(read_image(r.path)).double().mean().item() for r in test])
    cpu = torch.device("cpu")
    logits = T.predict_logits(
        MeanLogit(), test, size_hw=None, batch_size=4, device=cpu, progress=False
    )
    np.testing.assert_allclose(logits[:, 0], expected, rtol=1e-6)
    pooled = T.pooled_features(
        torch.nn.Identity(), test, size_hw=None, batch_size=4, device=cpu, progress=False
    )
    np.testing.assert_allclose(pooled.double().mean(dim=1).numpy(), expected, rtol=1e-5)

    # Training batches must share one size: refused naming two images.
    rc = main(
        [
            "classifier",
            "train",
            "--data",
            str(data),
            "--concept",
            "Mass",
            "--mode",
            "finetune",
            "--init",
            "efficientnet-phantom",
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "images of different sizes in one batch" in err and "--image-size" in err


def test_a_corrected_rerun_after_bad_input_is_not_refused(
    tiny_phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Inputs are checked before OUT is written, and a config.json without a checkpoint or model
    (a run that failed before its first epoch) is nothing to keep: neither blocks the fixed
    command with "already holds a run"."""
    out = tmp_path / "run"
    args = [
        "classifier",
        "train",
        "--data",
        str(tiny_phantom),
        "--concept",
        "Mass",
        "--mode",
        "linear-probe",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--image-size",
        "128,80",
        "--no-progress",
    ]
    assert main(args + ["--init", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    assert main(args + ["--init", "efficientnet-phantom"]) == 0
    assert (out / "model").is_dir()
    failed = tmp_path / "failed"  # as left by a run that died on an unreadable image
    failed.mkdir()
    (failed / "config.json").write_text(json.dumps({"schema_version": 1, "config": {"lr": 5.0}}))
    other = [str(failed) if a == str(out) else a for a in args]
    assert main(other + ["--init", "efficientnet-phantom"]) == 0
    capsys.readouterr()
    assert main(args + ["--init", "efficientnet-phantom", "--lr", "0.5"]) == 2  # a real run stays
    assert "already holds a run" in capsys.readouterr().err


def test_warmup_cosine_schedule() -> None:
    lrs = [T.warmup_cosine(s, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 1e-3


def test_train_phantom_models_runs_and_reuses_finished_runs(
    tiny_phantom: Path, tmp_path: Path
) -> None:
    fast = {"epochs": 1, "image_size": SIZE}
    kw = dict(
        concepts=("Mass",),
        pretrain_overrides=fast,
        linear_probe_overrides=fast,
        finetune_overrides=fast,
        n_boot=20,
        progress=False,
    )
    paths = T.train_phantom_models(tiny_phantom, tmp_path, **kw)  # type: ignore[arg-type]
    assert set(paths) == {"encoder", "Mass/pretrained", "Mass/finetuned"}
    for key in ("Mass/pretrained", "Mass/finetuned"):
        result = json.loads((paths[key].parent / "eval_test.json").read_text())
        assert result["concept"] == "Mass" and result["split"] == "test"
    stamp = (paths["Mass/finetuned"] / "model.safetensors").stat().st_mtime_ns
    assert T.train_phantom_models(tiny_phantom, tmp_path, **kw) == paths  # type: ignore[arg-type]
    assert (paths["Mass/finetuned"] / "model.safetensors").stat().st_mtime_ns == stamp
