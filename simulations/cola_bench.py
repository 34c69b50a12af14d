"""ColA benchmark (arXiv 2404.13844): server memory and step time, their growth with the number of
clients K, and bytes on the wire, against peft LoRA and full fine-tuning, on the embedded MiniLM.

    .venv/bin/python -m simulations.cola_bench [--quick] [--out docs/cola] [--threads 1]
    .venv/bin/python -m simulations.cola_bench --one '<json config>'     # one measurement, one JSON line

Every measurement runs in a fresh subprocess (`--one`), so its peak memory and step time are its own.
Inputs: rotten_tomatoes training snippets concatenated and cut to exactly 128 tokens per sample (every
position a real token, attention mask all ones), labels of the first snippet; `"text": "random"` uses
uniform random token ids instead. A "server step" is:
  * ColA merged / unmerged: one `ColaServer.hidden_grads` over all K clients' batches (merging of the K
    clients' deltas, forward, backward to the lowest adapted layer, per-client (x, G) rows included);
    the K clients' auxiliary models are resident on the server as `strategies/cola.py` keeps them: every
    client's low-rank factors, but for merged linear ones only their parameter mean (`cola.ParameterMean`).
  * peft (K adapters): one peft model holding K LoRA adapters (add_adapter) and K AdamW optimizers;
    the step is, for each client, set_adapter + forward + backward + AdamW step on its own rows
    (peft cannot route samples of one batch through different adapters).
  * full fine-tuning: forward + backward over every parameter + AdamW step.
Memory, per child process: `maxrss` (ru_maxrss, the process peak), and `server_mem` = peak RSS
sampled with psutil every 2 ms from the moment the method's state is built through all steps, minus
the RSS after imports, data and model load (what the method costs on top of holding the model: its
resident adapters / gradients / optimizer state, and activations). `state_bytes` is computed exactly
from tensors: resident adapters, parameter gradients and optimizer state after the last step.
torch's own allocator statistics exist only for accelerators, so no torch-allocated bytes on CPU.
Step time is the fastest of `repeats` steps (other work on the machine only ever adds time; the
list of all is kept in results.json) after one warm-up step on one sample per client (ColA: on
client 0's first sample; nothing in ColA is initialised lazily).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import torch

SEQ, R, ALPHA, SEED = 128, 8, 16, 0
TARGETS = "query,value,classifier"
BYTES_BATCH, LOCAL_STEPS = 16, 20
METHODS = {  # name: (kind, ColA mode, adapter)
    "cola-merged-lowrank": ("cola", "merged", "low-rank"),
    "cola-merged-linear": ("cola", "merged", "linear"),
    "cola-unmerged-lowrank": ("cola", "unmerged", "low-rank"),
    "cola-unmerged-linear": ("cola", "unmerged", "linear"),
    "peft-lora": ("peft", None, "low-rank"),
    "full-ft": ("full", None, None),
}
MEMORY_STEP_METHODS = ("cola-merged-lowrank", "cola-merged-linear", "cola-unmerged-lowrank", "peft-lora", "full-ft")
K_METHODS = ("cola-merged-lowrank", "cola-merged-linear", "cola-unmerged-lowrank", "cola-unmerged-linear", "peft-lora")
QUICK_STEP_METHODS = ("cola-merged-linear", "peft-lora", "full-ft")
QUICK_K_METHODS = ("cola-merged-lowrank", "cola-unmerged-lowrank", "peft-lora")
MB = 2**20


# --- child: one measurement ------------------------------------------------------------------
class RssSampler:
    """Background thread recording the peak RSS of this process every `interval` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def maxrss_bytes() -> int:
    from fedcola.train import peak_memory_bytes

    return peak_memory_bytes()


def packed_text_batch(n: int, seq: int, tokenizer) -> dict[str, torch.Tensor]:
    """n samples of exactly `seq` real tokens: consecutive rotten_tomatoes snippets joined and cut."""
    from fedcola import runtime
    from fedcola.config import DEFAULTS

    train = runtime.dataset_splits(DEFAULTS)["train"]
    texts, labels, i = [], [], 0
    for _ in range(n):
        label, parts = train[i]["label"], []
        while len(tokenizer(" ".join(parts))["input_ids"]) < seq:
            parts.append(train[i]["text"])
            i += 1
        texts.append(" ".join(parts))
        labels.append(label)
    enc = tokenizer(texts, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor(labels)}


