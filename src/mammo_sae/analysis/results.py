"""Versioned result records of the fidelity and intervene stages.

`mammo-sae fidelity` writes fidelity.json and `mammo-sae intervene` writes intervene.json through
these classes (`to_json`), and the report reads them back through the same classes (`from_json`),
so the file format is declared once. Files written before the records existed have the same keys
(schema 1) and read unchanged; a file newer than this reader is refused with a message. NaN is
written as null (strict JSON) and read back as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from ..errors import MammoSaeError

SCHEMA_VERSION = 1


def check_version(doc: Any, where: str) -> int:
    """The `schema_version` of a result file (1 when absent); a newer one than this reader knows
    is refused, naming the file."""
    if not isinstance(doc, Mapping):
        raise MammoSaeError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    version = doc.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
        raise MammoSaeError(
            f"{where}: schema_version {version!r}, newer than this mammo-sae reads "
            f"({SCHEMA_VERSION}): upgrade mammo-sae"
        )
    return version


def _get(doc: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in doc:
        raise MammoSaeError(f"{where}: missing {key!r}")
    return doc[key]


def _num(value: Any, where: str) -> float:
    """A JSON number as float; null (how NaN is written) reads as NaN."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MammoSaeError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise MammoSaeError(f"{where}: expected an integer, got {value!r}")
    return int(value)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MammoSaeError(f"{where}: expected an object, got {value!r}")
    return value


@dataclass(frozen=True)
class Scores:
    """AUROC and AUPRC of one score with their 95 % bootstrap CIs (NaN: no CI, n_boot = 0)."""

    auroc: float
    auroc_low: float = math.nan
    auroc_high: float = math.nan
    auprc: float = math.nan
    auprc_low: float = math.nan
    auprc_high: float = math.nan

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Scores:
        doc = _mapping(doc, where)
        _get(doc, "auroc", where)
        return cls(**{f.name: _num(doc.get(f.name), f"{where}.{f.name}") for f in fields(cls)})


@dataclass(frozen=True, kw_only=True)
class FidelityResult:
    """One (store, classifier) pair of fidelity.json: AUROC/AUPRC with the original pooled
    features and with the SAE reconstruction, recovered fraction, FVU, L0, dead fraction."""

    concept: str
    store: str = ""
    classifier: str = ""
    n: int
    n_pos: int
    original: Scores
    sae: Scores
    recovered: float
    auroc_drop: float
    fvu: float
    l0: float
    dead_fraction: float
    n_positions: int
    n_images: int
    subsample_fraction: float = 1.0
    # How the logits were read: the pooled identity (final layer) or "network from <layer>"
    # (the rest of the classifier run on the stored and reconstructed maps).
    path: str = "pooled-identity"
    warning: str = ""  # written only when there is one

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.warning:
            del out["warning"]
        if self.path == "pooled-identity":  # the default: files as before layers existed
            del out["path"]
        return out

    @classmethod
    def from_json(cls, doc: Any, where: str) -> FidelityResult:
        """From fidelity.json's per-model object (or `fidelity()`'s dict plus the concept)."""
        doc = _mapping(doc, where)

        def num(name: str) -> float:
            return _num(_get(doc, name, where), f"{where}.{name}")

        def count(name: str) -> int:
            return _int(_get(doc, name, where), f"{where}.{name}")

        return cls(
            concept=str(_get(doc, "concept", where)),
            store=str(doc.get("store") or ""),
            classifier=str(doc.get("classifier") or ""),
            n=count("n"),
            n_pos=count("n_pos"),
            original=Scores.from_json(_get(doc, "original", where), f"{where}.original"),
            sae=Scores.from_json(_get(doc, "sae", where), f"{where}.sae"),
            recovered=num("recovered"),
            auroc_drop=num("auroc_drop"),
            fvu=num("fvu"),
            l0=num("l0"),
            dead_fraction=num("dead_fraction"),
            n_positions=count("n_positions"),
            n_images=count("n_images"),
            subsample_fraction=_num(doc.get("subsample_fraction", 1.0), where),
            path=str(doc.get("path") or "pooled-identity"),
            warning=str(doc.get("warning") or ""),
        )


