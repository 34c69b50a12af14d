"""Centralized GreenTrainer: fine-tuning under a FLOPs budget rho (Huang et al., ICLR 2024,
arXiv 2309.13192, Sec. 4).

`train_green` (`green_steps`, one step at a time) profiles the model once (Sec. 4.1, `fedcola.green.flops.profile_tensors`), then every
`reselect_every` steps evaluates tensor importance and solves the selection DP (Sec. 4.2-4.3,
`fedcola.green.select.GreenSelector`), and trains only the selected tensors with ordinary optimizer steps
(`fedcola.train.train_steps`). rho = 1 is plain fine-tuning of every trainable tensor, with no
profile and no importance evaluation; a peft model at rho = 1 is the LoRA baseline.

FLOPs are measured, not taken from the profile: every training step and every importance
evaluation runs under `torch.utils.flop_counter.FlopCounterMode` with the math SDPA backend
(`sdpa_kernel(SDPBackend.MATH)`). FlopCounterMode has no formula for the CPU flash-attention kernel
that sdpa picks by default, and the math backend's matmuls are counted; this is also what
`fedcola.green.flops.measure_step_flops` does, so profile and measurement see the same attention. Every
arm runs this way, so its wall time also includes math attention and the counter's dispatch.

Variable sequence length. Loaders pad each batch to its longest row, so a step's cost varies. The
profile is taken once on `profile_batch` (default: the first training batch); pass a batch padded
to the loader's `max_length`. Every profiled cost is linear in batch x length except attention's
QK^T and P.V (quadratic in length). So the achieved rho of a selection barely moves with length, and
the per-tensor costs at max length bound every real step. What a step really cost is measured.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedcola import runtime, train
from fedcola.green.flops import FlopsProfile, profile_tensors
from fedcola.green.select import GreenSelector, counted
from fedcola.fl.ledger import atomic_write_text
from fedcola.train import StepStats, train_steps

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Selection:
    """One (re)selection (Sec. 4.3): the trained tensors, the profile's achieved rho
    (T_fp + T_bp(m)) / (T_fp + T_bp(all)), and the measured cost of the importance evaluation."""

    step: int
    names: tuple[str, ...]
    achieved_rho: float
    flops: int
    wall_time_s: float


@dataclass
class GreenStats:
    """Everything one `train_green` run measured; `steps[i]` is training step i."""

    rho: float
    reselect_every: int
    candidates: tuple[str, ...]
    steps: list[StepStats] = field(default_factory=list)
    selections: list[Selection] = field(default_factory=list)
    profile: FlopsProfile | None = None

    @property
    def train_flops(self) -> int:
        """Measured forward + backward FLOPs of the training steps."""
        return sum(s.flops for s in self.steps)

    @property
    def selection_flops(self) -> int:
        """Measured FLOPs of the importance evaluations (one forward + full backward each)."""
        return sum(s.flops for s in self.selections)

    @property
    def wall_time_s(self) -> float:
        """Training steps plus importance evaluations and DP solves."""
        return sum(s.wall_time_s for s in self.steps) + sum(s.wall_time_s for s in self.selections)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the profile as its totals)."""
        prof = self.profile
        return {
            "rho": self.rho, "reselect_every": self.reselect_every, "num_candidates": len(self.candidates),
            "train_flops": self.train_flops, "selection_flops": self.selection_flops,
            "total_flops": self.train_flops + self.selection_flops, "wall_time_s": self.wall_time_s,
            "examples": sum(s.examples for s in self.steps),
            "steps": [asdict(s) for s in self.steps],
            "selections": [asdict(s) for s in self.selections],
            "profile": None if prof is None else {"forward_flops": prof.forward_flops,
                                                  "full_backward_flops": prof.full_backward_flops,
                                                  "num_tensors": len(prof.names)},
        }


