"""Centralized GreenTrainer benchmark (Huang et al., ICLR 2024, arXiv 2309.13192, Sec. 5): full
fine-tuning vs GreenTrainer at rho = 0.7 and 0.5 vs peft LoRA, on the embedded MiniLM and
rotten_tomatoes.

    python -m simulations.green_bench [--steps N] [--out docs/green]

Every arm sees the same batches (seed 0, batch 16, dynamic padding up to 64 tokens), the same number
of AdamW steps and the same learning-rate schedule shape (linear warm-up over the first 6% of steps,
then linear decay to 0). The peak learning rate suits each arm: 5e-5 for full fine-tuning and
GreenTrainer (both update full weight tensors), 1e-3 for LoRA (r=8, alpha=16 on query/value, plus
the classifier head), whose zero-initialised low-rank factors need larger steps. GreenTrainer
re-selects every `--reselect-every` steps and profiles at the padded length 64. FLOPs are measured
with FlopCounterMode under the math SDPA backend in every arm (`fedcola.green_trainer`), and include
GreenTrainer's importance evaluations.

The arms run interleaved in one process with one torch thread: step i of every arm, then step i + 1,
the arms' order rotated every step. A shared machine's load then falls on all arms alike, and each
arm's wall time and CPU time (this thread's, `time.thread_time`) are summed over its own steps,
profiling and re-selections included. Each arm is then evaluated on the whole validation split.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from fedcola.ledger import atomic_write_text

SEED, BATCH, MAX_LENGTH, WARMUP = 0, 16, 64, 0.06
TARGETS = {"flops": 0.52, "accuracy_points": 1.0, "wall": 0.7}  # the paper's claim at rho = 0.5


@dataclass(frozen=True)
class Arm:
    name: str
    rho: float
    lr: float
    lora: bool = False


ARMS = (Arm("full-ft", 1.0, 5e-5), Arm("gt-0.7", 0.7, 5e-5), Arm("gt-0.5", 0.5, 5e-5),
        Arm("lora", 1.0, 1e-3, lora=True))
FULL = ARMS[0].name


def _arm_runs(arm: Arm, steps: int, reselect_every: int, splits, tok):
    """One arm's model and its `green_steps` generator (same seed, same batches as every arm)."""
    import torch

    from fedcola import models, train
    from fedcola.fedavg_lora import lora_config
    from fedcola.green_trainer import green_steps, warmup_linear_decay

    torch.manual_seed(SEED)
    model = models.load_model("minilm", "classification", num_labels=2)
    if arm.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config({"task": "classification", "lora.r": 8, "lora.alpha": 16,
                                                   "lora.targets": "query,value"}))
    loader = train.make_loader(splits["train"], tok, "classification", BATCH, MAX_LENGTH, shuffle=True, seed=SEED)
    enc = tok(splits["train"]["text"][:BATCH], padding="max_length", truncation=True, max_length=MAX_LENGTH,
              return_tensors="pt")
    profile_batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                     "labels": torch.tensor(splits["train"]["label"][:BATCH])}
    run = green_steps(model, train.cycle(loader), steps,
                      lambda params: train.make_optimizer("adamw", params, arm.lr, weight_decay=0.01),
                      rho=arm.rho, reselect_every=reselect_every, profile_batch=profile_batch,
                      lr_lambda=warmup_linear_decay(steps, WARMUP))
    return model, run


