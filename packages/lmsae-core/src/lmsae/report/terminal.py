"""``lmsae show feature``: one feature of a dictionary, rendered for a terminal.

With colour, each activating token gets an ANSI 256-colour background from a pale-to-red ramp
(the feature's maximum activation is the top of the ramp, so contexts compare); without colour
(``--no-color``, or output that is not a terminal) it is written ``«token:0.83»``.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import numpy as np

from lmsae.report.text import (
    Context,
    FeatureView,
    TokenDecoder,
    activation_level,
    context_window,
    format_activation,
    format_density,
    format_number,
    sparse_extras,
    visible,
)

#: background colours (xterm 256-colour indices), weakest to strongest
RAMP: tuple[int, ...] = (230, 229, 228, 222, 221, 215, 214, 208, 202, 196)
#: ramp entries dark enough to need white text
_WHITE_TEXT = frozenset({202, 196})
RESET = "\x1b[0m"
BOLD = "\x1b[1m"
DIM = "\x1b[2m"

_BARS = "▁▂▃▄▅▆▇█"


def ramp_color(level: float) -> int:
    """The ramp colour of a highlight strength in (0, 1]."""
    i = min(len(RAMP) - 1, max(0, int(np.ceil(level * len(RAMP))) - 1))
    return RAMP[i]


def highlight_token(text: str, value: float, scale: float, *, color: bool, peak: bool = False) -> str:
    """One token (already :func:`visible`), highlighted when it activates."""
    if value <= 0:
        return text
    if not color:
        return f"«{text}:{format_activation(value)}»"
    bg = ramp_color(activation_level(value, scale))
    fg = 231 if bg in _WHITE_TEXT else 16
    return f"\x1b[48;5;{bg}m\x1b[38;5;{fg}m{BOLD if peak else ''}{text}{RESET}"


def render_context(context: Context, scale: float, *, color: bool) -> str:
    """One context on one line: ``…`` where the window cuts the sample."""
    parts = [highlight_token(visible(tok), act, scale, color=color, peak=i == context.peak)
             for i, (tok, act) in enumerate(zip(context.tokens, context.activations))]
    return ("…" if context.cut_left else "") + "".join(parts) + ("…" if context.cut_right else "")


def sparkline(counts: Sequence[float] | np.ndarray, width: int = 48) -> str:
    """Counts as a row of block characters (re-binned to at most ``width``); a non-empty bin is
    never drawn empty."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    if counts.size == 0:
        return ""
    if counts.size > width:
        groups = np.array_split(counts, width)
        counts = np.array([g.sum() for g in groups])
    top = counts.max()
    if top <= 0:
        return _BARS[0] * counts.size
    chars = []
    for c in counts:
        if c <= 0:
            chars.append(" ")
        else:
            chars.append(_BARS[max(0, int(np.ceil(c / top * len(_BARS))) - 1)])
    return "".join(chars)


def _style(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{RESET}" if color else text


def render_feature(view: FeatureView, decoder: TokenDecoder, *, color: bool = False, samples: int = 5,
                   window: int | None = 24) -> str:
    """The whole terminal report of one feature (lines joined by newlines, no trailing newline).

    ``samples``: top contexts shown; ``window``: tokens shown around each context's peak (None: all);
    ``color``: ANSI colours, else ``«token:value»`` markers.
    """
    a = view.analysis
    d = view.dictionary
    scale = float(a.max_activation) if a.max_activation > 0 else 1.0
    lines: list[str] = []
    title = f"{d.name} · feature {view.index}"
    lines.append(_style(title, BOLD, color))
    meta = [f"architecture {view.architecture}", f"series {d.series}", f"analysis {view.analysis_name}"]
    if d.model_name:
        meta.insert(1, f"model {d.model_name}")
    lines.append(_style(" · ".join(meta), DIM, color))
    lines.append("")
    lines.append(f"activations  {format_number(int(a.act_count))} of {format_number(int(a.n_tokens))} tokens "
                 f"(density {format_density(a.density)})")
    lines.append(f"max          {format_activation(float(a.max_activation))}")
    counts = np.asarray(a.histogram_counts).reshape(-1)
    edges = np.asarray(a.histogram_edges, dtype=np.float64).reshape(-1)
    if counts.size and edges.size == counts.size + 1 and counts.sum() > 0:
        lines.append(f"histogram    {format_activation(float(edges[0]))} {sparkline(counts)} "
                     f"{format_activation(float(edges[-1]))}")

    if view.logits is not None:
        lines.append("")
        for label, entries in (("promotes", view.logits.top_positive), ("suppresses", view.logits.top_negative)):
            if entries:
                shown = "  ".join(f"{visible(decoder.logit_token(t))!r} {t.logit:+.2f}" for t in entries[:10])
                lines.append(f"{label:<12} {shown}")

    if view.interpretation is not None:
        it = view.interpretation
        lines.append("")
        lines.append(f"explanation  {visible(it.text)}")
        if it.scores:
            lines.append("scores       " + "  ".join(f"{k} {v:.2f}" for k, v in sorted(it.scores.items())))
        when = (datetime.datetime.fromtimestamp(it.created_at).strftime(" on %Y-%m-%d") if it.created_at else "")
        lines.append(_style(f"             by {it.explainer_model}{when}", DIM, color))

    samplings = view.samplings()
    top = view.top_sampling()
    if top is not None and samples > 0:
        lines.append("")
        lines.append(_style(f"{top.name} ({min(samples, len(top.samples))} of {len(top.samples)})", BOLD, color))
        for sample in top.samples[:samples]:
            ctx = context_window(sample, decoder, window)
            lines.append(f"{format_activation(ctx.peak_value):>7}  {render_context(ctx, scale, color=color)}")
            for name, entries in sparse_extras(sample, decoder):
                reads = ", ".join(f"{text!r}@{pos} {format_activation(value)}" for text, pos, value in entries)
                lines.append(_style(f"{'':>7}  {name}: {reads}", DIM, color))
    others = [s for s in samplings if s is not top]
    if others:
        lines.append("")
        width = max(len(s.name) for s in others)
        for sampling in others:
            if sampling.samples:
                ctx = context_window(sampling.samples[0], decoder, window)
                body = f"{format_activation(ctx.peak_value):>7}  {render_context(ctx, scale, color=color)}"
            else:
                body = "(no samples)"
            lines.append(f"{sampling.name:<{width}}  {body}")
    if top is None:
        lines.append("")
        lines.append("no contexts recorded")
    return "\n".join(lines)


__all__ = ["RAMP", "highlight_token", "ramp_color", "render_context", "render_feature", "sparkline"]
