"""`mammo-sae report --run DIR`: the static HTML report of a run directory."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import opt, progress_opt
from ..io import read_json


@dataclass
class ReportConfig:
    """Reads only the run directory; writes index.html, latents/<idx>.html, figures/*.png and
    report.json (every number shown). Parts of the run that are missing show as "not run"."""

    run: Path = opt(help="run directory of `mammo-sae run` / `mammo-sae demo`")
    out: Path | None = opt(None, help="output folder (default: RUN/report)")
    top_latents: int = opt(10, min=1, help="top latents per model that get their own page")
    latent_pages: bool = opt(
        True, help="write a page per top latent (opens the stores and the SAE)"
    )
    strict: bool = opt(
        False, help="fail on the first unreadable part instead of noting it in the page"
    )
    progress: bool = progress_opt("show a progress bar")
    workers: int | None = opt(
        None,
        min=1,
        affects_result=False,
        help="processes drawing the latent pages (default: the usable cores, at most 4)",
    )


def run_report(cfg: ReportConfig) -> int:
    from .build import build_report

    index = build_report(
        cfg.run,
        cfg.out,
        strict=cfg.strict,
        top_latents=cfg.top_latents,
        latent_pages=cfg.latent_pages,
        progress=cfg.progress,
        workers=cfg.workers,
    )
    print(f"report: {index}")
    problems = read_json(Path(index).parent / "report.json").get("problems") or {}
    if problems:  # parts the page shows as unreadable: say so here too, not only in the page
        shown = "; ".join(f"{k}: {v}" for k, v in list(problems.items())[:3])
        print(
            f"warning: {len(problems)} part(s) of the run could not be read and are marked in "
            f"the report ({shown}{' …' if len(problems) > 3 else ''}); --strict fails on them",
            file=sys.stderr,
        )
    return 0
