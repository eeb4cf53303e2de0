"""The registry of gradient-reduction methods: name -> codec, and the factories every driver uses.

What it owns: `METHODS` (name -> codec class and its fixed options), `make_codec` (one worker's
codec), `make_method` (a codec bound to an in-process collective: `switchagg.reducer.Reducer`) and
`collective_kind`. What it must never do: implement a method (each lives in its own file under
`switchagg.codecs`) or pick a collective for the caller.

    codec = make_codec("intsgd-random", world_size=4, rank=0, seed=0, bits=32)   # any driver
    method = make_method("intsgd-random", collective, seed=0)                    # in-process
    averaged, telemetry = method.reduce(grads, step=k, lr=eta_k)

Every worker builds the same method with the same arguments. `collective_kind(name)` says what the
method needs: "int" (int32 SUM and int8 exponent MAX: the switch, or any collective) or "torch"
(fp32 sums or all-gathers: torch.distributed or the in-process group).

`OWN_LOOP` lists the methods that are not gradient reductions at all but own their training loop
(SwarmSGD: local steps and pairwise model averaging, `switchagg.swarm`); `collective_kind` says
"peer" for them and `make_codec` refuses them.

| name               | scaling                                          | rounding      | paper           |
|--------------------|--------------------------------------------------|---------------|-----------------|
| sgd                | none (fp32 all-reduce)                           | -             | baseline        |
| intsgd-random      | global alpha from the integer sums (Alg. 1)      | randomized    | IntSGD          |
| intsgd-determ      | same                                             | nearest-even  | IntSGD (Determ.)|
| intsgd-block       | one alpha per tensor (Alg. 2)                    | randomized    | IntSGD Alg. 2   |
| intdiana           | global alpha on g_i - h_i, shifts h_i, h (Alg. 3)| randomized    | IntDIANA        |
| heuristic-switchml | per-packet exponent, switch MAX, look-ahead      | nearest-even  | SwitchML        |
| heuristic-global   | one MAX all-reduce of the exponent of ||g||_inf  | nearest-even  | Heuristic IntSGD|

The papers' baselines (`switchagg.codecs.baselines`; each codec's docstring says what it sends):

| name            | wire (real width)                                   | bias     | collective  |
|-----------------|-----------------------------------------------------|----------|-------------|
| qsgd-4bit/-8bit | 4/8-bit levels + sign bit, fp32 norm per 512 coords | unbiased | all-gather  |
| natsgd          | 1 byte: sign + exponent (C_nat)                     | unbiased | all-gather  |
| terngrad        | 2-bit ternaries + fp32 scaler per layer             | unbiased | all-gather  |
| terngrad-switch | int8 exponent MAX, int32 ternary SUM                | unbiased | switch      |
| onebit-ef       | 1 bit + 2 fp32 means per layer, error feedback      | biased   | all-gather  |
| powersgd        | rank-2 P and Q, fp32, error feedback, warm start    | biased   | fp32 SUM x2 |
| isgq-mse        | per FC layer 3-bit codes of X, Delta + codebooks    | biased   | all-gather  |
| isgq-dithered   | per FC layer subtractive-dither codes of X, Delta   | unbiased | all-gather  |

`OWN_LOOP` lists the methods that are not gradient reductions at all but own their training loop
(SwarmSGD: local steps and pairwise model averaging, `switchagg.swarm`); `collective_kind` says
"peer" for them and `make_codec` refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from switchagg.codecs import (
    SGD, Codec, HeuristicGlobal, HeuristicSwitchML, IntDIANA, IntSGD,
)
from switchagg.codecs.baselines import (
    ISGQ, QSGD, NatSGD, OneBitEF, PowerSGD, TernGrad, TernGradSwitch,
)
from switchagg.errors import ConfigError, NonFiniteGradient
from switchagg.telemetry import StepTelemetry

__all__ = ["METHODS", "METHOD_SETS", "OWN_LOOP", "MethodSpec", "StepTelemetry", "NonFiniteGradient",
           "collective_kind", "make_codec", "make_method", "method_spec"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its codec class and the options its name fixes."""

    name: str
    codec: type[Codec]
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def collective_kind(self) -> str:
        return "int" if self.codec.runs_on_switch() else "torch"

    @property
    def doc(self) -> str:
        return (self.codec.__doc__ or "").strip().splitlines()[0]


