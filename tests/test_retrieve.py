"""Retrieval: planted neighbours and precision@k on synthetic summaries, cosine against numpy,
the --latents ranking, and the CLI (outputs; bad input exits 2 naming the problem) on a tiny
store whose SAE copies input channel j < 8 into latent j."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from mammo_sae.analysis.retrieve import (
    cosine_scores,
    latent_ranking,
    neighbours,
    precision_at_k,
    top_latent_sets,
)
from mammo_sae.cli import main


def _planted(n: int = 12, h: int = 20, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """Images 0-4 share latent 7 (strong) and label X; the others fire latents 0-6; every image
    has weak noise on latents 10-19."""
    rng = np.random.default_rng(seed)
    m = np.zeros((n, h))
    m[:, 10:] = rng.uniform(0.0, 0.3, (n, h - 10)) * (rng.random((n, h - 10)) < 0.3)
    m[:5, 7] = rng.uniform(2.0, 3.0, 5)
    for i in range(5, n):
        m[i, rng.choice(7, 2, replace=False)] = rng.uniform(1.0, 2.0, 2)
    y = (np.arange(n) < 5).astype(np.int64)
    return sp.csr_matrix(m), y


@pytest.mark.parametrize("center", [False, True])
def test_planted_latent_retrieves_its_images_first_and_precision_is_one(center: bool) -> None:
    mean, y = _planted()
    pooled = np.random.default_rng(1).random((mean.shape[0], 6))
    nb = neighbours(mean, pooled, np.flatnonzero(y == 1), k=4, overlap_top=2, center=center)
    for method in ("sparse_cosine", "sparse_overlap"):
        assert sorted(nb[method].positions_qk[0].tolist()) == [1, 2, 3, 4], method
        assert precision_at_k(nb[method], y, [1, 4]) == {1: 1.0, 4: 1.0}
        # never the query itself
        assert all(q not in row for q, row in enumerate(nb[method].positions_qk.tolist()))
    assert nb["dense_cosine"].positions_qk.shape == (5, 4)


@pytest.mark.parametrize("center", [False, True])
def test_cosine_scores_equal_a_direct_numpy_computation(center: bool) -> None:
    rng = np.random.default_rng(2)
    raw = rng.random((9, 7)) * (rng.random((9, 7)) < 0.4)
    raw[3] = 0.0  # an image with no active latent: raw cosine 0 with everything
    raw += 5.0 * (raw > 0)  # a large common level: centring matters
    dense = raw - raw.mean(0) if center else raw
    q = [0, 3, 8]
    direct = np.zeros((3, 9))
    for a, i in enumerate(q):
        for j in range(9):
            ni, nj = np.linalg.norm(dense[i]), np.linalg.norm(dense[j])
            direct[a, j] = dense[i] @ dense[j] / (ni * nj) if ni > 0 and nj > 0 else 0.0
    for m in (sp.csr_matrix(raw), raw):
        np.testing.assert_allclose(cosine_scores(m, q, center=center), direct, atol=1e-12)
    nb = neighbours(sp.csr_matrix(raw), raw, q, k=5, center=center)
    for method in ("sparse_cosine", "dense_cosine"):
        got = nb[method]
        np.testing.assert_allclose(
            got.scores_qk, np.take_along_axis(direct, got.positions_qk, 1), atol=1e-12
        )
        assert (np.diff(got.scores_qk, axis=1) <= 1e-15).all()  # best first


def test_latents_rank_by_summed_mean_activation() -> None:
    rng = np.random.default_rng(3)
    m = sp.csr_matrix(rng.random((30, 10)) * (rng.random((30, 10)) < 0.3))
    order, score = latent_ranking(m, [2, 5], 6)
    summed = m.toarray()[:, 2] + m.toarray()[:, 5]
    np.testing.assert_allclose(score, np.sort(summed)[::-1][:6])
    assert order.tolist() == np.argsort(-summed, kind="stable")[:6].tolist()
    with pytest.raises(Exception, match=r"out of range for an SAE with h = 10: \[10\]"):
        latent_ranking(m, [2, 10], 6)


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images of 2x3 patches, d = 8. Images 0-4 (Mass) carry channel 7 (stronger with i);
    the others channel i % 3. The SAE fires latent j = relu(x_j − 0.5) for j < 8 (h = 16)."""
    import torch

    from mammo_sae.activations.store import write_store
    from mammo_sae.data.records import ImageRecord
    from mammo_sae.sae.checkpoints import save_sae
    from mammo_sae.sae.model import SAEConfig, SparseAutoencoder

    root = tmp_path_factory.mktemp("retrieve")
    rng = np.random.default_rng(0)
    recs, acts = [], []
    for i in range(12):
        recs.append(
            ImageRecord(
                image_id=f"im{i}",
                patient_id=f"p{i // 2}",
                split="test",
                path=None,
                labels={"Mass": int(i < 5), "Calc": 0, "density": i % 4},
                view="CC",
                laterality="L",
                frame_hw=(64, 48),
            )
        )
        a = rng.uniform(0.0, 0.4, (6, 8)).astype(np.float32)
        if i < 5:
            a[:2, 7] += 1.0 + 0.2 * i
        else:
            a[0, i % 3] += 1.5
        acts.append(a)
    write_store(root / "store", acts, grids=[(2, 3)] * 12, records=recs)
    sae = SparseAutoencoder(SAEConfig(d=8, h=16), seed=0)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:8] = torch.eye(8)
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
    save_sae(sae, root / "sae")
    return root


