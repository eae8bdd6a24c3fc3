"""Optimisers and gradient clipping for dictionary training.

:class:`SparseAdam` is Adam for gradients that are exactly zero almost everywhere, as in TopK
dictionaries where most latents are inactive on a batch: the elements that received no gradient
keep their moments, their step count and their value, instead of being moved by stale momentum.

:class:`SignSGDScheduleFree` is sign-SGD with schedule-free averaging (Defazio et al. 2024,
"The Road Less Scheduled"). Its parameters hold the gradient-evaluation point during training
and must be switched to the averaged iterate with :meth:`SignSGDScheduleFree.eval` before
evaluating or saving (and back with :meth:`SignSGDScheduleFree.train`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "OPTIMIZERS",
    "SignSGDScheduleFree",
    "SparseAdam",
    "build_optimizer",
    "clip_grad_norm_",
    "global_grad_norm",
]

OPTIMIZERS: tuple[str, ...] = ("adam", "sparse_adam", "signsgd_schedulefree")
"""Names accepted by :func:`build_optimizer`."""

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class SparseAdam(torch.optim.Optimizer):
    """Adam that only updates the elements whose gradient is nonzero.

    For each parameter element with ``grad != 0`` this is the update of
    :class:`torch.optim.Adam` (L2 weight decay added to the gradient, bias-corrected moments),
    except that the bias correction uses that element's own step count. Elements with
    ``grad == 0`` are left entirely alone: no moment decay, no weight decay, no step, no count.
    Parameters whose ``grad`` is None are skipped.

    State per parameter (all the parameter's shape): ``step`` (int32, number of updates the
    element received), ``exp_avg`` and ``exp_avg_sq`` (parameter dtype).

    With every gradient element nonzero at every step this matches :class:`torch.optim.Adam`
    up to float rounding.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (> 0; may be changed per group by a scheduler).
        betas: decay rates of the first and second moment, each in ``[0, 1)``.
        eps: added to the denominator (>= 0).
        weight_decay: L2 penalty coefficient (>= 0), applied to updated elements only.

    Raises:
        ValueError: a hyper-parameter is out of range.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if not lr >= 0.0:
            raise ValueError(f"SparseAdam: lr must be >= 0, got {lr!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"SparseAdam: betas must be two numbers in [0, 1), got {betas!r}")
        if not eps >= 0.0:
            raise ValueError(f"SparseAdam: eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"SparseAdam: weight_decay must be >= 0, got {weight_decay!r}")
        defaults = {
            "lr": lr,
            "betas": (float(betas[0]), float(betas[1])),
            "eps": eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, then move ``step`` to each param.

        The base class deliberately leaves ``step`` on the device it was saved from (it is a
        scalar there); ours is per element and must live with the parameter.
        """
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.int32)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None
    ) -> float | None:
        """Perform one update. ``closure`` (optional) re-evaluates and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("SparseAdam expects dense gradients holding exact zeros")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros_like(
                        p, dtype=torch.int32, memory_format=torch.contiguous_format
                    )
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)

                mask = grad != 0
                # Boolean indexing gathers only the active elements, so the work and the
                # temporaries scale with the number of active elements, not the parameter size.
                g = grad[mask]
                if g.numel() == 0:
                    continue
                step_t = state["step"]
                step_t[mask] += 1
                param_vals = p[mask]
                if weight_decay != 0:
                    g = g.add(param_vals, alpha=weight_decay)

                m = state["exp_avg"][mask].lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"][mask].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"][mask] = m
                state["exp_avg_sq"][mask] = v

                # Bias corrections per element, computed in float64 like Adam's Python floats.
                n = step_t[mask].to(torch.float64)
                bias_correction1 = 1 - torch.pow(beta1, n)
                bias_correction2_sqrt = (1 - torch.pow(beta2, n)).sqrt()
                step_size = (lr / bias_correction1).to(p.dtype)
                denom = (v.sqrt() / bias_correction2_sqrt.to(p.dtype)).add_(eps)
                # (step_size * m) / denom, in this order, is how Adam's addcdiv_ rounds.
                p[mask] = param_vals - (step_size * m) / denom
        return loss


class SignSGDScheduleFree(torch.optim.Optimizer):
    """Sign-SGD with schedule-free averaging (Defazio et al. 2024, "The Road Less Scheduled").

    Three sequences are kept per parameter: ``z``, the plain sign-SGD iterate; ``x``, a weighted
    average of the ``z`` iterates (the model to evaluate and keep); and ``y``, the point where the
    gradient is taken. At step ``t`` (1-based), with learning rate ``lr_t`` of the group::

        g_t     = gradient at y_t
        z_{t+1} = z_t - lr_t * sign(g_t) - lr_t * weight_decay * y_t
        x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}
        y_{t+1} = (1 - beta) z_{t+1} + beta x_{t+1}

    with ``c_{t+1} = w_t / (w_1 + ... + w_t)`` and ``w_t = max(lr_1..lr_t) ** weight_lr_power``
    (as in the reference implementation, package ``schedulefree``): with a constant learning rate
    ``c_{t+1} = 1/t`` and ``x_{t+1}`` is the uniform average of ``z_2..z_{t+1}``, the iterates the
    steps produced; ``weight_lr_power = 2`` (the paper's default) down-weights the iterates of a
    learning-rate warmup (a warmup from 0 gives them weight 0). ``x_1 = z_1 = y_1`` are the initial
    parameter values. ``beta`` interpolates between SGD on ``z`` (0) and evaluating the gradient at
    the average (1); it plays the role of momentum. Elements whose gradient is exactly 0 (inactive
    TopK latents) keep their ``z`` but their ``x`` and ``y`` still move towards it. Parameters
    whose ``grad`` is None are skipped entirely. A learning-rate scheduler may change ``lr`` per
    group as with any optimiser (warmup is taken into account by the weights above);
    schedule-free averaging is meant to replace a decay, so a constant learning rate after the
    warmup is the intended use.

    **Train / eval modes.** While training (:meth:`train` mode, the initial mode) the parameters
    hold ``y``. The parameters to evaluate or save are ``x``: the trainer MUST call :meth:`eval`
    before evaluating, saving weights, or handing the model to anyone, and :meth:`train` again
    before the next :meth:`step` (which raises in eval mode). The swap is exact: ``eval`` copies
    ``x`` into the parameters, ``train`` recomputes ``y`` from ``z`` and ``x`` with the same
    operation as :meth:`step`, so eval/train round trips never perturb training.

    **State** (saved by :meth:`state_dict`, tensors plus JSON-able values, so it goes through
    :func:`lmsae.training.state_io.optimizer_state_to_flat` unchanged): per parameter ``z`` and
    ``x`` (the parameter's shape and dtype); per group ``step`` (int), ``weight_sum`` and
    ``lr_max`` (floats) and ``train_mode`` (bool). Resuming is exact when the weights saved with
    the state are the parameters at that moment (``x`` if saved in eval mode, ``y`` in train
    mode): after :meth:`load_state_dict`, call :meth:`train` to get back to ``y`` bit for bit.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (>= 0; may be changed per group by a scheduler).
        beta: interpolation ``y = (1 - beta) z + beta x``, in ``[0, 1)``.
        weight_decay: decoupled weight decay at ``y`` (>= 0).
        weight_lr_power: exponent of the running maximum learning rate in the averaging
            weights (>= 0; 0 gives the uniform average ``c_t = 1/t``).

    Raises:
        ValueError: a hyper-parameter is out of range.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        weight_lr_power: float = 2.0,
    ):
        if not lr >= 0.0:
            raise ValueError(f"SignSGDScheduleFree: lr must be >= 0, got {lr!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"SignSGDScheduleFree: beta must be in [0, 1), got {beta!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"SignSGDScheduleFree: weight_decay must be >= 0, got {weight_decay!r}")
        if not weight_lr_power >= 0.0:
            raise ValueError(
                f"SignSGDScheduleFree: weight_lr_power must be >= 0, got {weight_lr_power!r}"
            )
        defaults = {
            "lr": lr,
            "beta": float(beta),
            "weight_decay": float(weight_decay),
            "weight_lr_power": float(weight_lr_power),
            "step": 0,
            "weight_sum": 0.0,
            "lr_max": 0.0,
            "train_mode": True,
        }
        super().__init__(params, defaults)

    @staticmethod
    def _compiled(*tensors: torch.Tensor) -> bool:
        """Whether the one-pass compiled update applies (CPU, float32/float64, contiguous, numba)."""
        from lmsae.nn import _kernels

        first = tensors[0]
        return (first.device.type == "cpu" and first.dtype in (torch.float32, torch.float64)
                and all(t.device.type == "cpu" and t.dtype == first.dtype and t.is_contiguous() for t in tensors)
                and _kernels.available())

    @classmethod
    def _interpolate(cls, z: torch.Tensor, x: torch.Tensor, beta: float, out: torch.Tensor) -> None:
        """``out = y = (1 - beta) z + beta x``; the one formula used by both step() and train()
        (written straight into the parameter: no temporary, no copy). On the CPU with the compiled
        kernels it is ``z + beta (x - z)``, as the compiled step computes it; else ``torch.lerp``.
        (Both are exact to the last bit within one process; resuming where the other one applies
        can differ by rounding.)"""
        if cls._compiled(out, z, x):
            from lmsae.nn import _kernels

            _kernels.call("interpolate", out.view(-1).numpy(), z.view(-1).numpy(), x.view(-1).numpy(), float(beta),
                          threads=torch.get_num_threads())
        else:
            torch.lerp(z, x, beta, out=out)

    @torch.no_grad()
    def eval(self) -> None:
        """Put the averaged iterate ``x`` into the parameters (call before evaluating or saving)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state and "x" in state:
                    p.copy_(state["x"])
            group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Put the gradient point ``y`` back into the parameters (call before training resumes)."""
        for group in self.param_groups:
            if group["train_mode"]:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state and "x" in state:
                    self._interpolate(state["z"], state["x"], group["beta"], p.detach())
            group["train_mode"] = True

    @property
    def train_mode(self) -> bool:
        """True when the parameters hold ``y`` (every group in train mode)."""
        return all(group["train_mode"] for group in self.param_groups)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None
    ) -> float | None:
        """Perform one update. ``closure`` (optional) re-evaluates and returns the loss.

        Raises:
            RuntimeError: the optimizer is in eval mode (call :meth:`train` first).
        """
        if not self.train_mode:
            raise RuntimeError(
                "SignSGDScheduleFree.step() in eval mode: the parameters hold the averaged "
                "iterate x; call optimizer.train() before training"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, beta, weight_decay = group["lr"], group["beta"], group["weight_decay"]
            group["step"] += 1
            group["lr_max"] = lr_max = max(float(lr), group["lr_max"])
            weight = lr_max ** group["weight_lr_power"]
            group["weight_sum"] = weight_sum = group["weight_sum"] + weight
            c = weight / weight_sum if weight_sum > 0 else 0.0
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("SignSGDScheduleFree does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["z"] = p.detach().clone(memory_format=torch.contiguous_format)
                    state["x"] = p.detach().clone(memory_format=torch.contiguous_format)
                z, x = state["z"], state["x"]
                y = p.detach()
                if self._compiled(y, grad, z, x):
                    from lmsae.nn import _kernels

                    _kernels.call("signsgd_sf_step", y.view(-1).numpy(), grad.detach().view(-1).numpy(),
                                  z.view(-1).numpy(), x.view(-1).numpy(), float(lr), float(weight_decay), float(c),
                                  float(beta), threads=torch.get_num_threads())
                    continue
                if weight_decay != 0:
                    z.add_(p, alpha=-lr * weight_decay)
                z.add_(grad.sign(), alpha=-lr)
                x.lerp_(z, c)
                self._interpolate(z, x, beta, y)
        return loss


def _as_list(params: Iterable[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        return [params]
    return list(params)


def _squared_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        device = grads[0].device
    else:
        # Still return a tensor on the parameters' device: with a distributed ``reduce_fn`` this
        # rank must take part in the collective even if it holds no gradient.
        device = params[0].device if params else torch.device("cpu")
    # accumulate in at least fp32 (fp64 gradients keep fp64)
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    total = torch.zeros((), dtype=acc, device=device)
    for g in grads:
        # vector_norm with an explicit dtype accumulates in fp32 without materialising an fp32
        # copy of a bf16/fp16 gradient.
        norm = torch.linalg.vector_norm(g.detach(), 2, dtype=acc if g.dtype != torch.float64 else torch.float64)
        total = total + norm.to(device).square()
    return total


def global_grad_norm(
    params: Iterable[torch.Tensor] | torch.Tensor,
    *,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` (those with ``grad`` None are skipped).

    Accumulated in fp32. ``reduce_fn`` (optional) is applied to the squared local norm before the
    square root, e.g. an all-reduce sum over ranks that each hold a shard of the gradients.

    ``reduce_fn`` may work in place and return None (as ``torch.distributed.all_reduce`` does).

    Returns:
        A 0-dim fp32 tensor on the device of the first gradient (of the first parameter if no
        parameter has a gradient).
    """
    total_sq = _squared_norm(_as_list(params))
    if reduce_fn is not None:
        reduced = reduce_fn(total_sq)
        # In-place collectives such as ``torch.distributed.all_reduce`` return None (or a work
        # handle); their result is then the tensor itself.
        if isinstance(reduced, torch.Tensor):
            total_sq = reduced
    return total_sq.sqrt()


def clip_grad_norm_(
    params: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    *,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scale gradients in place so that their global L2 norm is at most ``max_norm``.

    Gradients are multiplied by ``max_norm / (norm + 1e-6)`` when that factor is below 1 (as
    :func:`torch.nn.utils.clip_grad_norm_`); ``max_norm <= 0`` disables clipping. ``reduce_fn``
    is applied to the squared local norm before the square root (see :func:`global_grad_norm`).

    Returns:
        The global norm before clipping (0-dim fp32 tensor).
    """
    params = _as_list(params)
    grads = [p.grad for p in params if p.grad is not None]
    norm = global_grad_norm(params, reduce_fn=reduce_fn)
    if max_norm > 0 and grads:
        # Always multiply by the clamped factor instead of branching on ``norm > max_norm``: a
        # Python branch would force a device-to-host sync every step; a factor of exactly 1.0
        # leaves the gradients bit-identical.
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        if coef.device.type == "cpu" and all(g.device.type == "cpu" for g in grads) and float(coef) >= 1.0:
            return norm  # on the CPU the check costs no device sync; a factor of 1 changes nothing
        for g in grads:
            g.mul_(coef.to(device=g.device, dtype=g.dtype))
    return norm


def build_optimizer(
    name: str,
    param_groups: ParamsT,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Build the optimiser called ``name`` (one of :data:`OPTIMIZERS`).

    ``"adam"`` is :class:`torch.optim.Adam`, ``"sparse_adam"`` is :class:`SparseAdam`,
    ``"signsgd_schedulefree"`` is :class:`SignSGDScheduleFree` with ``beta = betas[0]`` and
    decoupled ``weight_decay`` (``betas[1]`` and ``eps`` are unused); its parameters must be
    switched with ``optimizer.eval()`` before evaluating/saving and ``optimizer.train()`` after
    (see the class). ``param_groups`` is a list of parameters or of parameter-group dicts; the
    keyword values are the defaults for groups that do not set them.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names).
    """
    if name == "adam":
        return torch.optim.Adam(
            param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
        )
    if name == "sparse_adam":
        return SparseAdam(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "signsgd_schedulefree":
        return SignSGDScheduleFree(param_groups, lr=lr, beta=betas[0], weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
