"""``lmsae crosscoder ...`` commands (added through ``lmsae_register_commands``)."""

from __future__ import annotations

import json
import pathlib

import click

from lmsae.errors import LmsaeError

__all__ = ["register"]


def _bar(count: int, largest: int, width: int = 40) -> str:
    return "#" * (round(width * count / largest) if largest else 0)


def register(cli: click.Group) -> None:
    """Add the ``crosscoder`` command group to ``cli``."""

    @cli.group("crosscoder")
    def crosscoder() -> None:
        """Inspect crosscoders (added by lmsae-crosscoder)."""

    @crosscoder.command("heads")
    @click.argument("dictionary_dir", type=click.Path(file_okay=False, path_type=pathlib.Path))
    @click.option("--threshold", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.1, show_default=True,
                  help="A head uses a feature when its share of the feature's decoder norm is at least this. "
                       "Shared: every head uses it; specific: one head only.")
    @click.option("--bins", type=click.IntRange(1, 1000), default=10, show_default=True,
                  help="Bins of the histogram of the first head's share.")
    @click.option("--per-feature", is_flag=True, help="Also list every feature's relative decoder norm per head.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
    @click.pass_context
    def heads(ctx: click.Context, dictionary_dir: pathlib.Path, threshold: float, bins: int, per_feature: bool,
              as_json: bool) -> None:
        """Distribution of a crosscoder's features over its heads (shared vs head-specific).

        For each feature, the relative decoder norm of head h is g_h||W_D[h,i]|| divided by the sum
        over heads (normalised units, unchanged by folding).
        """
        from lmsae.dictionary.io import load_dictionary

        from lmsae_crosscoder.analysis import head_distribution
        from lmsae_crosscoder.model import Crosscoder

        registry = ctx.find_root().obj["registry"]
        model = load_dictionary(dictionary_dir, registry)
        if not isinstance(model, Crosscoder):
            raise LmsaeError(f"{dictionary_dir} holds a {model.config.name!r} dictionary, not a crosscoder")
        dist = head_distribution(model, threshold=threshold, bins=bins)
        if as_json:
            click.echo(json.dumps(dist.to_json(per_feature=per_feature), indent=2))
            return
        hooks = dist.hook_points
        n = dist.n_features
        width = max(len(h) for h in hooks)
        click.echo(f"{dictionary_dir}: crosscoder with {len(hooks)} heads, {n:,} features "
                   f"(a head uses a feature when its relative decoder norm is >= {threshold:g})")
        click.echo("")
        click.echo("mean relative decoder norm per head:")
        for i, hook in enumerate(hooks):
            click.echo(f"  {hook.ljust(width)}  {float(dist.relative[:, i].mean()):.3f}")
        click.echo("")
        click.echo("features:")
        pct = (lambda c: f"{c:>8,}  {100.0 * c / max(n, 1):5.1f}%")
        click.echo(f"  {'shared by all heads'.ljust(width + 9)}  {pct(dist.counts['shared'])}")
        for hook in hooks:
            click.echo(f"  {('specific to ' + hook).ljust(width + 9)}  {pct(dist.counts[hook])}")
        if len(hooks) > 2:
            click.echo(f"  {'used by some heads'.ljust(width + 9)}  {pct(dist.counts['partial'])}")
        if dist.counts["zero"]:
            click.echo(f"  {'without decoder'.ljust(width + 9)}  {pct(dist.counts['zero'])}")
        if len(hooks) > 2:
            click.echo("")
            click.echo("number of heads using each feature:")
            largest = max(dist.heads_used[1:], default=0)
            for k in range(1, len(hooks) + 1):
                click.echo(f"  {k:>3}  {dist.heads_used[k]:>8,}  {_bar(dist.heads_used[k], largest)}")
        edges, counts = dist.first_head_histogram
        click.echo("")
        other = hooks[1] if len(hooks) == 2 else "the other heads"
        click.echo(f"share of {hooks[0]} (0 = specific to {other}, 1 = specific to {hooks[0]}):")
        largest = max(counts, default=0)
        for b, count in enumerate(counts):
            close = "]" if b == len(counts) - 1 else ")"
            click.echo(f"  [{edges[b]:.2f}, {edges[b + 1]:.2f}{close}  {count:>8,}  {_bar(count, largest)}")
        if per_feature:
            click.echo("")
            click.echo("feature  " + "  ".join(h.rjust(max(len(h), 6)) for h in hooks) + "  category")
            for i in range(n):
                cells = "  ".join(f"{float(dist.relative[i, h]):.3f}".rjust(max(len(hook), 6))
                                  for h, hook in enumerate(hooks))
                click.echo(f"{i:>7}  {cells}  {dist.label(i)}")
