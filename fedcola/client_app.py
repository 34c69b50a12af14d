"""The fedcola ClientApp: handles each method's messages on a (virtual or real) SuperNode.

The round's full config travels in every message (``config`` ConfigRecord), so a SuperNode needs only
its own ``node_config`` (which partition or which local data it holds).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcola import config as cfg
from fedcola import cola_client, fedavg_lora, lte_client, runtime, train

app = ClientApp()


def message_config(msg: Message) -> dict:
    received = dict(msg.content.config_records["config"])
    server_round = int(received.pop("server-round", 0))
    config = cfg.from_run_config(received)
    return config | {"server-round": server_round}


def partition_of(context: Context) -> tuple[int, int]:
    node = runtime.node_options(context)
    return node.partition_id, node.num_partitions


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    config = message_config(msg)
    torch.set_num_threads(config["client.num-cpus"])
    node = runtime.node_options(context)
    state = msg.content.array_records["arrays"].to_torch_state_dict()
    new_state, stats, num_examples, selection = fedavg_lora.client_train(
        config, state, node.partition_id, node.num_partitions, config["server-round"], rho=node.green_rho)
    metrics = MetricRecord({
        "num-examples": num_examples, "train-loss": float(stats.loss), "flops": int(stats.flops),
        "peak-memory-bytes": train.peak_memory_bytes(), "wall-time-s": float(stats.wall_time_s),
        "partition-id": node.partition_id, "green-rho": node.green_rho,
    })
    content = RecordDict({"arrays": ArrayRecord(new_state), "metrics": metrics,
                          fedavg_lora.TRAINED: ConfigRecord({"names": list(new_state if selection is None else selection.names)})})
    return Message(content, reply_to=msg)


@app.query("cola")
def cola_query_handler(msg: Message, context: Context) -> Message:
    config = message_config(msg)
    torch.set_num_threads(config["client.num-cpus"])
    return cola_client.query(msg, context, config, partition_of(context))


@app.train("cola")
def cola_train_handler(msg: Message, context: Context) -> Message:
    config = message_config(msg)
    torch.set_num_threads(config["client.num-cpus"])
    return cola_client.fit(msg, context, config, partition_of(context))


@app.train("lte")
def lte_train_handler(msg: Message, context: Context) -> Message:
    config = message_config(msg)
    torch.set_num_threads(config["client.num-cpus"])
    return lte_client.lte_train(msg, context, config)
