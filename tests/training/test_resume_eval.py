"""Exact resume with evaluation on (issue 24): an eval pass leaves nothing behind that changes
the next training step, so a QLoRA run resumed across an eval equals the straight run bit for bit.

The reported case: bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel the first
time an eval-mode forward runs without gradients, and keeps it packed, so every step after the
first eval computed differently (loss 7.01207 vs 7.01425 at step 11). The CPUs that take that
path are chosen by bitsandbytes' own `has_avx512bf16()`; it is answered True here so that the
path is taken on any CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.config.recipe import recipe_from_dict


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def raw(tiny_base, demo_data, out: Path, **train) -> dict:
    data = Path(demo_data)
    return {"model": {"base": str(tiny_base), "quantization": "nf4"},
            "datasets": [{"path": str(p)} for p in sorted(data.glob("train_*.jsonl"))],
            "eval_datasets": [{"path": str(data / "eval.jsonl")}],
            "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(out.parent / "cache")},
            "lora": {"r": 8, "alpha": 16, "targets": ["attention", "mlp", "vision", "audio"], "dropout": 0.1},
            "train": {"output_dir": str(out), "batch_size": 2, "lr": 1e-3, "seed": 0, "scheduler": "constant",
                      "eval_every": 2, "gradient_checkpointing": False, **train}}


def test_the_eval_pass_leaves_model_and_rng_as_they_were(tiny_base, avx512bf16_cpu):
    from finetune.model.load import held_out_mode, load_base

    model = load_base(str(tiny_base), quantization="nf4", device="cpu").train()
    four_bit = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert four_bit and all(m.support_avx512bf16_for_cpu for m in four_bit)  # the packing path is armed
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    rng = torch.get_rng_state()
    with held_out_mode(model), torch.no_grad():
        assert not model.training
        model(input_ids=ids)
        torch.rand(3)  # whatever the pass draws
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_resume_across_an_eval_equals_straight(tiny_base, demo_data, tmp_path, avx512bf16_cpu):
    """5 steps straight vs 3 steps then --resume to 5; evals at steps 2 and 4."""
    from safetensors.torch import load_file

    from finetune.training.loop import train

    straight = train(recipe_from_dict(raw(tiny_base, demo_data, tmp_path / "straight", max_steps=5)))
    first = raw(tiny_base, demo_data, tmp_path / "resumed", max_steps=3)
    train(recipe_from_dict(first))
    first["train"]["max_steps"] = 5
    resumed = train(recipe_from_dict(first), resume=True)
    assert resumed.losses == straight.losses[3:]  # bit for bit
    a = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]


def test_resume_after_ctrl_c_across_an_eval_equals_straight(tiny_base, demo_data, tmp_path, avx512bf16_cpu,
                                                            monkeypatch):
    """Ctrl-C (a real SIGINT to this process) during the eval at step 4: the run finishes the
    step, writes a checkpoint and stops; resumed, it ends where the straight run ends."""
    import signal

    import finetune.training.loop as loop
    from finetune.errors import TrainingStopped

    straight = loop.train(recipe_from_dict(raw(tiny_base, demo_data, tmp_path / "straight", max_steps=6)))
    real, calls = loop.eval_loss, []

    def eval_then_ctrl_c(*args, **kw):
        calls.append(1)
        out = real(*args, **kw)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return out

    recipe = raw(tiny_base, demo_data, tmp_path / "stopped", max_steps=6)
    monkeypatch.setattr(loop, "eval_loss", eval_then_ctrl_c)
    with pytest.raises(TrainingStopped) as stopped:
        loop.train(recipe_from_dict(recipe))
    assert stopped.value.step == 4
    monkeypatch.setattr(loop, "eval_loss", real)
    resumed = loop.train(recipe_from_dict(recipe), resume=True)
    assert resumed.losses == straight.losses[4:]
    assert torch.equal(_weights(resumed.adapter_dir), _weights(straight.adapter_dir))


def _weights(adapter: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    return torch.cat([state[k].flatten() for k in sorted(state)])
