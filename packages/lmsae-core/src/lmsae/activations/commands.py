"""``lmsae activations check DIR``: verify an activation cache and list every problem found."""

from __future__ import annotations

import json
import pathlib

import click


def register(cli: click.Group) -> None:
    """Add the ``activations`` command group (with ``check``) to ``cli``."""

    @cli.group("activations")
    def activations() -> None:
        """Inspect activation caches written by the activation-generation task."""

    @activations.command("check")
    @click.argument("directory", type=click.Path(file_okay=False, path_type=pathlib.Path))
    @click.option("--verify", type=click.Choice(["sha256", "size"]), default="sha256", show_default=True,
                  help="sha256: compare every file's checksum with the manifest (exact); size: compare byte "
                       "counts only (fast).")
    @click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
    def check_cmd(directory: pathlib.Path, verify: str, progress: bool) -> None:
        """Check every chunk file of the cache in DIRECTORY; exit code 2 when problems are found.

        Prints a summary, then one line per problem (file, hook point, what is wrong).
        """
        from lmsae.activations.cache import check_cache, describe_cache
        from lmsae.errors import DataError

        report = check_cache(directory, verify=verify, progress=progress)  # type: ignore[arg-type]
        try:
            info = describe_cache(directory)
        except DataError:
            info = None  # the report already says why
        if info is not None:
            hooks = ", ".join(f"{h} (d={v.get('d')}, {v.get('dtype')})" for h, v in info["hook_points"].items())
            dataset = info["dataset"] if isinstance(info["dataset"], str) else json.dumps(info["dataset"])
            click.echo(f"cache:    {info['path']} ({info['format']} v{info['version']})")
            click.echo(f"model:    {info['model']}; dataset: {dataset}")
            click.echo(f"hooks:    {hooks}")
            click.echo(f"layout:   {info['layout']}, context_size={info['context_size']}")
        click.echo(report.summary())
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        if not report.ok:
            n = len(report.problems)
            raise DataError(f"activation cache {directory}: {n} problem{'s' if n != 1 else ''} found "
                            f"(verify={verify})")
