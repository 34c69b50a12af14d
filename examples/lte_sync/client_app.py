"""LTE client: the model's architecture is built here (W arrives from the server), the data is yours."""

from flwr.app import Context
from flwr.clientapp import ClientApp

from examples import task
from fedcola.lte.client import LTEClient, register

app = ClientApp()


def make_client(context: Context) -> LTEClient:
    pid = int(context.node_config["partition-id"])
    return LTEClient(task.language_model(), task.text_batches(pid), client_id=pid)


register(app, make_client)
