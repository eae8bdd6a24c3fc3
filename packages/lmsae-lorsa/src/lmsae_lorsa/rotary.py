"""Rotary position embeddings (RoPE), computed for each batch's length — never stored.

Conventions follow TransformerLens (and Hugging Face), so that a Lorsa copied from a model
reproduces its attention scores:

- pair j (``0 <= j < rotary_dim / 2``) rotates with angle ``pos * inv_freq[j]``,
  ``inv_freq[j] = base^(-2j / rotary_dim)`` (NTK-by-parts rescales ``inv_freq``, Llama 3.1);
- ``"neox"``: pair j is dimensions ``(j, j + rotary_dim/2)``; ``"gptj"``: ``(2j, 2j + 1)``;
- ``rope(x) = x * cos + rotate(x) * sin`` on the first ``rotary_dim`` dimensions, where
  ``rotate`` maps a pair ``(a, b)`` to ``(-b, a)``; the remaining dimensions pass through.

Angles are computed in float64 and cast to the input's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["apply_rotary", "inverse_frequencies", "rotary_tables", "rotate_pairs"]


def inverse_frequencies(rotary_dim: int, base: float, *, ntk_by_parts: bool = False, factor: float = 8.0,
                        low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                        original_context: int = 8192) -> Tensor:
    """``inv_freq`` (float64, ``(rotary_dim // 2,)``): the angle per position of each pair.

    NTK-by-parts (Llama 3.1, ``transformers``' ``_compute_llama3_parameters``): with wavelength
    ``w = 2π / inv_freq``, pairs with ``w > original_context / low_freq_factor`` are divided by
    ``factor``, pairs with ``w < original_context / high_freq_factor`` are kept, and in between
    ``inv_freq`` is interpolated: ``(1 - s) * inv_freq / factor + s * inv_freq`` with
    ``s = (original_context / w - low_freq_factor) / (high_freq_factor - low_freq_factor)``.
    """
    j = torch.arange(0, rotary_dim, 2, dtype=torch.float64)
    inv_freq = 1.0 / (float(base) ** (j / rotary_dim))
    if not ntk_by_parts:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_context / low_freq_factor
    high_wavelen = original_context / high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(n_positions: int, inv_freq: Tensor, style: str, *, dtype: torch.dtype = torch.float64,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``(n_positions, rotary_dim)``: the per-dimension angles of positions
    ``0 .. n_positions - 1``, laid out for ``style`` ("neox": ``[f0..fn, f0..fn]``; "gptj":
    ``[f0, f0, f1, f1, ...]``)."""
    if style == "neox":
        freq = torch.cat([inv_freq, inv_freq])
    elif style == "gptj":
        freq = inv_freq.repeat_interleave(2)
    else:
        raise ValueError(f"rotary style must be 'neox' or 'gptj', got {style!r}")
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * freq[None, :]
    return angles.cos().to(dtype=dtype, device=device), angles.sin().to(dtype=dtype, device=device)


def rotate_pairs(x: Tensor, style: str) -> Tensor:
    """Map every rotated pair ``(a, b)`` of the last dim to ``(-b, a)`` (the 90° rotation)."""
    if style == "neox":
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, style: str) -> Tensor:
    """RoPE on ``x`` ``(..., T, d_head)`` with tables ``(T, rotary_dim)``; dims past
    ``rotary_dim`` pass through unchanged."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    rotated = rot * cos + rotate_pairs(rot, style) * sin
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated
