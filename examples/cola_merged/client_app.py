"""ColA client: your in-memory data; the auxiliary models and their optimizer live here, trained by
gradient learning from the server's hidden-state gradients (no base model on the client)."""

from flwr.app import Context
from flwr.clientapp import ClientApp

from examples import task
from fedcola.cola.client import ColaClient, register

app = ClientApp()


def make_client(context: Context) -> ColaClient:
    pid = int(context.node_config["partition-id"])
    return ColaClient(pid, task.sentiment_batches(pid), validation=task.sentiment_batches(pid, "validation"))


register(app, make_client)
