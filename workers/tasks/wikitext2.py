"""`wikitext2-lstm`: a 3-layer LSTM language model on WikiText-2 raw text, the paper's preset.

What it owns: tokenizing `wiki.{train,valid,test}.raw` (`--data` = their folder), per-worker token
streams, truncated back-propagation through time, perplexity. What it must never do: download text.

How it works: the preset is the IntSGD/PowerSGD LSTM setting: embedding 650,
3 layers of 650 hidden units, tied weights, dropout 0.4, bptt 30, 64 sequences per worker,
single-worker lr 1.25 scaled by the number of workers (x16 at 16) through a 5-epoch linear warm-up, no momentum or weight decay, 90 epochs, and per-worker gradient-norm clipping at 0.4 before
compression (which also bounds the integers). The training stream is cut into contiguous per-worker
parts, each laid out as 64 columns; every worker walks its columns in order, carrying the hidden
state across steps of an epoch (detached), as the word-language-model code does. Evaluation runs
valid and test with 10 columns and reports perplexity exp(loss) of the test stream.

Options:
    emsize, nhid, nlayers, dropout, bptt: model/BPTT sizes (defaults 650, 650, 3, 0.4, 30).
    eval_batch: columns for evaluation (default 10).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from switchagg.workers.data import batchify, contiguous_bounds, load_wikitext2
from switchagg.workers.models import LSTMLanguageModel
from switchagg.workers.tasks.base import Preset, Shard, Task

__all__ = ["WikiText2LSTM", "TokenShard"]


class TokenShard(Shard):
    """A worker's (length, batch) token columns, cut into bptt windows in order."""

    def __init__(self, columns: torch.Tensor, bptt: int, steps: int) -> None:
        self.columns, self.bptt, self.steps_per_epoch = columns, bptt, steps

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Language modelling keeps text order (the hidden state carries over); no shuffling.
        for step in range(self.steps_per_epoch):
            i = step * self.bptt
            n = min(self.bptt, len(self.columns) - 1 - i)
            yield self.columns[i:i + n], self.columns[i + 1:i + 1 + n]


class WikiText2LSTM(Task):
    """Word-level language modelling, perplexity as the headline number."""

    name = "wikitext2-lstm"
    metric = "perplexity"
    higher_is_better = False
    option_defaults = {"emsize": 650, "nhid": 650, "nlayers": 3, "dropout": 0.4, "bptt": 30,
                       "eval_batch": 10}

    preset = Preset(epochs=90, batch_size=64, lr=1.25, warmup_epochs=5, lr_scale="workers",
                    grad_clip=0.4, eval_every=1)

    def __init__(self, *, data: str | None = None, device: str = "cpu", **options: Any) -> None:
        super().__init__(data=data, device=device, **options)
        if data is None:
            raise ValueError("wikitext2-lstm needs --data DIR with wiki.train.raw, wiki.valid.raw "
                             "and wiki.test.raw")
        self.corpus = load_wikitext2(data)
        eb = int(self.options["eval_batch"])
        self.valid = batchify(self.corpus.valid, eb).to(self.device)
        self.test = batchify(self.corpus.test, eb).to(self.device)

    def build_model(self) -> nn.Module:
        o = self.options
        return LSTMLanguageModel(len(self.corpus.vocab), int(o["emsize"]), int(o["nhid"]),
                                 int(o["nlayers"]), float(o["dropout"])).to(self.device)

    def shard(self, rank: int, world_size: int, batch_size: int) -> TokenShard:
        tokens = self.corpus.train
        bptt = int(self.options["bptt"])
        bounds = contiguous_bounds(len(tokens), world_size)
        # Every worker takes as many windows as the shortest part allows (lockstep collectives).
        rows = min((e - s) // batch_size for s, e in bounds)
        if rows < 2:
            raise ValueError(f"{len(tokens)} training tokens cannot give {world_size} workers "
                             f"{batch_size} columns each; lower the batch size")
        steps = max(1, math.ceil((rows - 1) / bptt))
        s, e = bounds[rank]
        columns = batchify(tokens[s:e], batch_size)[:rows].to(self.device)
        return TokenShard(columns, bptt, steps)

    def loss(self, model: nn.Module, batch: Any, carry: Any) -> tuple[torch.Tensor, Any]:
        x, y = batch
        if carry is None:
            carry = model.init_hidden(x.size(1), self.device)
        # Truncated BPTT: keep the state's value, cut its history.
        hidden = tuple(h.detach() for h in carry)
        logits, hidden = model(x, hidden)
        return F.cross_entropy(logits, y.reshape(-1)), hidden

    @torch.no_grad()
    def _stream_loss(self, model: nn.Module, columns: torch.Tensor) -> float:
        bptt = int(self.options["bptt"])
        hidden = model.init_hidden(columns.size(1), self.device)
        total, count = 0.0, 0
        for i in range(0, len(columns) - 1, bptt):
            n = min(bptt, len(columns) - 1 - i)
            logits, hidden = model(columns[i:i + n], hidden)
            total += float(F.cross_entropy(logits, columns[i + 1:i + 1 + n].reshape(-1), reduction="sum"))
            count += n * columns.size(1)
        return total / count

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        valid, test = self._stream_loss(model, self.valid), self._stream_loss(model, self.test)
        model.train()
        return {"loss": test, "perplexity": math.exp(min(test, 50.0)),
                "valid_perplexity": math.exp(min(valid, 50.0))}
