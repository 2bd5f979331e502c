"""Checkpoint loading: parity with the reference fixtures, restricted unpickling, own format, convert."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need_shared

from mammo_sae.cli import main
from mammo_sae.errors import CheckpointError, MammoSaeError
from mammo_sae.io import load_torch_weights
from mammo_sae.models.checkpoints import (
    checkpoint_sha256,
    convert,
    load_classifier,
    load_encoder,
    load_image_encoder,
    save_model,
)
from mammo_sae.models.classifier import ConceptClassifier
from mammo_sae.models.registry import create_encoder

PRETRAIN = "b2-model-best-epoch-10.tar"
CLASSIFIER = "upmc_breast_clip_det_b2_period_n_ft_seed_10_fold0_best_aucroc_ver084.pth"
TOL = 1e-5  # relative to the output's max magnitude (issue 3)


def fixture(name: str) -> Path:
    return need_shared("fixtures", "reference", name)


def rel_err(ours: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(ours.numpy() - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def refs() -> dict[str, np.ndarray]:
    return dict(np.load(fixture("mammoclip_b2_small_refs.npz")))


@pytest.fixture(scope="module")
def b2_encoder() -> torch.nn.Module:
    return load_image_encoder(fixture(PRETRAIN))


@pytest.fixture(scope="module")
def b2_classifier() -> ConceptClassifier:
    return load_classifier(fixture(CLASSIFIER))


def test_pretrain_tar_parity(b2_encoder: torch.nn.Module, refs: dict[str, np.ndarray]) -> None:
    info = b2_encoder.checkpoint_info
    assert (info.arch, info.layout) == ("efficientnet-b2", "mammo-clip-pretrain")
    assert info.meta["preprocess"]["image_size_h"] == 1520
    with torch.inference_mode():
        raw = b2_encoder(torch.from_numpy(refs["x"]))
    assert raw.shape == refs["clip_raw"].shape == (1, 1408, 16, 10)
    assert rel_err(raw, refs["clip_raw"]) < TOL
    assert rel_err(raw.mean(dim=(2, 3)), refs["clip_pooled"]) < TOL


def test_dynamic_padding_fails_the_same_comparison(
    b2_encoder: torch.nn.Module, refs: dict[str, np.ndarray]
) -> None:
    dynamic = create_encoder("efficientnet-b2", padding="dynamic")
    dynamic.load_state_dict(b2_encoder.state_dict())
    with torch.inference_mode():
        raw = dynamic.eval()(torch.from_numpy(refs["x"]))
    assert raw.shape == refs["clip_raw"].shape
    assert rel_err(raw, refs["clip_raw"]) > 100 * TOL


def test_classifier_pth_parity(
    b2_classifier: ConceptClassifier, refs: dict[str, np.ndarray]
) -> None:
    clf = b2_classifier
    assert clf.n_class == 1 and clf.checkpoint_info.layout == "mammo-clip-classifier"
    meta = clf.checkpoint_info.meta  # numpy scalars from the restricted unpickler arrive as numbers
    assert (
        isinstance(meta["auroc"], float)
        and 0.0 <= meta["auroc"] <= 1.0
        and isinstance(meta["epoch"], int)
    )
    x = torch.from_numpy(refs["x"])
    with torch.inference_mode():
        raw = clf.features(
            x
        )  # one forward; clf(x) == head(mean_hw(features)) is tested on the phantom arch
        pooled, logit = raw.mean(dim=(2, 3)), clf.logits_from_map(raw)
    assert rel_err(raw, refs["clf_raw"]) < TOL
    assert rel_err(pooled, refs["clf_pooled"]) < TOL
    assert rel_err(logit, refs["clf_binary_logit"]) < TOL
    # the encoder of a classifier file is what load_image_encoder returns for it
    enc = load_image_encoder(fixture(CLASSIFIER))
    for k, v in enc.state_dict().items():
        assert torch.equal(v, clf.encoder.state_dict()[k]), k


def test_pretrain_tar_has_no_head() -> None:
    with pytest.raises(CheckpointError, match="no concept head"):
        load_classifier(fixture(PRETRAIN))


# --- malicious pickles -------------------------------------------------------------------------


def _make_file(path: str) -> None:
    Path(path).write_text("pwned")


class _OpenPayload:
    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):  # builtins.open(target, "w") creates the file when unpickled
        return (open, (self.target, "w"))


class _FunctionPayload:
    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (_make_file, (self.target,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload_cls", [_OpenPayload, _FunctionPayload])
def test_malicious_checkpoint_is_refused_without_running(
    tmp_path: Path, payload_cls: type, zip_format: bool
) -> None:
    target = tmp_path / "created_by_pickle"
    ckpt = tmp_path / "evil.pth"
    torch.save(
        {
            "model": {"image_encoder._conv_stem.weight": torch.zeros(1)},
            "extra": payload_cls(target),
        },
        ckpt,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(CheckpointError, match="refused"):
        load_image_encoder(ckpt)
    with pytest.raises(CheckpointError, match="refused"):
        load_classifier(ckpt)
    assert not target.exists()
    # the payload is live: plain pickle would have created the file
    pickle.loads(pickle.dumps(payload_cls(target)))
    assert target.exists()


# --- bad inputs, each named --------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        f"image_encoder.{k}": v
        for k, v in create_encoder("efficientnet-phantom").state_dict().items()
    }


def _save(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save({"model": sd, "epoch": 1}, path)
    return path


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path: Path, phantom_sd: dict) -> None:
    sd = dict(phantom_sd)
    del sd["image_encoder._blocks.4._bn1.running_var"]
    with pytest.raises(CheckpointError, match=r"missing keys: _blocks\.4\._bn1\.running_var"):
        load_image_encoder(_save(tmp_path, sd))
    sd = dict(phantom_sd, **{"image_encoder._blocks.2._extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: _blocks\.2\._extra\.weight"):
        load_image_encoder(_save(tmp_path, sd))
    sd = dict(phantom_sd)
    sd["image_encoder._blocks.1._se_reduce.bias"] = torch.zeros(99)
    with pytest.raises(
        CheckpointError, match=r"mis-shaped keys: _blocks\.1\._se_reduce\.bias \(99,\)"
    ):
        load_image_encoder(_save(tmp_path, sd))
    sd = dict(phantom_sd)
    sd["image_encoder._bn1.weight"] = torch.full_like(sd["image_encoder._bn1.weight"], float("nan"))
    with pytest.raises(CheckpointError, match=r"non-finite values in _bn1\.weight"):
        load_image_encoder(_save(tmp_path, sd))


def test_good_phantom_checkpoint_loads(tmp_path: Path, phantom_sd: dict) -> None:
    sd = dict(
        phantom_sd,
        **{
            "classifier.classification_head.weight": torch.ones(1, 640),
            "classifier.classification_head.bias": torch.zeros(1),
        },
    )
    clf = load_classifier(_save(tmp_path, sd))
    assert clf.arch == "efficientnet-phantom" and clf.n_class == 1
    assert torch.equal(clf.encoder._conv_stem.weight, phantom_sd["image_encoder._conv_stem.weight"])
    ddp = load_classifier(_save(tmp_path, {f"module.{k}": v for k, v in sd.items()}, "ddp.pth"))
    assert torch.equal(ddp.head.weight, clf.head.weight)
    sd["classifier.mlp.0.weight"] = torch.zeros(4, 640)
    with pytest.raises(
        CheckpointError, match=r"unexpected classifier keys classifier\.mlp\.0\.weight"
    ):
        load_classifier(_save(tmp_path, sd, "mlp.pth"))


def test_foreign_layouts_are_named(tmp_path: Path) -> None:
    timm = {
        "conv_stem.weight": torch.zeros(48, 3, 3, 3),
        "bn1.weight": torch.zeros(48),
        "blocks.0.0.conv_dw.weight": torch.zeros(48, 1, 3, 3),
    }
    with pytest.raises(CheckpointError, match="timm-style"):
        load_image_encoder(_save(tmp_path, timm))
    with pytest.raises(CheckpointError, match="sparse-autoencoder"):
        load_image_encoder(fixture("mammosae_mini_sparse_autoencoder_final.pt"))
    with pytest.raises(CheckpointError, match="unknown layout"):
        load_image_encoder(_save(tmp_path, {"fc.weight": torch.zeros(2, 2)}))


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_image_encoder(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_image_encoder(junk)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_image_encoder(tmp_path / "list.pth")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="not a mammo-sae model"):
        load_image_encoder(tmp_path / "empty_dir")


# --- own format ---------------------------------------------------------------------------------


def test_own_format_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = ConceptClassifier(create_encoder("efficientnet-phantom"), 1, concept="Mass").eval()
    out = save_model(clf, tmp_path / "m", run="unit-test")
    loaded = load_classifier(out)
    assert loaded.concept == "Mass" and loaded.checkpoint_info.layout == "mammo-sae"
    assert loaded.checkpoint_info.meta["run"] == "unit-test"
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), clf(x), rtol=0, atol=0)
    enc = load_image_encoder(out)  # a classifier directory also yields its encoder
    assert enc.arch == "efficientnet-phantom"
    tensors = list(enc.parameters()) + list(
        enc.buffers()
    )  # filled by assignment from a meta-built model
    assert all(t.device.type == "cpu" for t in tensors) and all(
        p.requires_grad for p in enc.parameters()
    )
    assert checkpoint_sha256(out) == loaded.checkpoint_info.sha256

    save_model(clf.encoder, tmp_path / "e")
    with pytest.raises(CheckpointError, match="no concept head"):
        load_classifier(tmp_path / "e")


def test_load_encoder_takes_a_checkpoint_or_an_arch(tmp_path: Path) -> None:
    """The one "checkpoint or arch -> encoder" loader of extract --model, train --init and
    pretrain --arch: provenance for checkpoints, seeded init that leaves the global RNG alone."""
    torch.manual_seed(0)
    clf = ConceptClassifier(create_encoder("efficientnet-phantom"), 1, concept="Mass").eval()
    save_model(clf, tmp_path / "clf")
    save_model(clf.encoder, tmp_path / "enc")
    for name, kind in (("clf", "classifier"), ("enc", "image_encoder")):
        enc, info = load_encoder(tmp_path / name)
        assert info["kind"] == kind and info["arch"] == "efficientnet-phantom"
        assert info["sha256"] == checkpoint_sha256(tmp_path / name)
        for k, v in clf.encoder.state_dict().items():
            torch.testing.assert_close(enc.state_dict()[k], v, rtol=0, atol=0)

    state = torch.get_rng_state()
    a, info = load_encoder("efficientnet-phantom", seed=5)
    b, _ = load_encoder("efficientnet-phantom", seed=5)
    assert torch.equal(torch.get_rng_state(), state) and info["init_seed"] == 5
    assert info["kind"] == "random_init" and info["sha256"] is None
    torch.testing.assert_close(list(a.parameters()), list(b.parameters()), rtol=0, atol=0)
    torch.manual_seed(3)
    c, _ = load_encoder("efficientnet-phantom")  # seed None: the caller's seeded global RNG
    torch.manual_seed(3)
    fresh = create_encoder("efficientnet-phantom")
    torch.testing.assert_close(list(c.parameters()), list(fresh.parameters()), rtol=0, atol=0)
    with pytest.raises(MammoSaeError, match=r"--arch: no such file, and unknown arch 'nope'"):
        load_encoder("nope", flag="--arch")


def test_own_format_rejects_bad_config(tmp_path: Path) -> None:
    import json

    torch.manual_seed(0)
    out = save_model(create_encoder("efficientnet-phantom"), tmp_path / "e")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "schema_version": 99}))
    with pytest.raises(CheckpointError, match="schema_version 99"):
        load_image_encoder(out)
    (out / "config.json").write_text(json.dumps({**cfg, "arch": "efficientnet-b2"}))
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        load_image_encoder(out)
    (out / "config.json").write_text(json.dumps({**cfg, "kind": "classifier"}))
    with pytest.raises(CheckpointError, match="kind=classifier"):
        load_image_encoder(out)
    (out / "model.safetensors").write_bytes(b"garbage")
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="checksum differs"):
        load_image_encoder(out)
    # a config without a recorded hash (written by hand): the weights file itself is refused
    unhashed = {k: v for k, v in cfg.items() if k != "weights_sha256"}
    (out / "config.json").write_text(json.dumps(unhashed))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_image_encoder(out)


def test_convert_cli_keeps_weights_bit_identical(
    tmp_path: Path, b2_classifier: ConceptClassifier
) -> None:
    assert (
        main(
            [
                "convert",
                "--model",
                str(fixture(CLASSIFIER)),
                "--out",
                str(tmp_path / "c"),
                "--concept",
                "Suspicious_Calcification",
            ]
        )
        == 0
    )
    converted = load_classifier(tmp_path / "c")
    original = b2_classifier
    assert converted.concept == "Suspicious_Calcification"
    assert converted.checkpoint_info.meta["source"]["sha256"] == checkpoint_sha256(
        fixture(CLASSIFIER)
    )
    original_sd = original.state_dict()
    for k, v in converted.state_dict().items():
        assert torch.equal(v, original_sd[k]), k

    config = convert(fixture(PRETRAIN), tmp_path / "e")
    assert config["kind"] == "encoder" and config["arch"] == "efficientnet-b2"
    assert config["preprocess"]["mean"] == pytest.approx(0.3089279)
    assert (
        main(["convert", "--model", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x")])
        == 2
    )


def test_safe_load_reads_numpy_predictions() -> None:
    obj = load_torch_weights(fixture(CLASSIFIER), "a classifier")
    assert isinstance(obj["predictions"], np.ndarray) and obj["predictions"].ndim >= 1
