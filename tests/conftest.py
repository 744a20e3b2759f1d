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
