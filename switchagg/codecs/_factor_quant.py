"""The scalar quantizers ISGQ applies to a layer's factors X and Delta (and to direct gradients).

What it owns: the subtractive-dither quantizer (`dither_codes` / `dither_values`: a uniform grid
of step scale = max|w| / (s - 1/2), so that w / scale + u never leaves [-s, s) and no code
overloads; codes round(w / scale + u) + s with u ~ U(-1/2, 1/2) from a stream the receiver
regenerates; exact zeros get their own sparse symbol 2s + 1 and decode to 0. The error
(q - u) scale - w is then exactly U(-scale/2, scale/2), independent of w, so unbiased with
variance scale^2 / 12 per non-zero entry), and the empirical-MSE codebooks (`fit_codebook`: symbol
0 is exact zero, the other 2^b - 1 are fitted by Lloyd's algorithm on the non-zero values from
quantile starts; `refine_codebooks`: one round of ISGQ's alternating least squares, which refits
the Delta codebook for the fixed X-hat to minimize ||Delta-hat^T X-hat - G||_F, then the X
codebook for the fixed Delta-hat). What it must never do: leave the tensor's device.
"""

from __future__ import annotations

import torch

__all__ = ["dither_codes", "dither_values", "dither_scale", "fit_codebook", "codebook_values",
           "refine_codebooks"]


def dither_scale(w: torch.Tensor, s: int) -> torch.Tensor:
    """The grid step of `w` (a 0-d tensor; 1 for an all-zero w)."""
    top = w.abs().max() if w.numel() else w.new_zeros(())
    return torch.where(top > 0, top / (s - 0.5), torch.ones_like(top))


def dither_codes(w: torch.Tensor, scale: torch.Tensor, s: int, gen: torch.Generator):
    """Codes in 0..2s (values -s..s shifted) and 2s + 1 for exact zeros."""
    u = torch.rand(w.shape, generator=gen, device=w.device, dtype=torch.float32) - 0.5
    q = torch.round(w / scale + u).clamp_(-s, s).to(torch.int64) + s
    return torch.where(w == 0, torch.full_like(q, 2 * s + 1), q)


def dither_values(codes: torch.Tensor, scale: torch.Tensor, s: int, shape,
                  gen: torch.Generator) -> torch.Tensor:
    """The dequantized values (q - u) scale, with the sender's dither u regenerated from gen."""
    codes = codes.view(shape)
    u = torch.rand(codes.shape, generator=gen, device=codes.device, dtype=torch.float32) - 0.5
    values = ((codes - s).to(torch.float32) - u) * scale
    return torch.where(codes == 2 * s + 1, torch.zeros_like(values), values)


def fit_codebook(w: torch.Tensor, levels: int, iters: int = 6):
    """(codes in 0..levels-1, codebook (levels - 1,)): 0 is exact zero, the rest Lloyd-fitted."""
    flat = w.reshape(-1)
    nz = flat[flat != 0]
    k = levels - 1
    if nz.numel() == 0:
        return torch.zeros_like(flat, dtype=torch.int64), flat.new_zeros(k)
    probs = (torch.arange(k, device=w.device, dtype=torch.float32) + 0.5) / k
    sample = nz if nz.numel() <= 1 << 20 else nz[:: nz.numel() // (1 << 20) + 1]
    c = torch.quantile(sample, probs)
    for _ in range(iters):
        idx = _nearest(nz, c)
        sums = torch.zeros_like(c).scatter_add_(0, idx, nz)
        counts = torch.zeros_like(c).scatter_add_(0, idx, torch.ones_like(nz))
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c).sort().values
    codes = _nearest(flat, c) + 1
    return torch.where(flat == 0, torch.zeros_like(codes), codes), c


def _nearest(v: torch.Tensor, sorted_c: torch.Tensor) -> torch.Tensor:
    mids = (sorted_c[1:] + sorted_c[:-1]) / 2
    return torch.bucketize(v, mids)


def codebook_values(codes: torch.Tensor, c: torch.Tensor, shape) -> torch.Tensor:
    return torch.cat([c.new_zeros(1), c])[codes].view(shape)


def _solve(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """argmin_c ||sum_l c_l a_l - g||_F (a: (L, ...) stacked, min-norm for empty bins)."""
    a2 = a.reshape(a.shape[0], -1).double()
    h = a2 @ a2.T
    e = a2 @ g.reshape(-1).double()
    return (torch.linalg.pinv(h) @ e).to(torch.float32)


def refine_codebooks(qx, cx, qd, cd, x_shape, d_shape, g: torch.Tensor):
    """One ALS round on the codebooks: g (n_out, n_in) ~ Delta-hat^T X-hat."""
    k = cx.numel()
    x_hat = codebook_values(qx, cx, x_shape)
    md = torch.nn.functional.one_hot(qd.view(d_shape), k + 1)[..., 1:].to(torch.float32)
    cd = _solve(torch.einsum("bol,bi->loi", md, x_hat), g)
    d_hat = codebook_values(qd, cd, d_shape)
    mx = torch.nn.functional.one_hot(qx.view(x_shape), k + 1)[..., 1:].to(torch.float32)
    cx = _solve(torch.einsum("bo,bil->loi", d_hat, mx), g)
    return cx, cd
