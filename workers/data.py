"""Data for the training harness: loaders for the local file formats, sharding, seeded batch order.

What it owns: reading the data sets the tasks use from local files or from packages that ship them
(scikit-learn), cutting them into per-worker shards, and the order in which a worker visits its
shard. What it must never do: download anything, or touch a model or an optimizer (that is the
task's and the training loop's job).

How it works:
- Sharding is contiguous and unshuffled (`contiguous_bounds`), as in the IntSGD logistic-regression
  code ("split according to its original indices into n folds"), so workers' data differ. Every
  worker then takes the same number of steps per epoch, the smallest shard's, because a collective
  step needs every rank: a worker with one more example must not start a step nobody else joins.
- Randomness comes from `derive_seed(seed, *keys)`, a stable hash of the run seed and a purpose
  ("data", rank, epoch), so one seed fixes the data order of every worker and every epoch, and two
  purposes never share a stream.
- CIFAR-10 is read from the python pickle batches (`data_batch_1..5`, `test_batch`: dicts with
  b'data' uint8 (N, 3072) and b'labels'); augmentation (pad-4 random crop + horizontal flip) is done
  on whole batches with tensor indexing, never per image in Python.
- Fashion-MNIST is read from the original gzip IDX files (`train-images-idx3-ubyte.gz` and the
  three others; Debian's `dataset-fashion-mnist` installs them under /usr/share/datasets/), checking
  each file's magic number and dimensions against its length.
- WikiText-2 is read from `wiki.{train,valid,test}.raw`, tokenized on whitespace with `<eos>` at each
  line end (the PyTorch word-language-model convention the PowerSGD/IntSGD code uses), and laid out
  as `batchify` columns for truncated BPTT.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "derive_seed", "generator_for", "contiguous_bounds", "steps_per_epoch", "batch_indices",
    "CIFAR_MEAN", "CIFAR_STD", "load_cifar10", "augment_crop_flip",
    "Vocabulary", "Corpus", "load_wikitext2", "batchify",
    "FASHION_MNIST_DIR", "FASHION_MNIST_FILES", "FASHION_MNIST_PACKAGE", "read_idx",
    "load_fashion_mnist",
]


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that depends only on `seed` and `keys` (stable across processes and runs).

    Args:
        seed: the run seed.
        keys: what the stream is for, e.g. ("data", rank, epoch).

    Returns:
        A non-negative int usable by `torch.Generator.manual_seed` and numpy.
    """
    # Python's hash() of str is salted per process, so hash the text of the keys ourselves.
    words = [seed & 0xFFFFFFFF] + [int.from_bytes(str(k).encode(), "little") % (1 << 32) for k in keys]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def generator_for(seed: int, *keys: object) -> torch.Generator:
    """A CPU torch generator seeded with `derive_seed(seed, *keys)`."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def contiguous_bounds(n_items: int, world_size: int) -> list[tuple[int, int]]:
    """Split range(n_items) into `world_size` contiguous chunks in order (sizes differ by <= 1).

    Raises:
        ValueError: if there are fewer items than workers.
    """
    if world_size < 1 or n_items < world_size:
        raise ValueError(f"cannot split {n_items} items over {world_size} workers; "
                         "use fewer workers or more data")
    edges = np.linspace(0, n_items, world_size + 1).round().astype(int)
    return [(int(edges[r]), int(edges[r + 1])) for r in range(world_size)]


def steps_per_epoch(n_items: int, world_size: int, batch_size: int) -> int:
    """Steps every worker takes per epoch: full batches of the smallest shard (at least 1)."""
    smallest = min(b - a for a, b in contiguous_bounds(n_items, world_size))
    return max(1, smallest // batch_size)


def batch_indices(shard_size: int, batch_size: int, steps: int, generator: torch.Generator,
                  *, shuffle: bool = True) -> list[torch.Tensor]:
    """Index batches into a shard of `shard_size` items for one epoch.

    Args:
        shard_size: items in this worker's shard.
        batch_size: items per batch (capped at shard_size).
        steps: how many batches to return (the same on every worker).
        generator: the seeded stream that fixes the order.
        shuffle: visit the shard in a random order (else in file order).

    Returns:
        `steps` int64 tensors of indices in [0, shard_size).
    """
    batch_size = min(batch_size, shard_size)
    order = torch.randperm(shard_size, generator=generator) if shuffle else torch.arange(shard_size)
    need = steps * batch_size
    if need > shard_size:  # a tiny shard: wrap around, with a fresh permutation per pass
        reps = [order] + [torch.randperm(shard_size, generator=generator) if shuffle
                          else torch.arange(shard_size) for _ in range(need // shard_size)]
        order = torch.cat(reps)
    return list(order[:need].view(steps, batch_size))


# --- Fashion-MNIST ------------------------------------------------------------------------------

#: Where Debian's package puts the files, and the package's name (for the error message).
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
#: The four files of the original release (Xiao, Rasul, Vollgraf 2017), in the IDX format.
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) as a numpy array of its declared shape.

    The format: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, then one
    big-endian uint32 per dimension and the data, row-major.

    Raises:
        ValueError: a bad magic number, an unsupported type, or a length that does not match.
    """
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX type 0x{raw[2]:02x} unsupported (only 0x08, uint8)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header declares shape {dims} ({int(np.prod(dims))} bytes) "
                         f"but {len(raw) - start} data bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def load_fashion_mnist(root: str | None = None):
    """Fashion-MNIST as (train_x, train_y, test_x, test_y): uint8 (N, 28, 28) images, int64 labels.

    Args:
        root: folder holding the four IDX files (default: Debian's FASHION_MNIST_DIR).

    Raises:
        FileNotFoundError: a file is missing; the message names the Debian package.
        ValueError: a file is not the IDX data it should be.
    """
    root = root or FASHION_MNIST_DIR
    paths = [os.path.join(root, name) for name in FASHION_MNIST_FILES]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: missing {', '.join(missing)}. Install Debian's package "
            f"({'sudo ' if os.geteuid() else ''}apt-get install {FASHION_MNIST_PACKAGE}, which puts the "
            f"files in {FASHION_MNIST_DIR}), or pass --data DIR with {', '.join(FASHION_MNIST_FILES)}")
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
    for x, y, which in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{root}: {which} images {x.shape} and labels {y.shape} do not match")
    return (torch.from_numpy(train_x.copy()), torch.from_numpy(train_y.astype(np.int64)),
            torch.from_numpy(test_x.copy()), torch.from_numpy(test_y.astype(np.int64)))


