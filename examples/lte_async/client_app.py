"""LTE client (the same for sync and async LTE), with a callable data source: round k's batches."""

from flwr.app import Context
from flwr.clientapp import ClientApp

from examples import task
from fedcola.lte.client import LTEClient, register

app = ClientApp()


def make_client(context: Context) -> LTEClient:
    pid = int(context.node_config["partition-id"])
    data = task.text_batches(pid, batches=4)
    return LTEClient(task.language_model(), lambda rounds, count: iter(data * count), client_id=pid, examples=4 * 8)


register(app, make_client)