def run_all(steps: int, reselect_every: int) -> list[dict]:
    """All arms interleaved step by step in this process (module docstring), then evaluated."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedcola import data, models, train

    torch.set_num_threads(1)
    splits = data.load_splits("rotten_tomatoes", seed=SEED)
    tok = models.load_tokenizer("minilm")
    arms = {arm.name: (arm, *_arm_runs(arm, steps, reselect_every, splits, tok)) for arm in ARMS}
    wall = dict.fromkeys(arms, 0.0)
    cpu = dict.fromkeys(arms, 0.0)
    stats = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                  TimeElapsedColumn()) as bar:
        tasks = {name: bar.add_task(name, total=steps, loss="") for name in arms}
        for step in range(steps):
            order = list(arms)[step % len(arms):] + list(arms)[: step % len(arms)]
            for name in order:
                t0, c0 = time.perf_counter(), time.thread_time()
                stats[name] = next(arms[name][2])
                wall[name] += time.perf_counter() - t0
                cpu[name] += time.thread_time() - c0
                bar.update(tasks[name], completed=step + 1, loss=f"loss {stats[name].steps[-1].loss:.3f}")
        loader = train.make_loader(splits["validation"], tok, "classification", 64, MAX_LENGTH, False, SEED)
        results = []
        for name, (arm, model, run) in arms.items():
            run.close()  # restores the requires_grad flags
            bar.update(tasks[name], loss="evaluating")
            metrics = train.evaluate(model, loader, "classification")
            bar.update(tasks[name], loss=f"accuracy {metrics['accuracy']:.3f}")
            results.append({"arm": name, "lr": arm.lr, "lora": arm.lora, "batch_size": BATCH, "max_length": MAX_LENGTH,
                            "seed": SEED, "torch_threads": torch.get_num_threads(), "validation": metrics,
                            "loop_wall_time_s": wall[name], "cpu_time_s": cpu[name], **stats[name].to_dict()})
    return results


def summarise(results: list[dict]) -> list[dict]:
    """One row per arm: measured FLOPs, wall and CPU time, accuracy, and ratios vs full fine-tuning."""
    full = next(r for r in results if r["arm"] == FULL)
    rows = []
    for r in results:
        rows.append({
            "arm": r["arm"], "rho": r["rho"], "total_flops": r["total_flops"], "selection_flops": r["selection_flops"],
            "flops_ratio": r["total_flops"] / full["total_flops"],
            "step_flops_ratio": r["train_flops"] / full["train_flops"],
            "achieved_rho": [s["achieved_rho"] for s in r["selections"]],
            "tensors_trained": [len(s["names"]) for s in r["selections"]], "num_candidates": r["num_candidates"],
            "head_trained": [any("classifier" in n for n in s["names"]) for s in r["selections"]],
            "wall_time_s": r["loop_wall_time_s"], "wall_ratio": r["loop_wall_time_s"] / full["loop_wall_time_s"],
            "cpu_time_s": r["cpu_time_s"], "cpu_ratio": r["cpu_time_s"] / full["cpu_time_s"],
            "accuracy": r["validation"]["accuracy"], "val_examples": r["validation"]["num-examples"],
            "delta_points": 100 * (r["validation"]["accuracy"] - full["validation"]["accuracy"]),
        })
    return rows


def targets(row: dict) -> dict[str, bool]:
    """The paper's claim for rho = 0.5, checked on measured numbers."""
    return {"flops": row["flops_ratio"] <= TARGETS["flops"],
            "accuracy": row["delta_points"] >= -TARGETS["accuracy_points"],
            "wall": row["wall_ratio"] <= TARGETS["wall"]}