def _spec(name: str, codec: type[Codec], **fixed) -> tuple[str, MethodSpec]:
    return name, MethodSpec(name, codec, fixed)


#: name -> MethodSpec, in the order the comparison runs and reports them.
METHODS: dict[str, MethodSpec] = dict([
    _spec("sgd", SGD),
    _spec("intsgd-random", IntSGD, rounding="random"),
    _spec("intsgd-determ", IntSGD, rounding="deterministic"),
    _spec("intsgd-block", IntSGD, rounding="random", blocks="tensor"),
    _spec("intdiana", IntDIANA),
    _spec("heuristic-switchml", HeuristicSwitchML),
    _spec("heuristic-global", HeuristicGlobal),
    # -- the papers' baselines --
    _spec("qsgd-4bit", QSGD, s=15),
    _spec("qsgd-8bit", QSGD, s=255),
    _spec("natsgd", NatSGD),
    _spec("terngrad", TernGrad),
    _spec("terngrad-switch", TernGradSwitch),
    _spec("onebit-ef", OneBitEF),
    _spec("powersgd", PowerSGD),
    _spec("isgq-mse", ISGQ, quantizer="mse"),
    _spec("isgq-dithered", ISGQ, quantizer="dithered"),
])

#: The method sets of the papers' comparisons (`--methods paper-intsgd`, `--methods paper-isgq`).
METHOD_SETS: dict[str, tuple[str, ...]] = {
    "paper-intsgd": ("sgd", "intsgd-random", "intsgd-determ", "heuristic-global", "powersgd",
                     "qsgd-8bit", "natsgd"),
    "paper-isgq": ("sgd", "isgq-mse", "isgq-dithered", "onebit-ef", "terngrad", "qsgd-4bit"),
}


def method_spec(name: str) -> MethodSpec:
    """The registered method `name`.

    Raises:
        ConfigError: unknown name (the message lists the valid ones; also a ValueError).
    """
    spec = METHODS.get(name)
    if spec is None:
        if name in OWN_LOOP:
            raise ConfigError(f"{name} owns its training loop and has no codec; run it with "
                              f"`switchagg worker` or `switchagg compare`", field="method",
                              value=name)
        raise ConfigError(f"unknown method {name!r}; valid methods: "
                          f"{', '.join([*METHODS, *OWN_LOOP])}", field="method", value=name)
    return spec


#: Methods that own their training loop (no collective, no reduce): name -> what it is.
OWN_LOOP: dict[str, str] = {
    "swarmsgd": "SwarmSGD: H local steps, then quantized pairwise averaging with a random peer "
                "(switchagg.swarm; the loop is workers/swarm_train.py)",
}


def collective_kind(name: str) -> str:
    """What the named method needs of its collective: "int" (the switch will do), "torch", or
    "peer" (an `OWN_LOOP` method: no collective, it talks to its peers itself)."""
    if name in OWN_LOOP:
        return "peer"
    return method_spec(name).collective_kind


def make_codec(name: str, *, world_size: int, rank: int, seed: int = 0, bits: int = 32,
               k: int = 64, **options) -> Codec:
    """One worker's codec for the named method.

    Args:
        name: a key of METHODS.
        world_size, rank: the group and this worker.
        seed: seed of the randomized rounding stream (same on every worker).
        bits: integer budget of the sum, 8, 16 or 32 (ignored by float methods).
        k: values per packet (per-packet exponents).
        options: the method's own hyperparameters (e.g. rounding, beta, eps, lr_rescale); they
            override what the name fixes (intsgd-block with rounding="deterministic").
    Raises:
        ConfigError: unknown name. TypeError / ValueError: an option the method does not take,
            or a bad value (the message names it).
    """
    spec = method_spec(name)
    codec = spec.codec(world_size=world_size, rank=rank, seed=seed, bits=bits, k=k,
                       **{**spec.fixed, **options})
    codec.name = name
    codec.tel.method = name
    return codec


def make_method(name: str, collective, *, seed: int = 0, bits: int = 32,
                names: list[str] | None = None, **options):
    """The named method bound to an in-process collective (`switchagg.reducer.Reducer`).

    Raises:
        ConfigError / ValueError: unknown name, or a bad option value.
    """
    from switchagg.reducer import Reducer
    codec = make_codec(name, world_size=collective.world_size, rank=collective.rank, seed=seed,
                       bits=bits, k=collective.k, **options)
    return Reducer(codec, collective, names=names)