# --- CIFAR-10 ----------------------------------------------------------------------------------

#: Per-channel statistics of the CIFAR-10 training set (the usual normalization).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; point --data at the folder that holds the CIFAR-10 "
                                "python batches (data_batch_1..5, test_batch)") from None
    data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def load_cifar10(root: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 python batches from `root` (the `cifar-10-batches-py` folder).

    Returns:
        (train_x uint8 (N,3,32,32), train_y int64, test_x, test_y).

    Raises:
        FileNotFoundError: naming the missing file.
    """
    train = [_read_cifar_batch(os.path.join(root, f"data_batch_{i}")) for i in range(1, 6)]
    tx, ty = _read_cifar_batch(os.path.join(root, "test_batch"))
    x = np.concatenate([d for d, _ in train])
    y = np.concatenate([lab for _, lab in train])
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(tx), torch.from_numpy(ty)


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random pad-and-crop and horizontal flip of a batch (N, C, H, W), vectorized.

    Zero padding by `pad` pixels, a random H x W crop per image, then a flip with probability 1/2:
    the standard CIFAR-10 augmentation of the ResNet papers.
    """
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)               # (n, h)
    cols = dx[:, None] + torch.arange(w)[None, :]                              # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


# --- WikiText-2 --------------------------------------------------------------------------------

@dataclass
class Vocabulary:
    """Word <-> id, in order of first appearance in the training text."""

    index: dict[str, int] = field(default_factory=dict)
    words: list[str] = field(default_factory=list)

    def add(self, word: str) -> int:
        if word not in self.index:
            self.index[word] = len(self.words)
            self.words.append(word)
        return self.index[word]

    def __len__(self) -> int:
        return len(self.words)


@dataclass
class Corpus:
    """A tokenized WikiText-2: the vocabulary and three 1-D int64 token streams."""

    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor


def _tokenize(path: str, vocab: Vocabulary, grow: bool) -> torch.Tensor:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; point --data at the folder that holds "
                                "wiki.train.raw, wiki.valid.raw and wiki.test.raw") from None
    ids: list[int] = []
    unk = vocab.index.get("<unk>")
    for line in lines:
        for word in line.split() + ["<eos>"]:
            if grow:
                ids.append(vocab.add(word))
            else:
                got = vocab.index.get(word, unk)
                if got is None:
                    raise ValueError(f"{path}: word {word!r} is not in the training vocabulary "
                                     "and the training text has no <unk> token")
                ids.append(got)
    return torch.tensor(ids, dtype=torch.int64)


def load_wikitext2(root: str) -> Corpus:
    """Tokenize `wiki.{train,valid,test}.raw` under `root`; the vocabulary comes from train alone.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: if valid/test hold a word unseen in train and train has no `<unk>`.
    """
    vocab = Vocabulary()
    vocab.add("<eos>")
    train = _tokenize(os.path.join(root, "wiki.train.raw"), vocab, grow=True)
    valid = _tokenize(os.path.join(root, "wiki.valid.raw"), vocab, grow=False)
    test = _tokenize(os.path.join(root, "wiki.test.raw"), vocab, grow=False)
    return Corpus(vocab, train, valid, test)


def batchify(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Lay a token stream out as (length, batch_size) columns, dropping the ragged tail.

    Raises:
        ValueError: if the stream is shorter than two tokens per column.
    """
    length = tokens.numel() // batch_size
    if length < 2:
        raise ValueError(f"{tokens.numel()} tokens cannot fill {batch_size} columns; "
                         "use a smaller batch size or more text")
    return tokens[: length * batch_size].view(batch_size, length).t().contiguous()
