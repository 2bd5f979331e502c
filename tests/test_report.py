"""`mammo-sae report` on a small fabricated run directory.

The run holds real (tiny) artefacts where the report opens them itself (two activation stores,
an SAE, two phantom-architecture classifiers, PNG mammograms) and analysis outputs made by the
real commands (fidelity, intervene, atlas), by the analysis library functions (localisation,
separation) or written in their documented JSON layouts (rankings, the SAE training log).
Headless Chromium renders the page when it is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mammo_sae.activations.store import ActivationStore, write_store
from mammo_sae.analysis import DEFAULT_THRESHOLD
from mammo_sae.analysis.intervene import head_from_classifier
from mammo_sae.analysis.localize import localize
from mammo_sae.analysis.separation import model_separation, public
from mammo_sae.analysis.summaries import labelled_rows, sae_hash, summarize
from mammo_sae.cli import main
from mammo_sae.data.records import Box, ImageRecord
from mammo_sae.errors import MammoSaeError
from mammo_sae.io import write_json
from mammo_sae.models.checkpoints import save_model
from mammo_sae.models.classifier import ConceptClassifier
from mammo_sae.models.registry import create_encoder
from mammo_sae.report.build import build_report
from mammo_sae.sae.checkpoints import save_sae
from mammo_sae.sae.model import SAEConfig, SparseAutoencoder

FRAME = (128, 96)
GRID = (4, 3)
D, H = 640, 32  # efficientnet-phantom's channels; a small SAE
N_TEST, N_TRAIN = 10, 2
CHROMIUM = Path("/usr/bin/chromium")
KS = (0, 1, 5, 10, 32)
MODELS = (("Mass-pretrained", "pretrained"), ("Mass-finetuned", "Mass-finetuned"))


def _records(data_dir: Path) -> list[ImageRecord]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(N_TEST + N_TRAIN):
        path = data_dir / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, FRAME, dtype=np.uint8)).save(path)
        mass = int(i % 2 == 0)
        marker = int(i % 3 == 0)
        boxes = (Box("Mass", 32.0, 32.0, 64.0, 64.0),) if mass else ()
        # The marker is boxed, as the phantom boxes it: that makes it an attribute of the data.
        boxes += (Box("confounder", 4.0, 4.0, 20.0, 20.0),) if marker else ()
        out.append(
            ImageRecord(
                image_id=f"hash{i:03d}",
                patient_id=f"patient{i}",
                split="test" if i < N_TEST else "training",
                path=path,
                labels={"Mass": mass, "confounder": marker},
                boxes=boxes,
                frame_hw=FRAME,
            )
        )
    return out


def _acts(seed: int, records: list[ImageRecord]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    acts = []
    for r in records:
        a = rng.random((GRID[0] * GRID[1], D), dtype=np.float32)
        if r.labels["Mass"]:
            a[4, :64] += 2.0  # the Mass cell lights up a block of channels
        acts.append(a)
    return acts


def _tiny_png(path: Path) -> None:
    """A stand-in for a stage's figure (drawing the real ones costs seconds)."""
    Image.fromarray(np.tile(np.arange(0, 250, 10, dtype=np.uint8), (20, 1))).save(path)


