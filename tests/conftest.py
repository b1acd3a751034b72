import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZERS = ROOT.parent / "shared" / "tokenizers"


@pytest.fixture
def v2_tokenizer_path():
    path = SHARED_TOKENIZERS / "open_llama_v2.model"
    if not path.is_file():
        pytest.skip("../shared/tokenizers is absent")
    return path
