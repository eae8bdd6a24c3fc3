"""Data-aware initialisation of a fresh dictionary (the ``[initializer]`` table).

:func:`initialize` runs, in this order (each step only when requested):

1. ``reset_parameters`` with a generator seeded from ``seed``;
2. active-subspace decoder init (``active_subspace_dim``);
3. fixed decoder norm (``decoder_norm``);
4. encoder = decoder transpose × factor (``encoder_from_decoder``);
5. decoder bias = mean of the normalised labels (``decoder_bias = "mean"``);
6. decoder-norm grid search (``grid_search_decoder_norm``);
7. encoder bias = −mean pre-activation (``encoder_bias_from_mean_pre``).

Steps 2 and 5–7 need an initialisation batch. Each step calls a capability method of the
architecture (``set_decoder_norm``, ``init_encoder_from_decoder``, ``init_decoder_bias``,
``init_encoder_bias_from_mean_pre``, ``init_active_subspace``); an architecture without the
method cannot do that step and a request for it is an error, raised before anything changes.

Capability signatures (implement the ones an architecture can honour):

- ``set_decoder_norm(value: float)``: every feature's decoder to L2 norm ``value`` exactly;
- ``init_encoder_from_decoder(factor: float)``: encoder = decoder transpose × ``factor``;
- ``init_decoder_bias(mean: Tensor)``: decoder bias = ``mean`` (shape of one label token);
- ``init_encoder_bias_from_mean_pre(x, mask=None, **extras)``: centre the pre-activations;
- ``init_active_subspace(label, d: int, mask=None)``: decoder inside the labels' top-d subspace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from lmsae.config.base import Config
from lmsae.config.fields import FieldValueError, config_class, non_negative, option, positive
from lmsae.dictionary.base import SparseDictionary
from lmsae.errors import LmsaeError
from lmsae.nn.axes import masked_token_mean
from lmsae.nn.losses import reconstruction_loss

__all__ = ["COARSE_GRID", "InitializerConfig", "fine_grid", "initialize"]

#: capability method each option needs
CAPABILITIES: dict[str, str] = {
    "active_subspace_dim": "init_active_subspace",
    "decoder_norm": "set_decoder_norm",
    "encoder_from_decoder": "init_encoder_from_decoder",
    "decoder_bias": "init_decoder_bias",
    "grid_search_decoder_norm": "set_decoder_norm",
    "encoder_bias_from_mean_pre": "init_encoder_bias_from_mean_pre",
}


#: decoder norms tried by the first pass of the grid search: linspace(0.1, 5.0, 50)
COARSE_GRID: tuple[float, ...] = tuple(torch.linspace(0.1, 5.0, 50, dtype=torch.float64).tolist())


def fine_grid(best: float) -> list[float]:
    """Second pass around the coarse optimum: 20 values in [best − 0.09, best + 0.1] (kept > 0)."""
    values = torch.linspace(best - 0.09, best + 0.1, 20, dtype=torch.float64).tolist()
    return [v for v in values if v > 0]


@config_class
class InitializerConfig(Config):
    """How a fresh dictionary is initialised before training (the ``[initializer]`` table)."""

    decoder_bias: Literal["auto", "zeros", "mean"] = option(
        "auto",
        doc="Decoder bias init: 'mean' = the mean of the normalised labels over the initialisation batch (the "
            "reference called this 'geometric_median' but computed the mean), 'zeros', or 'auto' (the default): "
            "'mean' where the architecture can set a decoder bias it has and an initialisation batch is given, "
            "else zeros — measured better on activations with an offset (benchmarks/README.md, 'Training "
            "recipe').")
    encoder_from_decoder: bool = option(
        True, doc="Set the encoder to the decoder transpose times encoder_from_decoder_factor.")
    encoder_from_decoder_factor: float = option(
        1.0, doc="Factor of the decoder transpose used as encoder.", validator=positive())
    decoder_norm: float | None = option(
        None, doc="Scale every decoder row to this L2 norm (before the transpose). Unset: keep the "
                  "architecture's own init (unit norm for the SAE).", validator=positive())
    grid_search_decoder_norm: bool = option(
        False,
        doc="Choose the decoder norm minimising the reconstruction loss on the normalised initialisation "
            "batch: linspace(0.1, 5.0, 50), then 20 values in [best - 0.09, best + 0.1]; each candidate "
            "redoes the encoder transpose and the encoder-bias init. Excludes decoder_norm.")
    encoder_bias_from_mean_pre: bool = option(
        False, doc="Shift the encoder bias so that the mean pre-activation over the initialisation batch is 0.")
    active_subspace_dim: int | None = option(
        None,
        doc="Put the decoder rows inside the top-d principal subspace of the normalised labels (d = this "
            "value), useful for low-rank activations such as attention outputs. Unset: off.",
        validator=positive())
    from_language_model: bool = option(
        False,
        doc="Then let the architecture initialise itself from the run's language model on the "
            "initialisation batch (its initialize_from_language_model capability; e.g. a Lorsa copies "
            "the attention layer it replaces). Needs [model]; not with [pretrained].")
    seed: int = option(0, doc="Seed of the random initialisation.", validator=non_negative())

    def __attrs_post_init__(self) -> None:
        if self.grid_search_decoder_norm and self.decoder_norm is not None:
            raise FieldValueError("decoder_norm", "cannot be set together with grid_search_decoder_norm = true "
                                                  "(the grid search chooses the decoder norm)")

    def requested(self) -> list[str]:
        """Names of the options that ask for something beyond ``reset_parameters``."""
        wanted = []
        if self.active_subspace_dim is not None:
            wanted.append("active_subspace_dim")
        if self.decoder_norm is not None:
            wanted.append("decoder_norm")
        if self.encoder_from_decoder:
            wanted.append("encoder_from_decoder")
        if self.decoder_bias == "mean":
            wanted.append("decoder_bias")
        if self.grid_search_decoder_norm:
            wanted.append("grid_search_decoder_norm")
        if self.encoder_bias_from_mean_pre:
            wanted.append("encoder_bias_from_mean_pre")
        return wanted

    def needs_batch(self) -> list[str]:
        """Requested options that need an initialisation batch."""
        return [o for o in self.requested()
                if o in ("active_subspace_dim", "decoder_bias", "grid_search_decoder_norm",
                         "encoder_bias_from_mean_pre")]


def _option_text(config: InitializerConfig, option_name: str) -> str:
    value = getattr(config, option_name)
    shown = "true" if value is True else repr(value)
    return f"initializer.{option_name} = {shown}"


def _check_capabilities(model: SparseDictionary, config: InitializerConfig) -> None:
    arch = getattr(model.config, "name", "") or type(model).__name__
    missing = [(o, CAPABILITIES[o]) for o in config.requested() if not callable(getattr(model, CAPABILITIES[o], None))]
    if missing:
        items = "; ".join(f"{_option_text(config, o)} needs a {m}() method" for o, m in missing)
        raise LmsaeError(f"architecture {arch!r} ({type(model).__name__}) cannot do the requested initialisation: "
                         f"{items}. Turn these options off in [initializer].")


def _to_model(batch: Mapping[str, Any], model: SparseDictionary) -> dict[str, Any]:
    try:
        param = next(model.parameters())
    except StopIteration:  # pragma: no cover - every architecture has parameters
        return dict(batch)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            value = value.to(param.device, dtype=param.dtype) if value.is_floating_point() else value.to(param.device)
        out[key] = value
    return out


@torch.no_grad()
def _loss(model: SparseDictionary, x: Tensor, label: Tensor, extras: dict[str, Any], mask: Tensor | None) -> float:
    recon = model.forward(x, mask=mask, **extras)
    return float(reconstruction_loss(recon, label, model.output_axes(x), mask))


@torch.no_grad()
def initialize(model: SparseDictionary, config: InitializerConfig,
               init_batch: Mapping[str, Any] | None) -> dict[str, float]:
    """Initialise ``model`` in place (see the module docstring for the steps).

    ``init_batch`` is a RAW batch (hook point -> activations, optional ``mask``); it is
    normalised with ``model.normalize`` (dataset norms must already be in ``model.config``).
    Returns a report: ``decoder_norm`` (mean decoder row norm at the end), ``loss`` (mean
    reconstruction loss on the normalised batch, when there is one) and, with the grid search,
    ``grid_search_best_norm`` / ``grid_search_loss``.
    """
    _check_capabilities(model, config)
    wanted = config.needs_batch()
    if wanted and init_batch is None:
        raise LmsaeError("initialisation needs a batch of activations for "
                         + ", ".join(_option_text(config, o) for o in wanted) + ", but none was given")

    x = label = mask = None
    extras: dict[str, Any] = {}
    if init_batch is not None:
        batch = model.normalize(_to_model(init_batch, model))
        x, extras = model.prepare_input(batch)
        label = model.prepare_label(batch)
        mask = batch.get("mask")

    model.reset_parameters(generator=torch.Generator().manual_seed(config.seed))

    if config.active_subspace_dim is not None:
        model.init_active_subspace(label, config.active_subspace_dim, mask=mask)
    if config.decoder_norm is not None:
        model.set_decoder_norm(config.decoder_norm)
    if config.encoder_from_decoder:
        model.init_encoder_from_decoder(config.encoder_from_decoder_factor)
    mean_bias = config.decoder_bias == "mean" or (
        config.decoder_bias == "auto" and label is not None and callable(getattr(model, "init_decoder_bias", None))
        and getattr(model, "b_D", True) is not None)
    if mean_bias:
        mean, _ = masked_token_mean(label, model.output_axes(x), mask)
        model.init_decoder_bias(mean)

    report: dict[str, float] = {}
    if config.grid_search_decoder_norm:

        def trial(norm: float) -> float:
            model.set_decoder_norm(norm)
            if config.encoder_from_decoder:
                model.init_encoder_from_decoder(config.encoder_from_decoder_factor)
            if config.encoder_bias_from_mean_pre:
                model.init_encoder_bias_from_mean_pre(x, mask=mask, **extras)
            return _loss(model, x, label, extras, mask)

        best_norm, best_loss = _search(trial, list(COARSE_GRID))
        best_norm, best_loss = _search(trial, fine_grid(best_norm), (best_norm, best_loss))
        trial(best_norm)
        report["grid_search_best_norm"] = best_norm
        report["grid_search_loss"] = best_loss

    if config.encoder_bias_from_mean_pre:
        model.init_encoder_bias_from_mean_pre(x, mask=mask, **extras)

    report["decoder_norm"] = float(model.decoder_norm().mean())
    if x is not None:
        report["loss"] = _loss(model, x, label, extras, mask)
    return report


def _search(trial: Any, candidates: list[float],
            start: tuple[float, float] | None = None) -> tuple[float, float]:
    best_norm, best_loss = start if start is not None else (float("nan"), float("inf"))
    for norm in candidates:
        loss = trial(norm)
        # strict '<' keeps the earlier (coarse) optimum on ties; NaN losses never win
        if loss < best_loss:
            best_norm, best_loss = norm, loss
    if best_loss == float("inf"):
        raise LmsaeError("decoder-norm grid search: every candidate gave a non-finite reconstruction loss")
    return best_norm, best_loss
