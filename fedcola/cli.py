"""``fedcola``: run simulations, list config keys, show a run's results.

    fedcola run simulations/fedavg_lora_minilm.toml --set rounds=5 --set lr=1e-3
    fedcola run --resume runs/<run> [--set rounds=8]
    fedcola green simulations/green_minilm_rt.toml --set green.rho=0.7
    fedcola keys
    fedcola show runs/<run>
    fedcola export runs/<run>

Bad input (a missing file, an unknown key, a wrong type, an unknown model or dataset, texts longer
than the model's positions) ends with one line on stderr and exit status 2, before any simulation
starts; a runtime failure (a full disk, a run that failed) with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from fedcola import config as cfg

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _env_defaults() -> None:
    """Quiet, offline-friendly defaults; anything the user set wins."""
    for key, value in {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                       "RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(key, value)


def loopback_ray(init_args: dict) -> dict:
    """Ray ``init_args`` (and environment) under which every Ray process of a local simulation listens on
    127.0.0.1 only. Ray's servers (GCS, raylet, core workers and the driver, runtime-env/dashboard agents) bind
    127.0.0.1 only when the node IP is exactly "127.0.0.1", else 0.0.0.0 (gRPC: [::]); ``ray.init`` turns
    ``_node_ip_address="127.0.0.1"`` into the host's routable IP unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is
    off (``services.resolve_ip_for_localhost`` -> ``get_node_ip_address``), a constant read when ray is imported."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray was imported before the variable was set
        constants.ENABLE_RAY_CLUSTER = False
    return {**init_args, "_node_ip_address": "127.0.0.1", "include_dashboard": False}


class _RunSimulationDeprecation(logging.Filter):
    """Drops Flower's deprecation warning of ``run_simulation``, the engine behind ``fedcola run``: it asks
    for ``flwr run``, which runs the same apps (README), and is not the user's to act on here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


RUN_SIMULATION_DEPRECATION = _RunSimulationDeprecation()


def preflight(config: dict) -> None:
    """Fail fast, in one line, on an unknown model or dataset, an impossible partitioning or a
    ``data.max-length`` beyond the model's positions."""
    from fedcola import data, models, runtime

    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # a file it cannot read is our one-line error, not its log
    for role in ("server", "client"):
        runtime.device(config, role)  # a device this machine does not have: one line, before anything starts
    splits = runtime.dataset_splits(config)
    if config["model"] not in models.FROM_SCRATCH:
        models.resolve(config["model"])
    data.make_partitioner(config["partitioning"], config["num-clients"], config["seed"])
    if len(splits["train"]) < config["num-clients"]:
        raise ValueError(f"dataset '{config['dataset']}' has {len(splits['train'])} training examples, fewer than num-clients={config['num-clients']}")
    if config["task"] == "classification":
        label = splits["train"].features.get("label")
        if label is None:
            columns = ", ".join(splits["train"].column_names)
            raise ValueError(f"dataset '{config['dataset']}' has no label column '{config['data.label-column']}' (columns: {columns}); set data.label-column")
        if getattr(label, "num_classes", 2) < 2:
            raise ValueError(f"dataset '{config['dataset']}' has one class ({', '.join(label.names)}): classification needs at least two")
    if config["task"] != "image-classification" and config["model"] not in models.FROM_SCRATCH:  # from scratch: max_len = max-length
        positions = model_positions(config["model"], config["task"])
        if positions is not None and config["data.max-length"] > positions:
            raise ValueError(f"data.max-length={config['data.max-length']} is longer than model '{config['model']}' can read "
                             f"(max_position_embeddings={positions}); set data.max-length <= {positions}")
    try:  # the run directory's parent must be writable before any client starts
        out = Path(config["out-dir"])
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        if err.errno in data.DISK_FULL:
            raise  # a full disk is a runtime failure (exit 1), not a bad path
        raise ValueError(f"out-dir '{config['out-dir']}' is not writable: {err.strerror or err}") from None


def model_positions(name: str, task: str) -> int | None:
    """The longest token sequence the model can read (``max_position_embeddings`` of its config, read
    through ``models.skeleton``: no weights); None when its config names no limit."""
    from fedcola import data, models

    try:
        skeleton = models.skeleton(name, task)
    except (OSError, ValueError) as err:  # a folder that holds no model, a hub id that cannot be reached
        if isinstance(err, OSError) and err.errno in data.DISK_FULL:
            raise
        raise models.UnknownModelError(f"cannot load model '{name}' ({models.resolve(name)}): {first_line(str(err))}") from None
    return getattr(skeleton.config, "max_position_embeddings", None)


