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
from lmsae.training.metrics import MetricWindow, batch_statistics
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
    lr: float = option(4e-4, doc="Peak learning rate.", validator=positive())
    betas: tuple[float, float] = option((0.9, 0.999), doc="Adam betas.")
    optimizer: Literal[OPTIMIZERS] = option(  # type: ignore[valid-type]
        "adam", doc="'adam', or 'sparse_adam' (only elements with a non-zero gradient are updated).")
    lr_schedule: Literal[LR_SCHEDULES] = option(  # type: ignore[valid-type]
        "constant_with_warmup",
        doc="Learning-rate schedule: constant, constant_with_warmup (linear warmup, constant, linear "
            "cool-down to lr*lr_end_ratio over the last lr_cooldown_steps), linear_decay, cosine, exponential.")
    lr_warmup_steps: int | float = option(0.01, doc="Warmup steps (int) or fraction of the total (float in [0, 1]).",
                                          validator=steps_or_fraction())
    lr_cooldown_steps: int | float = option(0.2, doc="Cool-down steps or fraction (constant_with_warmup only).",
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
                 progress: bool = True):
        self.config = config
        self.model = model
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
            "lr_cooldown": resolve_steps(cfg.lr_cooldown_steps, total, "trainer.lr_cooldown_steps"),
            "sparsity_warmup": resolve_steps(cfg.sparsity_warmup_steps, total, "trainer.sparsity_warmup_steps"),
            "k_warmup": resolve_steps(cfg.k_warmup_steps, total, "trainer.k_warmup_steps"),
            "k_cold_boot": resolve_steps(cfg.k_cold_boot_steps, total, "trainer.k_cold_boot_steps"),
        }
        self._checkpoint_at = set(checkpoint_steps(total, cfg.n_checkpoints, cfg.checkpoint_schedule))
        thresholds = [p for n, p in self.model.named_parameters() if n.endswith("log_threshold")]
        others = [p for n, p in self.model.named_parameters() if not n.endswith("log_threshold")]
        groups = [{"params": others, "lr": cfg.lr, "name": "others"}]
        if thresholds:
            groups.append({"params": thresholds, "lr": cfg.lr * cfg.jumprelu_lr_factor, "name": "jumprelu"})
        self.optimizer = build_optimizer(cfg.optimizer, groups, lr=cfg.lr, betas=tuple(cfg.betas))
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
        hidden_pre = model.encode_pre(x, **extras)
        acts = model.activate(hidden_pre, mask=mask)
        recon = model.decode(acts, **extras)
        coef = self.coefficients(step)
        l_rec = reconstruction_loss(recon, label, o_axes, mask)
        terms = {"mse_loss": l_rec}
        need_norm = coef["sparsity"] > 0 or coef["lp"] > 0
        dec_norm = model.decoder_norm() if need_norm else None
        if coef["sparsity"] > 0:
            weight = dec_norm if cfg.sparsity_weight_by_decoder_norm else None
            terms["sparsity_loss"] = coef["sparsity"] * sparsity_penalty(
                acts, f_axes, kind=cfg.sparsity_loss, decoder_norm=weight, p=cfg.sparsity_p,
                tanh_stretch=cfg.tanh_stretch, frequency_scale=cfg.frequency_scale, mask=mask)
        activation = self._activation()
        if coef["lp"] > 0:
            if not isinstance(activation, JumpReLU):
                raise LmsaeError("trainer.lp_coefficient > 0 needs a JumpReLU dictionary")
            gated = hidden_pre * dec_norm if getattr(model.config, "decoder_norm_gating", False) else hidden_pre
            terms["lp_loss"] = coef["lp"] * jumprelu_preact_loss(gated, activation.threshold, f_axes,
                                                                 decoder_norm=dec_norm, mask=mask)
        if coef["auxk"] > 0:
            dead = self.tracker.dead_mask(min(cfg.dead_threshold_tokens, max(self.tokens, 1)))
            aux = None
            if bool(dead.any()):
                aux_acts = auxk_select(hidden_pre, dead, cfg.k_aux)
                # the decoders are linear in the activations: decode(a) - decode(0) removes the bias
                aux = model.decode(aux_acts, **extras) - model.decode(torch.zeros_like(aux_acts), **extras)
            terms["aux_loss"] = coef["auxk"] * auxk_loss((label - recon).detach(), aux, o_axes, mask=mask)
        loss = sum(terms.values())
        return {"loss": loss, "terms": terms, "acts": acts, "recon": recon, "label": label, "mask": mask,
                "feature_axes": f_axes, "output_axes": o_axes, "coefficients": coef}

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """One optimiser step on a raw batch; returns the loss context."""
        if self.optimizer is None:
            raise LmsaeError("call Trainer.setup() (or fit()) before train_step()")
        k = self.current_k(self.step)
        if k is not None:
            self._activation().k = k
        self.model.train()
        ctx = self.compute_loss(batch, self.step)
        ctx["loss"].backward()
        clip_params = [p for n, p in self.model.named_parameters() if not n.endswith("log_threshold")]
        grad_norm = clip_grad_norm_(clip_params, self.config.clip_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            self.tracker.update(ctx["acts"].detach(), ctx["feature_axes"], ctx["mask"])
            stats = batch_statistics(ctx["acts"], ctx["feature_axes"], ctx["recon"], ctx["label"],
                                     ctx["output_axes"], ctx["mask"])
        n_tokens = int(ctx["mask"].sum()) if ctx["mask"] is not None else int(stats["n_tokens"])
        self.window.add_batch(stats, {"overall_loss": float(ctx["loss"].detach()),
                                      **{k2: float(v.detach()) for k2, v in ctx["terms"].items()}})
        self.window.add_max("details/gradient_norm_before_clipping", float(grad_norm))
        self.step += 1
        self.tokens += n_tokens
        ctx["lr"] = lr
        ctx["k"] = k
        return ctx

    def window_metrics(self, ctx: Mapping[str, Any]) -> dict[str, float]:
        """The logging window's metrics plus the current details."""
        m = self.window.compute()
        seen = max(self.tokens, 1)
        dead = self.tracker.dead_mask(min(self.config.dead_threshold_tokens, seen))
        m["metrics/dead_fraction"] = float(dead.double().mean())
        with torch.no_grad():
            m["metrics/decoder_norm"] = float(self.model.decoder_norm().mean())
        activation = self._activation()
        if isinstance(activation, JumpReLU):
            m["metrics/mean_jumprelu_threshold"] = float(activation.threshold.detach().mean())
        if ctx.get("k") is not None:
            m["sparsity/k"] = float(ctx["k"])
        m["details/current_learning_rate"] = float(ctx["lr"])
        m["details/n_training_tokens"] = float(self.tokens)
        m["details/step"] = float(self.step)
        for name, value in ctx["coefficients"].items():
            m[f"details/{name}_coefficient"] = float(value)
        extra = getattr(self.model, "training_metrics", None)
        if callable(extra):
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
        if first is None:
            raise DataError("the activation stream is empty")
        dtype = next(self.model.parameters()).dtype
        first = _to_device(first, self.device, dtype)
        self.model.check_batch(first)
        if not resumed:
            mask = first.get("mask")
            per_batch = int(mask.numel()) if mask is not None else int(next(
                v for k, v in first.items() if isinstance(v, torch.Tensor) and v.is_floating_point()).shape[0])
            self.setup(per_batch)
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
                    if self.eval_fn is not None and self.config.eval_every and self.step % self.config.eval_every == 0:
                        metrics.update({f"eval/{k}": v for k, v in self.eval_fn(self.model).items()})
                    self.last_metrics = metrics
                    bar.set_postfix(ev=f"{metrics['metrics/explained_variance']:.3f}",
                                    l0=f"{metrics['metrics/l0']:.1f}", refresh=False)
                    if self.loggers is not None:
                        self.loggers.log(self.step, metrics)
                if self.hooks is not None:
                    self.hooks.lmsae_after_step(trainer=self, dictionary=self.model, step=self.step, metrics=metrics)
                if self.step in self._checkpoint_at and self.output_dir is not None:
                    self.save_checkpoint(stream_state() if stream_state else None)
                if self._stop_reason is not None:
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
        rng_tensors, rng_meta = rng_state_capture()
        return {
            "step": self.step, "tokens": self.tokens, "total_steps": self.total_steps,
            "tokens_per_batch": self.tokens_per_batch,
            "optimizer": {"tensors": opt_tensors, "meta": opt_meta},
            "scheduler": scheduler_state_to_json(self.scheduler),
            "tracker": self.tracker.state_dict(),
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
        self.optimizer.load_state_dict(optimizer_state_from_flat(state["optimizer"]["tensors"],
                                                                 state["optimizer"]["meta"]))
        self.scheduler.load_state_dict(scheduler_state_from_json(state["scheduler"]))
        self.tracker.load_state_dict(state["tracker"])
        self.window.load_state_dict(state["window"])
        rng_state_restore(state["rng"]["tensors"], state["rng"]["meta"])
        self.last_metrics = dict(state.get("last_metrics", {}))

    def save_checkpoint(self, stream_state: dict | None) -> pathlib.Path:
        """Write ``<output_dir>/checkpoints/step_<N>/`` atomically (a temporary directory, then a rename)."""
        if self.output_dir is None or self.registry is None:
            raise LmsaeError("checkpoints need an output_dir and a registry")
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


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainer_state, stream_state)`` of a checkpoint directory."""
    path = pathlib.Path(path)
    t_tensors, t_meta = load_tensors_and_json(path, "trainer")
    s_tensors, s_meta = load_tensors_and_json(path, "stream")
    return (nested_from_flat(t_tensors, t_meta, str(path / "trainer.json")),
            nested_from_flat(s_tensors, s_meta, str(path / "stream.json")))
