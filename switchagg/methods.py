"""The gradient-reduction API the training harness calls: a registry of methods and one factory.

What it owns: `METHODS` (name -> factory) and `make_method`. What it must never do: implement a
method (each lives in its own file under `switchagg._methods`) or pick a collective for the caller.

    method = make_method("intsgd-random", collective, seed=0, bits=32)
    averaged, telemetry = method.reduce(grads, step=k, lr=eta_k)

Every worker builds the same method with the same arguments; `method.collective_kind` says what the
collective must provide ("float": fp32 SUM, i.e. not the switch; "int": int32 SUM and exponent
MAX, any collective).

| name               | scaling                                          | rounding      | paper           |
|--------------------|--------------------------------------------------|---------------|-----------------|
| sgd                | none (fp32 all-reduce)                           | -             | baseline        |
| intsgd-random      | global alpha from the integer sums (Alg. 1)      | randomized    | IntSGD          |
| intsgd-determ      | same                                             | nearest-even  | IntSGD (Determ.)|
| intsgd-block       | one alpha per tensor (Alg. 2)                    | randomized    | IntSGD Alg. 2   |
| intdiana           | global alpha on g_i - h_i, shifts h_i, h (Alg. 3)| randomized    | IntDIANA        |
| heuristic-switchml | per-packet exponent, switch MAX, look-ahead      | nearest-even  | SwitchML        |
| heuristic-global   | one MAX all-reduce of the exponent of ||g||_inf  | nearest-even  | Heuristic IntSGD|

`OWN_LOOP` lists the methods that are not gradient reductions at all but own their training loop
(SwarmSGD: local steps and pairwise model averaging, `switchagg.swarm`); `collective_kind` says
"peer" for them and `make_method` refuses them.
"""

from __future__ import annotations

from typing import Callable

from switchagg._methods._base import Method, NonFiniteGradient
from switchagg._methods.heuristic import HeuristicSwitchML
from switchagg._methods.heuristic_global import HeuristicGlobal
from switchagg._methods.intdiana import IntDIANA
from switchagg._methods.intsgd import IntSGD
from switchagg._methods.sgd import SGD
from switchagg.collectives import Collective
from switchagg.telemetry import StepTelemetry

__all__ = ["METHODS", "OWN_LOOP", "Method", "StepTelemetry", "NonFiniteGradient", "collective_kind",
           "make_method"]


def _named(cls, name: str, **fixed) -> Callable[..., Method]:
    def factory(collective: Collective, **options) -> Method:
        method = cls(collective, **{**fixed, **options})
        method.name = name
        return method
    factory.__name__ = factory.__qualname__ = name.replace("-", "_")
    factory.__doc__ = f"{name}: {cls.__doc__}"
    factory.collective_kind = cls.collective_kind  # known before any collective exists
    return factory


#: name -> factory(collective, *, seed, bits, **options) -> Method.
METHODS: dict[str, Callable[..., Method]] = {
    "sgd": _named(SGD, "sgd"),
    "intsgd-random": _named(IntSGD, "intsgd-random", rounding="random"),
    "intsgd-determ": _named(IntSGD, "intsgd-determ", rounding="deterministic"),
    "intsgd-block": _named(IntSGD, "intsgd-block", rounding="random", blocks="tensor"),
    "intdiana": _named(IntDIANA, "intdiana"),
    "heuristic-switchml": _named(HeuristicSwitchML, "heuristic-switchml"),
    "heuristic-global": _named(HeuristicGlobal, "heuristic-global"),
}


#: Methods that own their training loop (no collective, no reduce): name -> what it is.
OWN_LOOP: dict[str, str] = {
    "swarmsgd": "SwarmSGD: H local steps, then quantized pairwise averaging with a random peer "
                "(switchagg.swarm; the loop is workers/swarm_train.py)",
}


def collective_kind(name: str) -> str:
    """What the named method needs of its collective: "float" (fp32 SUM), "int", or "peer" (an
    `OWN_LOOP` method: no collective, it talks to its peers itself).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name in OWN_LOOP:
        return "peer"
    factory = METHODS.get(name)
    if factory is None:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join([*METHODS, *OWN_LOOP])}")
    return factory.collective_kind


def make_method(name: str, collective: Collective, *, seed: int = 0, bits: int = 32,
                **options) -> Method:
    """Build the named method for this worker.

    Args:
        name: a key of METHODS.
        collective: this worker's collective (every worker passes its own, same kind).
        seed: seed of the randomized rounding stream (same on every worker).
        bits: integer budget of the sum, 8, 16 or 32 (ignored by sgd).
        options: the method's own hyperparameters (e.g. rounding, beta, eps, lr_rescale,
            names=[parameter names] for error messages).
    Raises:
        ValueError: unknown name (the message lists the valid ones) or a bad option value.
    """
    if name in OWN_LOOP:
        raise ValueError(f"{name} owns its training loop and has no reduce; run it with "
                         f"`switchagg worker` or `switchagg compare`")
    factory = METHODS.get(name)
    if factory is None:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return factory(collective, seed=seed, bits=bits, **options)