def warmup_linear_decay(steps: int, warmup: float = 0.06) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up over the first `warmup` fraction of `steps`, then linear decay
    towards 0; positive at every step (importance takes an optimizer step at the current lr)."""
    ramp = max(1, round(warmup * steps))
    return lambda s: min((s + 1) / ramp, (steps - s) / max(1, steps - ramp))


def train_green(model: nn.Module, train_batches: Iterator[dict[str, Tensor]], steps: int,
                optimizer_factory: OptimizerFactory, rho: float = 1.0, reselect_every: int = 1,
                profile_batch: Mapping[str, Tensor] | None = None, lr_lambda: Callable[[int], float] | None = None,
                resolution: float | None = None, importance_batches: int = 1,
                on_step: Callable[[int, StepStats], None] | None = None) -> GreenStats:
    """Train `model` for `steps` steps at FLOPs ratio `rho` (GreenTrainer, Sec. 4); `green_steps`
    documents the arguments. `on_step(i, stats)` is called after step i."""
    for stats in green_steps(model, train_batches, steps, optimizer_factory, rho, reselect_every, profile_batch,
                             lr_lambda, resolution, importance_batches):
        if on_step is not None:
            on_step(len(stats.steps) - 1, stats.steps[-1])
    return stats


def green_steps(model: nn.Module, train_batches: Iterator[dict[str, Tensor]], steps: int,
                optimizer_factory: OptimizerFactory, rho: float = 1.0, reselect_every: int = 1,
                profile_batch: Mapping[str, Tensor] | None = None, lr_lambda: Callable[[int], float] | None = None,
                resolution: float | None = None, importance_batches: int = 1) -> Iterator[GreenStats]:
    """`train_green` one step at a time: yields the run's GreenStats after every training step, so
    a caller can interleave several runs (simulations/green_bench.py) or show progress.

    Candidates are the parameters with requires_grad=True at call time (all of them for full
    fine-tuning; LoRA factors and head for a peft model). `optimizer_factory(candidates)` builds one
    optimizer over them; frozen tensors get no .grad, so the optimizer skips them (and their
    weight decay). `lr_lambda(step)` multiplies the learning rate (LambdaLR); it must be > 0 at
    every reselection step, since importance uses one real optimizer step (Sec. 4.2). At steps
    0, E, 2E, ... (E = `reselect_every`) importance is evaluated on that step's batch and the next
    `importance_batches - 1` ones (which are still trained on, in order) and the selection DP
    re-solved (`resolution` is its T_q); rho = 1 ignores all three.

    Raises ValueError from `fedcola.green.select` for rho outside (0, 1] or below the smallest feasible
    rho, and ValueError when a selection is empty (every importance <= 0). The requires_grad flags
    of the candidates are restored when the generator finishes or is closed.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    params = dict(model.named_parameters())
    candidates = tuple(n for n, p in params.items() if p.requires_grad)
    if importance_batches < 1:
        raise ValueError(f"importance_batches must be >= 1, got {importance_batches}")
    ahead = deque([next(train_batches)])  # batches drawn early (profile, importance), trained on in order
    first = ahead[0]
    optimizer = optimizer_factory([params[n] for n in candidates])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda is not None else None
    stats = GreenStats(rho=rho, reselect_every=reselect_every, candidates=candidates)
    selector = None
    if rho != 1.0:
        stats.profile = profile_tensors(model, profile_batch if profile_batch is not None else first)
        selector = GreenSelector(stats.profile, rho, reselect_every, resolution)  # raises for bad rho
    else:
        stats.selections.append(Selection(0, candidates, 1.0, 0, 0.0))
    try:
        for step in range(steps):
            batch = ahead.popleft() if ahead else next(train_batches)
            if selector is not None and step % reselect_every == 0:
                model.train()
                while len(ahead) < importance_batches - 1:
                    ahead.append(next(train_batches))
                closures = [lambda b=b: model(**b).loss for b in [batch, *ahead][:importance_batches]]
                names, flops, seconds = counted(lambda: selector.update(step, model, closures, optimizer))
                if not names:
                    raise ValueError(f"step {step}: no tensor selected at rho={rho:g}: every importance is <= 0 "
                                     "(is the learning rate 0 at this step?)")
                stats.selections.append(Selection(step, names, selector.achieved_rho, flops, seconds))
            with sdpa_kernel(SDPBackend.MATH):  # train_steps counts FLOPs and zeroes .grad after the step
                step_stats = train_steps(model, iter([batch]), 1, optimizer)
            if scheduler is not None:
                scheduler.step()
            stats.steps.append(step_stats)
            yield stats
    finally:
        for n in candidates:
            params[n].requires_grad_(True)
    return stats


def run_config(config: dict, run_dir: Path, on_step: Callable[[int, StepStats], None] | None = None) -> dict[str, Any]:
    """`fedcola green CONFIG`: fine-tune the run's model centrally on its whole training split at
    FLOPs ratio `green.rho` (`green.steps` steps of `batch-size`, `optimizer` at peak `lr` with
    `warmup_linear_decay`, re-selection every `green.reselect-every` steps on
    `green.importance-batches` batches), evaluate the task metric on the validation split before and
    after, and write everything to `run_dir/green.json` (atomically). Returns that record."""
    model = runtime.base_model(config).to(runtime.device(config, "server"))
    loader = runtime.loader(config, runtime.dataset_splits(config)["train"], shuffle=True, seed=config["seed"])
    validation = runtime.validation_loader(config)
    before = train.evaluate(model, validation, config["task"])
    steps = config["green.steps"]
    t0 = time.perf_counter()
    stats = train_green(
        model, train.cycle(loader), steps,
        lambda params: train.make_optimizer(config["optimizer"], params, config["lr"], config["weight-decay"]),
        rho=config["green.rho"], reselect_every=config["green.reselect-every"], lr_lambda=warmup_linear_decay(steps),
        importance_batches=config["green.importance-batches"], on_step=on_step)
    wall = time.perf_counter() - t0
    record = {"method": "green", "config": dict(config), "metric": train.metric_name(config["task"]),
              "validation_before": before, "validation": train.evaluate(model, validation, config["task"]),
              "loop_wall_time_s": wall, "peak_memory_bytes": train.peak_memory_bytes(), **stats.to_dict()}
    atomic_write_text(Path(run_dir) / "green.json", json.dumps(record, indent=1))
    return record
