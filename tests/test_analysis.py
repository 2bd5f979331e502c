"""Analysis core: batched metrics, latent summaries, probe scores, the pooled-identity fast path
against full decoding, targeted edits and separation flags — on small synthetic stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from mammo_sae import metrics
from mammo_sae.activations.store import write_store
from mammo_sae.analysis.intervene import (
    LinearHead,
    edit_set,
    entry_rank,
    exact_decode_logits,
    masked_logits,
    normalise_ks,
    pooled_logits,
    sae_readout,
    sweep,
    union_masks,
)
from mammo_sae.analysis.probe import (
    latent_auroc,
    probe,
    ranking_entries,
    ranking_order,
    read_ranking,
)
from mammo_sae.analysis.separation import FlagRule, model_separation, separation_index
from mammo_sae.analysis.summaries import (
    LatentSummaries,
    compute_summaries,
    labelled_rows,
    load_summaries,
    summarize,
)
from mammo_sae.data.records import Box, ImageRecord
from mammo_sae.errors import MammoSaeError
from mammo_sae.io import write_json
from mammo_sae.sae.model import SAEConfig, SparseAutoencoder

GRID = (3, 4)
FRAME = (96, 128)  # 32 px per cell


def make_sae(d: int, h: int, seed: int = 0, normalisation: str = "none") -> SparseAutoencoder:
    sae = SparseAutoencoder(
        SAEConfig(architecture="relu-l1", d=d, h=h, init="tied", normalisation=normalisation),
        seed=seed,
    )
    if normalisation != "none":
        sae.set_normalisation(torch.linspace(-0.3, 0.4, d), 1.7)
    return sae.eval()


def make_data(
    n: int = 24, d: int = 8, seed: int = 0
) -> tuple[list[np.ndarray], list[ImageRecord], np.ndarray]:
    """Per-image patch matrices: class-1 images carry a planted direction in two cells; every
    third image has a confounder box over cell (0, 0)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(int)
    u = rng.normal(size=d)
    acts, records = [], []
    p = GRID[0] * GRID[1]
    for i in range(n):
        a = np.abs(rng.normal(size=(p, d))).astype(np.float32)
        if y[i]:
            a[[5, 6]] += (2.0 * u).astype(np.float32)
        boxes = (Box("confounder", 0.0, 0.0, 30.0, 30.0),) if i % 3 == 1 else ()
        records.append(
            ImageRecord(
                image_id=f"img{i:03d}",
                patient_id=f"p{i:03d}",
                split="training" if i < n // 2 else "test",
                path=None,
                labels={"Mass": int(y[i])},
                boxes=boxes,
                frame_hw=FRAME,
            )
        )
        acts.append(a)
    return acts, records, y


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    acts, records, y = make_data()
    store = write_store(
        tmp_path_factory.mktemp("analysis") / "store",
        acts,
        grids=[GRID] * len(acts),
        records=records,
        shard_images=7,
    )
    sae = make_sae(8, 32)
    summ = compute_summaries(store, sae, batch_rows=20, progress=False)
    return {"acts": acts, "records": records, "y": y, "store": store, "sae": sae, "summ": summ}


# --------------------------------------------------------------------------- stats
def test_batched_curves_equal_sklearn_and_with_ci_including_ties() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(200) < 0.25).astype(int)
    s = np.round(rng.normal(size=200) + y, 1)  # many ties
    counts = metrics.bootstrap_counts(200, 6, seed=5)
    roc, pr = metrics.weighted_auroc_auprc(y, s, counts.astype(np.float32))
    for b, idx in enumerate(metrics.bootstrap_indices(200, 6, seed=5)):
        assert roc[b] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-9)
        assert pr[b] == pytest.approx(average_precision_score(y[idx], s[idx]), abs=1e-6)
    curves = metrics.curves_with_ci(y, np.stack([s, np.zeros(200)]), n_boot=300, seed=2)
    ref = metrics.with_ci(y, s, n_boot=300, seed=2)
    assert curves["auroc"][0] == pytest.approx(ref["auroc"].value, abs=1e-12)
    assert curves["auroc_low"][0] == pytest.approx(ref["auroc"].low, abs=1e-9)
    assert curves["auprc_high"][0] == pytest.approx(ref["auprc"].high, abs=1e-6)
    assert curves["auroc"][1] == 0.5 and curves["auprc"][1] == pytest.approx(y.mean())


