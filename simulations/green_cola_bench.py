"""Green-ColA vs plain ColA (issue 5, ColA integration): server backward FLOPs and accuracy.

Both arms run ``simulations/cola_minilm_rt.toml`` (MiniLM + rotten_tomatoes, 4 iid clients, merged
low-rank auxiliary models on query/value/classifier, 3 rounds x 20 intervals) as real Flower
simulations (``fedcola run``, one fresh process per run), with the same seeds; Green-ColA adds
``cola.green-rho`` (default 0.5, re-selected every round: the first interval of each round is a
probe with every layer). The arms are interleaved per seed, so both see the same machine load.
Everything is read back from the runs' ledgers: server backward FLOPs and forward FLOPs as counted
by FlopCounterMode in ``ColaServer.hidden_grads``, bytes sent to clients, validation accuracy on the
first 1000 validation examples, and Green-ColA's selection per round.

Run: ``python -m simulations.green_cola_bench [--seeds 0,1 --rho 0.5]``; writes
``docs/green/green_cola.{json,md,png}`` after every run (``--report-only``: from the completed
ledgers alone, starting no run). Each run's directory is
``runs/green_cola_bench/<arm>-seed<s>``; a completed ledger found there is read instead of running
again, so runs can also be started by hand (e.g. both arms of a seed at once) with the same command
line as `run` uses.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from fedcola.fl.ledger import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TOML = "simulations/cola_minilm_rt.toml"
TARGET_CUT, TARGET_POINTS = 0.40, 1.0


def run(seed: int, rho: float, runs_dir: Path, report_only: bool = False) -> dict | None:
    """One Flower simulation (or its completed ledger from an earlier call); the figures of its ledger.
    With `report_only`, an unfinished ledger is read as it is (its rounds so far), a missing one is None."""
    run_dir = runs_dir / f"{arm_name(rho)}-seed{seed}"
    path = run_dir / "ledger.json"
    if not (path.exists() and json.loads(path.read_text())["status"] == "completed"):
        if report_only:
            return None if not path.exists() else _figures(json.loads(path.read_text()), seed, rho)
        args = [sys.executable, "-m", "fedcola.cli", "run", TOML, "--run-dir", str(run_dir), "--set", f"seed={seed}", "--set", f"cola.green-rho={rho}"]
        subprocess.run(args, cwd=ROOT, check=True)
    return _figures(json.loads(path.read_text()), seed, rho)


def _figures(ledger: dict, seed: int, rho: float) -> dict:
    rounds = [r for r in ledger["rounds"] if r["round"] > 0]
    return {  # per round 1..R (accuracy: 0..R)
        "seed": seed, "rho": rho, "completed": ledger["status"] == "completed", "wall_time_s": sum(r["wall_time_s"] for r in ledger["rounds"]), "intervals_per_round": ledger["config"]["local-steps"],
        "accuracy": [r["server"]["accuracy"] for r in ledger["rounds"]],
        "server_flops": [r["server"]["flops"] for r in rounds],
        "server_backward_flops": [r["server"]["backward_flops"] for r in rounds],
        "bytes_down": [sum(c["bytes_down"] for c in r["clients"]) for r in rounds],
        "skipped": [len(r["skipped"]) for r in rounds],
        "selection": [r["server"].get("green") for r in rounds],
    }


def clean_rounds(*runs: dict) -> int:
    """R: rounds 1..R of every run had no skipped reply (a client lost, e.g. to the OOM killer of a
    shared machine, changes what is trained and computed, so later rounds do not compare)."""
    r = 0
    while r < min(len(run["skipped"]) for run in runs) and all(run["skipped"][r] == 0 for run in runs):
        r += 1
    return r


def short(layer: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``3.query``."""
    return re.sub(r"^.*layer\.(\d+)\..*\.(\w+)$", r"\1.\2", layer)


def arm_name(rho: float) -> str:
    return "plain-cola" if rho == 1.0 else f"green-cola-{rho:g}"


