"""``lmsae report``: a static HTML site about a dictionary's features, openable from disk.

Layout of the output directory::

    index.html            summary + a table of every reported feature (sortable, filterable, paged)
    features/<index>.html one pre-rendered page per feature
    lmsae-report.json     marks the directory as a report (so --overwrite never clobbers anything else)

Everything is inline (CSS, JS, SVG): no server, no network, no fetch() (which Chromium blocks on
file:// URLs). Every piece of text from the store goes through :func:`html.escape`, and the
pages carry no store data inside scripts (sort keys are ``data-*`` attributes of the rows).

The index page's state lives in the URL fragment (``index.html#sort=act_count&order=desc&dmin=0.01``):
``sort`` (a column key), ``order`` (``asc``/``desc``; default: descending for numbers except the
index), ``dmin``/``dmax`` (density bounds in percent), ``q`` (text in explanations), ``page``,
``size``.
"""

from __future__ import annotations

import datetime
import html
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import numpy as np

from lmsae.errors import LmsaeError, StoreError
from lmsae.report.text import (
    Context,
    FeatureView,
    TokenDecoder,
    activation_level,
    analysis_or_error,
    check_feature_index,
    closest_index,
    context_window,
    describe_meta,
    format_activation,
    format_density,
    format_number,
    load_feature_view,
    n_features_of,
    sparse_extras,
    tokenizer_for_dictionary,
    visible,
    window_bounds,
)
from lmsae.stores.base import DictionaryRecord, Store, dictionary_or_error

log = logging.getLogger(__name__)

MARKER = "lmsae-report.json"
FORMAT = "lmsae-report"
FORMAT_VERSION = 1
#: tokens shown around each context's peak before "show whole contexts" is ticked
DEFAULT_WINDOW = 64

#: the columns of the index table: key (data attribute), header, numeric?, default order
COLUMNS: tuple[tuple[str, str, bool, str], ...] = (
    ("index", "#", True, "asc"),
    ("act_count", "activations", True, "desc"),
    ("density", "density", True, "desc"),
    ("max_activation", "max activation", True, "desc"),
    ("explanation", "explanation", False, "asc"),
    ("detection", "detection", True, "desc"),
)


def esc(text: Any) -> str:
    """``text`` escaped for HTML content and attribute values (quotes included)."""
    return html.escape(str(text), quote=True)


def _attr_number(value: float | None) -> str:
    """A number for a ``data-*`` attribute (empty when missing or not finite)."""
    if value is None:
        return ""
    value = float(value)
    if not math.isfinite(value):
        return ""
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


# --- styles and scripts -----------------------------------------------------------------------

