"""The report's Atlas page (`report/atlas.html`): every latent of the atlas stage in one table.

Static and offline: the rows are embedded as JSON and an inline script pages (100 rows a page,
so 16,384 latents stay fast), searches (latent id or name), sorts (click a header) and filters
(label with a significant association, significance, firing-rate range); no network, works
from file://. The state also reads from the URL fragment (`atlas.html#q=12&sort=firing_rate`).
Latent pages (the report's own builder, `latents.py`) are written for the top latents of each
label (strongest significant association first) and linked from the table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import html_blocks as H
from ..errors import MammoSaeError
from ..io import read_json, write_text_atomic

if TYPE_CHECKING:
    from .build import ReportBuilder

PAGE = "atlas.html"
TOP_PER_LABEL = 3
# Table columns: key in atlas.json's latent entries, header, kind (for sorting and formatting).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("latent", "latent", "int"),
    ("name", "name", "text"),
    ("flags", "flags", "text"),
    ("firing_rate", "firing rate", "num"),
    ("mean_activation", "mean act.", "num"),
    ("max_activation", "max act.", "num"),
    ("entropy", "entropy", "num"),
    ("top_label", "top label", "text"),
    ("top_value", "AUROC / ρ", "num"),
    ("top_q", "q", "num"),
    ("cluster", "cluster", "int"),
    ("off_breast", "off-breast", "num"),
    ("border_fraction", "border", "num"),
    ("com_down", "centre ↓", "num"),
    ("com_across", "centre →", "num"),
)

SCRIPT = r"""
function atlasView(data, st) {
  var q = (st.q || '').trim().toLowerCase(), rows = [];
  var col = data.columns.indexOf(st.sort), sig = data.columns.indexOf('sig');
  var fr = data.columns.indexOf('firing_rate'), lat = data.columns.indexOf('latent');
  var name = data.columns.indexOf('name');
  for (var i = 0; i < data.rows.length; i++) {
    var r = data.rows[i];
    if (q) {
      var isId = /^\d+$/.test(q);
      if (isId ? String(r[lat]) !== q : String(r[name]).toLowerCase().indexOf(q) < 0) continue;
    }
    if (st.label && r[sig].indexOf(st.label) < 0) continue;
    if (st.significance === 'named' && /^(unexplained|dead)/.test(r[name])) continue;
    if (st.significance === 'significant' && r[sig].length === 0) continue;
    var f = r[fr] === null ? 0 : r[fr];
    var hi = (st.frMax === undefined || st.frMax === '') ? 1 : st.frMax;
    if (f < (st.frMin || 0) || f > hi) continue;
    rows.push(r);
  }
  if (col >= 0) {
    var dir = st.desc ? -1 : 1;
    rows.sort(function (a, b) {
      var x = a[col], y = b[col];
      if (x === y) return a[lat] - b[lat];
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : 1) * dir;
    });
  }
  var per = data.perPage, pages = Math.max(1, Math.ceil(rows.length / per));
  var page = Math.min(Math.max(0, st.page || 0), pages - 1);
  return {total: rows.length, pages: pages, page: page,
          rows: rows.slice(page * per, page * per + per)};
}
if (typeof document !== 'undefined') (function () {
  var data = JSON.parse(document.getElementById('atlas-data').textContent);
  var st = {q: '', sort: 'latent', desc: false, page: 0, label: '', significance: 'all',
            frMin: 0, frMax: 1};
  var $ = function (id) { return document.getElementById(id); };
  location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
    var p = kv.split('='); if (!p[0]) return;
    var v = decodeURIComponent(p[1] || '');
    st[p[0]] = (p[0] === 'desc') ? v === '1' : (/^(page|frMin|frMax)$/.test(p[0]) ? Number(v) : v);
  });
  function fmt(v, kind) {
    if (v === null || v === undefined) return '—';
    if (kind === 'num') return Math.abs(v) >= 1e-3 || v === 0 ? v.toFixed(3) : v.toExponential(2);
    return String(v);
  }
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) {
    return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]; }); }
  function render() {
    var v = atlasView(data, st), html = [];
    st.page = v.page;
    var lat = data.columns.indexOf('latent');
    for (var i = 0; i < v.rows.length; i++) {
      var r = v.rows[i], cells = [];
      for (var c = 0; c < data.shown.length; c++) {
        var k = data.columns.indexOf(data.shown[c]), val = esc(fmt(r[k], data.kinds[c]));
        if (c === 0 && data.pages.indexOf(r[lat]) >= 0)
          val = '<a class="latent-link" href="latents/' + r[lat] + '.html">' + val + '</a>';
        cells.push('<td class="' + (data.kinds[c] === 'text' ? 'l' : '') + '">' + val + '</td>');
      }
      html.push('<tr data-latent="' + r[lat] + '">' + cells.join('') + '</tr>');
    }
    $('atlas-body').innerHTML = html.join('');
    $('atlas-count').textContent = v.total + ' latents · page ' + (v.page + 1) + ' of ' + v.pages;
    var ths = document.querySelectorAll('#atlas-table th');
    for (var t = 0; t < ths.length; t++) {
      var key = ths[t].getAttribute('data-col');
      ths[t].className = (data.kinds[t] === 'text' ? 'l ' : '') +
        (key === st.sort ? (st.desc ? 'desc' : 'asc') : '');
    }
  }
  function reset() { st.page = 0; render(); }
  $('atlas-search').value = st.q;
  $('atlas-search').addEventListener('input', function (e) { st.q = e.target.value; reset(); });
  $('atlas-label').value = st.label;
  $('atlas-label').addEventListener('change', function (e) { st.label = e.target.value; reset(); });
  $('atlas-sig').value = st.significance;
  $('atlas-sig').addEventListener('change', function (e) {
    st.significance = e.target.value; reset(); });
  $('atlas-frmin').addEventListener('input', function (e) {
    st.frMin = Number(e.target.value || 0); reset(); });
  $('atlas-frmax').addEventListener('input', function (e) {
    st.frMax = e.target.value === '' ? 1 : Number(e.target.value); reset(); });
  $('atlas-prev').addEventListener('click', function () { st.page -= 1; render(); });
  $('atlas-next').addEventListener('click', function () { st.page += 1; render(); });
  var ths = document.querySelectorAll('#atlas-table th');
  for (var t = 0; t < ths.length; t++) ths[t].addEventListener('click', function (e) {
    var key = e.currentTarget.getAttribute('data-col');
    // A new numeric column sorts largest first; the same column again flips the order.
    var numeric = data.kinds[data.shown.indexOf(key)] !== 'text' && key !== 'latent';
    st.desc = (st.sort === key) ? !st.desc : numeric;
    st.sort = key; reset();
  });
  render();
})();
"""

EXTRA_CSS = (
    "#atlas-table th{cursor:pointer;user-select:none}#atlas-table th.asc:after{content:' ▲'}"
    "#atlas-table th.desc:after{content:' ▼'}.controls{margin:8px 0;font-size:13px}"
    ".controls input,.controls select{margin-right:12px}"
)


def _num(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value if math.isfinite(float(value)) else None
    return None


def atlas_rows(atlas: dict[str, Any], alpha: float) -> tuple[list[str], list[list[Any]], list[str]]:
    """(column keys, one row per latent, logit columns) from atlas.json's body."""
    entries = atlas.get("latents")
    if not isinstance(entries, list):
        raise MammoSaeError("atlas.json has no `latents` list")
    logits = sorted({k for e in entries[:1] for k in e if k.startswith("logit_")})
    keys = [c[0] for c in COLUMNS] + logits + ["sig"]
    rows = []
    for e in entries:
        assoc = [a for a in e.get("associations") or [] if isinstance(a, dict)]
        top = assoc[0] if assoc else {}
        flat = dict(
            e,
            flags=",".join(e.get("flags") or []),
            top_label=top.get("label"),
            top_value=top.get("value"),
            top_q=top.get("q"),
        )
        row: list[Any] = []
        for key, _, kind in COLUMNS:
            value = flat.get(key)
            row.append(value if kind == "text" else _num(value))
        row += [_num(e.get(k)) for k in logits]
        row.append([a["label"] for a in assoc if _num(a.get("q")) is not None and a["q"] < alpha])
        rows.append(row)
    return keys, rows, logits


