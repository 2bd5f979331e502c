"""Options declared once: SAE hyper-parameters, result-affecting metadata, one image-size parser."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from mammo_sae.cli import build_parser
from mammo_sae.config import (
    add_dataclass_args,
    changed_settings,
    from_namespace,
    parse_image_size,
    result_settings,
    to_dict,
)
from mammo_sae.errors import MammoSaeError
from mammo_sae.sae.model import SAEConfig, SparseAutoencoder
from mammo_sae.sae.train import SAETrainConfig

# A valid non-default value for every SAE hyper-parameter (d comes from the store, not an option).
SAE_VALUES = {
    "architecture": "topk",
    "expansion": 4,
    "h": 64,
    "l1_coeff": 1e-4,
    "l1_convention": "sum",
    "k": 8,
    "aux_k": 16,
    "aux_coeff": 0.5,
    "normalisation": "centre",
    "init": "tied",
    "threshold_momentum": 0.05,
}
SAE_FIELDS = [f.name for f in dataclasses.fields(SAEConfig) if f.name != "d"]


def test_every_sae_field_has_a_test_value():
    assert sorted(SAE_VALUES) == sorted(SAE_FIELDS)
    defaults = SAEConfig()
    assert all(getattr(defaults, k) != v for k, v in SAE_VALUES.items())


def _reaches_the_sae(cfg: SAETrainConfig, name: str) -> None:
    sae = SparseAutoencoder(cfg.sae_config(16), seed=0)
    assert getattr(sae.cfg, name) == SAE_VALUES[name]


@pytest.mark.parametrize("name", SAE_FIELDS)
def test_sae_field_set_from_cli(name):
    value = SAE_VALUES[name]
    ns = build_parser().parse_args(
        ["sae", "train", "--store", "s", "--" + name.replace("_", "-"), str(value)]
    )
    _reaches_the_sae(from_namespace(SAETrainConfig, ns), name)


@pytest.mark.parametrize("name", SAE_FIELDS)
def test_sae_field_set_from_pipeline_yaml(name, tmp_path):
    from mammo_sae.pipeline import Pipeline, load_pipeline_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "sae": {name: SAE_VALUES[name]}}))
    pipeline = Pipeline(load_pipeline_config(path), tmp_path / "run", progress=False)
    _reaches_the_sae(pipeline.sae_train_config(), name)


# ------------------------------------------------------------------ keys unchanged
def test_sae_keys_equal_the_old_hand_lists():
    cfg = SAETrainConfig(store="s")
    old_pipeline = {
        k: v
        for k, v in to_dict(cfg).items()
        if k
        not in ("progress", "device", "resume", "overwrite", "store", "out", "threshold_momentum")
    }  # the option the pipeline's key never had
    assert result_settings(cfg) == old_pipeline
    old_resumable = {
        "resume",
        "overwrite",
        "max_steps",
        "progress",
        "log_every",
        "checkpoint_every",
        "checkpoint_seconds",
        "measure_matmul",
        "eval_patches",
        "epochs",
        "store",
        "device",
        "data_in_memory",
        "compile",
        "out",
    }
    assert set(result_settings(cfg, resuming=True)) == set(to_dict(cfg)) - old_resumable - {
        "threshold_momentum"
    }
    # A state saved before threshold_momentum was an option resumes; another value is refused.
    saved = {k: v for k, v in to_dict(cfg).items() if k != "threshold_momentum"}
    assert changed_settings(cfg, {**saved, "epochs": 3}, resuming=True) == []
    cfg.threshold_momentum = 0.5
    assert changed_settings(cfg, saved, resuming=True) == ["threshold_momentum"]
    assert "threshold_momentum" in result_settings(cfg)


def test_classifier_and_phantom_keys_equal_the_old_hand_lists(tmp_path):
    from mammo_sae.data.phantom import PhantomConfig, _content_params
    from mammo_sae.models.train import ClassifierTrainConfig, PretrainConfig

    for cfg in (
        ClassifierTrainConfig(data=tmp_path, concept="Mass", init="x", out=tmp_path),
        PretrainConfig(data=tmp_path, out=tmp_path),
    ):
        free = ("resume", "overwrite", "progress", "workers")
        assert result_settings(cfg) == {k: v for k, v in to_dict(cfg).items() if k not in free}
        assert changed_settings(cfg, {**to_dict(cfg), "workers": 3, "resume": True}) == []
        assert changed_settings(cfg, {**to_dict(cfg), "seed": -1, "gone": 1}) == ["gone", "seed"]
    cfg = PhantomConfig(out=tmp_path)
    old = {
        k: v
        for k, v in to_dict(cfg).items()
        if k not in ("out", "workers", "overwrite", "figure", "marker_size", "progress")
    }
    assert _content_params(cfg) == old
    assert _content_params(PhantomConfig(out=tmp_path, marker_size=20.0))["marker_size"] == 20.0


# ------------------------------------------------------------------ image size
@pytest.mark.parametrize(
    "value", [[128, 80], (128, 80), "128x80", "128X80", "128,80", " 128 x 80 "]
)
def test_image_size_forms(value):
    assert parse_image_size(value) == (128, 80)


@pytest.mark.parametrize("value", ["12by8", [128], [128, 80, 3], "128x", [128.5, 80], "8x8"])
def test_image_size_refused(value):
    with pytest.raises(MammoSaeError, match="image-size"):
        parse_image_size(value)


def test_image_size_one_type_everywhere(tmp_path):
    from mammo_sae.activations.extract import ExtractConfig
    from mammo_sae.models.train import ClassifierTrainConfig, EvalConfig
    from mammo_sae.pipeline import load_pipeline_config

    required = {
        ExtractConfig: ["--data", "d", "--model", "m", "--out", "o"],
        ClassifierTrainConfig: ["--data", "d", "--concept", "Mass", "--out", "o", "--init", "i"],
        EvalConfig: ["--data", "d", "--model", "m", "--concept", "Mass"],
    }
    for cls, args in required.items():
        parser = argparse.ArgumentParser()
        add_dataclass_args(parser, cls)
        for text in ("128x80", "128,80"):
            ns = parser.parse_args([*args, "--image-size", text])
            assert from_namespace(cls, ns).image_size == [128, 80]
    for text in ("128x80", "128,80"):
        ns = parser.parse_args(
            [
                "--image-size",
                text,
                "--data",
                "d",
                "--model",
                "m",
                "--concept",
                "Mass",
                "--out",
                "o",
                "--init",
                "i",
            ][: None if cls is ClassifierTrainConfig else (6 if cls is ExtractConfig else 8)]
        )
        assert parse_image_size(from_namespace(cls, ns).image_size) == (128, 80)
    for text in ("128x80", "128,80", "[128, 80]"):
        path = tmp_path / "run.yaml"
        path.write_text(
            f"data: {{image_size: {text!r}}}\n"
            if "[" not in text
            else f"data: {{image_size: {text}}}\n"
        )
        assert load_pipeline_config(path).data.image_size == [128, 80]
    path.write_text("data: {image_size: 12by8}\n")
    with pytest.raises(MammoSaeError, match="data.image_size"):
        load_pipeline_config(path)


@pytest.mark.parametrize("name", ["phantom.yaml", "phantom-512.yaml"])
def test_shipped_phantom_configs_spell_out_the_training_recipe(name: str) -> None:
    """The YAML shows what runs: every PHANTOM_* value is written in the shipped configs, so the
    load-time defaults (for configs that leave a key out) change nothing for them."""
    from mammo_sae.config import load_yaml
    from mammo_sae.models.train import PHANTOM_FINETUNE, PHANTOM_LINEAR_PROBE, PHANTOM_PRETRAIN
    from mammo_sae.pipeline import PACKAGE_CONFIGS

    models = load_yaml(PACKAGE_CONFIGS / name)["models"]
    for section, recipe in (
        ("pretrain", PHANTOM_PRETRAIN),
        ("linear_probe", PHANTOM_LINEAR_PROBE),
        ("finetune", PHANTOM_FINETUNE),
    ):
        written = models[section]
        assert {k: written.get(k) for k in recipe} == recipe, section
