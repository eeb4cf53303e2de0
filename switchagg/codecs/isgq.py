"""isgq-mse, isgq-dithered: Indirect Stochastic Gradient Quantization (Abdi & Fekri, AAAI 2020).

For a fully-connected layer y = x W^T + b the weight gradient is Delta^T X, with X (B x n_in) the
layer's inputs and Delta (B x n_out) the loss's gradient w.r.t. its outputs. ISGQ quantizes those
two factors instead of the gradient, all-gathers them, and every worker rebuilds
sum_w Delta-hat_w^T X-hat_w / n: b B (n_in + n_out) bits per layer instead of 32 n_in n_out.
- `isgq-dithered`: subtractive dither with a seed the receiver knows (`_factor_quant`): unbiased,
  Var(G-hat_kj) = sum_b (X_bj^2 s_D^2 + D_bk^2 s_X^2 + s_X^2 s_D^2) with s^2 = scale^2 / 12 per
  non-zero entry (0 for exact zeros, which have their own symbol); default 4 bits (s = 7).
- `isgq-mse`: the empirical-MSE quantizer: Lloyd codebooks of 2^b symbols (one is exact zero),
  then one round of the alternating least-squares fit of the two codebooks to G = Delta^T X
  ('mv' in the authors' code). Biased; default 3 bits (the authors' largest codebook, 8 levels).
Every other parameter (biases, convolutions, a linear layer whose gradient is not Delta^T X, or
a codec not attached to its model) is sent directly with the subtractive-dither quantizer at the
same bits: unbiased, one fp32 scale per parameter.

The codec needs the activations: `attach(model)` (`_capture.LinearCapture`) hooks every nn.Linear
and keys blocks by parameter index; `switchagg.ddp.HookState.attach(model)` does it for DDP (the
training loop calls it), and in-process callers call `codec.attach(model)` and pass the gradients
in `model.parameters()` order. Before sending factors the encoder checks Delta^T X against the
gradient it was given (one GEMM) and falls back to the direct quantizer if they differ.

Wire per parameter: an int32 header (mode, B, n_in, n_out), then for a factored layer two fp32
scales (dithered) or two codebooks of 2^b - 1 fp32 (mse), and the codes of X and Delta packed at
b bits; for a direct one one fp32 scale and b-bit codes. `paper_bits` counts the codes and the
scales or codebooks, not the header.
"""

from __future__ import annotations

import math

import torch

from switchagg.codecs._base import Block
from switchagg.codecs._capture import LinearCapture
from switchagg.codecs._factor_quant import (
    codebook_values, dither_codes, dither_scale, dither_values, fit_codebook, refine_codebooks,
)
from switchagg.codecs._wire import GatherCodec, Reader, Writer, block_generator

__all__ = ["ISGQ"]

_DIRECT, _FACTORED = 0, 1
_SALT_G, _SALT_X, _SALT_D = 1, 2, 3


