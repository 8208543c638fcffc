import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slip_vllm.protect.artifact import ProtectConfig, protect  # noqa: E402
from slip_vllm.protect.tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """make(family, **kw) -> (original_dir, protected_out_dir), cached per argument set."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("models")

    def make(family: str, *, tie: bool = False, rank: int = 16, blind: bool = True, seed: int = 0,
             kv_heads: int = 2):
        key = (family, tie, rank, blind, seed, kv_heads)
        if key not in cache:
            tag = f"{family}-tie{int(tie)}-r{rank}-b{int(blind)}-s{seed}" + (f"-kv{kv_heads}" if kv_heads != 2 else "")
            original = make_tiny_model(family, root / tag / "original", tie=tie, seed=seed, kv_heads=kv_heads)
            from slip_vllm.core.decompose import RankPolicy

            cfg = ProtectConfig(default_rank=RankPolicy(absolute=rank), blinding=blind, seed=1000 + seed)
            protect(original, root / tag / "protected", cfg, progress=False)
            cache[key] = (original, root / tag / "protected")
        return cache[key]

    return make


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture
def one_torch_thread():
    """The machine is shared (and LAPACK's choice of singular bases depends on the thread count):
    tests that use this run on one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
