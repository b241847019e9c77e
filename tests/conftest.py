from pathlib import Path

import pytest
import torch

from trimode.model.config import NLDConfig
from trimode.model.transformer import NLDTransformer

DATA = Path(__file__).parent / "data"
TINY_A = DATA / "tiny-a"


def random_model(seed: int = 0, dtype=torch.float64, vocab: int = 64, layers: int = 2, lora: bool = False,
                 scale: float = 3.0) -> NLDTransformer:
    """A tiny random NLD network with peaky logits (so drafts are sometimes accepted)."""
    torch.manual_seed(seed)
    cfg = NLDConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_id=3, mask_token_id=5,
                    block_size=4)
    net = NLDTransformer(cfg).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        net.diffusion_head.weight.mul_(scale)
    if lora:
        for layer in net.encoder.layers:
            o = layer.self_attn.o_proj
            a = torch.randn(4, o.weight.shape[1], dtype=dtype) * 0.1
            b = torch.randn(o.weight.shape[0], 4, dtype=dtype) * 0.1
            o.set_adapter(a, b, 2.0)
    return net.eval()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core CPU every op would wait for them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_a_dir() -> Path:
    return TINY_A


from tests import engine_process  # noqa: E402

if engine_process.ENABLED:
    engine_process.install()


def pytest_collection_modifyitems(config, items):
    if engine_process.ENABLED:
        engine_process.skip_in_process_only(items)