CSS = """
:root{--fg:#1d2430;--muted:#5f6b7a;--bg:#fff;--panel:#f5f7fa;--line:#dde3ea;--accent:#c2410c;
--hl:255,115,0;--pos:#15803d;--neg:#b91c1c;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ef;--muted:#9aa5b4;--bg:#14171c;--panel:#1d2229;
--line:#2e3540;--accent:#fb923c;--hl:255,140,40;--pos:#4ade80;--neg:#f87171}}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header,main,footer{max-width:1200px;margin:0 auto;padding:0 20px}
header{padding-top:18px}
h1{font-size:1.5em;margin:.2em 0}
h2{font-size:1.1em;margin:1.6em 0 .5em;border-bottom:1px solid var(--line);padding-bottom:.2em}
h3{font-size:1em;margin:1.2em 0 .4em}
a{color:var(--accent)}
.sub,.muted,footer{color:var(--muted)}
footer{font-size:.85em;padding:24px 20px}
.crumbs a{text-decoration:none}
.stats{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px;margin:14px 0}
.stats div{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:8px 12px}
.stats dt{font-size:.8em;color:var(--muted)}
.stats dd{margin:0;font-size:1.15em;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
svg.hist{width:100%;max-width:760px;height:auto;display:block}
svg.hist rect.bar{fill:var(--accent);opacity:.8}
svg.hist rect.bar:hover{opacity:1}
svg.hist text{fill:var(--muted);font-size:11px}
svg.hist line{stroke:var(--line)}
table{border-collapse:collapse}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.features{width:100%}
table.features th{cursor:pointer;user-select:none;white-space:nowrap;position:sticky;top:0;background:var(--bg)}
table.features th[aria-sort=ascending]::after{content:" \\25B2"}
table.features th[aria-sort=descending]::after{content:" \\25BC"}
table.features td.expl{max-width:560px}
tr.dead td{color:var(--muted)}
.controls{display:flex;flex-wrap:wrap;gap:12px;align-items:center;margin:10px 0}
.controls input[type=text],.controls input[type=search]{width:8em}
.controls input[type=search]{width:14em}
.pager{display:flex;gap:12px;align-items:center;margin:10px 0}
.logits{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
.logits td.tok{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre}
.logits .bar{display:inline-block;height:.7em;border-radius:2px;vertical-align:middle}
.logits .pos .bar{background:var(--pos)}
.logits .neg .bar{background:var(--neg)}
.expl-text{font-size:1.1em;background:var(--panel);border-left:3px solid var(--accent);padding:8px 12px;margin:8px 0}
.scores{display:flex;gap:10px;flex-wrap:wrap;padding:0;list-style:none}
.scores li{background:var(--panel);border:1px solid var(--line);border-radius:999px;padding:2px 12px}
ol.ctxs{list-style:none;padding:0;margin:0}
ol.ctxs li{display:flex;gap:12px;padding:4px 0;border-bottom:1px dashed var(--line)}
.pv{min-width:4.5em;text-align:right;color:var(--muted);font-variant-numeric:tabular-nums}
.ctx{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;white-space:pre-wrap;
overflow-wrap:anywhere;flex:1}
.ctx .on{background:rgba(var(--hl),var(--a));border-radius:2px}
.ctx .pk{outline:1px solid var(--accent)}
.ctx .far{display:none}
.ctx .cut{color:var(--muted)}
#full:checked~.sampling .far{display:inline}
#full:checked~.sampling .cut{display:none}
.legend{display:inline-block;width:120px;height:.8em;vertical-align:middle;border-radius:2px;
background:linear-gradient(90deg,rgba(var(--hl),0),rgba(var(--hl),1))}
"""

