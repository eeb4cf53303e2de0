"""How a codec sees a model's activations: the inputs X and output gradients Delta of every
`nn.Linear`, for ISGQ, which sends those factors instead of the weight gradient.

What it owns: `LinearCapture.attach(model)` (forward hooks on every nn.Linear; each forward with
autograd on records the layer's input rows and hooks its output tensor so that backward records
the gradient of the loss w.r.t. the output, before autograd computes the weight's gradient, hence
before DDP can hand that gradient's bucket to the codec), `param_key(param)` (a parameter's index
in `model.parameters()`: the block key both drivers then use; the in-process `Reducer` must get
the gradients in `model.parameters()` order) and `take(key)` (the (X, Delta) pairs recorded since
the last take for the layer whose weight has that key, rows concatenated over the layer's calls).
What it must never do: change what the model computes (hooks only read), or keep a pair whose
backward never came (a forward outside training: such records are dropped at the next take).
"""

from __future__ import annotations

import threading

import torch

__all__ = ["LinearCapture"]


class LinearCapture:
    """Records (X, Delta) of a model's nn.Linear layers, keyed by their weight's parameter index."""

    def __init__(self) -> None:
        self.keys: dict[int, int] = {}                 # id(param) -> index in model.parameters()
        self.records: dict[int, list[dict]] = {}       # weight key -> [{"x", "d"}]
        self.handles: list = []
        self._lock = threading.Lock()

    def attach(self, model: torch.nn.Module) -> None:
        """Hook every nn.Linear of `model` (replacing an earlier attachment)."""
        self.detach()
        self.keys = {id(p): i for i, p in enumerate(model.parameters())}
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and id(module.weight) in self.keys:
                key = self.keys[id(module.weight)]
                self.records[key] = []
                self.handles.append(module.register_forward_hook(self._forward_hook(key)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.records, self.keys = [], {}, {}

    @property
    def attached(self) -> bool:
        return bool(self.keys)

    def param_key(self, param) -> int | None:
        return self.keys.get(id(param))

    def is_linear_weight(self, key: int) -> bool:
        return key in self.records

    def _forward_hook(self, key: int):
        def hook(module, inputs, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                    and output.requires_grad):
                return
            entry = {"x": inputs[0].detach().reshape(-1, module.in_features), "d": None}

            def grad_hook(grad):
                entry["d"] = grad.detach().reshape(-1, module.out_features)

            output.register_hook(grad_hook)
            with self._lock:
                self.records[key].append(entry)
        return hook

    def take(self, key: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(X (B, n_in), Delta (B, n_out)) of the layer's completed calls, or None."""
        with self._lock:
            entries, self.records[key] = self.records.get(key, []), []
        done = [e for e in entries if e["d"] is not None and e["d"].shape[0] == e["x"].shape[0]]
        if not done:
            return None
        return (torch.cat([e["x"] for e in done]).to(torch.float32),
                torch.cat([e["d"] for e in done]).to(torch.float32))