def _watch(ledger_path: Path, rounds: int, stop: threading.Event, task_metric: str) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), transient=False) as progress:
        task = progress.add_task("rounds", total=rounds, status="starting clients")
        while not stop.wait(0.5):
            try:
                ledger = json.loads(ledger_path.read_text())
            except (OSError, ValueError):
                continue
            done = [r for r in ledger["rounds"] if r["round"] > 0]
            if done:
                s = done[-1]["server"]
                progress.update(task, completed=len(done), status=f"val {task_metric} {s.get(task_metric, float('nan')):.4f} · loss {s.get('loss', float('nan')):.4f}")


def run_config(args: argparse.Namespace) -> tuple[dict, Path | None]:
    """(config, run dir) of ``fedcola run``: from the TOML file and ``--set``, or, with ``--resume``,
    the resumed run's own config (only ``rounds`` may be set, to extend it)."""
    if not args.resume:
        if args.config is None:
            raise ValueError("fedcola run needs a TOML config (or --resume RUN_DIR)")
        return cfg.load(args.config, args.set or []), Path(args.run_dir) if args.run_dir else None
    from fedcola import server_app

    if args.config or args.run_dir:
        raise ValueError("--resume takes the run's own config and directory; give no config file or --run-dir")
    sets = cfg.parse_sets(args.set or [])
    if set(sets) - {"rounds"}:
        raise ValueError(f"a resumed run keeps its config; only rounds may be set (got {', '.join(sorted(sets))})")
    config = server_app.resumed_config(args.resume, sets.get("rounds"))
    if config["method"] != "fedavg_lora" and not config["client.state-dir"]:
        raise ValueError(f"{args.resume} kept no client state (client.state-dir), so its {config['method']} clients cannot be resumed")
    return config, Path(args.resume)


def run(args: argparse.Namespace) -> int:
    config, run_dir = run_config(args)
    preflight(config)

    import flwr.simulation
    from rich.console import Console

    from fedcola import client_app, report, server_app
    from fedcola.fl import ledger
    from fedcola.train import metric_name

    run_dir = run_dir or server_app.new_run_dir(config)
    if not config["client.state-dir"]:  # the virtual clients' state, kept for a resume (fedcola.fl.state)
        config = config | {"client.state-dir": str((run_dir / "client-state").resolve())}
    if args.resume:  # a new simulation draws new node ids: its virtual clients claim their adapter ids anew
        config = config | {"cola.identity": "claim"}
    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("flwr").addFilter(RUN_SIMULATION_DEPRECATION)  # one instance: added once however often run() runs
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(run_dir / "ledger.json", config["rounds"], stop, metric_name(config["task"])), daemon=True)
    watcher.start()
    try:
        flwr.simulation.run_simulation(
            server_app=server_app.make_app(config, run_dir), client_app=client_app.app, num_supernodes=config["num-clients"],
            backend_config={"client_resources": {"num_cpus": config["client.num-cpus"], "num_gpus": config["client.num-gpus"]},
                            "init_args": loopback_ray({"num_cpus": max(os.cpu_count() or 1, config["client.num-cpus"])})},
            verbose_logging=args.verbose,
        )
    finally:
        time.sleep(0.6)
        stop.set()
        watcher.join()
    result = ledger.load(run_dir / "ledger.json")
    console = Console()
    console.print(report.summary_table(result))
    console.print(f"ledger: {run_dir / 'ledger.json'}\nplot:   {run_dir / 'curves.png'}\nweights: {run_dir / 'final.safetensors'}")
    if result["status"] != "completed":
        print(f"fedcola: run {result['status']}: {result['summary'].get('error', 'see the ledger')}", file=sys.stderr)
        return 1
    return 0


