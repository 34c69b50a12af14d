"""ColA on the client (DESIGN.md, "ColA round", steps 2 and 5): private data, auxiliary models and
their optimizer, updated by gradient learning from the server's (x_m, G_m).

Everything a client owns lives in ``context.state`` (adapters and optimizer state as ArrayRecords),
so it persists across rounds on a SuperNode and in simulation, where one Ray actor serves many
virtual nodes in turn.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from torch.utils.flop_counter import FlopCounterMode

from fedcola import runtime, train
from fedcola.cola import records as cola_fl
from fedcola.cola import gl
from fedcola.fl import wire

ADAPTERS, OPTIMIZER, ACKED = "cola.adapters", "cola.optimizer", "cola.acked"


def make_client(config: dict, partition_id: int) -> gl.GLClient:
    adapters = cola_fl.build_adapters(config, seed=config["seed"] * 7919 + partition_id)
    factory = lambda ps: train.make_optimizer(config["optimizer"], ps, config["lr"], config["weight-decay"])  # noqa: E731
    return gl.GLClient(adapters, optimizer=factory, interval=config["cola.interval"])


def load_client(context: Context, config: dict, partition_id: int) -> gl.GLClient:
    """This client's auxiliary models and optimizer, from ``context.state`` (fresh on first contact)."""
    client = make_client(config, partition_id)
    if ADAPTERS in context.state.array_records:
        cola_fl.load_adapter_record(client.adapters, context.state.array_records[ADAPTERS])
        train.load_optimizer_record(client.optimizer, context.state.array_records[OPTIMIZER])
    return client


def save_client(context: Context, client: gl.GLClient) -> None:
    context.state[ADAPTERS] = cola_fl.adapter_record(client.adapters)
    context.state[OPTIMIZER] = train.optimizer_record(client.optimizer)


def sync(context: Context, config: dict, control) -> None:
    """``cola_fl.sends_changes``: remember the parameters the server holds (``ACKED``: the initial ones
    until the server confirms a reply with ``synced``), the base of the change the next reply sends."""
    if cola_fl.sends_changes(config) and (control.get("synced", False) or ACKED not in context.state.array_records):
        context.state[ACKED] = context.state.array_records[ADAPTERS]


def draw(config: dict, partition: tuple[int, int], step: int) -> tuple[ArrayRecord, int]:
    """The I training batches of interval ``step`` (seeded by the step: the same batches whichever
    message asks for them) and the size of the client's training split."""
    pid, n = partition
    part = runtime.client_split(config, pid, n)
    loader = iter(runtime.loader(config, part, shuffle=True, seed=runtime.round_seed(config, step, pid)))
    return cola_fl.batch_record([next(loader) for _ in range(config["cola.interval"])]), len(part)


def stateless(pid: int) -> ValueError:
    """Never train from a state the server does not hold: a client without state whose auxiliary models
    the server holds (lost state-dir, restarted without it) fails with this reason."""
    return ValueError(f"the server holds the auxiliary models of adapter id {pid}, but this client has no state for them (lost state-dir?)")


def query(msg: Message, context: Context, config: dict, partition: tuple[int, int]) -> Message:
    """Step 2: send I batches of this client's data (and its adapters when the server asks)."""
    pid, n = partition
    control = msg.content.config_records["control"]
    if ADAPTERS not in context.state.array_records:
        if not control["send-adapter"] or pid in control.get("held", []):
            raise stateless(pid)
        save_client(context, make_client(config, pid))
    sync(context, config, control)
    if control.get("split", "train") == "validation":  # client-side evaluation: (a prefix of) the local held-out split
        part = runtime.client_split(config, pid, n, "validation")
        part = part.select(range(min(len(part), config["eval.client-max-examples"])))
        batch, size = cola_fl.batch_record(list(runtime.loader(config, part, shuffle=False, seed=0))), len(part)
    else:
        batch, size = draw(config, partition, int(control["step"]))
    content = RecordDict({"batch": batch, "metrics": MetricRecord({"num-examples": size, "partition-id": pid})})
    if control["send-adapter"]:
        content["adapter"] = context.state.array_records[ADAPTERS]
    return Message(content, reply_to=msg)


def fit(msg: Message, context: Context, config: dict, partition: tuple[int, int]) -> Message:
    """Step 5: one gradient-learning update per adaptation interval from the server's (x, G), on the
    layers the message carries (Green-ColA: ``control["layers"]``); the reply reports each trained
    layer's importance I_m = -sum(g_m * dw_m) of this update and, when ``control["next-step"]`` asks,
    carries the batches of that next interval (step 2 of the next interval without its own message)."""
    pid, _ = partition
    control = msg.content.config_records["control"]
    if ADAPTERS not in context.state.array_records:
        raise stateless(pid)  # a train message goes only to clients whose auxiliary models the server holds
    sync(context, config, control)
    client = load_client(context, config, pid)
    tensors = wire.unpack(msg.content.array_records["pairs"], config["cola.wire-dtype"])
    dims = cola_fl.selected_dims(config, control.get("layers"))  # Green-ColA: only the selected layers travel and train
    pairs = cola_fl.pairs_from_payload(tensors, dims, config["cola.interval"])
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        for batch_pairs in pairs:
            client.step(batch_pairs)
    save_client(context, client)
    metrics = MetricRecord({
        "rows": sum(next(iter(p.values()))[0].shape[0] for p in pairs), "flops": int(counter.get_total_flops()),
        "peak-memory-bytes": train.peak_memory_bytes(), "wall-time-s": time.perf_counter() - t0, "partition-id": pid,
        "importance": [client.importance.get(layer, 0.0) for layer in dims],  # I_m = -sum(g_m * dw_m) of this step (`gl.GLClient`)
    })
    adapter = context.state.array_records[ADAPTERS]
    if cola_fl.sends_changes(config):  # w - w_acked, see `cola.ParameterMean`
        acked = context.state.array_records[ACKED].to_torch_state_dict()
        adapter = ArrayRecord({k: v - acked[k] for k, v in adapter.to_torch_state_dict().items()})
    content = RecordDict({"adapter": adapter})
    if "next-step" in control:
        content["batch"], metrics["num-examples"] = draw(config, partition, int(control["next-step"]))
    content["metrics"] = metrics
    return Message(content, reply_to=msg)
