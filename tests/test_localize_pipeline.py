"""Patch-latent maps and the whole localisation pipeline on a tiny synthetic store and SAE,
including the `mammo-sae localize` command and its Figure-3 grid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mammo_sae.activations.store import write_store
from mammo_sae.analysis import summaries
from mammo_sae.analysis.localize import localize
from mammo_sae.analysis.maps import latent_maps
from mammo_sae.analysis.probe import read_ranking
from mammo_sae.cli import main
from mammo_sae.data.records import Box, ImageRecord
from mammo_sae.errors import MammoSaeError

GRID = (8, 5)
FRAME = (256, 160)  # 32 px per cell
CELL = 32
D = 4  # latent j reads channel j (identity SAE)
ON_GT, ON_MARKER, NEVER, HALF = 0, 1, 2, 3


class TinySae(torch.nn.Module):
    """ReLU(W x + b) with W = I: latent j is channel j, so maps can be planted in the store."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.eye(d))
        self.b_enc = torch.nn.Parameter(torch.zeros(d))
        self.h = d

    def encode(self, x_nd: torch.Tensor) -> torch.Tensor:
        return torch.relu(x_nd @ self.W_enc.T + self.b_enc)


def _cell_box(r: int, c: int, size: int = 2) -> tuple[float, float, float, float]:
    return (c * CELL, r * CELL, (c + size) * CELL, (r + size) * CELL)


def _make_store(tmp_path: Path, png: Path | None = None):
    """6 test images (4 with a Mass box, 2 without) + 1 training image, each with a confounder
    marker box in the bottom-right corner. Channel 0 fires on the Mass cells, 1 on the marker,
    2 never, 3 on the Mass cells of two positives and off-target on the other two."""
    rng = np.random.default_rng(0)
    acts, records = [], []
    mass_cells = [(1, 1), (4, 2), (2, 3), (5, 0), None, None, (3, 1)]
    for i, cell in enumerate(mass_cells):
        a = np.zeros((*GRID, D), np.float32) - 0.5 + 0.1 * rng.random((*GRID, D), dtype=np.float32)
        a[6:8, 3:5, ON_MARKER] = 2.0
        boxes = [Box("confounder", *_cell_box(6, 3))]
        if cell is not None:
            r, c = cell
            a[r : r + 2, c : c + 2, ON_GT] = 1.0 + i
            if i % 2 == 0:
                a[r : r + 2, c : c + 2, HALF] = 1.0
            else:
                a[0, 4, HALF] = 3.0
            boxes.append(Box("Mass", *_cell_box(r, c)))
        records.append(
            ImageRecord(
                image_id=f"im{i}",
                patient_id=f"p{i}",
                split="training" if i == 6 else "test",
                path=png if i == 0 else None,
                labels={"Mass": int(cell is not None), "confounder": 1},
                boxes=tuple(boxes),
                frame_hw=FRAME,
            )
        )
        acts.append(a.reshape(-1, D))
    return write_store(tmp_path / "store", acts, grids=[GRID] * len(acts), records=records)


@pytest.fixture
def store(tmp_path: Path):
    return _make_store(tmp_path)


def test_latent_maps_equal_direct_encoding_with_any_batching(store) -> None:
    sae = TinySae()
    lat = [3, 0, 1]
    expected = []
    for i in (5, 0, 2):
        acts, rows, cols = store.image_patches(i)
        z = sae.encode(torch.from_numpy(np.array(acts, np.float32))).detach().numpy()
        m = np.zeros((len(lat), *GRID), np.float32)
        m[:, rows, cols] = z[:, lat].T
        expected.append(m)
    for batch_rows in (1, 45, 10_000):  # one image per call, partial batches, all at once
        got = latent_maps(store, sae, lat, [5, 0, 2], batch_rows=batch_rows)
        assert [g.shape for g in got] == [(3, *GRID)] * 3
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)


