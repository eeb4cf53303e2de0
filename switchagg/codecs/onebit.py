"""onebit-ef: 1-bit SGD with error feedback (Seide, Fu, Droppo, Li, Yu, Interspeech 2014).

Per parameter (GRACE's per-tensor form; the paper quantizes per column): p = g + e, one bit per
coordinate [p_k >= 0], reconstructed as the mean of its group, mu+ = mean{p_k >= 0} or
mu- = mean{p_k < 0} (the values minimizing the squared error for that split), and the residual
e <- p - Q(p) is kept by the parameter's stable block key and added to the next step's gradient.
Biased; error feedback is what makes it converge (sum_t Q(p_t) = T g - e_T for a constant g).

Wire (all-gather: the means are each worker's own): the bits packed 8 per byte and the two fp32
means per parameter. `paper_bits` = d + 64 per parameter, which is also what is sent (plus the
last byte's padding).
"""

from __future__ import annotations

import torch

from switchagg.codecs._base import Block
from switchagg.codecs._wire import GatherCodec, Reader, Writer

__all__ = ["OneBitEF", "one_bit"]


def one_bit(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask p >= 0, [mu+, mu-]) of a 1-D float tensor (an empty group's mean is 0)."""
    pos = p >= 0
    n_pos = pos.sum()
    n_neg = p.numel() - n_pos
    sum_pos = torch.where(pos, p, torch.zeros_like(p)).sum()
    sum_neg = p.sum() - sum_pos
    mu_pos = torch.where(n_pos > 0, sum_pos / n_pos.clamp(min=1), torch.zeros_like(sum_pos))
    mu_neg = torch.where(n_neg > 0, sum_neg / n_neg.clamp(min=1), torch.zeros_like(sum_neg))
    return pos, torch.stack([mu_pos, mu_neg]).to(torch.float32)


def _values(pos: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    return torch.where(pos, means[0], means[1])


class OneBitEF(GatherCodec):
    """1-bit quantization with per-parameter means and error feedback, all-gathered."""

    unbiased = False

    def __init__(self, **common) -> None:
        super().__init__(**common)
        self.residuals: dict[int, torch.Tensor] = {}

    def _encode_block(self, x: torch.Tensor, block: Block, w: Writer) -> None:
        if x.numel() == 0:
            return
        e = self.residuals.get(block.key)
        g = x.to(torch.float32)
        p = g + e.to(g.device) if e is not None else g.clone()
        pos, means = one_bit(p)
        self.residuals[block.key] = p - _values(pos, means)
        w.floats(means)
        w.codes(pos.to(torch.int64), 1)
        self._paper(x.numel() + 64)

    def _decode_block(self, r: Reader, block: Block, src: int) -> torch.Tensor:
        if block.numel == 0:
            return r.data.new_zeros(0, dtype=torch.float32)
        means = r.floats(2)
        return _values(r.codes(block.numel, 1).bool(), means)

    def state_dict(self) -> dict:
        return {"residuals": {k: v.detach().cpu() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.residuals = {int(k): v.clone() for k, v in state.get("residuals", {}).items()}
