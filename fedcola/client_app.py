"""The fedcola ClientApp: handles each method's messages on a (virtual or real) SuperNode.

The round's full config travels in every message (``config`` ConfigRecord), so a SuperNode needs only
its own ``node_config`` (``fedcola.runtime.node_options``: its client id, its partition or its own
``data-path``, its ``state-dir``). With a ``state-dir`` (or the run config's ``client.state-dir``, which
``fedcola run`` sets for its virtual clients), each handler's ``context.state`` is saved there after
every message and restored by a restarted SuperNode or a resumed run (``fedcola.fl.state``).

A SuperNode runs every message in a fresh ``flwr-clientapp`` process, so each handler imports only
its own method's modules (peft, for instance, is FedAvg-LoRA's alone).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcola import runtime, train
from fedcola.fl import state
from fedcola import config as cfg

app = ClientApp()


def message_config(msg: Message) -> dict:
    received = dict(msg.content.config_records["config"])
    server_round = int(received.pop("server-round", 0))
    config = cfg.from_run_config(received)
    return config | {"server-round": server_round}


def node_handler(handle: Callable[[Message, Context, dict], Message]) -> Callable[[Message, Context], Message]:
    """A message handler with the run config (+ the node's ``data-path``), the node's thread count, and
    its ``context.state`` restored from / saved to the node's ``state-dir`` (else the run config's
    ``client.state-dir``), per ``run-key`` and partition, one snapshot per round (``fedcola.fl.state``)."""

    def handler(msg: Message, context: Context) -> Message:
        node = runtime.node_options(context)
        config = message_config(msg) | {runtime.DATA_PATH: node.data_path}
        torch.set_num_threads(config["client.num-cpus"])
        state_dir = node.state_dir or config["client.state-dir"]
        resumes = [int(r) for r in cfg.names(config, "resumed-after")]
        if state_dir:
            folder = state.client_dir(state_dir, config["run-key"] or f"run-{context.run_id}", node.partition_id)
            state.restore(context, folder, resumes)
        reply = handle(msg, context, config)
        if state_dir:
            state.save(context, folder, config["server-round"], generation=len(resumes))
        return reply

    return handler


def partition_of(context: Context) -> tuple[int, int]:
    node = runtime.node_options(context)
    return node.partition_id, node.num_partitions


@app.train()
@node_handler
def train_handler(msg: Message, context: Context, config: dict) -> Message:
    from fedcola.fedavg_lora import client as fedavg_lora

    node = runtime.node_options(context)
    weights = msg.content.array_records["arrays"].to_torch_state_dict()
    new_state, stats, num_examples, selection = fedavg_lora.client_train(
        config, weights, node.partition_id, node.num_partitions, config["server-round"], rho=node.green_rho)
    metrics = MetricRecord({
        "num-examples": num_examples, "train-loss": float(stats.loss), "flops": int(stats.flops),
        "peak-memory-bytes": train.peak_memory_bytes(), "wall-time-s": float(stats.wall_time_s),
        "partition-id": node.partition_id, "green-rho": node.green_rho,
    })
    content = RecordDict({"arrays": ArrayRecord(new_state), "metrics": metrics,
                          fedavg_lora.TRAINED: ConfigRecord({"names": list(new_state if selection is None else selection.names)})})
    return Message(content, reply_to=msg)


@app.query("cola")
@node_handler
def cola_query_handler(msg: Message, context: Context, config: dict) -> Message:
    from fedcola.cola import client as cola_client

    return cola_client.query(msg, context, config, partition_of(context))


@app.train("cola")
@node_handler
def cola_train_handler(msg: Message, context: Context, config: dict) -> Message:
    from fedcola.cola import client as cola_client

    return cola_client.fit(msg, context, config, partition_of(context))


@app.train("lte")
@node_handler
def lte_train_handler(msg: Message, context: Context, config: dict) -> Message:
    from fedcola.lte import client as lte_client

    return lte_client.lte_train(msg, context, config)