def test_latent_maps_handle_different_grids_and_reject_bad_input(tmp_path: Path) -> None:
    acts = [np.ones((6, 2), np.float32), np.arange(8, dtype=np.float32).reshape(4, 2)]
    st = write_store(tmp_path / "s", acts, grids=[(2, 3), (4, 1)])
    maps = latent_maps(st, TinySae(2), [1], [0, 1])
    assert [m.shape for m in maps] == [(1, 2, 3), (1, 4, 1)]
    np.testing.assert_array_equal(maps[1][0, :, 0], [1, 3, 5, 7])
    with pytest.raises(MammoSaeError, match="out of range"):
        latent_maps(st, TinySae(2), [2], [0])
    with pytest.raises(MammoSaeError, match="out of range"):
        latent_maps(st, TinySae(2), [0], [2])
    partial = write_store(
        tmp_path / "p",
        [np.ones((2, 2), np.float32)],
        grids=[(2, 3)],
        positions=[(np.array([0, 1]), np.array([0, 2]))],
    )
    with pytest.raises(MammoSaeError, match="subsample 1.0"):
        latent_maps(partial, TinySae(2), [0], [0])


def test_localize_scores_planted_latents(store) -> None:
    res = localize(
        store, TinySae(), "Mass", [ON_GT, ON_MARKER, NEVER, HALF], threshold="p95", progress=False
    )
    t = res.table.set_index("latent")
    assert (
        res.settings["n_images"] == 4 and res.settings["n_gt"] == 4
    )  # positives of the test split
    assert t.loc[ON_GT, "ap"] == pytest.approx(1.0)
    assert t.loc[ON_MARKER, "ap"] == 0.0 and t.loc[ON_MARKER, "n_pred"] == 4
    assert t.loc[NEVER, "ap"] == 0.0 and t.loc[NEVER, "n_pred"] == 0
    assert t.loc[NEVER, "mean_activation"] == 0.0
    # HALF: hits on images 0 and 2 (score 1) rank below misses of score 3 on images 1 and 3.
    # Ranked FP, FP, TP, TP → precision 1/3, 1/2 at recall 1/4, 1/2 → AP = .25·.5 + .25·.5.
    assert t.loc[HALF, "ap"] == pytest.approx(0.25)
    assert t.loc[HALF, "n_tp"] == 2
    assert list(res.table["rank"]) == [1, 2, 3, 4]
    # Predicted boxes sit on the GT box (p95 keeps the block's core).
    box = res.detections[0][0].boxes
    assert len(box) == 1 and 32 <= box[0, 0] < box[0, 2] <= 96


def test_localize_all_images_threshold_rules_and_confounder(store) -> None:
    every = localize(store, TinySae(), "Mass", [ON_GT, HALF], image_set="all", progress=False)
    assert every.settings["n_images"] == 6 and every.settings["n_gt"] == 4
    assert every.table.loc[0, "ap"] == pytest.approx(1.0)  # no activation on negatives
    released = localize(store, TinySae(), "Mass", [ON_GT], threshold="relmax:0.3", progress=False)
    assert released.settings["threshold"] == "relmax:0.3"
    assert released.table.loc[0, "ap"] == pytest.approx(1.0)
    conf = localize(store, TinySae(), "confounder", [ON_MARKER, ON_GT], progress=False)
    assert conf.settings["n_images"] == 6
    assert conf.table["ap"].tolist() == pytest.approx([1.0, 0.0])
    # A strict IoU makes the p95 core (about half the GT box) a miss.
    strict = localize(
        store, TinySae(), "Mass", [ON_GT], threshold="p95", iou_threshold=0.9, progress=False
    )
    assert strict.table.loc[0, "ap"] == 0.0


def test_localize_rejects_bad_requests(store) -> None:
    with pytest.raises(MammoSaeError, match="unknown concept 'Calc'"):
        localize(store, TinySae(), "Calc", [0], progress=False)
    with pytest.raises(MammoSaeError, match="split 'validation' is not in the store"):
        localize(store, TinySae(), "Mass", [0], split="validation", progress=False)
    with pytest.raises(MammoSaeError, match="no latents"):
        localize(store, TinySae(), "Mass", [], progress=False)
    with pytest.raises(MammoSaeError, match="threshold"):
        localize(store, TinySae(), "Mass", [0], threshold="q95", progress=False)


