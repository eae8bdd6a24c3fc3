"""``task = "generate"``: run a language model over text and store activations in a cache.

The cache (format in :mod:`lmsae.activations.cache`) is read back by the ``cached`` source, so
several dictionaries can be trained from one pass of the language model. Generation is sharded
(``n_shards``; this process writes ``shard_index``, reading a disjoint part of the data) and
resumable: rerunning the same config continues after the last finished chunk, skipping the
sequences already stored without running the model on them.
"""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from lmsae.activations.cache import ActivationWriter, ActivationWriterConfig, describe_cache
from lmsae.activations.protocol import SourceContext
from lmsae.config import LanguageModelConfig, RunConfig, SourceConfig, WriterConfig, config_class, option
from lmsae.config.fields import FieldValueError, non_empty, non_negative, positive
from lmsae.errors import LmsaeError
from lmsae.records import TaskSpec
from lmsae.runtime import RunContext
from lmsae.tasks.common import model_loader

log = logging.getLogger(__name__)


@config_class
class GenerateRunConfig(RunConfig):
    """Generate activations from text with a language model and write them to disk."""

    name: ClassVar[str] = "generate"

    model: LanguageModelConfig = option(doc="The language model ([model] table).")
    sources: list[SourceConfig] = option(
        doc="Where sequences come from ([[sources]] tables, usually type = \"text\"), written one after the other.",
        validator=non_empty())
    hook_points: list[str] = option(doc="Hook points to store (full TransformerLens names).", validator=non_empty())
    output_dir: pathlib.Path = option(doc="The cache directory.")
    writer: WriterConfig = option(factory=ActivationWriterConfig,
                                  doc="Storage settings ([writer] table: chunk size, dtype, threads).")
    total_tokens: int | None = option(None, doc="Stop after this many token positions over all shards "
                                                "(None: until the sources run out).", validator=positive())
    n_shards: int = option(1, doc="Shards the data is split into (each shard is written by one process).",
                           validator=positive())
    shard_index: int = option(0, doc="The shard this process writes (0 <= shard_index < n_shards); rerun with "
                                     "each index, possibly in parallel.", validator=non_negative())
    overwrite: bool = option(False, doc="Discard an existing cache in output_dir instead of resuming it.")
    seed: int = option(0, doc="Seed passed to the sources.")

    def __attrs_post_init__(self) -> None:
        if self.shard_index >= self.n_shards:
            raise FieldValueError("shard_index", f"must be < n_shards ({self.n_shards}), got {self.shard_index}")


class _Skipper:
    """Chunks of a source with its first ``n`` sequences removed.

    Sources with a ``skip(n)`` method skip without running the model (tokenisation only); others
    are read and the skipped sequences dropped. ``left`` is what remains to skip when the source
    ran out first (it carries over to the next source).
    """

    def __init__(self, source: Any, n: int):
        self.source = source
        self.left = n - (source.skip(n) if n and hasattr(source, "skip") else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for chunk in self.source:
            rows = _rows(chunk)
            if self.left >= rows:
                self.left -= rows
                continue
            if self.left:
                chunk = _slice(chunk, self.left, None)
                self.left = 0
            yield chunk


def _rows(chunk: dict[str, Any]) -> int:
    return int(next(v for v in chunk.values() if isinstance(v, torch.Tensor)).shape[0])


def _slice(chunk: dict[str, Any], start: int | None, stop: int | None) -> dict[str, Any]:
    return {k: (v[start:stop] if isinstance(v, (torch.Tensor, list)) else v) for k, v in chunk.items()}


def run(cfg: GenerateRunConfig, context: RunContext) -> dict[str, Any]:
    registry = context.registry
    lm_loader = model_loader(registry, cfg.model)
    lm = lm_loader()
    start = time.monotonic()  # generation throughput, not model loading
    hooks = tuple(cfg.hook_points)
    lm.hook_dims(hooks)  # unknown hook points fail here, naming the closest valid one
    writer_spec = registry.get("writer", cfg.writer.name)
    description = {"model": lm.name, "dataset": [registry.unstructure(s) for s in cfg.sources],
                   "model_config": registry.unstructure(cfg.model)}
    writer = writer_spec.factory(cfg.writer, cfg.output_dir, hook_points=hooks, shard_index=cfg.shard_index,
                                 n_shards=cfg.n_shards, description=description, overwrite=cfg.overwrite)
    done = writer.resume_position()
    if done:
        context.echo(f"resuming shard {cfg.shard_index}: {done:,} sequences already stored")
    # token positions this shard may still write (None: no limit); known once a chunk shows T
    budget = None if cfg.total_tokens is None else -(-cfg.total_tokens // cfg.n_shards)
    remaining: int | None = None
    source_context = SourceContext(hook_points=hooks, layout="sequences", seed=cfg.seed, registry=registry,
                                   shard=(cfg.shard_index, cfg.n_shards), progress=context.progress,
                                   language_model=lm_loader)
    written = 0
    to_skip = done
    with writer:
        for source_config in cfg.sources:
            source = registry.get("source", source_config.name).factory(source_config, source_context)
            chunks = _Skipper(source, to_skip)
            for chunk in chunks:
                if budget is not None:
                    context_size = int(chunk["tokens"].shape[1])
                    if remaining is None:
                        remaining = budget - done * context_size
                    if remaining <= 0:
                        break
                    chunk = _slice(chunk, None, -(-remaining // context_size))
                    remaining -= _rows(chunk) * context_size
                writer.write(chunk)
                written += int(chunk["tokens"].numel())
                if remaining is not None and remaining <= 0:
                    break  # before the source runs the model on a batch that would be thrown away
            to_skip = chunks.left
            if remaining is not None and remaining <= 0:
                break
    seconds = time.monotonic() - start
    context.echo(f"wrote {written:,} token positions in {seconds:.1f}s "
                 f"({written / max(seconds, 1e-9):,.0f} tokens/s) to {cfg.output_dir}")
    if not isinstance(writer, ActivationWriter):
        # another cache format: describe_cache reads the core format's manifest only
        return {"path": str(cfg.output_dir), "format": cfg.writer.name, "shard_index": cfg.shard_index,
                "written_tokens": written}
    summary = describe_cache(cfg.output_dir)
    context.echo(f"cache: {summary['sequences']:,} sequences, {summary['tokens']:,} tokens "
                 f"({summary['unmasked_tokens']:,} unmasked), hook points {', '.join(summary['hook_points'])}, "
                 f"{summary['bytes'] / 2**20:,.1f} MiB" + (
                     f"; shards still missing: {summary['missing_shards']}" if summary["missing_shards"] else ""))
    return summary


def example(registry: Any, architecture: str | None = None) -> GenerateRunConfig:
    from lmsae.data.datasets import DatasetConfig
    from lmsae.models.transformer_lens import TransformerLensConfig
    from lmsae.sources.text_source import TextSourceConfig

    if architecture is not None:
        raise LmsaeError("the generate task does not depend on an architecture")
    return GenerateRunConfig(model=TransformerLensConfig(model="smollm2-135m"),
                             sources=[TextSourceConfig(dataset=DatasetConfig(path="builtin:python-docs"),
                                                       context_size=128, max_sequences=512)],
                             hook_points=["blocks.3.hook_resid_post"],
                             output_dir=pathlib.Path("runs/activations/smollm2-l3"))


SPEC = TaskSpec(config_class=GenerateRunConfig, factory=run, example=example,
                summary="run a language model over text and write an activation cache")
