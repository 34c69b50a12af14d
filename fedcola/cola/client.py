"""ColA on the client (DESIGN.md, "ColA round", steps 2 and 5): private data, auxiliary models and
their optimizer, updated by gradient learning from the server's (x_m, G_m).

Use it in your own ClientApp, fed by your own data::

    def make_client(context):
        pid = context.node_config["partition-id"]
        return ColaClient(adapter_id=pid, train=my_batches(pid), validation=my_val_batches(pid))

    app = ClientApp()
    register(app, make_client)        # answers query.cola and train.cola

``train`` is an iterable of batches (dicts of tensors: ``input_ids``, ``attention_mask``,
``labels``), read in order and cycled (interval ``step`` takes items ``step * I .. step * I + I - 1``),
or a callable ``(step, count) -> count batches``. Everything else (adapted layers and shapes, the
auxiliary models, optimizer, interval, wire dtype, seed) arrives in the server's ``spec`` record on
first contact and is kept in ``context.state``, with the auxiliary models and optimizer state, so it
persists across rounds on a SuperNode and in simulation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.flop_counter import FlopCounterMode

from fedcola import train as training
from fedcola.cola import gl
from fedcola.cola import payload, records
from fedcola.cola.spec import ClientSpec
from fedcola.fl import wire
from fedcola.fl.batches import Batch, TrainData, held, interval_batches, num_examples

SPEC, ADAPTERS, OPTIMIZER, ACKED, VERSIONS = "cola.spec", "cola.adapters", "cola.optimizer", "cola.acked", "cola.versions"


def stateless(adapter_id: int) -> ValueError:
    """Never train from a state the server does not hold: a client without state whose auxiliary models
    the server holds (lost state-dir, restarted without it) fails with this reason."""
    return ValueError(f"the server holds the auxiliary models of adapter id {adapter_id}, but this client has no state for them (lost state-dir?)")


class ColaClient:
    """One ColA client: ``adapter_id`` (its partition id: the server binds it to the node at first
    contact), its training batches and, for client-side evaluation, its validation batches. Its
    auxiliary models and optimizer state live in fp32 on ``device`` (the paper's split: a low-cost
    device, CPU by default)."""

    def __init__(self, adapter_id: int, train: TrainData, *, validation: Iterable[Batch] | None = None, examples: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.adapter_id = int(adapter_id)
        self.device = torch.device(device)
        self.data = held(train)
        self.validation = validation
        self.num_examples = num_examples(self.data, examples)  # the server's `examples` weighting

    # --- state in context.state ------------------------------------------------------------------
    @staticmethod
    def spec(context: Context) -> ClientSpec:
        return ClientSpec.from_record(context.state.config_records[SPEC])

    def learner(self, context: Context, spec: ClientSpec) -> gl.GLClient:
        """This client's auxiliary models and optimizer, from ``context.state`` (fresh on first contact)."""
        adapters = {layer: a.to(self.device) for layer, a in spec.adapters(self.adapter_id).items()}
        client = gl.GLClient(adapters, optimizer=spec.optimizer.build, interval=spec.interval)
        if ADAPTERS in context.state.array_records:
            records.load_adapter_record(client.adapters, context.state.array_records[ADAPTERS])
            training.load_optimizer_record(client.optimizer, context.state.array_records[OPTIMIZER])
        return client

    @staticmethod
    def save(context: Context, client: gl.GLClient) -> None:
        context.state[ADAPTERS] = records.adapter_record(client.adapters)
        context.state[OPTIMIZER] = training.optimizer_record(client.optimizer)

    @staticmethod
    def versions(context: Context) -> tuple[int, int]:
        """(``sent``, ``acked``): the version of this client's auxiliary models (the train replies it sent:
        only a reply changes them) and that of ``ACKED``, the version the server holds (-1: none yet)."""
        record = context.state.config_records.get(VERSIONS, {"sent": 0, "acked": -1})
        return int(record["sent"]), int(record["acked"])

    @classmethod
    def sync(cls, context: Context, spec: ClientSpec, control: ConfigRecord) -> None:
        """``spec.sends_changes``: keep ``ACKED`` = the parameters the server holds, the base of the change
        the next reply sends. Every message names the version the server holds (``control.taken``, from
        the replies' ``version``): the current one (then ACKED = w) or ACKED's, as a message or a reply may
        be lost on the way; any other means this client's state is not the one the server knows (lost, or
        restored from an older snapshot) and is refused. A message asking for the whole auxiliary models
        (``send-adapter``: the server takes them as its copy) is not checked."""
        if not spec.sends_changes or control.get("send-adapter", False):
            return
        (sent, acked), taken = cls.versions(context), int(control.get("taken", -1))
        if taken == sent:
            context.state[ACKED] = context.state.array_records[ADAPTERS]
            context.state[VERSIONS] = ConfigRecord({"sent": sent, "acked": sent})
        elif taken != acked or ACKED not in context.state.array_records:
            raise ValueError(f"the server holds version {taken} of this client's auxiliary models, but it has versions {sent} and {acked} "
                             "(state lost or restored from an older snapshot?)")

    def _batches(self, step: int, count: int) -> tuple[ArrayRecord, int]:
        return records.batch_record(interval_batches(self.data, step, count)), self.num_examples

    def _validation(self, max_examples: int) -> tuple[ArrayRecord, int]:
        """A prefix of the validation batches holding at most ``max_examples`` examples."""
        kept, seen = [], 0
        for batch in self.validation or []:
            take = min(len(batch["labels"]), max_examples - seen)
            if take <= 0:
                break
            kept.append({k: v[:take] for k, v in batch.items()})
            seen += take
        if not kept:
            raise ValueError("the server asked for validation batches, but this client has none")
        return records.batch_record(kept), seen

    # --- handlers ---------------------------------------------------------------------------------
    def query(self, msg: Message, context: Context) -> Message:
        """Step 2: send I batches of this client's data (and its auxiliary models when the server asks)."""
        control = msg.content.config_records["control"]
        if SPEC in msg.content.config_records:
            context.state[SPEC] = msg.content.config_records[SPEC]
        if ADAPTERS not in context.state.array_records:
            if not control["send-adapter"] or self.adapter_id in control.get("held", []):
                raise stateless(self.adapter_id)
            if SPEC not in context.state.config_records:
                raise ValueError(f"first contact without the server's '{SPEC}' record: this client cannot build its auxiliary models")
            spec = self.spec(context)
            self.save(context, self.learner(context, spec))
        spec = self.spec(context)
        self.sync(context, spec, control)
        if control.get("split", "train") == "validation":  # client-side evaluation: (a prefix of) the local held-out split
            batch, size = self._validation(int(control["max-examples"]))
        else:
            batch, size = self._batches(int(control["step"]), spec.interval)
        content = RecordDict({"batch": batch, "metrics": MetricRecord({"num-examples": size, "partition-id": self.adapter_id})})
        if control["send-adapter"]:  # the server takes them as its copy (merged: of this version)
            content["adapter"] = context.state.array_records[ADAPTERS]
            if spec.sends_changes:
                content.metric_records["metrics"]["version"] = self.versions(context)[0]
        return Message(content, reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        """Step 5: one gradient-learning update per adaptation interval from the server's (x, G) or, where the
        server formed them, the gradients themselves (``fedcola.cola.payload``), on the layers the message
        carries (Green-ColA: ``control["layers"]``); the reply carries the auxiliary models or, merged, their
        change in the upload dtype (``records.change_record``); its ``importance``
        record names each trained layer's I_m = -sum(g_m * dw_m) of this update and, when
        ``control["next-step"]`` asks, carries the batches of that next interval."""
        control = msg.content.config_records["control"]
        if ADAPTERS not in context.state.array_records:
            raise stateless(self.adapter_id)  # a train message goes only to clients whose auxiliary models the server holds
        spec = self.spec(context)
        self.sync(context, spec, control)
        client = self.learner(context, spec)
        tensors = wire.unpack(msg.content.array_records["pairs"], spec.wire_dtype)
        dims = spec.selected(control.get("layers"))  # Green-ColA: only the selected layers travel and train
        shared = msg.content.config_records["shared"] if "shared" in msg.content.config_records else {}
        pairs, grads = payload.decode(tensors, shared, client.adapters, dims, spec.interval)
        if "fingerprint" in control and control["fingerprint"] != payload.fingerprint(client.adapters, payload.fingerprinted(client.adapters, grads)):
            raise ValueError("the server formed this client's gradients with auxiliary models other than its own (state lost or restored?)")
        t0 = time.perf_counter()
        with FlopCounterMode(display=False) as counter:
            for i, batch_pairs in enumerate(pairs):
                client.step(batch_pairs, mean_grads=grads if i == len(pairs) - 1 else None)
        version, change = {}, None
        if spec.sends_changes:  # the change since the version the server holds; the client keeps w_acked + Delta, as the server will
            change = records.change_record(client.adapters, context.state.array_records[ACKED].to_torch_state_dict(), spec.upload_dtype)
            sent, acked = self.versions(context)
            version = {"version": sent + 1}  # the version this reply leaves
            context.state[VERSIONS] = ConfigRecord({"sent": sent + 1, "acked": acked})
        self.save(context, client)
        adapter = context.state.array_records[ADAPTERS] if change is None else change  # the whole models as saved, or merged their change
        metrics = MetricRecord({
            "rows": sum(x.shape[0] for p in pairs for x, _ in list(p.values())[:1]), "flops": int(counter.get_total_flops()),
            "peak-memory-bytes": training.peak_memory_bytes(), "wall-time-s": time.perf_counter() - t0, "partition-id": self.adapter_id,
            **training.accelerator_metrics(self.device), **version,
        })
        content = RecordDict({"adapter": adapter, "importance": ConfigRecord({layer: client.importance.get(layer, 0.0) for layer in dims})})
        if "next-step" in control:
            content["batch"], metrics["num-examples"] = self._batches(int(control["next-step"]), spec.interval)
        content["metrics"] = metrics
        return Message(content, reply_to=msg)


def register(app: ClientApp, make_client: Callable[[Context], ColaClient]) -> None:
    """Register ColA's handlers (``query.cola``, ``train.cola``) on ``app``; ``make_client(context)``
    builds the node's client (its adapter id and data) for each message."""

    @app.query("cola")
    def cola_query(msg: Message, context: Context) -> Message:
        return make_client(context).query(msg, context)

    @app.train("cola")
    def cola_train(msg: Message, context: Context) -> Message:
        return make_client(context).train(msg, context)