def make_run(run: Path) -> Path:
    """A complete small run directory (see the module docstring)."""
    (run / "data").mkdir(parents=True)
    records = _records(run / "data")
    (run / "config.yaml").write_text("name: tiny\nseed: 0\nextract:\n  eval_split: test\n")
    for k, stage in enumerate(
        (
            "data",
            "models",
            "extract",
            "sae",
            "probe",
            "intervene",
            "fidelity",
            "localize",
            "separation",
        )
    ):
        write_json(
            run / "stages" / f"{stage}.json",
            {
                "schema_version": 1,
                "stage": stage,
                "key": f"{k:016x}",
                "seconds": 1.5 * k,
                "outputs": {},
            },
        )
    write_json(
        run / "data" / "summary.json",
        {
            "schema_version": 1,
            "splits": {
                "all": {
                    "images": len(records),
                    "patients": len(records),
                    "positives": {"image": {"Mass": 6}},
                }
            },
            "missing_images": {"count": 1, "first": ["images_png/patient7/x.png"]},
        },
    )

    sae = SparseAutoencoder(SAEConfig(d=D, h=H), seed=0)
    save_sae(sae, run / "sae" / "model")
    log = [
        {
            "step": s,
            "loss": 1.0 / s,
            "fvu": 0.5 / s,
            "l0": 10 + s,
            "dead_fraction": 0.01 * s,
            "patches_per_s": 1000.0 + s,
        }
        for s in range(1, 21)
    ]
    (run / "sae" / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    write_json(
        run / "sae" / "train_config.json", {"schema_version": 1, "dead_window_patches": 1000}
    )

    torch.manual_seed(0)
    entries, metrics, results = [], {}, {}
    ranked: dict[str, list[int]] = {}
    for (name, key), seed in zip(MODELS, (2, 3), strict=True):
        clf = ConceptClassifier(create_encoder("efficientnet-phantom"), 1, concept="Mass")
        save_model(clf, run / "models" / name / "model")
        entries.append(
            {
                "name": name,
                "concept": "Mass",
                "variant": name.split("-")[1],
                "classifier": str(run / "models" / name / "model"),
                "encoder_key": key,
            }
        )
        metrics[name] = {
            "auroc": {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9},
            "auprc": {"value": 0.6, "ci_low": 0.5, "ci_high": 0.7},
            "n": N_TEST,
            "n_pos": 5,
        }
        store = write_store(
            run / "stores" / f"{key}-test",
            _acts(seed, records),
            grids=[GRID] * len(records),
            records=records,
        )
        sums = summarize(
            store,
            sae,
            store_sha=store.manifest_sha256,
            sae_sha=sae_hash(run / "sae" / "model"),
            cache_dir=run / "analysis" / "summaries",
            progress=False,
        )  # as the pipeline does
        rows, y = labelled_rows(store.images, "Mass", split="test")
        head = head_from_classifier(clf)
        results[name.split("-")[1]] = model_separation(sums, rows, y)  # the pipeline names variants
        mean1 = np.asarray(sums.mean_rows(rows[y == 1]).mean(axis=0)).ravel()
        order = np.argsort(-mean1, kind="stable")
        write_json(
            run / "analysis" / "probe" / name / "ranking_class=1_centered.json",
            [
                {"rank": r, "index": int(j), "importance": float(mean1[j])}
                for r, j in enumerate(order)
            ],
        )
        loc = localize(
            store,
            sae,
            "Mass",
            [int(j) for j in order[:3]],
            head=head,
            chance_draws=3,
            progress=False,
        )
        out = run / "analysis" / "localize" / name
        write_json(out / "localization.json", loc.to_json())
        _tiny_png(out / "figure3.png")
        ranked[name] = [int(j) for j in order[:3]]
        if name == "Mass-finetuned":  # pointing-chosen: one of the other model's, one of its own
            chosen = [ranked["Mass-pretrained"][0], int(order[5])]
            loc = localize(store, sae, "Mass", chosen, head=head, progress=False)
            write_json(out / "pointing" / "localization.json", loc.to_json())
    # Table 1 and Figure 2's inputs, by the real commands (as the pipeline's stages run them).
    common = ["--sae", str(run / "sae" / "model"), "--split", "test", "--n-boot", "50"]
    common += ["--cache-dir", str(run / "analysis" / "summaries"), "--no-progress"]
    stores = [str(run / "stores" / f"{key}-test") for _, key in MODELS]
    classifiers = [str(run / "models" / name / "model") for name, _ in MODELS]
    fidelity_args = ["fidelity", "--stores", ",".join(stores), "--classifiers"]
    fidelity_args += [",".join(classifiers), "--names", ",".join(n for n, _ in MODELS)]
    assert main([*fidelity_args, "--out", str(run / "analysis" / "fidelity"), *common]) == 0
    for (name, _), store_dir, classifier in zip(MODELS, stores, classifiers, strict=True):
        out = run / "analysis" / "intervene" / name
        intervene_args = ["intervene", "--store", store_dir, "--classifier", classifier]
        intervene_args += ["--rank-split", "test", "--ks", ",".join(map(str, KS))]
        assert main([*intervene_args, "--out", str(out), *common]) == 0
    write_json(
        run / "models" / "models.json",
        {"schema_version": 1, "models": entries, "test_metrics": metrics},
    )
    sep = run / "analysis" / "separation" / "Mass"
    write_json(
        sep / "separation.json",
        {"schema_version": 1, "models": {k: public(v) for k, v in results.items()}},
    )
    _tiny_png(sep / "figure4.png")
    # The atlas stage's output, by the real command: the report's Atlas page writes latent pages
    # for its top latents through the same builder as Table 2's.
    atlas_args = ["atlas", "--store", str(run / "stores" / f"{MODELS[0][1]}-test")]
    atlas_args += ["--sae", str(run / "sae" / "model"), "--out", str(run / "analysis" / "atlas")]
    assert main([*atlas_args, "--split", "test", "--clusters", "2", "--no-progress"]) == 0
    return run


@pytest.fixture(scope="module")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    run = make_run(tmp_path_factory.mktemp("report") / "run")

    def cache() -> list[tuple[str, int]]:
        return sorted(
            (p.name, p.stat().st_mtime_ns) for p in (run / "analysis" / "summaries").iterdir()
        )

    cached = cache()
    index = build_report(run, strict=True, top_latents=2, progress=False)
    assert cache() == cached  # the summaries stage's cache is reused, not recomputed
    return run, index


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img" and a.get("src"):
            self.srcs.append(a["src"] or "")
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"] or "")


def _links(page: Path) -> _Images:
    parser = _Images()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_report_shows_every_section_with_its_numbers(report_run: tuple[Path, Path]) -> None:
    run, index = report_run
    assert index == run / "report" / "index.html"
    text = index.read_text(encoding="utf-8")
    data = json.loads((run / "report" / "report.json").read_text())
    assert data["problems"] == {}
    # Table 1: one row per model with the original and SAE AUROC of the fidelity files.
    fid = json.loads((run / "analysis" / "fidelity" / "fidelity.json").read_text())["results"][
        "Mass-finetuned"
    ]
    row = next(r for r in data["table1"] if r["model"] == "Mass-finetuned")
    assert row["auroc_original"] == pytest.approx(fid["original"]["auroc"])
    assert row["auroc_sae"] == pytest.approx(fid["sae"]["auroc"])
    assert row["fvu"] == pytest.approx(fid["fvu"])
    assert f"{fid['sae']['auroc']:.3f}" in text
    head = {r["model"]: r for r in data["headlines"]}
    assert head["Mass-finetuned"]["auroc_sae"] == pytest.approx(fid["sae"]["auroc"])
    assert head["Mass-finetuned"]["auroc_test"] == pytest.approx(0.8)
    # Figure 2 from both sweeps, Table 2 with the localised latents, separation per model.
    assert set(data["figure2"]) == {"Mass-pretrained", "Mass-finetuned"}
    for name in data["figure2"]:
        assert data["figure2"][name]["on"]["ks"] == list(KS) == data["figure2"][name]["off"]["ks"]
    csv = pd.read_csv(run / "analysis" / "intervene" / "Mass-finetuned" / "intervene.csv")
    assert data["figure2"]["Mass-finetuned"]["off"]["auroc"] == pytest.approx(
        csv[csv["mode"] == "off"]["auroc"].tolist()
    )
    loc = json.loads(
        (run / "analysis" / "localize" / "Mass-pretrained" / "localization.json").read_text()
    )
    assert [r["latent"] for r in data["table2"]["Mass-pretrained"]["latents"]] == [
        r["latent"] for r in loc["latents"]
    ]
    assert {r["model"] for r in data["separation"]["Mass"]} == {"pretrained", "finetuned"}
    assert all(np.isfinite(r["separation"]) for r in data["headlines"])
    assert [s["stage"] for s in data["run"]["stages"]][:3] == ["data", "models", "extract"]
    assert not re.search(r"patient\d", text)  # no patient identifiers, only hashed image ids
    assert data["dataset"] == [{"split": "all", "images": 12, "patients": 12, "Mass +": 6}]
    assert not re.search(r"patient\d", (run / "report" / "report.json").read_text())
    for fig in ("figure2_topk.png", "sae_training.png"):
        assert f"figures/{fig}" in data["figures"]


def test_latent_pages_link_and_hold_their_parts(report_run: tuple[Path, Path]) -> None:
    run, index = report_run
    data = json.loads((run / "report" / "report.json").read_text())
    latents = data["latents"]
    top = {j for lats in data["top_latents"].values() for j in lats}
    assert {int(j) for j in latents} == top and len(top) >= 2
    hrefs = _links(index).hrefs
    for j, info in latents.items():
        assert f"latents/{j}.html" in hrefs
        page = run / "report" / "latents" / f"{j}.html"
        html = page.read_text(encoding="utf-8")
        assert not re.search(r"patient\d", html)
        assert len(info["logit_effect"]) == 2 and np.isfinite(info["logit_effect"][0]["v"])
        for mine in info["models"].values():
            assert [r["concept"] for r in mine["association"]] == ["Mass", "confounder"]
            if mine.get("top_images"):
                acts = [t["mean_activation"] for t in mine["top_images"]]
                assert acts == sorted(acts, reverse=True)
            # Boxes drawn at the threshold the localize stage recorded (the library default,
            # relmax:0.3), not the p95 that files without a recorded threshold fall back to.
            assert mine["threshold"] == DEFAULT_THRESHOLD and mine["from_localize"]
        for src in _links(page).srcs:
            assert (page.parent / src).is_file(), src


def _model_mean_activations(run: Path, key: str, j: int) -> dict[str, float]:
    """Per-image mean activation of latent j in the summaries of store `<key>-test`."""
    from mammo_sae.analysis.summaries import summaries_for

    sums = summaries_for(
        run / "stores" / f"{key}-test",
        run / "sae" / "model",
        cache_dir=run / "analysis" / "summaries",
        progress=False,
    )
    ids = [r.image_id for r in ActivationStore(run / "stores" / f"{key}-test").records()]
    act = np.asarray(sums.mean_nh[:, j].toarray()).ravel()
    return dict(zip(ids, act.tolist(), strict=True))


def test_latent_pages_show_each_model_that_lists_the_latent(report_run: tuple[Path, Path]) -> None:
    """A latent listed by both models (pretrained's #1, chosen by finetuned's pointing game)
    gets a section per model, each through that model's own store; a latent only the finetuned
    model lists is not shown through the pretrained one (the first model of the run)."""
    run, _ = report_run
    data = json.loads((run / "report" / "report.json").read_text())
    lists = data["top_latents"]
    assert set(lists) == {"Mass-pretrained", "Mass-finetuned", "Mass-finetuned/pointing"}
    shared = lists["Mass-finetuned/pointing"][0]
    assert shared == lists["Mass-pretrained"][0]
    info = data["latents"][str(shared)]
    assert set(info["models"]) == {"Mass-pretrained", "Mass-finetuned"}
    assert info["listed_by"]["Mass-finetuned"]["Mass-finetuned/pointing"] == 1
    html = (run / "report" / "latents" / f"{shared}.html").read_text(encoding="utf-8")
    assert "Through Mass-pretrained" in html and "Through Mass-finetuned" in html
    for model, key in MODELS:
        own = _model_mean_activations(run, key, shared)
        for t in info["models"][model]["top_images"]:
            assert t["mean_activation"] == pytest.approx(own[t["image_id"]], rel=1e-5)
    only_finetuned = [
        j
        for label, lats in lists.items()
        if label.startswith("Mass-finetuned")
        for j in lats
        if j not in lists["Mass-pretrained"]
    ]
    assert only_finetuned
    for j in only_finetuned:
        assert set(data["latents"][str(j)]["models"]) == {"Mass-finetuned"}
        html = (run / "report" / "latents" / f"{j}.html").read_text(encoding="utf-8")
        assert "Through Mass-pretrained" not in html


class _Layout(HTMLParser):
    """Section ids, the index's anchors, figure images and the links around them, and the
    patch-crop strips of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.index: list[str] = []
        self.figure_imgs: list[tuple[str, str | None]] = []  # (img src, enclosing link href)
        self.strips: list[list[str]] = []
        self.stack: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("id"):
            self.sections.append(a["id"] or "")
        in_index = any(t == "nav" and "toc" in (b.get("class") or "") for t, b in self.stack)
        if tag == "a" and in_index:
            self.index.append(a.get("href") or "")
        if tag == "div" and a.get("class") == "crops":
            self.strips.append([])
        if tag == "img" and any(t == "figure" for t, _ in self.stack):
            href = next((b.get("href") for t, b in reversed(self.stack) if t == "a"), None)
            self.figure_imgs.append((a.get("src") or "", href))
            if any(t == "div" and b.get("class") == "crops" for t, b in self.stack):
                self.strips[-1].append(a.get("src") or "")
        if tag not in ("img", "meta", "br", "link"):
            self.stack.append((tag, a))

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            if self.stack.pop()[0] == tag:
                break


def _layout(page: Path) -> _Layout:
    parser = _Layout()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_pages_have_a_section_index_and_full_size_figure_links(
    report_run: tuple[Path, Path],
) -> None:
    run, index = report_run
    pages = [index, *sorted((run / "report" / "latents").glob("*.html"))]
    for page in pages:
        layout = _layout(page)
        assert layout.sections and len(set(layout.sections)) == len(layout.sections), page
        # The sticky index links every section of the page, in order, and nothing else local.
        assert [h[1:] for h in layout.index if h.startswith("#")] == layout.sections, page
        assert layout.figure_imgs, page
        for src, href in layout.figure_imgs:  # a click opens the PNG itself, full size
            assert href == src and (page.parent / src).is_file(), (page, src)
    # Figures take the page's width (no fixed-width figures on the report page).
    text = index.read_text(encoding="utf-8")
    assert "position:sticky" in text and '<figure style="width' not in text
    # Every per-model figure grid folds: Figure 3 grids, separation figures, latent images.
    for name in ("figure3_Mass-pretrained_figure3.png", "separation_Mass_figure4.png"):
        at = text.index(f"figures/{name}")
        assert text.rfind("<details", 0, at) > text.rfind("</details>", 0, at), name


def test_latent_pages_show_top_patch_crops(report_run: tuple[Path, Path]) -> None:
    from mammo_sae.report.latents import TOP_PATCHES, crop_window

    assert crop_window(5.0, 64, 128) == (0, 64) and crop_window(120.0, 64, 128) == (64, 128)
    assert crop_window(60.0, 64, 128) == (28, 92) and crop_window(10.0, 64, 40) == (0, 40)
    run, _ = report_run
    data = json.loads((run / "report" / "report.json").read_text())
    for j, info in data["latents"].items():
        page = run / "report" / "latents" / f"{j}.html"
        strips = _layout(page).strips
        assert len(strips) == len(info["models"]), j  # one strip per model section
        for strip, (model, mine) in zip(strips, info["models"].items(), strict=True):
            patches = mine["top_patches"]
            peak = _model_max_activations(run, dict(MODELS)[model], int(j))
            active = sum(peak[f"hash{i:03d}"] > 0 for i in range(N_TEST))  # the test split's
            assert len(strip) == len(patches) == min(TOP_PATCHES, active) > 0
            for src in strip:
                crop = page.parent / src
                assert crop.is_file(), src
                with Image.open(crop) as im:  # two cell strides of the 128x96 frame's 4x3 grid
                    assert im.size == (2 * FRAME[1] // GRID[1], 2 * FRAME[0] // GRID[0])
            acts = [p["activation"] for p in patches]
            assert acts == sorted(acts, reverse=True) and acts[0] > 0
            for p in patches:  # the crop's cell is the image's strongest: its summary max
                assert p["activation"] == pytest.approx(peak[p["image_id"]], rel=1e-4)
                r, c = p["cell"]  # synthetic store: no architecture, cells laid evenly
                assert p["centre_yx"] == pytest.approx(
                    [(r + 0.5) * FRAME[0] / GRID[0] - 0.5, (c + 0.5) * FRAME[1] / GRID[1] - 0.5]
                )
            assert f"{acts[0]:.3g}" in page.read_text(encoding="utf-8")


def _model_max_activations(run: Path, key: str, j: int) -> dict[str, float]:
    from mammo_sae.analysis.summaries import summaries_for

    sums = summaries_for(
        run / "stores" / f"{key}-test",
        run / "sae" / "model",
        cache_dir=run / "analysis" / "summaries",
        progress=False,
    )
    ids = [r.image_id for r in ActivationStore(run / "stores" / f"{key}-test").records()]
    return dict(zip(ids, np.asarray(sums.max_nh[:, j].toarray()).ravel().tolist(), strict=True))


class _Table2Cells(HTMLParser):
    """Links inside the table cells of the report's localisation section."""

    def __init__(self) -> None:
        super().__init__()
        self.section: str | None = None
        self.in_td = False
        self.hrefs: list[str] = []
        self.headers: list[str] = []
        self.in_th = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id")
        self.in_td = self.in_td or tag == "td"
        self.in_th = self.in_th or tag == "th"
        if tag == "a" and self.in_td and self.section == "localize":
            self.hrefs.append(a.get("href") or "")

    def handle_endtag(self, tag: str) -> None:
        self.in_td = self.in_td and tag != "td"
        self.in_th = self.in_th and tag != "th"

    def handle_data(self, data: str) -> None:
        if self.in_th and self.section == "localize":
            self.headers.append(data)


def test_latent_pages_are_the_same_drawn_by_one_or_two_processes(
    report_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """Forked page workers change only the speed: same pages, figures (bytes), page records and
    problem notes as one process, including notes raised inside a worker."""
    run, _ = report_run
    broken = tmp_path / "broken"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("report"))
    models_json = broken / "models" / "models.json"
    models = json.loads(models_json.read_text())
    for entry in models["models"]:  # a classifier that is not there: the logit part fails
        entry["classifier"] = str(broken / "models" / "missing" / "model")
    models_json.write_text(json.dumps(models))
    for source in (run, broken):
        outs = {}
        for workers in (1, 2):
            out = tmp_path / f"{source.name}-{workers}"
            build_report(source, out, top_latents=2, progress=False, workers=workers)
            outs[workers] = out
        one, two = outs[1], outs[2]
        pages = sorted(p.name for p in (one / "latents").glob("*.html"))
        assert pages and pages == sorted(p.name for p in (two / "latents").glob("*.html"))
        for name in pages:
            assert (one / "latents" / name).read_text() == (two / "latents" / name).read_text()
        figures = sorted(p.name for p in (one / "figures").glob("latent_*.png"))
        assert figures == sorted(p.name for p in (two / "figures").glob("latent_*.png"))
        for name in figures:
            assert (one / "figures" / name).read_bytes() == (two / "figures" / name).read_bytes()
        data = [json.loads((o / "report.json").read_text()) for o in (one, two)]
        for key in ("latents", "problems", "figures"):
            assert data[0][key] == data[1][key], key
        if source is broken:
            assert any(k.startswith("latent ") for k in data[1]["problems"])


def test_every_table2_cell_links_to_its_latent_page(report_run: tuple[Path, Path]) -> None:
    run, index = report_run
    data = json.loads((run / "report" / "report.json").read_text())
    parser = _Table2Cells()
    parser.feed(index.read_text(encoding="utf-8"))
    cells = {label: [r["latent"] for r in e["latents"]] for label, e in data["table2"].items()}
    assert "Mass-finetuned/pointing" in cells
    want = [f"latents/{j}.html" for lats in cells.values() for j in lats]
    assert sorted(h for h in parser.hrefs if h.startswith("latents/")) == sorted(want)
    for href in want:
        assert (index.parent / href).is_file(), href
    # Baselines beside the latents, with the values the localize stage recorded.
    assert {"chance", "classifier map", "oracle (predicted size)"} <= set(parser.headers)
    for entry in data["table2"].values():
        assert "classifier_map" in entry["baselines"] and "oracle" in entry["baselines"]
    assert data["table2"]["Mass-pretrained"]["baselines"]["chance"]["draws"] == 3
    text = index.read_text(encoding="utf-8")
    assert "ending in /pointing" in text and "<details" in text
    # Each table says which run files it comes from, and the links resolve.
    sources = [h for h in _links(index).hrefs if h.startswith("../")]
    for name in (
        "fidelity/fidelity.json",
        "localize/Mass-finetuned/pointing/localization.json",
        "models/models.json",
        "separation/Mass/separation.json",
        "train_log.jsonl",
    ):
        assert any(h.endswith(name) for h in sources), name
    for href in sources:
        assert (index.parent / href).is_file(), href


def test_recovered_is_shown_only_above_chance(report_run: tuple[Path, Path]) -> None:
    from mammo_sae.report.build import recovered_shown

    row = {"auroc_original": 0.52, "auroc_original_low": 0.45, "recovered": -0.7}
    assert np.isnan(recovered_shown(row))
    assert recovered_shown({**row, "auroc_original_low": 0.51}) == -0.7
    assert recovered_shown({"auroc_original": 0.65, "recovered": 0.9}) == 0.9
    assert np.isnan(recovered_shown({"auroc_original": 0.58, "recovered": 0.9}))
    run, index = report_run
    data = json.loads((run / "report" / "report.json").read_text())
    for r in data["table1"]:
        shown = r["recovered_shown"]
        assert (
            (shown == r["recovered"])
            if r["auroc_original_low"] > 0.5
            else shown is None or np.isnan(shown)
        )
    text = index.read_text(encoding="utf-8")
    assert "lower end of its 95 % CI" in text and "linear probe" in text
    assert "Separation index = the mean" in text and "dead_window_patches" in text


def test_report_of_a_partial_run_notes_what_did_not_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "config.yaml").write_text("name: partial\n")
    for stale in (run / "report" / "latents" / "999.html", run / "report" / "figures" / "old.png"):
        stale.parent.mkdir(parents=True)
        stale.write_text("from an earlier build")
    index = build_report(run, progress=False)
    assert not (run / "report" / "latents" / "999.html").exists()
    assert not (run / "report" / "figures" / "old.png").exists()
    text = index.read_text(encoding="utf-8")
    assert text.count("not run") >= 5
    data = json.loads((run / "report" / "report.json").read_text())
    assert "fidelity" in data["run"]["not_run"] and data["problems"] == {}


