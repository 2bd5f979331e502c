"""Latent atlas: rank statistics against scipy/sklearn, BH-FDR against a direct implementation,
names and flags on summaries planted over the phantom's own labels, the CLI, the pipeline
stage's place, and the report's Atlas page (its script under node; headless Chromium if any)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import mannwhitneyu, spearmanr
from sklearn.metrics import roc_auc_score

from mammo_sae.analysis.atlas import (
    auroc_test,
    bh_fdr,
    build_atlas,
    column_ranks,
    image_labels,
    spearman_test,
    to_json,
)
from mammo_sae.cli import main


def _sparse(seed: int, n: int, h: int, density: float) -> sp.csr_matrix:
    """Random non-negative sparse matrix with many ties (values on a 0.25 grid)."""
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n, h)) < density, rng.integers(1, 5, (n, h)) * 0.25, 0.0)
    return sp.csr_matrix(dense)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 40), tenths=st.integers(0, 10))
def test_auroc_and_mann_whitney_p_equal_sklearn_and_scipy_per_latent(
    seed: int, n: int, tenths: int
) -> None:
    m = _sparse(seed, n, 6, tenths / 10)
    y = np.r_[0, 1, np.random.default_rng(seed + 1).integers(0, 2, n - 2)]
    auc, p = auroc_test(column_ranks(m), y[:, None])
    dense = m.toarray()
    for j in range(6):
        col = dense[:, j]
        assert auc[j, 0] == pytest.approx(roc_auc_score(y, col), abs=1e-12)
        if col.min() == col.max():
            assert np.isnan(p[j, 0])  # a constant latent is not tested
        else:
            ref = mannwhitneyu(col[y == 1], col[y == 0], method="asymptotic").pvalue
            assert p[j, 0] == pytest.approx(ref, rel=1e-8, abs=1e-12)


def test_spearman_equals_scipy_per_latent() -> None:
    m = _sparse(3, 50, 8, 0.4)
    v = np.random.default_rng(4).integers(0, 4, 50).astype(float)
    rho, p = spearman_test(column_ranks(m), v[:, None])
    for j in range(8):
        ref = spearmanr(m.toarray()[:, j], v)
        assert rho[j, 0] == pytest.approx(ref.statistic, abs=1e-12)
        assert p[j, 0] == pytest.approx(ref.pvalue, rel=1e-8)


def test_bh_fdr_equals_the_direct_definition() -> None:
    rng = np.random.default_rng(0)
    p = np.r_[rng.random(40) ** 3, np.nan, 0.01, 0.01]
    q = bh_fdr(p)
    finite = p[np.isfinite(p)]
    m = len(finite)
    srt = np.sort(finite)
    for i, pi in enumerate(p):
        if np.isnan(pi):
            assert np.isnan(q[i])
            continue
        # q_i = min over k with p_(k) >= p_i of p_(k) · m / k
        direct = min(min(1.0, srt[k] * m / (k + 1)) for k in range(m) if srt[k] >= pi)
        assert q[i] == pytest.approx(direct, abs=1e-15)


@pytest.fixture(scope="module")
def phantom_table(tiny_phantom: Path) -> pd.DataFrame:
    """The store-style image table of the tiny phantom (labels as extraction records them)."""
    from mammo_sae.data.vindr import load_records

    recs = load_records(tiny_phantom)
    return pd.DataFrame(
        {
            "image_labels": [r.labels for r in recs],
            "view": [r.view for r in recs],
            "laterality": [r.laterality for r in recs],
            "extra": [r.extra for r in recs],
            "boxes": [[[b.concept, b.x0, b.y0, b.x1, b.y1] for b in r.boxes] for r in recs],
        }
    )


def test_planted_latents_are_named_flagged_and_their_planted_label_comes_first(
    phantom_table: pd.DataFrame,
) -> None:
    """Latents planted on the phantom's own labels: 0 fires only on marked images (and inside
    the marker box), 1 only with Mass, 2 only with calcification, 3 grows with density; 4-8 are
    noise; 9 never fires. Each gets its label's name, AUROC 1 and the smallest q of that label."""
    rows = np.arange(len(phantom_table))
    labels, skipped = image_labels(phantom_table, rows)
    by = {lab.name: lab.values for lab in labels}
    assert {"Mass", "Suspicious_Calcification", "confounder", "density", "view"} <= set(by)
    assert "constant" in skipped["Nipple_Retraction"]  # never planted: left out, said why
    rng = np.random.default_rng(0)
    n, h = len(rows), 10
    mean = np.zeros((n, h))
    mean[:, 0] = by["confounder"] * rng.uniform(1, 2, n)
    mean[:, 1] = by["Mass"] * rng.uniform(1, 2, n)
    mean[:, 2] = by["Suspicious_Calcification"] * rng.uniform(1, 2, n)
    mean[:, 3] = by["density"] + rng.uniform(0, 0.5, n)
    mean[:, 4:9] = rng.random((n, 5)) * (rng.random((n, 5)) < 0.5)
    spatial = {"marker_box_share": np.r_[0.9, np.full(h - 1, 0.01)]}
    atlas = build_atlas(sp.csr_matrix(mean), labels, spatial=spatial, n_clusters=3, progress=False)
    k = {lab.name: i for i, lab in enumerate(labels)}
    for j, label, word in (
        (0, "confounder", "marker (confounder)"),
        (1, "Mass", "Mass +"),
        (2, "Suspicious_Calcification", "Suspicious_Calcification +"),
    ):
        assert atlas.names[j].startswith(f"{word} (AUROC 1.00)"), atlas.names[j]
        assert atlas.effect[j, k[label]] == 1.0
        assert atlas.q[j, k[label]] == np.nanmin(atlas.q[:, k[label]])
        assert atlas.associations[j][0]["label"] == label  # planted attribute first
    assert "confounder" in atlas.flags[0] and "on the marker" in atlas.names[0]
    assert "confounder" not in atlas.flags[1]
    assert atlas.names[3].startswith("dense (ρ") and atlas.associations[3][0]["label"] == "density"
    assert atlas.names[9] == "dead (never active)" and atlas.columns["cluster"][9] == -1
    # Noise never takes a planted finding's or the marker's name (20 patients share density
    # between their two views, so a chance density association can pass BH at 5 %).
    assert all(not atlas.names[j].startswith(("Mass", "marker", "Suspicious")) for j in range(4, 9))
    body = to_json(atlas)
    json.dumps(body, allow_nan=False)  # strict JSON
    assert body["label_order"][:2] == ["Mass", "No_Finding"]  # findings first, then the marker


