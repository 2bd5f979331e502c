"""The report's HTML blocks live in `mammo_sae.html_blocks` (below `analysis` and `report`).
This name stays only for `report/build.py`, which imports `report.html`: delete it once build.py
imports `html_blocks`."""

from ..html_blocks import (  # noqa: F401
    CSS,
    Section,
    details,
    esc,
    figure,
    fmt,
    html_table,
    kpis,
    link,
    note,
    page,
    pre,
    short_id,
    strip,
    table,
)