def test_corrupt_input_is_noted_or_raised_when_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    (run / "analysis" / "fidelity").mkdir(parents=True)
    (run / "analysis" / "fidelity" / "fidelity.json").write_text("{not json")
    index = build_report(run, progress=False)
    data = json.loads((run / "report" / "report.json").read_text())
    assert "corrupt JSON" in data["problems"]["table1"]
    assert "could not be built" in index.read_text()
    from mammo_sae.cli import main

    assert main(["report", "--run", str(run), "--no-progress"]) == 0
    assert "warning: 1 part(s) of the run could not be read" in capsys.readouterr().err
    with pytest.raises(MammoSaeError, match="corrupt JSON"):
        build_report(run, strict=True, progress=False)
    with pytest.raises(MammoSaeError, match="run directory not found"):
        build_report(tmp_path / "missing")


def test_cli_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    # An empty folder is not a run: refused with a message instead of an empty report.
    assert main(["report", "--run", str(run), "--no-progress"]) == 2
    assert "not a mammo-sae run directory" in capsys.readouterr().err
    (run / "config.yaml").write_text("name: empty\n")  # a run that has not got far: still reported
    assert main(["report", "--run", str(run), "--out", str(tmp_path / "web"), "--no-progress"]) == 0
    assert (tmp_path / "web" / "index.html").is_file()
    assert str(tmp_path / "web" / "index.html") in capsys.readouterr().out
    assert main(["report", "--run", str(tmp_path / "nope")]) == 2