def test_any_boxed_attribute_is_named_and_flagged_like_the_phantom_marker() -> None:
    """Attributes come from the data: a label whose images carry boxes of it (here `implant`,
    not the phantom's `confounder`) is an attribute; a 0/1 label without boxes is not."""
    rng = np.random.default_rng(1)
    n = 40
    implant = (np.arange(n) % 3 == 0).astype(int)
    user = (np.arange(n) % 2 == 0).astype(int)
    table = pd.DataFrame(
        {
            "image_labels": [
                {"Mass": int(i % 5 == 0), "implant": int(implant[i]), "user_flag": int(user[i])}
                for i in range(n)
            ],
            "boxes": [[["implant", 1.0, 1.0, 9.0, 9.0]] if implant[i] else [] for i in range(n)],
        }
    )
    labels, _ = image_labels(table, np.arange(n))
    assert {lab.name for lab in labels if lab.attribute} == {"implant"}
    mean = np.zeros((n, 3))
    mean[:, 0] = implant * rng.uniform(1, 2, n)
    mean[:, 1] = user * rng.uniform(1, 2, n)
    mean[:, 2] = rng.uniform(0, 1, n)
    atlas = build_atlas(sp.csr_matrix(mean), labels, n_clusters=0, progress=False)
    assert atlas.names[0].startswith("marker (implant) (AUROC 1.00)"), atlas.names[0]
    assert atlas.flags[0] == ["confounder"]
    assert atlas.names[1].startswith("user_flag + (AUROC 1.00)") and atlas.flags[1] == []
    assert to_json(atlas)["label_order"] == ["Mass", "implant", "user_flag"]


