"""Round latency in a real deployment vs in simulation, for the same short ColA and LTE configs.

    .venv/bin/python -m simulations.deploy_bench [--out docs/deploy] [--rounds 2] [--repeats 1]

Arms, interleaved per method (simulation, deployment, simulation, ...):
  * simulation: ``fedcola run`` (Flower's simulation engine, one Ray actor per client, in one process);
  * deployment: a SuperLink and one SuperNode per client as separate processes on loopback
    (``fedcola.loopback``, plain HTTP), the run submitted with ``flwr run``.
Per round r >= 1 the ledger gives the round's wall time L (server: sending, waiting, aggregating,
evaluating), the server's own compute S (``eval_s``: server-side evaluation, plus for ColA
``compute_s``: hidden pairs and client-side evaluation) and each client's handler wall time
(``wall-time-s``: its compute, measured inside the ClientApp). Clients run in parallel, so their
compute on the round's critical path is the largest client's, C = max_k wall_time_k. "Ours" is
(S + C) / L: the work fedcola's code does; the rest of the round is Flower's (message transport, in
deployment a fresh ``flwr-clientapp`` process per message and the grid's reply polling), plus our
(de)serialisation, which runs inside neither timer. The table also gives, for the deployment, the
share of its round latency that simulation does not have, (L_dep - L_sim) / L_dep.
Round 1 includes first contact (adapters, full sync); the table reports the last round.
The load average is recorded before the first arm and at the end (``--note`` adds what else ran):
absolute seconds move with the machine's load, ratios measured in one session much less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from fedcola import config as cfg
from fedcola import loopback
from fedcola.fl import ledger

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # the same short configs in both arms
    "cola": ("simulations/cola_minilm_rt.toml", {"local-steps": 2, "batch-size": 8, "eval.max-examples": 64, "eval.client-max-examples": 16, "data.max-length": 32}),
    "lte": ("simulations/lte_gpt_hamlet.toml", {"local-steps": 10, "eval.max-examples": 64}),
}


def _toml(value) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def run_simulation(method: str, overrides: dict, run_dir: Path) -> dict:
    path, _ = CONFIGS[method]
    sets = [arg for k, v in overrides.items() for arg in ("--set", f"{k}={_toml(v)}")]
    subprocess.run([sys.executable, "-m", "fedcola.cli", "run", path, *sets, "--run-dir", str(run_dir)], cwd=ROOT, check=True,
                   capture_output=True, timeout=3600)
    return ledger.load(run_dir / "ledger.json")


def run_deployment(method: str, overrides: dict, root: Path, num_clients: int) -> dict:
    path, _ = CONFIGS[method]
    keys = cfg.flatten(tomllib.loads((ROOT / path).read_text())) | overrides | {"out-dir": str(root / "runs")}
    fed = loopback.Loopback(root).start()
    try:
        for i in range(num_clients):
            fed.add_node(f"node{i}", {"partition-id": i, "num-partitions": num_clients})
        run_id = fed.submit(ROOT, " ".join(f"{k}={_toml(v)}" for k, v in keys.items()))
        status = fed.wait(run_id, timeout=3600)
        if status != "finished:completed":
            raise RuntimeError(f"deployment run {run_id}: {status}\n{fed.log('superlink')[-3000:]}")
    finally:
        fed.stop()
    (ledger_file,) = list((root / "runs").rglob("ledger.json"))
    return ledger.load(ledger_file)


def round_figures(result: dict) -> list[dict]:
    """Per round >= 1: latency L, the critical-path client compute C, and the number of clients."""
    out = []
    for rnd in result["rounds"][1:]:
        compute = max(c["wall_time_s"] for c in rnd["clients"])
        server = rnd["server"].get("compute_s", 0.0) + rnd["server"].get("eval_s", 0.0)
        out.append({"round": rnd["round"], "latency_s": rnd["wall_time_s"], "client_compute_s": compute, "server_compute_s": server,
                    "clients": len(rnd["clients"])})
    return out


def exchanges_per_round(method: str) -> int:
    """Server -> clients -> server message exchanges in a round after the first: ColA one train message
    per interval (it also fetches the next interval's batches) plus the evaluation query, LTE one."""
    overrides = CONFIGS[method][1]
    return overrides["local-steps"] + 1 if method == "cola" else 1


def ours_share(figures: dict) -> float:
    """(server compute + critical-path client compute) / round latency: fedcola's own share of a round."""
    return (figures["client_compute_s"] + figures["server_compute_s"]) / figures["latency_s"]


def summarize(results: list[dict]) -> list[dict]:
    """Per method: the last round of each arm (mean over repeats) and the ratios."""
    rows = []
    for method in CONFIGS:
        arms = {}
        for arm in ("simulation", "deployment"):
            last = [r["rounds"][-1] for r in results if r["method"] == method and r["arm"] == arm]
            if last:
                arms[arm] = {k: sum(x.get(k, 0.0) for x in last) / len(last) for k in ("latency_s", "client_compute_s", "server_compute_s")}
        if len(arms) < 2:
            continue
        sim, dep = arms["simulation"], arms["deployment"]
        ours = [ours_share(r["rounds"][-1]) for r in results if r["method"] == method and r["arm"] == "deployment"]
        rows.append({
            "method": method, "sim_latency_s": sim["latency_s"], "dep_latency_s": dep["latency_s"],
            "dep_over_sim": dep["latency_s"] / sim["latency_s"],
            "sim_compute_share": sim["client_compute_s"] / sim["latency_s"],
            "dep_compute_share": dep["client_compute_s"] / dep["latency_s"],
            "sim_ours_share": ours_share(sim),
            "dep_ours_share": ours_share(dep),
            "dep_ours_share_per_run": ours,
            "dep_messaging_share": (dep["latency_s"] - sim["latency_s"]) / dep["latency_s"],
            "exchanges_per_round": exchanges_per_round(method),
            "added_s_per_exchange": (dep["latency_s"] - sim["latency_s"]) / exchanges_per_round(method),
        })
    return rows


def write_markdown(rows: list[dict], meta: dict, path: Path) -> None:
    lines = [
        "# Deployment vs simulation: round latency", "",
        f"Measured {meta['date']} on a 2-core machine ({meta['platform']}), flwr {meta['flwr']}, "
        f"{meta['num_clients']} clients, {meta['rounds']} rounds, last round shown, mean of {meta['repeats']} run(s) per arm, arms interleaved.",
        f"1/5/15-min load average {_loads(meta)}. {meta.get('note', '')} Absolute seconds move with the machine's load; "
        "ratios measured in one session much less.", "",
        "| method | sim round (s) | deploy round (s) | deploy / sim | ours, sim | ours, deploy | client compute, deploy | deployment-only share | exchanges / round | added s / exchange |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['sim_latency_s']:.1f} | {r['dep_latency_s']:.1f} | {r['dep_over_sim']:.2f} | "
                     f"{r['sim_ours_share']:.1%} | {r['dep_ours_share']:.1%} | {r['dep_compute_share']:.1%} | {r['dep_messaging_share']:.1%} | "
                     f"{r['exchanges_per_round']} | {r['added_s_per_exchange']:.0f} |")
    lines += ["", "Ours in the deployment, per run: " + "; ".join(f"{r['method']} " + ", ".join(f"{x:.1%}" for x in r.get("dep_ours_share_per_run", []))
                                                          for r in rows)]
    lines += ["", "Configs: " + "; ".join(f"{m}: `{p}` with {o}" for m, (p, o) in CONFIGS.items()), "",
              "Ours = (server compute + the largest client's handler wall time) / round latency, server compute being",
              "the ledger's `eval_s` (+ ColA's `compute_s`: hidden pairs and client-side evaluation); the rest is Flower's.",
              "Deployment-only share = (deploy round - sim round) / deploy round: what deployment adds (a fresh",
              "`flwr-clientapp` process per message, HTTP transport, reply polling). Added s / exchange = (deploy round -",
              "sim round) / message exchanges per round (ColA: one train message per interval, which also fetches the",
              "next interval's batches, plus the evaluation query). See docs/deploy.md, section 9.", ""]
    path.write_text("\n".join(lines))


def _loads(meta: dict) -> str:
    at = [(k, meta[f"load_average_at_{k}"]) for k in ("start", "end") if f"load_average_at_{k}" in meta]
    return " and ".join(f"at the {k}: {', '.join(f'{x:.1f}' for x in v)}" for k, v in at) or "not recorded"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels, compute, rest = [], [], []
    for r in rows:
        for arm, key, share in (("sim", "sim_latency_s", "sim_compute_share"), ("deploy", "dep_latency_s", "dep_compute_share")):
            labels.append(f"{r['method']}\n{arm}")
            compute.append(r[key] * r[share])
            rest.append(r[key] * (1 - r[share]))
    ax.bar(labels, compute, label="client compute (critical path)")
    ax.bar(labels, rest, bottom=compute, label="server + messaging")
    ax.set_ylabel("round latency (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/deploy")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--methods", default=",".join(CONFIGS), help="comma-separated methods to measure (default: all)")
    ap.add_argument("--note", default="", help="what else ran on the machine, for the report")
    ap.add_argument("--report-only", action="store_true", help="rewrite README.md / latency.png from <out>/results.json")
    args = ap.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        return report(saved["meta"] | ({"note": args.note} if args.note else {}), saved["runs"], out)
    import flwr
    from rich.progress import Progress

    load_at_start = os.getloadavg()
    results = []
    jobs = [(m, arm) for _ in range(args.repeats) for m in args.methods.split(",") for arm in ("simulation", "deployment")]
    with tempfile.TemporaryDirectory() as tmp, Progress() as progress:
        task = progress.add_task("deploy bench", total=len(jobs))
        for i, (method, arm) in enumerate(jobs):
            overrides = CONFIGS[method][1] | {"rounds": args.rounds, "num-clients": args.clients}
            root = Path(tmp) / f"{i}-{method}-{arm}"
            t0 = time.perf_counter()
            result = run_simulation(method, overrides, root) if arm == "simulation" else run_deployment(method, overrides, root, args.clients)
            results.append({"method": method, "arm": arm, "total_s": time.perf_counter() - t0, "rounds": round_figures(result)})
            progress.update(task, advance=1, description=f"{method} {arm}: {results[-1]['rounds'][-1]['latency_s']:.1f} s/round")
    meta = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(), "flwr": flwr.__version__, "num_clients": args.clients,
            "rounds": args.rounds, "repeats": args.repeats, "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
            "note": args.note}
    report(meta, results, out)


def report(meta: dict, results: list[dict], out: Path) -> None:
    rows = summarize(results)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": results, "summary": rows}, indent=1))
    write_markdown(rows, meta, out / "README.md")
    plot(rows, out / "latency.png")
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
