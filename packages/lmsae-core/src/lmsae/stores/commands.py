"""``lmsae store list|show|remove``: inspect and clean up what a store records.

Every command picks its store with the same options (see :func:`store_options`):
``--store-dir PATH`` for a local store, or ``--mongo-uri URI [--mongo-db DB]`` for MongoDB;
with neither, the default local store (``$LMSAE_STORE_DIR``, else
``~/.local/share/lmsae/store``). Other commands that read a store (``lmsae show``,
``lmsae report``) reuse :func:`store_options` and :func:`store_from_options`.
"""

from __future__ import annotations

import datetime
import logging
import pathlib
from collections.abc import Callable
from typing import Any, TypeVar

import click

from lmsae.errors import StoreError
from lmsae.stores.base import Store, dictionary_or_error

__all__ = ["describe_store", "register", "store_from_options", "store_options"]

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger(__name__)

#: metrics shown first in ``store show`` when an evaluation has them (others follow, in order)
HEADLINE_METRICS = ("explained_variance", "l0", "mse", "ce_loss_delta", "kl_divergence", "loss_recovered",
                    "dead_features")
_MAX_METRICS_SHOWN = 6


def store_options(func: F) -> F:
    """Add ``--store-dir``, ``--mongo-uri`` and ``--mongo-db`` to a click command; the command
    receives them as ``store_dir``, ``mongo_uri`` and ``mongo_db`` (pass them to
    :func:`store_from_options`)."""
    func = click.option("--mongo-db", "mongo_db", default=None, metavar="DB",
                        help="MongoDB database (default: lmsae); needs --mongo-uri.")(func)
    func = click.option("--mongo-uri", "mongo_uri", default=None, metavar="URI",
                        help="Use the MongoDB store at URI (e.g. mongodb://host:27017/).")(func)
    func = click.option("--store-dir", "store_dir", default=None, metavar="PATH",
                        type=click.Path(file_okay=False, path_type=pathlib.Path),
                        help="Use the local store in PATH (default: $LMSAE_STORE_DIR, else "
                             "~/.local/share/lmsae/store).")(func)
    return func


def store_from_options(store_dir: str | pathlib.Path | None, mongo_uri: str | None, mongo_db: str | None, *,
                       create: bool = False) -> Store:
    """Open the store that the command-line options name, without the plugin registry.

    - ``mongo_uri`` given: a :class:`~lmsae.stores.mongo.MongoStore` on that server (never
      replaced by ``$MONGO_URI``, even when it is the default URI) and ``mongo_db`` (default
      ``lmsae``), with the default connection timeout;
    - else a :class:`~lmsae.stores.local.LocalStore` in ``store_dir`` (default: the default
      store directory).

    Args:
        create: create a local store that does not exist yet. Reading commands leave it False,
            so a mistyped ``--store-dir`` is reported instead of silently creating an empty store.

    Raises:
        StoreError: both kinds of store were chosen, ``--mongo-db`` came without ``--mongo-uri``,
            the local store does not exist (and ``create`` is False), or the server is unreachable.
    """
    from lmsae.stores.configs import LocalStoreConfig, MongoStoreConfig

    if mongo_uri is not None:
        if store_dir is not None:
            raise StoreError("choose one store: --store-dir (local) or --mongo-uri (MongoDB), not both")
        from lmsae.stores.mongo import MongoStore

        kwargs = {"database": mongo_db} if mongo_db is not None else {}
        return MongoStore(MongoStoreConfig(uri=mongo_uri, **kwargs), uri=mongo_uri)
    if mongo_db is not None:
        raise StoreError("--mongo-db needs --mongo-uri")
    from lmsae.stores.local import DATABASE_NAME, LocalStore

    config = LocalStoreConfig(directory=pathlib.Path(store_dir) if store_dir is not None else None)
    directory = config.resolved_directory()
    if not create and not (directory / DATABASE_NAME).is_file():
        hint = "" if store_dir is not None else " (choose one with --store-dir, $LMSAE_STORE_DIR or --mongo-uri)"
        raise StoreError(f"no store at {directory}: it has no {DATABASE_NAME}; a store is created by the first "
                         f"task that records something in it{hint}")
    return LocalStore(config)


def describe_store(store: Store) -> str:
    """A short human description of where ``store`` keeps its records."""
    directory = getattr(store, "directory", None)
    if directory is not None:
        return f"local store {directory}"
    uri, config = getattr(store, "uri", None), getattr(store, "config", None)
    if uri is not None:
        from lmsae.stores.mongo import redact_uri

        return f"MongoDB {redact_uri(uri)}, database {getattr(config, 'database', '?')!r}"
    return type(store).__name__


def _feature_total(config: dict[str, Any], registry: Any) -> str:
    """Number of features of a dictionary from its config, as text ('?' when unknown)."""
    if registry is not None:
        from lmsae.config.base import DictionaryConfig
        from lmsae.errors import LmsaeError

        try:
            return str(registry.structure(config, DictionaryConfig).n_features)
        except (LmsaeError, NotImplementedError, AttributeError, TypeError, ValueError) as exc:
            # An architecture that is not installed, or a config from another version.
            log.debug("cannot build the dictionary config to count features: %s", exc)
    # Without the registry, common field names of the built-in architectures.
    for key in ("d_sae", "n_features", "n_latents"):
        if isinstance(config.get(key), int):
            return str(config[key])
    d_model, factor = config.get("d_model"), config.get("expansion_factor")
    if isinstance(d_model, int) and isinstance(factor, (int, float)):
        return str(int(d_model * factor))
    return "?"


