import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Many tests (and the subprocesses of the resume and multi-process tests) compile the same small
# programs: a persistent compilation cache shared by the xdist workers saves about a third of the time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fot-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZERS = ROOT.parent / "shared" / "tokenizers"


@pytest.fixture
def v2_tokenizer_path():
    path = SHARED_TOKENIZERS / "open_llama_v2.model"
    if not path.is_file():
        pytest.skip("../shared/tokenizers is absent")
    return path
