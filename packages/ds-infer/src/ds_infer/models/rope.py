"""Rotary position embeddings (Su et al. 2021) and the context-extension schemes HF configs name.

``rope_type`` in a config selects how the inverse frequencies ``inv_freq[i] = theta^(-2i/d)`` are
changed for longer contexts:

- ``linear``: position interpolation (Chen et al. 2023), every frequency divided by ``factor``;
- ``dynamic``: NTK-aware scaling, ``theta`` grows with the current length once it passes the trained
  one (computed from the largest position in the forward);
- ``yarn``: YaRN (Peng et al. 2023), a ramp between interpolated and extrapolated frequencies over
  the dimensions, plus an attention temperature ``0.1 ln(factor) + 1`` folded into cos/sin;
- ``llama3``: Llama 3.1's piecewise scaling by wavelength (low/high frequency factors);
- ``longrope``: per-dimension rescale factors (Phi-3), short or long set by the current length.

Cos/sin are computed per token from explicit positions, ``freqs = position × inv_freq`` in fp32
(the same arithmetic as transformers, so logits match to the last bits in fp32).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import RopeConfig

__all__ = ["inv_frequencies", "Rotary", "apply_rotary"]


def _base_inv_freq(theta: float, dim: int) -> Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (theta**exponents)


def inv_frequencies(rope: RopeConfig, seq_len: int | None = None) -> tuple[Tensor, float]:
    """``(inv_freq [dim/2] fp32, attention_scaling)`` for ``rope`` at current length ``seq_len``."""
    p, dim, theta = rope.params, rope.dim, rope.theta
    kind = rope.type
    if kind == "default":
        return _base_inv_freq(theta, dim), 1.0
    if kind == "linear":
        return _base_inv_freq(theta, dim) / float(p["factor"]), 1.0
    if kind == "dynamic":
        max_pos = rope.max_position_embeddings
        length = max(seq_len or max_pos, max_pos)
        factor = float(p["factor"])
        base = theta * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        return _llama3(p, theta, dim), 1.0
    if kind == "yarn":
        return _yarn(p, theta, dim, rope.max_position_embeddings)
    if kind == "longrope":
        return _longrope(p, theta, dim, rope.max_position_embeddings, seq_len)
    raise ValueError(f"rope type {kind!r} is not supported")


def _llama3(p: dict, theta: float, dim: int) -> Tensor:
    inv = _base_inv_freq(theta, dim)
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)  # long wavelengths: interpolate fully
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(p: dict, theta: float, dim: int, max_pos: int) -> tuple[Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / original
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times in `original`
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1.0 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(attention)


def _longrope(p: dict, theta: float, dim: int, max_pos: int, seq_len: int | None) -> tuple[Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / original
    attention = p.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(p["long_factor"] if seq_len and seq_len > original else p["short_factor"],
                       dtype=torch.float32)
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * theta**shape), float(attention)


class Rotary(torch.nn.Module):
    """cos/sin ``[B, T, 1, dim]`` for explicit positions ``[B, T]``; one per model, shared by layers."""

    def __init__(self, rope: RopeConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.rope = rope
        inv, scaling = inv_frequencies(rope)
        self.register_buffer("inv_freq", inv.to(device), persistent=False)
        self.attention_scaling = scaling
        self.length_dependent = rope.type in ("dynamic", "longrope")

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv, scaling = self.inv_freq, self.attention_scaling
        if self.length_dependent:  # the frequencies depend on the longest position in this batch
            inv, scaling = inv_frequencies(self.rope, int(positions.max()) + 1)
            inv = inv.to(positions.device)
        freqs = positions[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if scaling != 1.0:
            cos, sin = cos * scaling, sin * scaling
        return cos.to(dtype).unsqueeze(2), sin.to(dtype).unsqueeze(2)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, T, H, D]`` by ``cos/sin [B, T, 1, d]`` (the first ``d`` channels when d < D)."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)