INDEX_JS = """
(function () {
  "use strict";
  var table = document.getElementById("features");
  var tbody = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  // Rows wait in an inert <template> (never laid out): only the current page enters the table.
  var template = document.getElementById("rows");
  var rows = Array.prototype.slice.call(template.content.querySelectorAll("tr[data-index]"));
  template.parentNode.removeChild(template);
  var empty = document.getElementById("no-match");
  var inputs = {dmin: document.getElementById("dmin"), dmax: document.getElementById("dmax"),
                q: document.getElementById("q"), size: document.getElementById("size")};
  var numeric = {}, defaults = {};
  heads.forEach(function (th) {
    numeric[th.dataset.key] = th.dataset.type === "num";
    defaults[th.dataset.key] = th.dataset.order;
  });
  var values = rows.map(function (row) {
    var v = {row: row};
    Object.keys(numeric).forEach(function (key) {
      var raw = row.getAttribute("data-" + key);
      if (numeric[key]) { v[key] = (raw === null || raw === "") ? null : Number(raw); }
      else { v[key] = (raw || "").toLowerCase(); }
    });
    return v;
  });
  var state = {};

  // The state comes from the URL fragment (absent keys take their defaults).
  function readHash() {
    var params = {};
    window.location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      if (!part) { return; }
      var i = part.indexOf("=");
      var key = decodeURIComponent(i < 0 ? part : part.slice(0, i));
      params[key] = i < 0 ? "" : decodeURIComponent(part.slice(i + 1).replace(/\\+/g, " "));
    });
    state = {sort: "index", order: "asc", dmin: "", dmax: "", q: "", page: 1, size: 100};
    if (Object.prototype.hasOwnProperty.call(numeric, params.sort)) {
      state.sort = params.sort;
      state.order = defaults[params.sort];
    }
    if (params.order === "asc" || params.order === "desc") { state.order = params.order; }
    ["page", "size"].forEach(function (key) {
      var n = parseInt(params[key], 10);
      if (n > 0) { state[key] = n; }
    });
    ["dmin", "dmax", "q"].forEach(function (key) {
      if (params[key] !== undefined) { state[key] = params[key]; }
    });
  }

  function writeHash() {
    var parts = ["sort=" + encodeURIComponent(state.sort), "order=" + state.order];
    ["dmin", "dmax", "q"].forEach(function (key) {
      if (state[key] !== "") { parts.push(key + "=" + encodeURIComponent(state[key])); }
    });
    if (state.page > 1) { parts.push("page=" + state.page); }
    if (state.size !== 100) { parts.push("size=" + state.size); }
    try { window.history.replaceState(null, "", "#" + parts.join("&")); } catch (e) { /* not essential */ }
  }

  function bound(text) {
    if (text === "" || text === undefined) { return null; }
    var n = Number(text);
    return isFinite(n) ? n / 100 : null;
  }

  function compare(a, b) {
    var x = a[state.sort], y = b[state.sort];
    if (x === null && y === null) { return a.index - b.index; }
    if (x === null) { return 1; }  // missing values last, whatever the order
    if (y === null) { return -1; }
    var c = x < y ? -1 : (x > y ? 1 : 0);
    if (state.order === "desc") { c = -c; }
    return c !== 0 ? c : a.index - b.index;
  }

  function render() {
    var lo = bound(state.dmin), hi = bound(state.dmax), q = state.q.toLowerCase();
    var kept = values.filter(function (v) {
      if (lo !== null && !(v.density >= lo)) { return false; }
      if (hi !== null && !(v.density <= hi)) { return false; }
      if (q && v.explanation.indexOf(q) < 0 && String(v.index) !== q) { return false; }
      return true;
    });
    kept.sort(compare);
    var pages = Math.max(1, Math.ceil(kept.length / state.size));
    state.page = Math.min(Math.max(1, state.page), pages);
    var start = (state.page - 1) * state.size;
    var shown = kept.slice(start, start + state.size);
    var fragment = document.createDocumentFragment();
    shown.forEach(function (v) { fragment.appendChild(v.row); });
    while (tbody.firstChild) { tbody.removeChild(tbody.firstChild); }
    tbody.appendChild(fragment);
    empty.hidden = kept.length !== 0;
    heads.forEach(function (th) {
      if (th.dataset.key === state.sort) {
        th.setAttribute("aria-sort", state.order === "asc" ? "ascending" : "descending");
      } else { th.removeAttribute("aria-sort"); }
    });
    var total = values.length;
    document.getElementById("page-info").textContent = kept.length === 0 ? "no features" :
      (start + 1) + "\\u2013" + (start + shown.length) + " of " + kept.length +
      (kept.length !== total ? " (filtered from " + total + ")" : "") + " \\u00b7 page " + state.page + "/" + pages;
    document.getElementById("prev").disabled = state.page <= 1;
    document.getElementById("next").disabled = state.page >= pages;
    writeHash();
  }

  heads.forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.dataset.key;
      if (state.sort === key) { state.order = state.order === "asc" ? "desc" : "asc"; }
      else { state.sort = key; state.order = defaults[key]; }
      state.page = 1;
      render();
    });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); th.click(); }
    });
  });
  ["dmin", "dmax", "q"].forEach(function (key) {
    inputs[key].addEventListener("input", function () { state[key] = inputs[key].value.trim(); state.page = 1; render(); });
  });
  inputs.size.addEventListener("change", function () { state.size = parseInt(inputs.size.value, 10) || 100; state.page = 1; render(); });
  document.getElementById("prev").addEventListener("click", function () { state.page -= 1; render(); });
  document.getElementById("next").addEventListener("click", function () { state.page += 1; render(); });
  window.addEventListener("hashchange", function () { readHash(); sync(); render(); });

  function sync() {
    inputs.dmin.value = state.dmin; inputs.dmax.value = state.dmax; inputs.q.value = state.q;
    var option = String(state.size), found = false;
    Array.prototype.forEach.call(inputs.size.options, function (o) { if (o.value === option) { found = true; } });
    if (!found) { inputs.size.appendChild(new Option(option, option)); }
    inputs.size.value = option;
  }

  readHash();
  sync();
  render();
  document.documentElement.setAttribute("data-ready", "1");
})();
"""