def test_read_ranking(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps(
            [
                {"rank": 2, "index": 7, "importance": 0.5},
                {"rank": 1, "index": 3, "importance": 0.9},
                {"rank": 3, "index": 1, "importance": 0.1},
            ]
        )
    )
    assert read_ranking(path, 2) == ([3, 7], [0.9, 0.5])
    path.write_text(json.dumps({"ranking": [{"rank": 1, "index": 4, "importance": 1.0}]}))
    assert read_ranking(path, 10)[0] == [4]
    path.write_text(json.dumps([{"rank": 1}]))
    with pytest.raises(MammoSaeError, match="index"):
        read_ranking(path, 1)
    path.write_text("{not json")
    with pytest.raises(MammoSaeError, match="corrupt"):
        read_ranking(path, 1)


def _save_identity_sae(path: Path) -> Path:
    """A real checkpoint (native format) of a relu-l1 SAE with W_enc = I: the same as TinySae."""
    from mammo_sae.sae.checkpoints import save_sae
    from mammo_sae.sae.model import SAEConfig, SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(architecture="relu-l1", d=D, h=D), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(D))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return save_sae(sae, path)


def test_localize_command_writes_table_detections_and_figure(tmp_path: Path) -> None:
    from PIL import Image

    pytest.importorskip("mammo_sae.sae.checkpoints")
    png = tmp_path / "im0.png"
    Image.fromarray((np.random.default_rng(1).random(FRAME) * 255).astype(np.uint8)).save(png)
    _make_store(tmp_path, png=png)
    sae_dir = _save_identity_sae(tmp_path / "sae")
    ranking = tmp_path / "ranking.json"
    ranking.write_text(
        json.dumps(
            [
                {"rank": k + 1, "index": j, "importance": 1.0 - k / 10}
                for k, j in enumerate([ON_GT, HALF, NEVER, ON_MARKER])
            ]
        )
    )
    out = tmp_path / "out"
    rc = main(
        [
            "localize",
            "--store",
            str(tmp_path / "store"),
            "--sae",
            str(sae_dir),
            "--device",
            "cpu",
            "--concept",
            "Mass",
            "--ranking",
            str(ranking),
            "--top",
            "3",
            "--out",
            str(out),
            "--figure-images",
            "2",
            "--label",
            "Mass synthetic",
        ]
    )
    assert rc == 0
    wide = pd.read_csv(out / "table2.csv")
    assert wide.columns.tolist() == [
        "setting",
        "rank_1",
        "rank_2",
        "rank_3",
        "latents",
        "chance",
        "oracle",
    ]
    assert 0.0 <= wide.loc[0, "chance"] < 0.5 and wide.loc[0, "oracle"] == pytest.approx(1.0)
    assert wide.loc[0, "setting"] == "Mass synthetic" and wide.loc[0, "latents"] == "0,3,2"
    assert wide.loc[0, ["rank_1", "rank_2", "rank_3"]].tolist() == pytest.approx([1.0, 0.25, 0.0])
    table = pd.read_csv(out / "localization.csv")
    assert table["latent"].tolist() == [ON_GT, HALF, NEVER]
    assert table["importance"].tolist() == pytest.approx([1.0, 0.9, 0.8])
    assert table["ap"].tolist() == pytest.approx([1.0, 0.25, 0.0])
    summary = json.loads((out / "localization.json").read_text())
    assert summary["schema_version"] == 1 and summary["settings"]["threshold"] == "relmax:0.3"
    assert summary["config"]["top"] == 3
    dets = json.loads((out / "detections.json").read_text())["images"]
    assert set(dets) == {"im0", "im1", "im2", "im3"}
    assert dets["im0"]["gt_boxes"] == [[32.0, 32.0, 96.0, 96.0]]
    assert len(dets["im0"]["latents"][str(ON_GT)]["pred_boxes"]) == 1
    with Image.open(out / "figure3.png") as im:
        w, h = im.size
    assert h > w > 100  # 3 latent rows × 2 image columns of tall panels


