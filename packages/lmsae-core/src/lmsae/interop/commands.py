"""``lmsae saelens export|import``: convert between lmsae dictionaries and the SAELens format."""

from __future__ import annotations

import pathlib

import click


def register(cli: click.Group) -> None:
    @cli.group("saelens")
    def saelens() -> None:
        """Convert SAEs to and from the SAELens format (cfg.json + sae_weights.safetensors)."""

    @saelens.command("export")
    @click.argument("dictionary_dir", type=click.Path(file_okay=False, exists=True, path_type=pathlib.Path))
    @click.argument("output_dir", type=click.Path(file_okay=False, path_type=pathlib.Path))
    @click.option("--hook-name", default=None, help="hook_name to write (default: the SAE's input hook point).")
    @click.pass_context
    def export_cmd(ctx: click.Context, dictionary_dir: pathlib.Path, output_dir: pathlib.Path,
                   hook_name: str | None) -> None:
        """Export the lmsae SAE in DICTIONARY_DIR to OUTPUT_DIR in SAELens' format (exactly)."""
        from lmsae.dictionary.io import load_dictionary
        from lmsae.interop.saelens import export_saelens

        registry = ctx.find_root().obj["registry"]
        model = load_dictionary(dictionary_dir, registry)
        export_saelens(model, output_dir, hook_name=hook_name, registry=registry)
        click.echo(f"exported {dictionary_dir} -> {output_dir} (SAELens format)")

    @saelens.command("import")
    @click.argument("saelens_dir", type=click.Path(file_okay=False, exists=True, path_type=pathlib.Path))
    @click.argument("output_dir", type=click.Path(file_okay=False, path_type=pathlib.Path))
    @click.pass_context
    def import_cmd(ctx: click.Context, saelens_dir: pathlib.Path, output_dir: pathlib.Path) -> None:
        """Import the SAELens SAE in SAELENS_DIR as an lmsae dictionary in OUTPUT_DIR."""
        from lmsae.dictionary.io import save_dictionary
        from lmsae.interop.saelens import import_saelens

        registry = ctx.find_root().obj["registry"]
        model = import_saelens(saelens_dir)
        save_dictionary(model, output_dir, registry)
        click.echo(f"imported {saelens_dir} -> {output_dir} ({model.config.act_fn}, {model.n_features} features)")