FEATURE_JS = """
(function () {
  "use strict";
  document.addEventListener("keydown", function (e) {
    if (e.altKey || e.ctrlKey || e.metaKey || /^(INPUT|TEXTAREA|SELECT)$/.test(e.target.tagName)) { return; }
    var rel = e.key === "ArrowLeft" ? "prev" : (e.key === "ArrowRight" ? "next" : null);
    var link = rel && document.querySelector('a[rel="' + rel + '"]');
    if (link) { window.location.href = link.href; }
  });
  document.documentElement.setAttribute("data-ready", "1");
})();
"""


def _page(title: str, body: str, script: str = "") -> str:
    from lmsae import __version__

    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta name="generator" content="lmsae {esc(__version__)}">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n"
            f"<footer>generated by lmsae {esc(__version__)} on {esc(now)}</footer>\n"
            + (f"<script>{script}</script>\n" if script else "") + "</body>\n</html>\n")


def _stats(items: Iterable[tuple[str, str]]) -> str:
    cells = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in items)
    return f'<dl class="stats">{cells}</dl>'


# --- SVG ---------------------------------------------------------------------------------------


def histogram_svg(counts: Sequence[float] | np.ndarray, edges: Sequence[float] | np.ndarray, *,
                  label: str = "activation", fmt: Any = format_activation) -> str:
    """An inline SVG bar chart of a histogram (one ``<title>`` tooltip per bar)."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    edges = np.asarray(edges, dtype=np.float64).reshape(-1)
    if counts.size == 0 or edges.size != counts.size + 1:
        return '<p class="muted">no histogram recorded</p>'
    width, height, left, bottom, top = 720, 170, 48, 26, 8
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = counts.max() if counts.max() > 0 else 1.0
    bar_w = plot_w / counts.size
    parts = [(f'<svg class="hist" viewBox="0 0 {width} {height}" role="img" '
              f'aria-label="{esc(f"histogram of {label} ({int(counts.sum())} values)")}" '
              'xmlns="http://www.w3.org/2000/svg">'),
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/>']
    for i, c in enumerate(counts):
        h = plot_h * c / peak
        if c > 0:
            h = max(h, 1.0)
        x = left + i * bar_w
        tip = f"{fmt(float(edges[i]))} – {fmt(float(edges[i + 1]))}: {int(c):,}"
        parts.append(f'<rect class="bar" x="{x + 0.5:.1f}" y="{top + plot_h - h:.1f}" '
                     f'width="{max(bar_w - 1, 0.5):.1f}" height="{h:.1f}"><title>{esc(tip)}</title></rect>')
    parts.append(f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{esc(f"{int(peak):,}")}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>')
    for pos, anchor in ((0, "start"), (counts.size // 2, "middle"), (counts.size, "end")):
        x = left + pos * bar_w
        parts.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="{anchor}">{esc(fmt(float(edges[pos])))}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --- feature pages ----------------------------------------------------------------------------


def context_html(context: Context, window_start: int, window_end: int, scale: float) -> str:
    """Tokens of a context, each activating one highlighted (opacity ∝ activation; ``title``: value);
    tokens outside ``[window_start, window_end)`` are hidden until "show whole contexts" is ticked."""
    def span(i: int) -> str:
        text = esc(visible(context.tokens[i]))
        value = context.activations[i]
        if value <= 0:
            return text
        level = activation_level(value, scale)
        cls = "on pk" if i == context.peak else "on"
        return f'<span class="{cls}" style="--a:{level:.3f}" title="{esc(format_activation(value))}">{text}</span>'

    n = len(context.tokens)
    left = "".join(span(i) for i in range(window_start))
    middle = "".join(span(i) for i in range(window_start, window_end))
    right = "".join(span(i) for i in range(window_end, n))
    out = []
    if left:
        out.append(f'<span class="cut">…</span><span class="far">{left}</span>')
    out.append(middle)
    if right:
        out.append(f'<span class="far">{right}</span><span class="cut">…</span>')
    return "".join(out)


def _sampling_html(name: str, samples: Sequence[Any], decoder: TokenDecoder, scale: float, window: int) -> str:
    items = []
    for sample in samples:
        full = context_window(sample, decoder, None)
        start, end = window_bounds(len(full.tokens), full.peak, window)
        meta = describe_meta(full.meta)
        title = f' title="{esc(meta)}"' if meta else ""
        reads = "".join(
            f'<div class="reads muted">{esc(name)}: '
            + ", ".join(f'<code>{esc(text)}</code>@{pos} {esc(format_activation(value))}' for text, pos, value in entries)
            + "</div>" for name, entries in sparse_extras(sample, decoder))
        items.append(f'<li{title}><span class="pv">{esc(format_activation(full.peak_value))}</span>'
                     f'<span class="ctx">{context_html(full, start, end, scale)}</span>{reads}</li>')
    body = f'<ol class="ctxs">{"".join(items)}</ol>' if items else '<p class="muted">no samples</p>'
    anchor = "s-" + "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
    return (f'<div class="sampling" id="{esc(anchor)}"><h3>{esc(name)} '
            f'<small class="muted">({len(samples)} context{"s" if len(samples) != 1 else ""})</small></h3>{body}</div>')


def _logits_html(view: FeatureView, decoder: TokenDecoder) -> str:
    if view.logits is None:
        return ""
    entries = [*view.logits.top_positive, *view.logits.top_negative]
    top = max((abs(t.logit) for t in entries), default=0.0) or 1.0
    tables = []
    for label, cls, items in (("promoted", "pos", view.logits.top_positive),
                              ("suppressed", "neg", view.logits.top_negative)):
        rows = "".join(
            f'<tr><td class="tok">{esc(visible(decoder.logit_token(t)))}</td><td class="num">{t.logit:+.3f}</td>'
            f'<td><span class="bar" style="width:{100 * abs(t.logit) / top:.1f}px"></span></td></tr>'
            for t in items)
        tables.append(f'<table class="{cls}"><thead><tr><th colspan="3">{label}</th></tr></thead>'
                      f'<tbody>{rows or "<tr><td colspan=3 class=muted>none</td></tr>"}</tbody></table>')
    return f'<section><h2>Logits</h2><div class="logits">{"".join(tables)}</div></section>'


def _interpretation_html(view: FeatureView) -> str:
    it = view.interpretation
    if it is None:
        return ""
    scores = "".join(f"<li>{esc(k)} <b>{v:.2f}</b></li>" for k, v in sorted(it.scores.items()))
    when = datetime.datetime.fromtimestamp(it.created_at).strftime(" on %Y-%m-%d") if it.created_at else ""
    return (f'<section><h2>Explanation</h2><p class="expl-text">{esc(it.text)}</p>'
            + (f'<ul class="scores">{scores}</ul>' if scores else "")
            + f'<p class="muted">by {esc(it.explainer_model)}{esc(when)}</p></section>')


def _extras_html(view: FeatureView) -> str:
    rows = []
    for key, value in sorted(view.analysis.extras.items()):
        if isinstance(value, (np.ndarray, list, tuple)):
            arr = np.asarray(value)
            shown = (np.array2string(arr, precision=3, threshold=16, max_line_width=100)
                     if arr.size <= 64 else f"array of shape {arr.shape}")
        else:
            shown = str(value)
        rows.append(f"<tr><th>{esc(key)}</th><td><code>{esc(shown)}</code></td></tr>")
    return f"<section><h2>Extras</h2><table>{''.join(rows)}</table></section>" if rows else ""


def feature_page(view: FeatureView, decoder: TokenDecoder, *, prev_index: int | None = None,
                 next_index: int | None = None, window: int = DEFAULT_WINDOW) -> str:
    """The HTML page of one feature (links are relative to ``features/``)."""
    a = view.analysis
    d = view.dictionary
    scale = float(a.max_activation) if a.max_activation > 0 else 1.0
    nav = ['<a href="../index.html">all features</a>']
    if prev_index is not None:
        nav.append(f'<a rel="prev" href="{prev_index}.html">‹ feature {prev_index}</a>')
    if next_index is not None:
        nav.append(f'<a rel="next" href="{next_index}.html">feature {next_index} ›</a>')
    header = (f'<header><p class="crumbs">{" · ".join(nav)}</p>'
              f"<h1>{esc(d.name)} · feature {view.index}</h1>"
              f'<p class="sub">{esc(view.architecture)} · series {esc(d.series)} · analysis '
              f"{esc(view.analysis_name)}{' · model ' + esc(d.model_name) if d.model_name else ''}</p></header>")
    stats = _stats([("activation count", format_number(int(a.act_count))),
                    ("density", format_density(a.density)),
                    ("max activation", format_activation(float(a.max_activation))),
                    ("tokens analysed", format_number(int(a.n_tokens)))])
    sections = [stats,
                ("<section><h2>Activation histogram</h2>"
                 f"{histogram_svg(a.histogram_counts, a.histogram_edges)}"
                 '<p class="muted">non-zero activations; hover a bar for its range and count</p></section>'),
                _interpretation_html(view), _logits_html(view, decoder)]
    samplings = view.samplings()
    contexts = "".join(_sampling_html(s.name, s.samples, decoder, scale, window) for s in samplings)
    sections.append('<section><h2>Contexts</h2>'
                    f'<p class="muted">highlight <span class="legend"></span> 0 → {esc(format_activation(scale))} '
                    "(the feature's max); hover a token for its activation</p>"
                    '<input type="checkbox" id="full"><label for="full"> show whole contexts</label>'
                    f"{contexts or '<p class=muted>no contexts recorded</p>'}</section>")
    sections.append(_extras_html(view))
    body = header + "<main>" + "".join(sections) + "</main>"
    return _page(f"{d.name} · feature {view.index}", body, FEATURE_JS)


# --- the index ---------------------------------------------------------------------------------


@attrs.frozen
class IndexRow:
    """One feature in the index table."""

    index: int
    act_count: int
    n_tokens: int
    max_activation: float
    explanation: str | None = None
    detection: float | None = None

    @property
    def density(self) -> float:
        return self.act_count / self.n_tokens if self.n_tokens else 0.0


def _row_html(row: IndexRow) -> str:
    attrs_ = {
        "index": str(row.index), "act_count": str(row.act_count), "density": _attr_number(row.density),
        "max_activation": _attr_number(row.max_activation), "explanation": row.explanation or "",
        "detection": _attr_number(row.detection),
    }
    data = " ".join(f'data-{k}="{esc(v)}"' for k, v in attrs_.items())
    cls = ' class="dead"' if row.act_count == 0 else ""
    detection = f"{row.detection:.2f}" if row.detection is not None else ""
    return (f"<tr{cls} {data}><td class=\"num\"><a href=\"features/{row.index}.html\">{row.index}</a></td>"
            f'<td class="num">{esc(format_number(row.act_count))}</td>'
            f'<td class="num">{esc(format_density(row.density))}</td>'
            f'<td class="num">{esc(format_activation(row.max_activation))}</td>'
            f'<td class="expl">{esc(row.explanation or "")}</td><td class="num">{esc(detection)}</td></tr>')


def _density_histogram(rows: Sequence[IndexRow]) -> str:
    densities = np.array([r.density for r in rows if r.act_count > 0], dtype=np.float64)
    if densities.size == 0:
        return '<p class="muted">no feature fired</p>'
    logs = np.log10(densities)
    lo, hi = math.floor(logs.min()), math.ceil(logs.max())
    hi = max(hi, lo + 1)
    counts, edges = np.histogram(logs, bins=min(40, 8 * (hi - lo)), range=(lo, hi))
    return histogram_svg(counts, edges, label="log10 density", fmt=lambda v: f"1e{v:.1f}")


def index_page(record: DictionaryRecord, analysis: str, analyses: Sequence[str], rows: Sequence[IndexRow], *,
               n_features: int | None, n_analysed: int) -> str:
    """The index page: summary of the dictionary and the table of ``rows``."""
    config = record.config or {}
    dead = sum(1 for r in rows if r.act_count == 0)
    alive = [r.density for r in rows if r.act_count > 0]
    explained = sum(1 for r in rows if r.explanation)
    hooks = [str(config[k]) for k in ("hook_point_in", "hook_point_out") if config.get(k)]
    items = [("architecture", str(config.get("architecture", "?"))),
             ("features", format_number(n_features) if n_features is not None else "?"),
             ("analysed", format_number(n_analysed)),
             ("in this report", format_number(len(rows))),
             ("dead (never fired)", f"{format_number(dead)} ({100 * dead / len(rows):.1f}%)" if rows else "0"),
             ("median density (alive)", format_density(float(np.median(alive))) if alive else "–"),
             ("explained", format_number(explained))]
    if record.model_name:
        items.insert(1, ("language model", record.model_name))
    if hooks:
        items.append(("hook points", " → ".join(dict.fromkeys(hooks))))
    if record.created_at:
        items.append(("created", datetime.datetime.fromtimestamp(record.created_at).strftime("%Y-%m-%d %H:%M")))
    other = [x for x in analyses if x != analysis]
    header = (f"<header><h1>{esc(record.name)}</h1><p class=\"sub\">series {esc(record.series)} · analysis "
              f"{esc(analysis)}{' (also: ' + esc(', '.join(other)) + ')' if other else ''} · "
              f"<code>{esc(record.path)}</code></p></header>")
    heads = "".join(
        f'<th data-key="{key}" data-type="{"num" if num else "text"}" data-order="{order}"'
        f'{" class=num" if num else ""} tabindex="0" title="sort by {esc(label)}">{esc(label)}</th>'
        for key, label, num, order in COLUMNS)
    table_rows = "\n".join(_row_html(r) for r in rows)
    controls = ('<form class="controls" onsubmit="return false">'
                '<label>density ≥ <input id="dmin" type="text" inputmode="decimal" placeholder="0"> %</label>'
                '<label>density ≤ <input id="dmax" type="text" inputmode="decimal" placeholder="100"> %</label>'
                '<label>search <input id="q" type="search" placeholder="explanation or index"></label>'
                '<label>rows <select id="size"><option>50</option><option selected>100</option>'
                "<option>500</option><option>1000</option></select></label></form>")
    pager = ('<nav class="pager"><button type="button" id="prev">‹ previous</button>'
             '<span id="page-info"></span><button type="button" id="next">next ›</button></nav>')
    body = (header + "<main>" + _stats(items)
            + f"<section><h2>Feature densities</h2>{_density_histogram(rows)}</section>"
            + "<section><h2>Features</h2><p class=\"muted\">click a column header to sort</p>" + controls + pager
            + f'<table class="features" id="features"><thead><tr>{heads}</tr></thead>'
            + f'<tbody></tbody></table><template id="rows">\n{table_rows}\n</template>'
            + "<noscript><p>The feature table needs JavaScript.</p></noscript>"
            + '<p id="no-match" class="muted" hidden>no feature matches the filter</p>'
            + "</section></main>")
    return _page(f"{record.name} · lmsae report", body, INDEX_JS)


# --- writing -----------------------------------------------------------------------------------


@attrs.frozen
class ReportResult:
    """What :func:`write_report` wrote."""

    path: pathlib.Path
    features: tuple[int, ...]

    @property
    def index_path(self) -> pathlib.Path:
        return self.path / "index.html"


def is_report_dir(path: pathlib.Path) -> bool:
    """Whether ``path`` is a directory written by :func:`write_report`."""
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(out: pathlib.Path, overwrite: bool) -> None:
    """:class:`LmsaeError` unless ``out`` can be written: absent, an empty directory, or (with
    ``overwrite``) a previous report. Anything else is never replaced."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise LmsaeError(f"{out} exists and is not a directory; choose another --out")
    if not any(out.iterdir()):
        return
    if not is_report_dir(out):
        raise LmsaeError(f"{out} is not empty and is not an lmsae report (no {MARKER}); refusing to overwrite it, "
                         "choose another --out")
    if not overwrite:
        raise LmsaeError(f"{out} already holds a report; pass --overwrite to replace it")


