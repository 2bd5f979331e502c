"""The analysis commands end to end on a small synthetic store with a real SAE and classifier
checkpoint: outputs exist, agree with each other, and bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from mammo_sae.activations.store import write_store
from mammo_sae.cli import main
from mammo_sae.data.records import Box, ImageRecord
from mammo_sae.sae.checkpoints import save_sae
from mammo_sae.sae.model import SAEConfig, SparseAutoencoder

D, H, N = 640, 96, 30
GRID, FRAME = (3, 4), (96, 128)


def _store(path: Path, strength: float, seed: int) -> Path:
    """Class-1 images carry direction u in cells 5, 6 (scaled by `strength`); images with
    i % 3 == 1 carry a marker direction in cell (0, 0) inside a confounder box."""
    rng = np.random.default_rng(seed)
    u = np.random.default_rng(99).normal(size=D)
    marker = np.random.default_rng(98).normal(size=D)
    acts, records = [], []
    for i in range(N):
        y = int(i % 3 == 0)
        a = np.abs(rng.normal(size=(12, D))).astype(np.float32) * 0.5
        if y:
            a[[5, 6]] += (strength * u).astype(np.float32)
        boxes = ()
        if i % 3 == 1:
            a[0] += (3.0 * marker).astype(np.float32)
            boxes = (Box("confounder", 0.0, 0.0, 30.0, 30.0),)
        records.append(
            ImageRecord(
                f"img{i:03d}",
                f"p{i:03d}",
                "training" if i < N // 2 else "test",
                None,
                {"Mass": y},
                boxes=boxes,
                frame_hw=FRAME,
            )
        )
        acts.append(a)
    write_store(path, acts, grids=[GRID] * N, records=records)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mammo_sae.models.checkpoints import save_model
    from mammo_sae.models.classifier import ConceptClassifier
    from mammo_sae.models.registry import create_encoder

    root = tmp_path_factory.mktemp("analysis_cli")
    sae = SparseAutoencoder(SAEConfig(architecture="relu-l1", d=D, h=H, init="tied"), seed=0).eval()
    save_sae(sae, root / "sae")
    clf = ConceptClassifier(create_encoder("efficientnet-phantom"), 1, "Mass")
    with torch.no_grad():
        u = np.random.default_rng(99).normal(size=D)
        clf.head.weight.copy_(torch.from_numpy(u / np.linalg.norm(u)).float()[None])
        clf.head.bias.fill_(-1.0)
    save_model(clf, root / "clf")
    return {
        "root": root,
        "sae": root / "sae",
        "clf": root / "clf",
        "ft": _store(root / "store_ft", 2.0, 0),
        "lp": _store(root / "store_lp", 0.3, 1),
    }


def _run(*args: Any) -> int:
    return main([str(a) for a in args])


def test_commands_end_to_end(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root, sae, clf, ft = setup["root"], setup["sae"], setup["clf"], setup["ft"]
    assert _run("summarize", "--store", ft, "--sae", sae, "--out", root / "summ.json") == 0
    summ = json.loads((root / "summ.json").read_text())
    assert summ["n_images"] == N and summ["h"] == H and 0 <= summ["dead_fraction"] <= 1
    assert len(list((sae / "summaries").glob("*.npz"))) == 1  # cached next to the SAE

    probe_dir = root / "probe"
    assert _run("probe", "--store", ft, "--sae", sae, "--concept", "Mass", "--out", probe_dir) == 0
    for c in (0, 1):
        for score in ("mean", "centered", "auroc"):
            entries = json.loads((probe_dir / f"ranking_class={c}_{score}.json").read_text())
            assert len(entries) == H and entries[0]["rank"] == 0
            imps = [e["importance"] for e in entries]
            assert imps == sorted(imps, reverse=True)
    table = pd.read_csv(probe_dir / "probe.csv")
    assert len(table) == H and {"mean_class1", "centered_class1", "auroc_class1"} <= set(
        table.columns
    )

    out = root / "intervene"
    assert (
        _run(
            "intervene",
            "--store",
            ft,
            "--sae",
            sae,
            "--classifier",
            clf,
            "--rankings",
            probe_dir,
            "--out",
            out,
            "--n-boot",
            50,
        )
        == 0
    )
    res = json.loads((out / "intervene.json").read_text())["results"]
    assert (out / "intervene.png").stat().st_size > 0 and (out / "intervene.csv").is_file()
    on = {r["k"]: r for r in res if r["mode"] == "on"}
    off = {r["k"]: r for r in res if r["mode"] == "off"}
    assert sorted(on) == [0, 1, 5, 10, 50, H] and on[0]["auroc"] == 0.5 and off[H]["auroc"] == 0.5
    assert on[H]["auroc"] == pytest.approx(off[0]["auroc"]) and on[H]["union_size"] == H

    exact = root / "intervene_exact"
    assert (
        _run(
            "intervene",
            "--store",
            ft,
            "--sae",
            sae,
            "--classifier",
            clf,
            "--rankings",
            probe_dir,
            "--out",
            exact,
            "--n-boot",
            0,
            "--ks",
            "0,1,5,96",
            "--exact-decode",
        )
        == 0
    )
    res_exact = json.loads((exact / "intervene.json").read_text())["results"]
    for r in res_exact:
        ref = (on if r["mode"] == "on" else off)[r["k"]]
        assert r["auroc"] == pytest.approx(ref["auroc"], abs=1e-9)

    # No --rankings: ranked on the training split of the same store, same answer.
    auto = root / "intervene_auto"
    assert (
        _run(
            "intervene",
            "--store",
            ft,
            "--sae",
            sae,
            "--classifier",
            clf,
            "--out",
            auto,
            "--n-boot",
            0,
            "--ks",
            "0,1,5,96",
        )
        == 0
    )
    res_auto = json.loads((auto / "intervene.json").read_text())["results"]
    assert [r["auroc"] for r in res_auto] == pytest.approx(
        [r["auroc"] for r in res_exact], abs=1e-9
    )

    top = json.loads((probe_dir / "ranking_class=1_centered.json").read_text())[0]["index"]
    edit = root / "edit"
    assert (
        _run(
            "intervene",
            "--store",
            ft,
            "--sae",
            sae,
            "--classifier",
            clf,
            "--out",
            edit,
            "--latents",
            f"{top}",
            "--mode",
            "off",
            "--n-boot",
            20,
        )
        == 0
    )
    e = json.loads((edit / "edit.json").read_text())
    assert e["latents"] == [top] and "auroc_change" in e

    fid = root / "fidelity"
    assert (
        _run(
            "fidelity",
            "--stores",
            f"{ft},{setup['lp']}",
            "--classifiers",
            f"{clf},{clf}",
            "--names",
            "ft,lp",
            "--sae",
            sae,
            "--out",
            fid,
            "--n-boot",
            30,
        )
        == 0
    )
    t1 = pd.read_csv(fid / "table1.csv")
    assert list(t1["model"]) == ["ft", "lp"]
    assert t1.loc[0, "auroc_original"] > 0.9  # planted direction = head weight
    assert np.isfinite(t1["recovered"]).all() and (t1["fvu"] >= 0).all()

    sep = root / "separation"
    assert (
        _run(
            "separation",
            "--stores",
            f"{ft},{setup['lp']}",
            "--names",
            "ft,lp",
            "--sae",
            sae,
            "--concept",
            "Mass",
            "--out",
            sep,
        )
        == 0
    )
    js = json.loads((sep / "separation.json").read_text())["models"]
    assert js["ft"]["separation"] > js["lp"]["separation"]  # stronger planted signal separates more
    assert (sep / "separation.png").stat().st_size > 0 and (sep / "separation.csv").is_file()
    capsys.readouterr()


def test_bad_input_exits_2(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        _run(
            "probe",
            "--store",
            setup["ft"],
            "--sae",
            setup["sae"],
            "--concept",
            "Calcification",
            "--out",
            tmp_path,
        )
        == 2
    )
    assert "Calcification" in capsys.readouterr().err
    assert (
        _run(
            "probe",
            "--store",
            tmp_path / "nope",
            "--sae",
            setup["sae"],
            "--concept",
            "Mass",
            "--out",
            tmp_path,
        )
        == 2
    )
    assert (
        _run(
            "fidelity",
            "--stores",
            setup["ft"],
            "--classifiers",
            f"{setup['clf']},{setup['clf']}",
            "--sae",
            setup["sae"],
            "--out",
            tmp_path,
        )
        == 2
    )
    assert "pair" in capsys.readouterr().err
    (tmp_path / "r.json").write_text("{not json")
    assert (
        _run(
            "intervene",
            "--store",
            setup["ft"],
            "--sae",
            setup["sae"],
            "--classifier",
            setup["clf"],
            "--out",
            tmp_path,
            "--rank-class0",
            tmp_path / "r.json",
            "--rank-class1",
            tmp_path / "r.json",
        )
        == 2
    )
    assert "corrupt JSON" in capsys.readouterr().err