def test_localize_reads_a_probe_folder_by_its_own_score(tmp_path: Path, capsys) -> None:
    """--ranking FOLDER picks ranking_class=1_<--score>.json (the pipeline passes the probe
    folder, so the localize section has its own `score`); a missing score is named with what
    the folder holds."""
    pytest.importorskip("mammo_sae.sae.checkpoints")
    _make_store(tmp_path)
    sae_dir = _save_identity_sae(tmp_path / "sae")
    probe = tmp_path / "probe"
    probe.mkdir()
    for score, order in (("centered", [NEVER, HALF]), ("mean", [ON_GT, HALF])):
        entries = [{"rank": k + 1, "index": j, "importance": 1.0} for k, j in enumerate(order)]
        (probe / f"ranking_class=1_{score}.json").write_text(json.dumps(entries))

    def run(*extra: str) -> int:
        args = ["localize", "--store", str(tmp_path / "store"), "--sae", str(sae_dir)]
        args += ["--device", "cpu", "--concept", "Mass", "--ranking", str(probe), "--top", "2"]
        return main([*args, "--out", str(tmp_path / "out"), "--figure-images", "0", *extra])

    assert run("--score", "mean") == 0
    assert pd.read_csv(tmp_path / "out" / "localization.csv")["latent"].tolist() == [ON_GT, HALF]
    assert run() == 0  # default: centered
    assert pd.read_csv(tmp_path / "out" / "localization.csv")["latent"].tolist() == [NEVER, HALF]
    capsys.readouterr()
    assert run("--score", "auroc") == 2
    err = capsys.readouterr().err
    assert "ranking_class=1_auroc.json" in err and "ranking_class=1_mean.json" in err
    with pytest.raises(SystemExit) as exit_info:  # a score is a name, never part of a path
        run("--score", "../../elsewhere")
    assert exit_info.value.code == 2