def report(result: dict, out: Path) -> None:
    """JSON + markdown + PNG of the runs so far."""
    runs = result["runs"]
    plain, green = arm_name(1.0), arm_name(result["rho"])
    done = [r for r in runs if r["completed"]]
    pairs = [(p, g) for p in done if p["arm"] == plain for g in done if g["arm"] == green and g["seed"] == p["seed"]]
    lines = [
        "# Green-ColA vs plain ColA (server backward FLOPs, accuracy)", "",
        f"`{TOML}` (MiniLM + rotten_tomatoes, 4 iid clients x batch 16, merged low-rank r=8 on query/value/classifier, "
        "3 rounds x 20 intervals, AdamW lr 2e-3); Green-ColA at rho = "
        f"{result['rho']:g} of the server backward, re-selected every round (the first interval of each round is a probe "
        "with every layer). FLOPs counted by FlopCounterMode on the server; accuracy on the first 1000 validation "
        "examples after each round. Regenerate: `python -m simulations.green_cola_bench`.", "",
        "| seed | arm | accuracy per round | server backward GFLOPs per round | server total GFLOPs per round | MB to clients per round | skipped replies per round | server wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["seed"], r["arm"] != plain)):
        lines.append(f"| {r['seed']} | {r['arm']}{'' if r['completed'] else ' (unfinished)'} | {' / '.join(f'{a:.3f}' for a in r['accuracy'])} | {' / '.join(f'{f / 1e9:.0f}' for f in r['server_backward_flops'])} | "
                     f"{' / '.join(f'{f / 1e9:.0f}' for f in r['server_flops'])} | {' / '.join(f'{b / 1e6:.0f}' for b in r['bytes_down'])} | "
                     f"{' / '.join(map(str, r['skipped']))} | {r['wall_time_s']:.0f} |")
    pairs = [(p, g, clean_rounds(p, g)) for p, g in pairs]
    pairs = [(p, g, n) for p, g, n in pairs if n > 0]
    if pairs:
        cut = [1 - sum(g["server_backward_flops"][:n]) / sum(p["server_backward_flops"][:n]) for p, g, n in pairs]
        drop = [100 * (p["accuracy"][n] - g["accuracy"][n]) for p, g, n in pairs]
        bytes_ratio = [sum(g["bytes_down"][:n]) / sum(p["bytes_down"][:n]) for p, g, n in pairs]
        mean_cut, mean_drop = sum(cut) / len(cut), sum(drop) / len(drop)
        full = all(n == len(p["skipped"]) == len(g["skipped"]) for p, g, n in pairs)
        holds = mean_cut >= TARGET_CUT and mean_drop <= TARGET_POINTS
        result["summary"] = {"clean_rounds": [n for _, _, n in pairs], "backward_cut": cut, "accuracy_drop_points": drop, "bytes_down_ratio": bytes_ratio,
                             "mean_backward_cut": mean_cut, "mean_accuracy_drop_points": mean_drop, "target_holds": holds, "all_rounds_clean": full}
        predicted = [1 - sum(s["probe_intervals"] + (g["intervals_per_round"] - s["probe_intervals"]) * s["backward_fraction"] for s in g["selection"][:n])
                     / (g["intervals_per_round"] * n) for _, g, n in pairs]
        lines += [
            "", f"Paired over {len(pairs)} seed(s), each compared over the rounds in which neither arm lost a reply "
            f"(rounds 1..{', 1..'.join(str(n) for _, _, n in pairs)}; accuracy after the last of them):", "",
            f"- server backward FLOPs cut: {', '.join(f'{100 * c:.1f}%' for c in cut)} (mean {100 * mean_cut:.1f}%; target >= {100 * TARGET_CUT:.0f}%)",
            f"- accuracy loss: {', '.join(f'{d:+.1f}' for d in drop)} points (mean {mean_drop:+.1f}"
            + (f" +- {statistics.stdev(drop) / len(drop) ** 0.5:.1f} standard error" if len(drop) > 1 else "") + f"; target <= {TARGET_POINTS:g} point)",
            f"- predicted by the layer profile (probe intervals at full cost, the others at the selection's profiled fraction): "
            f"{', '.join(f'{100 * c:.1f}%' for c in predicted)}",
            f"- bytes to clients (x, G pairs): {', '.join(f'{b:.2f}x' for b in bytes_ratio)} of plain ColA",
            f"- target (>= {100 * TARGET_CUT:.0f}% cut at <= {TARGET_POINTS:g} point loss, mean over seeds): **{'holds' if holds else 'does not hold'}**"
            + ("" if full else " over the clean rounds only (see the skipped replies above)"),
            "", "Green-ColA's selections (`<block>.<projection>`; made after each round's probe interval):", "",
            *[f"- seed {g['seed']}, round {i + 1}: {', '.join(map(short, s['selected']))} ({100 * s['backward_fraction']:.0f}% of the backward)"
              for _, g, _ in pairs for i, s in enumerate(g["selection"])],
        ]
    lines += ["", f"{result.get('note', '')} Wall times (the server's, "
              "summed over rounds, evaluation included) are inflated and not comparable between arms; FLOPs are counted, "
              "not timed, so they do not depend on the load. One run's accuracy has a standard error of about 1.3 points "
              "(1000 validation examples), so a paired difference of one seed is about +-1.8 points of noise. "
              "Unfinished runs are listed with their rounds so far and left out of the comparison."]
    atomic_write_text(out / "green_cola.json", json.dumps(result, indent=1))
    atomic_write_text(out / "green_cola.md", "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in sorted(runs, key=lambda r: (r["seed"], r["arm"])):
        x = [0.0]
        for f in r["server_backward_flops"]:
            x.append(x[-1] + f / 1e12)
        line, = ax.plot(x, r["accuracy"], "o-" if r["arm"] == plain else "s--", label=f"{r['arm']}, seed {r['seed']}")
        lost = [i + 1 for i, n in enumerate(r["skipped"]) if n]
        ax.scatter([x[i] for i in lost], [r["accuracy"][i] for i in lost], s=120, facecolors="none", edgecolors="red", zorder=3)
    ax.set(xlabel="server backward TFLOPs (cumulative, counted)", ylabel="validation accuracy after each round",
           title="Green-ColA vs ColA (MiniLM, rotten_tomatoes); red ring: replies lost")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "green_cola.png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rho", type=float, default=0.5)
    p.add_argument("--out", default="docs/green")
    p.add_argument("--runs", default="runs/green_cola_bench")
    p.add_argument("--note", default="", help="what else ran on the machine, for the report")
    p.add_argument("--report-only", action="store_true", help="only read completed ledgers, start no run")
    args = p.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    result = {"rho": args.rho, "note": args.note, "runs": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        for rho in (1.0, args.rho):
            print(f"== seed {seed}, {arm_name(rho)}", flush=True)
            figures = run(seed, rho, ROOT / args.runs, args.report_only)
            if figures is not None:
                result["runs"].append({"arm": arm_name(rho), **figures})
                report(result, out)
    if result["runs"]:
        print((out / "green_cola.md").read_text())


if __name__ == "__main__":
    main()