def write_readme(rows: list[dict], steps: int, reselect_every: int, path: Path) -> None:
    gt = next(r for r in rows if r["arm"] == "gt-0.5")
    full = next(r for r in rows if r["arm"] == FULL)
    acc, n_val = full["accuracy"], full["val_examples"]
    stderr = (acc * (1 - acc) / n_val) ** 0.5
    held = targets(gt)
    yes = {True: "holds", False: "does not hold"}
    lines = [
        "# GreenTrainer, centralized: MiniLM on rotten_tomatoes",
        "",
        f"Written by `python -m simulations.green_bench --steps {steps} --reselect-every {reselect_every}`; "
        "raw numbers in `results.json`.",
        "",
        f"all-MiniLM-L6-v2 (22.7M parameters) + a new 2-way head, {steps} AdamW steps of batch {BATCH} "
        f"(max length {MAX_LENGTH}, dynamic padding, seed {SEED}; every arm sees the same batches), linear warm-up "
        f"({WARMUP:.0%}) then linear decay. Peak lr 5e-5 for full fine-tuning and GreenTrainer, 1e-3 for peft LoRA "
        f"(r=8, alpha=16, query/value + classifier head). GreenTrainer re-selects every {reselect_every} steps, "
        f"importance from one batch. Accuracy on the whole validation split ({n_val} examples).",
        "",
        "The arms ran interleaved in one process with one torch thread (step i of every arm, arm order rotated "
        "each step), so the load of the shared machine (2 cores, three other engineers' jobs running) fell on "
        "all arms alike; wall and CPU time are each arm's own steps, profiling and re-selections included. "
        "Absolute seconds are inflated by the other jobs; the ratios are the result.",
        "",
        "FLOPs are measured with `torch.utils.flop_counter.FlopCounterMode` on every step, with attention on the "
        "math SDPA backend in every arm (FlopCounterMode cannot count the CPU flash kernel). GreenTrainer's FLOPs "
        "include its importance evaluations (one forward + full backward per re-selection). FlopCounterMode "
        "counts matmuls only, not elementwise work, and its dispatch overhead is in every arm's wall time.",
        "",
        "| arm | measured training FLOPs | FLOPs ratio vs full FT | wall time (s) | wall ratio | CPU time ratio | accuracy | delta vs full FT (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['total_flops']:.3e} | {r['flops_ratio']:.3f} | {r['wall_time_s']:.1f} | "
                     f"{r['wall_ratio']:.3f} | {r['cpu_ratio']:.3f} | {r['accuracy']:.3f} | {r['delta_points']:+.1f} |")
    lines += ["", "GreenTrainer selections (profile's achieved rho at length 64, tensors trained of candidates):", ""]
    for r in rows:
        if r["arm"].startswith("gt-"):
            lines.append(f"- {r['arm']}: achieved rho {min(r['achieved_rho']):.3f}-{max(r['achieved_rho']):.3f}, "
                         f"{min(r['tensors_trained'])}-{max(r['tensors_trained'])} of {r['num_candidates']} tensors, "
                         f"classifier head trained in {sum(r['head_trained'])} of {len(r['head_trained'])} selections; "
                         f"training steps alone {r['step_flops_ratio']:.3f}x full FT's FLOPs, importance "
                         f"evaluations {r['selection_flops']:.3e} FLOPs")
    lines += [
        "",
        "## The paper's targets at rho = 0.5 (measured here)",
        "",
        f"- FLOPs <= {TARGETS['flops']}x full FT: {gt['flops_ratio']:.3f}x, {yes[held['flops']]}.",
        f"- accuracy within {TARGETS['accuracy_points']:g} point of full FT: {gt['delta_points']:+.1f} points, "
        f"{yes[held['accuracy']]}.",
        f"- wall time <= {TARGETS['wall']}x full FT: {gt['wall_ratio']:.3f}x, {yes[held['wall']]} "
        f"(CPU time: {gt['cpu_ratio']:.3f}x).",
        "",
        f"With {n_val} validation examples the standard error of full FT's accuracy is "
        f"{100 * stderr:.1f} points, so a 1-point difference from one seed is within noise.",
        "",
        "![accuracy vs measured FLOPs](accuracy_vs_flops.png)",
        "",
        DIAGNOSIS,
    ]
    path.write_text("\n".join(lines))