def test_batched_curves_reject_nan_scores() -> None:
    with pytest.raises(MammoSaeError, match="NaN"):
        metrics.curves_with_ci([0, 1, 0], np.array([[0.1, np.nan, 0.2]]), n_boot=0)


# --------------------------------------------------------------------------- summaries
def test_summaries_equal_dense_encoding(synth: dict[str, Any]) -> None:
    summ, sae, acts = synth["summ"], synth["sae"], synth["acts"]
    mean_ref, max_ref, sse, sq, l0 = [], [], 0.0, 0.0, 0.0
    box_mass = np.zeros(32)
    marked_mass = np.zeros(32)
    with torch.no_grad():
        for i, a in enumerate(acts):
            z = sae.encode(torch.from_numpy(a)).double().numpy()
            mean_ref.append(z.mean(0))
            max_ref.append(z.max(0))
            sse += float(((a - sae.decode(torch.from_numpy(z).float()).numpy()) ** 2).sum())
            sq += float((a.astype(np.float64) ** 2).sum())
            l0 += float((z > 0).sum())
            if synth["records"][i].boxes:
                marked_mass += z.sum(0)
                box_mass += z[0]  # the box (0..30 px) overlaps only cell (0, 0)
    np.testing.assert_allclose(summ.mean_nh.toarray(), np.stack(mean_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(summ.max_nh.toarray(), np.stack(max_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(summ.confounder_mass_h, box_mass, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(summ.marked_mass_h, marked_mass, rtol=1e-5, atol=1e-6)
    all_x = np.concatenate(acts).astype(np.float64)
    st = summ.reconstruction_stats(np.arange(len(acts)))
    assert st["fvu"] == pytest.approx(sse / ((all_x - all_x.mean(0)) ** 2).sum(), rel=1e-5)
    assert st["l0"] == pytest.approx(l0 / len(all_x))
    dead = float((np.stack(max_ref).max(0) <= 0).mean())
    assert st["dead_fraction"] == pytest.approx(dead)
    assert summ.meta["marked_positions"] == 12 * 8 and summ.meta["confounder_positions"] == 8
    assert np.isnan(summ.off_breast_score()).all()  # write_store leaves tissue unknown


def test_attribute_regions_are_any_non_finding_box(synth: dict[str, Any], tmp_path: Path) -> None:
    """The marker mass is generic: any per-image attribute's box (not a finding's) counts as the
    phantom's `confounder` box does; a finding's box does not."""
    import dataclasses

    acts, summ = synth["acts"], synth["summ"]
    masses = {}
    for label in ("pen_mark", "Mass"):
        records = [
            dataclasses.replace(
                r, boxes=tuple(dataclasses.replace(b, concept=label) for b in r.boxes)
            )
            for r in synth["records"]
        ]
        store = write_store(tmp_path / label, acts, grids=[GRID] * len(acts), records=records)
        masses[label] = compute_summaries(store, synth["sae"], batch_rows=20, progress=False)
    np.testing.assert_allclose(masses["pen_mark"].confounder_mass_h, summ.confounder_mass_h)
    np.testing.assert_allclose(masses["pen_mark"].marked_mass_h, summ.marked_mass_h)
    assert summ.marked_mass_h.any() and not masses["Mass"].marked_mass_h.any()
    assert np.isnan(masses["Mass"].confounder_score()).all()


class _TissueStore:
    """Duck-typed store: one image, 2 cells, the second off the breast."""

    d, n_images = 2, 1
    manifest = {"subsample": {"fraction": 1.0}, "level": "image"}
    images = pd.DataFrame({"image_index": [0], "grid_h": [1], "grid_w": [2], "ok": [True]})

    def records(self) -> list[ImageRecord]:
        return [ImageRecord("a", "p", "training", None, {"Mass": 0}, frame_hw=(32, 64))]

    def image_patches(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.array([[1.0, 0.0], [0.0, 3.0]], np.float32), np.array([0, 0]), np.array([0, 1])

    def image_tissue(self, i: int) -> np.ndarray:
        return np.array([0.9, 0.1], np.float32)


def test_off_breast_score_is_mass_share_on_low_tissue_cells() -> None:
    sae = SparseAutoencoder(SAEConfig(d=2, h=2, init="tied"), seed=0).eval()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.eye(2))
    s = compute_summaries(_TissueStore(), sae, progress=False)
    np.testing.assert_allclose(s.off_breast_score(), [0.0, 1.0])
    np.testing.assert_allclose(s.mean_nh.toarray(), [[0.5, 1.5]])


def test_summaries_cache_is_reused_and_keyed_by_both_hashes(
    synth: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = summarize(
        synth["store"],
        synth["sae"],
        store_sha="a" * 64,
        sae_sha="b" * 64,
        cache_dir=tmp_path,
        progress=False,
    )
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr("mammo_sae.analysis.summaries.compute_summaries", boom)
    again = summarize(
        synth["store"],
        synth["sae"],
        store_sha="a" * 64,
        sae_sha="b" * 64,
        cache_dir=tmp_path,
        progress=False,
    )
    assert (again.mean_nh != first.mean_nh).nnz == 0
    np.testing.assert_array_equal(again.sse_n, first.sse_n)
    with pytest.raises(AssertionError, match="recomputed"):
        summarize(
            synth["store"],
            synth["sae"],
            store_sha="a" * 64,
            sae_sha="c" * 64,
            cache_dir=tmp_path,
            progress=False,
        )


def test_corrupt_summaries_raise(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(b"not an npz")
    write_json(tmp_path / "x.json", {"schema_version": 1, "n_images": 1, "h": 2})
    with pytest.raises(MammoSaeError, match="corrupt"):
        load_summaries(tmp_path / "x.npz")


def test_labelled_rows_selects_split_and_names_bad_input(synth: dict[str, Any]) -> None:
    images = synth["store"].images
    rows, y = labelled_rows(images, "Mass", split="test")
    assert list(rows) == list(range(12, 24)) and list(y) == list(synth["y"][12:])
    with pytest.raises(MammoSaeError, match="Calcification"):
        labelled_rows(images, "Calcification", split="test")
    with pytest.raises(MammoSaeError, match="validation"):
        labelled_rows(images, "Mass", split="validation")
    with pytest.raises(MammoSaeError, match="row level"):
        labelled_rows(images, "Mass", split="test", level="row", store_level="image")


# --------------------------------------------------------------------------- probe
def test_probe_scores_follow_their_definitions(synth: dict[str, Any]) -> None:
    summ, y = synth["summ"], synth["y"]
    dense = summ.mean_nh.toarray().astype(np.float64)
    res = probe(summ.mean_nh, y)
    np.testing.assert_allclose(res.scores["mean"][1], dense[y == 1].mean(0), rtol=1e-6)
    np.testing.assert_allclose(res.scores["mean"][0], dense[y == 0].mean(0), rtol=1e-6)
    # Released-file property: importance(0) = −P/(N−P) · importance(1) for the centered score.
    p = y.mean()
    np.testing.assert_allclose(
        res.scores["centered"][0], -p / (1 - p) * res.scores["centered"][1], atol=1e-9
    )
    active = np.flatnonzero(dense.max(0) > 0)
    j = active[0]
    assert res.scores["auroc"][1][j] == pytest.approx(roc_auc_score(y, dense[:, j]))
    dead = np.flatnonzero(dense.max(0) == 0)
    if len(dead):
        assert (res.scores["auroc"][1][dead] == 0.5).all()
    # The planted class-1 direction makes the top centered latent more active on class 1.
    top = ranking_order(res.scores["centered"][1])[0]
    assert dense[y == 1, top].mean() > dense[y == 0, top].mean()


def test_peak_score_is_the_centred_class_mean_of_image_maxima(synth: dict[str, Any]) -> None:
    summ, y = synth["summ"], synth["y"]
    peaks = summ.max_nh.toarray().astype(np.float64)
    res = probe(summ.mean_nh, y, max_nh=summ.max_nh)
    for c in (0, 1):
        np.testing.assert_allclose(
            res.scores["peak"][c], peaks[y == c].mean(0) - peaks.mean(0), atol=1e-9
        )
    assert "peak" not in probe(summ.mean_nh, y).scores  # no maxima given: not offered
    with pytest.raises(MammoSaeError, match="max vectors"):
        probe(summ.mean_nh, y, scores=["peak"])


def test_latent_auroc_dense_and_sparse_agree(synth: dict[str, Any]) -> None:
    summ, y = synth["summ"], synth["y"]
    np.testing.assert_allclose(
        latent_auroc(summ.mean_nh, y), latent_auroc(summ.mean_nh.toarray(), y)
    )


def test_ranking_roundtrip_and_bad_files(tmp_path: Path) -> None:
    imp = np.array([0.1, 0.5, 0.0, 0.5, -0.2])
    entries = ranking_entries(imp)
    assert [e["index"] for e in entries] == [1, 3, 0, 2, 4]
    assert [e["rank"] for e in entries] == [0, 1, 2, 3, 4]
    write_json(tmp_path / "r.json", entries[::-1])  # order restored from "rank"
    assert read_ranking(tmp_path / "r.json")[0] == [1, 3, 0, 2, 4]
    write_json(tmp_path / "bad.json", {"index": 3})
    with pytest.raises(MammoSaeError, match="list"):
        read_ranking(tmp_path / "bad.json")
    write_json(tmp_path / "dup.json", [{"rank": 0, "index": 1}, {"rank": 1, "index": 1}])
    with pytest.raises(MammoSaeError, match="distinct"):
        read_ranking(tmp_path / "dup.json")


# --------------------------------------------------------------------------- interventions
def _head(d: int, seed: int = 3) -> LinearHead:
    rng = np.random.default_rng(seed)
    return LinearHead(w_d=rng.normal(size=d), b=0.25, concept="Mass")


@pytest.mark.parametrize("normalisation", ["none", "centre-scale"])
def test_pooled_identity_equals_full_decode(synth: dict[str, Any], normalisation: str) -> None:
    sae = make_sae(8, 32, seed=1, normalisation=normalisation)
    summ = compute_summaries(synth["store"], sae, progress=False)
    head = _head(8)
    rows = np.arange(24)
    probe_res = probe(summ.mean_nh, synth["y"], scores=["centered"])
    rankings = [ranking_order(probe_res.scores["centered"][c]) for c in (0, 1)]
    ks = normalise_ks([0, 1, 2, 5, 10, 50], 32)
    masks = union_masks(entry_rank(rankings, 32), ks)
    v, c = sae_readout(sae, head)
    fast_on, fast_off = masked_logits(summ.mean_nh, v, c, masks)
    exact_on, exact_off = exact_decode_logits(synth["store"], sae, head, rows, masks)
    np.testing.assert_allclose(fast_on, exact_on, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast_off, exact_off, rtol=1e-5, atol=1e-5)
    # Plain SAE (keep everything) equals the head on the mean reconstruction.
    with torch.no_grad():
        x_hat = [
            sae.decode(sae.encode(torch.from_numpy(a))).double().mean(0).numpy()
            for a in synth["acts"]
        ]
    np.testing.assert_allclose(
        fast_on[-1], np.stack(x_hat) @ head.w_d + head.b, rtol=1e-5, atol=1e-5
    )


def test_sweep_endpoints_union_sizes_and_exact_logits(synth: dict[str, Any]) -> None:
    summ, y, sae = synth["summ"], synth["y"], synth["sae"]
    head = _head(8)
    v, c = sae_readout(sae, head)
    res_probe = probe(summ.mean_nh, y, scores=["centered"])
    rankings = [ranking_order(res_probe.scores["centered"][cl]) for cl in (0, 1)]
    res = sweep(
        y,
        rankings,
        len(v),
        pooled_logits(summ.mean_nh, v, c),
        ks=(0, 1, 5, 10, 16384, 100),
        n_boot=50,
    )
    assert res.ks == [0, 1, 5, 10, 32]
    assert res.union_size[0] == 0 and res.union_size[-1] == 32
    assert all(a <= b for a, b in zip(res.union_size, res.union_size[1:]))
    assert 1 <= res.union_size[1] <= 2
    on, off = res.metrics["on"], res.metrics["off"]
    assert on["auroc"][0] == 0.5 and off["auroc"][-1] == 0.5  # constant logits
    assert on["auroc"][-1] == pytest.approx(off["auroc"][0])  # both = plain SAE
    assert on["auprc"][0] == pytest.approx(y.mean())
    assert (on["auroc_low"] <= on["auroc"] + 1e-12).all() and (
        on["auroc"] <= on["auroc_high"] + 1e-12
    ).all()
    rows = res.rows()
    assert {r["mode"] for r in rows} == {"on", "off"} and len(rows) == 10


def test_entry_rank_rejects_out_of_range_rankings() -> None:
    with pytest.raises(MammoSaeError, match="outside"):
        entry_rank([np.array([0, 40])], 32)


def test_targeted_edit(synth: dict[str, Any]) -> None:
    summ, y = synth["summ"], synth["y"]
    v, c = sae_readout(synth["sae"], _head(8))
    everything = edit_set(y, len(v), pooled_logits(summ.mean_nh, v, c), range(32), "off", n_boot=20)
    assert everything["edited"]["auroc"] == 0.5
    nothing_dropped = edit_set(
        y, len(v), pooled_logits(summ.mean_nh, v, c), range(32), "on", n_boot=20
    )
    assert nothing_dropped["auroc_change"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(MammoSaeError, match="outside"):
        edit_set(y, len(v), pooled_logits(summ.mean_nh, v, c), [99], "off")


def test_edit_reports_the_attribute_shortcut_and_its_removal() -> None:
    """A readout that adds a marker-driven latent to the logit: among negatives the logit tells
    marked from unmarked images perfectly (shortcut AUROC 1); switching that latent off leaves
    only the concept latent and the shortcut disappears (0.5), while concept AUROC is kept."""
    rng = np.random.default_rng(0)
    n = 200
    y = (np.arange(n) % 2).astype(np.int64)
    marker = (rng.random(n) < 0.5).astype(np.int64)
    mean = np.stack(
        [
            y * 1.0,  # latent 0: the concept
            marker * 2.0,  # latent 1: the marker (the shortcut)
            np.full(n, 0.5),
        ],
        axis=1,
    )  # latent 2: constant
    v, c = np.array([1.0, 1.0, 0.0]), 0.0
    r = edit_set(y, len(v), pooled_logits(mean, v, c), [1], "off", n_boot=0, attribute=marker)
    sc = r["shortcut"]["attribute_auroc_among_negatives"]
    assert sc["plain_sae"] == pytest.approx(1.0) and sc["edited"] == pytest.approx(0.5)
    assert r["edited"]["auroc"] == pytest.approx(1.0)
    assert r["shortcut"]["n_negatives"] == n // 2
    assert "shortcut" not in edit_set(y, len(v), pooled_logits(mean, v, c), [1], "off", n_boot=0)
    one_value = edit_set(
        y, len(v), pooled_logits(mean, v, c), [1], "off", n_boot=0, attribute=np.zeros(n, np.int64)
    )
    assert "skipped" in one_value["shortcut"]
    with pytest.raises(MammoSaeError, match="attribute has 3 values"):
        edit_set(y, len(v), pooled_logits(mean, v, c), [1], "off", n_boot=0, attribute=marker[:3])


def test_readout_rejects_mismatched_head(synth: dict[str, Any]) -> None:
    with pytest.raises(MammoSaeError, match="d = 8"):
        sae_readout(synth["sae"], _head(5))


# --------------------------------------------------------------------------- separation
def _summaries_from(mean_nh: np.ndarray, conf_share: np.ndarray) -> LatentSummaries:
    import scipy.sparse as sp

    n, h = mean_nh.shape
    mass = np.ones(h)
    zeros = np.zeros(h)
    return LatentSummaries(
        mean_nh=sp.csr_matrix(mean_nh.astype(np.float32)),
        max_nh=sp.csr_matrix(mean_nh.astype(np.float32)),
        n_positions_n=np.full(n, 10),
        n_cells_n=np.full(n, 10),
        ss_within_n=np.ones(n),
        sse_n=np.zeros(n),
        l0_n=np.ones(n),
        x_mean_nd=np.zeros((n, 2), np.float32),
        mass_h=mass,
        tissue_known_mass_h=zeros,
        off_breast_mass_h=zeros,
        marked_mass_h=mass,
        confounder_mass_h=conf_share,
        meta={"marked_positions": 100, "confounder_positions": 4},
    )


def test_association_flags_latents_that_follow_the_attribute_among_negatives() -> None:
    """Latent 1 follows the marker on negatives (AUROC 1), latent 2 follows it inversely (0),
    latent 3 follows only the concept: association is measured where the concept cannot explain
    it, and needs ≥ MIN_ATTRIBUTE_GROUP negatives on each side of the attribute."""
    from mammo_sae.analysis.separation import MIN_ATTRIBUTE_GROUP

    k = MIN_ATTRIBUTE_GROUP
    y = np.array([0] * (2 * k) + [1] * 4)
    marker = np.array([0, 1] * k + [0, 1, 0, 1])
    neg_rows = [[1, 3 * m, 2 * (1 - m), 0] for m in marker[: 2 * k]]
    mean = np.array(neg_rows + [[1, 3, 0, 5]] * 4, dtype=float)
    s = _summaries_from(mean, conf_share=np.zeros(4))
    r = model_separation(s, np.arange(len(y)), y, FlagRule(top=4), attribute=marker)
    assert r["associated"] == [1, 2]
    by_index = {e["index"]: e for e in r["class1_dominant"]}
    assert (
        by_index[1]["attribute_auroc"] == pytest.approx(1.0)
        and "associated" in by_index[1]["flags"]
    )
    assert by_index[3]["attribute_auroc"] == pytest.approx(0.5) and by_index[3]["flags"] == []
    assert r["associated_in_top"] == 1  # latent 2 is not class-1 dominant
    none = model_separation(s, np.arange(len(y)), y, FlagRule(top=4))
    assert none["associated"] == [] and np.isnan(none["class1_dominant"][0]["attribute_auroc"])
    few = marker.copy()
    few[: 2 * k] = 0
    few[1] = 1  # one marked negative: chance territory
    assert (
        model_separation(s, np.arange(len(y)), y, FlagRule(top=4), attribute=few)["associated"]
        == []
    )
    with pytest.raises(MammoSaeError, match="association_auroc"):
        FlagRule(association_auroc=0.4)


def test_association_threshold_is_symmetric() -> None:
    from mammo_sae.analysis.separation import _associated

    rule = FlagRule()
    assert list(_associated(np.array([0.8, 0.2, 0.79, 0.21, np.nan]), rule)) == [
        True,
        True,
        False,
        False,
        False,
    ]


def test_separation_flags_the_confounder_latent() -> None:
    y = np.array([0, 0, 1, 1])
    mean = np.array(
        [[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0], [1.0, 2.0, 1.0, 3.0], [1.0, 2.0, 1.0, 3.0]]
    )
    s = _summaries_from(mean, conf_share=np.array([0.0, 0.05, 0.9, 0.8]))
    r = model_separation(s, np.arange(4), y, FlagRule(top=3))
    assert [e["index"] for e in r["class1_dominant"]] == [3, 1]  # only z̄(1) > z̄(0)
    assert [e["index"] for e in r["flagged"]] == [3] and r["flagged"][0]["flags"] == ["confounder"]
    assert {e["index"] for e in r["shared"]} == {0, 2}
    assert r["separation"] == pytest.approx(1.0)  # both fire on class 1 only
    assert r["global_separation"] == pytest.approx(5 / 9)
    assert separation_index(np.ones(3), np.ones(3)) == 0.0


def test_the_real_store_and_sae_have_what_the_analyses_read(synth: dict[str, Any]) -> None:
    """`protocols.PatchStore` / `SAELike` name the members the analyses use: the real classes
    must keep them (a rename there breaks this, not a run)."""
    from mammo_sae.protocols import LatentEncoder, PatchStore, SAELike

    assert isinstance(synth["store"], PatchStore)
    assert isinstance(synth["sae"], SAELike) and isinstance(synth["sae"], LatentEncoder)
    assert not isinstance(object(), PatchStore) and not isinstance(object(), LatentEncoder)