@pytest.mark.skipif(
    not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None,
    reason="headless render needs Debian's chromium at /usr/bin/chromium",
)
def test_report_renders_in_headless_chromium(report_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, index = report_run
    parser = _links(index)
    assert parser.srcs, "the report shows no figures"
    for src in parser.srcs:
        assert not src.startswith(("http:", "https:", "//")), src
        assert (index.parent / src).is_file(), src
    shot = tmp_path / "shot.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        index.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 10.0, "screenshot is blank"
    # Follow a Table 2 cell's link (what a click does) and render the latent page it opens.
    cells = _Table2Cells()
    cells.feed(index.read_text(encoding="utf-8"))
    target = (index.parent / cells.hrefs[0]).resolve()
    assert target.is_file()
    page_shot = tmp_path / "latent_page.png"
    cmd[cmd.index(f"--screenshot={shot}")] = f"--screenshot={page_shot}"
    cmd[-1] = target.as_uri()
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    pixels = np.asarray(Image.open(page_shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10.0, "the latent page renders blank"


def test_resampling_events_are_marked_where_the_count_grew(tmp_path: Path) -> None:
    """A dotted line per logged step whose cumulative `n_resamples` grew since the previous
    entry; none for a log that does not count resamplings."""
    from mammo_sae.report.figures import (
        plot_training_curves,
        resample_positions,
        training_series,
    )

    rows = [
        {"step": s, "loss": 1.0 / s, "n_resamples": n}
        for s, n in ((10, 0), (20, 1), (30, 1), (40, 3), (50, 3))
    ]
    _, x, _ = training_series(rows)
    assert resample_positions(rows, x).tolist() == [20.0, 40.0]
    plain = [{"step": r["step"], "loss": r["loss"]} for r in rows]
    assert resample_positions(plain, training_series(plain)[1]).size == 0
    assert plot_training_curves(rows, tmp_path / "t.png") == ["loss"]
    assert (tmp_path / "t.png").stat().st_size > 0