def select_features(available: Sequence[int] | np.ndarray, features: Sequence[int] | None,
                    max_features: int | None, *, record: DictionaryRecord, analysis: str,
                    registry: Any = None) -> list[int]:
    """The features to report: ``features`` (each checked) or every analysed one, in index order,
    at most ``max_features``."""
    analysed = [int(i) for i in np.asarray(available).reshape(-1)]
    if max_features is not None and max_features < 1:
        raise LmsaeError(f"--max-features must be at least 1 (got {max_features})")
    if features is None:
        chosen = sorted(analysed)
    else:
        known = set(analysed)
        chosen = sorted({int(i) for i in features})
        for index in chosen:
            check_feature_index(record, index, registry)
            if index not in known:
                nearest = closest_index(index, analysed)
                hint = f"; the nearest analysed feature is {nearest}" if nearest is not None else ""
                raise StoreError(f"feature {index} of {record.name!r} has no {analysis!r} analysis{hint}")
    return chosen[:max_features] if max_features is not None else chosen


def write_report(store: Store, name: str, out: str | os.PathLike[str], *, series: str = "default",
                 analysis: str = "default", features: Sequence[int] | None = None,
                 max_features: int | None = None, overwrite: bool = False, progress: bool = False,
                 decoder: TokenDecoder | None = None, registry: Any = None,
                 window: int = DEFAULT_WINDOW) -> ReportResult:
    """Write the static report of dictionary ``name`` to directory ``out``.

    The site is built in a temporary sibling directory and renamed into place, so ``out`` is never
    left half-written. ``out`` may be absent or empty; a previous report is replaced only with
    ``overwrite``; any other directory is refused. ``decoder``: token text (default: the dictionary's
    language-model tokenizer). Raises :class:`StoreError` for unknown dictionaries, analyses or
    features and :class:`LmsaeError` for a destination it must not write.
    """
    out = pathlib.Path(out).expanduser().absolute()
    record = dictionary_or_error(store, name, series)
    analysis_or_error(store, name, series, analysis)
    check_destination(out, overwrite)
    stats = store.feature_statistics(name, series, analysis)
    chosen = select_features(stats["index"], features, max_features, record=record, analysis=analysis,
                             registry=registry)
    if decoder is None:
        decoder = TokenDecoder(tokenizer_for_dictionary(store, record))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        (tmp / "features").mkdir()
        rows: list[IndexRow] = []
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chosen), desc="writing pages", unit="page", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True)
        with bar:
            for pos, index in enumerate(chosen):
                view = load_feature_view(store, name, index, series=series, analysis=analysis, record=record,
                                         registry=registry)
                page = feature_page(view, decoder, prev_index=chosen[pos - 1] if pos > 0 else None,
                                    next_index=chosen[pos + 1] if pos + 1 < len(chosen) else None, window=window)
                (tmp / "features" / f"{index}.html").write_text(page, encoding="utf-8")
                it = view.interpretation
                rows.append(IndexRow(index=index, act_count=int(view.analysis.act_count),
                                     n_tokens=int(view.analysis.n_tokens),
                                     max_activation=float(view.analysis.max_activation),
                                     explanation=it.text if it is not None else None,
                                     detection=(float(it.scores["detection"])
                                                if it is not None and "detection" in it.scores else None)))
                bar.update(1)
        n_features = n_features_of(record, registry)
        page = index_page(record, analysis, store.list_analyses(name, series), rows, n_features=n_features,
                          n_analysed=int(np.asarray(stats["index"]).size))
        (tmp / "index.html").write_text(page, encoding="utf-8")
        marker = {"format": FORMAT, "version": FORMAT_VERSION, "dictionary": name, "series": series,
                  "analysis": analysis, "features": len(chosen), "created_at": datetime.datetime.now().isoformat()}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; a report is meant to be read
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ReportResult(path=out, features=tuple(chosen))


def _move_into_place(tmp: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
    # Checked again: the destination may have changed while the pages were written.
    check_destination(out, overwrite)
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old.rmdir()
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the previous report back
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["COLUMNS", "MARKER", "IndexRow", "ReportResult", "check_destination", "context_html", "esc",
           "feature_page", "histogram_svg", "index_page", "is_report_dir", "select_features",
           "write_report"]
