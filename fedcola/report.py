"""What people look at after a run: curves (PNG) and a summary table, read only from the ledger."""

from __future__ import annotations

import io
from pathlib import Path

from rich import box
from rich.table import Table

from fedcola.fl.ledger import atomic_write_bytes
from fedcola.train import metric_name


def plot(ledger: dict, path: Path) -> Path:
    """Server metric, server loss and cumulative traffic per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in ledger["rounds"] if r["server"]]
    metric = metric_name(ledger["config"]["task"])
    xs = [r["round"] for r in rounds]
    traffic, total = [], 0
    for r in rounds:
        total += sum(c["bytes_up"] + c["bytes_down"] for c in r["clients"])
        traffic.append(total / 2**20)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(xs, [r["server"].get(metric) for r in rounds], "o-")
    axes[0].set(xlabel="round", ylabel=f"validation {metric}", title=metric)
    axes[1].plot(xs, [r["server"].get("loss") for r in rounds], "o-", color="tab:red")
    axes[1].set(xlabel="round", ylabel="validation loss", title="loss")
    axes[2].plot(xs, traffic, "o-", color="tab:green")
    axes[2].set(xlabel="round", ylabel="MiB (up + down, cumulative)", title="traffic")
    cfg = ledger["config"]
    fig.suptitle(f"{ledger['method']} · {cfg['model']} · {cfg['dataset']} · {cfg['num-clients']} clients · {cfg['partitioning']}")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())
    return path


def summary_table(ledger: dict) -> Table:
    metric = metric_name(ledger["config"]["task"])
    table = Table(title=f"{ledger['method']} · {ledger['status']}", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)  # 80 columns
    for col in ("round", f"val\n{metric}", "val\nloss", "clients", "skipped", "MiB\nup", "MiB\ndown", "client\nGFLOPs", "wall\ns"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in ledger["rounds"]:
        s, cs = r["server"], r["clients"]
        table.add_row(
            str(r["round"]), f"{s.get(metric, float('nan')):.4g}", f"{s.get('loss', float('nan')):.4f}", str(len(cs)), str(len(r["skipped"])),
            f"{sum(c['bytes_up'] for c in cs) / 2**20:.2f}", f"{sum(c['bytes_down'] for c in cs) / 2**20:.2f}",
            f"{sum(c['flops'] for c in cs) / 1e9:.1f}", f"{r['wall_time_s']:.1f}",
        )
    return table
