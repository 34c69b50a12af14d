"""The no-op ClientApp: imports only flwr, replies with ``up-bytes`` zero bytes to any train message."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def echo(msg: Message, context: Context) -> Message:
    size = int(msg.content.config_records["config"]["up-bytes"])
    return Message(RecordDict({"payload": ArrayRecord([np.zeros(size, dtype=np.uint8)])}), reply_to=msg)
