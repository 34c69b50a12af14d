"""What an LTE client must know (LoRA-the-Explorer, arXiv 2402.16828), as one typed object the server
sends with every full sync of ``W`` (``lte.spec`` ConfigRecord) and the client keeps in its state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import ConfigRecord
from torch import nn

from fedcola.lte.heads import attach_heads, heads_attached
from fedcola.train import OptimizerSpec


@dataclass(frozen=True)
class LTESpec:
    """LTE's settings (the reference code's ``LTEConfig``): head rank ``r`` and ``alpha`` (s = alpha / r),
    ``targets`` (regexes of the ``nn.Linear`` layers that get heads; None = all), ``non_lora``
    (``frozen`` or ``replicated``: averaged at merge), the reset variant, ``full_rank`` (no heads,
    every parameter a replica: the FedAvg full-rank baseline), the run's ``seed`` (client heads are
    drawn from it and the client id), the clients' optimizer and ``local_steps`` T per round."""

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None
    non_lora: str = "frozen"
    reset: bool = False
    full_rank: bool = False
    seed: int = 0
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    local_steps: int = 10

    def __post_init__(self) -> None:
        if self.r < 1 or self.local_steps < 1:
            raise ValueError(f"LTE needs r >= 1 and local_steps >= 1, got r={self.r}, local_steps={self.local_steps}")
        if self.non_lora not in ("frozen", "replicated"):
            raise ValueError(f"non_lora must be 'frozen' or 'replicated', got {self.non_lora!r}")

    def head_seed(self, client_id: int, version: int = 0) -> int:
        """Seed of a client's head: distinct per client (and per version for the reset variant)."""
        return self.seed * 1_000_003 + client_id * 10_007 + version

    def attach(self, model: nn.Module, head_seed: int = 0) -> nn.Module:
        """``model`` with LTE heads (in place), unless it has them already; full rank: every parameter a replica."""
        if heads_attached(model):
            return model
        if self.full_rank:
            return attach_heads(model, targets=(), non_lora="replicated")
        return attach_heads(model, r=self.r, alpha=self.alpha, seed=head_seed, targets=self.targets, non_lora=self.non_lora)

    def to_record(self) -> ConfigRecord:
        o = self.optimizer
        return ConfigRecord({
            "r": self.r, "alpha": float(self.alpha), "targets": list(self.targets or []), "all-targets": self.targets is None,
            "non-lora": self.non_lora, "reset": self.reset, "full-rank": self.full_rank, "seed": self.seed,
            "optimizer": o.name, "lr": float(o.lr), "weight-decay": float(o.weight_decay), "local-steps": self.local_steps,
        })

    @classmethod
    def from_record(cls, record: Mapping) -> LTESpec:
        """Inverse of :meth:`to_record`; a malformed record is a one-line ValueError."""
        try:
            return cls(
                r=int(record["r"]), alpha=float(record["alpha"]), targets=None if record["all-targets"] else tuple(record["targets"]),
                non_lora=str(record["non-lora"]), reset=bool(record["reset"]), full_rank=bool(record["full-rank"]), seed=int(record["seed"]),
                optimizer=OptimizerSpec(str(record["optimizer"]), float(record["lr"]), float(record["weight-decay"])),
                local_steps=int(record["local-steps"]),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed LTE client spec: {type(err).__name__}: {err}") from None
