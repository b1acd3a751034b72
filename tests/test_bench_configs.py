"""The benchmarks' model configs build: a benchmark whose config went stale fails in `make bench`
alone, after minutes of other benchmarks."""

import pytest

from bench import bench_generate
from fot.config import RetrievalConfig


@pytest.mark.parametrize("model", bench_generate.MODELS)
def test_generate_bench_reads_with_the_default_memory_dtype_and_the_prompts_capacity(model):
    cfg = bench_generate.config(model, 8192)
    assert cfg.retrieval.dtype == RetrievalConfig().dtype == "bfloat16"
    assert cfg.retrieval.capacity == 8192
