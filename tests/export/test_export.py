"""merge / combine / export round trips on the tiny base, against PEFT itself.

Adapters are made with PEFT directly (random nonzero B, so every update is visible): all
attention+MLP targets, rsLoRA with a rank pattern, attention-only with an alpha pattern,
one with vision/audio projections, and one trained for a few QLoRA steps on an NF4 base.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from finetune.demo.tiny_model import write_tiny_model
from finetune.errors import RecipeErrors, UserError
from finetune.model.adapters import PREFIX, delta, lora_pairs, read_adapter
from finetune.model.families import GEMMA4_UNIFIED
from finetune.model.lora import target_regex


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("base"), seed=0)


def _load(base: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()


def _make(base: Path, out: Path, targets: list[str], *, r: int = 8, alpha: int = 16, **lora) -> Path:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_regex(targets, GEMMA4_UNIFIED),
                     init_lora_weights=False, **lora)
    from tests.export.test_export_whole import random_lora_b

    model = get_peft_model(_load(base), cfg)
    random_lora_b(model, len(str(out)))
    model.save_pretrained(out)
    return out


def _make_qlora(base: Path, out: Path) -> Path:
    """A few real QLoRA steps on an NF4 base (bitsandbytes runs on the CPU)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(base, quantization_config=quant, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                             target_modules=target_regex(["attention", "mlp"], GEMMA4_UNIFIED)))
    ids = AutoTokenizer.from_pretrained(base)("The quick brown fox jumps over the lazy dog.",
                                              return_tensors="pt").input_ids
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    torch.manual_seed(0)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "full": _make(base, root / "full", ["attention", "mlp"]),
        "rslora": _make(base, root / "rslora", ["attention", "mlp"], use_rslora=True, rank_pattern={"down_proj": 4}),
        "attention": _make(base, root / "attention", ["attention"], r=4, alpha=8, alpha_pattern={"o_proj": 32}),
        "media": _make(base, root / "media", ["attention", "vision", "audio"]),
        "qlora": _make_qlora(base, root / "qlora"),
    }


@pytest.fixture(scope="session")
def probe(base):
    from finetune.export.merge import probe_batch

    return probe_batch(str(base))[1]


def _logits(base: Path, adapter: Path | None, batch: dict) -> torch.Tensor:
    from finetune.export.merge import logits

    return logits(_load(base), batch, adapter)


# --- the reference update ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rslora", "attention"])
def test_delta_is_peft_update(base, adapters, name):
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load(base), str(adapters[name]))
    config, state = read_adapter(adapters[name])
    for module, (A, B) in lora_pairs(state).items():
        want = model.base_model.model.get_submodule(module).get_delta_weight("default")
        torch.testing.assert_close(delta(config, module, A, B), want, rtol=1e-6, atol=1e-7)


# --- merge -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype", [("media", "bf16"), ("qlora", "fp32")])
def test_merge_parity(base, adapters, tmp_path, name, dtype):
    from finetune.export.merge import merge_adapter

    report = merge_adapter(adapters[name], tmp_path / "merged", dtype=dtype)
    # merge_diff is fp32 reassociation amplified by depth: bounded by the report's own merge
    # tolerance (1% of the LoRA effect), never by a share of it that depends on the CPU's kernels.
    assert report["ok"] and report["merge_diff"] <= report["merge_tolerance"] <= 0.01 * report["lora_effect"] + 1e-3
    assert report["reload_diff"] <= 1e-4
    assert report["checkpoint_keys"]["same"] and report["tied_embeddings"]
    assert report["tensors"] == 67 and not report["mismatched_tensors"]  # every tensor read back
    assert report["lora_effect"] > 1e-3  # the probe sees the adapter at all
    if dtype == "fp32":  # nothing rounds: what is left is the merge's own reassociation
        assert report["max_abs_diff"] <= report["merge_tolerance"]
    else:  # bf16 weights round, but far less than the adapter moves the logits
        assert report["max_abs_diff"] < 0.2 * report["lora_effect"]
    saved = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert saved["max_abs_diff"] == report["max_abs_diff"]
    assert (tmp_path / "merged" / "chat_template.jinja").is_file()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == {
        "fp32": "float32", "bf16": "bfloat16"}[dtype]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name,dtype", [("media", "bf16"), ("rslora", "fp32")])