def green(args: argparse.Namespace) -> int:
    """Centralized GreenTrainer (fedcola.green.trainer.run_config) with a progress bar and a summary."""
    config = cfg.load(args.config, args.set or [])
    preflight(config)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from fedcola import server_app
    from fedcola.green import trainer as green_trainer

    run_dir = Path(args.run_dir) if args.run_dir else server_app.new_run_dir(config | {"method": "green"})
    with Progress(TextColumn("[bold]green rho={task.fields[rho]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}")) as progress:
        task = progress.add_task("steps", total=config["green.steps"], rho=config["green.rho"], status="evaluating, profiling")
        result = green_trainer.run_config(config, run_dir, on_step=lambda i, s: progress.update(
            task, completed=i + 1, status=f"loss {s.loss:.4f}"))
    metric = result["metric"]
    table = Table(title=f"GreenTrainer: {config['model']} on {config['dataset']}")
    for column in ("rho", "achieved rho", "tensors trained", "measured FLOPs", "wall time (s)", f"val {metric} before", f"val {metric} after"):
        table.add_column(column, justify="right")
    chosen = [len(s["names"]) for s in result["selections"]]
    table.add_row(f"{result['rho']:g}", ", ".join(f"{s['achieved_rho']:.3f}" for s in result["selections"]),
                  f"{min(chosen)}-{max(chosen)} of {result['num_candidates']}", f"{result['total_flops']:.3e}",
                  f"{result['loop_wall_time_s']:.1f}", f"{result['validation_before'][metric]:.4f}", f"{result['validation'][metric]:.4f}")
    Console().print(table)
    print(f"results: {run_dir / 'green.json'}")
    return 0


def keys(_: argparse.Namespace) -> int:
    width = max(map(len, cfg.DEFAULTS))
    for key, value in cfg.DEFAULTS.items():
        print(f"{key:<{width}}  {type(value).__name__:<5}  {value!r}")
    return 0


def show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedcola import report
    from fedcola.fl import ledger

    Console().print(report.summary_table(ledger.load(Path(args.run_dir) / "ledger.json")))
    return 0


def export(args: argparse.Namespace) -> int:
    from fedcola.export import export_run

    for path in export_run(args.run_dir, args.out):
        print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedcola", description="Federated ColA, LTE and GreenTrainer on Flower.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a local multi-client simulation from a TOML config")
    r.add_argument("config", nargs="?", help="a TOML file, e.g. simulations/fedavg_lora_minilm.toml")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue that run after its last checkpointed round (same config; --set rounds=N extends it)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable); values in TOML syntax")
    r.add_argument("--run-dir", help="where the ledger, plot and weights go (default: <out-dir>/<method>-<model>-<dataset>-<time>)")
    r.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    r.set_defaults(func=run)
    g = sub.add_parser("green", help="centralized GreenTrainer fine-tuning under a FLOPs budget green.rho")
    g.add_argument("config", help="a TOML file, e.g. simulations/green_minilm_rt.toml")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable); values in TOML syntax")
    g.add_argument("--run-dir", help="where green.json goes (default: <out-dir>/green-<model>-<dataset>-<time>)")
    g.set_defaults(func=green)
    k = sub.add_parser("keys", help="list every config key with its type and default")
    k.set_defaults(func=keys)
    s = sub.add_parser("show", help="print the summary table of a finished run")
    s.add_argument("run_dir")
    s.set_defaults(func=show)
    what = ("write a finished run as transformers / peft folders (ColA merged: merged/ and peft/merged/; unmerged / detached: "
            "each client's peft/partition-<id>/, or personal/partition-<id>/ for linear auxiliary models; FedAvg-LoRA: peft/global/)")
    e = sub.add_parser("export", help=what, description=what)
    e.add_argument("run_dir")
    e.add_argument("--out", help="destination (default: <run_dir>/export)")
    e.set_defaults(func=export)
    return p


_COLOURS = re.compile(r"\x1b\[[0-9;]*m")
_OS_ERROR = re.compile(r"\[Errno (\d+)\]|\(os error (\d+)\)")  # Python's and Rust's (safetensors) OS errors in a message


def first_line(text: str, limit: int | None = None) -> str:
    """The first non-empty line of ``text`` without terminal colours (at most ``limit`` characters)."""
    line = next((line.strip() for line in _COLOURS.sub("", text).splitlines() if line.strip()), "")
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def failure_reason(err: BaseException) -> str:
    """A runtime failure in one line. An OSError: its reason and file ("No space left on device:
    <path>"). Anything else: its type and first line, led by the OS error its text names, if any (a
    client's full disk arrives inside the skip reasons of ``NoReplyAccepted``, a Rust writer's as
    "(os error 28)")."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    reason = f"{type(err).__name__}: {first_line(str(err), 200)}".rstrip(": ")
    found = _OS_ERROR.search(_COLOURS.sub("", str(err)))
    return f"{os.strerror(int(found.group(1) or found.group(2)))} ({reason})" if found else reason


def main(argv: list[str] | None = None) -> int:
    _env_defaults()
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # ConfigError, unknown model / dataset, bad partitioning
        print(f"fedcola: error: {first_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # a runtime failure (a full disk, a failed run): one line; the ledger keeps what was saved
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"fedcola: {args.command} failed: {failure_reason(err)}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
