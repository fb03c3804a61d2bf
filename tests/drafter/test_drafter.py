"""Drafter alignment: the MTP drafter distilled from base + adapter on the shared loop.

The reference for what the drafter is fed is transformers' own
`SinglePositionMultiTokenCandidateGenerator`; the reference for acceptance and losslessness is
transformers' own assisted generation (`generate(assistant_model=...)`). The tiny base and its
tiny drafter come from `finetune tiny-model` (the `tiny_base` fixture writes both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.cli.main import main
from finetune.config.recipe import recipe_from_dict
from finetune.errors import UserError

K = 3  # draft tokens per round in these tests


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_base, demo_data):
    return SimpleNamespace(root=tmp_path_factory.mktemp("drafter"), base=tiny_base, data=demo_data)


def raw_recipe(assets, name: str, *, drafter=None, **train) -> dict:
    d = Path(assets.data)
    return {
        "model": {"base": str(assets.base), "quantization": "none"},
        "datasets": [{"path": str(p)} for p in sorted(d.glob("train_*.jsonl"))],
        "eval_datasets": [{"path": str(d / "eval.jsonl")}],
        "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(assets.root / "cache")},
        "lora": {"r": 8, "alpha": 16, "targets": ["attention", "mlp"]},
        "drafter": {"path": str(assets.base / "drafter"), "num_tokens": K, "continuation_tokens": 8,
                    "ignore_eos": True, "eval_items": 3, **(drafter or {})},
        "train": {"output_dir": str(assets.root / name), "batch_size": 2, "lr": 1e-2, "seed": 0,
                  "max_steps": 4, "gradient_checkpointing": False, "warmup": 0, "scheduler": "constant", **train},
    }


def target(assets):
    from finetune.model.load import load_base

    return load_base(str(assets.base), quantization="none")


def noisy_drafter(assets, seed: int = 0):
    """The tiny drafter with large random weights: every mask or position slip shows in its logits."""
    from finetune.drafter.model import load_drafter

    drafter = load_drafter(str(assets.base / "drafter"), target(assets).config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return drafter


@pytest.fixture(scope="module")
def samples(assets, processor):
    """Rendered training samples, an image one among them (its 70 image tokens push the prompt
    past the tiny base's 64-token sliding window)."""
    from data_tools.pipeline import prepare
    from finetune.model.load import base_family

    recipe = recipe_from_dict(raw_recipe(assets, "render"))
    data = prepare(recipe, processor, str(assets.base), chat=base_family(str(assets.base)).chat,
                   rejects_path=assets.root / "rejects.jsonl", log=None)
    rows = [data.train[i] for i in range(len(data.train))]
    image = next(s for s in rows if s["modality"] == "image")
    text = next(s for s in rows if s["modality"] == "text")
    return [image, text]


@pytest.fixture(scope="module")
def aligned(assets):
    """A drafter distilled on the base through the real loop (30 steps), and its run folder."""
    from finetune.drafter.alignment import align_drafter

    recipe = recipe_from_dict(raw_recipe(assets, "distilled", max_steps=30, batch_size=4))
    report = align_drafter(recipe, None, assets.root / "distilled")
    return SimpleNamespace(path=assets.root / "distilled", report=report, recipe=recipe)


# ---------------------------------------------------------------- the tiny drafter


def test_tiny_model_writes_a_drafter_built_like_the_real_one(assets):
    from transformers import AutoConfig, Gemma4UnifiedAssistantForCausalLM

    from finetune.demo.tiny_drafter import write_tiny_drafter
    from finetune.drafter.model import check_pair

    cfg = AutoConfig.from_pretrained(assets.base / "drafter")
    text = cfg.get_text_config()
    assert cfg.model_type == "gemma4_unified_assistant"
    assert cfg.backbone_hidden_size == AutoConfig.from_pretrained(assets.base).text_config.hidden_size == 128
    assert text.num_kv_shared_layers == text.num_hidden_layers == 2
    assert text.layer_types == ["sliding_attention", "full_attention"] and text.hidden_size == 64
    check_pair(cfg, AutoConfig.from_pretrained(assets.base), "drafter.path")
    drafter = Gemma4UnifiedAssistantForCausalLM.from_pretrained(assets.base / "drafter")
    assert drafter.generation_config.num_assistant_tokens == 4
    again = write_tiny_drafter(assets.base, assets.root / "again")  # seeded: the same tensors
    from safetensors.torch import load_file

    a, b = load_file(assets.base / "drafter" / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_drafter_for_another_target_is_refused(assets, tmp_path):
    from transformers import AutoConfig

    from finetune.drafter.model import check_pair

    cfg = AutoConfig.from_pretrained(assets.base / "drafter")
    cfg.backbone_hidden_size = 3840
    with pytest.raises(UserError) as e:
        check_pair(cfg, AutoConfig.from_pretrained(assets.base), "drafter.path")
    assert str(e.value) == ("drafter.path: drafter for another target: backbone_hidden_size 3840, but the base's "
                            "hidden size is 128. Use the drafter shipped for this base "
                            "(google/gemma-4-12B-it-assistant for the 12B).")


# ---------------------------------------------------------------- the unrolled k steps


def test_unrolled_drafting_equals_the_candidate_generator(assets, samples, processor):
    """Every start of a left-padded batch, all k steps, against transformers' candidate generator
    fed the same prompt + accepted tokens one sample at a time (the image prompt is longer than
    the sliding window, so the drafter's window mask is exercised)."""
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    from finetune.drafter.unrolling import continue_greedy, served_prompts, starts_of, target_states, unroll
    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.generate import suppressed_ids

    model, drafter = target(assets), noisy_drafter(assets)
    drafter.generation_config.num_assistant_tokens = K
    pad = processor.tokenizer.pad_token_id
    suppress = suppressed_ids(processor, GEMMA4_UNIFIED.chat)
    seq = continue_greedy(model, served_prompts(samples, pad), new_tokens=8, stop_ids=None, suppress=suppress,
                          pad_id=pad)
    assert seq["attention_mask"][1, 0] == 0  # the shorter prompt is left-padded
    with torch.no_grad():
        hidden, kv, _ = target_states(model, seq, [i for (i,) in suppress])
        starts = starts_of(seq)
        steps = unroll(drafter, model.get_input_embeddings(), hidden, kv, seq, starts, K,
                       model.config.text_config.sliding_window)
    p = seq["prompt_len"]
    worst = 0.0
    for i, s in enumerate(samples):
        single = served_prompts([s], pad)
        n = single["input_ids"].shape[1]
        assert n > 64 or s["modality"] != "image"
        cont = seq["input_ids"][i, p:]
        for j in (0, 4):
            ids = torch.cat([single["input_ids"], cont[None, :j]], 1)
            media = {k: v for k, v in single.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
            types = torch.cat([single["mm_token_type_ids"], torch.zeros(1, j, dtype=torch.long)], 1)
            with torch.no_grad():
                out = model(input_ids=ids, mm_token_type_ids=types, **media, use_cache=True,
                            output_hidden_states=True, return_shared_kv_states=True)
                gen = SinglePositionMultiTokenCandidateGenerator(drafter, model.get_input_embeddings(),
                                                                 GenerationConfig(max_length=10_000))
                with_token = torch.cat([ids, cont[None, j:j + 1]], 1)
                _, ref = gen.get_candidates(with_token, model_kwargs={"attention_mask": torch.ones_like(with_token)},
                                            model_outputs=out, is_first_iteration=False, n_last_matches=0)
            assert ref.shape[1] == K
            for step in range(K):
                worst = max(worst, float((steps[step][i, j] - ref[0, step]).abs().max()))
    assert worst < 1e-4, worst


def test_unrolling_a_centroid_masked_drafter_feeds_back_what_the_generator_drafts(assets, samples, processor):
    """The 12B's drafter scores only the tokens of its top centroids (`use_ordered_embeddings`).
    Training keeps the dense logits for the loss but feeds back the masked argmax, as the
    generator does: on the tokens the mask keeps, its logits are the dense ones, step after step."""
    from transformers import AutoConfig, Gemma4UnifiedAssistantForCausalLM, GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    from finetune.drafter.unrolling import continue_greedy, served_prompts, starts_of, target_states, unroll

    cfg = AutoConfig.from_pretrained(assets.base / "drafter")
    # the centroids split the vocabulary evenly: take the smallest divisor (781 = 11 × 71)
    vocab = cfg.text_config.vocab_size
    centroids = next(n for n in range(2, vocab + 1) if vocab % n == 0)
    cfg.use_ordered_embeddings, cfg.num_centroids, cfg.centroid_intermediate_top_k = True, centroids, 1
    torch.manual_seed(0)
    drafter = Gemma4UnifiedAssistantForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        drafter.masked_embedding.token_ordering.copy_(torch.randperm(cfg.text_config.vocab_size, generator=g))
    drafter.generation_config.num_assistant_tokens = K
    model, pad = target(assets), processor.tokenizer.pad_token_id
    single = served_prompts(samples[1:], pad)
    seq = continue_greedy(model, single, new_tokens=2, stop_ids=None, suppress=[], pad_id=pad)
    with torch.no_grad():
        hidden, kv, _ = target_states(model, seq, [])
        steps = unroll(drafter, model.get_input_embeddings(), hidden, kv, seq, starts_of(seq)[:1], K,
                       model.config.text_config.sliding_window)
        out = model(**{k: v for k, v in single.items() if k != "attention_mask"}, use_cache=True,
                    output_hidden_states=True, return_shared_kv_states=True)
        gen = SinglePositionMultiTokenCandidateGenerator(drafter, model.get_input_embeddings(),
                                                         GenerationConfig(max_length=10_000))
        ids = seq["input_ids"][:, :seq["prompt_len"] + 1]
        drafted, ref = gen.get_candidates(ids, model_kwargs={"attention_mask": torch.ones_like(ids)},
                                          model_outputs=out, is_first_iteration=False, n_last_matches=0)
    for step in range(K):
        masked = ref[0, step]
        kept = masked > masked.min()
        assert 0 < int(kept.sum()) <= cfg.text_config.vocab_size // 2
        dense = steps[step][0, 0]
        assert float((dense[kept] - masked[kept]).abs().max()) < 1e-4
        assert int(torch.where(kept, dense, float("-inf")).argmax()) == int(drafted[0, -K + step])


def test_slots_count_every_draft_of_a_continuation():
    from finetune.drafter.unrolling import slots_per_prompt

    # 6 tokens, k = 3: starts at tokens 0..4 can draft 3, 3, 3, 2, 1 of the tokens after them
    assert slots_per_prompt(6, 3) == 12
    assert slots_per_prompt(2, 4) == 1


# ---------------------------------------------------------------- losslessness and acceptance


def test_greedy_output_is_identical_with_and_without_a_drafter(assets, processor, aligned):
    """Every pairing: base and adapted target, random and distilled drafter. A random drafter
    accepts nothing: exactly one token per target forward."""
    from finetune.drafter.acceptance import measure, pick_items
    from finetune.drafter.model import load_drafter
    from finetune.eval.evaluate import eval_items
    from finetune.model.load import base_family
    from finetune.model.lora import attach_lora

    chat = base_family(str(assets.base)).chat
    recipe = aligned.recipe
    items = pick_items(eval_items(recipe, processor, chat)[0], 3)
    assert sorted(it.conv.modality() for it in items) == ["audio", "image", "text"]
    model = target(assets)
    drafters = {"random": load_drafter(str(assets.base / "drafter"), model.config),
                "distilled": load_drafter(str(aligned.path), model.config)}
    opts = {"k": K, "new_tokens": 10, "ignore_eos": True, "image_tokens": 70}
    base = measure(model, drafters, processor, chat, items, **opts)
    torch.manual_seed(1)
    adapted = attach_lora(model, recipe.lora, base_family(str(assets.base)))
    with torch.no_grad():  # a LoRA that moves the logits (PEFT starts B at zero)
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    adapted_results = measure(adapted, drafters, processor, chat, items, **opts)
    for res in (*base.values(), *adapted_results.values()):
        assert res["identical"] and res["mismatched"] == [] and res["new_tokens"] == 30
    assert base["random"]["tokens_per_forward"] == 1.0 and base["random"]["acceptance_rate"] == 0.0
    # after the j-th of 10 tokens the generator drafts min(k, tokens still allowed - 1)
    assert base["random"]["target_forwards"] == 30
    assert base["random"]["drafted"] == 3 * sum(min(K, 10 - j - 1) for j in range(1, 10)) == 63


def test_distilling_on_the_base_raises_acceptance(assets, processor, aligned):
    """30 steps through the real loop: the random tiny drafter (1.0 tokens per target forward)
    becomes a drafter the base accepts, on held-out prompts."""
    from finetune.workflows.drafter import measure_drafters

    result = measure_drafters(aligned.recipe, None, {"shipped": str(aligned.path)})
    (pairing,) = result["pairings"]
    assert pairing["target"] == "base" and pairing["identical"]
    assert pairing["tokens_per_forward"] > 1.0 and pairing["acceptance_rate"] > 0, pairing  # random: 1.0, 0
    rows = [json.loads(x) for x in (aligned.path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["drafter/acceptance"] > rows[0]["drafter/acceptance"]


# ---------------------------------------------------------------- the loop: checkpoints, resume, LoRA


def test_alignment_writes_a_drafter_folder_and_resumes_exactly(assets):
    """4 steps straight equal 2 steps + --resume to 4, to the bit; checkpoints hold the drafter
    (objective.safetensors), not a copy of the frozen target."""
    from safetensors.torch import load_file
    from transformers import Gemma4UnifiedAssistantForCausalLM

    from finetune.drafter.alignment import align_drafter

    straight = recipe_from_dict(raw_recipe(assets, "straight"))
    align_drafter(straight, None, assets.root / "straight")
    half = recipe_from_dict(raw_recipe(assets, "resumed", max_steps=2, save_every=2))
    align_drafter(half, None, assets.root / "resumed")
    align_drafter(recipe_from_dict(raw_recipe(assets, "resumed", save_every=2)), None, assets.root / "resumed",
                  resume=True)
    a = load_file(assets.root / "straight" / "model.safetensors")
    b = load_file(assets.root / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ck = assets.root / "resumed" / "checkpoints" / "step-4"
    assert sorted(p.name for p in ck.iterdir()) == ["COMPLETE", "objective.safetensors", "trainer_state.json",
                                                    "trainer_state.safetensors"]
    own = load_file(ck / "objective.safetensors")
    assert "drafter.pre_projection.weight" in own and not any("language_model" in k for k in own)
    Gemma4UnifiedAssistantForCausalLM.from_pretrained(assets.root / "straight")
    rows = [json.loads(x) for x in (assets.root / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("drafter/acceptance" in r for r in rows)
    assert rows[0]["tokens"] == 2 * 18  # 2 prompts × the draft slots of 8 tokens at k = 3


@pytest.mark.slow
def test_two_process_ddp_aligns_like_one_process(assets, tmp_path):
    """torchrun, 2 ranks × batch 2 vs one process × 2 micro-batches of 2 (the same prompts padded
    the same way, so the target continues them alike): the drafter (the objective's own weights)
    is synchronised — identical on both ranks — and the losses are the one process's."""
    from finetune.drafter.alignment import align_drafter

    raw = raw_recipe(assets, "ddp", max_steps=3, group_by_length=False)
    (tmp_path / "r.yaml").write_text(json.dumps(raw))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "finetune.cli", "align-drafter", str(tmp_path / "r.yaml"), "--out",
                           str(tmp_path / "ddp")], cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    digests = json.loads((tmp_path / "ddp" / "rank_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    one = recipe_from_dict(raw_recipe(assets, "one", max_steps=3, grad_accum=2, group_by_length=False))
    align_drafter(one, None, tmp_path / "one")
    losses = [[json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("ddp", "one")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_lora_on_the_drafter_trains_only_the_lora_and_saves_it_merged(assets):
    from safetensors.torch import load_file

    from finetune.drafter.alignment import align_drafter

    recipe = recipe_from_dict(raw_recipe(assets, "lora", drafter={"method": "lora", "lora_r": 4}, max_steps=2))
    align_drafter(recipe, None, assets.root / "lora")
    own = load_file(assets.root / "lora" / "checkpoints" / "step-2" / "objective.safetensors")
    assert own and all("lora_" in k for k in own)
    shipped = load_file(assets.base / "drafter" / "model.safetensors")
    merged = load_file(assets.root / "lora" / "model.safetensors")
    assert merged.keys() == shipped.keys()  # a plain drafter folder: the LoRA merged in
    changed = [k for k in merged if not torch.equal(merged[k], shipped[k])]
    assert changed and all(k.endswith(("proj.weight", "projection.weight")) for k in changed)


def test_alignment_loads_the_adapter_onto_the_frozen_target(assets, tmp_path):
    """With an adapter, the drafter learns base + adapter: its first loss differs from the
    base's (same data, same drafter, same seed)."""
    from finetune.drafter.alignment import align_drafter
    from finetune.model.load import base_family
    from finetune.model.lora import attach_lora

    model = target(assets)
    peft = attach_lora(model, recipe_from_dict(raw_recipe(assets, "x")).lora, base_family(str(assets.base)))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft.save_pretrained(tmp_path / "adapter")
    losses = {}
    for name, adapter in (("base", None), ("adapted", str(tmp_path / "adapter"))):
        align_drafter(recipe_from_dict(raw_recipe(assets, f"with-{name}", max_steps=1)), adapter, tmp_path / name)
        losses[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert losses["base"] != pytest.approx(losses["adapted"], rel=1e-3)
    report = json.loads((tmp_path / "adapted" / "align_report.json").read_text())
    assert report["adapter"] == str(tmp_path / "adapter") and report["steps"] == 1


# ---------------------------------------------------------------- eval, export, plan, errors


def test_eval_reports_acceptance_of_shipped_and_aligned(assets, aligned, tmp_path, capsys):
    from finetune.model.load import base_family
    from finetune.model.lora import attach_lora

    peft = attach_lora(target(assets), aligned.recipe.lora, base_family(str(assets.base)))
    peft.save_pretrained(tmp_path / "adapter")
    (tmp_path / "r.yaml").write_text(json.dumps(raw_recipe(assets, "eval")))
    rc = main(["eval", str(tmp_path / "r.yaml"), "--adapter", str(tmp_path / "adapter"), "--drafter",
               str(aligned.path), "--out", str(tmp_path / "out"), "--max-items", "6"])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())["drafter"]
    assert [(p["target"], p["drafter"]) for p in result["pairings"]] == [
        ("base", "shipped"), ("adapted", "shipped"), ("adapted", "aligned")]
    assert result["identical"] and result["k"] == K and result["items"] == 3
    # a zero-B adapter leaves the target as it was: the same drafter, the same acceptance
    assert result["pairings"][0]["tokens_per_forward"] == result["pairings"][1]["tokens_per_forward"] == 1.0
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Drafter acceptance (k = 3, 3 prompts, 8 new tokens past the end of turn)" in page
    assert "drafter acceptance:" in capsys.readouterr().out


def test_export_writes_the_drafter_with_its_serve_lines(assets, aligned, tmp_path):
    from transformers import Gemma4UnifiedAssistantForCausalLM

    rc = main(["export", "--format", "drafter", str(aligned.path), str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    out = tmp_path / "out"
    assert report["max_abs_diff"] == 0.0 and report["num_assistant_tokens"] == K
    assert report["serve"]["command"] == (
        f"vllm serve {assets.base} --speculative-config "
        f"'{{\"method\": \"mtp\", \"model\": \"{out}\", \"num_speculative_tokens\": {K}}}'")
    assert report["serve"]["commands"]["sglang"].endswith(
        f"--speculative-algorithm NEXTN --speculative-draft-model-path {out} --speculative-num-steps {K} "
        f"--speculative-num-draft-tokens {K + 1} --speculative-eagle-topk 1")
    assert f"-md drafter.gguf --spec-type draft-mtp --spec-draft-n-max {K}" in report["serve"]["commands"]["llama.cpp"]
    drafter = Gemma4UnifiedAssistantForCausalLM.from_pretrained(out)
    assert drafter.generation_config.num_assistant_tokens == K
    assert (out / "tokenizer.json").is_file()  # llama.cpp's converter reads the vocabulary from here


def test_plan_covers_aligning_the_12b_drafter():
    from finetune.config.recipe import load_recipe
    from finetune.plan.report import plan

    root = Path(__file__).resolve().parents[2] / "recipes" / "gemma4-12b" / "image-qa.yaml"
    runs = {}
    for method in ("full", "lora"):
        recipe = load_recipe(root, ["train.objective=drafter", "drafter.path=google/gemma-4-12B-it-assistant",
                                    f"drafter.method={method}", "train.optimizer=adamw"])
        runs[method] = plan(recipe, budget_gib=24)
    full, lora = runs["full"], runs["lora"]
    assert full["assumptions"]["drafter"]["params"] == 424_954_112  # 4 layers × 1024 + 262k × 1024 embedding
    assert full["breakdown_bytes"]["optimizer_states"] == 8 * 424_954_112  # AdamW: two fp32 states
    assert full["breakdown_bytes"]["drafter_grads"] == 4 * 424_954_112
    assert lora["peak_gib"] < full["peak_gib"] and full["assumptions"]["peak_phase"] == "drafter"
    assert full["breakdown_bytes"]["linear_weights"] == lora["breakdown_bytes"]["linear_weights"]


def test_the_shipped_drafter_recipe_fits_16_gib():
    from finetune.config.recipe import load_recipe
    from finetune.plan.report import plan

    path = Path(__file__).resolve().parents[2] / "recipes" / "gemma4-12b" / "drafter" / "align-image-qa.yaml"
    out = plan(load_recipe(path), budget_gib=16.0)
    assert out["fits"] and out["peak_gib"] < 15.0 and out["suggestions"] == []
    assert out["assumptions"]["drafter"]["method"] == "lora"


def test_alignment_without_a_drafter_is_a_user_error(assets, tmp_path, capsys):
    raw = raw_recipe(assets, "none")
    raw["drafter"]["path"] = None
    (tmp_path / "r.yaml").write_text(json.dumps(raw))
    rc = main(["align-drafter", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and err == ("error: drafter.path: no drafter to align. Set drafter.path to the shipped drafter "
                               "(google/gemma-4-12B-it-assistant for the 12B).\n")
    raw["drafter"]["path"] = str(tmp_path / "nowhere")
    (tmp_path / "r.yaml").write_text(json.dumps(raw))
    rc = main(["align-drafter", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "d")])
    assert rc == 2 and capsys.readouterr().err == (f"error: drafter.path: {tmp_path / 'nowhere'} does not exist. Give "
                                                   "the drafter's folder or hub id, e.g. google/gemma-4-12B-it-assistant.\n")
    assert not (tmp_path / "d").exists()  # nothing ran


def test_the_drafter_section_is_checked_like_every_section(assets):
    from finetune.errors import RecipeErrors

    raw = raw_recipe(assets, "bad", drafter={"method": "everything", "num_tokens": 0, "speed": 2})
    with pytest.raises(RecipeErrors) as e:
        recipe_from_dict(raw)
    assert sorted(err.where for err in e.value.errors) == ["drafter.method", "drafter.num_tokens", "drafter.speed"]


# ---------------------------------------------------------------- llama.cpp


def _converter() -> Path:
    root = Path(os.environ.get("LLAMACPP_SRC") or Path(__file__).resolve().parents[2] / ".cache" / "llamacpp-src")
    found = sorted(root.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py")) + sorted(
        root.glob("vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py not under {root}: run scripts/setup_llamacpp.sh")
    return found[-1]


def _llamacpp_drafts(base_gguf: Path, drafter_gguf: Path, prompt: list[int], feed: list[int]):
    """(target's greedy next token, the drafter's logit rows) from llama.cpp itself, driven the
    way its `--spec-type draft-mtp` driver (common/speculative.cpp) drives a Gemma 4 assistant:
    the target context exports its last hidden state (nextn embeddings), the drafter context
    shares the target's KV (ctx_other) and drafts every step from the same position, fed its
    own projected state. Step i is fed token `feed[i]` (the driver feeds its own argmax; fixing
    the tokens keeps a near-tie from sending two implementations down different paths)."""
    import ctypes

    import llama_cpp as L
    import numpy as np
    from llama_cpp import llama_cpp_ext as X

    L.llama_backend_init()
    params = L.llama_model_default_params()
    models = [L.llama_model_load_from_file(str(p).encode(), params) for p in (base_gguf, drafter_gguf)]
    assert all(models) and L.llama_model_n_layer_nextn(models[1]) == 2

    def context(model, other=None):
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = 1
        if other is not None:
            cp.ctx_type, cp.ctx_other = L.LLAMA_CONTEXT_TYPE_MTP, other
        ctx = L.llama_init_from_model(model, cp)
        X.llama_set_embeddings_nextn(ctx, True, other is not None)
        return ctx

    def decode(ctx, tokens, positions, state=None):
        batch = L.llama_batch_ext_init(ctx)
        for tok, p in zip(tokens, positions):
            idx = L.llama_batch_ext_add_token(batch, 0, tok)
            L.llama_batch_ext_set_pos(batch, idx, ctypes.byref(L.llama_pos(p)))
        if state is not None:
            row = np.ascontiguousarray(state, dtype=np.float32)
            L.llama_batch_ext_set_embd_token(batch, idx, L.llama_embd(
                row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, row.shape[0]))
        L.llama_batch_ext_set_output_logits(batch, idx, True)
        assert L.llama_process(ctx, L.LLAMA_PROCESS_TYPE_DECODE, batch) == 0
        L.llama_batch_ext_free(batch)
        return idx

    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(models[0]))
    width = L.llama_model_n_embd_out(models[0])
    ctx_t = context(models[0])
    ctx_d = context(models[1], ctx_t)
    last = decode(ctx_t, prompt, range(len(prompt)))
    token = int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx_t, last), shape=(vocab,)).argmax())
    state = np.ctypeslib.as_array(X.llama_get_embeddings_nextn_ith(ctx_t, last), shape=(width,)).copy()
    first, rows = token, []
    for token in feed:
        idx = decode(ctx_d, [token], [len(prompt)], state)
        rows.append(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx_d, idx), shape=(vocab,)).copy())
        state = np.ctypeslib.as_array(X.llama_get_embeddings_nextn_ith(ctx_d, idx), shape=(width,)).copy()
    for ctx in (ctx_d, ctx_t):
        L.llama_free(ctx)
    for model in models:
        L.llama_model_free(model)
    return first, np.stack(rows)


@pytest.mark.llamacpp
def test_llamacpp_converts_the_aligned_drafter_and_drafts_like_transformers(assets, aligned, tmp_path):
    """llama.cpp's own converter turns the exported drafter into a `gemma4-assistant` GGUF, and
    llama.cpp drafts with it what transformers' candidate generator drafts (same tokens, logits
    within llama.cpp's own distance from transformers)."""
    pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gguf")
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    from finetune.drafter.model import load_drafter

    assert main(["export", "--format", "drafter", str(aligned.path), str(tmp_path / "hf")]) == 0
    files = {"base": (assets.base, tmp_path / "base.gguf"), "drafter": (tmp_path / "hf", tmp_path / "drafter.gguf")}
    for src, dst in files.values():
        subprocess.run([sys.executable, str(_converter()), str(src), "--outfile", str(dst), "--outtype", "f32"],
                       check=True, capture_output=True)
    fields = gguf.GGUFReader(str(files["drafter"][1])).fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "gemma4-assistant"

    tok = AutoTokenizer.from_pretrained(assets.base)
    prompt = [tok.bos_token_id] + tok("The quick brown fox jumps over the lazy dog. What is the capital of "
                                      "Norvia?")["input_ids"]
    model = target(assets)
    drafter = load_drafter(str(tmp_path / "hf"), model.config)
    drafter.generation_config.num_assistant_tokens = K
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, output_hidden_states=True, return_shared_kv_states=True)
        nxt = int(out.logits[0, -1].argmax())
        with_token = torch.cat([ids, torch.tensor([[nxt]])], 1)
        gen = SinglePositionMultiTokenCandidateGenerator(drafter, model.get_input_embeddings(),
                                                         GenerationConfig(max_length=10_000))
        drafted, ref = gen.get_candidates(with_token, model_kwargs={"attention_mask": torch.ones_like(with_token)},
                                          model_outputs=out, is_first_iteration=False, n_last_matches=0)
    ref = ref[0].numpy()
    feed = [nxt, *drafted[0, -K:-1].tolist()]  # what the generator fed its drafter at each step
    first, rows = _llamacpp_drafts(files["base"][1], files["drafter"][1], prompt, feed)
    assert first == nxt  # the target agrees on the token drafting starts from
    diff, scale = float(abs(rows - ref).max()), float(abs(ref).max())
    # llama.cpp's target and transformers differ by ~1e-2 on their own (tests/export/test_llamacpp.py);
    # the drafter reads that target's hidden state and k/v
    assert diff < 0.05 * scale, (diff, scale)
    for r, want in zip(rows, ref):
        margin = float(want.max() - sorted(want)[-2])
        if margin > 2 * diff:  # the same draft wherever transformers' choice is not a near-tie
            assert int(r.argmax()) == int(want.argmax())

