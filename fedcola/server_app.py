"""The fedcola ServerApp: one entry for ``flwr run`` and for ``fedcola run``.

``run_server`` builds the method's strategy and initial arrays, evaluates the global model on the
server's validation split after every round, and keeps the ledger (``<run_dir>/ledger.json``) and
the final weights (``<run_dir>/final.safetensors``) on disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
import uuid
from pathlib import Path

import torch
from datasets import concatenate_datasets
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedcola import config as cfg
from fedcola import report, runtime, specs, train
from fedcola.fl import checkpoint
from fedcola.cola import records as cola_fl
from fedcola.fedavg_lora import client as fedavg_lora
from fedcola.fl.ledger import Ledger
from fedcola.fl.polling import PollingGrid
from fedcola.fl.ledger import load as load_ledger
from fedcola.lte.heads import head_parameters
from strategies.fedavg_lora import FedAvgLoRA


RESUMABLE = ("fedavg_lora", "cola", "lte")


def new_run_dir(config: dict) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(config["out-dir"]) / f"{config['method']}-{config['model']}-{config['dataset'].replace('/', '_')}-{stamp}"


def make_evaluate_fn(config: dict, ledger: Ledger, model, run_dir: Path, round_offset: int = 0):
    """Server-side evaluation of the global model on (a prefix of) the validation split, then the
    round's checkpoint. Flower's round r is the run's round r + ``round_offset`` (a resumed run)."""
    loader = runtime.validation_loader(config)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and round_offset:
            return None  # the resumed round is in the ledger already
        server_round += round_offset
        state = arrays.to_torch_state_dict()
        fedavg_lora.load_trainable(model, state)
        metrics = _record_eval(ledger, server_round, lambda: train.evaluate(model, loader, config["task"]))
        if server_round:  # round 0 trained nothing: no resume starts there (it would record round 0 again)
            checkpoint.save(run_dir, server_round, state)
        return metrics

    return evaluate_fn


def _record_eval(ledger: Ledger, server_round: int, evaluate: Callable[[], dict[str, float]]) -> MetricRecord:
    """Run the server-side evaluation, record its metrics and wall time (``eval_s``), end the round."""
    if server_round == 0:
        ledger.begin_round(0)
    t0 = time.perf_counter()
    metrics = evaluate()
    accelerator = train.accelerator_peak_bytes(runtime.device(ledger.data["config"], "server"))  # the round's, ColA's server step included
    ledger.server(server_round, **{k: float(v) for k, v in metrics.items()}, eval_s=time.perf_counter() - t0, peak_memory_bytes=train.peak_memory_bytes(),
                  **({} if accelerator is None else {"accelerator_peak_bytes": accelerator}))
    ledger.end_round(server_round)
    return MetricRecord({k: float(v) for k, v in metrics.items()})


def run_fedavg_lora(grid: Grid, config: dict, run_dir: Path, ledger: Ledger, resume: checkpoint.Checkpoint | None) -> None:
    model = specs.fedavg_model(config).to(runtime.device(config, "server"))  # server-side evaluation
    initial, done = (resume.tensors, resume.round) if resume else (fedavg_lora.trainable_state(model), 0)
    strategy = FedAvgLoRA(model, optimizer=specs.optimizer_spec(config), local_steps=config["local-steps"], seed=config["seed"],
                          fraction_train=config["fraction-train"], min_available_nodes=config["num-clients"],
                          max_examples=config["max-examples"], max_update_ratio=config["max-update-ratio"],
                          aggregation=config["fedavg.aggregation"], trim=config["fedavg.trim"], allow_empty_rounds=config["allow-empty-rounds"], ledger=ledger, round_offset=done)
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=config["rounds"] - done, timeout=config["round-timeout"],
        train_config=ConfigRecord(dict(config)), evaluate_fn=make_evaluate_fn(config, ledger, model, run_dir, done),
    )
    checkpoint.atomic_save_file(result.arrays.to_torch_state_dict(), run_dir / "final.safetensors")