@dataclass(frozen=True)
class FidelityRecord:
    """fidelity.json: the command's config and one `FidelityResult` per model name."""

    results: dict[str, FidelityResult]
    config: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "config": self.config,
            "results": {name: r.to_json() for name, r in self.results.items()},
        }

    @classmethod
    def from_json(cls, doc: Any, where: str = "fidelity.json") -> FidelityRecord:
        version = check_version(doc, where)
        results = _mapping(_get(doc, "results", where), f"{where}.results")
        return cls(
            results={
                str(name): FidelityResult.from_json(r, f"{where}.results.{name}")
                for name, r in results.items()
            },
            config=dict(doc.get("config") or {}),
            schema_version=version,
        )


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    """One point of a top-k sweep: the `union_size` latents of the top-k class-0 ∪ class-1
    rankings kept (`mode` "on") or zeroed ("off"), and the AUROC/AUPRC that gives (written
    flat in the point, as `Scores`' six numbers)."""

    mode: str
    k: int
    union_size: int
    scores: Scores

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "k": self.k,
            "union_size": self.union_size,
            **asdict(self.scores),
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> SweepPoint:
        doc = _mapping(doc, where)
        return cls(
            mode=str(_get(doc, "mode", where)),
            k=_int(_get(doc, "k", where), f"{where}.k"),
            union_size=_int(_get(doc, "union_size", where), f"{where}.union_size"),
            scores=Scores.from_json(doc, where),
        )


@dataclass(frozen=True)
class InterveneRecord:
    """intervene.json: a top-k sweep of one model (its evaluation images, rankings, points)."""

    concept: str
    n: int
    n_pos: int
    results: list[SweepPoint]
    rankings: str = ""  # where the class-0/class-1 rankings came from
    path: str = "pooled-identity"  # or "exact-decode"
    store_sha256: str | None = None
    sae_sha256: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "config": self.config,
            "concept": self.concept,
            "store_sha256": self.store_sha256,
            "sae_sha256": self.sae_sha256,
            "rankings": self.rankings,
            "n": self.n,
            "n_pos": self.n_pos,
            "path": self.path,
            "results": [p.to_json() for p in self.results],
        }

    @classmethod
    def from_json(cls, doc: Any, where: str = "intervene.json") -> InterveneRecord:
        version = check_version(doc, where)
        points = _get(doc, "results", where)
        if not isinstance(points, list):
            raise MammoSaeError(f"{where}.results: expected a list of sweep points")
        return cls(
            concept=str(_get(doc, "concept", where)),
            n=_int(_get(doc, "n", where), f"{where}.n"),
            n_pos=_int(_get(doc, "n_pos", where), f"{where}.n_pos"),
            results=[
                SweepPoint.from_json(p, f"{where}.results[{i}]") for i, p in enumerate(points)
            ],
            rankings=str(doc.get("rankings") or ""),
            path=str(doc.get("path") or "pooled-identity"),
            store_sha256=doc.get("store_sha256"),
            sae_sha256=doc.get("sae_sha256"),
            config=dict(doc.get("config") or {}),
            schema_version=version,
        )

    def curves(self) -> dict[str, dict[str, np.ndarray]]:
        """mode -> {ks, auroc, auroc_low, auroc_high}, points in increasing k."""
        out: dict[str, dict[str, np.ndarray]] = {}
        for mode in dict.fromkeys(p.mode for p in self.results):
            mine = sorted((p for p in self.results if p.mode == mode), key=lambda p: p.k)
            out[mode] = {"ks": np.array([p.k for p in mine], dtype=float)}
            for key in ("auroc", "auroc_low", "auroc_high"):
                out[mode][key] = np.array([getattr(p.scores, key) for p in mine], dtype=float)
        return out
