"""Round latency in a real deployment vs in simulation, for the same short ColA and LTE configs.

    .venv/bin/python -m simulations.deploy_bench [--out docs/deploy] [--rounds 2] [--repeats 1]

Arms, interleaved per method and repeat (simulation, deployment, floor, warm deployment, warm floor):
  * simulation: ``fedcola run`` (Flower's simulation engine, one Ray actor per client, in one process);
  * deployment: a SuperLink and one SuperNode per client as separate processes on loopback
    (``fedcola.loopback``, plain HTTP), the run submitted with ``flwr run``;
  * floor: the no-op app ``simulations/noop_app`` (its ClientApp imports only flwr) on the same kind of
    deployment, exchanging messages of the sizes the method's deployment just moved (per client and
    exchange, down and up) as often per round: Flower's own cost of an exchange, the physical limit;
  * warm deployment, warm floor: the same with SuperNodes in process isolation and ``fedcola-superexec``
    (``fedcola.warm``: each message's process forked from one that imported its libraries once).
Per round r >= 1 the ledger gives the round's wall time L (server: sending, waiting, aggregating,
evaluating), the server's own compute S (``eval_s``: server-side evaluation, plus for ColA
``compute_s``: hidden pairs and client-side evaluation) and each client's handler wall time
(``wall-time-s``: its compute, measured inside the ClientApp). Clients run in parallel, so their
compute on the round's critical path is the largest client's, C = max_k wall_time_k. "Ours" is
(S + C) / L: the work fedcola's code does; the rest of the round is Flower's (message transport, in
deployment a fresh ``flwr-clientapp`` process per message and the grid's reply polling), plus our
(de)serialisation, which runs inside neither timer. The table also gives, for the deployment, the
share of its round latency that simulation does not have, (L_dep - L_sim) / L_dep.
Per exchange: ColA's deployed round / its exchanges; LTE's deployed round less its clients' training
(the largest ``wall-time-s``) per exchange; the floor's mean exchange; each over the floor's.
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
NOOP_APP = ROOT / "simulations" / "noop_app"
WAIT_POLL_S = 10.0  # `flwr list` to see whether a run finished: one process start per poll, kept rare (the rounds are timed inside)
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


def run_deployment(method: str, overrides: dict, root: Path, num_clients: int, warm: bool = False) -> dict:
    path, _ = CONFIGS[method]
    keys = cfg.flatten(tomllib.loads((ROOT / path).read_text())) | overrides | {"out-dir": str(root / "runs")}
    fed = loopback.Loopback(root).start()
    try:
        for i in range(num_clients):
            fed.add_node(f"node{i}", {"partition-id": i, "num-partitions": num_clients}, warm=warm)
        run_id = fed.submit(ROOT, " ".join(f"{k}={_toml(v)}" for k, v in keys.items()))
        status = fed.wait(run_id, timeout=3600, poll=WAIT_POLL_S)
        if status != "finished:completed":
            raise RuntimeError(f"deployment run {run_id}: {status}\n{fed.log('superlink')[-3000:]}")
    finally:
        fed.stop()
    (ledger_file,) = list((root / "runs").rglob("ledger.json"))
    return ledger.load(ledger_file)


def run_floor(root: Path, num_clients: int, rounds: int, exchanges: int, down: int, up: int, warm: bool = False) -> list[dict]:
    """The no-op app on a fresh loopback deployment: per round, its exchanges' wall times."""
    fed = loopback.Loopback(root).start()
    try:
        for i in range(num_clients):
            fed.add_node(f"node{i}", {"partition-id": i, "num-partitions": num_clients}, warm=warm)
        out = root / "floor.json"
        run_id = fed.submit(NOOP_APP, f'rounds={rounds} exchanges={exchanges} down-bytes={down} up-bytes={up} nodes={num_clients} out="{out}"')
        status = fed.wait(run_id, timeout=1800, poll=WAIT_POLL_S)
        if status != "finished:completed":
            raise RuntimeError(f"no-op run {run_id}: {status}\n{fed.log('superlink')[-3000:]}")
    finally:
        fed.stop()
    rounds_out = json.loads(out.read_text())["rounds"]
    return [{"round": r["round"], "latency_s": r["wall_time_s"], "exchange_s": sum(r["exchange_s"]) / len(r["exchange_s"]),
             "client_compute_s": 0.0, "server_compute_s": 0.0, "clients": num_clients} for r in rounds_out[1:]]


