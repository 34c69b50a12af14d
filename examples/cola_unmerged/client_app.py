"""ColA client with a callable data source: ``batches(step, count)`` returns interval ``step``'s batches."""

from flwr.app import Context
from flwr.clientapp import ClientApp

from examples import task
from fedcola.cola.client import ColaClient, register

app = ClientApp()


def make_client(context: Context) -> ColaClient:
    pid = int(context.node_config["partition-id"])
    data = task.sentiment_batches(pid, batches=8)

    def batches(step: int, count: int) -> list:
        return [data[(step * count + i) % len(data)] for i in range(count)]

    return ColaClient(pid, batches, validation=task.sentiment_batches(pid, "validation"), examples=8 * 8)


register(app, make_client)