def _run(tiny: Path, out: str, *args: str) -> int:
    return main(
        [
            "retrieve",
            "--store",
            str(tiny / "store"),
            "--sae",
            str(tiny / "sae"),
            "--out",
            str(tiny / out),
            "--no-progress",
            *args,
        ]
    )


def test_cli_image_query_writes_json_csv_and_html(tiny: Path) -> None:
    assert _run(tiny, "img", "--image", "im0", "--k", "4", "--overlap-top", "1") == 0
    body = json.loads((tiny / "img" / "retrieve.json").read_text())
    assert body["schema_version"] == 1 and body["query"]["image_id"] == "im0"
    assert body["query"]["top_latents"][0]["latent"] == 7
    assert set(body["results"]) == {"sparse_cosine", "sparse_overlap", "dense_cosine"}
    for method in ("sparse_cosine", "sparse_overlap"):
        got = [e["image_id"] for e in body["results"][method]]
        assert sorted(got) == ["im1", "im2", "im3", "im4"], method
        assert all(e["labels"]["Mass"] == 1 for e in body["results"][method])
    table = pd.read_csv(tiny / "img" / "retrieve.csv")
    assert len(table) == 12 and set(table["method"]) == set(body["results"])
    assert table.loc[table["method"] == "sparse_cosine", "positive_labels"].eq("Mass").all()
    page = (tiny / "img" / "index.html").read_text()
    assert "im0" in page and "sparse_overlap" in page and "http" not in page


def test_cli_label_query_reports_precision_at_k(tiny: Path) -> None:
    assert _run(tiny, "q", "--query", "Mass", "--ks", "1,4", "--k", "4") == 0
    body = json.loads((tiny / "q" / "retrieve.json").read_text())
    assert body["query"]["n_queries"] == 5 and body["query"]["n_candidates"] == 12
    by_k = {row["k"]: row for row in body["precision"]}
    assert by_k[4]["sparse_cosine"] == 1.0 and by_k[1]["sparse_overlap"] == 1.0
    assert by_k[4]["chance"] == pytest.approx(4 / 11)
    table = pd.read_csv(tiny / "q" / "retrieve.csv")
    assert len(table) == 3 * 5 * 4  # methods × queries × k


def test_cli_latents_ranks_images_by_summed_activation(tiny: Path) -> None:
    assert _run(tiny, "lat", "--latents", "7,3", "--k", "6") == 0
    body = json.loads((tiny / "lat" / "retrieve.json").read_text())
    got = body["results"]["latent_sum"]
    # channel 7 was planted stronger with i on images 0-4; nothing else reaches latent 3
    assert [e["image_id"] for e in got[:5]] == ["im4", "im3", "im2", "im1", "im0"]
    assert len(got) == 5 and body["query"]["n_firing"] == 5  # images without them: not listed
    scores = [e["score"] for e in got]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "nope"], "unknown image id 'nope'"),
        (["--latents", "3,16"], "latent indices out of range for an SAE with h = 16: [16]"),
        (["--query", "Cancer"], "unknown label 'Cancer'; valid: Mass"),
        (["--query", "Calc"], "label 'Calc' has no positive images in split 'all'"),
        (["--query", "density"], "label 'density' is not binary"),
        (["--query", "Mass", "--ks", "1,20"], "precision@20 needs 20 other images"),
        ([], "give exactly one of --image, --latents, --query"),
        (["--image", "im0", "--query", "Mass"], "give exactly one of"),
        (["--image", "im0", "--split", "training"], "split 'training' is not in the store"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_problem(
    tiny: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert _run(tiny, "bad", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tiny / "bad").exists()  # nothing written


def test_centred_overlap_sets_leave_out_a_latent_active_everywhere() -> None:
    mean, _ = _planted()
    m = sp.hstack([mean, sp.csr_matrix(np.full((mean.shape[0], 1), 10.0))]).tocsr()
    raw = top_latent_sets(m, 1).toarray()
    centred = top_latent_sets(m, 1, centre=True).toarray()
    assert raw[:, -1].all()  # the largest latent of every image: raw sets all equal
    assert not centred[:, -1].any() and centred[:5, 7].all()