def _registry(ctx: click.Context) -> Any:
    obj = ctx.find_root().obj
    return obj.get("registry") if isinstance(obj, dict) else None


def _count(store: Store, method: str, name: str, series: str) -> int | None:
    # Counting helpers are optional extras of the built-in backends, not part of the contract.
    fn = getattr(store, method, None)
    return fn(name, series) if fn is not None else None


def _feature_count(store: Store, name: str, series: str, analysis: str) -> int:
    fn = getattr(store, "feature_count", None)
    if fn is not None:
        return int(fn(name, series, analysis))
    return int(store.feature_statistics(name, series, analysis)["index"].size)


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _headline(metrics: dict[str, Any]) -> str:
    names = [m for m in HEADLINE_METRICS if m in metrics] + [m for m in metrics if m not in HEADLINE_METRICS]
    shown = [f"{m}={metrics[m]:.4g}" if isinstance(metrics[m], (int, float)) else f"{m}={metrics[m]}"
             for m in names[:_MAX_METRICS_SHOWN]]
    more = len(names) - _MAX_METRICS_SHOWN
    return " ".join(shown) + (f" (+{more} more)" if more > 0 else "") if shown else "(no metrics)"


def _when(timestamp: float) -> str:
    if not timestamp:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def register(cli: click.Group) -> None:
    """Add the ``store`` command group to ``cli``."""

    @cli.group("store")
    def store_group() -> None:
        """List, show and remove what a store records about dictionaries."""

    @store_group.command("list")
    @click.option("--series", default=None, help="Only dictionaries of this series.")
    @store_options
    @click.pass_context
    def list_cmd(ctx: click.Context, series: str | None, store_dir: pathlib.Path | None, mongo_uri: str | None,
                 mongo_db: str | None) -> None:
        """List the dictionaries in the store."""
        registry = _registry(ctx)
        with store_from_options(store_dir, mongo_uri, mongo_db) as store:
            records = store.list_dictionaries(series)
            if not records:
                where = f" in series {series!r}" if series is not None else ""
                click.echo(f"no dictionaries{where} in {describe_store(store)}")
                return
            rows = [(r.name, r.series, str(r.config.get("architecture", "?")), _feature_total(r.config, registry),
                     r.path, ", ".join(store.list_analyses(r.name, r.series)) or "-") for r in records]
        _table(rows, ("name", "series", "architecture", "features", "path", "analyses"))

    @store_group.command("show")
    @click.argument("name")
    @click.option("--series", default="default", show_default=True, help="Series of the dictionary.")
    @store_options
    @click.pass_context
    def show_cmd(ctx: click.Context, name: str, series: str, store_dir: pathlib.Path | None, mongo_uri: str | None,
                 mongo_db: str | None) -> None:
        """Show what the store records about dictionary NAME."""
        registry = _registry(ctx)
        with store_from_options(store_dir, mongo_uri, mongo_db) as store:
            record = dictionary_or_error(store, name, series)
            click.echo(f"dictionary {record.name} (series {record.series})")
            click.echo(f"  architecture: {record.config.get('architecture', '?')}")
            click.echo(f"  features: {_feature_total(record.config, registry)}")
            click.echo(f"  path: {record.path}")
            click.echo(f"  language model: {record.model_name or '-'}")
            click.echo(f"  created: {_when(record.created_at)}")
            analyses = store.list_analyses(name, series)
            click.echo(f"  analyses: {len(analyses) or 'none'}")
            for analysis in analyses:
                click.echo(f"    {analysis}: {_feature_count(store, name, series, analysis)} features")
            logits = _count(store, "count_logit_attributions", name, series)
            click.echo(f"  logit attributions: {'?' if logits is None else logits}")
            click.echo(f"  interpretations: {len(store.interpreted_features(name, series))}")
            evaluations = store.list_evaluations(name, series)
            click.echo(f"  evaluations: {len(evaluations) or 'none'}")
            for evaluation in evaluations:
                click.echo(f"    {evaluation.name}: {_headline(dict(evaluation.metrics))}")

    @store_group.command("remove")
    @click.argument("name")
    @click.option("--series", default="default", show_default=True, help="Series of the dictionary.")
    @click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
    @store_options
    def remove_cmd(name: str, series: str, yes: bool, store_dir: pathlib.Path | None, mongo_uri: str | None,
                   mongo_db: str | None) -> None:
        """Remove dictionary NAME and everything recorded about it (its files are kept)."""
        with store_from_options(store_dir, mongo_uri, mongo_db) as store:
            record = dictionary_or_error(store, name, series)
            where = describe_store(store)
            if not yes:
                analyses = store.list_analyses(name, series)
                question = (f"remove dictionary {name!r} (series {series!r}) from {where}, with "
                            f"{len(analyses)} analyses, its logit attributions, interpretations and evaluations?")
                if not click.confirm(question, default=False):
                    click.echo("nothing removed")
                    return
            store.remove_dictionary(name, series)
        click.echo(f"removed {name!r} (series {series!r}) from {where}; the files at {record.path} are kept")
