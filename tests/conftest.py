"""Shared fixtures: a tiny gemma4_unified base, its processor, a small demo dataset, recipes.

Session-scoped and built once (a few seconds): treat what they return as read-only. A test
that needs to change a file copies it into its own `tmp_path` first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models on 2 cores: OpenMP threads spin against each other and make small ops up to
    20x slower (see finetune.training.loop.cpu_threads_for), so the suite computes on one thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A complete tiny base folder (config, safetensors, tokenizer, processor, chat template),
    written with `save_pretrained` like a real checkpoint (finetune.demo.tiny_model.write_tiny_model)."""
    from finetune.demo.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_base"), seed=0)


@pytest.fixture(scope="session")
def processor(tiny_base):
    """The tiny base's processor loaded back through AutoProcessor, image budget 70."""
    from finetune.model.load import load_processor

    return load_processor(str(tiny_base), 70)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small copy of the bundled demo data (finetune.demo.data): per-task train files
    train_{image,audio,text,mixed}.jsonl (8 + 8 + 8 + 4 records), eval.jsonl, images/, audio/."""
    from finetune.demo.data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo_data"), seed=0, n_image=8, n_audio=8,
                          n_text_repeat=1, n_mixed=4, n_eval_each=2, text_phrasings=3)


@pytest.fixture
def make_recipe(tiny_base, tmp_path):
    """`make_recipe(datasets=[...], data={...}, train={...}, **sections)` → a validated Recipe.

    `model.base` is the tiny base, `train.output_dir` and `data.cache_dir` live in this
    test's tmp_path; anything given overrides those defaults (sections are merged key by key).
    """
    from finetune.config.recipe import recipe_from_dict

    def make(datasets, **sections):
        raw = {"model": {"base": str(tiny_base), "quantization": "none"}, "datasets": datasets,
               "data": {"cache_dir": str(tmp_path / "cache")},
               "train": {"output_dir": str(tmp_path / "out")}}
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
        return recipe_from_dict(raw)

    return make


@pytest.fixture
def train_on_two_ranks():
    """`train_on_two_ranks(recipe_path)`: `finetune train` under torchrun on 2 CPU ranks (gloo);
    asserts it succeeded with the same adapter on both ranks and returns its output."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]

    def run(path: Path) -> str:
        env = dict(os.environ, PYTHONPATH=str(repo), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "finetune.cli", "train", str(path)]
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert "adapter identical on 2 ranks" in out
        return out

    return run
