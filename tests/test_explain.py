"""`mammo-sae explain`: scores equal `classifier eval`'s, contributions add up to the SAE logit,
DICOMs are explained as the PNG `ingest` makes of them, run-directory mode, the HTML page."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import train_mass_linear_probe
from test_data_images import write_dicom
from test_data_preprocess import synthetic_mammogram

from mammo_sae.analysis.explain import Explainer, explain_batch, model_input
from mammo_sae.cli import main
from mammo_sae.data.ingest import ingest
from mammo_sae.data.vindr import load_records
from mammo_sae.io import write_json
from mammo_sae.sae.checkpoints import save_sae
from mammo_sae.sae.model import SAEConfig, SparseAutoencoder

SIZE = (256, 160)  # the tiny phantom's own frame: no resize on either path
H_LATENTS = 64


@pytest.fixture(scope="module")
def trained(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Mass linear probe trained on the tiny phantom, and a small random SAE.

    The encoder is random but He-initialised: torch's default init shrinks the signal to
    ~1e-13 by the last block, which would give every image the same score."""
    root = tmp_path_factory.mktemp("explain")
    train_mass_linear_probe(tiny_phantom, root, "--epochs", "20")
    cfg = SAEConfig(architecture="relu-l1", d=640, h=H_LATENTS, init="tied")
    save_sae(SparseAutoencoder(cfg, seed=0).eval(), root / "sae")
    return {
        "root": root,
        "model": root / "clf" / "model",
        "sae": root / "sae",
        "data": tiny_phantom,
    }


def _explain(out: Path, *args: object) -> dict:
    assert (
        main(["explain", "--out", str(out), "--device", "cpu", "--no-progress", *map(str, args)])
        == 0
    )
    return json.loads((out / "explain.json").read_text())