def test_low_memory_merge_equals_the_full_merge(base, adapters, probe, tmp_path, monkeypatch, name, dtype):
    """Tensor by tensor from the safetensors files, in several shards: the same tensors, bit for
    bit, as the in-memory merge, the same config, and a folder transformers loads whose logits
    match base+adapter like the full merge's."""
    import finetune.export.merge as merge
    import finetune.export.merge_low_memory as merge_files

    full = merge.merge_adapter(adapters[name], tmp_path / "full", dtype=dtype, low_memory=False)
    monkeypatch.setattr(merge_files, "SHARD_BYTES", 256 * 1024)  # the tiny base then needs several shards
    report = merge.merge_adapter(adapters[name], tmp_path / "low", dtype=dtype, low_memory=True)
    assert report["ok"] and report["mode"] == "low_memory" and report["shards"] > 2
    assert report["checkpoint_keys"]["same"] and not report["mismatched_tensors"]
    assert (tmp_path / "low" / "model.safetensors.index.json").is_file()

    a, b = _tensors(tmp_path / "full"), _tensors(tmp_path / "low")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "low" / "config.json").read_text()) == \
        json.loads((tmp_path / "full" / "config.json").read_text())
    for f in ("chat_template.jinja", "tokenizer.json", "processor_config.json", "generation_config.json"):
        assert (tmp_path / "low" / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f

    merged_logits = _logits(tmp_path / "low", None, probe)
    ref = _logits(base, adapters[name], probe)
    assert float((merged_logits - ref).abs().max()) == pytest.approx(full["max_abs_diff"], abs=1e-6)
    if dtype == "fp32":
        assert report["update_rounding_rel_error"] <= 1e-6


def test_low_memory_merge_is_picked_by_itself_and_checks_what_it_wrote(base, adapters, tmp_path, monkeypatch):
    import safetensors.torch

    import finetune.export.merge as merge
    import finetune.export.merge_low_memory as merge_files
    from finetune.model.adapters import ParityError

    monkeypatch.setattr(merge_files, "available_bytes", lambda: 1024)  # "the fp32 model does not fit"
    assert merge.merge_adapter(adapters["full"], tmp_path / "auto")["mode"] == "low_memory"

    save = safetensors.torch.save_file

    def corrupting(tensors, path, metadata=None):  # one merged weight written wrong
        key = next(k for k in tensors if k.endswith("q_proj.weight"))
        save({**tensors, key: tensors[key] + 1}, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", corrupting)
    with pytest.raises(ParityError, match="do not equal base"):
        merge.merge_adapter(adapters["full"], tmp_path / "bad", low_memory=True)
    report = json.loads((tmp_path / "bad" / "merge_report.json").read_text())
    assert report["mismatched_tensors"] and report["mismatched_tensors"][0].endswith("q_proj.weight")


@pytest.mark.parametrize("low_memory", [False, True])
def test_merge_refuses_a_pre_quantized_base(base, adapters, tmp_path, low_memory):
    import shutil

    from finetune.export.merge import merge_adapter

    quantized = tmp_path / "nf4-base"
    shutil.copytree(base, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quantized / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        merge_adapter(adapters["full"], tmp_path / "out", base=str(quantized), low_memory=low_memory)
    assert e.value.where == str(quantized) and "pre-quantized" in e.value.what and "bitsandbytes" in e.value.what
    assert not (tmp_path / "out").exists()


def test_low_memory_merge_needs_local_safetensors(base, adapters, tmp_path):
    import shutil

    from finetune.export.merge import merge_adapter

    weightless = tmp_path / "weightless"
    shutil.copytree(base, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(UserError) as e:
        merge_adapter(adapters["full"], tmp_path / "out", base=str(weightless), low_memory=True)
    assert e.value.where == str(weightless) and "local folder" in e.value.what
    assert not (tmp_path / "out").exists()


# --- gguf ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,outtype", [("full", "f32"), ("rslora", "f32"), ("attention", "bf16"),
                                          ("qlora", "q8_0"), ("full", "f16")])
def test_gguf_read_back(base, adapters, tmp_path, name, outtype):
    import gguf

    from finetune.export.gguf import export_gguf

    report = export_gguf(adapters[name], tmp_path / "g", outtype=outtype)
    assert report["max_rel_update_diff"] <= {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}[outtype]
    reader = gguf.GGUFReader(tmp_path / "g" / "adapter.gguf")
    fields = {k: reader.fields[k].contents() for k in ("general.architecture", "general.type", "adapter.type")}
    assert fields == {"general.architecture": "gemma4", "general.type": "adapter", "adapter.type": "lora"}
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.0.attn_v.weight.lora_b" in names
    assert not any(n.startswith(("blk.1.attn_v", "blk.3.attn_v")) for n in names)  # k_eq_v layers use K as V
    if name == "rslora":  # one alpha for the file: down_proj's rank-4 scale is folded into its B
        assert report["metadata"]["adapter.lora.alpha"] == pytest.approx(16 * 8**0.5)
        assert report["folded_scale_into_b"] and all("down_proj" in m for m in report["folded_scale_into_b"])
    if name == "attention":
        assert all("o_proj" in m for m in report["folded_scale_into_b"])


# --- vllm / sglang ---------------------------------------------------------------------------

def test_vllm_folder(base, adapters, probe, tmp_path):
    from finetune.export.vllm import export_vllm

    report = export_vllm(adapters["rslora"], tmp_path / "v")
    cfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["rank_pattern"]) == (8, 8, False, {})
    assert cfg["modules_to_save"] is None and not cfg["use_dora"] and cfg["bias"] == "none"
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    _, state = read_adapter(tmp_path / "v")
    pairs = lora_pairs(state)
    assert {A.shape[0] for A, _ in pairs.values()} == {8}  # rank-4 down_proj padded with zeros
    for layer in (1, 3):  # servers put k_proj's weight in the v slot: it needs k_proj's LoRA too
        k, v = (f"model.language_model.layers.{layer}.self_attn.{p}_proj" for p in "kv")
        assert all(torch.equal(a, b) for a, b in zip(pairs[k], pairs[v]))
    assert report["v_proj_from_k_proj_layers"] == [1, 3] and report["max_lora_rank"] == 8
    assert "--max-lora-rank 8" in report["serve_command"] and report["serve_command"].startswith("vllm serve")
    assert report["max_rel_update_diff"] <= 1e-6
    # The folder is still a PEFT adapter: transformers + PEFT reproduce the source adapter.
    diff = (_logits(base, tmp_path / "v", probe) - _logits(base, adapters["rslora"], probe)).abs().max()
    assert diff <= 1e-4


def test_vllm_projection_lora_plain_links_flag_merges(base, adapters, tmp_path):
    """Plain: a linked model folder carries the projection updates; --merge-projections: a full
    merged copy. Either way the PEFT folder holds the text LoRA only."""
    from finetune.export.vllm import export_vllm

    plain = export_vllm(adapters["media"], tmp_path / "plain", server="sglang")
    assert plain["linked_base"]["tensor_check"]["ok"] and plain["linked_base"]["logits"]["ok"]
    assert plain["serve"]["model"] == str(tmp_path / "plain" / "base")
    assert plain["serve"]["command"].startswith(f"python -m sglang.launch_server --model-path {tmp_path / 'plain' / 'base'}")
    report = export_vllm(adapters["media"], tmp_path / "v", merge_projections=True)
    merged = report["merge_projections"]
    assert merged["ok"] and merged["max_abs_diff"] <= 1e-4 and merged["lora_effect"] > 1e-3
    assert report["serve_base"] == str(tmp_path / "v" / "base") and (tmp_path / "v" / "base" / "config.json").is_file()
    assert "linked_base" not in report
    for out in ("plain", "v"):
        _, state = read_adapter(tmp_path / out)
        assert not any("embed_vision" in k or "embed_audio" in k for k in state)


def test_vllm_projection_merge_in_low_memory(base, adapters, probe, tmp_path, monkeypatch):
    """When the fp32 base would not fit, the projections merge tensor by tensor; the served
    base + exported adapter still reproduce base + source adapter."""
    import finetune.export.merge_low_memory as merge_files
    from finetune.export.vllm import export_vllm

    monkeypatch.setattr(merge_files, "available_bytes", lambda: 1024)
    report = export_vllm(adapters["media"], tmp_path / "v", merge_projections=True)
    merged = report["merge_projections"]
    assert merged["mode"] == "low_memory" and merged["ok"] and not merged["mismatched_tensors"]
    assert merged["lora_modules"] == 3  # patch_dense, the vision and the audio projection; no text module
    served = _logits(tmp_path / "v" / "base", tmp_path / "v", probe)
    ref = _logits(base, adapters["media"], probe)
    assert float((served - ref).abs().max()) <= 1e-4


def test_max_lora_rank_choice():
    from finetune.export.vllm import max_lora_rank

    assert [max_lora_rank(r) for r in (1, 2, 8, 9, 64, 300, 512, 513)] == [1, 8, 8, 16, 64, 320, 512, None]


# --- ollama ----------------------------------------------------------------------------------

def _fake_base_gguf(path: Path, blocks: int) -> Path:
    import gguf

    writer = gguf.GGUFWriter(path, arch="gemma4")
    writer.add_block_count(blocks)
    writer.add_embedding_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((4, 128), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_modelfile_carries_the_template_as_ollama_reads_it():
    """Ollama's Modelfile parser takes a triple-quoted value up to the first line that ends in
    three quotes and drops unprintable characters: the TEMPLATE comes back whole, stops one a line."""
    from finetune.export.ollama import STOPS, modelfile
    from finetune.export.ollama_template import TEMPLATE

    text = modelfile("/m/base.gguf", projector=True, adapter=True)
    head, rest = text.split('TEMPLATE """', 1)
    assert head == "FROM /m/base.gguf\nFROM ./mmproj.gguf\nADAPTER ./adapter.gguf\n"
    lines = rest.split("\n")
    end = next(i for i, line in enumerate(lines) if line.rstrip().endswith('"""'))
    assert "\n".join(lines[:end + 1]).rstrip()[:-3] == TEMPLATE
    assert all(c == "\n" or c.isprintable() for c in TEMPLATE)
    assert lines[end + 1:] == [f'PARAMETER stop "{s}"' for s in STOPS] + [""]
    assert set(STOPS) == {"<turn|>", "<|turn>", "<|tool_response>"}
    for part in ("<|tool>", "<|tool_call>call:", "<|tool_response>response:", "<|think|>",
                 "<|turn>model\n{{ if not .Think }}<|channel>thought\n<channel|>"):
        assert part in TEMPLATE, part
    assert modelfile("x", projector=False, adapter=False) == (
        f'FROM x\nTEMPLATE """{TEMPLATE}"""\n' + "".join(f'PARAMETER stop "{s}"\n' for s in STOPS))


def test_ollama_folder(base, adapters, tmp_path):
    from finetune.export.ollama import PLACEHOLDER, export_ollama

    report = export_ollama(adapters["full"], tmp_path / "o", outtype="f16")
    modelfile = (tmp_path / "o" / "Modelfile").read_text()
    assert f"FROM {PLACEHOLDER}" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    assert "FROM ./mmproj.gguf" in modelfile and (tmp_path / "o" / "mmproj.gguf").is_file()  # the base's projector
    assert report["serve"]["command"] == f"ollama create o -f {tmp_path / 'o' / 'Modelfile'} && ollama run o"
    assert 'TEMPLATE """' in modelfile and "<|turn>model\n{{ if not .Think }}<|channel>thought\n<channel|>" in modelfile
    assert 'PARAMETER stop "<turn|>"' in modelfile
    assert "ollama create o -f Modelfile" in (tmp_path / "o" / "README.md").read_text()
    assert report["template_matches_base"] and report["max_rel_update_diff"] <= 2e-3
    assert json.loads((tmp_path / "o" / "export_report.json").read_text())["format"] == "ollama"

    good = _fake_base_gguf(tmp_path / "base.gguf", blocks=4)
    report = export_ollama(adapters["full"], tmp_path / "o2", base_gguf=str(good))
    assert f"FROM {good.resolve()}" in (tmp_path / "o2" / "Modelfile").read_text()
    with pytest.raises(UserError, match="block_count"):
        export_ollama(adapters["full"], tmp_path / "o3", base_gguf=str(_fake_base_gguf(tmp_path / "b6.gguf", 6)))
    with pytest.raises(UserError, match="safetensors") as e:
        export_ollama(adapters["full"], tmp_path / "o4", base_gguf=str(base))
    assert e.value.where == str(base)


# --- combine ---------------------------------------------------------------------------------

def _spec(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_combine_cat_twice_is_the_adapter(base, adapters, probe, tmp_path):
    from finetune.export.combine import combine

    full = str(adapters["full"])
    report = combine(_spec(tmp_path, method="cat", output="both",
                           adapters=[{"path": full, "weight": 0.5}, {"path": full, "weight": 0.5}]))
    assert report["rank"] == 16 and report["max_rel_distance_from_weighted_sum_of_updates"] <= 1e-5
    diff = (_logits(base, tmp_path / "both", probe) - _logits(base, adapters["full"], probe)).abs().max()
    assert diff <= 1e-4


def test_combine_rank_rules_and_spec_errors(adapters, tmp_path):
    from finetune.export.combine import combine

    with pytest.raises(UserError, match="equal rank") as e:  # full has r=8, attention r=4
        combine(_spec(tmp_path, method="linear", output="x",
                      adapters=[{"path": str(adapters["full"])}, {"path": str(adapters["attention"])}]))
    assert "cat" in e.value.fix
    with pytest.raises(RecipeErrors) as e:
        combine(_spec(tmp_path, method="ties", output="x", colour="red", adapters=[{"path": "a", "weight": "x"}]))
    wheres = {err.where.split(": ", 1)[1] for err in e.value.errors}
    assert {"colour", "density", "adapters[0].weight"} <= wheres


# --- logging ---------------------------------------------------------------------------------

def test_library_is_silent_and_logs_through_its_callback(adapters, tmp_path, capsys):
    """Only the CLI prints: a library call without `log` writes nothing; given a callback, the
    callback receives the report lines, and they are the lines the CLI prints."""
    from finetune.cli.main import main
    from finetune.export import export
    from finetune.export.combine import combine
    from finetune.export.gguf import export_gguf
    from finetune.export.merge import merge_adapter

    full = str(adapters["full"])
    merge_adapter(full, tmp_path / "m", dtype="fp32")
    merge_adapter(full, tmp_path / "low", low_memory=True)
    export_gguf(full, tmp_path / "g")
    export("ollama", full, tmp_path / "o")
    combine(_spec(tmp_path, method="cat", output="c", adapters=[{"path": full}, {"path": full}]))
    assert capsys.readouterr().out == ""  # (stderr carries transformers' own progress bars)

    lines: list[str] = []
    report = merge_adapter(full, tmp_path / "m2", dtype="fp32", log=lines.append)
    rounding = report["max_abs_diff"] - report["merge_diff"]
    assert lines == [
        f"merge: ok: merge {report['merge_diff']:.3g} (allowed {report['merge_tolerance']:.3g}), reload "
        f"{report['reload_diff']:.3g} (allowed {report['tolerance']:.3g}); saved model vs base+adapter "
        f"{report['max_abs_diff']:.3g}" + (f", of which rounding to fp32 {rounding:.3g}" if rounding > 0 else "")
        + f"; the adapter moves logits by up to {report['lora_effect']:.3g}",
        f"merge: {report['tensors']} of {report['tensors']} tensors read back equal base + update rounded once "
        "to the dtype",
        f"report: {tmp_path / 'm2' / 'merge_report.json'}",
    ]
    lines.clear()
    report = export_gguf(full, tmp_path / "g2", outtype="f16", log=lines.append)
    g2 = tmp_path / "g2"
    assert lines == [f"gguf: {report['tensors'] // 2} LoRA modules (f16), alpha 16, update max rel diff "
                     f"{report['max_rel_update_diff']:.2g} -> {g2 / 'adapter.gguf'}",
                     f"gguf: projector with 0 vision/audio updates merged -> {g2 / 'mmproj.gguf'}",
                     f"gguf: probe logits through the exported files vs base+adapter: "
                     f"{report['logits']['max_abs_diff']:.3g} (adapter moves them by {report['logits']['lora_effect']:.3g})",
                     f"serve with: llama-server -m BASE.gguf --lora {g2 / 'adapter.gguf'} --mmproj {g2 / 'mmproj.gguf'}"]
    assert capsys.readouterr().out == ""  # a callback, not stdout

    assert main(["export", "--format", "gguf", "--outtype", "f16", full, str(tmp_path / "g3")]) == 0
    assert capsys.readouterr().out.splitlines() == [line.replace(str(tmp_path / "g2"), str(tmp_path / "g3"))
                                                    for line in lines]


# --- errors ----------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def broken(adapters, base, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Bad adapters and the path each error must name."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("broken")
    pickled = _copy(adapters["full"], root / "pickled")
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    corrupt = _copy(adapters["full"], root / "corrupt")
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    nan = _copy(adapters["full"], root / "nan")
    state = load_file(nan / "adapter_model.safetensors")
    next(iter(state.values()))[0, 0] = float("nan")
    save_file(state, nan / "adapter_model.safetensors")
    # Another base: the same family, half as wide (only the config is read before refusing).
    other = root / "other-base"
    other.mkdir()
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["hidden_size"] = 64
    (other / "config.json").write_text(json.dumps(config))
    mismatched = _copy(adapters["full"], root / "mismatched")
    cfg_path = mismatched / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "base_model_name_or_path": str(other)}))
    return {
        "missing": (root / "nowhere", str(root / "nowhere")),
        "pickle": (pickled, str(pickled / "adapter_model.bin")),
        "corrupt": (corrupt, str(corrupt / "adapter_model.safetensors")),
        "nan": (nan, str(nan / "adapter_model.safetensors")),
        "mismatched": (mismatched, str(mismatched)),
    }