def run_cola(grid: Grid, config: dict, run_dir: Path, ledger: Ledger, resume: checkpoint.Checkpoint | None) -> None:
    """ColA: the server's frozen base model; evaluation of W + mean dW (merged) or of each client's
    personal model, averaged over clients (unmerged / detached)."""
    strategy = specs.cola_strategy(config, ledger=ledger)
    server = strategy.server
    if resume:
        strategy.load_state(resume.round, resume.tensors, resume.state)
    loader = runtime.validation_loader(config)

    def evaluate_fn(server_round: int, _: ArrayRecord) -> MetricRecord:
        def evaluate() -> dict[str, float]:
            groups = strategy.evaluation_groups() or [{0: specs.build_adapters(config, seed=0)}]
            per_group = [train.evaluate_logits(server.predictor(g), loader, config["task"]) for g in groups]
            return {k: sum(m[k] for m in per_group) / len(per_group) for k in per_group[0]}

        metrics = _record_eval(ledger, server_round, evaluate)
        if server_round:
            checkpoint.save(run_dir, server_round, *strategy.state_dict())
        return metrics

    done = resume.round if resume else 0
    strategy.start(grid=grid, num_rounds=config["rounds"] - done, timeout=config["round-timeout"], train_config=ConfigRecord(dict(config)),
                   evaluate_fn=evaluate_fn)
    cola_fl.save_adapters(run_dir / "final.safetensors", strategy.book.by_adapter_id())


def run_lte(grid: Grid, config: dict, run_dir: Path, ledger: Ledger, resume: checkpoint.Checkpoint | None) -> None:
    """LTE (or, with ``lte.full-rank``, FedAvg of full-rank weights): the fp32 master W, merged from the
    clients' deltas; evaluated on the server. The summary's ``train_wall_time_s`` is the strategy's run."""
    strategy, weights = specs.lte_strategy(config, ledger)
    done = resume.round if resume else 0
    if resume:
        weights = strategy.load_state(resume.round, resume.tensors, resume.state)
    evaluate = specs.lte_evaluator(config)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and done:
            return None  # the resumed round is in the ledger already
        metrics = _record_eval(ledger, server_round + done, lambda: evaluate(arrays))
        if server_round and not config["lte.async"]:  # async: messages in flight are no state a checkpoint can hold
            checkpoint.save(run_dir, server_round + done, *strategy.state_dict())
        return metrics

    t0 = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=weights, num_rounds=config["rounds"] - done, timeout=config["round-timeout"],
                            train_config=ConfigRecord(dict(config)), evaluate_fn=evaluate_fn)
    ledger.data["summary"]["train_wall_time_s"] = time.perf_counter() - t0
    checkpoint.atomic_save_file(result.arrays.to_torch_state_dict(), run_dir / "final.safetensors")


def resumed_config(run_dir: str | Path, rounds: int | None = None) -> dict:
    """The config of the run in ``run_dir`` (its ledger's), to continue it; ``rounds`` may extend it."""
    saved = load_ledger(Path(run_dir) / "ledger.json")
    if saved["method"] not in RESUMABLE:
        raise ValueError(f"resuming a {saved['method']} run is not supported yet (resumable: {', '.join(RESUMABLE)})")
    if saved["method"] == "lte" and saved["config"].get("lte.async"):
        raise ValueError("resuming async LTE is not supported (its merges depend on the arrival order of messages lost with the server)")
    checkpoint.load(run_dir, tensors=False)  # fail here, in one line, when there is nothing to resume
    return cfg.build({**saved["config"], "resume-dir": str(run_dir), **({"rounds": rounds} if rounds is not None else {})})


