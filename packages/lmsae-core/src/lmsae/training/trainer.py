"""The standard trainer: any stream of batches in, a trained dictionary out.

One step: normalise the batch, encode, decode, compute the losses (reconstruction, sparsity
penalty, JumpReLU pre-activation loss, AuxK), back-propagate, clip by the global gradient norm,
step the optimiser and the learning-rate schedule, update dead-feature statistics and metrics.

Run length: ``total_steps = total_training_tokens // tokens_per_batch`` where tokens_per_batch is
the number of token positions of the first batch (streams give fixed-size batches). The run ends
after ``total_steps`` steps, when a hook calls :meth:`Trainer.request_stop`, or when the stream
ends early (``on_stream_end = "finish"`` keeps what was learnt and says so; ``"error"`` fails).

Checkpoints hold the weights, the optimiser, the schedule, the trainer state (step, tokens,
dead-feature counts, metric window, RNG states) and the stream position, so a resumed run ends
bit-for-bit where an uninterrupted one would (on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, Literal

import attrs
import torch
from tqdm.auto import tqdm

from lmsae.config import TrainerConfig, config_class, option
from lmsae.config.fields import in_range, non_negative, positive, steps_or_fraction
from lmsae.dictionary.base import SparseDictionary
from lmsae.dictionary.io import save_dictionary
from lmsae.errors import CheckpointError, DataError, LmsaeError
from lmsae.nn.activations import JumpReLU, auxk_select
from lmsae.nn.losses import (
    SPARSITY_KINDS,
    DeadFeatureTracker,
    auxk_loss,
    jumprelu_preact_loss,
    reconstruction_loss,
    sparsity_penalty,
)
from lmsae.distributed.collectives import all_reduce, reduce_sum
from lmsae.distributed.mesh import Mesh
from lmsae.distributed.parallel import ParallelContext, parallel
from lmsae.nn.axes import TOKEN_AXES, flatten_tokens
from lmsae.training.metrics import MetricWindow, batch_statistics, distributed_batch_statistics
from lmsae.training.optim import OPTIMIZERS, build_optimizer, clip_grad_norm_
from lmsae.training.schedules import (
    LR_SCHEDULES,
    coefficient_at_step,
    k_at_step,
    make_lr_scheduler,
    resolve_steps,
)
from lmsae.training.state_io import (
    load_tensors_and_json,
    nested_from_flat,
    nested_to_flat,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    rng_state_capture,
    rng_state_restore,
    save_tensors_and_json,
    scheduler_state_from_json,
    scheduler_state_to_json,
)

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"


@config_class
class StandardTrainerConfig(TrainerConfig):
    """The core trainer (``[trainer] type = "standard"``, the default)."""

    name: ClassVar[str] = "standard"

    total_training_tokens: int = option(doc="Tokens to train on (token positions of the batches).",
                                        validator=positive())
    # optimiser and learning rate
    lr: float | None = option(
        None, doc="Peak learning rate. Unset: chosen by measurement (benchmarks/README.md, 'Training recipe'): "
                  "0.16 / sqrt(d_in) for signsgd_schedulefree, 0.064 / sqrt(d_in) for adam and sparse_adam "
                  "(d_in: the dictionary's input width; the best rate barely depends on the number of features).",
        validator=positive())
    betas: tuple[float, float] = option((0.9, 0.999), doc="Adam betas; signsgd_schedulefree uses betas[0] as its "
                                                          "interpolation beta.")
    optimizer: Literal[OPTIMIZERS] = option(  # type: ignore[valid-type]
        "signsgd_schedulefree",
        doc="'signsgd_schedulefree' (the default: sign-SGD with schedule-free averaging; reached the highest "
            "explained variance and ground-truth recovery per token in benchmarks/recipe.py), 'adam', or "
            "'sparse_adam' (only elements with a non-zero gradient are updated).")
    lr_schedule: Literal[LR_SCHEDULES] = option(  # type: ignore[valid-type]
        "constant_with_warmup",
        doc="Learning-rate schedule: constant, constant_with_warmup (linear warmup, constant, linear "
            "cool-down to lr*lr_end_ratio over the last lr_cooldown_steps), linear_decay, cosine, exponential.")
    lr_warmup_steps: int | float = option(0.01, doc="Warmup steps (int) or fraction of the total (float in [0, 1]).",
                                          validator=steps_or_fraction())
    lr_cooldown_steps: int | float | None = option(
        None, doc="Cool-down steps or fraction (constant_with_warmup only). Unset: 0 for signsgd_schedulefree "
                  "(its average replaces the cool-down), 0.2 for adam and sparse_adam.",
        validator=steps_or_fraction())
    lr_end_ratio: float = option(1 / 32, doc="Final learning rate as a fraction of lr.", validator=in_range(0, 1))
    jumprelu_lr_factor: float = option(1.0, doc="Learning-rate multiplier of JumpReLU log-thresholds.",
                                       validator=positive())
    clip_grad_norm: float = option(0.0, doc="Clip gradients to this global L2 norm (0 = no clipping; "
                                            "JumpReLU thresholds excluded).", validator=non_negative())
    # sparsity
    sparsity_coefficient: float = option(0.0, doc="Coefficient of the sparsity penalty (0 = off; TopK "
                                                  "dictionaries usually need none).", validator=non_negative())
    sparsity_loss: Literal[SPARSITY_KINDS] = option(  # type: ignore[valid-type]
        "power", doc="Sparsity penalty: 'power' (L_p norm of decoder-norm-weighted activations, p=1 is the "
                     "weighted L1), 'tanh' (sum of tanh(c*s)), 'tanh-quad' (frequency-based).")
    sparsity_p: float = option(1.0, doc="p of the 'power' penalty.", validator=positive())
    sparsity_weight_by_decoder_norm: bool = option(
        True, doc="Weight each feature's activation by its decoder norm in the penalty (gradient flows to it).")
    tanh_stretch: float = option(4.0, doc="c of the tanh penalties.", validator=positive())
    frequency_scale: float = option(0.01, doc="Frequency scale of the tanh-quad penalty.", validator=positive())
    sparsity_warmup_steps: int | float = option(0.1, doc="Linear warmup of the sparsity coefficient: steps or "
                                                         "fraction (0 = full from the start).",
                                                validator=steps_or_fraction())
    lp_coefficient: float = option(0.0, doc="JumpReLU pre-activation loss coefficient "
                                            "(sum_i relu(theta_i - h_i)*||d_i||; 0 = off).", validator=non_negative())
    auxk_coefficient: float = option(0.0, doc="AuxK loss coefficient (reconstruct the residual from dead "
                                              "features; 0 = off).", validator=non_negative())
    k_aux: int = option(512, doc="Dead features used by the AuxK loss per token.", validator=positive())
    dead_threshold_tokens: int = option(10_000_000, doc="A feature is dead after this many tokens without firing.",
                                        validator=positive())
    # top-k schedule
    initial_k: int | None = option(None, doc="Start TopK at this k and anneal to the dictionary's top_k "
                                             "(None = no schedule).", validator=positive())
    k_warmup_steps: int | float = option(0.1, doc="Steps (or fraction) over which k anneals.",
                                         validator=steps_or_fraction())
    k_cold_boot_steps: int | float = option(0, doc="Steps (or fraction) at initial_k before annealing.",
                                            validator=steps_or_fraction())
    k_schedule: Literal["linear", "exponential"] = option("linear", doc="Shape of the k annealing.")
    k_exponential_factor: float = option(3.0, doc="Steepness of the exponential k schedule.", validator=positive())
    # logging, evaluation, checkpoints
    log_every: int = option(100, doc="Log metrics every this many steps.", validator=positive())
    eval_every: int = option(0, doc="Evaluate on the held-out stream every this many steps (0 = only at the end).",
                             validator=non_negative())
    eval_tokens: int = option(100_000, doc="Tokens per evaluation.", validator=positive())
    n_checkpoints: int = option(0, doc="Number of resumable checkpoints during training (0 = none).",
                                validator=non_negative())
    checkpoint_schedule: Literal["linear", "log"] = option(
        "linear", doc="Spacing of checkpoints: evenly ('linear') or denser early ('log').")
    keep_checkpoints: int | None = option(None, doc="Keep only the newest this many checkpoints (None = all).",
                                          validator=positive())
    calibration_batches: int = option(8, doc="Batches read (from a separate pass over the start of the stream) "
                                             "to estimate dataset-wise normalisation norms.", validator=positive())
    on_stream_end: Literal["finish", "error"] = option(
        "finish", doc="If the stream ends before total_training_tokens: 'finish' saves what was learnt and reports "
                      "it; 'error' fails the run.")
    seed: int = option(0, doc="Seed of the torch RNG during training.")
    fast_path: bool = option(
        True, doc="Use the architecture's fused training path where it applies (TopK SAE without sparsity "
                  "penalty: one dense encoder product, sparse decode, sparse encoder backward); it gives the "
                  "plain path's losses and gradients (to float rounding).")
    mixed_precision: Literal["auto", "off", "bf16"] = option(
        "auto", doc="bf16 autocast of the forward pass (weights and optimizer stay in the run's dtype). 'auto': on "
                    "for CUDA devices that support bf16, off elsewhere — on CPUs without native bf16 (AVX2, no "
                    "AVX-512/AMX) bf16 matmuls are 5-400x slower than fp32 (benchmarks/README.md).")


@attrs.frozen
class TrainResult:
    """How a run ended."""

    reason: Literal["completed", "stream_exhausted", "stopped"]
    steps: int
    tokens: int
    total_steps: int
    metrics: dict[str, float]
    message: str = ""


def checkpoint_steps(total_steps: int, n: int, schedule: str) -> list[int]:
    """Steps (1-based counts of completed steps) after which a checkpoint is written.

    'linear': evenly spaced; 'log': 2^(i/n * log2(total)); the final step is not included (the
    final dictionary is saved anyway). Both are in *steps* (the reference compared token counts
    with steps, so its log checkpoints never fired).
    """
    if n <= 0 or total_steps <= 1:
        return []
    if schedule == "linear":
        steps = {round(total_steps * i / n) for i in range(1, n + 1)}
    else:
        steps = {math.ceil(2 ** (i / n * math.log2(total_steps))) for i in range(1, n + 1)}
    return sorted(s for s in steps if 0 < s < total_steps)


def _flat_tokens(t: torch.Tensor, axes: Any, mask: Any) -> torch.Tensor:
    f = flatten_tokens(t, axes, mask)
    return f.reshape(f.shape[0], -1)


def _to_device(batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Move tensors to ``device``; floating tensors are also cast to ``dtype`` (the model's)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None,
                     non_blocking=True)
        out[k] = v
    return out


class Trainer:
    """Trains one dictionary. Build it, then call :meth:`fit` with a stream of batches."""

    def __init__(self, config: StandardTrainerConfig, model: SparseDictionary, *,
                 device: torch.device | str = "cpu", loggers: Any = None, hooks: Any = None,
                 output_dir: str | os.PathLike | None = None, registry: Any = None,
                 eval_fn: Callable[[SparseDictionary], Mapping[str, float]] | None = None,
                 progress: bool = True, mesh: Mesh | None = None,
                 sharding_rules: Mapping[str, Mapping[str, int]] | None = None, full_config: Any = None):
        self.config = config
        self.model = model
        #: the process mesh (single process by default); under it ``model`` is this rank's shard
        self.mesh = mesh if mesh is not None else Mesh.single()
        self.parallel_context = ParallelContext(self.mesh) if self.mesh.is_distributed else None
        if self.mesh.is_distributed and sharding_rules is None:
            raise LmsaeError("a distributed trainer needs the architecture's sharding rules")
        self.sharding_rules = dict(sharding_rules or {})
        #: config of the whole dictionary (``model`` may be a shard of it); set by the train task
        self.full_config = full_config if full_config is not None else model.config
        self.device = torch.device(device)
        self.loggers = loggers
        self.hooks = hooks
        self.registry = registry
        self.output_dir = pathlib.Path(output_dir) if output_dir is not None else None
        self.eval_fn = eval_fn
        self.progress = progress
        self.step = 0
        self.tokens = 0
        self.total_steps = 0
        self.tokens_per_batch = 0
        self.window = MetricWindow()
        self.tracker = DeadFeatureTracker(tuple(model.decoder_norm().shape), device=self.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self._checkpoint_at: set[int] = set()
        self._stop_reason: str | None = None
        self.last_metrics: dict[str, float] = {}
        self._steps: dict[str, int] = {}
        #: reusable work buffers of fused paths (e.g. the pre-activations), kept across steps
        self._buffers: dict[str, Any] = {}
        self.model.to(self.device)

    # --- setup ------------------------------------------------------------------------------

    def request_stop(self, reason: str = "stopped by a hook") -> None:
        """Ask the run to stop after the current step (used by behaviour hooks)."""
        self._stop_reason = reason

    def setup(self, tokens_per_batch: int) -> None:
        """Resolve step counts, build the optimiser and the schedule (not needed when resuming)."""
        cfg = self.config
        if tokens_per_batch <= 0:
            raise DataError("the first batch holds no tokens")
        self.tokens_per_batch = tokens_per_batch
        self.total_steps = max(1, cfg.total_training_tokens // tokens_per_batch)
        total = self.total_steps
        self._steps = {
            "lr_warmup": resolve_steps(cfg.lr_warmup_steps, total, "trainer.lr_warmup_steps"),
            "lr_cooldown": resolve_steps(self._cooldown(), total, "trainer.lr_cooldown_steps"),
            "sparsity_warmup": resolve_steps(cfg.sparsity_warmup_steps, total, "trainer.sparsity_warmup_steps"),
            "k_warmup": resolve_steps(cfg.k_warmup_steps, total, "trainer.k_warmup_steps"),
            "k_cold_boot": resolve_steps(cfg.k_cold_boot_steps, total, "trainer.k_cold_boot_steps"),
        }
        self._checkpoint_at = set(checkpoint_steps(total, cfg.n_checkpoints, cfg.checkpoint_schedule))
        thresholds = [p for n, p in self.model.named_parameters() if n.endswith("log_threshold")]
        others = [p for n, p in self.model.named_parameters() if not n.endswith("log_threshold")]
        lr = self.learning_rate()
        groups = [{"params": others, "lr": lr, "name": "others"}]
        if thresholds:
            groups.append({"params": thresholds, "lr": lr * cfg.jumprelu_lr_factor, "name": "jumprelu"})
        self.optimizer = build_optimizer(cfg.optimizer, groups, lr=lr, betas=tuple(cfg.betas))
        self.scheduler = make_lr_scheduler(self.optimizer, cfg.lr_schedule, total_steps=total,
                                           warmup_steps=self._steps["lr_warmup"],
                                           cooldown_steps=self._steps["lr_cooldown"], end_ratio=cfg.lr_end_ratio)
        if self.config.initial_k is not None:
            top_k = self._top_k()
            if top_k is None:
                raise LmsaeError("trainer.initial_k is set but the dictionary has no TopK/BatchTopK activation")
            if self.config.initial_k < top_k:
                raise LmsaeError(f"trainer.initial_k ({self.config.initial_k}) must be >= the dictionary's "
                                 f"top_k ({top_k})")

    def learning_rate(self) -> float:
        """The peak learning rate: ``trainer.lr``, or the measured default for the optimizer and the
        dictionary's input width (see the option's doc)."""
        if self.config.lr is not None:
            return float(self.config.lr)
        factor = 0.16 if self.config.optimizer == "signsgd_schedulefree" else 0.064
        return factor / math.sqrt(self._input_width())

    def _input_width(self) -> int:
        config = self.full_config
        width = getattr(config, "d_model", None)
        if isinstance(width, int) and width > 0:
            return width
        try:
            dims = self.model.hook_dims()
            return max(int(dims[h]) for h in config.hooks_in)
        except (AttributeError, KeyError, NotImplementedError, ValueError):
            return 512

    def _cooldown(self) -> int | float:
        if self.config.lr_cooldown_steps is not None:
            return self.config.lr_cooldown_steps
        return 0 if self.config.optimizer == "signsgd_schedulefree" else 0.2

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Parameters hold the optimizer's evaluation point inside the block (schedule-free's
        average ``x``; a no-op for Adam): wrap evaluation and saving in it."""
        opt = self.optimizer
        swap = opt is not None and callable(getattr(opt, "eval", None)) and callable(getattr(opt, "train", None))
        if swap:
            opt.eval()
        try:
            yield
        finally:
            if swap:
                opt.train()

    def finish_training(self) -> None:
        """Leave the parameters at the optimizer's evaluation point (schedule-free's average) for
        the final evaluation and save; a later :meth:`train_step` switches back."""
        opt = self.optimizer
        if opt is not None and callable(getattr(opt, "eval", None)):
            opt.eval()

    def _activation(self) -> Any:
        return getattr(self.model, "activation", None)

    def _top_k(self) -> int | None:
        return getattr(self.model.config, "top_k", None) if hasattr(self._activation(), "k") else None

    # --- one step ---------------------------------------------------------------------------

    def coefficients(self, step: int) -> dict[str, float]:
        cfg = self.config
        return {
            "sparsity": coefficient_at_step(step, coefficient=cfg.sparsity_coefficient,
                                            warmup_steps=self._steps["sparsity_warmup"]),
            "lp": cfg.lp_coefficient,
            "auxk": cfg.auxk_coefficient,
        }

    def current_k(self, step: int) -> int | None:
        top_k = self._top_k()
        if top_k is None:
            return None
        return k_at_step(step, top_k=top_k, initial_k=self.config.initial_k, warmup_steps=self._steps["k_warmup"],
                         cold_boot_steps=self._steps["k_cold_boot"], kind=self.config.k_schedule,
                         exponential_factor=self.config.k_exponential_factor)

    def compute_loss(self, batch: Mapping[str, Any], step: int) -> dict[str, Any]:
        """Forward pass and every loss term for a raw batch (already on the device)."""
        model, cfg = self.model, self.config
        nb = model.normalize(batch)
        x, extras = model.prepare_input(nb)
        label = model.prepare_label(nb)
        mask = nb.get("mask")
        f_axes, o_axes = model.feature_axes(x), model.output_axes(x)
        with parallel(self.parallel_context) as pctx, self._autocast():
            return self._compute_loss(model, cfg, x, extras, label, mask, f_axes, o_axes, step, pctx)

    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the forward pass on this trainer's device (None: full precision)."""
        mode = self.config.mixed_precision
        if mode == "auto":
            cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if cuda_bf16 else None
        return torch.bfloat16 if mode == "bf16" else None

    def _autocast(self) -> Any:
        dtype = self.autocast_dtype()
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _compute_loss(self, model: SparseDictionary, cfg: StandardTrainerConfig, x: Any, extras: dict[str, Any],
                      label: Any, mask: Any, f_axes: Any, o_axes: Any, step: int, pctx: Any) -> dict[str, Any]:
        # Under a mesh (pctx not None): ``model`` is this rank's shard. Its features' partial
        # reconstruction is summed over the model group (the output bias added by the first model
        # rank only); feature-summed losses are summed likewise; a rank's loss covers its own
        # heads, summed over the head group. reduce_sum passes gradients through unchanged: every
        # rank then holds the same loss, and each rank's gradient is its share.
        mg = pctx.feature_group if pctx is not None else None
        hg = pctx.head_group if pctx is not None else None
        if pctx is None and cfg.fast_path:
            fast = self._compute_loss_fused(model, cfg, x, extras, label, mask, f_axes, o_axes, step)
            if fast is not None:
                return fast
        hidden_pre = model.encode_pre(x, **extras)
        acts = model.activate(hidden_pre, mask=mask)
        if mg is not None and not pctx.first("model"):
            recon = reduce_sum(model.decode_linear(acts, **extras), mg)
        else:
            recon = reduce_sum(model.decode(acts, **extras), mg)
        coef = self.coefficients(step)
        l_rec = reduce_sum(reconstruction_loss(recon, label, o_axes, mask), hg)
        terms = {"mse_loss": l_rec}
        need_norm = coef["sparsity"] > 0 or coef["lp"] > 0
        dec_norm = model.decoder_norm() if need_norm else None
        if coef["sparsity"] > 0:
            weight = dec_norm if cfg.sparsity_weight_by_decoder_norm else None
            terms["sparsity_loss"] = coef["sparsity"] * reduce_sum(sparsity_penalty(
                acts, f_axes, kind=cfg.sparsity_loss, decoder_norm=weight, p=cfg.sparsity_p,
                tanh_stretch=cfg.tanh_stretch, frequency_scale=cfg.frequency_scale, mask=mask), mg)
        activation = self._activation()
        if coef["lp"] > 0:
            if not isinstance(activation, JumpReLU):
                raise LmsaeError("trainer.lp_coefficient > 0 needs a JumpReLU dictionary")
            gated = hidden_pre * dec_norm if getattr(model.config, "decoder_norm_gating", False) else hidden_pre
            terms["lp_loss"] = coef["lp"] * reduce_sum(jumprelu_preact_loss(
                gated, activation.threshold, f_axes, decoder_norm=dec_norm, mask=mask), mg)
        if coef["auxk"] > 0:
            dead = self.tracker.dead_mask(min(cfg.dead_threshold_tokens, max(self.tokens, 1)))
            aux = None
            any_dead = all_reduce(dead.any().reshape(1), mg, "max") if mg is not None else dead.any()
            if bool(any_dead):
                aux_acts = auxk_select(hidden_pre, dead, cfg.k_aux)
                aux = reduce_sum(model.decode_linear(aux_acts, **extras), mg)
            residual = (label - recon).detach()
            if pctx is None:
                terms["aux_loss"] = coef["auxk"] * auxk_loss(residual, aux, o_axes, mask=mask)
            else:
                # normalised by the residual's mean squared norm over the GLOBAL batch (all heads),
                # as one process would
                numerator = reduce_sum(auxk_loss(residual, aux, o_axes, mask=mask, normalize=False), hg)
                flat = _flat_tokens(residual, o_axes, mask)
                sums = torch.stack([flat.double().pow(2).sum(), torch.tensor(float(flat.shape[0]), dtype=torch.float64)])
                sums = all_reduce(all_reduce(sums, hg), pctx.data_group)
                # tokens were counted once per head rank
                denominator = (sums[0] / (sums[1] / self.mesh.size("head"))).clamp_min(1e-30)
                terms["aux_loss"] = coef["auxk"] * numerator / denominator.to(numerator.dtype)
        loss = sum(terms.values())
        return {"loss": loss, "terms": terms, "acts": acts, "recon": recon, "label": label, "mask": mask,
                "feature_axes": f_axes, "output_axes": o_axes, "coefficients": coef}

    def _compute_loss_fused(self, model: SparseDictionary, cfg: StandardTrainerConfig, x: Any, extras: dict[str, Any],
                            label: Any, mask: Any, f_axes: Any, o_axes: Any, step: int) -> dict[str, Any] | None:
        """The architecture's fused path (e.g. :meth:`SparseAutoEncoder.fused_topk_forward`), when it
        applies and no loss needs the dense activations (no sparsity or JumpReLU penalty); same
        losses and gradients as the plain path (tests/test_fused.py), no (tokens x features) tensor
        but the reused pre-activation buffer. None: use the plain path."""
        coef = self.coefficients(step)
        fused = getattr(model, "fused_topk_forward", None)
        if coef["sparsity"] > 0 or coef["lp"] > 0 or not callable(fused) or extras:
            return None
        out = fused(x, self._buffers)
        if out is None:
            return None
        recon, indices, values = out
        from lmsae.nn.fused import squared_error_loss

        if all(a in TOKEN_AXES for a in o_axes[:-1]) and recon.shape == label.shape:
            terms = {"mse_loss": squared_error_loss(recon, label, mask)}  # same value, cheaper backward
        else:
            terms = {"mse_loss": reconstruction_loss(recon, label, o_axes, mask)}
        if coef["auxk"] > 0:
            from lmsae.nn.fused import auxk_sae_forward

            dead = self.tracker.dead_mask(min(cfg.dead_threshold_tokens, max(self.tokens, 1)))
            input_bias = model.b_D if getattr(model.config, "apply_decoder_bias_to_input", False) else None
            aux_out = auxk_sae_forward(x, model.W_E, model.b_E, model.W_D, self._buffers["pre"], dead, cfg.k_aux,
                                       input_bias=input_bias)
            aux = aux_out[0] if aux_out is not None else None
            terms["aux_loss"] = coef["auxk"] * auxk_loss((label - recon).detach(), aux, o_axes, mask=mask)
        loss = sum(terms.values())
        return {"loss": loss, "terms": terms, "acts": None, "sparse_acts": (indices, values), "recon": recon,
                "label": label, "mask": mask, "feature_axes": f_axes, "output_axes": o_axes, "coefficients": coef}

    def _step_statistics(self, ctx: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Update the dead-feature tracker and return the batch statistics (dense or fused path)."""
        if ctx.get("acts") is not None:
            self.tracker.update(ctx["acts"].detach(), ctx["feature_axes"], ctx["mask"])
            return batch_statistics(ctx["acts"], ctx["feature_axes"], ctx["recon"], ctx["label"],
                                    ctx["output_axes"], ctx["mask"])
        from lmsae.nn.fused import sparse_batch_statistics

        indices, values = ctx["sparse_acts"]
        n_features = int(self.tracker.shape[-1])
        stats = sparse_batch_statistics(indices, values, ctx["recon"], ctx["label"], ctx["mask"], n_features)
        # the features that fired on an unmasked token are those counted by the statistics
        self.tracker.update_fired(stats["feature_count"] > 0, int(stats["n_tokens"]))
        return stats

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """One optimiser step on a raw batch; returns the loss context."""
        if self.optimizer is None:
            raise LmsaeError("call Trainer.setup() (or fit()) before train_step()")
        train = getattr(self.optimizer, "train", None)
        if callable(train):
            train()  # a no-op unless the parameters hold the evaluation point
        k = self.current_k(self.step)
        if k is not None:
            self._activation().k = k
        self.model.train()
        ctx = self.compute_loss(batch, self.step)
        if self.mesh.is_distributed:
            return self._finish_distributed_step(ctx, k)
        ctx["loss"].backward()
        clip_params = [p for n, p in self.model.named_parameters() if not n.endswith("log_threshold")]
        grad_norm = clip_grad_norm_(clip_params, self.config.clip_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            stats = self._step_statistics(ctx)
        n_tokens = int(ctx["mask"].sum()) if ctx["mask"] is not None else int(stats["n_tokens"])
        self.window.add_batch(stats, {"overall_loss": ctx["loss"].detach(),
                                      **{k2: v.detach() for k2, v in ctx["terms"].items()}})
        self.window.add_max("details/gradient_norm_before_clipping", grad_norm)
        self.step += 1
        self.tokens += n_tokens
        ctx["lr"] = lr
        ctx["k"] = k
        return ctx

    # --- distributed steps --------------------------------------------------------------------

    def _token_count(self, ctx: Mapping[str, Any]) -> int:
        mask = ctx["mask"]
        if mask is not None:
            return int(mask.sum())
        return int(flatten_tokens(ctx["acts"].detach(), ctx["feature_axes"], None).shape[0])

    def _sync_axes(self, name: str) -> tuple[str, ...]:
        """Mesh axes over which the gradient of parameter ``name`` is summed: data, and every
        parallel axis along which the parameter is replicated."""
        rule = self.sharding_rules.get(name, {})
        axes = [a for a in ("data",) if self.mesh.size(a) > 1]
        axes += [a for a in ("head", "model") if self.mesh.size(a) > 1 and a not in rule]
        return tuple(axes)

    def _sharded_axes(self, name: str) -> tuple[str, ...]:
        rule = self.sharding_rules.get(name, {})
        return tuple(a for a in ("head", "model") if self.mesh.size(a) > 1 and a in rule)

    def _reduce_gradients(self) -> None:
        """Sum gradients over the axes of :meth:`_sync_axes`, one flat all-reduce per group."""
        buckets: dict[tuple[str, ...], list[torch.nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # every rank must take part in every reduction
            axes = self._sync_axes(name)
            if axes:
                buckets.setdefault(axes, []).append(p)
        for axes, params in buckets.items():
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            flat = all_reduce(flat, self.mesh.group(*axes))
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def _global_grad_norm(self, names: set[str]) -> torch.Tensor:
        """L2 norm of the gradients of ``names`` over the whole model (every shard counted once)."""
        by_axes: dict[tuple[str, ...], torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            if name not in names or p.grad is None:
                continue
            axes = self._sharded_axes(name)
            sq = p.grad.detach().double().pow(2).sum()
            by_axes[axes] = by_axes.get(axes, torch.zeros((), dtype=torch.float64)) + sq.cpu()
        total = torch.zeros((), dtype=torch.float64)
        for axes in sorted(set(by_axes) | {a for a in self._all_shard_axes()}):
            value = by_axes.get(axes, torch.zeros((), dtype=torch.float64))
            total = total + (all_reduce(value, self.mesh.group(*axes)) if axes else value)
        return total.sqrt().float()

    def _all_shard_axes(self) -> set[tuple[str, ...]]:
        # every rank must run the same reductions in the same order: the axis sets of all parameters
        return {self._sharded_axes(n) for n, _ in self.model.named_parameters()}

    def _finish_distributed_step(self, ctx: dict[str, Any], k: int | None) -> dict[str, Any]:
        mesh, cfg = self.mesh, self.config
        dg = mesh.group("data")
        n_local = self._token_count(ctx)
        n_global = int(all_reduce(torch.tensor([n_local], dtype=torch.int64), dg)) if dg is not None else n_local
        # each loss term is a mean over this rank's tokens: weighting by its share of the global
        # batch and summing the gradients over data ranks gives the gradient of the global mean
        weight = n_local / max(n_global, 1)
        (ctx["loss"] * weight).backward()
        self._reduce_gradients()
        clip_names = {n for n, _ in self.model.named_parameters() if not n.endswith("log_threshold")}
        grad_norm = self._global_grad_norm(clip_names)
        if cfg.clip_grad_norm > 0:
            coef = torch.clamp(cfg.clip_grad_norm / (grad_norm + 1e-6), max=1.0)
            for n, p in self.model.named_parameters():
                if n in clip_names and p.grad is not None:
                    p.grad.mul_(coef.to(device=p.grad.device, dtype=p.grad.dtype))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            self.tracker.update(ctx["acts"].detach(), ctx["feature_axes"], ctx["mask"],
                                reduce=lambda fired, n: (all_reduce(fired, dg, "max"),
                                                         n_global if dg is not None else n))
            stats = distributed_batch_statistics(ctx["acts"], ctx["feature_axes"], ctx["recon"], ctx["label"],
                                                 ctx["output_axes"], ctx["mask"], mesh)
            names = ["overall_loss", *ctx["terms"]]
            values = torch.stack([ctx["loss"].detach().double() * weight,
                                  *(v.detach().double() * weight for v in ctx["terms"].values())])
            values = all_reduce(values, dg).tolist()
        self.window.add_batch(stats, dict(zip(names, values)))
        self.window.add_max("details/gradient_norm_before_clipping", grad_norm)
        self.step += 1
        self.tokens += n_global
        ctx["lr"] = lr
        ctx["k"] = k
        return ctx

    def _everyone_has(self, have: bool) -> bool:
        """True when every process of this trainer (data, head and model ranks) has ``have``."""
        flag = torch.tensor([1 if have else 0], dtype=torch.int64)
        return bool(all_reduce(flag, self.mesh.group("data", "head", "model"), "min").item())

    def _feature_mean(self, values: torch.Tensor) -> float:
        """Mean of a per-feature tensor over ALL features (shards summed over the model group)."""
        sums = torch.stack([values.detach().double().sum().cpu(), torch.tensor(float(values.numel()),
                                                                                dtype=torch.float64)])
        sums = all_reduce(sums, self.mesh.group("model"))
        return float(sums[0] / sums[1].clamp_min(1))

    def window_metrics(self, ctx: Mapping[str, Any]) -> dict[str, float]:
        """The logging window's metrics plus the current details."""
        m = self.window.compute()
        seen = max(self.tokens, 1)
        dead = self.tracker.dead_mask(min(self.config.dead_threshold_tokens, seen))
        m["metrics/dead_fraction"] = self._feature_mean(dead)
        with torch.no_grad(), parallel(self.parallel_context):
            m["metrics/decoder_norm"] = self._feature_mean(self.model.decoder_norm())
        activation = self._activation()
        if isinstance(activation, JumpReLU):
            m["metrics/mean_jumprelu_threshold"] = self._feature_mean(activation.threshold.detach())
        if ctx.get("k") is not None:
            m["sparsity/k"] = float(ctx["k"])
        m["details/current_learning_rate"] = float(ctx["lr"])
        m["details/n_training_tokens"] = float(self.tokens)
        m["details/step"] = float(self.step)
        for name, value in ctx["coefficients"].items():
            m[f"details/{name}_coefficient"] = float(value)
        extra = getattr(self.model, "training_metrics", None)
        if callable(extra) and self.mesh.size("model", "head") == 1:
            # architecture metrics see this rank's features only: reported without feature/head splits
            m.update(extra(ctx))
        return m

    # --- the loop ---------------------------------------------------------------------------

    def fit(self, stream: Iterable[Mapping[str, Any]], *, resumed: bool = False,
            stream_state: Callable[[], dict] | None = None) -> TrainResult:
        """Train until ``total_steps``, a stop request, or the end of ``stream``.

        ``stream_state`` returns the stream's position (stored in checkpoints); ``resumed`` means
        :meth:`load_state_dict` already restored the trainer.
        """
        it: Iterator[Mapping[str, Any]] = iter(stream)
        first = next(it, None)
        if self.mesh.is_distributed and not self._everyone_has(first is not None):
            raise DataError(f"the activation stream of a process is empty (rank {self.mesh.rank}: "
                            f"{'empty' if first is None else 'not empty'}); each data rank needs batches")
        if first is None:
            raise DataError("the activation stream is empty")
        dtype = next(self.model.parameters()).dtype
        first = _to_device(first, self.device, dtype)
        self.model.check_batch(first)
        if not resumed:
            mask = first.get("mask")
            per_batch = int(mask.numel()) if mask is not None else int(next(
                v for k, v in first.items() if isinstance(v, torch.Tensor) and v.is_floating_point()).shape[0])
            self.setup(per_batch * self.mesh.size("data"))
            torch.manual_seed(self.config.seed)
        if self.hooks is not None:
            self.hooks.lmsae_before_training(trainer=self, dictionary=self.model)
        interactive = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not self.progress, dynamic_ncols=True, leave=True,
                   mininterval=0.1 if interactive else 10.0)
        reason: str = "completed"
        batch: Mapping[str, Any] | None = first
        ctx: dict[str, Any] | None = None
        try:
            while self.step < self.total_steps:
                if batch is None:
                    nxt = next(it, None)
                    # under data parallelism every rank stops at the first step some rank cannot take
                    if self.mesh.is_distributed and not self._everyone_has(nxt is not None):
                        nxt = None
                    if nxt is None:
                        reason = "stream_exhausted"
                        break
                    batch = _to_device(nxt, self.device, dtype)
                ctx = self.train_step(batch)
                batch = None
                bar.update(1)
                metrics = None
                if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                    metrics = self.window_metrics(ctx)
                    self.window.reset()
                    self.last_metrics = metrics
                    bar.set_postfix(ev=f"{metrics['metrics/explained_variance']:.3f}",
                                    l0=f"{metrics['metrics/l0']:.1f}", refresh=False)
                # held-out evaluation every eval_every steps, whether or not the step logs: its
                # metrics join the step's logged metrics (or are logged alone)
                if self.eval_fn is not None and self.config.eval_every and self.step % self.config.eval_every == 0:
                    with self.averaged():
                        evaluated = {f"eval/{k}": v for k, v in self.eval_fn(self.model).items()}
                    if metrics is None:
                        metrics = evaluated
                        self.last_metrics = {**self.last_metrics, **evaluated}
                    else:
                        metrics.update(evaluated)
                if metrics is not None and self.loggers is not None:
                    self.loggers.log(self.step, metrics)
                if self.hooks is not None:
                    self.hooks.lmsae_after_step(trainer=self, dictionary=self.model, step=self.step, metrics=metrics)
                if self.step in self._checkpoint_at and self.output_dir is not None:
                    with self.averaged():  # weights and optimizer state saved in the same mode: exact resume
                        self.save_checkpoint(stream_state() if stream_state else None)
                stop = self._stop_reason is not None
                if self.mesh.is_distributed:
                    # a stop requested on one process stops all of them at the same step (the
                    # others would otherwise wait for it in the next collective until the timeout)
                    stop = not self._everyone_has(not stop)
                    if stop and self._stop_reason is None:
                        self._stop_reason = "another process of this run requested a stop"
                if stop:
                    reason = "stopped"
                    break
        finally:
            bar.close()
        if ctx is not None and self.window.n_batches:
            # a run that stopped between two logging steps still reports its last window
            self.last_metrics = self.window_metrics(ctx)
            self.window.reset()
            if self.loggers is not None:
                self.loggers.log(self.step, self.last_metrics)
        message = {"completed": f"trained {self.step} steps ({self.tokens:,} tokens)",
                   "stopped": f"stopped at step {self.step}/{self.total_steps}: {self._stop_reason}",
                   "stream_exhausted": f"the activation stream ended after {self.step} of {self.total_steps} steps "
                                       f"({self.tokens:,} of {self.config.total_training_tokens:,} tokens)"}[reason]
        if reason == "stream_exhausted":
            if self.config.on_stream_end == "error":
                raise DataError(message + " (trainer.on_stream_end = 'error')")
            log.warning("%s; keeping what was learnt", message)
        self.finish_training()
        result = TrainResult(reason=reason, steps=self.step, tokens=self.tokens, total_steps=self.total_steps,
                             metrics=dict(self.last_metrics), message=message)
        if self.hooks is not None:
            self.hooks.lmsae_after_training(trainer=self, dictionary=self.model, result=result)
        return result

    # --- state / checkpoints ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights needed to continue exactly (optimiser included)."""
        if self.optimizer is None:
            raise LmsaeError("nothing to save before setup()")
        opt_tensors, opt_meta = optimizer_state_to_flat(self.optimizer)
        tracker = self.tracker.state_dict()
        if self.mesh.is_distributed:
            # collective: the canonical (whole-dictionary) optimizer moments and dead-feature counts
            opt_tensors = self._convert_optimizer_tensors(opt_tensors, gather=True)
            tracker = {"tokens_since_fired": self._convert_feature_tensor(tracker["tokens_since_fired"], gather=True)}
        rng_tensors, rng_meta = rng_state_capture()
        return {
            "step": self.step, "tokens": self.tokens, "total_steps": self.total_steps,
            "tokens_per_batch": self.tokens_per_batch,
            "optimizer": {"tensors": opt_tensors, "meta": opt_meta},
            "scheduler": scheduler_state_to_json(self.scheduler),
            "tracker": tracker,
            "window": self.window.state_dict(),
            "rng": {"tensors": rng_tensors, "meta": rng_meta},
            "last_metrics": dict(self.last_metrics),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.setup(int(state["tokens_per_batch"]))
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        if int(state["total_steps"]) != self.total_steps:
            raise CheckpointError(f"checkpoint was made for {state['total_steps']} steps but this config gives "
                                  f"{self.total_steps}; trainer.total_training_tokens changed?")
        opt_tensors, tracker = state["optimizer"]["tensors"], state["tracker"]
        if self.mesh.is_distributed:
            # checkpoints hold the whole dictionary's state: take this shard's part
            opt_tensors = self._convert_optimizer_tensors(opt_tensors, gather=False)
            tracker = {"tokens_since_fired": self._convert_feature_tensor(tracker["tokens_since_fired"], gather=False)}
        self.optimizer.load_state_dict(optimizer_state_from_flat(opt_tensors, state["optimizer"]["meta"]))
        self.scheduler.load_state_dict(scheduler_state_from_json(state["scheduler"]))
        self.tracker.load_state_dict(tracker)
        self.window.load_state_dict(state["window"])
        rng_state_restore(state["rng"]["tensors"], state["rng"]["meta"])
        self.last_metrics = dict(state.get("last_metrics", {}))

    # --- canonical <-> shard conversion of per-parameter state ---------------------------------

    def _optimizer_param_names(self) -> list[str]:
        """Parameter names in the optimiser's index order (the groups built by :meth:`setup`)."""
        names = [n for n, _ in self.model.named_parameters()]
        return [n for n in names if not n.endswith("log_threshold")] + [n for n in names if n.endswith("log_threshold")]

    def _convert_optimizer_tensors(self, tensors: Mapping[str, torch.Tensor], *, gather: bool) -> dict[str, torch.Tensor]:
        """Optimiser tensors ``state.<index>.<name>`` of a parameter's shape, gathered to the
        whole dictionary (``gather``) or cut to this shard; other tensors (step counts) unchanged."""
        from lmsae.distributed.models import gather_state, layout_of
        from lmsae.distributed.sharding import shard_state

        names = self._optimizer_param_names()
        params = dict(self.model.named_parameters())
        out = dict(tensors)
        by_kind: dict[str, dict[str, str]] = {}
        for key, value in tensors.items():
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) >= len(names):
                continue
            name = names[int(parts[1])]
            if value.ndim == 0:
                continue
            by_kind.setdefault(parts[2], {})[name] = key
        layout = layout_of(self.mesh)
        for kind in sorted(by_kind):  # the same order on every rank: gathering is collective
            keys = by_kind[kind]
            part = {name: tensors[key] for name, key in keys.items()}
            converted = (gather_state(self.model, self.sharding_rules, self.mesh, state=part) if gather else
                         shard_state(part, self.sharding_rules, layout, parameters=set(part)))
            wrong = [] if gather else [n for n, v in converted.items() if v.shape != params[n].shape]
            if wrong:
                raise CheckpointError(f"optimizer state {kind!r} of {wrong[0]} has shape "
                                      f"{tuple(converted[wrong[0]].shape)}, not the parameter's "
                                      f"{tuple(params[wrong[0]].shape)}: was the checkpoint made for another dictionary?")
            for name, key in keys.items():
                out[key] = converted[name]
        return out

    def _feature_rule(self) -> Any:
        """The ``model``-axis dim rule of the feature axis (a GroupedDim when features are grouped)."""
        from lmsae.distributed.sharding import GroupedDim

        for rule in self.sharding_rules.values():
            dim = rule.get("model")
            if isinstance(dim, GroupedDim):
                return GroupedDim(-1, dim.group_sizes)
        return -1

    def _convert_feature_tensor(self, value: torch.Tensor, *, gather: bool) -> torch.Tensor:
        """A per-feature tensor (last dim = features; replicated over head ranks) gathered or cut."""
        from lmsae.distributed.models import gather_state, layout_of
        from lmsae.distributed.sharding import shard_state

        rules = {"features": {"model": self._feature_rule()}}
        if gather:
            return gather_state(self.model, rules, self.mesh, state={"features": value})["features"]
        layout = {a: v for a, v in layout_of(self.mesh).items() if a == "model"}
        return shard_state({"features": value}, rules, layout)["features"]

    def gather_model(self) -> SparseDictionary:
        """The whole dictionary in canonical order, on every process (collective under a mesh;
        the model itself in a single process)."""
        if not self.mesh.is_distributed:
            return self.model
        from lmsae.distributed.models import gather_state

        state = gather_state(self.model, self.sharding_rules, self.mesh)
        if self.registry is None:
            raise LmsaeError("gathering a sharded dictionary needs the registry")
        full = self.registry.architecture(self.full_config.name).model_class(self.full_config)
        full.load_state_dict(state)
        first = next(self.model.parameters())
        return full.to(device=first.device, dtype=first.dtype)

    def _save_distributed_checkpoint(self, stream_state: dict | None) -> pathlib.Path | None:
        """Sharded: each (head, model) shard of data rank 0 writes its own weights, optimizer
        moments and dead-feature counters (``shards/head<h>-model<m>``), the first process of each
        data rank its stream position, global rank 0 the trainer state and the layout; nothing is
        gathered. :func:`read_checkpoint_state` reassembles the canonical state, for any layout."""
        from lmsae.distributed.collectives import broadcast_object

        mesh = self.mesh
        group = mesh.group("data", "head", "model")
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step:09d}"
        tmp_name = None
        if mesh.is_primary:
            root.mkdir(parents=True, exist_ok=True)
            tmp_name = tempfile.mkdtemp(prefix=".tmp-", dir=root)
        tmp = pathlib.Path(broadcast_object(tmp_name, group))
        failed = False
        try:
            opt_tensors, opt_meta = optimizer_state_to_flat(self.optimizer)
            if mesh.coord("data") == 0:
                tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
                tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
                tensors["tracker.tokens_since_fired"] = self.tracker.state_dict()["tokens_since_fired"].cpu()
                save_tensors_and_json(tmp / "shards", f"head{mesh.coord('head')}-model{mesh.coord('model')}",
                                      tensors, {"head": mesh.coord("head"), "model": mesh.coord("model")})
            if mesh.coord("model") == 0 and mesh.coord("head") == 0:
                d = mesh.coord("data")
                name = "stream" if d == 0 else f"stream_d{d}"
                s_tensors, s_meta = nested_to_flat(stream_state if stream_state is not None else {}, name)
                save_tensors_and_json(tmp, name, s_tensors, s_meta)
        except BaseException:
            failed = True
            raise
        finally:
            # every process reaches the barrier (an error is re-raised after it, never a hang)
            torch.distributed.barrier(group=group)
            if failed and mesh.is_primary:
                shutil.rmtree(tmp, ignore_errors=True)
        if mesh.is_primary:
            try:
                rng_tensors, rng_meta = rng_state_capture()
                state = {
                    "step": self.step, "tokens": self.tokens, "total_steps": self.total_steps,
                    "tokens_per_batch": self.tokens_per_batch,
                    "optimizer": {"tensors": {}, "meta": opt_meta},
                    "scheduler": scheduler_state_to_json(self.scheduler),
                    "window": self.window.state_dict(),
                    "rng": {"tensors": rng_tensors, "meta": rng_meta},
                    "last_metrics": dict(self.last_metrics),
                    "data_ranks": mesh.size("data"),
                    "layout": {"head": mesh.size("head"), "model": mesh.size("model")},
                    "optimizer_parameters": self._optimizer_param_names(),
                    "dictionary_config": self.registry.unstructure(self.full_config),
                }
                tensors, meta = nested_to_flat(state, "trainer")
                save_tensors_and_json(tmp, "trainer", tensors, meta)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("checkpoint saved: %s (sharded: %d file(s))", final, mesh.size("head", "model"))
            if self.config.keep_checkpoints is not None:
                for old in list_checkpoints(self.output_dir)[: -self.config.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier(group=group)
        return final

    def save_checkpoint(self, stream_state: dict | None) -> pathlib.Path:
        """Write ``<output_dir>/checkpoints/step_<N>/`` atomically (a temporary directory, then a rename).

        Under a mesh (collective): the checkpoint holds the canonical dictionary and optimizer
        state whatever the layout, plus one stream position per data rank (``stream``,
        ``stream_d1``...), so a run resumes under another ``model``/``head`` layout (the same
        number of data ranks: each continues its own shard of the stream)."""
        if self.output_dir is None or self.registry is None:
            raise LmsaeError("checkpoints need an output_dir and a registry")
        if self.mesh.is_distributed:
            return self._save_distributed_checkpoint(stream_state)
        root = self.output_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{CHECKPOINT_PREFIX}{self.step:09d}"
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            save_dictionary(self.model, tmp / "dictionary", self.registry)
            tensors, meta = nested_to_flat(self.state_dict(), "trainer")
            save_tensors_and_json(tmp, "trainer", tensors, meta)
            s_tensors, s_meta = nested_to_flat(stream_state if stream_state is not None else {}, "stream")
            save_tensors_and_json(tmp, "stream", s_tensors, s_meta)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("checkpoint saved: %s", final)
        if self.config.keep_checkpoints is not None:
            for old in list_checkpoints(self.output_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Complete checkpoints of a run, oldest first."""
    root = pathlib.Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def _feature_dim_rule(rules: Mapping[str, Mapping[str, int]]) -> Any:
    from lmsae.distributed.sharding import GroupedDim

    for rule in rules.values():
        dim = rule.get("model")
        if isinstance(dim, GroupedDim):
            return GroupedDim(-1, dim.group_sizes)
    return -1


def read_checkpoint_state(path: str | os.PathLike, registry: Any, data_rank: int = 0,
                          data_ranks: int = 1) -> tuple[SparseDictionary, dict[str, Any], dict[str, Any]]:
    """``(dictionary, trainer_state, stream_state)`` of a checkpoint, in canonical (whole-dictionary)
    form whatever layout wrote it: a single-process checkpoint, or the shard files of a distributed
    run reassembled with the architecture's sharding rules. A trainer under any layout takes its
    own part (:meth:`Trainer.load_state_dict`)."""
    from lmsae.dictionary.io import load_dictionary

    path = pathlib.Path(path)
    trainer_state, stream_state = read_checkpoint(path, data_rank, data_ranks)
    if not (path / "shards").is_dir():
        trainer_state.pop("layout", None)
        return load_dictionary(path / "dictionary", registry), trainer_state, stream_state
    from lmsae.config.base import DictionaryConfig
    from lmsae.distributed.sharding import unshard_state

    layout = trainer_state.pop("layout")
    names = trainer_state.pop("optimizer_parameters")
    config = registry.structure(trainer_state.pop("dictionary_config"), DictionaryConfig)
    spec = registry.architecture(config.name)
    rules = spec.sharding_rules(config)
    heads, models = int(layout["head"]), int(layout["model"])
    shards = {}
    for h in range(heads):
        for m in range(models):
            tensors, _ = load_tensors_and_json(path / "shards", f"head{h}-model{m}")
            shards[(h, m)] = tensors
    axes, counts = ["head", "model"], [heads, models]
    model_parts = {key: {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}
                   for key, t in shards.items()}
    model = spec.model_class(config)
    params = {n for n, _ in model.named_parameters()}
    state = unshard_state(model_parts, rules, axes, counts, parameters=params)
    model.load_state_dict(state)
    # optimizer tensors of a parameter's shape are sharded like it; the rest (step counts) replicated
    opt_rules: dict[str, Mapping[str, int]] = {}
    opt_parts: dict[tuple[int, ...], dict[str, torch.Tensor]] = {key: {} for key in shards}
    for key, tensors in shards.items():
        for k, v in tensors.items():
            if not k.startswith("optimizer."):
                continue
            flat = k[len("optimizer."):]
            parts = flat.split(".")
            if len(parts) == 3 and parts[0] == "state" and parts[1].isdigit() and v.ndim > 0:
                opt_rules[flat] = rules.get(names[int(parts[1])], {})
            else:
                opt_rules[flat] = {}
            opt_parts[key][flat] = v
    trainer_state["optimizer"]["tensors"] = unshard_state(opt_parts, opt_rules, axes, counts)
    tracker_rules = {"tokens_since_fired": {"model": _feature_dim_rule(rules)}}
    tracker_parts = {key: {"tokens_since_fired": t["tracker.tokens_since_fired"]} for key, t in shards.items()}
    trainer_state["tracker"] = unshard_state(tracker_parts, tracker_rules, axes, counts)
    return model, trainer_state, stream_state


def read_checkpoint(path: str | os.PathLike, data_rank: int = 0,
                    data_ranks: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainer_state, stream_state)`` of a checkpoint directory (the stream position of data
    rank ``data_rank`` of ``data_ranks``)."""
    path = pathlib.Path(path)
    t_tensors, t_meta = load_tensors_and_json(path, "trainer")
    trainer = nested_from_flat(t_tensors, t_meta, str(path / "trainer.json"))
    saved = int(trainer.pop("data_ranks", 1))
    if saved != data_ranks:
        raise CheckpointError(f"{path} was written by {saved} data-parallel process{'es' if saved != 1 else ''}; "
                              f"this run has [distributed] data = {data_ranks} (each data rank resumes its own "
                              "shard of the stream: keep the data size; model and head may change)")
    name = "stream" if data_rank == 0 else f"stream_d{data_rank}"
    s_tensors, s_meta = load_tensors_and_json(path, name)
    return trainer, nested_from_flat(s_tensors, s_meta, str(path / f"{name}.json"))
