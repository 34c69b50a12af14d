"""ColA's traffic per wire mode against FedAvg-LoRA's, on the demo's config (issue: ColA traffic).

    .venv/bin/python -m simulations.cola_traffic [--out docs/cola] [--rounds 3]

Every arm is one ``fedcola run`` (Flower's simulation engine, 4 clients, the same seeds), in this order:
FedAvg-LoRA (``simulations/fedavg_lora_minilm.toml``), then ColA (``simulations/cola_minilm_rt.toml``)
with the pairs in fp32 and in fp16 (every layer's input sent), the pairs with shared inputs sent once,
``auto`` (per layer the smaller of the pairs and the gradient, the gradient here), each with the clients'
replies in fp32, then ``auto`` with the replies' changes in fp16 (the demo's default) and int8 pairs. Per arm, from its ledger: bytes per client per round (up + down, every message of the
round: queries, train messages and replies, evaluation), the final server-side validation accuracy,
the server's compute per round (hidden pairs, the gradients it forms, client-side evaluation) and the
FLOPs and time of the gradients it forms. Writes ``traffic.json``, ``traffic.md`` and ``traffic.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedcola.fl import ledger

ROOT = Path(__file__).resolve().parents[1]
COLA, FEDAVG = "simulations/cola_minilm_rt.toml", "simulations/fedavg_lora_minilm.toml"
UP32 = {"cola.upload-dtype": "fp32"}  # a train reply's change in fp32: the bytes of the whole fp32 models it replaced
ARMS = {  # label: (config, overrides)
    "FedAvg-LoRA": (FEDAVG, {}),
    "pairs fp32": (COLA, {"cola.wire": "pairs", "cola.wire-dtype": "fp32", "cola.share-inputs": False} | UP32),
    "pairs fp16": (COLA, {"cola.wire": "pairs", "cola.share-inputs": False} | UP32),
    "shared inputs once (fp16)": (COLA, {"cola.wire": "pairs"} | UP32),
    "auto: gradients (fp16)": (COLA, {"cola.wire": "auto"} | UP32),
    "auto + fp16 changes up": (COLA, {"cola.wire": "auto", "cola.upload-dtype": "fp16"}),
    "int8 pairs": (COLA, {"cola.wire": "pairs", "cola.wire-dtype": "int8"}),
}


def _toml(value) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def run(config: str, overrides: dict, run_dir: Path) -> dict:
    sets = [arg for k, v in overrides.items() for arg in ("--set", f"{k}={_toml(v)}")]
    subprocess.run([sys.executable, "-m", "fedcola.cli", "run", config, *sets, "--run-dir", str(run_dir)], cwd=ROOT, check=True,
                   capture_output=True, timeout=3600)
    return ledger.load(run_dir / "ledger.json")


def figures(result: dict) -> dict:
    """Means over the rounds >= 1: bytes per client per round, server compute and the gradients it formed; final accuracy."""
    rounds = result["rounds"][1:]
    per_client = [(c["bytes_up"] + c["bytes_down"]) for r in rounds for c in r["clients"]]
    server = [r["server"] for r in rounds]
    mean = lambda key: sum(s.get(key, 0) for s in server) / len(server)  # noqa: E731
    evals = [r["server"] for r in rounds if "accuracy" in r["server"]]
    return {"bytes_per_client_round": sum(per_client) / len(per_client), "accuracy": evals[-1]["accuracy"] if evals else None,
            "loss": evals[-1].get("loss") if evals else None, "compute_s": mean("compute_s"), "payload_s": mean("payload_s"),
            "payload_flops": mean("payload_flops"), "server_flops": mean("flops"), "grads_layers": mean("grads_layers"),
            "pairs_layers": mean("pairs_layers"), "shared_inputs": mean("shared_inputs"), "wall_time_s": sum(r["wall_time_s"] for r in rounds) / len(rounds)}


def int8_gradient_error(seeds: int = 5) -> dict:
    """The relative error ||g_int8 - g|| / ||g|| of each auxiliary model's gradient (Prop. 1 VJP) when its
    pairs travel as int8 instead of fp32: the demo's model, targets and batches, low-rank models with B
    drawn N(0, 0.02) (at peft's B = 0 init dA would be 0), ``seeds`` roundings; median and max over
    layers, parameters and seeds."""
    import torch

    from fedcola import config as cfg, runtime, specs
    from fedcola.cola.gl import vjp_grads
    from fedcola.cola.server import ColaServer
    from fedcola.fl import wire

    config = cfg.load(ROOT / COLA)
    server = ColaServer(runtime.base_model(config), specs.cola_targets(config), "merged")
    adapters = specs.adapter_spec(config).build({n: d for n, d in specs.layer_dims(config).items()}, seed=0)
    torch.manual_seed(0)
    for a in adapters.values():
        torch.nn.init.normal_(a.B, std=0.02)
    part = runtime.client_split(config | {runtime.DATA_PATH: ""}, 0, config["num-clients"])
    batch = next(iter(runtime.loader(config, part, shuffle=True, seed=0)))
    pairs = server.hidden_grads({0: batch}, {0: adapters}).pairs[0]
    errors = []
    for seed in range(seeds):
        packed = wire.pack({f"{n}/{k}": t for n, (x, G) in pairs.items() for k, t in (("x", x), ("G", G))}, "int8", torch.Generator().manual_seed(seed))
        back = wire.unpack(packed, "int8")
        for n, a in adapters.items():
            exact, approx = vjp_grads(a, *pairs[n]), vjp_grads(a, back[f"{n}/x"], back[f"{n}/G"])
            errors += [float((approx[k] - exact[k]).norm() / exact[k].norm()) for k in exact]
    errors.sort()
    return {"median": errors[len(errors) // 2], "max": errors[-1], "count": len(errors)}


def write_markdown(rows: dict, meta: dict, path: Path) -> None:
    base = rows["FedAvg-LoRA"]["bytes_per_client_round"]
    ref = rows["shared inputs once (fp16)"]
    lines = ["# ColA traffic per wire mode, against FedAvg-LoRA", "",
             f"Measured {meta['date']} on a 2-core machine ({meta['platform']}), `python -m simulations.cola_traffic`, "
             f"{meta['rounds']} rounds of 4 clients, the same seeds in every arm; means over rounds >= 1 (ledger)."
             + "".join(f" Re-measured later, side by side: {', '.join(arms)}." for arms in meta.get("re-measured", [])), "",
             "| arm | MiB / client / round | x FedAvg-LoRA | accuracy | server compute / round (s) | x pairs | gradients formed: GFLOPs / round, s / round |",
             "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        cola = label != "FedAvg-LoRA"
        lines.append(f"| {label} | {r['bytes_per_client_round'] / 2**20:.2f} | {r['bytes_per_client_round'] / base:.2f} | {acc} | "
                     + (f"{r['compute_s']:.2f} | {r['compute_s'] / ref['compute_s']:.3f} | {r['payload_flops'] / 1e9:.3f}, {r['payload_s']:.3f} |"
                        if cola else "- | - | - |"))
    lines += ["", "Configs: " + "; ".join(f"{label}: `{c}` with {o}" for label, (c, o) in ARMS.items()), "",
              "- Bytes: every message of a round, up and down, as the ledger counts them (`.npy` payloads of the ArrayRecords).",
              "- Accuracy: the server's validation accuracy after the last round (`eval.max-examples` examples).",
              "- Server compute: the ledger's `compute_s` (hidden pairs, the gradients the server forms, client-side evaluation);",
              "  `x pairs` is its ratio to the shared-inputs pairs arm (the default before gradients travelled), run in the same session.",
              "- Up: a merged-mode train reply is the change of the client's auxiliary models in `cola.upload-dtype` (fp32 in the",
              "  arms above `auto + fp16 changes up`: the bytes of the whole fp32 models it replaced; fp16 from that arm on, the default).",
              "- Gradients formed: `payload_flops` (FlopCounterMode) and `payload_s` per round; `auto` sends a layer's gradient",
              "  where it is smaller than its pairs (every layer here: r (d_in + d_out) against T (d_in + d_out) numbers).",
              "- int8 pairs (per-row scale, stochastic rounding): relative error of an auxiliary model's gradient against fp32 pairs,",
              f"  median {meta['int8_error']['median']:.2%}, max {meta['int8_error']['max']:.2%} over {meta['int8_error']['count']} "
              "(layer, parameter, rounding seed) on the demo's first batch (`int8_gradient_error`).", ""]
    path.write_text("\n".join(lines))


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    labels = list(rows)
    values = [rows[k]["bytes_per_client_round"] / 2**20 for k in labels]
    bars = ax.bar(range(len(labels)), values, color=["tab:gray"] + ["tab:blue"] * (len(labels) - 1))
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), [k.replace(", ", "\n").replace(" (", "\n(").replace(": ", ":\n").replace(" + ", "\n+ ") for k in labels], fontsize=7)
    ax.set_ylabel("MiB per client per round")
    for bar, label in zip(bars, labels):
        acc = rows[label]["accuracy"]
        ax.annotate(f"acc {acc:.3f}" if acc is not None else "", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/cola")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--report-only", action="store_true", help="rewrite traffic.md / traffic.png from <out>/traffic.json")
    ap.add_argument("--arms", default="", help="comma-separated arms to re-measure, merged into <out>/traffic.json (default: all)")
    args = ap.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads((out / "traffic.json").read_text())
        return report(saved["meta"], saved["arms"], out)
    from rich.progress import Progress

    chosen = [a.strip() for a in args.arms.split(",") if a.strip()] or list(ARMS)
    saved = json.loads((out / "traffic.json").read_text()) if args.arms else {"meta": {}, "arms": {}}
    rows = saved["arms"]
    with tempfile.TemporaryDirectory() as tmp, Progress() as progress:
        task = progress.add_task("traffic", total=len(chosen))
        for i, (label, (config, overrides)) in enumerate((a, ARMS[a]) for a in chosen):
            rows[label] = figures(run(config, overrides | {"rounds": args.rounds}, Path(tmp) / str(i)))
            progress.update(task, advance=1, description=f"{label}: {rows[label]['bytes_per_client_round'] / 2**20:.1f} MiB")
    meta = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(), "rounds": args.rounds}
    meta["int8_error"] = saved["meta"]["int8_error"] if args.arms else int8_gradient_error()
    meta["re-measured"] = saved["meta"].get("re-measured", []) + ([chosen] if args.arms else [])
    report(meta, {a: rows[a] for a in ARMS}, out)


def report(meta: dict, rows: dict, out: Path) -> None:
    (out / "traffic.json").write_text(json.dumps({"meta": meta, "arms": rows}, indent=1))
    write_markdown(rows, meta, out / "traffic.md")
    plot(rows, out / "traffic.png")
    print((out / "traffic.md").read_text())


if __name__ == "__main__":
    main()
