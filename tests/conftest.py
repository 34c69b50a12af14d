import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run many times slower when two intra-op threads compete with other processes on
    a shared 2-core machine; modules of tiny-model tests opt in with `pytestmark`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


from tests import helpers  # noqa: E402


@pytest.fixture
def task_identity(request):
    """Flower stamps each message with its process's task identity (set by Flower's runtime); modules that
    build messages in process use this: run id ``RUN_ID`` of the test module (default 1)."""
    helpers.set_task_identity(getattr(request.module, "RUN_ID", 1))


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """``helpers.write_tiny_assets``: the tiny random BERT folder, ``data.csv`` and a node's ``own.csv`` (read only)."""
    return helpers.write_tiny_assets(tmp_path_factory.mktemp("tiny-assets"))


@pytest.fixture(scope="module")
def cola_config(tiny_assets):
    """``helpers.tiny_cola_config``: a ColA run config on the tiny assets (2 clients, interval 2)."""
    return helpers.tiny_cola_config(tiny_assets)
