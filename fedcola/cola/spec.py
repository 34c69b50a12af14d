"""What a ColA client must know, as typed objects: the auxiliary models, their optimizer, and the
client spec the server sends once per run (first contact), which the client keeps in its state.

The client never looks up a model or a dataset: the adapted layers and their shapes come from the
server's model (``ColA(model, targets, ...)``), everything else from the strategy's arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord

from fedcola.cola.adapters import ADAPTERS, Adapter, make_adapter
from fedcola.fl.wire import WIRE_DTYPES
from fedcola.train import OptimizerSpec



@dataclass(frozen=True)
class AdapterSpec:
    """An auxiliary model kind and its size: ``low-rank`` (r, alpha: s = alpha / r), ``linear``, ``mlp`` (hidden)."""

    kind: str = "low-rank"
    r: int = 8
    alpha: float = 16.0
    hidden: int = 128

    def __post_init__(self) -> None:
        if self.kind not in ADAPTERS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; known kinds: {sorted(ADAPTERS)}")
        if self.r < 1 or self.hidden < 1:
            raise ValueError(f"adapter r and hidden must be >= 1, got r={self.r}, hidden={self.hidden}")

    @property
    def mergeable(self) -> bool:
        return ADAPTERS[self.kind].mergeable

    def build(self, layers: Mapping[str, tuple[int, int]], seed: int) -> dict[str, Adapter]:
        """One client's auxiliary models {layer: g_m}, initialised from ``seed`` (torch's global RNG is left as it was)."""
        opts = {"low-rank": {"r": self.r, "alpha": float(self.alpha)}, "mlp": {"hidden": self.hidden}}.get(self.kind, {})
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return {layer: make_adapter(self.kind, d_in, d_out, **opts) for layer, (d_in, d_out) in layers.items()}
        finally:
            torch.random.set_rng_state(generator_state)


UPLOAD_DTYPES = ("fp16", "fp32", "bf16")


def sends_changes(mode: str) -> bool:
    """Merged mode: a client's train reply carries the change of its parameters since the version the
    server holds, in the upload dtype (``records.change_record``; merged linear: the server keeps only
    their parameter mean, ``fedcola.cola.server.ParameterMean``)."""
    return mode == "merged"


@dataclass(frozen=True)
class ClientSpec:
    """Everything a ColA client needs from the server, sent once per run in a ``spec`` ConfigRecord:
    the adapted layers {name: (d_in, d_out)} (module order), the auxiliary models and optimizer, the
    adaptation interval I, the wire dtype of the pairs, the run's seed (a client's auxiliary models are
    drawn from seed * 7919 + its adapter id), and whether its train replies carry parameter changes
    (merged linear: the server keeps only their mean, ``fedcola.cola.server.ParameterMean``)."""

    layers: dict[str, tuple[int, int]]
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    interval: int = 1
    wire_dtype: str = "fp16"
    seed: int = 0
    sends_changes: bool = False
    upload_dtype: str = "fp16"

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"adaptation interval must be >= 1, got {self.interval}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {self.wire_dtype!r}; known: {', '.join(WIRE_DTYPES)}")
        if self.upload_dtype not in UPLOAD_DTYPES:
            raise ValueError(f"unknown upload dtype {self.upload_dtype!r}; known: {', '.join(UPLOAD_DTYPES)}")

    def adapters(self, adapter_id: int) -> dict[str, Adapter]:
        """A client's initial auxiliary models."""
        return self.adapter.build(self.layers, seed=self.seed * 7919 + adapter_id)

    def selected(self, layers: Iterable[str] | None) -> dict[str, tuple[int, int]]:
        """The adapted layers restricted to ``layers`` (Green-ColA's selection; None = all), in module order."""
        if layers is None:
            return dict(self.layers)
        layers = list(layers)
        unknown = sorted(set(layers) - set(self.layers))
        if unknown:
            raise ValueError(f"selected layers are not adapted layers of this model: {unknown[:3]}")
        return {layer: d for layer, d in self.layers.items() if layer in layers}

    def to_record(self) -> ConfigRecord:
        a, o = self.adapter, self.optimizer
        return ConfigRecord({
            "layers": list(self.layers), "d-in": [d for d, _ in self.layers.values()], "d-out": [d for _, d in self.layers.values()],
            "adapter": a.kind, "r": a.r, "alpha": float(a.alpha), "hidden": a.hidden,
            "optimizer": o.name, "lr": float(o.lr), "weight-decay": float(o.weight_decay),
            "interval": self.interval, "wire-dtype": self.wire_dtype, "seed": self.seed, "sends-changes": self.sends_changes,
            "upload-dtype": self.upload_dtype,
        })

    @classmethod
    def from_record(cls, record: Mapping) -> ClientSpec:
        """Inverse of :meth:`to_record`; a malformed record is a one-line ValueError."""
        try:
            layers = dict(zip(record["layers"], zip(map(int, record["d-in"]), map(int, record["d-out"]), strict=True), strict=True))
            return cls(
                layers=layers, adapter=AdapterSpec(str(record["adapter"]), int(record["r"]), float(record["alpha"]), int(record["hidden"])),
                optimizer=OptimizerSpec(str(record["optimizer"]), float(record["lr"]), float(record["weight-decay"])),
                interval=int(record["interval"]), wire_dtype=str(record["wire-dtype"]), seed=int(record["seed"]),
                sends_changes=bool(record["sends-changes"]), upload_dtype=str(record["upload-dtype"]),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed ColA client spec: {type(err).__name__}: {err}") from None
