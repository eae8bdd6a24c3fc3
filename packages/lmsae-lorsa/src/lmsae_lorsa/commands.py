"""``lmsae lorsa ...``: initialise a Lorsa from the language model's attention layer."""

from __future__ import annotations

import pathlib

import click


def register(cli: click.Group) -> None:
    @cli.group("lorsa")
    def lorsa() -> None:
        """Low-rank sparse attention tools (lmsae-lorsa)."""

    @lorsa.command("init-from-model")
    @click.argument("config_file", type=click.Path(dir_okay=False, exists=True, path_type=pathlib.Path))
    @click.argument("output_dir", type=click.Path(file_okay=False, path_type=pathlib.Path))
    @click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                  help="Override a value of CONFIG_FILE first (repeatable).")
    @click.pass_context
    def init_from_model(ctx: click.Context, config_file: pathlib.Path, output_dir: pathlib.Path,
                        overrides: tuple[str, ...]) -> None:
        """Initialise the Lorsa of CONFIG_FILE from its language model's attention layer and save it to
        OUTPUT_DIR (replaced if it exists).

        CONFIG_FILE is a train config with a [dictionary] (architecture = "lorsa"), a [model] and
        [activations] of sequences (or a lorsa_init config). Continue training the result with
        [pretrained] path = "OUTPUT_DIR"."""
        from lmsae.cli import load_run_config
        from lmsae.errors import ConfigError
        from lmsae.runtime import RunContext

        from lmsae_lorsa.tasks import LorsaInitRunConfig, run

        registry = ctx.find_root().obj["registry"]
        cfg = load_run_config(registry, config_file, overrides)
        if isinstance(cfg, LorsaInitRunConfig):
            init_cfg = LorsaInitRunConfig(**{**_fields(cfg), "output_dir": output_dir, "overwrite": True})
        else:
            dictionary = getattr(cfg, "dictionary", None)
            problems = []
            if dictionary is None:
                problems.append("$.dictionary: missing (a [dictionary] table with architecture = \"lorsa\")")
            if getattr(cfg, "model", None) is None:
                problems.append("$.model: missing (the language model whose attention layer is copied)")
            if getattr(cfg, "activations", None) is None:
                problems.append("$.activations: missing (sequences for the dataset norms and the initialisation)")
            if problems:
                raise ConfigError(problems, source=str(config_file))
            kwargs = dict(dictionary=dictionary, model=cfg.model, activations=cfg.activations, output_dir=output_dir,
                          overwrite=True)
            if getattr(cfg, "initializer", None) is not None:
                kwargs["initializer"] = cfg.initializer
            if getattr(cfg, "device", None) is not None:
                kwargs["device"] = cfg.device
            try:
                init_cfg = LorsaInitRunConfig(**kwargs)
            except ValueError as exc:  # FieldValueError from the cross-field checks
                raise ConfigError([f"$.{getattr(exc, 'field', 'dictionary')}: {getattr(exc, 'message', exc)}"],
                                  source=str(config_file)) from None
        run(init_cfg, RunContext(registry=registry, config_path=config_file, debug=ctx.find_root().obj.get("debug",
                                                                                                         False)))


def _fields(cfg) -> dict:
    import attrs

    return {f.name: getattr(cfg, f.name) for f in attrs.fields(type(cfg))}
