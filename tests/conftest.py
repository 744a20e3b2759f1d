import os
import sys
import tempfile
from pathlib import Path

# Share Inductor's compiled kernels between test processes and runs (C++ compiles take tens of seconds).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "zp-compile-inductor-cache"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> path of a tiny random checkpoint, built once per session on demand."""
    from zp_compile.models import tiny

    root = tmp_path_factory.mktemp("ckpt")
    cache: dict = {}

    def get(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            name = family + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            cache[key] = tiny(family, root / name, **overrides)
        return cache[key]

    return get


SERVED_LABELS = [" yes", " no"]


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """The tiny checkpoint the server tests serve: 2 layers, 6 experts, a 256-token limit, a tokenizer."""
    from zp_compile.models import tiny_with_tokenizer

    return tiny_with_tokenizer("qwen3_moe", tmp_path_factory.mktemp("serve-tiny"), layers=2, num_experts=6, max_position_embeddings=256)


@pytest.fixture(scope="session")
def served(served_checkpoint):
    """One ``zp-compile serve`` (2 ranks, aot_eager, labels yes/no) for every test that leaves its state as
    it found it: a start costs a torchrun launch and a compile. Tests read its counters as deltas."""
    from server_utils import Server

    with Server(served_checkpoint, "--backend", "aot_eager", "--labels", *SERVED_LABELS, "--max-tokens-per-rank", "1024") as srv:
        yield srv

