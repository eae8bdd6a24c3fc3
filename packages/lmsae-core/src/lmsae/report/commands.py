"""``lmsae show feature NAME INDEX`` (terminal) and ``lmsae report NAME --out DIR`` (static HTML)."""

from __future__ import annotations

import os
import pathlib
import re
import sys
from typing import Any

import click

from lmsae.stores.base import Store
from lmsae.stores.commands import store_from_options, store_options

#: longest range --features accepts (a typo like 0-99999999 must not allocate for minutes)
MAX_RANGE = 10_000_000


def open_store(store_dir: pathlib.Path | None, mongo_uri: str | None, mongo_db: str | None) -> Store:
    """The store the command-line options name (the same options as ``lmsae store``)."""
    return store_from_options(store_dir, mongo_uri, mongo_db)


def parse_feature_list(_ctx: click.Context | None, _param: click.Parameter | None, value: str | None) -> list[int] | None:
    """``"1,2,3"`` or ranges ``"0-9,42"`` -> sorted unique indices (None when not given)."""
    if value is None:
        return None
    indices: set[int] = set()
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if match is None:
            raise click.BadParameter(f"{part!r} is not a feature index or a range like 0-9")
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        if stop < start:
            raise click.BadParameter(f"range {part!r} ends before it starts")
        if stop - start >= MAX_RANGE:
            raise click.BadParameter(f"range {part!r} is longer than {MAX_RANGE:,} features")
        indices.update(range(start, stop + 1))
    if not indices:
        raise click.BadParameter("no feature index given")
    return sorted(indices)


def _registry(ctx: click.Context) -> Any:
    obj = ctx.find_root().obj
    return obj.get("registry") if isinstance(obj, dict) else None


def _use_color(choice: bool | None) -> bool:
    if choice is not None:
        return choice
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def register(cli: click.Group) -> None:
    """Add ``show`` (with ``feature``) and ``report`` to ``cli``."""

    @cli.group("show")
    def show() -> None:
        """Show what the store knows about a dictionary's features."""

    @show.command("feature")
    @click.argument("name")
    @click.argument("index", type=int)
    @click.option("--series", default="default", show_default=True, help="Series of the dictionary.")
    @click.option("--analysis", default="default", show_default=True, help="Name of the analysis run.")
    @click.option("-n", "--samples", type=click.IntRange(min=0), default=5, show_default=True,
                  help="Top-activation contexts to show.")
    @click.option("--window", type=click.IntRange(min=1), default=24, show_default=True,
                  help="Tokens shown around each context's peak.")
    @click.option("--color/--no-color", default=None,
                  help="Colour tokens by activation (default: on a terminal unless NO_COLOR is set); without "
                       "colour, activating tokens are written «token:value».")
    @store_options
    @click.pass_context
    def feature_cmd(ctx: click.Context, name: str, index: int, series: str, analysis: str, samples: int,
                    window: int, color: bool | None, store_dir: pathlib.Path | None, mongo_uri: str | None,
                    mongo_db: str | None) -> None:
        """Print feature INDEX of dictionary NAME: statistics, histogram, logits, explanation, contexts."""
        from lmsae.report.terminal import render_feature
        from lmsae.report.text import TokenDecoder, load_feature_view, tokenizer_for_dictionary

        with open_store(store_dir, mongo_uri, mongo_db) as store:
            view = load_feature_view(store, name, index, series=series, analysis=analysis,
                                     registry=_registry(ctx))
            decoder = TokenDecoder(tokenizer_for_dictionary(store, view.dictionary))
        use_color = _use_color(color)
        click.echo(render_feature(view, decoder, color=use_color, samples=samples, window=window), color=use_color)

    @cli.command("report")
    @click.argument("name")
    @click.option("-o", "--out", required=True, type=click.Path(path_type=pathlib.Path),
                  help="Directory to write (absent, empty, or a previous report with --overwrite).")
    @click.option("--series", default="default", show_default=True, help="Series of the dictionary.")
    @click.option("--analysis", default="default", show_default=True, help="Name of the analysis run.")
    @click.option("--features", callback=parse_feature_list, metavar="LIST",
                  help="Only these features, e.g. 1,2,3 or 0-99,512.")
    @click.option("--max-features", type=click.IntRange(min=1), default=None,
                  help="At most this many features (the lowest indices).")
    @click.option("--window", type=click.IntRange(min=1), default=64, show_default=True,
                  help="Tokens shown around each context's peak (the page can show whole contexts).")
    @click.option("--overwrite", is_flag=True, help="Replace a previous report in --out.")
    @click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
    @store_options
    @click.pass_context
    def report_cmd(ctx: click.Context, name: str, out: pathlib.Path, series: str, analysis: str,
                   features: list[int] | None, max_features: int | None, window: int, overwrite: bool,
                   progress: bool, store_dir: pathlib.Path | None, mongo_uri: str | None,
                   mongo_db: str | None) -> None:
        """Write a static HTML report of dictionary NAME's features (open OUT/index.html in a browser)."""
        from lmsae.report.html import write_report

        with open_store(store_dir, mongo_uri, mongo_db) as store:
            result = write_report(store, name, out, series=series, analysis=analysis, features=features,
                                  max_features=max_features, overwrite=overwrite, progress=progress,
                                  registry=_registry(ctx), window=window)
        n = len(result.features)
        click.echo(f"wrote {n} feature page{'s' if n != 1 else ''} to {result.path}")
        click.echo(f"open {result.index_path.as_uri()}")


__all__ = ["open_store", "parse_feature_list", "register"]