def round_figures(result: dict) -> list[dict]:
    """Per round >= 1: latency L, the critical-path client compute C, the number of clients and the bytes
    one client moved (mean over clients, down and up)."""
    out = []
    for rnd in result["rounds"][1:]:
        compute = max(c["wall_time_s"] for c in rnd["clients"])
        server = rnd["server"].get("compute_s", 0.0) + rnd["server"].get("eval_s", 0.0)
        clients = rnd["clients"]
        out.append({"round": rnd["round"], "latency_s": rnd["wall_time_s"], "client_compute_s": compute, "server_compute_s": server,
                    "clients": len(clients), "bytes_down": sum(c["bytes_down"] for c in clients) / len(clients),
                    "bytes_up": sum(c["bytes_up"] for c in clients) / len(clients)})
    return out


def exchange_s(method: str, figures: dict) -> float:
    """One deployed exchange: the round over its exchanges, LTE's net of its clients' training."""
    net = figures["latency_s"] - (figures["client_compute_s"] if method == "lte" else 0.0)
    return net / exchanges_per_round(method)


def exchanges_per_round(method: str) -> int:
    """Server -> clients -> server message exchanges in a round after the first: ColA one train message
    per interval (it also fetches the next interval's batches) plus the evaluation query, LTE one."""
    overrides = CONFIGS[method][1]
    return overrides["local-steps"] + 1 if method == "cola" else 1


def ours_share(figures: dict) -> float:
    """(server compute + critical-path client compute) / round latency: fedcola's own share of a round."""
    return (figures["client_compute_s"] + figures["server_compute_s"]) / figures["latency_s"]


ARMS = ("simulation", "deployment", "floor", "warm deployment", "warm floor")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(results: list[dict]) -> list[dict]:
    """Per method and arm: the last round (mean over repeats); per exchange and the ratios."""
    rows = []
    for method in CONFIGS:
        last = {arm: [r["rounds"][-1] for r in results if r["method"] == method and r["arm"] == arm] for arm in ARMS}
        if not all(last.values()):
            continue
        latency = {arm: _mean([x["latency_s"] for x in last[arm]]) for arm in ARMS}
        exchange = {arm: _mean([x["exchange_s"] if "floor" in arm else exchange_s(method, x) for x in last[arm]]) for arm in ARMS}
        sim, dep, warm = (last[a][0] | {"latency_s": latency[a], "client_compute_s": _mean([x["client_compute_s"] for x in last[a]]),
                                         "server_compute_s": _mean([x["server_compute_s"] for x in last[a]])}
                          for a in ("simulation", "deployment", "warm deployment"))
        rows.append({
            "method": method, "exchanges_per_round": exchanges_per_round(method), "latency_s": latency, "exchange_s": exchange,
            "cold_over_floor": exchange["deployment"] / exchange["floor"], "warm_over_floor": exchange["warm deployment"] / exchange["floor"],
            "warm_over_warm_floor": exchange["warm deployment"] / exchange["warm floor"],
            "cold_over_sim": dep["latency_s"] / sim["latency_s"], "warm_over_sim": warm["latency_s"] / sim["latency_s"],
            "ours_share": {"simulation": ours_share(sim), "deployment": ours_share(dep), "warm deployment": ours_share(warm)},
        })
    return rows


