"""``lmsae clt ...``: TopK -> JumpReLU conversion and circuit-tracer export/import."""

from __future__ import annotations

import pathlib
from typing import Any

import click


def _token_count(batch: dict[str, Any]) -> int:
    mask = batch.get("mask")
    if mask is not None:
        return int((mask != 0).sum())
    tensor = next(v for k, v in batch.items() if k not in ("tokens", "meta") and hasattr(v, "shape"))
    return int(tensor.shape[:-1].numel())


def _read_batches(batches: Any, tokens: int) -> list[dict[str, Any]]:
    out, seen = [], 0
    for batch in batches:
        out.append(batch)
        seen += _token_count(batch)
        if seen >= tokens:
            break
    return out


def register(cli: click.Group) -> None:
    @cli.group("clt")
    def clt() -> None:
        """Cross-layer transcoder tools (lmsae-clt)."""

    @clt.command("to-jumprelu")
    @click.argument("dictionary_dir", type=click.Path(file_okay=False, exists=True, path_type=pathlib.Path))
    @click.argument("output_dir", type=click.Path(file_okay=False, path_type=pathlib.Path))
    @click.option("--calibration", "calibration_file", required=True,
                  type=click.Path(dir_okay=False, exists=True, path_type=pathlib.Path),
                  help="A config file with an [activations] table (and a [model] table if its sources read text), "
                       "e.g. the CLT's training config: the activations to calibrate on.")
    @click.option("--tokens", default=65_536, show_default=True, type=click.IntRange(min=1),
                  help="Calibration tokens (the first batches of the stream).")
    @click.option("--eval-tokens", default=65_536, show_default=True, type=click.IntRange(min=0),
                  help="Held-out tokens (the batches after the calibration ones) for the before/after report; "
                       "0 reports on the calibration batches.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                  help="Override a value of the calibration config first (repeatable).")
    @click.pass_context
    def to_jumprelu(ctx: click.Context, dictionary_dir: pathlib.Path, output_dir: pathlib.Path,
                    calibration_file: pathlib.Path, tokens: int, eval_tokens: int, overrides: tuple[str, ...]) -> None:
        """Convert the TopK CLT in DICTIONARY_DIR to a JumpReLU CLT in OUTPUT_DIR, with per-layer thresholds
        calibrated so that each layer's L0 is preserved; prints L0 and explained variance before/after."""
        from lmsae.activations.factory import ActivationsConfig
        from lmsae.config.base import LanguageModelConfig
        from lmsae.config.files import apply_overrides, read_config_file
        from lmsae.dictionary.io import load_dictionary, save_dictionary
        from lmsae.errors import ConfigError, DataError, LmsaeError
        from lmsae.tasks.common import model_loader, stream_builder
        from lmsae_clt.convert import convert_topk_to_jumprelu
        from lmsae_clt.model import CrossLayerTranscoder

        registry = ctx.find_root().obj["registry"]
        model = load_dictionary(dictionary_dir, registry)
        if not isinstance(model, CrossLayerTranscoder):
            raise LmsaeError(f"{dictionary_dir} holds a {model.config.name!r} dictionary, not a CLT")
        data = apply_overrides(read_config_file(calibration_file), overrides)
        if "activations" not in data:
            raise ConfigError(["$.activations: missing (the calibration file needs an [activations] table)"],
                              source=str(calibration_file))
        activations = registry.structure(data["activations"], ActivationsConfig, source=str(calibration_file))
        lm_config = (registry.structure(data["model"], LanguageModelConfig, source=str(calibration_file))
                     if data.get("model") is not None else None)
        make = stream_builder(registry, activations, tuple(model.config.hook_points), progress=False,
                              language_model=model_loader(registry, lm_config))
        batches = iter(make())  # one iterator: the held-out batches follow the calibration ones
        calibration = _read_batches(batches, tokens)
        held_out = _read_batches(batches, eval_tokens) if eval_tokens > 0 else None
        if not calibration:
            raise DataError("the calibration stream is empty")
        if held_out is not None and not held_out:
            raise DataError("the stream ended before any held-out batch; lower --tokens or pass --eval-tokens 0")
        converted, report = convert_topk_to_jumprelu(model, calibration, held_out)
        save_dictionary(converted, output_dir, registry, metadata={"converted_from": str(dictionary_dir)})
        for line in report.lines():
            click.echo(line)
        click.echo(f"saved the JumpReLU CLT to {output_dir}")

    @clt.command("export-circuit-tracer")
    @click.argument("dictionary_dir", type=click.Path(file_okay=False, exists=True, path_type=pathlib.Path))
    @click.argument("output_dir", type=click.Path(file_okay=False, path_type=pathlib.Path))
    @click.option("--model-name", default="", help="model_name to write into config.yaml.")
    @click.pass_context
    def export_cmd(ctx: click.Context, dictionary_dir: pathlib.Path, output_dir: pathlib.Path, model_name: str) -> None:
        """Export the CLT in DICTIONARY_DIR to OUTPUT_DIR in circuit-tracer's layout
        (config.yaml + W_enc_<i>/W_dec_<i>.safetensors)."""
        from lmsae.dictionary.io import load_dictionary
        from lmsae.errors import LmsaeError
        from lmsae_clt.circuit_tracer import export_circuit_tracer
        from lmsae_clt.model import CrossLayerTranscoder

        registry = ctx.find_root().obj["registry"]
        model = load_dictionary(dictionary_dir, registry)
        if not isinstance(model, CrossLayerTranscoder):
            raise LmsaeError(f"{dictionary_dir} holds a {model.config.name!r} dictionary, not a CLT")
        export_circuit_tracer(model, output_dir, model_name=model_name)
        click.echo(f"exported {dictionary_dir} -> {output_dir} (circuit-tracer CLT, {model.config.n_layers} layers)")

    @clt.command("import-circuit-tracer")
    @click.argument("source_dir", type=click.Path(file_okay=False, exists=True, path_type=pathlib.Path))
    @click.argument("output_dir", type=click.Path(file_okay=False, path_type=pathlib.Path))
    @click.pass_context
    def import_cmd(ctx: click.Context, source_dir: pathlib.Path, output_dir: pathlib.Path) -> None:
        """Import the circuit-tracer CLT in SOURCE_DIR as an lmsae dictionary in OUTPUT_DIR."""
        from lmsae.dictionary.io import save_dictionary
        from lmsae_clt.circuit_tracer import import_circuit_tracer

        registry = ctx.find_root().obj["registry"]
        model = import_circuit_tracer(source_dir)
        save_dictionary(model, output_dir, registry)
        click.echo(f"imported {source_dir} -> {output_dir} ({model.config.act_fn}, {model.config.n_layers} layers × "
                   f"{model.config.n_features} features)")
