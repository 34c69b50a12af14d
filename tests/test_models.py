import pytest
import torch

from fedcola import models
from tests import helpers


def test_minilm_loads_offline_and_classifies():
    model = models.load_model("minilm", "classification", num_labels=3)
    tok = models.load_tokenizer("minilm")
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) > 22_000_000
    enc = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    assert model(**enc).logits.shape == (2, 3)


def test_local_folder_loads(tmp_path):
    helpers.write_tiny_bert(tmp_path, vocab_size=99, num_hidden_layers=1)
    model = models.load_model(str(tmp_path), "classification", num_labels=2)
    assert model.config.hidden_size == 16


def test_from_scratch_models():
    gpt = models.load_model("gpt-tiny", "causal-lm", spec=models.ScratchSpec(vocab_size=50, hidden=32, layers=2, heads=2))
    out = gpt(input_ids=torch.randint(0, 50, (2, 10)))
    assert out.logits.shape == (2, 10, 50)
    vit = models.load_model("vit-tiny", "image-classification", num_labels=10, spec=models.ScratchSpec(hidden=32, layers=1, heads=2))
    assert vit(pixel_values=torch.rand(3, 1, 8, 8)).logits.shape == (3, 10)


@pytest.mark.parametrize("name", ["nope", "./no/such/dir"])
def test_unknown_model_is_one_line_listing_known_names(name):
    with pytest.raises(models.UnknownModelError) as err:
        models.load_model(name, "classification")
    msg = str(err.value)
    assert "\n" not in msg and "minilm" in msg and "smollm2" in msg


def test_unreachable_hub_id_is_one_clear_line():
    with pytest.raises(models.UnknownModelError) as err:
        models.load_model("no-such-org/no-such-model", "classification", num_labels=2)
    assert "\n" not in str(err.value) and "no-such-org/no-such-model" in str(err.value)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        models.load_model("minilm", "translation")


@pytest.mark.slow
def test_smollm2_dequantises_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDCOLA_CACHE", str(tmp_path))
    model = models.load_model("smollm2", "causal-lm")
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").exists()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    tok = models.load_tokenizer("smollm2")
    out = model(**tok(["To be, or not to be"], return_tensors="pt"))
    assert torch.isfinite(out.logits).all()


def test_flop_counter_counts_cpu_attention():
    """Attention FLOPs on CPU are counted (torch has no formula for the CPU flash kernel by itself)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    import fedcola.train  # noqa: F401  (registers the formula)

    q = torch.rand(2, 4, 16, 8, requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        out = F.scaled_dot_product_attention(q, q, q)
    assert fwd.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # QK^T and PV
    with FlopCounterMode(display=False) as bwd:
        out.sum().backward()
    assert bwd.get_total_flops() == 2 * fwd.get_total_flops() + 2 * 2 * 4 * 16 * 16 * 8
