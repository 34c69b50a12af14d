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
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcola import runtime, tokens
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
        config = message_config(msg)
        state_dir = node.state_dir or config["client.state-dir"]
        config |= {runtime.DATA_PATH: node.data_path, runtime.STATE_DIR: state_dir}
        torch.set_num_threads(config["client.num-cpus"])
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
    from fedcola import specs

    node = runtime.node_options(context)
    return specs.fedavg_client(config, node.partition_id, node.num_partitions, node.green_rho).train(msg, context)


def cola_client(config: dict, pid: int, n: int):
    """fedcola's own ColA client for partition ``pid`` of ``n`` (or the node's own ``data-path``):
    interval ``step``'s batches drawn from (seed, step, partition) only, a prefix of its validation split."""
    from fedcola.cola.client import ColaClient

    part = runtime.client_data(config, pid, n)

    def batches(step: int, count: int) -> list[dict]:
        loader = iter(runtime.loader(config, part, shuffle=True, seed=runtime.round_seed(config, step, pid)))
        return [next(loader) for _ in range(count)]

    def validation():
        held_out = runtime.client_data(config, pid, n, "validation")
        yield from runtime.loader(config, held_out.select(range(min(len(held_out), config["eval.client-max-examples"]))), shuffle=False, seed=0)

    return ColaClient(pid, batches, validation=validation(), examples=len(part), device=runtime.device(config, "client"))


@app.query("cola")
@node_handler
def cola_query_handler(msg: Message, context: Context, config: dict) -> Message:
    return cola_client(config, *partition_of(context)).query(msg, context)


@app.train("cola")
@node_handler
def cola_train_handler(msg: Message, context: Context, config: dict) -> Message:
    return cola_client(config, *partition_of(context)).train(msg, context)


def lte_train(msg: Message, context: Context, config: dict) -> Message:
    """fedcola's own LTE client: the run's model (built once per process), the node's partition (round
    k's batches drawn from (seed, k, partition)), its FLOPs budget and straggler factor."""
    from fedcola import specs
    from fedcola.lte.client import LTEClient

    node = runtime.node_options(context)
    part = runtime.client_data(config, node.partition_id, node.num_partitions)
    vocab_size = part.vocab_size if isinstance(part, tokens.Tokens) else None
    client = LTEClient(specs.lte_cached_model(config, vocab_size), runtime.seeded_batches(config, part, node.partition_id), node.partition_id,
                       examples=len(part), green_rho=node.green_rho, slowdown=specs.lte_slowdown(config, node))
    return client.train(msg, context)


@app.train("lte")
@node_handler
def lte_train_handler(msg: Message, context: Context, config: dict) -> Message:
    return lte_train(msg, context, config)
