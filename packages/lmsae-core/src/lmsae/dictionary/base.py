"""The sparse-dictionary contract every architecture implements.

A dictionary reads some hook points (``config.hooks_in``), encodes them into sparse feature
activations, and decodes those into predictions of other (or the same) hook points
(``config.hooks_out``). Tensors carry named axes so that masking, losses and metrics are written
once, in the core:

- ``input_dims`` / ``feature_dims`` / ``output_dims`` are the per-token axes of the input,
  the feature activations and the reconstruction, e.g. ``("d_model",)``, ``("sae",)``,
  ``("d_model",)`` for an SAE or ``("layers", "d_model")``, ``("layers", "sae")``,
  ``("layers", "d_model")`` for a cross-layer transcoder;
- the leading axes are the token axes: ``("batch",)`` for a stream of tokens or
  ``("batch", "context")`` for a stream of sequences.

Normalisation: each hook point h is multiplied by a factor s_h (see
:class:`lmsae.config.DictionaryConfig.normalization`). The model's weights live in normalised
space; :meth:`forward_raw` takes raw activations and returns raw-scale predictions, and
:meth:`fold_normalization` rewrites the weights so that raw activations can be used directly,
exactly (the property test in :mod:`lmsae.testing` checks
``forward_raw(folded)(x) == forward_raw(unfolded)(x)`` for every architecture).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor, nn

from lmsae.config.base import DictionaryConfig
from lmsae.errors import DataError, ShapeError

TOKEN_AXES = ("batch", "context")

Batch = Mapping[str, Any]


class SparseDictionary(nn.Module):
    """Base class of every architecture.

    Subclasses implement :meth:`encode_pre`, :meth:`activate`, :meth:`decode`,
    :meth:`decoder_norm`, :meth:`fold_scales` and :meth:`reset_parameters`, and may override
    :meth:`prepare_input` / :meth:`prepare_label` (the defaults read one hook each).
    """

    input_dims: ClassVar[tuple[str, ...]] = ("d_model",)
    feature_dims: ClassVar[tuple[str, ...]] = ("sae",)
    output_dims: ClassVar[tuple[str, ...]] = ("d_model",)
    #: True when the dictionary needs whole sequences (batch, context, ...) as input.
    needs_sequences: ClassVar[bool] = False

    def __init__(self, config: DictionaryConfig):
        super().__init__()
        self.config = config

    # --- what the dictionary reads and predicts --------------------------------------------

    def prepare_input(self, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
        """``(x, extras)``: the encoder input and keyword arguments for encode/decode.

        Default: the single input hook point. ``extras`` is how an architecture passes more
        (e.g. MOLT's decoder needs the original input).
        """
        (hook,) = self.config.hooks_in
        return _get(batch, hook), {}

    def prepare_label(self, batch: Batch) -> Tensor:
        """The target of the reconstruction. Default: the single output hook point."""
        (hook,) = self.config.hooks_out
        return _get(batch, hook)

    # --- maths ------------------------------------------------------------------------------

    def encode_pre(self, x: Tensor, **extras: Any) -> Tensor:
        """Pre-activations, shape ``token axes + feature_dims``."""
        raise NotImplementedError

    def activate(self, hidden_pre: Tensor, mask: Tensor | None = None) -> Tensor:
        """Feature activations from pre-activations (same shape)."""
        raise NotImplementedError

    def encode(self, x: Tensor, mask: Tensor | None = None, **extras: Any) -> Tensor:
        """Feature activations, shape ``token axes + feature_dims``."""
        return self.activate(self.encode_pre(x, **extras), mask=mask)

    def decode(self, feature_acts: Tensor, **extras: Any) -> Tensor:
        """Reconstruction, shape ``token axes + output_dims``."""
        raise NotImplementedError

    def decode_linear(self, feature_acts: Tensor, **extras: Any) -> Tensor:
        """The part of :meth:`decode` that is linear in the activations (no output bias).

        Every decoder here is affine in the activations; the default is ``decode(a) - decode(0)``
        (exact, one extra decode). Architectures override it with the cheap direct form. Used by
        AuxK (the dead features' reconstruction) and by feature parallelism, where only the first
        ``model`` rank adds the output bias to its partial reconstruction.
        """
        return self.decode(feature_acts, **extras) - self.decode(torch.zeros_like(feature_acts), **extras)

    def forward(self, x: Tensor, mask: Tensor | None = None, **extras: Any) -> Tensor:
        """``decode(encode(x))`` in normalised space."""
        return self.decode(self.encode(x, mask=mask, **extras), **extras)

    def decoder_norm(self) -> Tensor:
        """L2 norm of each feature's decoder, shape ``feature_dims``."""
        raise NotImplementedError

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter (seeded through ``generator``)."""
        raise NotImplementedError

    def fold_scales(self, scales_in: Mapping[str, float], scales_out: Mapping[str, float]) -> None:
        """Rewrite the weights in place so that the model takes raw activations.

        ``scales_in[h]`` multiplies raw activations of input hook h into normalised space;
        ``scales_out[h]`` does the same for output hook h. Afterwards, for every raw input x:
        ``forward(x) == forward_before(x * s_in) / s_out`` — feature selections (TopK) and
        thresholds (JumpReLU) included.
        """
        raise NotImplementedError

    # --- axes -------------------------------------------------------------------------------

    def token_axes(self, x: Tensor) -> tuple[str, ...]:
        """``("batch",)`` or ``("batch", "context")`` from the input's rank."""
        n = x.ndim - len(self.input_dims)
        if n not in (1, 2):
            raise ShapeError(f"{type(self).__name__} input must have 1 or 2 token axes before "
                             f"{self.input_dims}, got shape {tuple(x.shape)}")
        if self.needs_sequences and n != 2:
            raise ShapeError(f"{type(self).__name__} needs sequences (batch, context, ...), "
                             f"got shape {tuple(x.shape)}")
        return TOKEN_AXES[:n]

    def feature_axes(self, x: Tensor) -> tuple[str, ...]:
        return self.token_axes(x) + self.feature_dims

    def output_axes(self, x: Tensor) -> tuple[str, ...]:
        return self.token_axes(x) + self.output_dims

    @property
    def n_features(self) -> int:
        return self.config.n_features

    # --- what evaluation and analysis use -------------------------------------------------------

    def split_output(self, reconstruction: Tensor) -> dict[str, Tensor]:
        """The prediction of each output hook point, ``{hook: (token axes..., d)}``.

        Default: the single output hook. Multi-output architectures (layers/heads axis) override.
        """
        (hook,) = self.config.hooks_out
        return {hook: reconstruction}

    def reconstruct_hooks(self, inputs: Mapping[str, Tensor], mask: Tensor | None = None) -> dict[str, Tensor]:
        """Raw-space predictions of the output hook points from raw input activations.

        ``inputs`` must hold every input hook point. Used to splice the dictionary into the
        language model (evaluation). Architectures whose outputs can be computed from a subset of
        the inputs (e.g. a cross-layer transcoder at an early layer) may override it.
        """
        missing = [h for h in self.config.hooks_in if h not in inputs]
        if missing:
            raise DataError(f"{type(self).__name__} needs activations of {missing} to reconstruct its outputs")
        batch: dict[str, Any] = dict(inputs)
        # label hooks are only needed for their normalisation scale: the input's scale stands in
        # for an SAE (same hook); a transcoder's output scale comes from its dataset norm
        for hook in self.config.hooks_out:
            if hook not in batch:
                batch[hook] = torch.ones_like(next(iter(inputs.values()))[..., :1]).expand(
                    *next(iter(inputs.values())).shape[:-1], self.hook_dims()[hook])
        if mask is not None:
            batch["mask"] = mask
        if self.config.normalization in ("token", "batch") and any(h not in inputs for h in self.config.hooks_out):
            raise DataError(f"normalization={self.config.normalization!r} needs the output activations to rescale "
                            "the prediction; splicing such a transcoder is not supported (fold dataset norms)")
        return self.split_output(self.forward_raw(batch))

    def analysis_activations(self, feature_acts: Tensor, x: Tensor) -> Tensor:
        """Feature activations reduced to ``token axes + (n_features,)`` for per-feature analysis.

        Default: the maximum over extra feature axes (heads, layers); single-axis dictionaries are
        returned unchanged.
        """
        extra = len(self.feature_dims) - 1
        out = feature_acts
        for _ in range(extra):
            out = out.max(dim=-2).values
        return out

    def sample_extras(self, x: Tensor, acts: Tensor, sequence_indices: Tensor, feature_indices: Tensor,
                      positions: Tensor) -> Mapping[str, Any] | None:
        """Optional per-sample analysis extras, computed in the analysis pass.

        Called by :class:`~lmsae.analysis.FeatureAnalyzer` with the prepared input ``x`` and the
        analysis activations ``acts`` ``(B, T, F)`` of the current batch whenever K samples enter
        a feature's kept contexts: sample k is sequence ``sequence_indices[k]`` of the batch,
        feature ``feature_indices[k]``, peak token ``positions[k]``. Return ``{name: array (K, ...)}``
        (fixed trailing shape and dtype per name, e.g. padded sparse entries); each kept sample
        stores its row in ``Sample.extras``. Default: None (no per-sample extras, not called).
        """
        return None

    def decoder_directions(self) -> dict[str, Tensor]:
        """Each feature's write direction in raw space per output hook: ``{hook: (n_features, d)}``.

        Used by direct logit attribution. Architectures that can express it implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not provide decoder directions")

    # --- normalisation ------------------------------------------------------------------------

    def hook_scales(self, batch: Batch) -> dict[str, Tensor]:
        """Factor per hook point that maps raw activations into normalised space.

        Shapes broadcast against the hook tensor: a 0-d tensor for 'dataset'/'none', one value
        per token (``token axes + (1,)``) for 'token', a 0-d tensor for 'batch'.
        """
        mode = self.config.normalization
        scales: dict[str, Tensor] = {}
        for hook in self.config.hook_points:
            x = _get(batch, hook)
            d = x.shape[-1]
            if mode == "none":
                scales[hook] = torch.ones((), dtype=x.dtype, device=x.device)
            elif mode == "dataset":
                norm = self.config.dataset_norms.get(hook)
                if norm is None:
                    raise DataError(f"normalization='dataset' but no dataset norm is known for hook point "
                                    f"{hook!r}; estimate it (the trainer does) or set dictionary.dataset_norms")
                scales[hook] = torch.tensor(math.sqrt(d) / norm, dtype=x.dtype, device=x.device)
            elif mode == "token":
                scales[hook] = math.sqrt(d) / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            elif mode == "batch":
                norms = x.norm(dim=-1)
                mask = batch.get("mask")
                if mask is not None and mask.shape == norms.shape:
                    mean = (norms * mask).sum() / mask.sum().clamp_min(1)
                else:
                    mean = norms.mean()
                scales[hook] = math.sqrt(d) / mean.clamp_min(1e-8)
            else:  # pragma: no cover - the config type forbids it
                raise DataError(f"unknown normalization {mode!r}")
        return scales

    def normalize(self, batch: Batch, scales: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """A copy of ``batch`` with every hook point multiplied by its scale."""
        scales = self.hook_scales(batch) if scales is None else scales
        out = dict(batch)
        for hook, s in scales.items():
            out[hook] = _get(batch, hook) * s
        return out

    def output_scale(self, scales: Mapping[str, Tensor]) -> Tensor:
        """The scale of the prediction, broadcastable to ``token axes + output_dims``.

        Default: the scale of the single output hook point. Multi-output architectures stack
        their per-hook scales along their layer/head axis.
        """
        (hook,) = self.config.hooks_out
        return scales[hook]

    def forward_raw(self, batch: Batch) -> Tensor:
        """Prediction in raw activation space from a raw batch."""
        scales = self.hook_scales(batch)
        x, extras = self.prepare_input(self.normalize(batch, scales))
        return self.forward(x, mask=batch.get("mask"), **extras) / self.output_scale(scales)

    def fold_normalization(self) -> None:
        """Fold dataset-wise normalisation into the weights; afterwards ``normalization='none'``.

        Only 'dataset' normalisation is foldable (a fixed factor per hook point); 'none' is a no-op;
        token- and batch-wise normalisation depend on the data and raise :class:`DataError`.
        """
        mode = self.config.normalization
        if mode == "none":
            return
        if mode != "dataset":
            raise DataError(f"normalization={mode!r} depends on the data and cannot be folded into the weights")
        missing = [h for h in self.config.hook_points if h not in self.config.dataset_norms]
        if missing:
            raise DataError(f"cannot fold: no dataset norm for hook point(s) {missing}")
        dims = self.hook_dims()
        scales = {h: math.sqrt(dims[h]) / self.config.dataset_norms[h] for h in self.config.hook_points}
        with torch.no_grad():
            self.fold_scales({h: scales[h] for h in self.config.hooks_in},
                             {h: scales[h] for h in self.config.hooks_out})
        self.config = attrs.evolve(self.config, normalization="none", dataset_norms={})

    def hook_dims(self) -> dict[str, int]:
        """Width (last dimension) of each hook point's activations."""
        raise NotImplementedError

    def check_batch(self, batch: Batch) -> None:
        """Raise :class:`DataError` naming the hook point when ``batch`` lacks one or has the wrong width."""
        for hook, d in self.hook_dims().items():
            x = _get(batch, hook)
            if x.shape[-1] != d:
                raise DataError(f"hook point {hook!r} has width {x.shape[-1]} but the dictionary expects {d} "
                                f"(check the dictionary's width settings, e.g. d_model)")

    # --- examples for tests -------------------------------------------------------------------

    def example_batch(self, n: int, generator: torch.Generator | None = None,
                      context: int | None = None) -> dict[str, Tensor]:
        """A random batch with every hook point (n tokens, or n sequences of ``context`` tokens)."""
        if self.needs_sequences and context is None:
            context = 8
        lead = (n,) if context is None else (n, context)
        dtype = next(self.parameters()).dtype
        batch: dict[str, Tensor] = {}
        for hook, d in self.hook_dims().items():
            batch[hook] = torch.randn(*lead, d, generator=generator, dtype=dtype) * 3.0 + 0.5
        batch["mask"] = torch.ones(lead, dtype=torch.bool)
        return batch

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _get(batch: Batch, hook: str) -> Tensor:
    try:
        return batch[hook]
    except KeyError:
        keys = sorted(k for k in batch if k not in ("mask", "tokens", "meta"))
        raise DataError(f"the activation stream has no hook point {hook!r} (the dictionary needs it); "
                        f"it provides: {keys}") from None
