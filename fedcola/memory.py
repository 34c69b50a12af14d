"""Peak accelerator memory of one training / server step, estimated without an accelerator.

The step runs under ``torch._subclasses.fake_tensor.FakeTensorMode``: every tensor carries shape,
dtype and device but no data, so a Llama-2-7B forward + backward traces in seconds on a CPU and
allocates nothing. A small ``TorchDispatchMode`` (`StorageTracker`) sees every tensor an op
returns and counts each *storage* once (views share one), from its first appearance until it is
freed (a weakref finalizer on the untyped storage, which PyTorch keeps alive exactly as long as the
C++ storage), keeping the peak of the live bytes. Only storages on the accelerator count.

The accelerator is a fake ``meta`` device: on a CPU-only build, fake ``cuda`` tensors can be made,
but the autograd engine aborts the process (no CUDA device guard) as soon as a backward runs on
them. ``meta`` fake tensors behave like any device (ops, autograd, ``.to("cpu")``, which makes a
host copy that is not counted). What a CUDA step does differently is emulated here:

* attention: ``F.scaled_dot_product_attention`` is routed to the fused CUDA kernels' ops
  (``_scaled_dot_product_flash_attention`` without a mask, ``_scaled_dot_product_efficient_attention``
  with one), whose fake kernels give the CUDA output and log-sum-exp shapes (on ``meta`` the
  composite would decompose into the math path, which keeps the L x L probabilities);
  ``attention="eager"`` builds the model with transformers' eager attention instead (the paper's
  transformers 4.33 had no SDPA for Llama);
* AdamW runs with ``foreach=True`` (torch's default on CUDA; its ``sqrt(v)`` temporary is one
  optimizer-state-sized list).

Data-dependent reads (``int(t)``, ``bool(t)``, boolean-mask indexing) cannot be answered by fake
tensors. The tracker follows tensors known to be constant (``torch.ones`` attention masks through
``cat`` / ``to`` / ``bool`` / ``~``), answers ``sum`` / ``all`` / ``any`` / ``max`` / ``x[mask]``
of them exactly, and answers any other scalar read with 0 (a float one with 1.0; counted in ``Estimate.placeholder_reads``;
a float read such as ``float(loss)`` is harmless, an int or bool one may take another branch than
the real step). The estimator therefore assumes unpadded batches (every token real).

Not counted: the CUDA context (about 0.3-0.6 GB per process), the caching allocator's rounding
(512-byte blocks) and fragmentation / reserved-but-free memory, cuBLAS / attention workspaces.
``torch.cuda.max_memory_allocated`` would be at least the estimate; ``nvidia-smi`` or
``torch.cuda.mem_get_info`` (the ColA paper's measure) higher still.

    from fedcola.memory import Setup, estimate, cola_step, LLAMA2_7B
    est = estimate(cola_step(Setup(LLAMA2_7B, batch=8, seq=256), mode="merged", kind="low-rank"))
    est.peak_bytes / 2**30
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

#: Llama-2-7B's shape (meta-llama/Llama-2-7b-hf config.json), as keyword arguments of transformers.LlamaConfig.
LLAMA2_7B: dict[str, Any] = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

Step = Callable[[], object]
MakeStep = Callable[[], Step]


def _key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


class StorageTracker(TorchDispatchMode):
    """Live bytes of the storages on `device_type` that ops return, from creation to release, and
    their peak; constant tensors (masks) followed so that data-dependent reads of them are exact."""

    _CREATE = {aten.ones.default: 1, aten.ones_like.default: 1, aten.new_ones.default: 1, aten.zeros.default: 0,
               aten.zeros_like.default: 0, aten.new_zeros.default: 0}
    _FILL = {aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2, aten.fill_.Scalar: 1}
    _SAME = {aten.clone.default, aten._to_copy.default, aten.contiguous.default, aten.cat.default, aten.stack.default,
             aten.lift_fresh.default, aten._pin_memory.default}
    _READ = {aten.sum.default: "sum", aten.sum.dim_IntList: "sum", aten.all.default: "all", aten.any.default: "any",
             aten.max.default: "max", aten.min.default: "min", aten.amax.default: "max", aten.amin.default: "min"}
    _COMPARE = {aten.eq.Scalar: lambda a, b: a == b, aten.ne.Scalar: lambda a, b: a != b,
                aten.gt.Scalar: lambda a, b: a > b, aten.ge.Scalar: lambda a, b: a >= b,
                aten.lt.Scalar: lambda a, b: a < b, aten.le.Scalar: lambda a, b: a <= b}

    def __init__(self, device_type: str = "meta") -> None:
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, int] = {}  # counted storage -> nbytes
        self.seen: set[int] = set()  # every storage with a finalizer (any device)
        self.ignored: set[int] = set()  # first seen inside `excluded()`: held elsewhere, never counted
        self.const: dict[int, float | int | bool] = {}  # storage -> the value of every element
        self.current = 0
        self.peak = 0
        self.placeholder_reads = 0  # int / bool scalar reads answered with 0
        self.float_reads = 0  # float scalar reads (loss values) answered with 0.0
        self._excluding = False

    # -- accounting -----------------------------------------------------------------------------
    def _freed(self, key: int) -> None:
        self.seen.discard(key)
        self.ignored.discard(key)
        self.const.pop(key, None)
        self.current -= self.live.pop(key, 0)

    def track(self, t: Tensor) -> None:
        """Count `t`'s storage (also for tensors made before the tracker, e.g. a user's model)."""
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.seen:
            self.seen.add(key)
            weakref.finalize(storage, self._freed, key)
            if self._excluding:
                self.ignored.add(key)
        if key in self.ignored or t.device.type != self.device_type:
            return
        nbytes = storage.nbytes()
        old = self.live.get(key, 0)
        if nbytes != old:  # new, or resized in place
            self.live[key] = nbytes
            self.current += nbytes - old
            self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Storages first made inside never count (state the real system keeps off the accelerator)."""
        self._excluding, before = True, self._excluding
        try:
            yield
        finally:
            self._excluding = before

    # -- constants and data-dependent reads ---------------------------------------------------------
    def _value(self, t: Any) -> Any:
        return self.const.get(_key(t)) if isinstance(t, Tensor) else None

    def _set(self, out: Any, value: Any) -> None:
        if isinstance(out, Tensor) and value is not None:
            self.const[_key(out)] = bool(value) if out.dtype == torch.bool else value
        elif isinstance(out, Tensor):
            self.const.pop(_key(out), None)

    def _special(self, func, args, kwargs) -> tuple[bool, Any]:
        if func is aten._local_scalar_dense.default:
            value = self._value(args[0])
            if value is not None:
                return True, value
            if args[0].dtype.is_floating_point:
                self.float_reads += 1
                return True, 1.0  # e.g. AdamW's step count (bias correction 1 - beta^step must not be 0)
            self.placeholder_reads += 1
            return True, False if args[0].dtype == torch.bool else 0
        if func is aten.index.Tensor:  # x[mask] with a constant boolean mask
            x, indices = args
            if len(indices) == 1 and isinstance(indices[0], Tensor) and indices[0].dtype == torch.bool:
                mask_value = self._value(indices[0])
                if mask_value is not None:
                    d = indices[0].dim()
                    if mask_value:
                        return True, x.flatten(0, d - 1).clone() if d > 1 else x.clone()
                    return True, x.new_empty((0, *x.shape[d:]))
        if func is aten.nonzero.default:  # x[mask] on this build: the mask's nonzero() indices first
            mask_value = self._value(args[0])
            if mask_value is not None:
                n = args[0].numel() if mask_value else 0
                return True, torch.empty((n, args[0].dim()), dtype=torch.long, device=args[0].device)
        if func is aten._pin_memory.default:  # no pinned fake memory: a host copy of the same size
            return True, torch.empty_like(args[0], device="cpu")
        return False, None

    def _propagate(self, func, args, kwargs, out) -> None:
        if func in self._CREATE:
            self._set(out, self._CREATE[func])
        elif func in self._FILL:
            self._set(out, args[self._FILL[func]])
        elif func in (aten.zero_.default,):
            self._set(out, 0)
        elif func in self._SAME:
            inputs = [a for a in tree_leaves(args) if isinstance(a, Tensor)]
            values = {self._value(a) for a in inputs}
            self._set(out, values.pop() if len(values) == 1 and inputs else None)
        elif func is aten.constant_pad_nd.default:  # F.pad: constant if nothing is added or it adds the same value
            v = self._value(args[0])
            fill = args[2] if len(args) > 2 else kwargs.get("value", 0)
            self._set(out, v if v is not None and (not any(args[1]) or fill == v) else None)
        elif func is aten.copy_.default:
            self._set(args[0], self._value(args[1]))
        elif func in (aten.bitwise_not.default, aten.logical_not.default):
            v = self._value(args[0])
            self._set(out, None if v is None else (not v if args[0].dtype == torch.bool or func is aten.logical_not.default else ~int(v)))
        elif func in self._COMPARE:
            v = self._value(args[0])
            self._set(out, None if v is None else self._COMPARE[func](v, args[1]))
        elif func in self._READ:
            v = self._value(args[0])
            if v is None:
                self._set(out, None)
            elif self._READ[func] == "sum":
                n = args[0].numel() // (out.numel() or 1)
                self._set(out, v * n)
            elif self._READ[func] in ("all", "any"):
                self._set(out, bool(v) if args[0].numel() else self._READ[func] == "all")
            else:
                self._set(out, v)
        elif func._schema.is_mutable:  # an unknown in-place op: its arguments are no longer known constants
            for a in tree_leaves(args):
                if isinstance(a, Tensor):
                    self.const.pop(_key(a), None)
        else:  # fresh outputs of other ops: not constant (views keep their storage's value)
            for o in tree_leaves(out):
                if isinstance(o, Tensor) and not any(isinstance(a, Tensor) and _key(a) == _key(o) for a in tree_leaves(args)):
                    self.const.pop(_key(o), None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handled, out = self._special(func, args, kwargs)
        if not handled:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.track(t)
        if isinstance(out, (Tensor, tuple, list)):
            self._propagate(func, args, kwargs, out if isinstance(out, Tensor) else (out[0] if out and isinstance(out[0], Tensor) else None))
        return out


def _fused_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """F.scaled_dot_product_attention as a CUDA build runs it in bf16/fp16: flash attention without a
    mask, memory-efficient attention with one (their fake kernels give the CUDA shapes)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    if attn_mask is None:
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
    return aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2]),
                                                        True, dropout_p, is_causal, scale=scale)[0]


@dataclass(frozen=True)
class Estimate:
    """Peak live accelerator bytes of the measured step(s) (resident state included), the bytes
    live when the measured step began (model, auxiliary models, optimizer state, ...), and the
    data-dependent reads answered by a placeholder (see the module docstring)."""

    peak_bytes: int
    resident_bytes: int
    placeholder_reads: int = 0
    float_reads: int = 0

    @property
    def step_bytes(self) -> int:
        """What the step adds above the resident state at its peak."""
        return self.peak_bytes - self.resident_bytes


def estimate(make_step: MakeStep, *, device_type: str = "meta", warmup: int = 1, fused_attention: bool | None = None) -> Estimate:
    """Build the state (`make_step()`, whose returned callable is one step) and run `warmup` + 1
    steps under fake tensors; the peak is over the last step, starting from the bytes live before it.
    `fused_attention` (default: for the meta accelerator) routes SDPA to the CUDA kernels' ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fused = device_type == "meta" if fused_attention is None else fused_attention
    patch = contextlib.nullcontext() if not fused else _patched(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa)
    with FakeTensorMode(allow_non_fake_inputs=True), StorageTracker(device_type) as tracker, patch, \
            _patched(nn.Module, "_apply", _apply_replacing):
        step = make_step()
        for _ in range(warmup):
            step()
        tracker.reset_peak()
        resident = tracker.current
        step()
        peak = tracker.peak
    return Estimate(peak, resident, tracker.placeholder_reads, tracker.float_reads)


def peak_bytes(step: Step, *, device_type: str = "meta") -> int:
    """Peak live accelerator bytes of `step` under fake tensors, counting what it creates (build
    the model inside it, or use `estimate` to separate building from the step)."""
    return estimate(lambda: step, device_type=device_type).peak_bytes


def _apply_replacing(self: nn.Module, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
    """`nn.Module._apply` for fake tensors: this torch converts fake parameters with
    `torch.utils.swap_tensors`, which refuses them (the fake mode holds weakrefs to them); here a
    converted parameter is a new `nn.Parameter` in the module instead (same memory accounting)."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, param in self._parameters.items():
        if param is None:
            continue
        with torch.no_grad():
            applied = fn(param)
        if applied is not param:
            new = nn.Parameter(applied, requires_grad=param.requires_grad)
            if param.grad is not None:
                with torch.no_grad():
                    new.grad = fn(param.grad)
            self._parameters[key] = new
    for key, buf in self._buffers.items():
        if buf is not None:
            self._buffers[key] = fn(buf)
    return self


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# -- the steps ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """A model (transformers config kwargs of a Llama, or a `PretrainedConfig`), one batch of `batch`
    unpadded sequences of `seq` tokens, the base's dtype, the adapted / LoRA layers, the accelerator
    (``meta`` = a fake CUDA device; ``cpu`` for the real-run validation) and the attention."""

    config: Mapping[str, Any] | Any
    batch: int
    seq: int
    dtype: torch.dtype = torch.bfloat16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    device: str = "meta"
    attention: Literal["sdpa", "eager"] = "sdpa"
    seed: int = 0

    def model(self) -> nn.Module:
        """The causal LM in `dtype` on `device`, randomly initialised (fake under `estimate`)."""
        import transformers

        cfg = self.config if isinstance(self.config, transformers.PretrainedConfig) else transformers.LlamaConfig(**self.config)
        cfg._attn_implementation = self.attention
        cfg.use_cache = False  # training: no KV cache
        torch.manual_seed(self.seed)
        with _default_dtype(self.dtype), torch.device(self.device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=self.attention)
        wrong = {p.dtype for p in model.parameters()} - {self.dtype}
        if wrong:
            raise TypeError(f"parameters built in {wrong}, not {self.dtype}")
        return model

    def inputs(self, clients: int = 1) -> dict[int, dict[str, Tensor]]:
        """{client: batch}: the `batch` sequences split as evenly as possible over `clients`."""
        if clients > self.batch:
            raise ValueError(f"{clients} clients cannot share a batch of {self.batch}")
        vocab = self.config["vocab_size"] if isinstance(self.config, Mapping) else self.config.vocab_size
        sizes = [self.batch // clients + (k < self.batch % clients) for k in range(clients)]
        g = torch.Generator().manual_seed(self.seed)
        out = {}
        for k, n in enumerate(sizes):
            ids = torch.randint(0, vocab, (n, self.seq), generator=g) if self.device == "cpu" else torch.zeros(n, self.seq, dtype=torch.long, device=self.device)
            out[k] = {"input_ids": ids.to(self.device), "attention_mask": torch.ones(n, self.seq, dtype=torch.long, device=self.device),
                      "labels": ids.clone().to(self.device)}
        return out


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _adapters(targets: Mapping[str, nn.Module], kind: str, r: int, device: str) -> dict[str, nn.Module]:
    from fedcola.cola.adapters import layer_dims, make_adapter

    opts = {"r": r, "alpha": float(r)} if kind == "low-rank" else {}
    with torch.device(device):
        return {name: make_adapter(kind, *layer_dims(m), **opts) for name, m in targets.items()}


def cola_step(setup: Setup, *, mode: str = "merged", kind: str = "low-rank", clients: int = 1, r: int = 8,
              adapters_on_device: bool = True, **server_options: Any) -> MakeStep:
    """ColA server step: `ColaServer(model, targets, mode, **server_options).hidden_grads` over the
    K = `clients` clients' batches (the setup's batch split over them). The server holds the clients'
    auxiliary models beside the model in fp32, as `strategies.cola.ColA` does: merged linear only their
    `ParameterMean` (fp32 mean + float64 sum), otherwise K adapter sets; `adapters_on_device=False`
    keeps them off the count (the paper's code trains them on another device). The returned pairs
    count while alive (the step returns them; the next step starts after they are gone)."""
    from fedcola.cola.adapters import find_targets
    from fedcola.cola.server import ColaServer, ParameterMean

    def make() -> Step:
        server = ColaServer(setup.model(), list(setup.targets), mode=mode, **server_options)
        targets = find_targets(server.model, list(setup.targets))
        tracker = _tracker()
        with tracker.excluded() if (tracker and not adapters_on_device) else contextlib.nullcontext():
            if mode == "merged" and kind == "linear":
                mean = ParameterMean(_adapters(targets, kind, r, setup.device))
                held = {"mean": mean.adapters}
                keep = [mean]
            else:
                held = {k: _adapters(targets, kind, r, setup.device) for k in range(clients)}
                keep = [held]
        batches = setup.inputs(clients)

        def step() -> object:
            out = server.hidden_grads(batches, held)
            del out
            return keep  # the held state stays alive

        return step

    return make


def _tracker() -> StorageTracker | None:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return next((m for m in reversed(_get_current_dispatch_mode_stack()) if isinstance(m, StorageTracker)), None)


def _adamw(params: Sequence[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=5e-4, foreach=True)


def _causal_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    return model(**batch).loss


def _training_step(model: nn.Module, batch: Mapping[str, Tensor]) -> Step:
    """forward + backward + AdamW (foreach) step on ``model``'s trainable parameters, then `zero_grad` (grads freed)."""
    model.train()
    opt = _adamw([p for p in model.parameters() if p.requires_grad])

    def step() -> object:
        _causal_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def lora_step(setup: Setup, *, r: int = 8, alpha: int = 16) -> MakeStep:
    """peft LoRA step: `get_peft_model(LoraConfig(r, target_modules=targets))` on the `dtype` base
    (peft >= 0.12 keeps LoRA weights in fp32 on a bf16 / fp16 base: `autocast_adapter_dtype=True`),
    a training step on the LoRA parameters."""
    from peft import LoraConfig, get_peft_model

    def make() -> Step:
        model = get_peft_model(setup.model(), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(setup.targets)))
        return _training_step(model, setup.inputs(1)[0])

    return make


def full_step(setup: Setup) -> MakeStep:
    """Full fine-tuning: every parameter trainable in `dtype` (bf16: pure bf16 training, AdamW state in
    the parameters' dtype as torch creates it, the ColA paper code's setting), one training step."""

    def make() -> Step:
        return _training_step(setup.model(), setup.inputs(1)[0])

    return make


# -- a real run's peak, measured (validation) ------------------------------------------------------------

def measured(make_step: MakeStep, *, warmup: int = 1) -> Estimate:
    """The same step run for real on the CPU, measured independently of `StorageTracker`: the CPU
    allocator's "Total Allocated" of every allocation / free event of `torch.profiler` (profile_memory),
    from before the state is built; the peak over the last step, the resident bytes before it."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        step = make_step()
        for _ in range(warmup):
            step()
        with record_function("fedcola.memory.step"):
            step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    window = next(e for e in events if e.get("name") == "fedcola.memory.step" and e.get("ph") == "X")
    start, end = float(window["ts"]), float(window["ts"]) + float(window["dur"])
    mem = [(float(e["ts"]), int(e["args"]["Total Allocated"]))  # in allocation order (timestamps tie at 1 us)
           for e in sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
                           key=lambda e: (float(e["ts"]), e["args"].get("Ev Idx", 0)))]
    # the allocator's counter is process-wide and misses frees made while no profiler ran: relative to its
    # value before this profile's first allocation
    first = min((e for e in events if e.get("name") == "[memory]"), key=lambda e: (float(e["ts"]), e["args"].get("Ev Idx", 0)))
    base = int(first["args"]["Total Allocated"]) - int(first["args"]["Bytes"])
    mem = [(ts, total - base) for ts, total in mem]
    before = [total for ts, total in mem if ts < start]
    resident = before[-1] if before else 0
    peak = max([resident] + [total for ts, total in mem if start <= ts <= end])
    return Estimate(peak, resident)
