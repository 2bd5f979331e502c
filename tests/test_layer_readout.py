"""Fidelity and interventions below the final layer (issue 17, item 1): the exact path.

The pooled identity holds only at the final layer, so a map at `blocks.N` is read by running
the rest of the classifier's network on it (`EfficientNet.forward_from`). What holds by
construction: the rest of the network continues the forward pass exactly, so the stored
`blocks.N` map read this way gives the classifier's own logit (the final store's pooled
features times the head); keeping every latent is the plain reconstruction, keeping none is a
constant map (AUROC 0.5).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_he_encoder, train_mass_linear_probe

from mammo_sae.activations.store import ActivationStore
from mammo_sae.analysis.intervene import exact_logits, layer_readout
from mammo_sae.cli import main
from mammo_sae.errors import MammoSaeError
from mammo_sae.models.checkpoints import load_classifier, load_encoder
from mammo_sae.sae.checkpoints import load_sae

LAYER = "blocks.3"  # stride 16: an 8x5 map at 128x80 (final: 4x3)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    folder = save_he_encoder(tmp_path_factory.mktemp("he") / "encoder")
    return load_encoder(folder)[0].eval()


@pytest.mark.parametrize("layer", ["stem", "blocks.0", LAYER, "last block", "final"])
def test_the_rest_of_the_network_continues_the_forward_pass(
    encoder: torch.nn.Module, layer: str
) -> None:
    if layer == "last block":
        layer = [n for n in encoder.layer_names if n.startswith("blocks.")][-1]
    x = torch.randn(2, 3, 128, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tapped = encoder.forward_features(x, [layer])[layer]
        torch.testing.assert_close(encoder.forward_from(tapped, layer), encoder(x))


def test_the_rest_of_the_network_refuses_a_map_of_another_layer(
    encoder: torch.nn.Module,
) -> None:
    wrong = torch.zeros(1, encoder.layer_info["blocks.0"].channels + 1, 8, 5)
    with pytest.raises(MammoSaeError, match="blocks.0 map has"):
        encoder.forward_from(wrong, "blocks.0")
    with pytest.raises(MammoSaeError, match="layer"):
        encoder.forward_from(wrong, "blocks.999")


@pytest.fixture(scope="module")
def layer_run(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A Mass linear probe, test-split stores at the final layer and at LAYER, a 2x SAE trained
    on the LAYER store, and `mammo-sae fidelity` / `intervene` outputs at LAYER."""
    root = tmp_path_factory.mktemp("layer_readout")
    clf = train_mass_linear_probe(tiny_phantom, root, "--epochs", "2", "--image-size", "128x80")
    stores = {}
    for layer in ("final", LAYER):
        stores[layer] = root / f"store-{layer}"
        args = ["extract", "--data", str(tiny_phantom), "--model", str(clf), "--layer", layer]
        args += [
            "--split",
            "test",
            "--image-size",
            "128x80",
            "--workers",
            "0",
            "--dtype",
            "float32",
        ]
        assert main([*args, "--device", "cpu", "--no-progress", "--out", str(stores[layer])]) == 0
    sae = root / "sae"
    args = ["sae", "train", "--store", str(stores[LAYER]), "--out", str(sae), "--expansion", "2"]
    args += ["--epochs", "3", "--batch-size", "64", "--resample-every", "0", "--seed", "0"]
    assert main([*args, "--eval-patches", "64", "--device", "cpu", "--no-progress"]) == 0
    common = ["--sae", str(sae), "--n-boot", "0", "--device", "cpu", "--no-progress"]
    fid = root / "fidelity"
    args = ["fidelity", "--stores", str(stores[LAYER]), "--classifiers", str(clf)]
    assert main([*args, "--names", "Mass", "--out", str(fid), *common]) == 0
    inter = root / "intervene"
    args = ["intervene", "--store", str(stores[LAYER]), "--classifier", str(clf)]
    args += ["--rank-split", "test", "--ks", "0,1,5,1000"]
    assert main([*args, "--out", str(inter), *common]) == 0
    return {"clf": clf, "stores": stores, "sae": sae, "fidelity": fid, "intervene": inter}


def test_a_stored_layer_map_read_through_the_network_gives_the_classifiers_logit(
    layer_run: dict,
) -> None:
    clf = load_classifier(layer_run["clf"]).eval()
    final, at = (ActivationStore(layer_run["stores"][k]) for k in ("final", LAYER))
    assert at.manifest["layer"] == LAYER and at.d != final.d
    rows = np.arange(at.n_images)
    readout = layer_readout(clf, LAYER)
    assert readout.path == f"network from {LAYER}"
    got = exact_logits(at, load_sae(layer_run["sae"]).eval(), readout, rows)
    head = clf.head.weight.detach().double().numpy()[0]
    expected = np.asarray(final.pooled_nd, np.float64) @ head + float(clf.head.bias.detach())
    np.testing.assert_allclose(got["original"], expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got["sae"], got["original"])  # a 3-epoch SAE is not lossless


def test_fidelity_and_interventions_at_a_layer_agree_with_its_own_identities(
    layer_run: dict,
) -> None:
    fid = json.loads((layer_run["fidelity"] / "fidelity.json").read_text())["results"]["Mass"]
    assert fid["path"] == f"network from {LAYER}"
    inter = json.loads((layer_run["intervene"] / "intervene.json").read_text())
    assert inter["path"] == f"network from {LAYER}"
    h = json.loads((layer_run["sae"] / "cfg.json").read_text())["h"]
    points = {(p["mode"], p["k"]): p["auroc"] for p in inter["results"]}
    assert max(k for _, k in points) == h  # k = 1000 clipped to the SAE's width
    # Keeping every latent, or zeroing none, is the plain reconstruction of fidelity's SAE side.
    assert points[("on", h)] == pytest.approx(fid["sae"]["auroc"], abs=1e-9)
    assert points[("off", 0)] == pytest.approx(fid["sae"]["auroc"], abs=1e-9)
    # Keeping none decodes b_dec everywhere: the same map, so the same logit, for every image.
    assert points[("on", 0)] == pytest.approx(0.5)