DIAGNOSIS = """## Why an earlier GT-0.5 lost 13.5 points, and the fix

The first version took importance (Sec. 4.2, I_k = -g_k . dw_k) from one step of the *live* AdamW
optimizer (its state restored afterwards). At the re-selection of step 50 it dropped the newly
initialised classifier head, the pooler and most of the top layer, and GT-0.5 ended at 0.644
(full FT 0.779). Inspected at that step (same run, step-50 state): 17 of the 26 tensors trained
since step 0 got I_k < 0, the head among them, and no untrained tensor did. The sign followed the
label balance of the batch (negative on batches with 62-69% positives, positive at 50-56%), and
averaging the gradient over 4 or 8 batches did not remove it (the head stayed negative). So it is a
bias, not batch noise: a trained tensor's live AdamW step follows its momentum, which points against
the current gradient once training oscillates around the head's optimum, while an untrained tensor's
step is AdamW's first step, lr sign(g), whose I_k = lr ||g_k||_1 is always positive. The two are not
comparable, and DP never selects I_k <= 0.

The fix (`fedcola.green.tensor_importance`): dw is the first step of a *fresh* optimizer of the same
type and hyper-parameters (current lr) for every tensor, which is exactly what the reference code's
first selection does (its optimizer has no state yet). The live optimizer is not stepped at all.
At step 50 the fresh-step importance kept the head positive on every batch tried and re-selected
the step-0 set. `importance_batches` (mean gradient over several batches) stays available; the
benchmark uses one batch, as the reference does.

## What the fix did not fix

With the fix the head is trained in every selection and GT-0.5 keeps the same 26 tensors all run
(classifier, pooler, all of layer 5, the FFN and output of layer 4). It gained 3 points (0.644 ->
0.674 in this run) and GT-0.7 1.6 points, but GT-0.5 is still about 11 points below full FT. So the
dropped head was a bug, not the main cause. On this encoder the backward costs about twice the
forward, so rho = 0.5 leaves a backward budget of rho (T_fp + T_bp) - T_fp, about a quarter of full
backprop: roughly the top 1.3 of 6 layers. Trained at full FT's peak lr (5e-5) for 150 steps (0.23
epoch), that subset learns much more slowly than the whole model; the paper's runs are several
epochs long, on generative LLMs. Not measured yet (CPU time on a shared machine): longer runs, a
learning rate tuned for the GreenTrainer arms (top-layer tuning tolerates a larger one, as LoRA's
1e-3 does), and several seeds.
"""


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    full = next(r["accuracy"] for r in rows if r["arm"] == FULL)
    ax.axhline(full - TARGETS["accuracy_points"] / 100, ls="--", c="grey", lw=1, label="full FT - 1 point")
    for r in rows:
        ax.scatter(r["total_flops"] / 1e12, r["accuracy"], s=40)
        ax.annotate(r["arm"], (r["total_flops"] / 1e12, r["accuracy"]), textcoords="offset points", xytext=(5, 5))
    ax.legend(loc="lower right")
    ax.set_xlabel("measured training FLOPs (TFLOPs)")
    ax.set_ylabel(f"validation accuracy ({rows[0]['val_examples']} examples)")
    ax.set_title("GreenTrainer on MiniLM / rotten_tomatoes")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per arm")
    parser.add_argument("--reselect-every", type=int, default=50, help="GreenTrainer re-selection interval E (steps)")
    parser.add_argument("--out", type=Path, default=Path("docs/green"))
    parser.add_argument("--report", action="store_true", help="only re-render README and plot from OUT/results.json")
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads((args.out / "results.json").read_text())["runs"]
        steps, reselect_every = len(results[0]["steps"]), results[0]["reselect_every"]
    else:
        steps, reselect_every = args.steps, args.reselect_every
        results = run_all(steps, reselect_every)
    rows = summarise(results)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json",
                      json.dumps({"summary": rows, "targets_rho_0.5": TARGETS, "runs": results}, indent=1))
    write_readme(rows, steps, reselect_every, args.out / "README.md")
    plot(rows, args.out / "accuracy_vs_flops.png")
    print(f"wrote {args.out}/results.json, README.md, accuracy_vs_flops.png")


if __name__ == "__main__":
    main()