def _verbs():
    from finetune.export import export
    from finetune.export.merge import merge_adapter

    return {
        "merge": lambda a, o: merge_adapter(a, o),
        "gguf": lambda a, o: export("gguf", a, o),
        "vllm": lambda a, o: export("vllm", a, o),
        "ollama": lambda a, o: export("ollama", a, o),
    }


@pytest.mark.parametrize("case", ["missing", "pickle", "corrupt", "nan", "mismatched"])
@pytest.mark.parametrize("verb", ["merge", "gguf", "vllm", "ollama"])
def test_bad_adapters_are_user_errors(broken, tmp_path, case, verb):
    adapter, where = broken[case]
    with pytest.raises(UserError) as e:
        _verbs()[verb](adapter, tmp_path / "out")
    assert e.value.where == where
    if case == "mismatched":
        assert "adapter for another base" in e.value.what and f"{PREFIX}model.language_model" in e.value.what
    if case == "pickle":
        assert "--allow-pickle" in e.value.fix
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_pickle_allowed_when_asked(broken, tmp_path):
    from finetune.export.gguf import export_gguf

    assert export_gguf(broken["pickle"][0], tmp_path / "g", allow_pickle=True)["max_rel_update_diff"] <= 1e-6


def test_cli_export_maps_options(adapters, tmp_path):
    from finetune.cli.export import cmd_export

    args = SimpleNamespace(format="gguf", adapter=str(adapters["attention"]), out=str(tmp_path / "g"),
                           merge_projections=True, outtype="f16", base_gguf=None, base=None, allow_pickle=False)
    with pytest.raises(UserError, match="vllm/sglang"):
        cmd_export(args)
    args.merge_projections = False
    assert cmd_export(args) == 0
    assert json.loads((tmp_path / "g" / "export_report.json").read_text())["outtype"] == "f16"


def test_cli_low_memory_flag(adapters, tmp_path, capsys):
    from finetune.cli.main import main

    assert main(["merge", str(adapters["full"]), str(tmp_path / "m"), "--low-memory"]) == 0
    assert json.loads((tmp_path / "m" / "merge_report.json").read_text())["mode"] == "low_memory"
    assert main(["export", "--format", "merged", str(adapters["full"]), str(tmp_path / "e"), "--low-memory"]) == 0
    assert json.loads((tmp_path / "e" / "export_report.json").read_text())["mode"] == "low_memory"
    capsys.readouterr()
    assert main(["export", "--format", "gguf", str(adapters["full"]), str(tmp_path / "g"), "--low-memory"]) == 2
    assert "--low-memory: applies to --format merged, not gguf" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
