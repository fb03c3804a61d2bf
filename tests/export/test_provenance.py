"""Nothing silent about what an adapter is (issue 24): it remembers its base and its data, and
`eval`, `merge`, `export` and `train --resume` refuse a mismatch (exit 2, naming both sides)
unless `--force`; `--overwrite` clears the whole run folder; LoRA targets that no export could
carry exactly are refused before training, and by every export."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from finetune.cli.main import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_base):
    """One short run on the tiny base: (recipe path, run folder, data file, raw recipe)."""
    root = tmp_path_factory.mktemp("provenance")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Capital {i}?"},
                                                     {"role": "assistant", "content": f"City {i}"}]}) + "\n"
                            for i in range(8)))
    raw = {"model": {"base": str(tiny_base), "quantization": "none"},
           "datasets": [{"path": str(data)}],
           "data": {"max_seq_len": 128, "cache_dir": str(root / "cache")},
           "lora": {"r": 4, "alpha": 8, "targets": ["attention"]},
           "train": {"output_dir": str(root / "run"), "max_steps": 2, "save_every": 1, "batch_size": 2,
                     "lr": 1e-3, "seed": 0, "scheduler": "constant"}}
    path = root / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    return SimpleNamespace(root=root, recipe=path, out=root / "run", data=data, raw=raw)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A base of another shape (two KV-shared layers), whose config.json differs."""
    from finetune.demo.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("other_base"), seed=0, num_kv_shared_layers=2)


def err(capsys) -> str:
    """The one error line on stderr (train's progress bars go there too)."""
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_adapter_keeps_its_base_and_data(run, tiny_base):
    from finetune.model.provenance import FILE, base_fingerprint

    prov = json.loads((run.out / "adapter" / FILE).read_text())
    assert prov["base"] == str(tiny_base) and prov["base_config"] == base_fingerprint(str(tiny_base))
    assert prov["datasets"] == [str(run.data)] and len(prov["data"]) == 16


def test_eval_refuses_an_adapter_of_another_base(run, other_base, capsys):
    """It used to run, report the recipe's base, and overwrite the adapter's eval/eval.json."""
    from finetune.model.provenance import base_fingerprint

    recipe = run.root / "other.yaml"
    recipe.write_text(yaml.safe_dump({**run.raw, "model": {"base": str(other_base), "quantization": "none"}}))
    adapter = run.out / "adapter"
    assert main(["eval", str(recipe), "--adapter", str(adapter)]) == 2
    line = err(capsys)
    theirs, ours = base_fingerprint(str(run.raw["model"]["base"])), base_fingerprint(str(other_base))
    assert theirs != ours
    assert line.startswith(f"error: {adapter}: was trained on {run.raw['model']['base']} (config {theirs}), "
                           f"not on {other_base} (config {ours})")
    assert "--force" in line and not (adapter / "eval").exists()


@pytest.mark.parametrize("verb", [["merge"], ["export", "--format", "vllm"], ["export", "--format", "gguf"]])
def test_merge_and_export_refuse_another_base(run, other_base, capsys, tmp_path, verb):
    out = tmp_path / "out"
    assert main([*verb, str(run.out / "adapter"), str(out), "--base", str(other_base)]) == 2
    assert "was trained on" in err(capsys) and not out.exists()


def test_resume_refuses_changed_data_unless_forced(run, capsys):
    raw = json.loads(json.dumps(run.raw))
    raw["train"]["output_dir"] = str(run.root / "resumed")
    data = run.root / "resumed.jsonl"
    data.write_text(run.data.read_text())
    raw["datasets"] = [{"path": str(data)}]
    recipe = run.root / "resumed.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe)]) == 0
    before = json.loads((run.root / "resumed" / "provenance.json").read_text())["data"]
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:5]))  # 8 -> 5 records
    args = ["train", str(recipe), "train.max_steps=3", "--resume"]
    assert main(args) == 2
    line = err(capsys)
    assert f"began on datasets ['{data}'] (data {before}); they now hold data " in line and "--force" in line
    capsys.readouterr()
    assert main([*args, "--force"]) == 0
    assert "warning:" in capsys.readouterr().out


def test_overwrite_clears_the_whole_run_folder_and_says_what(run, capsys):
    raw = json.loads(json.dumps(run.raw))
    raw["train"].update(output_dir=str(run.root / "again"), max_steps=1)
    recipe = run.root / "again.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe)]) == 0
    out = run.root / "again"
    (out / "best").mkdir()
    (out / "best" / "best.json").write_text('{"step": 7}')  # an old run's leftovers
    (out / "eval").mkdir()
    (out / "eval" / "eval.json").write_text("{}")
    capsys.readouterr()
    assert main(["train", str(recipe), "--overwrite"]) == 0
    said = capsys.readouterr().out
    assert "--overwrite: removing" in said and "best" in said and "eval" in said and "checkpoints" in said
    assert not (out / "best").exists() and not (out / "eval").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_embedding_targets_are_refused_before_training(run, capsys):
    """LoRA on embed_tokens trained; vLLM/SGLang then dropped it, and merge/gguf/ollama failed
    their proof without naming why (Gemma ties the embedding to the output head)."""
    raw = json.loads(json.dumps(run.raw))
    raw["lora"]["targets"] = ["attention", "embed_tokens"]
    recipe = run.root / "embed.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(recipe)]) == 2
    line = err(capsys)
    assert line.startswith("error: lora.targets[1]: 'embed_tokens' matches model.language_model.embed_tokens, an "
                           "embedding")
    assert "ties the token embedding to the output head" in line and "vllm" in line
    assert main(["train", str(recipe), "--overwrite"]) == 2
    assert "lora.targets[1]" in err(capsys)


def test_every_export_refuses_an_embedding_lora_up_front(run, tiny_base, tmp_path, capsys):
    """An adapter made elsewhere (PEFT directly) with LoRA on the embeddings."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.model.load import load_base

    torch.manual_seed(0)
    model = get_peft_model(load_base(str(tiny_base), device="cpu"),
                           LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    model.save_pretrained(tmp_path / "embed")
    for verb in (["merge"], *(["export", "--format", f] for f in ("vllm", "sglang", "gguf", "ollama", "merged"))):
        out = tmp_path / f"out-{verb[-1]}"
        assert main([*verb, str(tmp_path / "embed"), str(out)]) == 2, verb
        line = err(capsys)
        assert "embed_tokens" in line and "embedding" in line, (verb, line)
        assert not out.exists(), verb