def top_per_label(atlas: dict[str, Any], n: int = TOP_PER_LABEL) -> dict[str, list[int]]:
    """For each label, the n latents whose named association with it is strongest."""
    best: dict[str, list[tuple[float, int]]] = {}
    for e in atlas.get("latents", []):
        for a in e.get("associations") or []:
            if a.get("named"):
                strength = (
                    2 * abs(a["value"] - 0.5) if a.get("stat") == "auroc" else abs(a["value"])
                )
                best.setdefault(a["label"], []).append((-strength, int(e["latent"])))
    return {label: [j for _, j in sorted(items)[:n]] for label, items in best.items()}


def write_atlas_page(report: ReportBuilder, s: H.Section) -> None:
    """Write report/atlas.html (and latent pages for the top latents per label); fill `s`,
    the index's Atlas section, with a link and counts."""
    path = report.layout.stage_dir("atlas") / "atlas.json"
    if not path.is_file():
        report.layout.report_atlas.unlink(missing_ok=True)  # a previous build's page would be stale
        s.add(
            H.note(
                "not run: no atlas (analysis/atlas/atlas.json); run the pipeline's atlas stage "
                "or `mammo-sae atlas`"
            )
        )
        return
    atlas = read_json(path)
    config = atlas.get("config") or {}
    alpha = float(config.get("alpha", 0.05))
    keys, rows, logits = atlas_rows(atlas, alpha)
    tops = top_per_label(atlas)
    pages = _latent_pages(report, atlas, tops) if report.latent_pages else set()
    written = report.layout.report_latents.glob("*.html")
    existing = {int(p.stem) for p in written if p.stem.isdigit()}
    shown = [c[0] for c in COLUMNS] + logits
    kinds = [c[2] for c in COLUMNS] + ["num"] * len(logits)
    headers = [c[1] for c in COLUMNS] + [f"logit {k[len('logit_') :]}" for k in logits]
    labels = [lab.get("name") for lab in atlas.get("labels", []) if isinstance(lab, dict)]
    label_order = [x for x in atlas.get("label_order", labels) if x in labels]
    payload = {
        "columns": keys,
        "rows": rows,
        "shown": shown,
        "kinds": kinds,
        "perPage": 100,
        "pages": sorted(pages | existing),
    }
    data_json = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    options = "".join(f'<option value="{H.esc(x)}">{H.esc(x)}</option>' for x in label_order)
    head = "".join(
        f'<th data-col="{H.esc(k)}" class="{"l" if kind == "text" else ""}">{H.esc(h)}</th>'
        for k, h, kind in zip(shown, headers, kinds, strict=True)
    )
    named = sum(
        1
        for e in atlas["latents"]
        if not str(e.get("name", "")).startswith(("unexplained", "dead"))
    )
    table = H.Section("atlas", f"Latent atlas · {len(rows):,} latents")
    table.add(
        H.note(
            f"Every latent of the SAE over {atlas.get('n_images')} images of the "
            f"{atlas.get('split')} split (store {Path(str(config.get('store', ''))).name}). "
            f"Name: its strongest associations with q < {alpha:g} (BH over "
            f"{atlas.get('n_tests', 0):,} latent × label tests) that reach AUROC "
            f"{config.get('min_auroc', 0.7)} (or below 1 − that) or |ρ| "
            f"{config.get('min_rho', 0.3)}, then its spatial profile; top label = its strongest "
            "association. Click a header to sort; the search box takes a latent id or words "
            "of a name."
        )
    )
    table.add(
        '<div class="controls">'
        '<input id="atlas-search" type="search" placeholder="latent id or name" size="24">'
        '<label>label <select id="atlas-label"><option value="">any</option>'
        f"{options}</select></label>"
        '<label>show <select id="atlas-sig"><option value="all">all latents</option>'
        '<option value="significant">with a significant association</option>'
        '<option value="named">named</option></select></label>'
        '<label>firing rate <input id="atlas-frmin" type="number" min="0" max="1" step="0.01" '
        'value="0" style="width:5em"> – <input id="atlas-frmax" type="number" min="0" max="1" '
        'step="0.01" value="1" style="width:5em"></label>'
        '<button id="atlas-prev" type="button">◀</button> <span id="atlas-count"></span> '
        '<button id="atlas-next" type="button">▶</button></div>'
    )
    table.add(
        f'<table id="atlas-table"><thead><tr>{head}</tr></thead><tbody id="atlas-body"></tbody>'
        "</table>"
    )
    table.add(f'<script type="application/json" id="atlas-data">{data_json}</script>')
    table.add(f"<script>{SCRIPT}</script>")
    clusters = H.Section("clusters", "Co-activation clusters (largest)")
    clusters.add(
        H.table(
            [
                {
                    "cluster": c.get("cluster"),
                    "size": c.get("size"),
                    "label": c.get("label"),
                    "members": ", ".join(map(str, c.get("members", []))),
                }
                for c in (atlas.get("clusters") or [])[:20]
            ],
            left=1,
        )
    )
    tops_section = H.Section("top", "Top latents per label")
    tops_section.add(
        H.html_table(
            [
                [
                    H.esc(label),
                    ", ".join(
                        H.link(f"latents/{j}.html", j) if j in pages | existing else H.esc(j)
                        for j in lats
                    ),
                ]
                for label, lats in sorted(
                    tops.items(),
                    key=lambda kv: label_order.index(kv[0]) if kv[0] in label_order else 99,
                )
            ],
            ["label", "latents (strongest first)"],
        )
    )
    notes = atlas.get("spatial_notes") or []
    if notes:
        tops_section.add(H.note("Spatial profile: " + "; ".join(map(str, notes))))
    page = H.page(
        "Latent atlas",
        f"{len(rows):,} latents · {named:,} named · static page, no network",
        [table, tops_section, clusters],
        back=("index.html", "← report"),
    )
    page = page.replace("</style>", EXTRA_CSS + "</style>", 1)
    write_text_atomic(report.layout.report_atlas, page)
    report.data["atlas"] = {
        "page": PAGE,
        "latents": len(rows),
        "named": named,
        "top_per_label": tops,
        "pages": sorted(pages),
    }
    s.add(
        H.kpis(
            {
                "latents": len(rows),
                "named": named,
                "significant associations": atlas.get("n_significant", 0),
            }
        )
    )
    s.add(
        f"<p>{H.link(PAGE, 'Open the latent atlas')}: every latent with its automatic name, "
        "label associations, spatial profile and logit effects (search, sort, filter).</p>"
    )


def _latent_pages(
    report: ReportBuilder, atlas: dict[str, Any], tops: dict[str, list[int]]
) -> set[int]:
    """Latent pages (the report's builder) for the top latents of each label; returns the ids."""
    from .latents import LatentPages

    if not report.models:
        return set()
    split = str(atlas.get("split") or "")
    store_name = Path(str((atlas.get("config") or {}).get("store", ""))).name
    home = next(
        (m.name for m in report.models if f"{m.encoder_key or m.name}-{split}" == store_name),
        report.models[0].name,
    )
    done = {int(j) for j in (report.data.get("latents") or {})}
    todo = [j for lats in tops.values() for j in lats if j not in done]
    todo = list(dict.fromkeys(todo))
    # A list label names its model before the "/" (report.latents.list_model): the atlas's
    # lists belong to the model whose store the atlas read.
    by_label = {f"{home}/atlas {label}": lats for label, lats in tops.items()}
    pages = LatentPages(report, by_label).write_pages(todo)
    return done | {j for j, info in pages.items() if info.get("page")}