def test_localize_command_errors_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    _make_store(tmp_path)
    monkeypatch.setattr(summaries, "open_sae", lambda path, device="cpu": TinySae())
    base = [
        "localize",
        "--store",
        str(tmp_path / "store"),
        "--sae",
        "x",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(base + ["--concept", "Mass"]) == 2
    assert "exactly one of --ranking" in capsys.readouterr().err
    assert main(base + ["--concept", "Nope", "--latents", "0"]) == 2
    assert "unknown concept 'Nope'" in capsys.readouterr().err
    assert main(base + ["--concept", "Mass", "--latents", "0", "--threshold", "top5"]) == 2
    assert "invalid threshold" in capsys.readouterr().err


def test_display_image_is_the_min_max_scaled_model_input(tmp_path: Path) -> None:
    from PIL import Image

    from mammo_sae.analysis.figures import display_image

    png = tmp_path / "a.png"
    arr = (np.arange(40 * 20) % 200 + 20).reshape(40, 20).astype(np.uint8)
    Image.fromarray(arr).save(png)
    shown = display_image(png, (40, 20))
    np.testing.assert_allclose(shown, (arr - 20.0) / 199.0, atol=1e-6)
    assert display_image(png, (80, 40)).shape == (80, 40)
    assert display_image(tmp_path / "missing.png", (40, 20)) is None
    assert display_image(None, (40, 20)) is None


def test_display_image_is_read_once_per_file_version(tmp_path: Path) -> None:
    """Report pages show an image many times: it is decoded once, handed out read-only, and
    read again when the file changes."""
    from PIL import Image

    from mammo_sae.analysis.figures import display_image

    png = tmp_path / "a.png"
    Image.fromarray(np.full((40, 20), 7, np.uint8)).save(png)
    first = display_image(png, (40, 20))
    assert display_image(png, (40, 20)) is first and not first.flags.writeable
    assert display_image(png, (20, 10)) is not first  # another size is another picture
    arr = (np.arange(40 * 20) % 200).reshape(40, 20).astype(np.uint8)
    Image.fromarray(arr).save(png)
    os.utime(png, ns=(1, 1))  # a new version even within the file system's time resolution
    np.testing.assert_allclose(display_image(png, (40, 20)), arr / 199.0, atol=1e-6)


@pytest.mark.gpu
def test_latent_maps_on_cuda_equal_cpu(store) -> None:
    cpu = latent_maps(store, TinySae(), [0, 1, 3], range(store.n_images))
    gpu = latent_maps(store, TinySae().cuda(), [0, 1, 3], range(store.n_images))
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pointing_scores_follow_the_planted_maps(store) -> None:
    """Latent 0 peaks on every Mass box, 1 on the marker, 2 never fires, 3 peaks on the box in
    half of the positives: pointing scores 1, 0, 0, 0.5 (test split: 4 positives)."""
    from mammo_sae.analysis.localize import pointing_scores

    lat, score, n = pointing_scores(store, TinySae(), "Mass", split="test", progress=False)
    assert n == 4 and list(lat) == [0, 1, 2, 3]
    np.testing.assert_allclose(score, [1.0, 0.0, 0.0, 0.5])
    lat, score, _ = pointing_scores(
        store, TinySae(), "confounder", split="test", latents=[1, 0], progress=False
    )
    assert list(lat) == [1, 0] and score[0] == 1.0


def test_cli_pointing_selection_is_made_on_another_split(store, tmp_path: Path) -> None:
    """`--select pointing` ranks latents on --select-split (training: one image, whose Mass box
    latent 0 hits) and scores them on --split; the selection is recorded."""
    import json
    from unittest import mock

    with mock.patch("mammo_sae.analysis.summaries.open_sae", return_value=TinySae()):
        rc = main(
            [
                "localize",
                "--store",
                str(store.path),
                "--sae",
                "unused",
                "--concept",
                "Mass",
                "--select",
                "pointing",
                "--top",
                "2",
                "--out",
                str(tmp_path / "out"),
                "--figure-images",
                "0",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
    assert rc == 0
    result = json.loads((tmp_path / "out" / "localization.json").read_text())
    assert result["selection"]["split"] == "training" and result["selection"]["images"] == 1
    assert list(result["selection"]["scores"])[0] == "0"
    with mock.patch("mammo_sae.analysis.summaries.open_sae", return_value=TinySae()):
        assert (
            main(
                [
                    "localize",
                    "--store",
                    str(store.path),
                    "--sae",
                    "unused",
                    "--concept",
                    "Mass",
                    "--select",
                    "pointing",
                    "--candidates",
                    "5",
                    "--out",
                    str(tmp_path / "bad"),
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
            == 2
        )  # --candidates needs --ranking


def test_baselines_by_construction(store) -> None:
    """Oracle boxes of the truth's size centred on it: AP 1; four times the size: AP 0 (IoU
    1/16); the classifier map of a head reading the Mass channel is that channel's latent; chance
    boxes have the findings' sizes, lie in the frame and score far below the oracle."""
    from mammo_sae.analysis.intervene import LinearHead
    from mammo_sae.analysis.localize import Detections, chance_boxes, oracle_ap, oracle_boxes

    gt = [np.array([[32.0, 32.0, 96.0, 96.0]]), np.array([[0.0, 64.0, 32.0, 160.0]])]
    fitted = [[Detections(g.copy(), np.ones(1), 1.0)] for g in gt]
    assert oracle_ap(fitted, gt, 0.25, "voc")["ap"] == pytest.approx(1.0)
    np.testing.assert_allclose(oracle_boxes(gt[0], (64.0, 64.0)), gt[0])
    big = [[Detections(np.array([[0.0, 0.0, 256.0, 256.0]]), np.ones(1), 1.0)] for _ in gt]
    res = oracle_ap(big, gt, 0.25, "voc")
    assert res["ap"] == 0.0 and res["box_hw"] == [256.0, 256.0]
    assert np.isnan(
        oracle_ap([[Detections(np.zeros((0, 4)), np.zeros(0), 0.0)]], gt[:1], 0.25, "voc")["ap"]
    )

    region = np.zeros(FRAME, dtype=bool)
    region[100:120, 10:20] = True
    boxes = chance_boxes(np.repeat(gt[1], 50, axis=0), region, np.random.default_rng(0))
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], 32.0)
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], 96.0)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= FRAME[1]).all()
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    assert ((centre_y >= 100) & (centre_y <= 121)).all()

    head = LinearHead(w_d=np.eye(D)[ON_GT], b=0.0)
    res = localize(
        store, TinySae(), "Mass", [ON_GT, NEVER], head=head, chance_draws=10, progress=False
    )
    assert res.baselines["classifier_map"]["ap"] == pytest.approx(res.table["ap"][0])
    assert res.baselines["oracle"]["ap"] == pytest.approx(1.0)
    assert res.baselines["chance"]["draws"] == 10
    assert res.baselines["chance"]["ap"] < 0.5 and res.baselines["chance"]["region"].startswith(
        "breast (whole frame for 4"
    )
    assert res.settings["align"] == "receptive-field"
    dets = res.detections_json()["images"]
    assert len(dets["im0"]["classifier_map"]["pred_boxes"]) == 1