class ISGQ(GatherCodec):
    """ISGQ on nn.Linear layers (factors X and Delta), a direct dithered quantizer elsewhere.

    Args:
        quantizer: "dithered" (unbiased) or "mse" (empirical-MSE codebooks, biased).
        code_bits: bits per code, 2..8 (default 4 dithered, 3 mse).
    """

    unbiased = False

    def __init__(self, *, quantizer: str = "dithered", code_bits: int | None = None,
                 **common) -> None:
        super().__init__(**common)
        if quantizer not in ("dithered", "mse"):
            raise ValueError(f"quantizer={quantizer!r}: choose 'dithered' or 'mse'")
        code_bits = (4 if quantizer == "dithered" else 3) if code_bits is None else code_bits
        if not isinstance(code_bits, int) or not 2 <= code_bits <= 8:
            raise ValueError(f"code_bits={code_bits!r}: expected an int in 2..8")
        self.quantizer, self.code_bits = quantizer, code_bits
        self.unbiased = quantizer == "dithered"
        self.s = 2 ** (code_bits - 1) - 1          # dither levels -s..s, plus the zero symbol
        self.levels = 2 ** code_bits               # mse symbols (0 is exact zero)
        self.capture = LinearCapture()
        self.factored = 0                          # layers sent as factors (this codec's life)

    # -- the model ------------------------------------------------------------------------------

    def attach(self, model: torch.nn.Module) -> None:
        """Hook `model`'s nn.Linear layers (see the module essay)."""
        self.capture.attach(model)

    def param_key(self, param) -> int | None:
        return self.capture.param_key(param)

    # -- one parameter --------------------------------------------------------------------------

    def _gen(self, rank: int, key: int, salt: int, device) -> torch.Generator:
        return block_generator(self.seed, rank, self.step, key, device, salt)

    def _factors(self, x: torch.Tensor, block: Block):
        if not self.capture.is_linear_weight(block.key):
            return None
        pair = self.capture.take(block.key)
        if pair is None:
            return None
        xs, ds = (t.to(x.device) for t in pair)
        if xs.shape[1] * ds.shape[1] != x.numel():
            return None
        g = ds.T @ xs
        tol = 1e-4 * x.abs().max() + 1e-12 + 1e-3 * x.abs()   # on the device: only a bool crosses
        if not bool(((g.reshape(-1) - x).abs() <= tol).all()):
            return None
        return xs, ds, g

    def _encode_block(self, x: torch.Tensor, block: Block, w: Writer) -> None:
        x = x.to(torch.float32)
        found = self._factors(x, block)
        if found is None:
            w.ints([_DIRECT, 0, 0, 0])
            scale = dither_scale(x, self.s)
            w.floats(scale.reshape(1))
            w.codes(dither_codes(x, scale, self.s, self._gen(self.rank, block.key, _SALT_G,
                                                             x.device)), self.code_bits)
            self._paper(self.code_bits * x.numel() + 32)
            return
        xs, ds, g = found
        rows, n_in, n_out = xs.shape[0], xs.shape[1], ds.shape[1]
        w.ints([_FACTORED, rows, n_in, n_out])
        if self.quantizer == "dithered":
            sx, sd = dither_scale(xs, self.s), dither_scale(ds, self.s)
            w.floats(torch.stack([sx, sd]))
            w.codes(dither_codes(xs, sx, self.s, self._gen(self.rank, block.key, _SALT_X,
                                                           x.device)).reshape(-1), self.code_bits)
            w.codes(dither_codes(ds, sd, self.s, self._gen(self.rank, block.key, _SALT_D,
                                                           x.device)).reshape(-1), self.code_bits)
            extra = 64
        else:
            qx, cx = fit_codebook(xs, self.levels)
            qd, cd = fit_codebook(ds, self.levels)
            cx, cd = refine_codebooks(qx, cx, qd, cd, xs.shape, ds.shape, g)
            w.floats(torch.cat([cx, cd]))
            w.codes(qx, self.code_bits)
            w.codes(qd, self.code_bits)
            extra = 64 * (self.levels - 1)
        with self._lock:
            self.factored += 1
        self._paper(self.code_bits * rows * (n_in + n_out) + extra)

    def _decode_block(self, r: Reader, block: Block, src: int) -> torch.Tensor:
        mode, rows, n_in, n_out = r.ints(4)
        device = r.data.device
        if mode == _DIRECT:
            scale = r.floats(1)
            codes = r.codes(block.numel, self.code_bits)
            return dither_values(codes, scale, self.s, (block.numel,),
                                 self._gen(src, block.key, _SALT_G, device))
        if self.quantizer == "dithered":
            scales = r.floats(2)
            x_hat = dither_values(r.codes(rows * n_in, self.code_bits), scales[0], self.s,
                                  (rows, n_in), self._gen(src, block.key, _SALT_X, device))
            d_hat = dither_values(r.codes(rows * n_out, self.code_bits), scales[1], self.s,
                                  (rows, n_out), self._gen(src, block.key, _SALT_D, device))
        else:
            k = self.levels - 1
            books = r.floats(2 * k)
            x_hat = codebook_values(r.codes(rows * n_in, self.code_bits), books[:k], (rows, n_in))
            d_hat = codebook_values(r.codes(rows * n_out, self.code_bits), books[k:],
                                    (rows, n_out))
        return (d_hat.T @ x_hat).reshape(-1)


def isgq_compression(n_in: int, n_out: int, rows: int, bits: int) -> float:
    """32 n_in n_out / (bits rows (n_in + n_out)): ISGQ's gain over fp32 for one layer."""
    return 32 * n_in * n_out / (bits * rows * (n_in + n_out)) if rows else math.inf
