"""fedcola.memory: the fake-tensor peak estimate against a real CPU run of the same step (tiny Llama),
and ColA merged memory flat in the number of users K."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fedcola import memory

TINY = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 1024, "max_position_embeddings": 256}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cpu(batch: int = 4) -> memory.Setup:
    return memory.Setup(TINY, batch=batch, seq=32, device="cpu")


@pytest.mark.parametrize("name", ["cola-merged", "cola-unmerged", "lora"])
def test_estimate_within_10_percent_of_measured(name):
    setup = _cpu()
    make = {"cola-merged": memory.cola_step(setup, mode="merged", kind="low-rank"),
            "cola-unmerged": memory.cola_step(setup, mode="unmerged", kind="low-rank", clients=2),
            "lora": memory.lora_step(setup)}[name]
    est = memory.estimate(make, device_type="cpu")
    real = memory.measured(make)
    assert est.placeholder_reads == 0
    assert abs(est.peak_bytes / real.peak_bytes - 1) <= 0.10, (est, real)
    assert abs(est.step_bytes / real.step_bytes - 1) <= 0.10, (est, real)


def test_merged_flat_in_users_and_counts_only_the_accelerator():
    setup = memory.Setup(TINY, batch=8, seq=32)  # the fake accelerator
    one = memory.estimate(memory.cola_step(setup, mode="merged", kind="low-rank", clients=1))
    eight = memory.estimate(memory.cola_step(setup, mode="merged", kind="low-rank", clients=8))
    adapters = 7 * sum(2 * 8 * 128 * 4 for _ in range(2 * 2))  # 7 more users' fp32 A and B at 4 layers
    assert eight.peak_bytes <= one.peak_bytes * 1.02 + adapters
    linear = [memory.estimate(memory.cola_step(setup, mode="merged", kind="linear", clients=k)).peak_bytes for k in (1, 8)]
    assert linear[1] <= linear[0] * 1.02
    # weights: the model's bf16 parameters are resident on the accelerator
    params = sum(p.numel() for p in memory.Setup(TINY, batch=1, seq=1, dtype=torch.bfloat16, device="cpu").model().parameters()) * 2
    assert one.resident_bytes >= params


def test_host_copies_do_not_count():
    def step():
        x = torch.empty(1024, 1024, device="meta")  # 4 MiB on the accelerator
        host = x.to("cpu")  # a host copy: not counted
        del x
        return host

    assert memory.peak_bytes(step) == 4 * 2**20


def test_lean_server_options_lower_the_estimate_as_measured():
    """Recomputing the frozen blocks lowers the ColA server's peak, in the estimate and in a real CPU run
    alike (within 10%); host offload counts the pairs off the (fake) accelerator."""
    setup = memory.Setup({**TINY, "num_hidden_layers": 4}, batch=8, seq=64, device="cpu")
    plain, lean = (memory.cola_step(setup, mode="merged", kind="low-rank", recompute=r) for r in (False, True))
    est, real = memory.estimate(lean, device_type="cpu"), memory.measured(lean)
    assert abs(est.peak_bytes / real.peak_bytes - 1) <= 0.10, (est, real)
    assert real.peak_bytes < 0.8 * memory.measured(plain).peak_bytes
    fake = memory.Setup(TINY, batch=8, seq=32)
    on, off = (memory.estimate(memory.cola_step(fake, mode="merged", kind="low-rank", offload_pairs=o)).peak_bytes for o in (False, True))
    assert off < on