@pytest.fixture(scope="module")
def atlas_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny store, SAE and classifier (as tests/test_report.py), and `mammo-sae atlas` on it."""
    from mammo_sae.activations.store import write_store
    from mammo_sae.data.records import ImageRecord
    from mammo_sae.models.checkpoints import save_model
    from mammo_sae.models.classifier import ConceptClassifier
    from mammo_sae.models.registry import create_encoder
    from mammo_sae.sae.checkpoints import save_sae
    from mammo_sae.sae.model import SAEConfig, SparseAutoencoder

    root = tmp_path_factory.mktemp("atlas")
    rng = np.random.default_rng(0)
    recs, acts = [], []
    for i in range(12):
        mass = int(i % 2 == 0)
        recs.append(
            ImageRecord(
                image_id=f"im{i}",
                patient_id=f"p{i}",
                split="test",
                path=None,
                labels={"Mass": mass, "density": i % 4, "confounder": int(i % 3 == 0)},
                view="CC" if i % 4 < 2 else "MLO",
                laterality="L" if i < 6 else "R",
                frame_hw=(64, 48),
            )
        )
        a = rng.random((12, 640), dtype=np.float32)
        a[4, :64] += 2.0 * mass
        acts.append(a)
    write_store(root / "store", acts, grids=[(4, 3)] * 12, records=recs)
    save_sae(SparseAutoencoder(SAEConfig(d=640, h=32), seed=0), root / "sae")
    save_model(
        ConceptClassifier(create_encoder("efficientnet-phantom"), 1, concept="Mass"),
        root / "clf" / "model",
    )
    assert (
        main(
            [
                "atlas",
                "--store",
                str(root / "store"),
                "--sae",
                str(root / "sae"),
                "--out",
                str(root / "out"),
                "--classifiers",
                str(root / "clf" / "model"),
                "--clusters",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    return root


def test_atlas_cli_writes_csv_and_json(atlas_run: Path) -> None:
    table = pd.read_csv(atlas_run / "out" / "atlas.csv")
    body = json.loads((atlas_run / "out" / "atlas.json").read_text())
    assert len(table) == 32 and list(table["latent"]) == list(range(32))
    for col in (
        "name",
        "flags",
        "firing_rate",
        "entropy",
        "Mass_auroc",
        "Mass_q",
        "density_rho",
        "view_auroc",
        "laterality_auroc",
        "confounder_auroc",
        "com_down",
        "border_fraction",
        "logit_clf",
        "cluster",
    ):
        assert col in table.columns, col
    assert body["schema_version"] == 1 and body["models"] == ["clf"] and len(body["latents"]) == 32
    active = table["firing_rate"] > 0
    assert table.loc[active, "com_down"].between(0, 1).all()  # the summaries' spatial sums
    assert table.loc[~active, "name"].eq("dead (never active)").all()


def test_atlas_cli_refuses_a_split_the_store_lacks(
    atlas_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "atlas",
                "--store",
                str(atlas_run / "store"),
                "--sae",
                str(atlas_run / "sae"),
                "--out",
                str(atlas_run / "bad"),
                "--split",
                "training",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "split 'training' is not in the store" in capsys.readouterr().err
    assert not (atlas_run / "bad").exists()


def test_pipeline_runs_the_atlas_after_the_analyses_and_before_the_report(tmp_path: Path) -> None:
    from mammo_sae.layout import stage
    from mammo_sae.pipeline import Pipeline, load_pipeline_config

    names = Pipeline(load_pipeline_config("phantom.yaml"), tmp_path).runner.names()
    final = [n for n in names if "@" not in n]  # the demo also taps an earlier layer
    assert final.index("separation") < final.index("atlas") == final.index("report") - 1
    assert names.index("atlas") < names.index("report")
    assert "atlas" in stage("report").deps and stage("atlas").deps == ("summaries",)


# --------------------------------------------------------------------------- the Atlas page
def _atlas_page(tmp_path: Path, n: int = 250) -> Path:
    """atlas.html from a report builder with only an atlas stage output (no models)."""
    from mammo_sae.report.build import build_report

    rng = np.random.default_rng(0)
    names = ["Mass + (AUROC 0.93) · upper" if j == 7 else "unexplained" for j in range(n)]
    latents = [
        {
            "latent": j,
            "name": names[j],
            "flags": [],
            "cluster": j % 5,
            "firing_rate": float(rng.random()),
            "mean_activation": 0.1,
            "max_activation": 1.0,
            "entropy": 0.5,
            "off_breast": None,
            "border_fraction": 0.1,
            "com_down": 0.2,
            "com_across": 0.5,
            "logit_m": float(j),
            "associations": [
                {
                    "label": "Mass",
                    "stat": "auroc",
                    "value": 0.93 if j == 7 else 0.5,
                    "q": 0.001 if j == 7 else 0.9,
                    "named": j == 7,
                }
            ],
        }
        for j in range(n)
    ]
    run = tmp_path / "run"
    (run / "analysis" / "atlas").mkdir(parents=True)
    (run / "config.yaml").write_text("name: t\n")
    (run / "analysis" / "atlas" / "atlas.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "config": {"alpha": 0.05},
                "split": "training",
                "n_images": 9,
                "labels": [{"name": "Mass", "kind": "binary"}],
                "latents": latents,
                "clusters": [],
            }
        )
    )
    index = build_report(run, strict=True, progress=False)
    assert 'href="atlas.html"' in index.read_text()
    return index.parent / "atlas.html"


def test_atlas_page_is_offline_and_its_script_pages_searches_and_sorts(tmp_path: Path) -> None:
    page = _atlas_page(tmp_path)
    text = page.read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", text)  # nothing from the network
    if shutil.which("node") is None:
        pytest.skip("the page's script logic runs under node; node is not installed")
    data = re.search(r'id="atlas-data">(.*?)</script>', text, re.S).group(1)
    script = re.findall(r"<script>(.*?)</script>", text, re.S)[-1]
    probe = (
        f"{script}\nvar D = {data};\nconsole.log(JSON.stringify(["
        "atlasView(D, {q: '7', sort: 'latent'}).rows.map(r => r[0]),"
        "atlasView(D, {q: 'mass', sort: 'latent'}).rows.map(r => r[0]),"
        "atlasView(D, {sort: 'logit_m', desc: true}).rows[0][0],"
        "atlasView(D, {sort: 'latent', page: 2}),"
        "atlasView(D, {label: 'Mass', sort: 'latent'}).total]));"
    )
    out = subprocess.run(
        ["node", "-e", probe], capture_output=True, text=True, timeout=60, check=True
    )
    by_id, by_name, top, third, by_label = json.loads(out.stdout)
    assert by_id == [7] and by_name == [7] and top == 249 and by_label == 1
    assert third["pages"] == 3 and third["total"] == 250 and len(third["rows"]) == 50


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless test needs chromium (`command -v chromium`)")
def test_atlas_page_in_headless_chromium(tmp_path: Path) -> None:
    """Types a latent id into the search box, sorts by a column, follows the latent link."""
    page = _atlas_page(tmp_path)
    (page.parent / "latents").mkdir(exist_ok=True)
    (page.parent / "latents" / "7.html").write_text(
        "<html><body><h1 id='t'>Latent 7</h1></body></html>"
    )
    text = page.read_text().replace('"pages":[]', '"pages":[7]')
    driver = (
        "<script>(function(){var s=document.getElementById('atlas-search');s.value='7';"
        "s.dispatchEvent(new Event('input'));"
        "var ids=[].map.call(document.querySelectorAll('#atlas-body tr'),r=>r.dataset.latent);"
        "s.value='';s.dispatchEvent(new Event('input'));"
        "document.querySelector('th[data-col=logit_m]').click();"
        "var first=document.querySelector('#atlas-body tr').dataset.latent;"
        "s.value='7';s.dispatchEvent(new Event('input'));"
        "var link=document.querySelector('a.latent-link').getAttribute('href');"
        "var pre=document.createElement('pre');pre.id='result';"
        "pre.textContent=JSON.stringify({ids:ids,first:first,link:link});"
        "document.body.appendChild(pre);})();</script></body>"
    )
    test_page = page.parent / "atlas_test.html"
    test_page.write_text(text.replace("</body>", driver, 1))
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", test_page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    result = json.loads(
        re.search(r'<pre id="result">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"')
    )
    assert result == {"ids": ["7"], "first": "249", "link": "latents/7.html"}
    latent = subprocess.run(
        [*common, "--dump-dom", (page.parent / result["link"]).resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "Latent 7" in latent
    shot = tmp_path / "atlas.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1280,900", page.resolve().as_uri()],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert shot.stat().st_size > 1000


def test_cell_positions_are_breast_relative_and_mirrored_for_right_breasts() -> None:
    """The summaries' centre-of-mass weights: 0..1 over the breast cells' extent, measured from
    the chest wall (left edge for L, right edge for R); the border ring is the grid's edge."""
    from mammo_sae.analysis.summaries import _cell_positions

    rows, cols = np.divmod(np.arange(12), 3)  # a 4 × 3 grid, row-major
    tissue = np.where((rows >= 1) & (rows <= 2) & (cols <= 1), 1.0, 0.0).astype(np.float32)
    border, across, down = _cell_positions(rows, cols, (4, 3), tissue, right=False)
    assert border.sum() == 10 and not border[4] and not border[7]
    assert across[[3, 4]] == pytest.approx([0.25, 0.75]) and across[5] == 1.0  # clipped
    assert down[[3, 6]] == pytest.approx([0.25, 0.75]) and down[0] == 0.0
    _, across_r, _ = _cell_positions(rows, cols, (4, 3), tissue, right=True)
    assert across_r == pytest.approx(1.0 - across)