def random_batch(n: int, seq: int, vocab_size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return {"input_ids": torch.randint(0, vocab_size, (n, seq), generator=g), "attention_mask": torch.ones(n, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (n,), generator=g)}


def tensor_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def optimizer_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    return tensor_bytes(v for opt in optimizers for s in opt.state.values() for v in s.values())


def cola_config(cfg: dict, adapter: str) -> dict:
    from fedcola.config import DEFAULTS

    return {**DEFAULTS, "model": cfg["model"], "cola.adapter": adapter, "cola.targets": TARGETS, "lora.r": R, "lora.alpha": ALPHA}


def build_method(cfg: dict, model: torch.nn.Module):
    """(step(batches), state_bytes()) of one method for K clients; `batches` is a list of K dicts."""
    kind, mode, adapter = METHODS[cfg["method"]]
    clients = range(cfg["clients"])
    if kind == "cola":
        from fedcola.cola.server import ColaServer, ParameterMean
        from fedcola.cola.records import adapter_record
        from fedcola.specs import build_adapters

        server = ColaServer(model, TARGETS.split(","), mode=mode)
        config = {**cola_config(cfg, adapter), "cola.mode": mode}
        if mode == "merged" and adapter == "linear":  # as strategies/cola.py: only the parameter mean of the K clients
            mean = ParameterMean(build_adapters(config, seed=0))
            for k in clients:
                mean.add(k, adapter_record(build_adapters(config, seed=k)).to_torch_state_dict())
            adapters, extra = {"mean": mean.adapters}, list(mean.sum.values())
        else:
            adapters, extra = {k: build_adapters(config, seed=k) for k in clients}, []
        return (lambda batches: server.hidden_grads(dict(enumerate(batches)), adapters),
                lambda: tensor_bytes([*(p for ads in adapters.values() for a in ads.values() for p in a.parameters()), *extra]))
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS.split(","))
        peft_model = get_peft_model(model, lora, adapter_name="c0")
        for k in clients[1:]:
            peft_model.add_adapter(f"c{k}", lora)
        optimizers = []
        for k in clients:
            peft_model.set_adapter(f"c{k}")
            optimizers.append(torch.optim.AdamW([p for n, p in peft_model.named_parameters() if f".c{k}." in n], lr=1e-3))

        def peft_step(batches: list[dict]) -> None:
            for k, batch in zip(clients, batches):
                peft_model.set_adapter(f"c{k}")
                peft_model(**batch).loss.backward()
                optimizers[k].step()
                optimizers[k].zero_grad(set_to_none=True)

        lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        return peft_step, lambda: tensor_bytes(lora_params) + optimizer_bytes(optimizers)
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def full_step(batches: list[dict]) -> None:
        model(**batches[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return full_step, lambda: optimizer_bytes([optimizer])


def client_batches(cfg: dict, model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """K client batches of batch / K samples each."""
    from fedcola import models

    n, k = cfg["batch"], cfg["clients"]
    full = (packed_text_batch(n, cfg["seq"], models.load_tokenizer(cfg["model"])) if cfg["text"] == "real"
            else random_batch(n, cfg["seq"], model.config.vocab_size))
    per = n // k
    return [{key: v[i * per:(i + 1) * per] for key, v in full.items()} for i in range(k)]


def warm_up_batches(cfg: dict, batches: list[dict]) -> list[dict]:
    """One sample per client (peft: initialises every client's AdamW state), ColA: client 0 only."""
    return [{key: v[:1] for key, v in b.items()} for b in batches[:1 if METHODS[cfg["method"]][0] == "cola" else len(batches)]]


def measure_interleaved(cfg: dict) -> dict:
    """Step CPU time of several (method, K) configurations built side by side in one process and stepped
    in turn (rotating the order every repeat), so that the machine's load drifts over all of them alike.
    Memory comes from the per-process rows; this row is for time ratios only."""
    from fedcola import models

    arms = []
    for method in cfg["methods"]:
        for k in cfg["ks"]:
            one = {**cfg, "method": method, "clients": k}
            torch.manual_seed(SEED)
            model = models.load_model(cfg["model"], "classification", num_labels=2)
            model.eval()
            step, _ = build_method(one, model)
            batches = client_batches(one, model)
            step(warm_up_batches(one, batches))
            arms.append((f"{method}@{k}", step, batches))
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in arms}
    for r in range(cfg["repeats"]):
        for name, step, batches in arms[r % len(arms):] + arms[:r % len(arms)]:
            c0 = time.thread_time()
            step(batches)
            cpu[name].append(time.thread_time() - c0)
    return {"step_cpus_s": cpu, "step_cpu_s": {name: min(v) for name, v in cpu.items()}}


def measure_server(cfg: dict) -> dict:
    """Server step time and memory of one method at K clients x (batch / K) samples."""
    from fedcola import models

    torch.manual_seed(SEED)
    model = models.load_model(cfg["model"], "classification", num_labels=2)
    model.eval()  # dropout off in every method
    batches = client_batches(cfg, model)
    warm = warm_up_batches(cfg, batches)
    param_bytes = tensor_bytes(model.parameters())
    sampler = RssSampler()
    baseline = sampler.rss()
    with sampler:
        step, state_bytes = build_method(cfg, model)
        step(warm)
        times, cpu = [], []
        for _ in range(cfg["repeats"]):
            t0, c0 = time.perf_counter(), time.thread_time()
            step(batches)
            times.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
    return {"step_time_s": min(times), "step_times_s": times, "step_cpu_s": min(cpu), "step_cpus_s": cpu,
            "rss_baseline_bytes": baseline,
            "rss_peak_bytes": sampler.peak, "server_mem_bytes": sampler.peak - baseline, "maxrss_bytes": maxrss_bytes(),
            "state_bytes": state_bytes(), "param_bytes": param_bytes}


def measure_bytes(cfg: dict) -> dict:
    """Bytes of one ColA step ((x, G) down in fp16 without padding rows; batch + adapter up) vs the naive
    fp32 (x, G) at padded length `seq`, on real batches; and a FedAvg-LoRA round's ArrayRecords."""
    from fedcola import models, runtime, specs, train
    from fedcola.cola import payload, records as cola_fl
    from fedcola.fedavg_lora import client as fedavg_lora
    from fedcola.fl import wire
    from fedcola.cola.capture import Capture
    from fedcola.cola.server import ColaServer, client_losses
    from fedcola.config import DEFAULTS

    torch.manual_seed(SEED)
    model = models.load_model(cfg["model"], "classification", num_labels=2)
    tok = models.load_tokenizer(cfg["model"])
    server = ColaServer(model, TARGETS.split(","), mode="merged")
    adapters = specs.build_adapters(cola_config(cfg, "low-rank"), seed=0)
    train_split = runtime.dataset_splits(DEFAULTS)["train"]
    loader = iter(train.make_loader(train_split, tok, "classification", cfg["batch"], cfg["seq"], shuffle=True, seed=SEED))
    steps = []
    for _ in range(cfg["batches"]):
        batch = next(loader)
        pairs = server.hidden_grads({0: batch}, {0: adapters}).pairs[0]
        padded = {k: torch.nn.functional.pad(v, (0, cfg["seq"] - v.shape[1]), value=tok.pad_token_id if k == "input_ids" else 0)
                  for k, v in batch.items() if k != "labels"}
        with Capture(server.targets) as cap:
            logits = model(**padded).logits
            naive = cap.pairs(torch.stack(client_losses(logits, batch["labels"], [len(batch["labels"])])).sum())
        steps.append({
            "tokens": int(batch["attention_mask"].sum()), "padded_length": int(batch["input_ids"].shape[1]),
            "pairs_fp16_bytes": wire.nbytes(wire.pack(payload.encode([pairs], None, "pairs", share=False).tensors, "fp16")),
            "pairs_naive_fp32_bytes": wire.nbytes(wire.pack(payload.encode([naive], None, "pairs", share=False).tensors, "fp32")),
            "batch_up_bytes": wire.nbytes(cola_fl.batch_record([batch])),
        })
    adapter_bytes = wire.nbytes(cola_fl.adapter_record(adapters))
    fedavg = {}
    for targets in ("query,value", DEFAULTS["lora.targets"]):
        lora_model = specs.fedavg_model({**DEFAULTS, "model": cfg["model"], "lora.r": R, "lora.alpha": ALPHA, "lora.targets": targets})
        fedavg[targets] = wire.nbytes(wire.to_record(fedavg_lora.trainable_state(lora_model)))
    return {"steps": steps, "adapter_up_bytes": adapter_bytes, "fedavg_lora_record_bytes": fedavg}


def run_one(cfg: dict) -> dict:
    torch.set_num_threads(cfg["threads"])
    import peft  # noqa: F401  (every child imports the same modules, so their baselines compare)

    from fedcola import models, runtime  # noqa: F401
    from fedcola.cola import server as cola  # noqa: F401

    result = {"bytes": measure_bytes, "interleaved": measure_interleaved, "server": measure_server}[cfg["kind"]](cfg)
    return {"config": cfg, **result, "torch_threads": torch.get_num_threads()}


# --- parent: the suite -------------------------------------------------------------------------
def suite(quick: bool, threads: int, model: str) -> list[dict]:
    """Every configuration of the benchmark, in run order."""
    base = {"kind": "server", "model": model, "seq": SEQ, "threads": threads, "text": "real"}
    if quick:
        batches, ks, k_total, step_methods, k_methods = (8,), (1, 4), 8, QUICK_STEP_METHODS, QUICK_K_METHODS
    else:
        batches, ks, k_total, step_methods, k_methods = (8, 32), (1, 4, 16, 64), 64, MEMORY_STEP_METHODS, K_METHODS
    configs = [{**base, "section": "memory_step", "method": m, "clients": 1, "batch": b, "repeats": 2 if quick else 5}
               for b in batches for m in step_methods]
    configs += [{**base, "section": "clients", "method": m, "clients": k, "batch": k_total, "repeats": 2 if quick else 5}
                for m in k_methods for k in ks]
    configs.append({**base, "kind": "interleaved", "section": "interleaved", "methods": ["cola-merged-lowrank", "cola-merged-linear"],
                    "ks": [min(ks), max(ks)], "batch": k_total, "repeats": 3 if quick else 7})
    configs.append({"kind": "bytes", "section": "bytes", "model": model, "seq": SEQ, "threads": threads, "batch": BYTES_BATCH,
                    "batches": 4 if quick else 20, "local_steps": LOCAL_STEPS})
    return configs


def run_child(cfg: dict) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "TOKENIZERS_PARALLELISM": "false", **os.environ}
    proc = subprocess.run([sys.executable, "-m", "simulations.cola_bench", "--one", json.dumps(cfg)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"configuration {cfg} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "processor": platform.processor(), "load_average_start": os.getloadavg()}


def remeasured(cfg: dict, only: list[str]) -> bool:
    """Whether ``--only`` (methods, or the section name ``interleaved``) re-measures this configuration."""
    return cfg.get("method") in only or bool(set(cfg.get("methods", ())) & set(only)) or cfg["section"] in only


def run_suite(quick: bool, threads: int, model: str, only: list[str] | None = None, previous: dict | None = None) -> dict:
    """Every measurement of the suite, or (``only``) re-measure those methods and keep ``previous``'s other rows."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    info, results, t0 = machine_info(), [], time.perf_counter()
    configs = [c for c in suite(quick, threads, model) if only is None or remeasured(c, only)]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("cola bench", total=len(configs))
        for cfg in configs:
            bar.update(task, description=f"{cfg['section']}: {cfg.get('method', 'bytes')} K={cfg.get('clients', '-')} B={cfg['batch']}")
            t = time.perf_counter()
            results.append({**run_child(cfg), "child_wall_s": time.perf_counter() - t})
            bar.advance(task)
    info.update(load_average_end=os.getloadavg(), torch_threads=threads, suite_wall_s=time.perf_counter() - t0, quick=quick)
    if only is None:
        return {"machine": info, "results": results}
    kept = [r for r in previous["results"] if not remeasured(r["config"], only)]
    earlier = previous.get("remeasured", [])
    earlier = [earlier] if isinstance(earlier, dict) else earlier
    return {"machine": previous["machine"], "remeasured": [*earlier, {**info, "methods": only}], "results": kept + results}


# --- tables, targets, plots --------------------------------------------------------------------
def server_rows(results: list[dict], section: str) -> list[dict]:
    return [r for r in results if r["config"]["section"] == section]


def methods_in(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["config"]["method"] for r in rows))


def find(rows: list[dict], method: str, **match) -> dict:
    return next(r for r in rows if r["config"]["method"] == method and all(r["config"][k] == v for k, v in match.items()))


def bytes_summary(results: list[dict]) -> dict:
    r = server_rows(results, "bytes")[0]
    def mean(key: str) -> float:
        return statistics.fmean(s[key] for s in r["steps"])

    cola_step = mean("pairs_fp16_bytes") + mean("batch_up_bytes") + r["adapter_up_bytes"]
    s = r["config"]["local_steps"]
    return {"pairs_fp16": mean("pairs_fp16_bytes"), "pairs_naive": mean("pairs_naive_fp32_bytes"),
            "ratio": mean("pairs_fp16_bytes") / mean("pairs_naive_fp32_bytes"), "batch_up": mean("batch_up_bytes"),
            "adapter_up": r["adapter_up_bytes"], "cola_step": cola_step, "cola_round": s * cola_step, "local_steps": s,
            "tokens": mean("tokens"), "padded_length": mean("padded_length"), "batch": r["config"]["batch"],
            "fedavg_round": {t: 2 * b for t, b in r["fedavg_lora_record_bytes"].items()}}


def time_ratio(a: dict, b: dict, test) -> tuple[bool, str]:
    """(test holds on the CPU-time ratio b / a, both ratios): wall time is at the mercy of other jobs."""
    cpu, wall = b["step_cpu_s"] / a["step_cpu_s"], b["step_time_s"] / a["step_time_s"]
    return test(cpu), f"CPU time {cpu:.3f}x (wall {wall:.3f}x)"


def interleaved_ratio(results: list[dict], a: str, b: str) -> tuple[bool, str] | None:
    """(b / a <= 1.05, the numbers) from the interleaved row, if it measured both arms."""
    rows = [r for r in server_rows(results, "interleaved") if {a, b} <= set(r["step_cpu_s"])]
    if not rows:
        return None
    ratio = rows[0]["step_cpu_s"][b] / rows[0]["step_cpu_s"][a]
    return ratio <= 1.05, f"CPU time {ratio:.3f}x, interleaved in one process (fastest of {rows[0]['config']['repeats']} each)"


def targets(results: list[dict]) -> list[tuple[str, bool, str]]:
    """(target, holds, the numbers) for every target of the brief."""
    ks = server_rows(results, "clients")
    kmin, kmax = min(r["config"]["clients"] for r in ks), max(r["config"]["clients"] for r in ks)
    out = []
    present = methods_in(ks)
    for m in [m for m in ("cola-merged-lowrank", "cola-merged-linear") if m in present]:
        a, b = find(ks, m, clients=kmin), find(ks, m, clients=kmax)
        mem, mem_step = b["maxrss_bytes"] / a["maxrss_bytes"], b["server_mem_bytes"] / a["server_mem_bytes"]
        working = (b["server_mem_bytes"] - b["state_bytes"]) / (a["server_mem_bytes"] - a["state_bytes"])
        out.append((f"{m}: peak memory K={kmax} / K={kmin} <= 1.05", mem <= 1.05,
                    f"maxrss {mem:.3f}x (server mem {mem_step:.2f}x; without the resident client adapters {working:.2f}x)"))
        out.append((f"{m}: step time K={kmax} / K={kmin} <= 1.05", *(interleaved_ratio(results, f"{m}@{kmin}", f"{m}@{kmax}")
                                                                     or time_ratio(a, b, lambda r: r <= 1.05))))
    for m in [m for m in ("cola-unmerged-lowrank", "cola-unmerged-linear", "peft-lora") if m in present]:
        a, b = find(ks, m, clients=kmin), find(ks, m, clients=kmax)
        mem = b["server_mem_bytes"] / a["server_mem_bytes"]
        out.append((f"{m}: server memory grows from K={kmin} to K={kmax}", mem > 1.05, f"server mem {mem:.2f}x, maxrss {b['maxrss_bytes'] / a['maxrss_bytes']:.2f}x"))
        out.append((f"{m}: step time grows from K={kmin} to K={kmax}", *time_ratio(a, b, lambda r: r > 1.05)))
    for k in (kmin, kmax) if {"cola-merged-lowrank", "cola-merged-linear"} <= set(present) else ():
        lo, li = find(ks, "cola-merged-lowrank", clients=k), find(ks, "cola-merged-linear", clients=k)
        mem = li["maxrss_bytes"] / lo["maxrss_bytes"]
        out.append((f"merged, K={k}: linear / low-rank peak memory <= 1.05", mem <= 1.05, f"maxrss {mem:.3f}x"))
        out.append((f"merged, K={k}: linear / low-rank step time <= 1.05", *(interleaved_ratio(results, f"cola-merged-lowrank@{k}", f"cola-merged-linear@{k}")
                                                                          or time_ratio(lo, li, lambda r: r <= 1.05))))
    ms = server_rows(results, "memory_step")
    for b in sorted({r["config"]["batch"] for r in ms}):
        ft, lin = find(ms, "full-ft", batch=b), find(ms, "cola-merged-linear", batch=b)
        gap = (ft["maxrss_bytes"] - lin["maxrss_bytes"]) / ft["param_bytes"]
        out.append((f"batch {b}: full-FT peak - linear-merged peak >= 1.5x parameter bytes", gap >= 1.5,
                    f"{(ft['maxrss_bytes'] - lin['maxrss_bytes']) / MB:.0f} MB = {gap:.2f}x of {ft['param_bytes'] / MB:.0f} MB"))
    bs = bytes_summary(results)
    out.append(("(x, G) fp16 without padding rows / naive fp32 padded to 128 <= 0.4", bs["ratio"] <= 0.4, f"{bs['ratio']:.3f}x"))
    return out


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_readme(doc: dict, out: Path) -> None:
    results, info = doc["results"], doc["machine"]
    ms, ks = server_rows(results, "memory_step"), server_rows(results, "clients")
    lines = ["# ColA benchmark: server cost and traffic (MiniLM, seq 128)", "",
             f"Written by `.venv/bin/python -m simulations.cola_bench{' --quick' if info['quick'] else ''}` in "
             f"{info['suite_wall_s'] / 60:.1f} min; raw numbers in `results.json`. torch {info['torch']}, "
             f"{info['torch_threads']} torch thread(s), {info['cpu_count']} CPUs, shared machine "
             f"(load average {info['load_average_start'][0]:.1f} at start, {info['load_average_end'][0]:.1f} at end)."
             + "".join(f" Rows of {', '.join(r['methods'])} re-measured later with `--only` in {r['suite_wall_s'] / 60:.1f} min "
                       f"(load average {r['load_average_start'][0]:.1f} at start, {r['load_average_end'][0]:.1f} at end)."
                       for r in ([doc["remeasured"]] if isinstance(doc.get("remeasured"), dict) else doc.get("remeasured", [])))
             + (" Compare re-measured times with the K=1 row of the same method, not across methods." if doc.get("remeasured") else ""), "",
             "Method: each row is a fresh subprocess (`--one`). Step time = fastest of "
             f"{ms[0]['config']['repeats']} (a) / {ks[0]['config']['repeats']} (b) steps after a warm-up step. `maxrss` = the process peak (ru_maxrss, includes "
             "the model, imports and data); `server mem` = peak RSS (psutil, sampled every 2 ms) from building the "
             "method's state through all steps, minus the RSS with the model loaded; `state` = resident adapters, "
             "parameter gradients and optimizer state, counted from tensors. Inputs: real rotten_tomatoes text packed to "
             "exactly 128 tokens per sample (no padding). ColA server step = `ColaServer.hidden_grads` (merging included); "
             "peft / full-FT step = forward + backward + AdamW step; dropout off everywhere. `cpu s` = fastest CPU time "
             "of the stepping thread (one torch thread, so all compute runs there): other jobs on this 2-core machine "
             "move wall times by 10-30% between repeats, so timing targets are judged on CPU time, wall shown next to it. "
             "See the module docstring for details.", "",
             "## (a) Server memory and step time, one client", ""]
    rows = []
    for r in ms:
        ft = find(ms, "full-ft", batch=r["config"]["batch"])
        rows.append([r["config"]["method"], r["config"]["batch"], f"{r['step_time_s']:.2f}", f"{r['step_time_s'] / ft['step_time_s']:.2f}x",
                     f"{r['step_cpu_s']:.2f}", f"{r['step_cpu_s'] / ft['step_cpu_s']:.2f}x", f"{r['maxrss_bytes'] / MB:.0f}", f"{r['server_mem_bytes'] / MB:.0f}", f"{r['server_mem_bytes'] / ft['server_mem_bytes']:.2f}x",
                     f"{r['state_bytes'] / MB:.1f}"])
    lines += table(["method", "batch", "step s", "time vs full-FT", "cpu s", "cpu vs full-FT", "maxrss MB", "server mem MB", "server mem vs full-FT", "state MB"], rows)
    kmin = min(r["config"]["clients"] for r in ks)
    lines += ["", f"## (b) Server cost vs number of clients K, total batch {ks[0]['config']['batch']} (K x {ks[0]['config']['batch']}/K)", "",
              "Merged and unmerged hold the K clients' auxiliary models on the server (as `strategies/cola.py` does); "
              "peft holds K LoRA adapters + K AdamW states and runs one step per client batch. "
              "Ratios are against the same method at K = 1.", ""]
    rows = []
    for r in ks:
        a = find(ks, r["config"]["method"], clients=kmin)
        rows.append([r["config"]["method"], r["config"]["clients"], f"{r['step_time_s']:.2f}", f"{r['step_time_s'] / a['step_time_s']:.2f}x",
                     f"{r['step_cpu_s']:.2f}", f"{r['step_cpu_s'] / a['step_cpu_s']:.2f}x",
                     f"{r['maxrss_bytes'] / MB:.0f}", f"{r['maxrss_bytes'] / a['maxrss_bytes']:.3f}x", f"{r['server_mem_bytes'] / MB:.0f}",
                     f"{r['server_mem_bytes'] / a['server_mem_bytes']:.2f}x", f"{r['state_bytes'] / MB:.1f}"])
    lines += table(["method", "K", "step s", "time vs K=1", "cpu s", "cpu vs K=1", "maxrss MB", "maxrss vs K=1", "server mem MB", "server mem vs K=1", "state MB"], rows)
    bs = bytes_summary(results)
    for r in server_rows(results, "interleaved"):
        lines += ["", f"Step CPU time of the merged methods at K = {', '.join(map(str, r['config']['ks']))}, built side by side in one "
                  f"process and stepped in turn ({r['config']['repeats']} rounds, order rotated; fastest of each), so that other jobs "
                  "slow all arms alike; the timing targets use these when present:", ""]
        lines += table(["arm", "cpu s (fastest)", "all cpu s"], [[name, f"{v:.2f}", " / ".join(f"{x:.2f}" for x in r["step_cpus_s"][name])]
                                                              for name, v in r["step_cpu_s"].items()])
    lines += ["", f"## (c) Bytes (rotten_tomatoes, batch {bs['batch']}, dynamic padding; mean of {len(server_rows(results, 'bytes')[0]['steps'])} batches)", "",
              f"Mean {bs['tokens']:.0f} real tokens per batch, padded length {bs['padded_length']:.0f}. Per step the server sends each "
              "client its (x, G) rows for query, value and classifier; the client sends its batch and (merged mode, every step) "
              "its updated low-rank adapter.", ""]
    lines += table(["exchange", "bytes", "vs naive"], [
        ["(x, G) naive: fp32, padded to 128", f"{bs['pairs_naive']:,.0f}", "1.00x"],
        ["(x, G) ColA: fp16, padding rows removed", f"{bs['pairs_fp16']:,.0f}", f"{bs['ratio']:.3f}x"]])
    lines += ["", f"Per round of {bs['local_steps']} local steps, one client (up + down):", ""]
    rows = [["ColA merged low-rank (per step: batch up + adapter up + (x, G) down)", f"{bs['cola_round']:,.0f}", "1.00x"]]
    rows += [[f"FedAvg-LoRA ({t}; LoRA + classifier, fp32, down + up)", f"{b:,.0f}", f"{b / bs['cola_round']:.4f}x"] for t, b in bs["fedavg_round"].items()]
    lines += table(["method", "bytes per round", "vs ColA"], rows)
    lines += ["", "These are the paper's pairs, every layer's input sent. What travels by default now (`cola.wire = auto`: "
              "shared inputs once, and the gradient the server forms where it is smaller than the pairs) and its bytes per "
              "round next to FedAvg-LoRA's, measured in full runs: [traffic.md](traffic.md) (`python -m simulations.cola_traffic`).",
              "", "## Targets", ""]
    lines += table(["target", "holds", "measured"], [[t, "yes" if ok else "**no**", m] for t, ok, m in targets(results)])
    lines += ["", "## Notes", "",
              "- Merged linear auxiliary models: the server keeps only their parameter mean (`cola.ParameterMean`: a "
              "float64 sum S = sum_k n_k w_k and the fp32 mean, `state MB`), clients send the change of their parameters, "
              "so its memory does not grow with K. Merged low-rank keeps every client's factors (K x 0.3 MB).",
              "- Unmerged memory grows far beyond the K resident adapters: roughly one extra full-size (batch, seq, d) "
              "tensor per client and adapted layer. The per-client loop of `fedcola.cola.capture.Router` (an out-of-place "
              "`index_copy` per client) is the likely cause; not investigated further here.",
              "- peft with K adapters runs K forward/backward passes on 64/K samples each: its activation memory falls "
              "with K while its resident LoRA + AdamW state grows (K x 0.9 MB), and per-pass overhead grows its time.",
              "- ColA's server memory above the model is close to peft LoRA's at the same batch: the backward still "
              "runs from the loss down to the lowest adapted layer (layer 0's query), and `Capture` keeps x and h of "
              "every adapted layer; it saves the parameter gradients and optimizer state that full fine-tuning holds."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def plot(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    ks = server_rows(results, "clients")
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods_in(ks):
        rs = sorted((r for r in ks if r["config"]["method"] == m), key=lambda r: r["config"]["clients"])
        x = [r["config"]["clients"] for r in rs]
        ax_m.plot(x, [r["maxrss_bytes"] / MB for r in rs], marker="o", label=m)
        ax_t.plot(x, [r["step_time_s"] for r in rs], marker="o", label=m)
    for ax, label in ((ax_m, "process peak memory (MB)"), (ax_t, "server step time (s, fastest of repeats)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"clients K (total batch {ks[0]['config']['batch']})")
        ax.set_ylabel(label)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "server_cost_vs_k.png", dpi=120)

    ms = server_rows(results, "memory_step")
    batches = sorted({r["config"]["batch"] for r in ms})
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(methods_in(ms))
    for i, m in enumerate(methods_in(ms)):
        rs = [find(ms, m, batch=b) for b in batches]
        pos = [j + i * width for j in range(len(batches))]
        ax_m.bar(pos, [r["server_mem_bytes"] / MB for r in rs], width, label=m)
        ax_t.bar(pos, [r["step_time_s"] for r in rs], width, label=m)
    for ax, label in ((ax_m, "server memory above model load (MB)"), (ax_t, "step time (s, fastest of repeats)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_ylabel(label)
    ax_m.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory_step.png", dpi=120)

    bs = bytes_summary(results)
    labels = ["(x,G) naive fp32\npadded 128", "(x,G) ColA fp16\nno padding", f"ColA round\n({bs['local_steps']} steps)"]
    values = [bs["pairs_naive"], bs["pairs_fp16"], bs["cola_round"]]
    labels += [f"FedAvg-LoRA round\n{t}" for t in bs["fedavg_round"]]
    values += list(bs["fedavg_round"].values())
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(values)), [v / MB for v in values], color=["grey", "tab:blue", "tab:blue", "tab:orange", "tab:orange"][:len(values)])
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("MB (log)")
    ax.set_title(f"bytes per step (one client, batch {bs['batch']}) and per round")
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=120)
    plt.close("all")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help="run one measurement (JSON config) and print one JSON line")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 8, K in {1, 4}, 2 repeats")
    p.add_argument("--out", type=Path, help="output folder (default docs/cola; --quick: <tmp>/cola_bench_quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    p.add_argument("--model", default="minilm")
    p.add_argument("--only", help="comma-separated methods (or 'interleaved') to re-measure; the other rows are kept from <out>/results.json")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    out = args.out or (Path(tempfile.gettempdir()) / "cola_bench_quick" if args.quick else Path("docs/cola"))
    out.mkdir(parents=True, exist_ok=True)
    only = args.only.split(",") if args.only else None
    previous = json.loads((out / "results.json").read_text()) if only else None
    doc = run_suite(args.quick, args.threads, args.model, only, previous)
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    write_readme(doc, out)
    plot(doc, out)
    print(f"wrote {out}/results.json, README.md, server_cost_vs_k.png, memory_step.png, bytes.png")


if __name__ == "__main__":
    main()