def run_centralized(config: dict, run_dir: Path) -> Ledger:
    """The centralized reference of LTE's benchmark, on the same harness: the full-rank model with the
    same initial weights, one process, the union of the clients' training splits, the same batch size,
    optimizer and learning rate; a "round" is ``num-clients x local-steps`` steps (the samples of one
    federated round), then the same server-side evaluation. Ledger ``method`` = ``"centralized"``;
    the final weights go to ``final.safetensors`` under the full-rank baseline's keys."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config["client.num-cpus"])  # the compute of one client
    config = config | {"lte.full-rank": True}
    ledger = Ledger(run_dir / "ledger.json", "centralized", config)
    n = config["num-clients"]
    model = specs.lte_model(config, head_seed=0)
    data = concatenate_datasets([runtime.client_split(config, p, n) for p in range(n)])
    batches = train.cycle(runtime.loader(config, data, shuffle=True, seed=runtime.round_seed(config, 0, 0)))
    optimizer = train.make_optimizer(config["optimizer"], head_parameters(model), config["lr"], config["weight-decay"])
    loader = runtime.validation_loader(config)
    _record_eval(ledger, 0, lambda: train.evaluate(model, loader, config["task"]))
    t0 = time.perf_counter()
    for rnd in range(1, config["rounds"] + 1):
        ledger.begin_round(rnd)
        stats = train.train_steps(model, batches, n * config["local-steps"], optimizer)
        ledger.client(rnd, {"node_id": 0, "partition_id": -1, "num_examples": len(data), "loss": stats.loss, "bytes_up": 0, "bytes_down": 0,
                            "flops": stats.flops, "peak_memory_bytes": train.peak_memory_bytes(), "wall_time_s": stats.wall_time_s})
        _record_eval(ledger, rnd, lambda: train.evaluate(model, loader, config["task"]))
    ledger.data["summary"]["train_wall_time_s"] = time.perf_counter() - t0
    checkpoint.atomic_save_file(dict(model.named_parameters()), run_dir / "final.safetensors")
    last = ledger.rounds[-1]["server"]
    ledger.finish("completed", **{k: last[k] for k in ("loss", train.metric_name(config["task"])) if k in last})
    return ledger


def run_server(grid: Grid, config: dict, run_dir: Path) -> Ledger:
    """Run ``config['rounds']`` rounds of the configured method on ``grid`` (after the checkpointed
    round of ``config['resume-dir']``, if set: then ``run_dir`` is that directory); returns the ledger."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = config if config["run-key"] else config | {"run-key": uuid.uuid4().hex}  # the clients' state key, kept by resumes
    resume = checkpoint.load(run_dir) if config["resume-dir"] else None
    if resume:  # clients roll their state back to the checkpoint's round (fedcola.fl.state)
        earlier = [r["after_round"] for r in load_ledger(run_dir / "ledger.json").get("resumed", [])]
        config = config | {"resumed-after": ",".join(map(str, [*earlier, resume.round]))}
    ledger = Ledger.reopen(run_dir / "ledger.json", resume.round, config) if resume else Ledger(run_dir / "ledger.json", config["method"], config)
    ledger.save()
    try:
        {"fedavg_lora": run_fedavg_lora, "cola": run_cola, "lte": run_lte}[config["method"]](grid, config, run_dir, ledger, resume)
        last = ledger.rounds[-1]["server"]
        ledger.finish("completed", **{k: last[k] for k in ("loss", train.metric_name(config["task"])) if k in last})
    except BaseException as err:
        ledger.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    report.plot(ledger.data, run_dir / "curves.png")
    return ledger


def make_app(config: dict | None = None, run_dir: Path | None = None) -> ServerApp:
    """A ServerApp bound to ``config`` (the CLI), or reading Flower's run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        run_config = config if config is not None else cfg.from_run_config(context.run_config)
        if config is None and run_config["resume-dir"]:
            run_config = resumed_config(run_config["resume-dir"])
        run_server(PollingGrid(grid), run_config, run_dir or (Path(run_config["resume-dir"]) if run_config["resume-dir"] else new_run_dir(run_config)))

    return app


app = make_app()
