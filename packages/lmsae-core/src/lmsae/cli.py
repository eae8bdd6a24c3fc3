"""The ``lmsae`` command line.

``lmsae run CONFIG`` runs any task; ``lmsae plugins`` lists what is installed; ``lmsae config``
checks configs and prints examples. Plugins add commands through ``lmsae_register_commands``.
User errors print one clear line (one per problem for configs) and exit with code 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from typing import Any

# Before torch loads its OpenMP runtime: threads that finish a parallel region sleep instead of
# spinning. On a CPU shared with other processes (or with torchrun's workers) spinning threads
# stall every region while another process holds a core (measured: a TopK SAE step 2.8-5.2x the
# GEMM time instead of 2.0x; benchmarks/README.md). Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from lmsae import __version__
from lmsae.errors import LmsaeError
from lmsae.registry import Registry, load_registry

log = logging.getLogger("lmsae")


def _registry(ctx: click.Context) -> Registry:
    return ctx.find_root().obj["registry"]


def load_run_config(registry: Registry, path: str | os.PathLike, overrides: tuple[str, ...] = ()) -> Any:
    """Read, override and validate a run config file."""
    from lmsae.config.base import RunConfig
    from lmsae.config.files import apply_overrides, read_config_file

    data = apply_overrides(read_config_file(path), overrides)
    return registry.structure(data, RunConfig, source=str(path))


def build_cli(registry: Registry) -> click.Group:
    """The click group with the core commands and every plugin's commands."""

    @click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.version_option(__version__, prog_name="lmsae")
    @click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
    @click.pass_context
    def cli(ctx: click.Context, debug: bool) -> None:
        """lmsae: train, evaluate and analyse sparse dictionaries on language-model activations."""
        ctx.ensure_object(dict)
        ctx.obj["debug"] = debug
        ctx.obj["registry"] = registry
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    @cli.command()
    @click.argument("config_file", type=click.Path(dir_okay=False, path_type=pathlib.Path))
    @click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                  help="Override a config value (repeatable), e.g. --set trainer.lr=1e-3.")
    @click.pass_context
    def run(ctx: click.Context, config_file: pathlib.Path, overrides: tuple[str, ...]) -> None:
        """Run the task described by CONFIG_FILE (TOML, YAML or JSON)."""
        from lmsae.runtime import RunContext

        reg = _registry(ctx)
        config = load_run_config(reg, config_file, overrides)
        spec = reg.get("task", config.name)
        try:
            spec.factory(config, RunContext(registry=reg, config_path=config_file, debug=ctx.obj["debug"]))
        finally:
            _close_process_group()

    @cli.command("plugins")
    @click.pass_context
    def plugins_cmd(ctx: click.Context) -> None:
        """List installed components: name, kind, distribution, version."""
        reg = _registry(ctx)
        rows = [(e.name, e.kind, e.distribution, e.version) for e in reg.entries()]
        rows += [(name, "command", dist, ver) for name, dist, ver in ctx.find_root().obj.get("plugin_commands", [])]
        header = ("name", "kind", "distribution", "version")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
        for row in [header, tuple("-" * w for w in widths), *rows]:
            click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        for failure in reg.failures:
            click.echo(f"not loaded: {failure}", err=True)

    @cli.group()
    def config() -> None:
        """Validate configs and print examples."""

    @config.command("check")
    @click.argument("config_file", type=click.Path(dir_okay=False, path_type=pathlib.Path))
    @click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a value first.")
    @click.pass_context
    def config_check(ctx: click.Context, config_file: pathlib.Path, overrides: tuple[str, ...]) -> None:
        """Validate CONFIG_FILE without running it."""
        cfg = load_run_config(_registry(ctx), config_file, overrides)
        click.echo(f"{config_file}: valid {cfg.name!r} config")

    @config.command("example")
    @click.argument("name")
    @click.pass_context
    def config_example(ctx: click.Context, name: str) -> None:
        """Print a valid config for a task or an architecture NAME."""
        from lmsae._text import did_you_mean, join_names
        from lmsae.config.files import dumps_toml

        reg = _registry(ctx)
        tasks, archs = reg.names("task"), reg.names("architecture")
        if name in tasks:
            spec, kwargs = reg.get("task", name), {}
        elif name in archs:
            task = "train" if "train" in tasks else "init"
            spec, kwargs = reg.get("task", task), {"architecture": name}
        else:
            raise LmsaeError(f"no task or architecture called {name!r}; tasks: {join_names(tasks)}; "
                             f"architectures: {join_names(archs)}{did_you_mean(name, tasks + archs)}")
        if spec.example is None:
            raise LmsaeError(f"task {spec.name!r} provides no example config")
        cfg = spec.example(reg, **kwargs)
        click.echo(f"# lmsae config example {name}\n" + dumps_toml(reg.unstructure(cfg)), nl=False)

    @config.command("reference")
    @click.option("--distribution", "distributions", multiple=True,
                  help="Only components from these distributions (repeatable; default: every installed one).")
    @click.pass_context
    def config_reference(ctx: click.Context, distributions: tuple[str, ...]) -> None:
        """Print the configuration reference (Markdown) of every installed component."""
        from lmsae.config.reference import render_reference

        reg = _registry(ctx)
        if distributions:
            reg = reg.restricted(set(distributions))
        click.echo(render_reference(reg), nl=False)

    return cli


def _close_process_group() -> None:
    """Tear down torch.distributed's default group if a task started one (torchrun runs): a
    process that exits with a live gloo group can abort when its peers have already gone."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - best effort at exit, never mask the task's own error
        log.debug("closing the process group failed: %s", exc)


def _add_plugin_commands(cli: click.Group, registry: Registry) -> list[tuple[str, str, str]]:
    """Let every plugin add commands; a clash with an existing command is reported, not applied."""
    added: list[tuple[str, str, str]] = []
    for name, info in registry.plugins.items():
        impl = getattr(info.module, "lmsae_register_commands", None)
        if impl is None:
            continue
        before = dict(cli.commands)
        try:
            impl(cli=cli)
        except Exception as exc:  # a broken plugin must not break the CLI
            cli.commands.clear()
            cli.commands.update(before)
            click.echo(f"lmsae: warning: plugin {name!r} ({info.distribution}) failed to add commands: "
                       f"{type(exc).__name__}: {exc}", err=True)
            continue
        for cmd_name in list(cli.commands):
            if cmd_name in before and cli.commands[cmd_name] is not before[cmd_name]:
                click.echo(f"lmsae: warning: plugin {name!r} ({info.distribution}) tried to replace the "
                           f"command {cmd_name!r}; kept the original", err=True)
                cli.commands[cmd_name] = before[cmd_name]
            elif cmd_name not in before:
                added.append((cmd_name, info.distribution, info.version))
    return added


def main(argv: list[str] | None = None, registry: Registry | None = None) -> None:
    """Entry point of the ``lmsae`` console script (tests may pass their own ``registry``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        registry = registry if registry is not None else load_registry()
    except LmsaeError as exc:
        if debug:
            raise
        click.echo(f"lmsae: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    for failure in registry.failures:
        click.echo(f"lmsae: warning: {failure}", err=True)
    cli = build_cli(registry)
    added = _add_plugin_commands(cli, registry)
    try:
        cli.main(args=argv, prog_name="lmsae", standalone_mode=False, obj={"plugin_commands": added})
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except LmsaeError as exc:
        if debug:
            raise
        click.echo(f"lmsae: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
