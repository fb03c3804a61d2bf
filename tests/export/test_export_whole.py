"""Every adapter the shipped recipes produce exports whole to every server, with the plain command.

Adapters are made with PEFT on the tiny base from each recipe's own `lora` section (targets, r,
alpha), with random nonzero B so that every update, the vision/audio projections' included,
moves the probe (text + an image + an audio clip). The references are kept implementations:
PEFT on the base (logits), the merge (tensors), llama.cpp's converter's layout rules (golden
types below, checked against the converter itself in tests/export/test_llamacpp.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from finetune.errors import UserError
from finetune.model.families import GEMMA4_UNIFIED
from finetune.model.lora import target_regex

REPO = Path(__file__).resolve().parents[2]
# Every shipped recipe that trains an adapter (a drafter-alignment recipe's result is a drafter:
# `export --format drafter`, tests/drafter/test_drafter.py).
RECIPES = {p.stem: p for p in sorted((REPO / "recipes").rglob("*.yaml"))
           if (yaml.safe_load(p.read_text()).get("train") or {}).get("objective") != "drafter"}
FORMATS = ("vllm", "sglang", "gguf", "ollama", "merged")
PROJECTIONS = ("model.embed_vision.patch_dense", "model.embed_vision.multimodal_embedder.embedding_projection",
               "model.embed_audio.embedding_projection")


def make_adapter(base: Path, out: Path, targets: list[str], r: int, alpha: int, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)  # PEFT draws A from the global generator
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False,
                                            target_modules=target_regex(targets, GEMMA4_UNIFIED)))
    random_lora_b(peft, seed)
    peft.save_pretrained(out)
    return out


def random_lora_b(model, seed: int) -> None:
    """Every LoRA B drawn from N(0, 0.05²) under `seed`: an adapter that moves the logits (PEFT
    starts B at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def resave(model, src: Path, out: Path, **save) -> Path:
    """`model` saved to `out` with the tokenizer, processor and template files of `src`."""
    model.save_pretrained(out, **save)
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja") and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return out


def textured_base(tiny_base: Path, out: Path) -> Path:
    """The tiny base with its vision embedder's LayerNorms and biases drawn at random: at their
    init (ones, zeros) a norm saved under the wrong name or in the wrong patch order changes
    nothing, and no test could see it."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.model.embed_vision.named_parameters():
            if p.ndim == 1:
                p.copy_(float(name.endswith("weight")) + 0.3 * torch.randn(p.shape, generator=gen))
    return resave(model, tiny_base, out)


@pytest.fixture(scope="module")
def base(tiny_base, tmp_path_factory) -> Path:
    return textured_base(tiny_base, tmp_path_factory.mktemp("textured") / "base")


@pytest.fixture(scope="module")
def recipe_adapters(base, tmp_path_factory) -> dict[str, Path]:
    """One adapter per shipped recipe, with that recipe's LoRA targets, rank and alpha."""
    root = tmp_path_factory.mktemp("recipe_adapters")
    out = {}
    for i, (name, path) in enumerate(RECIPES.items()):
        lora = yaml.safe_load(path.read_text())["lora"]
        out[name] = make_adapter(base, root / name, lora["targets"], lora["r"], lora["alpha"], seed=i)
    return out


@pytest.fixture(scope="module")
def probe(base):
    from finetune.export.merge import probe_batch

    return probe_batch(str(base))[1]


def served_logits(model_dir: Path, adapter: Path | None, batch: dict) -> torch.Tensor:
    """transformers + PEFT on a folder, as the servers would load it."""
    from finetune.export.merge import load_base, logits

    return logits(load_base(str(model_dir), GEMMA4_UNIFIED), batch, adapter)


def test_the_recipes_cover_the_projection_cases():
    """The matrix below is only as good as the recipes it reads: the demo and three 12B recipes put
    LoRA on the projections (the case this export exists for), one doesn't."""
    targets = {name: yaml.safe_load(p.read_text())["lora"]["targets"] for name, p in RECIPES.items()}
    assert set(targets) == {"demo", "image-qa", "audio-tasks", "mixed-image-audio-text", "text-domain-adaptation",
                            "preference-demo", "preference-dpo", "grpo-demo", "grpo"}
    with_projections = {n for n, t in targets.items() if {"vision", "audio", "all"} & set(t)}
    assert with_projections == {"demo", "image-qa", "audio-tasks", "mixed-image-audio-text", "preference-demo",
                                "preference-dpo", "grpo-demo", "grpo"}


@pytest.fixture(scope="module")
def references(recipe_adapters, base, probe) -> dict[str, tuple[torch.Tensor, float]]:
    """{recipe: (base + adapter's logits on the probe, how far the adapter moves them)}."""
    plain = served_logits(base, None, probe)
    out = {}
    for name, adapter in recipe_adapters.items():
        ref = served_logits(base, adapter, probe)
        out[name] = ref, float((ref - plain).abs().max())
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_plain_export_is_whole(recipe_adapters, references, base, probe, tmp_path, recipe, fmt):
    """The plain export of each recipe's adapter succeeds for each format, says what to serve, and
    what it serves reproduces base + adapter on text, image and audio."""
    from finetune.export import export
    from finetune.model.adapters import lora_pairs, read_adapter

    adapter = recipe_adapters[recipe]
    media = sorted(m for m in lora_pairs(read_adapter(adapter)[1]) if m in PROJECTIONS)
    out = tmp_path / fmt
    report = export(fmt, adapter, out)
    serve = report["serve"]
    assert {"model", "adapter", "command"} <= set(serve) and json.loads((out / "export_report.json").read_text())[
        "serve"] == serve
    ref, effect = references[recipe]
    if fmt in ("vllm", "sglang"):
        model = out / "base" if media else base
        assert serve["model"] == str(model) and serve["adapter"] == str(out)
        assert serve["command"].startswith("vllm serve" if fmt == "vllm" else "python -m sglang.launch_server")
        diff = float((served_logits(model, out, probe) - ref).abs().max())
        if media:
            linked = report["linked_base"]
            assert linked["tensor_check"]["ok"] and linked["logits"]["ok"]
            assert linked["logits"]["max_abs_diff"] == pytest.approx(diff, abs=1e-6)
            assert sorted(k for f in linked["files"] for k in f.get("updated_tensors", [])) == sorted(
                {"model.embed_vision.patch_dense": "model.vision_embedder.patch_dense.weight",
                 "model.embed_vision.multimodal_embedder.embedding_projection":
                     "model.embed_vision.embedding_projection.weight",
                 "model.embed_audio.embedding_projection": "model.embed_audio.embedding_projection.weight"}[m]
                for m in media)
            assert diff <= linked["logits"]["merge_tolerance"]
        else:
            assert "linked_base" not in report and diff <= 1e-4
    elif fmt in ("gguf", "ollama"):
        assert serve["adapter"] == str(out / "adapter.gguf") and serve["mmproj"] == str(out / "mmproj.gguf")
        assert serve["command"] == (f"llama-server -m BASE.gguf --lora {out / 'adapter.gguf'} --mmproj "
                                    f"{out / 'mmproj.gguf'}" if fmt == "gguf" else
                                    f"ollama create ollama -f {out / 'Modelfile'} && ollama run ollama")
        assert report["mmproj"]["ok"] and report["mmproj"]["merged_modules"] == media
        logits = report["logits"]
        assert logits["ok"] and logits["lora_effect"] == pytest.approx(effect, rel=1e-6)
        # gguf: the library's default f32, no rounding: as tight as the merge; ollama rounds to f32's f16
        bound = logits["merge_tolerance"] if report["outtype"] == "f32" else logits["rounding_tolerance"]
        assert logits["max_abs_diff"] <= bound
    else:
        assert serve == {"model": str(out), "adapter": None, "command": f"vllm serve {out}"}
        assert report["ok"] and not report["mismatched_tensors"] and report["merge_diff"] <= report["merge_tolerance"]
        diff = float((served_logits(out, None, probe) - ref).abs().max())
        assert diff == pytest.approx(report["max_abs_diff"], abs=1e-5)  # bf16 rounding, as the merge reports it
    assert effect > 0.1  # the adapter moves the probe: the comparisons above are not vacuous


def test_projection_updates_move_image_and_audio_alone(recipe_adapters, base, probe):
    """What the linked folder and the mmproj carry is visible on its own: with the text LoRA left
    out, the projection updates still change the probe's image and audio features."""
    from finetune.export.merge import load_base
    from finetune.model.adapters import delta, lora_pairs, read_adapter

    config, state = read_adapter(recipe_adapters["demo"])
    pairs = lora_pairs(state)
    model = load_base(str(base), GEMMA4_UNIFIED)

    def features():
        image = model.model.get_image_features(probe["pixel_values"], probe["image_position_ids"]).pooler_output[0]
        return image, model.model.get_audio_features(probe["input_features"]).pooler_output

    with torch.no_grad():
        before = features()
        for m in PROJECTIONS:
            model.get_submodule(m).weight += delta(config, m, *pairs[m])
        after = features()
    assert all(float((a - b).abs().max()) > 1e-2 for a, b in zip(after, before))


# --- the linked model folder -----------------------------------------------------------------


def test_linked_folder_adds_the_projection_bytes_only(recipe_adapters, base, tmp_path):
    """What the folder adds beyond links: the projection tensors (on a copy-on-write file system)
    or the file that holds them (elsewhere, reported as such). The 12B keeps its projections in
    0.37 % of its bytes (its config, bundled for `finetune plan`), so there it is < 1 %."""
    from safetensors import safe_open
    from transformers import AutoConfig, Gemma4UnifiedForConditionalGeneration

    from finetune.export.vllm import export_vllm
    from finetune.plan.skeleton import CONFIG_DIR

    report = export_vllm(recipe_adapters["mixed-image-audio-text"], tmp_path / "v")
    account = report["linked_base"]
    with safe_open(base / "model.safetensors", "pt") as st:
        projection_bytes = sum(st.get_tensor(k).nbytes for k in (
            "model.vision_embedder.patch_dense.weight", "model.embed_vision.embedding_projection.weight",
            "model.embed_audio.embedding_projection.weight"))
    (f,) = account["files"]  # the tiny base is one file, like the 12B's 24 GB model.safetensors
    assert f["updated_bytes"] == account["updated_tensor_bytes"] == projection_bytes
    assert f["how"] in ("clone, patched", "copy, patched")
    assert f["written"] == (projection_bytes if f["how"].startswith("clone") else f["bytes"])
    assert account["bytes_written"] == f["written"] + account["small_file_bytes"]

    spec = json.loads((CONFIG_DIR / "gemma-4-12b.json").read_text())
    spec.pop("_source")
    with torch.device("meta"):
        big = Gemma4UnifiedForConditionalGeneration(AutoConfig.for_model(**spec))
    total = sum(p.numel() for p in big.parameters())
    share = sum(big.get_submodule(m).weight.numel() for m in PROJECTIONS) / total
    assert 0.003 < share < 0.01


@pytest.fixture(scope="module")
def sharded(base, tmp_path_factory) -> tuple[Path, Path]:
    """(the base saved in ~1 MB shards, so that some files hold no projection tensor; the demo
    recipe's adapter on it)."""
    from transformers import AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("sharded")
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    in_shards = resave(model, base, root / "base", max_shard_size="1MB")
    lora = yaml.safe_load(RECIPES["demo"].read_text())["lora"]
    return in_shards, make_adapter(in_shards, root / "adapter", lora["targets"], lora["r"], lora["alpha"], seed=7)


@pytest.mark.parametrize("link", ["hard", "symlink"])
def test_linked_folder_links_what_it_can_and_survives_a_move(sharded, probe, tmp_path, link):
    from finetune.export.vllm import export_vllm

    base, adapter = sharded
    report = export_vllm(adapter, tmp_path / "v", link=link)
    files = report["linked_base"]["files"]
    linked = [f for f in files if f["how"] == f"{link} link"]
    patched = [f for f in files if f["how"].endswith("patched")]
    assert linked and patched and len(linked) + len(patched) == len(files)
    for f in linked:
        dst, src = tmp_path / "v" / "base" / f["file"], base / f["file"]
        assert os.path.samefile(dst, src) and dst.is_symlink() == (link == "symlink")
    assert report["linked_base"]["tensor_check"]["index_is_the_base_s"]
    assert (tmp_path / "v" / "base" / "model.safetensors.index.json").is_file()
    ref = served_logits(base, adapter, probe)
    moved = tmp_path / "elsewhere" / "v"
    shutil.move(tmp_path / "v", moved)  # hard links and absolute symlinks stay valid
    diff = float((served_logits(moved / "base", moved, probe) - ref).abs().max())
    assert diff <= report["linked_base"]["logits"]["merge_tolerance"]


def test_hard_links_across_file_systems_are_refused_before_writing(sharded, tmp_path):
    from finetune.export.vllm import export_vllm

    base, adapter = sharded
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system to write to")
    out = other / f"finetune-test-{os.getpid()}" / "v"
    try:
        with pytest.raises(UserError) as e:
            export_vllm(adapter, out)
        assert e.value.where == str(out) and "hard links can't cross file systems" in e.value.what
        assert "--link symlink" in e.value.fix
        assert not out.exists()
        assert export_vllm(adapter, out, link="symlink")["linked_base"]["tensor_check"]["ok"]
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def test_an_overlay_shard_would_be_shadowed(base, tmp_path):
    """Why the folder rewrites tensors in place instead of mapping them to a small extra shard in
    the index: loaders read every tensor of every indexed file (vLLM, SGLang), and transformers
    keeps the base file's stale copy. If this starts failing, transformers honours the index
    per tensor; vLLM and SGLang still don't."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    key = "model.embed_audio.embedding_projection.weight"
    out = tmp_path / "overlay"
    out.mkdir()
    for f in base.iterdir():
        (os.link if f.suffix == ".safetensors" else shutil.copy2)(f, out / f.name)
    with safe_open(base / "model.safetensors", "pt") as st:
        keys, stale = list(st.keys()), st.get_tensor(key)
    save_file({key: stale + 1}, str(out / "zz-projections.safetensors"), metadata={"format": "pt"})
    index = {k: "model.safetensors" for k in keys} | {key: "zz-projections.safetensors"}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    loaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(loaded.model.embed_audio.embedding_projection.weight, stale)


# --- the projector GGUF ----------------------------------------------------------------------


def test_mmproj_holds_the_merged_projector(recipe_adapters, base, tmp_path):
    """Read back and un-permuted, every projector tensor equals the low-memory merge's tensor (base
    + update in fp32, one rounding: none at f32), and the layout is llama.cpp's: a patch value at
    (row, col, channel) moves to CHW position channel·p² + row·p + col."""
    from safetensors.torch import load_file

    from finetune.export.gguf import export_gguf
    from finetune.export.merge import merge_adapter
    from finetune.export.mmproj import projector_weights, read_mmproj
    from finetune.model.families import family_config

    adapter = recipe_adapters["demo"]
    report = export_gguf(adapter, tmp_path / "g", outtype="f32")
    merge_adapter(adapter, tmp_path / "m", dtype="fp32", low_memory=True)
    merged = load_file(tmp_path / "m" / "model.safetensors")
    _, cfg = family_config(str(base))
    weights = projector_weights(tmp_path / "g" / "mmproj.gguf", cfg)
    assert len(weights) == report["mmproj"]["tensors"] == 11
    for key, t in weights.items():
        assert torch.equal(t, merged[key]), key
    meta, values, _ = read_mmproj(tmp_path / "g" / "mmproj.gguf")
    p = 48
    row, col, ch = 5, 17, 2
    assert values["v.patch_embd.weight"][3, ch * p * p + row * p + col] == merged[
        "model.vision_embedder.patch_dense.weight"][3, row * p * 3 + col * 3 + ch]
    assert values["v.position_embd.weight"].shape == (2, 1120, 64)
    assert {k: meta[k] for k in ("general.architecture", "general.type", "clip.vision.projector_type",
                                 "clip.audio.projector_type", "clip.vision.projection_dim",
                                 "clip.audio.embedding_length")} == {
        "general.architecture": "clip", "general.type": "mmproj", "clip.vision.projector_type": "gemma4uv",
        "clip.audio.projector_type": "gemma4ua", "clip.vision.projection_dim": 128, "clip.audio.embedding_length": 640}


# The types llama.cpp's converter gave the tiny projector (convert_hf_to_gguf.py --mmproj --outtype T).
CONVERTER_TYPES = {
    "f16": {"mm.a.input_projection.weight": "f16", "mm.input_projection.weight": "f16", "v.patch_embd.weight": "f16"},
    "bf16": {"mm.a.input_projection.weight": "bf16", "mm.input_projection.weight": "bf16",
             "v.patch_embd.weight": "f32"},
    "q8_0": {"mm.a.input_projection.weight": "q8_0", "mm.input_projection.weight": "q8_0",
             "v.patch_embd.weight": "f32"},
}


@pytest.mark.parametrize("outtype", sorted(CONVERTER_TYPES))
def test_mmproj_types_are_the_converters(recipe_adapters, tmp_path, outtype):
    from finetune.export.gguf import export_gguf

    report = export_gguf(recipe_adapters["image-qa"], tmp_path / "g", outtype=outtype)
    types = report["mmproj"]["types"]
    assert {k: v for k, v in types.items() if v != "f32"} == {k: v for k, v in CONVERTER_TYPES[outtype].items()
                                                              if v != "f32"}
    assert report["logits"]["ok"] and report["logits"]["rounding_diff"] > 0  # rounded, within its share


def test_mmproj_read_back_catches_a_corrupt_file(recipe_adapters, tmp_path, monkeypatch):
    import finetune.export.mmproj as mmproj
    from finetune.export.gguf import export_gguf
    from finetune.model.adapters import ParityError

    real = mmproj.to_gguf_layout  # a writer that forgets patch_ln1's CHW order
    monkeypatch.setattr(mmproj, "to_gguf_layout", lambda t, layout, cfg: real(t, None if layout == "chw" else layout,
                                                                             cfg))
    for outtype in ("f32", "q8_0"):  # (q8_0: the rounding's allowance must not hide it)
        with pytest.raises(ParityError, match="mmproj.gguf holds model.vision_embedder.patch_ln1"):
            export_gguf(recipe_adapters["image-qa"], tmp_path / outtype, outtype=outtype)
        report = json.loads((tmp_path / outtype / "export_report.json").read_text())
        served = report["mmproj"]["as_served"]
        # the file is as written; what its values mean to llama.cpp is not
        assert not report["mmproj"]["mismatched_tensors"] and not served["ok"] and served["max_rel_diff"] > 0.1


def test_a_failed_proof_leaves_no_files_to_serve(recipe_adapters, tmp_path, monkeypatch, capsys):
    """The CLI removes what a failed export wrote and keeps its report beside the folder."""
    import finetune.export.mmproj as mmproj
    from finetune.cli.main import main

    real = mmproj.to_gguf_layout  # the same forgotten CHW order, through the verb a user runs
    monkeypatch.setattr(mmproj, "to_gguf_layout", lambda t, layout, cfg: real(t, None if layout == "chw" else layout,
                                                                             cfg))
    out = tmp_path / "o"
    assert main(["export", "--format", "ollama", str(recipe_adapters["image-qa"]), str(out)]) == 1
    err = capsys.readouterr().err
    assert "model.vision_embedder.patch_ln1" in err and f"removed the partial output {out}" in err
    assert not out.exists()
    kept = json.loads((tmp_path / "o.failed_report.json").read_text())
    assert kept["furthest"]["tensor"].startswith("model.vision_embedder.patch_ln1")


# --- the serve line --------------------------------------------------------------------------


def test_cli_prints_the_serve_command_and_checks_its_options(recipe_adapters, tmp_path, capsys):
    from finetune.cli.main import main

    demo = str(recipe_adapters["demo"])
    assert main(["export", "--format", "vllm", demo, str(tmp_path / "v"), "--link", "symlink"]) == 0
    report = json.loads((tmp_path / "v" / "export_report.json").read_text())
    assert report["linked_base"]["link"] == "symlink"
    assert capsys.readouterr().out.splitlines()[-1] == f"serve with: {report['serve']['command']}"
    gguf_base = tmp_path / "base.gguf"
    assert main(["export", "--format", "gguf", demo, str(tmp_path / "g"), "--base-gguf", str(gguf_base)]) == 2
    assert "base GGUF not found" in capsys.readouterr().err
    for args, err in ((["--format", "gguf", "--link", "hard"], "--link: applies to --format vllm/sglang"),
                      (["--format", "merged", "--base-gguf", "x.gguf"], "--base-gguf: applies to --format gguf/ollama"),
                      (["--format", "vllm", "--link", "hard", "--merge-projections"], "--link: applies to the linked")):
        assert main(["export", *args, demo, str(tmp_path / "x")]) == 2
        assert err in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "g").exists()
    np.testing.assert_equal(report["serve"]["model"], str(tmp_path / "v" / "base"))


def test_a_failed_linked_folder_names_the_tensor_or_its_config(recipe_adapters, tmp_path, monkeypatch):
    """vLLM's linked base folder: a tensor written wrong is named by the read-back; a config that
    changes how the (right) tensors are read is named as such by the probe."""
    import shutil

    import safetensors.torch

    import finetune.export.linked as linked
    from finetune.export.vllm import export_vllm
    from finetune.model.adapters import ParityError

    real_patch = linked._patch

    def off_by_one(dst, src, changed, config, pairs):  # one updated projection written wrong
        n = real_patch(dst, src, changed, config, pairs)
        tensors = safetensors.torch.load_file(dst)
        key = sorted(changed)[0]
        safetensors.torch.save_file({**tensors, key: tensors[key] + 1}, dst, metadata={"format": "pt"})
        return n

    monkeypatch.setattr(linked, "_patch", off_by_one)
    with pytest.raises(ParityError, match=r"/base: model\.\S+ read back other than the base's"):
        export_vllm(recipe_adapters["demo"], tmp_path / "v")
    monkeypatch.setattr(linked, "_patch", real_patch)

    real_copy = shutil.copy2

    def other_eps(src, dst):  # the folder's config read differently: every tensor right, logits not
        real_copy(src, dst)
        if Path(src).name == "config.json":
            cfg = json.loads(Path(dst).read_text())
            cfg.get("text_config", cfg)["rms_norm_eps"] = 0.5
            Path(dst).write_text(json.dumps(cfg))

    monkeypatch.setattr(linked.shutil, "copy2", other_eps)
    with pytest.raises(ParityError, match="every tensor it holds equals base [+] adapter's: the difference is in its "
                                          "config"):
        export_vllm(recipe_adapters["demo"], tmp_path / "w")
