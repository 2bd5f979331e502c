"""`mammo-sae retrieve`: nearest images by SAE latent fingerprint vs raw pooled features.

Three kinds of query (exactly one): `--image ID` (its nearest images by every method of
`retrieve.METHODS`), `--latents 12,845` (images where those latents fire most) or `--query
LABEL` (every positive image of the split a query; precision@k of the label, sparse vs dense).
Writes `retrieve.json` (schema-versioned), `retrieve.csv` and, unless --no-html, `index.html`
with thumbnails (static, offline). See docs/analysis.md ("Retrieval") and `retrieve.py`.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import device_opt, opt, progress_opt, to_dict
from ..errors import MammoSaeError, choices_message
from ..io import write_json, write_text_atomic
from .commands import CACHE_DIR_HELP

RETRIEVE_JSON, RETRIEVE_CSV, INDEX_HTML = "retrieve.json", "retrieve.csv", "index.html"
THUMB_HEIGHT = 160  # px: thumbnails on index.html


@dataclass
class RetrieveConfig:
    """Image retrieval from the store's cached per-image summaries (no backbone pass).
    --image: nearest images by cosine of the mean latent vectors, by overlap of the top active
    latents, and by cosine of the raw pooled patch vectors (side by side); vectors are centred
    on the searched images' mean unless --no-center. --latents: images with the largest mean
    activation summed over the given latents. --query: every image positive for the label is
    a query; precision@k = share of its k nearest images (itself excluded) positive for the
    label, averaged over queries, per method."""

    store: Path = opt(help="activation store")
    sae: Path = opt(help="SAE checkpoint")
    out: Path = opt(help="output directory (retrieve.json, retrieve.csv, index.html)")
    image: str | None = opt(None, help="query image id: its nearest images")
    latents: list[int] = opt([], help="latent indices (e.g. 12,845): images where they fire most")
    query: str | None = opt(
        None, help="binary label (e.g. Mass): its positive images as queries; precision@k"
    )
    split: str = opt("all", help="images searched: training | test | all")
    k: int = opt(10, min=1, help="neighbours listed per query")
    ks: list[int] = opt([1, 5, 10], help="precision@k cut-offs (--query)")
    overlap_top: int = opt(16, min=1, help="top latents per image compared by sparse_overlap")
    center: bool = opt(
        True, help="centre every vector on the searched images' mean before comparing"
    )
    exclude_same_patient: bool = opt(
        False, help="never retrieve an image of the query's own patient"
    )
    html: bool = opt(True, help="write index.html with thumbnails")
    html_queries: int = opt(5, min=0, help="--query: query images shown on index.html")
    cache_dir: Path | None = opt(None, help=CACHE_DIR_HELP)
    batch_rows: int = opt(
        8192, min=1, help="patch rows per SAE call (if summaries must be computed)"
    )
    device: str = device_opt()
    progress: bool = progress_opt()


# --------------------------------------------------------------------------- input checks
def _mode(cfg: RetrieveConfig) -> str:
    given = [
        m for m, v in (("image", cfg.image), ("latents", cfg.latents), ("query", cfg.query)) if v
    ]
    if len(given) != 1:
        raise MammoSaeError(
            "give exactly one of --image, --latents, --query"
            + (f" (got {', '.join('--' + g for g in given)})" if given else "")
        )
    return given[0]


def _image_position(images: Any, rows: np.ndarray, image_id: str, split: str) -> int:
    """Position of `image_id` among the searched rows, or an error saying why it is not there."""
    ids = images["image_id"].astype(str).to_numpy()
    pos = np.flatnonzero(ids[rows] == image_id)
    if len(pos):
        return int(pos[0])
    where = np.flatnonzero(ids == image_id)
    if not len(where):
        sample = ", ".join(ids[rows[:3]])
        raise MammoSaeError(
            f"unknown image id {image_id!r}: not in the store ({len(ids)} images, e.g. {sample})"
        )
    row = int(where[0])
    if "ok" in images and not bool(images.at[row, "ok"]):
        raise MammoSaeError(
            f"image {image_id!r} was skipped at extraction "
            f"({images.at[row, 'error']}); it has no features"
        )
    raise MammoSaeError(
        f"image {image_id!r} is in split {images.at[row, 'split']!r}, "
        f"not in the searched split {split!r}"
    )


def _label_values(images: Any, rows: np.ndarray, column: str, name: str, split: str) -> np.ndarray:
    """The binary label `name` over `rows`, or an error naming what is wrong with it."""
    from .atlas import image_labels

    labels, skipped = image_labels(images, rows, column)
    found = {lab.name: lab for lab in labels}
    if name in found:
        lab = found[name]
        if lab.kind != "binary":
            raise MammoSaeError(
                f"label {name!r} is not binary (values "
                f"{sorted(set(lab.values.tolist()))}); --query needs a 0/1 label"
            )
        return lab.values.astype(np.int64)
    if name in skipped:
        reason = skipped[name]
        if reason.startswith("constant (0"):
            raise MammoSaeError(f"label {name!r} has no positive images in split {split!r}")
        raise MammoSaeError(f"label {name!r} cannot be a query in split {split!r}: {reason}")
    valid = sorted(lab.name for lab in labels if lab.kind == "binary")
    raise MammoSaeError(choices_message("label", name, valid))


# --------------------------------------------------------------------------- run
def run_retrieve(cfg: RetrieveConfig) -> int:
    from .atlas import image_labels
    from .retrieve import METHODS, SCHEMA_VERSION, latent_ranking, neighbours, precision_at_k
    from .summaries import open_store, selected_rows, summaries_for_command

    t0 = time.perf_counter()
    mode = _mode(cfg)
    bad_ks = [k for k in cfg.ks if k < 1]
    if mode == "query" and (bad_ks or not cfg.ks):
        raise MammoSaeError(f"--ks must be positive integers, got {cfg.ks}")
    store = open_store(cfg.store)
    images = store.images
    rows, column = selected_rows(
        images, split=cfg.split, level="image", store_level=store.manifest.get("level", "image")
    )
    n = len(rows)
    if n < 2:
        raise MammoSaeError(
            f"store {cfg.store}: {n} usable images in split {cfg.split!r}; "
            "retrieval needs at least 2"
        )
    query: dict[str, Any] = {"mode": mode}
    y = None
    if mode == "image":
        qpos = np.array([_image_position(images, rows, str(cfg.image), cfg.split)])
    elif mode == "query":
        y = _label_values(images, rows, column, str(cfg.query), cfg.split)
        qpos = np.flatnonzero(y == 1)
        if max(cfg.ks) > n - 1:
            raise MammoSaeError(
                f"precision@{max(cfg.ks)} needs {max(cfg.ks)} other images; "
                f"split {cfg.split!r} has {n} in all"
            )
    s = summaries_for_command(cfg.store, cfg.sae, cfg)
    if s.n_images != store.n_images:
        raise MammoSaeError(f"summaries hold {s.n_images} images, the store {store.n_images}")
    mean = s.mean_rows(rows)
    binary = [lab.name for lab in image_labels(images, rows, column)[0] if lab.kind == "binary"]

    def image_id(pos: int) -> str:
        return str(images.at[int(rows[pos]), "image_id"])

    def entries(positions: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
        """The first cfg.k (position, score) pairs as result entries."""
        out = []
        for i in range(min(cfg.k, len(positions))):
            r = int(rows[positions[i]])
            out.append(
                {
                    "rank": i + 1,
                    "image_id": image_id(positions[i]),
                    "image_index": r,
                    "score": float(scores[i]),
                    "labels": dict(images.at[r, column]),
                }
            )
        return out

    results: dict[str, Any] = {}
    precision: list[dict[str, Any]] = []
    if mode == "latents":
        order, score = latent_ranking(mean, cfg.latents, n)
        firing = score > 0  # images where none of the latents fires are not listed
        query.update(latents=[int(j) for j in cfg.latents], n_firing=int(firing.sum()))
        results["latent_sum"] = entries(order[firing], score[firing])
    else:
        groups = None
        if cfg.exclude_same_patient:
            groups = np.unique(
                images["patient_id"].astype(str).to_numpy()[rows], return_inverse=True
            )[1]
        k = max([cfg.k, *(cfg.ks if mode == "query" else [])])
        nb = neighbours(
            mean,
            store.pooled_nd[rows],
            qpos,
            k,
            overlap_top=cfg.overlap_top,
            center=cfg.center,
            groups_n=groups,
            progress=cfg.progress,
        )
        if mode == "image":
            p = int(qpos[0])
            act = mean[p].toarray().ravel()
            top = [int(j) for j in np.argsort(-act, kind="stable")[: cfg.overlap_top] if act[j] > 0]
            query.update(
                image_id=str(cfg.image),
                image_index=int(rows[p]),
                labels=dict(images.at[int(rows[p]), column]),
                top_latents=[{"latent": j, "mean_activation": float(act[j])} for j in top],
            )
            results = {m: entries(nb[m].positions_qk[0], nb[m].scores_qk[0]) for m in METHODS}
        else:
            assert y is not None
            chance = (len(qpos) - 1) / (n - 1)
            query.update(label=cfg.query, n_queries=len(qpos), n_candidates=n, chance=chance)
            per = {m: precision_at_k(nb[m], y, cfg.ks) for m in METHODS}
            precision = [
                {"k": k_, **{m: per[m][k_] for m in METHODS}, "chance": chance} for k_ in cfg.ks
            ]
            results = {
                m: [
                    {
                        "query_id": image_id(q),
                        "neighbours": [
                            {"image_id": image_id(pos), "score": float(sc), "positive": int(y[pos])}
                            for pos, sc in zip(
                                nb[m].positions_qk[i][: cfg.k],
                                nb[m].scores_qk[i][: cfg.k],
                                strict=True,
                            )
                        ],
                    }
                    for i, q in enumerate(qpos)
                ]
                for m in METHODS
            }
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cfg.out / RETRIEVE_CSV, _csv(mode, results, binary))
    body = {
        "schema_version": SCHEMA_VERSION,
        "config": to_dict(cfg),
        "split": cfg.split,
        "store_sha256": s.meta.get("store_sha256"),
        "sae_sha256": s.meta.get("sae_sha256"),
        "subsample_fraction": s.meta.get("subsample_fraction"),
        "methods": {m: d for m, d in METHODS.items() if m in results}
        or {"latent_sum": "mean activation summed over the given latents"},
        "query": query,
        "precision": precision,
        "results": results,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if cfg.html:
        write_index(
            body, store, cfg.out, binary, max_queries=cfg.html_queries, progress=cfg.progress
        )
    write_json(cfg.out / RETRIEVE_JSON, body)
    _print_summary(mode, query, precision, results, cfg.out)
    return 0


# --------------------------------------------------------------------------- HTML
class _Thumbs:
    """`thumbs/<image_index>.png`: each image as the model saw it, written once; None when its
    file is not there (the page then shows the id alone)."""

    def __init__(self, store: Any, out: Path) -> None:
        self.records = store.records()
        self.out = out
        self.done: dict[int, str | None] = {}

    def __call__(self, index: int) -> str | None:
        from .explain import write_thumbnail
        from .figures import _shrink, display_image

        if index not in self.done:
            rec = self.records[index]
            arr = display_image(rec.path, tuple(rec.frame_hw)) if rec.frame_hw else None
            rel = None
            if arr is not None:
                rel = f"thumbs/{index}.png"
                write_thumbnail(_shrink(arr, THUMB_HEIGHT / arr.shape[0]), self.out / rel)
            self.done[index] = rel
        return self.done[index]


def _tile(src: str | None, caption: str) -> str:
    from .. import html_blocks as H

    if src:
        return H.figure(src, caption, width=120)
    return (
        f'<figure style="width:120px"><figcaption>{H.esc(caption)} (no image file)'
        "</figcaption></figure>"
    )


def write_index(
    body: dict[str, Any],
    store: Any,
    out: Path,
    binary: list[str],
    *,
    max_queries: int = 5,
    progress: bool = True,
) -> Path:
    """`out/index.html`: the query and its neighbours per method as thumbnails; static, offline."""
    from tqdm.auto import tqdm

    from .. import html_blocks as H
    from ..html_blocks import short_id

    thumbs = _Thumbs(store, out)
    ids = store.images["image_id"].astype(str).tolist()
    index_of = {v: i for i, v in reversed(list(enumerate(ids)))}
    results = body["results"]
    q = body["query"]
    about = H.Section("about", "About")
    about.add(
        H.table(
            [
                {"field": k, "value": v}
                for k, v in (
                    ("store", body["config"]["store"]),
                    ("SAE", body["config"]["sae"]),
                    ("split", body["split"]),
                    (
                        "vectors",
                        "centred on the searched images' mean"
                        if body["config"]["center"]
                        else "raw",
                    ),
                    (
                        "query",
                        q.get("image_id")
                        or q.get("label")
                        or ",".join(map(str, q.get("latents", []))),
                    ),
                )
            ],
            ["field", "value"],
            left=2,
        )
    )
    about.add(
        H.table(
            [{"method": m, "score": d} for m, d in body["methods"].items()],
            ["method", "score"],
            left=2,
        )
    )
    sections = [about]
    if body["precision"]:
        s = H.Section("precision", f"Precision@k for {q['label']}")
        s.add(H.kpis({"queries": q["n_queries"], "images searched": q["n_candidates"]}))
        s.add(H.table(body["precision"], ["k", *body["methods"], "chance"], left=1))
        s.add(
            H.note(
                "precision@k: share of a positive query's k nearest images (itself "
                "excluded) that are positive; chance = (positives − 1) / (images − 1)."
            )
        )
        sections.append(s)

    def caption(image_id: str, score: float, rank: int, extra: str = "") -> str:
        return f"#{rank} {short_id(image_id)} · {score:.3g}{extra}"

    if q["mode"] == "query":
        shown = [
            (j, [(m, r[j]) for m, r in results.items()])
            for j in range(min(max_queries, q["n_queries"]))
        ]
        for j, per in tqdm(shown, desc="thumbnails", unit="query", disable=not progress):
            qid = per[0][1]["query_id"]
            s = H.Section(f"q{j}", f"Query {short_id(qid)}")
            s.add(_tile(thumbs(index_of[qid]), f"query {short_id(qid)}"))
            for method, entry in per:
                s.add(f"<h3>{H.esc(method)}</h3>")
                s.add(
                    "".join(
                        _tile(
                            thumbs(index_of[nb["image_id"]]),
                            caption(
                                nb["image_id"],
                                nb["score"],
                                i + 1,
                                f" · {q['label']}" if nb["positive"] else "",
                            ),
                        )
                        for i, nb in enumerate(entry["neighbours"])
                    )
                )
            sections.append(s)
    else:
        s = H.Section("results", "Results")
        if q["mode"] == "image":
            s.add(
                _tile(
                    thumbs(q["image_index"]),
                    f"query {short_id(q['image_id'])} · "
                    + (_positives(q["labels"], binary) or "no positive label"),
                )
            )
        for method, entries in tqdm(
            results.items(), desc="thumbnails", unit="method", disable=not progress
        ):
            s.add(f"<h3>{H.esc(method)}</h3>")
            s.add(
                "".join(
                    _tile(
                        thumbs(e["image_index"]),
                        caption(
                            e["image_id"],
                            e["score"],
                            e["rank"],
                            f" · {_positives(e['labels'], binary)}"
                            if _positives(e["labels"], binary)
                            else "",
                        ),
                    )
                    for e in entries
                )
            )
        sections.append(s)
    path = out / INDEX_HTML
    write_text_atomic(path, H.page("mammo-sae retrieve", f"{q['mode']} retrieval", sections))
    return path


def _positives(labels: dict[str, Any], binary: list[str]) -> str:
    return ";".join(name for name in binary if labels.get(name) == 1)


def _csv(mode: str, results: dict[str, Any], binary: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if mode == "query":
        w.writerow(["method", "query_id", "rank", "image_id", "score", "positive"])
        for method, queries in results.items():
            for q in queries:
                for i, nb in enumerate(q["neighbours"]):
                    w.writerow(
                        [
                            method,
                            q["query_id"],
                            i + 1,
                            nb["image_id"],
                            f"{nb['score']:.6g}",
                            nb["positive"],
                        ]
                    )
    else:
        w.writerow(["method", "rank", "image_id", "image_index", "score", "positive_labels"])
        for method, entries in results.items():
            for e in entries:
                w.writerow(
                    [
                        method,
                        e["rank"],
                        e["image_id"],
                        e["image_index"],
                        f"{e['score']:.6g}",
                        _positives(e["labels"], binary),
                    ]
                )
    return buf.getvalue()


def _print_summary(
    mode: str,
    query: dict[str, Any],
    precision: list[dict[str, Any]],
    results: dict[str, Any],
    out: Path,
) -> None:
    if mode == "query":
        print(
            f"{query['label']}: {query['n_queries']} queries among {query['n_candidates']} "
            f"images (chance {query['chance']:.3f})"
        )
        for row in precision:
            print(
                f"  precision@{row['k']}: "
                + "  ".join(f"{m} {row[m]:.3f}" for m in row if m not in ("k", "chance"))
            )
    else:
        if mode == "latents" and not query["n_firing"]:
            print(f"latents {query['latents']} fire on no image of the split")
        for method, entries in results.items():
            print(
                f"{method}: "
                + ", ".join(e["image_id"] for e in entries[:5])
                + (" ..." if len(entries) > 5 else "")
            )
    print(f"wrote {out / RETRIEVE_JSON}")