def write_markdown(rows: list[dict], meta: dict, path: Path) -> None:
    lines = [
        "# Deployed rounds vs Flower's floor and vs simulation", "",
        f"Measured {meta['date']} on a 2-core machine ({meta['platform']}), flwr {meta['flwr']}, "
        f"{meta['num_clients']} clients, {meta['rounds']} rounds, last round shown, mean of {meta['repeats']} run(s) per arm, arms interleaved "
        f"({', '.join(ARMS)}, per method and repeat).",
        f"1/5/15-min load average {_loads(meta)}. {meta.get('note', '')} Absolute seconds move with the machine's load; "
        "ratios measured in one session much less.", "",
        "**Per message exchange** (server -> every client -> server), seconds:", "",
        "| method | floor | fedcola | fedcola / floor | warm floor | fedcola, warm | fedcola, warm / floor | fedcola, warm / warm floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r["exchange_s"]
        lines.append(f"| {r['method']} | {e['floor']:.2f} | {e['deployment']:.2f} | {r['cold_over_floor']:.2f} | {e['warm floor']:.2f} | "
                     f"{e['warm deployment']:.2f} | **{r['warm_over_floor']:.2f}** | {r['warm_over_warm_floor']:.2f} |")
    lines += ["", "**Per round**, seconds:", "",
              "| method | simulation | deployment | deployment / sim | warm deployment | warm / sim | ours: sim, deploy, warm | exchanges / round |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat, ours = r["latency_s"], r["ours_share"]
        lines.append(f"| {r['method']} | {lat['simulation']:.1f} | {lat['deployment']:.1f} | {r['cold_over_sim']:.1f} | {lat['warm deployment']:.1f} | "
                     f"**{r['warm_over_sim']:.1f}** | {ours['simulation']:.0%}, {ours['deployment']:.0%}, {ours['warm deployment']:.0%} | "
                     f"{r['exchanges_per_round']} |")
    lines += ["", "Configs: " + "; ".join(f"{m}: `{p}` with {o}" for m, (p, o) in CONFIGS.items()), "",
              "- **floor**: the no-op app `simulations/noop_app` (its ClientApp imports only flwr and replies with as many bytes as it is",
              "  asked for) on the same loopback deployment (same SuperLink / SuperNode settings, the same 50 ms reply polling),",
              "  exchanging the bytes per client that the method's deployment moved per exchange: Flower's own cost of an exchange.",
              "- **fedcola**: the method's deployed round / its exchanges per round (ColA: one train message per interval, which also",
              "  fetches the next interval's batches, plus the evaluation query; LTE: one), LTE's net of its clients' training (the",
              "  largest handler wall time).",
              "- **warm**: SuperNodes in process isolation with `fedcola-superexec` (`fedcola/warm.py`): Flower's SuperExec, each",
              "  message's ClientApp process forked from one that imported torch (and the other libraries) once.",
              "- **ours** = (server compute + the largest client's handler wall time) / round latency; the rest is Flower's",
              "  (transport, process starts, the SuperNode's fixed 3 s wait between pulls when it has no message, its 0.5 s",
              "  reply polling) and our (de)serialisation. See docs/deploy.md, section 9.", ""]
    path.write_text("\n".join(lines))


def _loads(meta: dict) -> str:
    at = [(k, meta[f"load_average_at_{k}"]) for k in ("start", "end") if f"load_average_at_{k}" in meta]
    return " and ".join(f"at the {k}: {', '.join(f'{x:.1f}' for x in v)}" for k, v in at) or "not recorded"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    arms = ("floor", "deployment", "warm floor", "warm deployment")
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        ax.bar([j + i * width for j in range(len(rows))], [r["exchange_s"][arm] for r in rows], width,
               label=arm.replace("deployment", "fedcola"))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["method"] for r in rows])
    ax.set_ylabel("seconds per exchange")
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
    jobs = [(m, arm) for _ in range(args.repeats) for m in args.methods.split(",") for arm in ARMS]
    with tempfile.TemporaryDirectory() as tmp, Progress() as progress:
        task = progress.add_task("deploy bench", total=len(jobs))
        for i, (method, arm) in enumerate(jobs):
            overrides = CONFIGS[method][1] | {"rounds": args.rounds, "num-clients": args.clients}
            root = Path(tmp) / f"{i}-{method}-{arm}"
            t0 = time.perf_counter()
            warm = arm.startswith("warm")
            if arm.endswith("floor"):  # the sizes the method's last deployment moved per client and exchange
                last, k = [r for r in results if r["method"] == method and r["arm"].endswith("deployment")][-1]["rounds"][-1], exchanges_per_round(method)
                figures = run_floor(root, args.clients, args.rounds, k, int(last["bytes_down"] / k), int(last["bytes_up"] / k), warm)
            elif arm == "simulation":
                figures = round_figures(run_simulation(method, overrides, root))
            else:
                figures = round_figures(run_deployment(method, overrides, root, args.clients, warm))
            results.append({"method": method, "arm": arm, "total_s": time.perf_counter() - t0, "rounds": figures})
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
