"""switchagg.codecs: the registry, what crosses to the host, buckets, and the payload protocol.

The numbers each method computes are tested in test_scaling.py (through the in-process Reducer)
and test_ddp.py (the same codecs bit-identical through DDP, the switch and in-process).
"""

from __future__ import annotations

import pytest
import torch

from switchagg import ConfigError, kernels
from switchagg.codecs import Bucket, Gather, Max, Sum
from switchagg.collectives import LocalGroup
from switchagg.collectives._base import HOST_TRANSFERS
from switchagg.methods import METHODS, collective_kind, make_codec, make_method

SWITCH_METHODS = [name for name in METHODS if collective_kind(name) == "int"]


def _grads(rank: int, step: int, device="cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(41, 9, generator=g).to(device), torch.randn(77, generator=g).to(device)]


def _run(name: str, world: int = 3, steps: int = 3, split=None, device="cpu", **options):
    def worker(c):
        m = make_method(name, c, seed=5, **options)
        return [m.reduce(_grads(c.rank, s, device), step=s, lr=0.1, split=split)[0]
                for s in range(steps)]
    return LocalGroup(world, k=8, slots=16).run(worker)


def test_registry_builds_every_method_and_names_the_valid_ones():
    for name in METHODS:
        codec = make_codec(name, world_size=2, rank=1)
        assert codec.name == name and codec.tel.method == name
        assert codec.runs_on_switch() == (collective_kind(name) == "int")
    assert collective_kind("sgd") == "torch"
    with pytest.raises(ConfigError, match="valid methods: sgd, intsgd-random"):
        make_codec("qsgd-9", world_size=2, rank=0)
    with pytest.raises(TypeError):
        make_codec("intsgd-random", world_size=2, rank=0, momentum=0.9)   # not an option of it
    with pytest.raises(ValueError, match="rounding='up'"):
        make_codec("intsgd-random", world_size=2, rank=0, rounding="up")


@pytest.mark.parametrize("name", SWITCH_METHODS)
def test_switch_methods_hand_only_integers_to_the_transport(name):
    """What crosses from a codec to a transport's host side is int32 payload (and int8
    exponents), never a float; the kernels never copy a contiguous float32 gradient either."""
    HOST_TRANSFERS.clear()
    copies = kernels.HOST_FLOAT_COPIES[0]
    _run(name)
    assert HOST_TRANSFERS["int32"] > 0
    assert set(HOST_TRANSFERS) <= {"int32", "int8"}, dict(HOST_TRANSFERS)
    assert kernels.HOST_FLOAT_COPIES[0] == copies


def test_sgd_is_the_one_that_ships_floats():
    HOST_TRANSFERS.clear()
    _run("sgd")
    assert set(HOST_TRANSFERS) == {"float32"}


@pytest.mark.parametrize("name", ["sgd", "intsgd-random", "intsgd-determ", "intdiana"])
def test_bucket_offsets_make_the_split_invisible(name):
    """A global-alpha method's integers depend on an element's place in the iteration, not on
    how the gradient is cut into buckets (the rounding stream is indexed by the offset)."""
    whole = _run(name)
    split = _run(name, split=[1, 1])
    assert all(torch.equal(a, b) for r in range(3) for s in range(3)
               for a, b in zip(whole[r][s], split[r][s]))


def test_per_packet_exponents_do_depend_on_the_cut():
    """SwitchML's chunks are a bucket's: cutting elsewhere changes them (a sanity check that the
    test above can fail; 8 bits, so that a chunk's scale shows in the decoded floats)."""
    whole = _run("heuristic-switchml", bits=8)
    split = _run("heuristic-switchml", bits=8, split=[1, 1])
    assert not all(torch.equal(a, b) for a, b in zip(whole[0][0], split[0][0]))


def test_chained_rounds_run_in_order_and_only_the_last_is_decoded():
    """A Max round, then a Sum with `then`, then a Gather: the collective runs them in order."""
    seen = []

    def body(c):
        def third(summed):
            seen.append(("sum", c.rank, summed.tolist()))
            return Gather(torch.tensor([c.rank * 10], dtype=torch.int32), ctx="last")

        def second(mx):
            seen.append(("max", c.rank, int(mx[0])))
            return Sum(torch.tensor([c.rank + 1], dtype=torch.int32), then=third)

        payload, fut = c.launch(Max(torch.tensor([c.rank], dtype=torch.int8).numpy(), second))
        return payload.ctx, [int(t[0]) for t in fut.result(timeout=10)]

    results = LocalGroup(2).run(body)
    assert results == [("last", [0, 10]), ("last", [0, 10])]
    assert sorted(seen) == [("max", 0, 1), ("max", 1, 1), ("sum", 0, [3]), ("sum", 1, [3])]


def test_bucket_helpers_cover_the_bucket():
    b = Bucket.of_sizes([3, 0, 5], index=2, offset=10, keys=[7, 8, 9])
    assert b.numel == 8 and [(x.key, x.start, x.stop) for x in b.blocks] == [(7, 0, 3), (8, 3, 3),
                                                                            (9, 3, 8)]
    assert Bucket.whole(4).blocks[0].numel == 4


def test_intsgd_block_refuses_a_parameter_that_appears_late():
    codec = make_codec("intsgd-block", world_size=1, rank=0, k=8)
    group = LocalGroup(1, k=8)

    def body(c):
        for step, sizes in enumerate([[4, 4], [4, 4], [4, 4, 2]]):
            codec.begin(step, 0.1)
            x = torch.ones(sum(sizes))
            payload, fut = c.launch(codec.encode(x, Bucket.of_sizes(sizes)))
            codec.decode(fut.result(), payload.ctx, torch.empty_like(x))
            codec.end()

    with pytest.raises(ValueError, match="appeared after the first step"):
        group.run(body)


@pytest.mark.gpu
@pytest.mark.parametrize("name", SWITCH_METHODS)
def test_cuda_gradients_give_the_cpu_integers_and_only_int32_crosses(name):
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = _run(name)
    HOST_TRANSFERS.clear()
    gpu = _run(name, device="cuda")
    assert set(HOST_TRANSFERS) <= {"int32", "int8"}, dict(HOST_TRANSFERS)
    assert all(torch.equal(a, b.cpu()) for r in range(3) for s in range(3)
               for a, b in zip(cpu[r][s], gpu[r][s]))