def test_table_reports_pointing_and_ap_at_three_ious(store) -> None:
    res = localize(
        store,
        TinySae(),
        "Mass",
        [ON_GT, ON_MARKER, NEVER, HALF],
        threshold="p50",
        threshold_on="grid",
        upsample="nearest",
        progress=False,
    )
    t = res.table.set_index("latent")
    assert t["pointing"].tolist() == [1.0, 0.0, 0.0, 0.5]  # HALF: on the GT in 2 of 4
    # On the grid the planted 2x2 block becomes exactly its GT box: AP 1 at every IoU.
    assert t.loc[ON_GT, ["ap_iou_0.1", "ap_iou_0.25", "ap_iou_0.5"]].tolist() == [1.0] * 3
    assert t.loc[ON_GT, "ap"] == t.loc[ON_GT, "ap_iou_0.25"]
    assert res.settings["threshold_on"] == "grid" and res.settings["upsample"] == "nearest"
    assert res.settings["min_mass"] == 0.0


def test_localize_command_records_the_box_rule(tmp_path: Path) -> None:
    pytest.importorskip("mammo_sae.sae.checkpoints")
    _make_store(tmp_path)
    sae_dir = _save_identity_sae(tmp_path / "sae")
    out = tmp_path / "out"
    rc = main(
        [
            "localize",
            "--store",
            str(tmp_path / "store"),
            "--sae",
            str(sae_dir),
            "--device",
            "cpu",
            "--concept",
            "Mass",
            "--latents",
            "0,3",
            "--out",
            str(out),
            "--figure-images",
            "0",
            "--threshold",
            "relmax:0.5",
            "--threshold-on",
            "grid",
            "--upsample",
            "nearest",
            "--min-mass",
            "0.2",
            "--no-progress",
        ]
    )
    assert rc == 0
    s = json.loads((out / "localization.json").read_text())["settings"]
    assert {k: s[k] for k in ("threshold", "threshold_on", "upsample", "min_mass")} == {
        "threshold": "relmax:0.5",
        "threshold_on": "grid",
        "upsample": "nearest",
        "min_mass": 0.2,
    }
    table = pd.read_csv(out / "localization.csv")
    assert {"pointing", "ap_iou_0.1", "ap_iou_0.25", "ap_iou_0.5"} <= set(table.columns)
    dets = json.loads((out / "detections.json").read_text())["images"]
    assert dets["im0"]["latents"]["0"]["pointing_hit"] is True
