"""fedcola's Flower strategies for your own ServerApp: each takes typed arguments and your model object.

``ColA`` (arXiv 2404.13844), ``LTE`` / ``LTEAsync`` (LoRA-the-Explorer, arXiv 2402.16828) and
``FedAvgLoRA`` (FedAvg over peft LoRA tensors, McMahan et al. 2017 + Hu et al. 2021).
"""

from strategies.cola import ColA
from strategies.fedavg_lora import FedAvgLoRA
from strategies.lte import LTE
from strategies.lte_async import LTEAsync

__all__ = ["ColA", "FedAvgLoRA", "LTE", "LTEAsync"]
