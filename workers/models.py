"""Models of the training harness: logistic regression, a small MLP, ResNet18 (CIFAR), an LSTM LM.

What it owns: the network definitions the tasks build. What it must never do: read data, pick an
optimizer, or know anything of compression (a model is the same for every method; that is what makes
the comparison fair).

How it works: plain `torch.nn` modules. Initialization draws from torch's global generator, which
the training loop seeds identically on every worker, so all workers start from the same weights.
- `LinearModel`: x in R^d, no bias, zero init (the IntSGD logistic-regression code starts at x0 = 0).
- `MLP`: fully connected ReLU network (the embedded digits task).
- `LeNet5`: LeCun et al. 1998's convolutional network for 28x28 images (two 5x5 convolutions with
  pooling, then 120-84-10), with ReLU and max-pooling as in today's versions.
- `ResNet18`: the CIFAR variant (3x3 stem, no max-pool, 4 stages of 2 BasicBlocks, 512 features),
  as in the PowerSGD/IntSGD code base (kuangliu/pytorch-cifar).
- `LSTMLanguageModel`: embedding -> dropout -> n-layer LSTM -> dropout -> decoder tied to the
  embedding, the PyTorch word-language-model that PowerSGD and IntSGD train on WikiText-2.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LinearModel", "MLP", "LeNet5", "BasicBlock", "ResNet18", "LSTMLanguageModel"]


class LinearModel(nn.Module):
    """x -> A x with a single weight vector (logistic regression's parameter), zero-initialized."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a @ self.weight


class MLP(nn.Module):
    """Fully connected ReLU network: in -> hidden... -> out."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], out_features: int) -> None:
        super().__init__()
        sizes = (in_features, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 on 1 x 28 x 28 images: conv 6@5x5 (padded) - pool - conv 16@5x5 - pool - 120 - 84 - out."""

    def __init__(self, out_features: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc = MLP(16 * 5 * 5, (120, 84), out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a (projected where needed) identity shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 for 32x32 inputs (11.2 M parameters with 10 classes)."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._stage(width, 2, 1)
        self.layer2 = self._stage(2 * width, 2, 2)
        self.layer3 = self._stage(4 * width, 2, 2)
        self.layer4 = self._stage(8 * width, 2, 2)
        self.linear = nn.Linear(8 * width, num_classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class LSTMLanguageModel(nn.Module):
    """Word-level LSTM language model with tied input/output embeddings.

    Args:
        vocab_size: number of words.
        emsize: embedding size (must equal nhid when tied).
        nhid: hidden units per layer.
        nlayers: LSTM layers.
        dropout: dropout on embeddings, between layers and on the output.
        tie_weights: share the decoder weight with the embedding (Press & Wolf 2017).

    Raises:
        ValueError: if tied with emsize != nhid.
    """

    def __init__(self, vocab_size: int, emsize: int = 650, nhid: int = 650, nlayers: int = 3,
                 dropout: float = 0.4, tie_weights: bool = True) -> None:
        super().__init__()
        if tie_weights and emsize != nhid:
            raise ValueError(f"tied weights need emsize == nhid, got {emsize} and {nhid}")
        self.nlayers, self.nhid = nlayers, nhid
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emsize)
        self.rnn = nn.LSTM(emsize, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, vocab_size)
        # The word-language-model init: small uniform embeddings and decoder, zero decoder bias.
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_hidden(self, batch_size: int, device: torch.device | str = "cpu"):
        """Zero (h, c) for a fresh sequence."""
        z = torch.zeros(self.nlayers, batch_size, self.nhid, device=device)
        return z, z.clone()

    def forward(self, tokens: torch.Tensor, hidden):
        """tokens (seq, batch) -> logits (seq * batch, vocab), new hidden."""
        emb = self.drop(self.encoder(tokens))
        out, hidden = self.rnn(emb, hidden)
        logits = self.decoder(self.drop(out))
        return logits.view(-1, logits.size(-1)), hidden
