"""The ``synthetic`` activation source: :class:`SyntheticActivations` behind the stream protocol.

Users select it with ``[[activations.sources]] type = "synthetic"``. It needs no model and no
data, and it keeps the generating dictionary (:attr:`SyntheticSource.ground_truth`) so that a
trained dictionary can be scored against the truth.

Each generated *chunk* is one batch of :class:`SyntheticActivations` (``batch_size`` tokens, or
``batch_size`` sequences of ``context_size`` tokens); the activation factory re-cuts chunks into
training batches. Chunk ``i`` depends only on ``(seed, i)``, so the source's position is a single
integer and resuming costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor

from lmsae.activations.protocol import RESERVED_KEYS, Batch, SourceContext
from lmsae.config.base import SourceConfig
from lmsae.config.fields import FieldValueError, config_class, non_empty, non_negative, one_of, option, positive
from lmsae.errors import CheckpointError, ConfigError, DataError
from lmsae.sources.synthetic import SyntheticActivations

__all__ = ["SyntheticSource", "SyntheticSourceConfig", "build_synthetic_source"]


def _not_reserved(_instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and value in RESERVED_KEYS:
        raise FieldValueError(
            attribute.name, f"must not be one of the reserved batch keys {sorted(RESERVED_KEYS)}, got {value!r}"
        )


@config_class
class SyntheticSourceConfig(SourceConfig):
    """Seeded synthetic activations with a known sparse ground truth (no model, no data)."""

    name: ClassVar[str] = "synthetic"

    d_model: int = option(doc="Width of the input activations (hook_point).", validator=positive())
    n_features: int = option(doc="Number of ground-truth features.", validator=positive())
    mean_active: float = option(
        doc="Expected number of active ground-truth features per token (at most n_features).",
        validator=positive())
    batch_size: int = option(
        1024, doc="Rows per generated chunk: tokens, or sequences when context_size is set. "
                  "Training batches are re-cut from chunks by [activations].batch_size.",
        validator=positive())
    seed: int | None = option(
        None, doc="Seed of the ground truth and of every chunk; unset uses the run's seed.",
        validator=non_negative())
    hook_point: str = option(
        "synthetic.hook_in", doc="Hook-point name under which the inputs x are produced.",
        validator=[non_empty(), _not_reserved])
    hook_point_out: str | None = option(
        None, doc="Hook-point name of the transcoder targets y; unset for plain SAE data.",
        validator=[non_empty(), _not_reserved])
    d_out: int | None = option(
        None, doc="Width of the targets y (defaults to d_model); only with hook_point_out.",
        validator=positive())
    magnitude: Literal["lognormal", "exponential", "constant"] = option(
        "lognormal", doc="Distribution of active feature magnitudes (all positive, mean magnitude_scale).",
        validator=one_of("lognormal", "exponential", "constant"))
    magnitude_scale: float = option(1.0, doc="Mean magnitude of an active feature.", validator=positive())
    firing_distribution: Literal["zipf", "uniform"] = option(
        "zipf", doc="How firing probabilities vary over features: 'zipf' (power law over shuffled "
                    "ranks) or 'uniform' (all equal).",
        validator=one_of("zipf", "uniform"))
    zipf_exponent: float = option(
        1.0, doc="Power-law exponent of the 'zipf' firing distribution (0 is uniform).",
        validator=non_negative())
    noise_std: float = option(
        0.0, doc="Standard deviation of isotropic Gaussian noise added to the inputs x.",
        validator=non_negative())
    bias_scale: float = option(
        0.0, doc="Norm of the fixed random offset added to x (and y); 0 for none.",
        validator=non_negative())
    n_batches: int | None = option(
        None, doc="Number of chunks the source yields before it is exhausted; unset is endless.",
        validator=positive())
    context_size: int | None = option(
        None, doc="Tokens per sequence; when set, chunks are sequences (needed for the "
                  "'sequences' layout, flattened to tokens in the 'tokens' layout).",
        validator=positive())

    def __attrs_post_init__(self) -> None:
        # Cross-field rules, reported against the field a user would change.
        if self.mean_active > self.n_features:
            raise FieldValueError(
                "mean_active", f"must not exceed n_features={self.n_features}, got {self.mean_active!r}")
        if self.d_out is not None and self.hook_point_out is None:
            raise FieldValueError("d_out", "is only valid with hook_point_out (transcoder data)")
        if self.hook_point_out is not None and self.hook_point_out == self.hook_point:
            raise FieldValueError("hook_point_out", f"must differ from hook_point (both {self.hook_point!r})")

    @property
    def hook_points(self) -> tuple[str, ...]:
        """Hook points this source can produce (inputs first)."""
        if self.hook_point_out is None:
            return (self.hook_point,)
        return (self.hook_point, self.hook_point_out)


class SyntheticSource:
    """An :class:`~lmsae.activations.protocol.ActivationStream` of synthetic activation chunks.

    Chunks (batch dicts) hold exactly the hook points in ``context.hook_points`` (all provided
    hook points when that is empty) plus ``"mask"`` (all True) and ``"tokens"`` (fake ids):

    - ``"tokens"`` layout: ``(N, d)`` with ``N = batch_size`` or, when ``context_size`` is set,
      ``N = batch_size * context_size`` (sequences flattened row-major);
    - ``"sequences"`` layout: ``(batch_size, context_size, d)`` (requires ``context_size``).

    Tensors are moved to ``context.device``. Under data parallelism (``context.shard =
    (rank, world)``) this process reads generator batches ``rank, rank + world, ...``, so the
    ranks see disjoint data; :attr:`position` counts the chunks this process has consumed.

    Raises:
        DataError: a needed hook point is not produced, or the ``"sequences"`` layout is asked of
            a per-token source.
        ConfigError: no seed is available (``seed`` unset and the run's seed is negative).
    """

    def __init__(self, config: SyntheticSourceConfig, context: SourceContext):
        provided = config.hook_points
        missing = [h for h in context.hook_points if h not in provided]
        if missing:
            raise DataError(
                f"synthetic source does not provide hook point(s) {', '.join(map(repr, missing))}; "
                f"it provides {', '.join(map(repr, provided))} (set hook_point / hook_point_out in "
                "its config to the names the dictionary reads)")
        if context.layout == "sequences" and config.context_size is None:
            raise DataError(
                "the 'sequences' layout needs whole sequences, but this synthetic source yields "
                "single tokens: set context_size in its config")
        seed = context.seed if config.seed is None else config.seed
        if seed < 0:
            raise ConfigError([f"$.seed: the synthetic source needs a seed >= 0; the run seed is {seed} "
                               "(set seed in the source config)"])
        rank, world = context.shard
        if not (0 <= rank < world):
            raise ValueError(f"context.shard must be (rank, world) with 0 <= rank < world, got {context.shard}")

        self.config = config
        self.layout = context.layout
        self.device = torch.device(context.device)
        self.hook_points: tuple[str, ...] = tuple(context.hook_points) or provided
        self._rank, self._world = rank, world
        self._flatten = context.layout == "tokens" and config.context_size is not None
        self.ground_truth = SyntheticActivations(
            d_model=config.d_model,
            n_features=config.n_features,
            mean_active=config.mean_active,
            batch_size=config.batch_size,
            seed=seed,
            hook_point=config.hook_point,
            hook_point_out=config.hook_point_out,
            d_out=config.d_out,
            magnitude=config.magnitude,
            magnitude_scale=config.magnitude_scale,
            firing_distribution=config.firing_distribution,
            zipf_exponent=config.zipf_exponent,
            noise_std=config.noise_std,
            bias_scale=config.bias_scale,
            n_batches=config.n_batches,
            context_size=config.context_size,
        )
        #: number of chunks consumed by this process
        self.position = 0

    @property
    def n_chunks(self) -> int | None:
        """Number of chunks this process reads in total (``None`` for an endless stream)."""
        n = self.config.n_batches
        if n is None:
            return None
        # generator batches rank, rank + world, ... below n
        return max(0, -(-(n - self._rank) // self._world))

    def _format(self, raw: dict[str, Tensor]) -> Batch:
        out: Batch = {h: raw[h] for h in self.hook_points}
        out["mask"] = raw["mask"]
        out["tokens"] = raw["tokens"]
        if self._flatten:
            # (B, T, ...) -> (B*T, ...): row b*T + t is token t of sequence b
            out = {k: v.flatten(0, 1) for k, v in out.items()}
        if self.device.type != "cpu":
            out = {k: v.to(self.device) for k, v in out.items()}
        return out

    def __iter__(self) -> Iterator[Batch]:
        """Yield chunks from :attr:`position` on (the chunks already consumed are skipped for free)."""
        return self._iterate()

    def _iterate(self) -> Iterator[Batch]:
        total = self.n_chunks
        while total is None or self.position < total:
            raw = self.ground_truth.batch(self.position * self._world + self._rank)
            # Advance before yielding: a state_dict() taken once the consumer holds this chunk
            # must count it as consumed.
            self.position += 1
            yield self._format(raw)

    def state_dict(self) -> dict[str, Any]:
        """``{"position": chunks consumed}``."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position saved by :meth:`state_dict`; the next iteration continues there.

        Raises:
            CheckpointError: the state is malformed or lies past the end of a finite stream.
        """
        position = state.get("position") if isinstance(state, dict) else None
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise CheckpointError(f"synthetic source state must be {{'position': int >= 0}}, got {state!r}")
        total = self.n_chunks
        if total is not None and position > total:
            raise CheckpointError(
                f"synthetic source position {position} is past the end of the stream ({total} chunks)")
        self.position = position

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ground_truth!r}, position={self.position})"


def build_synthetic_source(config: SyntheticSourceConfig, context: SourceContext) -> SyntheticSource:
    """Source factory registered under ``type = "synthetic"``: ``factory(config, context)``."""
    return SyntheticSource(config, context)