def test_scores_equal_classifier_eval(trained: dict[str, Path], tmp_path: Path) -> None:
    test = load_records(trained["data"], splits=["test"])
    assert (
        main(
            [
                "classifier",
                "eval",
                "--data",
                str(trained["data"]),
                "--model",
                str(trained["model"]),
                "--concept",
                "Mass",
                "--split",
                "test",
                "--n-boot",
                "0",
                "--out",
                str(tmp_path / "eval.json"),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    ref = pd.read_csv(tmp_path / "eval.csv").set_index("image_id")["score"]
    res = _explain(
        tmp_path / "ex",
        "--model",
        trained["model"],
        "--sae",
        trained["sae"],
        "--image-size",
        "256x160",
        "--no-heatmaps",
        "--batch-size",
        "3",
        *[r.path for r in test],
    )
    got = {Path(e["image"]).stem: e for e in res["images"]}
    assert len(got) == len(test) == len(ref)
    assert ref.std() > 1e-3  # images differ in score, so a mix-up would show
    for image_id, score in ref.items():
        e = got[image_id]
        assert e["score"] == pytest.approx(score, abs=1e-6)
        assert e["score"] == pytest.approx(1 / (1 + np.exp(-e["logit"])), abs=1e-12)
    assert res["schema_version"] == 1 and "not a diagnosis" in res["note"]
    first = res["images"][0]
    assert len(first["top_latents"]) == 5
    assert set(first["top_latents"][0]) >= {"latent", "activation", "contribution", "off_breast"}
    mags = [abs(t["contribution"]) for t in first["top_latents"]]
    assert mags == sorted(mags, reverse=True)


def test_contributions_sum_to_the_sae_logit(trained: dict[str, Path], tmp_path: Path) -> None:
    """Σ_j v_j · mean z_j + c over all latents = the logit of the SAE-reconstructed map, decoded
    patch by patch the long way (in float64 from the same codes, so only the identity is tested,
    not float32 rounding of logits in the thousands)."""
    ex = Explainer.load(trained["model"], trained["sae"], size_hw=SIZE, device=torch.device("cpu"))
    paths = [r.path for r in load_records(trained["data"], splits=["test"])][:4]
    x = torch.stack([model_input(p, SIZE)[0] for p in paths])
    results = explain_batch(ex, x)
    sae64, head64 = copy.deepcopy(ex.sae).double(), copy.deepcopy(ex.classifier.head).double()
    with torch.no_grad():
        z_bpl = torch.stack([z.reshape(-1, z.shape[-1]) for _, _, z in results]).double()
        recon_bpd = sae64.decode(z_bpl.reshape(-1, z_bpl.shape[-1])).reshape(*z_bpl.shape[:2], -1)
        sae_logits = head64(recon_bpd.mean(dim=1))[:, 0].numpy()
    n_active = 0
    for (_, mean_h, _), exact in zip(results, sae_logits, strict=True):
        contrib = ex.v_h * mean_h
        n_active += int((mean_h > 0).sum())
        assert contrib.sum() + ex.c == pytest.approx(float(exact), abs=1e-4)
    assert n_active > 10  # the check is not about an all-zero code
    # The JSON's sae_logit is that sum, and its contributions are v_j · activation_j.
    res = _explain(
        tmp_path / "ex",
        "--model",
        trained["model"],
        "--sae",
        trained["sae"],
        "--image-size",
        "256x160",
        "--no-heatmaps",
        "--top",
        str(H_LATENTS),
        *paths,
    )
    for e, exact in zip(res["images"], sae_logits, strict=True):
        assert e["sae_logit"] == pytest.approx(float(exact), abs=1e-4)
        assert sum(t["contribution"] for t in e["top_latents"]) + res["constant"] == pytest.approx(
            float(exact), abs=1e-4
        )
        for t in e["top_latents"]:
            expected = ex.v_h[t["latent"]] * t["activation"]
            assert t["contribution"] == pytest.approx(expected, rel=1e-9)


def test_dicom_is_explained_as_its_ingested_png(trained: dict[str, Path], tmp_path: Path) -> None:
    img = synthetic_mammogram()
    dicoms = tmp_path / "dicoms"
    write_dicom(dicoms / "case" / "scan", img, bits_stored=12)  # extension-less
    write_dicom(
        dicoms / "case" / "inv.dcm",
        (4095 - img).astype(np.uint16),
        photometric="MONOCHROME1",
        transfer="jpeg2000",
        bits_stored=12,
    )
    ingest(dicoms, tmp_path / "data", out_hw=SIZE, progress=False)
    pngs = sorted((tmp_path / "data" / "images_png").rglob("*.png"))
    common = (
        "--model",
        trained["model"],
        "--sae",
        trained["sae"],
        "--image-size",
        "256x160",
        "--no-heatmaps",
    )
    from_dicom = _explain(tmp_path / "a", *common, "--dicom-frame", "256x160", dicoms)
    from_png = _explain(tmp_path / "b", *common, *pngs)
    assert [e["kind"] for e in from_dicom["images"]] == ["dicom", "dicom"]
    # Both DICOMs hold the same picture (MONOCHROME1 inverted back), so one score for all four.
    scores = [e["score"] for e in from_dicom["images"] + from_png["images"]]
    assert scores == pytest.approx([scores[0]] * 4, abs=1e-7)


def _fake_run(run: Path, trained: dict[str, Path]) -> list[int]:
    """A run directory with the trained classifier as Mass-finetuned, the SAE and a probe
    ranking whose class-1 top-10 is the 10 highest-numbered latents."""
    shutil.copytree(trained["sae"], run / "sae")
    write_json(
        run / "models" / "models.json",
        {
            "schema_version": 1,
            "models": [
                {
                    "name": "Mass-finetuned",
                    "concept": "Mass",
                    "variant": "finetuned",
                    "classifier": str(trained["model"]),
                    "encoder_key": "Mass-finetuned",
                }
            ],
        },
    )
    (run / "config.yaml").write_text("data:\n  kind: phantom\n  image_size: [256, 160]\n")
    order = list(range(H_LATENTS))[::-1]
    probe = run / "analysis" / "probe" / "Mass-finetuned"
    for cls, ranking in (("1", order), ("0", order[::-1])):
        write_json(
            probe / f"ranking_class={cls}_centered.json",
            [{"rank": r, "index": j, "importance": float(-r)} for r, j in enumerate(ranking)],
        )
    return order[:10]


def test_run_directory_mode_names_and_html(trained: dict[str, Path], tmp_path: Path) -> None:
    top1 = _fake_run(tmp_path / "run", trained)
    top0 = list(range(10))
    names = "".join(f"{j},name-{j}\n" for j in range(H_LATENTS))
    (tmp_path / "names.csv").write_text("latent,name\n" + names)
    images = sorted((trained["data"] / "images_png").rglob("*.png"))[:2]
    out = tmp_path / "ex"
    res = _explain(
        out,
        "--run",
        tmp_path / "run",
        "--model-name",
        "Mass-finetuned",
        "--latent-names",
        tmp_path / "names.csv",
        "--top",
        "3",
        *images,
    )
    assert res["model_name"] == "Mass-finetuned" and res["image_size"] == [256, 160]
    assert res["class_top10"]["1"] == top1
    for e in res["images"]:
        for t in e["top_latents"] + e["top_by_activation"]:
            assert t["name"] == f"name-{t['latent']}"
            assert t["class_top10"] == [
                c for c, lats in (("0", top0), ("1", top1)) if t["latent"] in lats
            ]
            assert (out / t["heatmap"]).stat().st_size > 0
            assert t["off_breast"] is None or 0.0 <= t["off_breast"] <= 1.0
    html = (out / "index.html").read_text()
    assert "not a diagnosis" in html and "http" not in html.replace("http-equiv", "")
    heat_srcs = re.findall(r'<img src="(images/[^"]+/latent_\d+\.png)"', html)
    assert heat_srcs and all((out / s).is_file() for s in heat_srcs)

    # Bad input: exit 2 with a message.
    assert (
        main(
            [
                "explain",
                "--out",
                str(tmp_path / "x"),
                "--run",
                str(tmp_path / "run"),
                "--model-name",
                "Calc-finetuned",
                str(images[0]),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "explain",
                "--out",
                str(tmp_path / "x"),
                "--run",
                str(tmp_path / "run"),
                str(images[0]),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "explain",
                "--out",
                str(tmp_path / "x"),
                "--model",
                str(trained["model"]),
                "--sae",
                str(trained["sae"]),
                str(tmp_path / "absent.png"),
            ]
        )
        == 2
    )


def test_unreadable_images_skip_or_fail(trained: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "imgs" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = sorted((trained["data"] / "images_png").rglob("*.png"))[0]
    shutil.copy(good, tmp_path / "imgs" / "good.png")
    common = [
        "--model",
        trained["model"],
        "--sae",
        trained["sae"],
        "--image-size",
        "256x160",
        "--no-heatmaps",
    ]
    assert (
        main(["explain", "--out", str(tmp_path / "x"), *map(str, common), str(tmp_path / "imgs")])
        == 2
    )
    res = _explain(tmp_path / "y", *common, "--on-error", "skip", tmp_path / "imgs")
    assert [Path(e["image"]).name for e in res["images"]] == ["good.png"]
    assert [Path(e["image"]).name for e in res["errors"]] == ["bad.png"]


def test_index_html_renders_in_headless_chromium(trained: dict[str, Path], tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (`command -v chromium` finds nothing)")
    images = sorted((trained["data"] / "images_png").rglob("*.png"))[:1]
    out = tmp_path / "ex"
    _explain(
        out,
        "--model",
        trained["model"],
        "--sae",
        trained["sae"],
        "--image-size",
        "256x160",
        "--top",
        "2",
        *images,
    )
    page = (out / "index.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,2000",
    ]
    subprocess.run(
        [*flags, f"--screenshot={shot}", page], check=True, timeout=120, capture_output=True
    )
    assert shot.stat().st_size > 1000
    dom = subprocess.run(
        [*flags, "--dump-dom", page], check=True, timeout=120, capture_output=True, text=True
    ).stdout
    srcs = re.findall(r'<img src="(images/[^"]+/latent_\d+\.png)"', dom)
    assert len(srcs) >= 2 and all((out / s).is_file() for s in srcs)
