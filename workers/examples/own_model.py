"""Compare the methods on your own model and data: a 1-D CNN that tells sine waves apart by pitch.

    python workers/examples/own_model.py                     # 4 workers, every method
    python workers/examples/own_model.py --methods sgd,intsgd-random --workers 2 --out runs/own

The two functions below are all a comparison needs: `make_model` returns a fresh `nn.Module`,
`make_data` returns `(train, test)` as `(x, y)` tensors (a torch `Dataset` of pairs works too).
They sit at the top level of this file because every worker process imports them by name.
`switchagg.workers.api.compare` runs the same comparison as `switchagg compare` and returns what
results.json holds; the command line equivalent is

    switchagg compare --task custom --opt model=workers/examples/own_model.py:make_model \\
        --opt dataset=workers/examples/own_model.py:make_data
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

CLASSES, LENGTH = 4, 32


def make_model() -> nn.Module:
    """A small 1-D convolutional classifier (no built-in task uses convolutions over sequences)."""
    return nn.Sequential(
        nn.Conv1d(1, 8, kernel_size=5, padding=2), nn.ReLU(),
        nn.Conv1d(8, 8, kernel_size=5, padding=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(4), nn.Flatten(), nn.Linear(32, CLASSES))


def make_data(n_train: int = 512, n_test: int = 256):
    """Noisy sine waves of four pitches with random phases; the label is the pitch."""
    g = torch.Generator().manual_seed(0)

    def draw(n: int):
        y = torch.randint(0, CLASSES, (n,), generator=g)
        t = torch.arange(LENGTH, dtype=torch.float32)
        phase = 2 * math.pi * torch.rand(n, 1, generator=g)
        freq = (1 + y.float()).unsqueeze(1) * 2 * math.pi / LENGTH
        x = torch.sin(freq * t + phase) + 0.3 * torch.randn(n, LENGTH, generator=g)
        return x.unsqueeze(1), y

    return draw(n_train), draw(n_test)


def main() -> None:
    from switchagg.workers.api import compare
    from switchagg.workers.report import format_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=None, help="comma-separated (default: all)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs (default 3)")
    parser.add_argument("--out", default=None, help="folder for results.json and plots")
    args = parser.parse_args()
    results = compare(make_model, make_data, methods=args.methods.split(",") if args.methods else None,
                      workers=args.workers, epochs=args.epochs, batch_size=16, lr=0.2,
                      out=args.out, progress=True)
    print(format_table(results["methods"], results["config"]["metric"]))


if __name__ == "__main__":
    main()
