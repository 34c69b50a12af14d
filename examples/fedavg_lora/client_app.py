"""FedAvg-LoRA client: your peft model (the same LoRA config as the server's) and your data."""

from flwr.app import Context
from flwr.clientapp import ClientApp
from peft import LoraConfig, get_peft_model

from examples import task
from fedcola.fedavg_lora.client import FedAvgLoRAClient, register


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")


app = ClientApp()


def make_client(context: Context) -> FedAvgLoRAClient:
    pid = int(context.node_config["partition-id"])
    return FedAvgLoRAClient(get_peft_model(task.classifier(), lora()), task.sentiment_batches(pid), client_id=pid)


register(app, make_client)
