"""fedcola on a CUDA GPU, in one run of under 8 minutes (``bash simulations/gpu_check.sh``): writes
``docs/gpu_check/results.json`` and ``docs/gpu_check/README.md``.

1. Equivalence on the device: a ColA step's GL gradients equal peft LoRA's (low-rank) and full
   fine-tuning's (linear) on CUDA in fp32; a bf16 ColA server in merged mode matches an fp32 server;
   the lean-server options (host offload through pinned memory, recomputation) change no number.
2. A 2-client ColA simulation (``fedcola run``) with the server on the GPU in bf16.
3. LTE clients and GreenTrainer training on the GPU.
4. Estimated (``fedcola.memory``, fake tensors) vs measured (``torch.cuda.max_memory_allocated``) peak
   memory of one step of a random-init Llama of about 1B parameters: ColA merged (plain and lean),
   peft LoRA, full fine-tuning.

Every check runs, a failing one is recorded with its error and the next goes on; the exit status is
the number of failed checks (0: all passed). ``--device cpu`` runs the same script on a machine without
a GPU (what CI can check: no measured memory, no CUDA-only paths), to catch mistakes before a GPU run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}  # TinyLlama-1.1B's shape
TINY_RUN = ["--set", "rounds=1", "--set", "num-clients=2", "--set", "local-steps=2", "--set", "batch-size=8",
            "--set", "eval.max-examples=64", "--set", "eval.client-max-examples=16", "--set", "data.max-length=32"]


def check_equivalence(device: str, tmp: Path) -> dict:
    """GL gradients from a ColA server on ``device`` vs peft LoRA / full fine-tuning there (fp32)."""
    import torch

    from fedcola.cola.adapters import Linear, layer_dims
    from fedcola.cola.gl import vjp_grads
    from fedcola.cola.server import ColaServer
    from tests.test_cola_equivalence import BERT_TARGETS, LLAMA_TARGETS, batch, bert, llama, lowrank, peft_lora, rel

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    worst = {}
    for name, make, patterns, kind in (("bert", bert, BERT_TARGETS, "cls"), ("llama", llama, LLAMA_TARGETS, "lm")):
        for mode in ("merged", "unmerged"):
            base = make().to(device)
            data = {k: v.to(device) for k, v in batch(kind, 6, 10, seed=1).items()}
            server = ColaServer(copy.deepcopy(base), patterns, mode)
            adapters = {n: a.to(device) for n, a in lowrank(server.targets, seed=2).items()}
            pm, params = peft_lora(base, patterns, adapters)
            pm(**data).loss.backward()
            res = server.hidden_grads({0: data}, {0: adapters})
            worst[f"{name}-{mode}-lora"] = max(rel(vjp_grads(adapters[n], *res.pairs[0][n])[k], p.grad)
                                               for n, d in params.items() for k, p in d.items())
        full = make().to(device)
        for p in full.parameters():
            p.requires_grad_(p.dim() == 2)
        data = {k: v.to(device) for k, v in batch(kind, 6, 10, seed=1).items()}
        full(**data).loss.backward()
        server = ColaServer(make().to(device), patterns, "merged")
        linear = {n: Linear(*layer_dims(m)).to(device) for n, m in server.targets.items()}
        res = server.hidden_grads({0: data}, {0: linear})
        weights = dict(full.named_parameters())
        worst[f"{name}-linear-full-ft"] = max(
            rel(vjp_grads(linear[n], *res.pairs[0][n])["weight"], weights[f"{n}.weight"].grad.reshape(linear[n].weight.shape)
                if weights[f"{n}.weight"].grad.shape == linear[n].weight.shape else weights[f"{n}.weight"].grad.T)
            for n in server.targets)
    ok = all(v < 1e-4 for v in worst.values())
    return {"ok": ok, "worst_relative_error": worst, "tolerance": 1e-4}


def check_lean_and_bf16(device: str, tmp: Path) -> dict:
    """The lean-server options and bf16 merged mode on ``device`` (the tests' own checks)."""
    import torch

    from fedcola.cola.server import ColaServer
    from tests.test_cola_equivalence import LLAMA_TARGETS, batch, llama, lowrank, rel

    base = llama().to(device, torch.float64)
    plain, lean = ColaServer(copy.deepcopy(base), LLAMA_TARGETS, "merged"), ColaServer(copy.deepcopy(base), LLAMA_TARGETS, "merged",
                                                                                        offload_pairs=True, recompute=True)
    batches = {k: batch("lm", n, 10, seed=10 + k) for k, n in enumerate([2, 3])}
    adapters = {k: {n: a.to(device, torch.float64) for n, a in lowrank(plain.targets, seed=20 + k).items()} for k in batches}
    want, got = plain.hidden_grads(batches, adapters), lean.hidden_grads(batches, adapters)
    lean_err = max(rel(a, b.to(a.device)) for k in batches for n in plain.targets for a, b in zip(got.pairs[k][n], want.pairs[k][n]))
    on_host = all(t.device.type == "cpu" for k in batches for n in plain.targets for t in got.pairs[k][n])
    fp32 = llama().to(device)
    bf16 = ColaServer(copy.deepcopy(fp32).to(torch.bfloat16), LLAMA_TARGETS, "merged")
    ref = ColaServer(copy.deepcopy(fp32).to(torch.bfloat16).float(), LLAMA_TARGETS, "merged")
    adapters32 = {k: {n: a.to(device) for n, a in lowrank(ref.targets, seed=20 + k).items()} for k in batches}
    a, b = bf16.hidden_grads(batches, adapters32), ref.hidden_grads(batches, adapters32)
    bf16_err = max(rel(x.float(), y) for k in batches for n in ref.targets for x, y in zip(a.pairs[k][n], b.pairs[k][n]))
    offload_expected = device != "cpu"
    return {"ok": lean_err < 1e-12 and bf16_err < 3e-2 and (on_host or not offload_expected), "lean_vs_plain_fp64": lean_err,
            "pairs_in_host_memory": on_host, "bf16_vs_fp32_reference": bf16_err}


def _fedcola(args: list[str], out: Path, timeout: float) -> dict:
    """``fedcola <args>`` in a subprocess; the run's ledger (or green.json) and its exit status."""
    proc = subprocess.run([sys.executable, "-m", "fedcola.cli", *args, "--run-dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    result = {"exit": proc.returncode, "stderr_tail": proc.stderr[-800:]}
    for name in ("ledger.json", "green.json"):
        if (out / name).is_file():
            result["record"] = json.loads((out / name).read_text())
    return result


def check_cola_simulation(device: str, tmp: Path) -> dict:
    """2 ColA clients, the server on ``device`` in bf16 (fp32 on CPU), 1 round."""
    dtype = "bf16" if device != "cpu" else "fp32"
    run = _fedcola(["run", "simulations/cola_minilm_rt.toml", *TINY_RUN, "--set", f'server.device="{device}"', "--set", f'server.dtype="{dtype}"'],
                   tmp / "cola", 300)
    ledger = run.get("record", {})
    last = ledger.get("rounds", [{}])[-1].get("server", {})
    return {"ok": run["exit"] == 0 and ledger.get("status") == "completed", "exit": run["exit"], "status": ledger.get("status"),
            "server_dtype": dtype, "accuracy": last.get("accuracy"), "server_accelerator_peak_gib": last.get("accelerator_peak_bytes", 0) / GiB,
            "stderr_tail": run["stderr_tail"] if run["exit"] else ""}


def check_lte_and_green(device: str, tmp: Path) -> dict:
    """LTE clients on ``device`` (Ray's GPU share 0.5 each), and a few GreenTrainer steps there."""
    gpus = "0.5" if device != "cpu" else "0.0"
    lte = _fedcola(["run", "simulations/lte_gpt_hamlet.toml", *TINY_RUN, "--set", f'client.device="{device}"', "--set", f"client.num-gpus={gpus}",
                    "--set", f'server.device="{device}"'], tmp / "lte", 300)
    clients = [c for r in lte.get("record", {}).get("rounds", []) for c in r.get("clients", [])]
    green = _fedcola(["green", "simulations/green_minilm_rt.toml", "--set", "green.steps=4", "--set", "green.reselect-every=2", "--set", "batch-size=8",
                      "--set", "eval.max-examples=64", "--set", "data.max-length=32", "--set", f'server.device="{device}"'], tmp / "green", 300)
    lte_ok = lte["exit"] == 0 and lte.get("record", {}).get("status") == "completed"
    on_gpu = device == "cpu" or all("accelerator_peak_bytes" in c for c in clients)
    return {"ok": lte_ok and on_gpu and green["exit"] == 0, "lte_exit": lte["exit"], "lte_clients_report_accelerator_peak": on_gpu,
            "lte_client_peak_gib": max((c.get("accelerator_peak_bytes", 0) for c in clients), default=0) / GiB, "green_exit": green["exit"],
            "stderr_tail": (lte["stderr_tail"] if lte["exit"] else "") + (green["stderr_tail"] if green["exit"] else "")}


def check_memory(device: str, tmp: Path) -> dict:
    """Estimated vs measured peak of one step, a random-init ~1B Llama (bf16, batch 8, sequence 256)."""
    import torch

    from fedcola import memory

    arms = {"cola-merged-lowrank": lambda s: memory.cola_step(s, mode="merged", kind="low-rank"),
            "cola-merged-lowrank + offload + recompute": lambda s: memory.cola_step(s, mode="merged", kind="low-rank", offload_pairs=True,
                                                                                   recompute=True),
            "peft-lora": memory.lora_step, "full-ft": memory.full_step}
    rows = []
    for name, make in arms.items():
        est = memory.estimate(make(memory.Setup(LLAMA_1B, batch=8, seq=256)))
        row = {"arm": name, "estimated_gib": est.peak_bytes / GiB, "measured_gib": None, "ratio": None}
        if device != "cpu":
            step = make(memory.Setup(LLAMA_1B, batch=8, seq=256, device=device))()
            step()  # warm-up: optimizer state exists, as in the estimate
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            row["measured_gib"] = torch.cuda.max_memory_allocated() / GiB
            row["ratio"] = row["estimated_gib"] / row["measured_gib"]
            del step
            torch.cuda.empty_cache()
        rows.append(row)
    measured = [r for r in rows if r["ratio"] is not None]
    return {"ok": all(abs(r["ratio"] - 1) <= 0.10 for r in measured), "rows": rows, "target": "within 10%"}


CHECKS = {"equivalence": check_equivalence, "lean-and-bf16": check_lean_and_bf16, "cola-simulation": check_cola_simulation,
          "lte-and-green": check_lte_and_green, "memory": check_memory}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    meta = results["meta"]
    lines = ["# fedcola on a GPU (`bash simulations/gpu_check.sh`)", "",
             f"Device: {meta['device_name']} · torch {meta['torch']} · {meta['wall_s']:.0f} s · written {meta['when']}", "",
             "| check | passed | seconds | figures |", "|---|---|---|---|"]
    for name, r in results["checks"].items():
        figures = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items() if k not in ("ok", "seconds", "rows", "error", "stderr_tail")}
        lines.append(f"| {name} | {'yes' if r['ok'] else '**no**'} | {r['seconds']:.0f} | {json.dumps(figures, default=str)[:400]} |")
    memory = results["checks"].get("memory", {})
    if memory.get("rows"):
        lines += ["", "## Peak memory of one step, random-init Llama ~1.1B (bf16, batch 8, sequence 256)", "",
                  "| step | estimated GiB | measured GiB (`max_memory_allocated`) | estimate / measured |", "|---|---|---|---|"]
        for r in memory["rows"]:
            measured = "-" if r["measured_gib"] is None else f"{r['measured_gib']:.2f}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
            lines.append(f"| {r['arm']} | {r['estimated_gib']:.2f} | {measured} | {ratio} |")
    for name, r in results["checks"].items():
        if r.get("error"):
            lines += ["", f"### {name} failed", "", "```", r["error"][-1500:], "```"]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run without a GPU)")
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), help="run only these checks")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu_check")
    args = parser.parse_args(argv)
    import torch
    from rich.progress import Progress

    if args.device != "cpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    results = {"checks": {}, "meta": {"device": args.device, "torch": torch.__version__, "python": platform.python_version(),
                                      "device_name": torch.cuda.get_device_name() if args.device != "cpu" else platform.processor() or "cpu",
                                      "when": time.strftime("%Y-%m-%d %H:%M:%S")}}
    names = args.only or list(CHECKS)
    with tempfile.TemporaryDirectory() as tmp, Progress() as progress:
        task = progress.add_task("gpu check", total=len(names))
        for name in names:
            progress.update(task, description=name)
            start = time.time()
            try:
                result = CHECKS[name](args.device, Path(tmp))
            except Exception:  # a failing check is a result, and the next one still runs
                result = {"ok": False, "error": traceback.format_exc()}
            result["seconds"] = time.time() - start
            results["checks"][name] = result
            progress.advance(task)
    results["meta"]["wall_s"] = time.time() - t0
    out = args.out if args.device != "cpu" else Path(tempfile.mkdtemp(prefix="gpu_check_dry_"))
    write(results, out)
    failed = [n for n, r in results["checks"].items() if not r["ok"]]
    print(f"gpu_check: {len(names) - len(failed)} of {len(names)} checks passed ({', '.join(failed) or 'none failed'}); {out / 'README.md'}")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
