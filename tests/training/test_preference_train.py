"""Preference objectives on the shared engine: chunked log-probs, pair accumulation, golden first
losses, the reference adapter flow with exact resume, held-out preference eval, and the plan."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_tools.render import IGNORE
from finetune.config.recipe import recipe_from_dict


def write_pairs(root: Path, demo_data: Path) -> Path:
    """12 preference pairs in TRL's layout over the demo's media: 4 image, 4 audio, 4 text."""
    d = demo_data
    rows = []
    for i in range(4):
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
                     "chosen": "red", "rejected": "blue", "images": [str(d / f"images/train_000{i}.png")]})
        rows.append({"prompt": "High or low?", "chosen": "high", "rejected": "low",
                     "audios": [str(d / f"audio/train_000{i}.wav")]})
        rows.append({"prompt": f"Capital of Norvia, take {i}?", "chosen": "Halden", "rejected": "Porta"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_base, demo_data):
    root = tmp_path_factory.mktemp("pref-train")
    return SimpleNamespace(root=root, base=tiny_base, pairs=write_pairs(root, demo_data))


def raw(assets, name: str, objective: str = "dpo", preference=None, **train) -> dict:
    return {"model": {"base": str(assets.base), "quantization": "none"},
            "datasets": [{"path": str(assets.pairs), "format": "preference"}],
            "eval_datasets": [{"path": str(assets.pairs), "format": "preference"}],
            "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(assets.root / "cache")},
            "lora": {"r": 8, "alpha": 16, "targets": ["attention", "mlp", "vision", "audio"]},
            "train": {"objective": objective, "output_dir": str(assets.root / name), "batch_size": 2, "lr": 5e-3,
                      "seed": 0, "max_steps": 6, "group_by_length": False, **train},
            "preference": preference or {}}


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_chunked_logps_equal_full_log_softmax():
    """Kept reference: soft-capped logits for every position, log-softmax, gather."""
    from finetune.objectives.losses import chunked_logps

    torch.manual_seed(0)  # float64: the two orders of summation then agree to ~1e-13
    hidden = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[:, :4] = IGNORE
    labels[1, 6:] = IGNORE
    got, tokens = chunked_logps(hidden, labels, weight, 30.0, chunk_size=4)
    g_got = torch.autograd.grad(got.sum() * 1.5, (hidden, weight))
    logits = torch.tanh((hidden @ weight.T) / 30.0) * 30.0
    lp = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    want = (lp * (labels[:, 1:] != IGNORE)).sum(1)
    g_want = torch.autograd.grad(want.sum() * 1.5, (hidden, weight))
    assert tokens.tolist() == [5, 2, 5]
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-10) for a, b in zip(g_got, g_want))


def test_pairs_accumulate_like_one_batch(assets, processor):
    """Micro-batches of 1 pair sum to the loss and gradients of 1 micro-batch of 2 pairs."""
    from finetune.model.load import base_family, load_base
    from finetune.objectives import build
    from finetune.training.wrappers import to_device

    r = recipe_from_dict(raw(assets, "acc", preference={"sft_weight": 0.5}))
    objective = build(r)
    torch.manual_seed(0)
    model = objective.setup(load_base(str(assets.base), device="cpu"), base_family(str(assets.base)))
    with torch.no_grad():  # a trained-looking adapter, so the reference and the policy differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    from data_tools.pipeline import prepare
    from finetune.model.families import GEMMA4_UNIFIED

    (assets.root / "acc").mkdir(exist_ok=True)
    data = prepare(r, processor, str(assets.base), rejects_path=assets.root / "acc" / "rejects.jsonl",
                   chat=GEMMA4_UNIFIED.chat)
    every = [data.train[i] for i in range(len(data.train))]
    samples = [next(s for s in every if s["modality"] == m) for m in ("image", "text")]
    pad = processor.tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]

    # float64, but for transformers' eager attention softmax (float32 even then: 6e-8 relative
    # rounding, moved by a few of those in another batch layout; all-float32 moved 1.3e-5).
    model = model.double()

    def grads(batches):
        model.zero_grad()
        total = sum(objective.loss(model, b)[0] for b in batches)
        total.backward()
        return total.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    one, g_one = grads([to_device(objective.collate(samples, pad), "cpu", torch.float64)])
    two, g_two = grads([to_device(objective.collate([s], pad), "cpu", torch.float64) for s in samples])
    assert one.dtype == torch.float64
    assert abs(float(one - two)) < 1e-6
    a, b = torch.cat([g.flatten() for g in g_one]), torch.cat([g.flatten() for g in g_two])
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6 and float(b.abs().max()) > 0.1


@pytest.mark.parametrize("objective,first", [("dpo", math.log(2)), ("kto", 0.5)])
def test_training_starts_at_the_golden_loss(assets, objective, first):
    """A fresh adapter is the reference: DPO starts at log 2, KTO at 1 - σ(0) = 0.5, rewards 0."""
    from finetune.training.loop import train

    out = assets.root / f"golden-{objective}"
    result = train(recipe_from_dict(raw(assets, out.name, objective)))
    rows = metrics_of(out)
    assert rows[0]["loss"] == pytest.approx(first, abs=1e-6)
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-7)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= rows[-1].keys()
    assert rows[0]["tokens"] == (2 if objective == "dpo" else 4)  # pairs; a pair is two KTO examples
    assert result.losses[-1] < result.losses[0]


def test_orpo_trains_without_a_reference(assets):
    from finetune.training.loop import train

    out = assets.root / "orpo"
    result = train(recipe_from_dict(raw(assets, out.name, "orpo", preference={"beta": 0.2})))
    rows = metrics_of(out)
    assert result.losses[-1] < result.losses[0]
    # loss = NLL − λ·log σ(log odds): its two parts are logged
    assert rows[0]["loss"] == pytest.approx(rows[0]["nll_loss"] - 0.2 * rows[0]["log_odds_ratio"], abs=1e-5)


def test_reference_adapter_flow_and_exact_resume(assets):
    """DPO after an adapter: the policy starts at it (loss log 2), only the trained adapter is
    saved, and a resumed run equals a straight one."""
    from safetensors.torch import load_file

    from finetune.training.loop import train

    sft = assets.root / "golden-dpo" / "adapter"
    if not sft.is_dir():
        train(recipe_from_dict(raw(assets, "golden-dpo")))
    kw = {"reference_adapter": str(sft), "scheduler": "constant", "save_every": 2, "max_steps": 4}
    straight = train(recipe_from_dict(raw(assets, "ref-straight", **kw)))
    assert straight.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    out = assets.root / "ref-resumed"
    train(recipe_from_dict(raw(assets, out.name, **(kw | {"max_steps": 2}))))
    resumed = train(recipe_from_dict(raw(assets, out.name, **kw)), resume=True)
    assert resumed.losses == pytest.approx(straight.losses[2:], abs=1e-6)
    a = load_file(str(assets.root / "ref-straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "adapter" / "ref").exists()  # the reference is the folder it came from
    start = load_file(str(sft / "adapter_model.safetensors"))
    assert a.keys() == start.keys() and any(not torch.equal(a[k], start[k]) for k in a)


def test_eval_reports_held_out_preference_accuracy(assets):
    """With the base as reference, reward = β·(log π_adapter − log π_base): per modality the
    reward margin is the adapter's margin minus the base's."""
    from finetune.eval.evaluate import evaluate_adapter
    from finetune.training.loop import train

    adapter = assets.root / "golden-dpo" / "adapter"
    if not adapter.is_dir():
        train(recipe_from_dict(raw(assets, "golden-dpo")))
    recipe = recipe_from_dict(raw(assets, "eval"))
    result, items = evaluate_adapter(recipe, adapter)
    pref = result["preference"]["by_modality"]
    assert set(pref) == {"all", "image", "audio", "text"} and pref["all"]["n"] == 12
    for m, g in pref.items():
        assert g["reward_margin"] == pytest.approx(g["adapter"]["margin"] - g["base"]["margin"], abs=2e-4), m
        assert 0 <= g["base"]["accuracy"] <= 1 and 0 <= g["reward_accuracy"] <= 1
    assert len(items) == 12 and all(it.reference in ("red", "high", "Halden") for it in items)
    assert result["preference"]["reference"] == "base (adapter off)"


def test_plan_counts_both_answers():
    """12B DPO at 2 × 2k tokens (one pair of 2,048-token sequences) fits 16 GiB."""
    from finetune.config.recipe import load_recipe, with_overrides
    from finetune.plan.report import plan

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "gemma4-12b" / "preference-dpo.yaml")
    dpo = plan(recipe)
    a = dpo["assumptions"]
    assert a["sequences_per_sample"] == 2 and a["tokens_per_micro_batch"] == 2 * 2048
    assert dpo["fits"] and dpo["peak_gib"] <= 16
    longer = plan(with_overrides(recipe, ["data.max_seq_len=4096"]))
    assert longer["peak_gib"] > dpo["peak_gib"]
    for objective in ("orpo", "kto"):
        other = plan(with_overrides(recipe, [f"train.objective={objective}", "train.reference_adapter=null"]))
        assert other["assumptions"]["sequences_per_sample"] == 2 and other["fits"]


def test_the_preference_demo_runs(tmp_path):
    from finetune.workflows.demo import run_preference_demo

    scores = run_preference_demo(["train.max_steps=2", "train.batch_size=2"], root=tmp_path / "runs/demo-preference")
    assert set(scores["preference_accuracy"]["adapter"]) == {"image", "audio", "text"}
    assert json.loads((tmp_path / "runs/demo-preference/eval.json").read_text()) == scores


@pytest.mark.slow
def test_two_process_ddp_dpo_with_a_reference_adapter(assets, train_on_two_ranks):
    """torchrun, 2 ranks × 1 pair vs one process × 2 pairs: same losses; both ranks end with the
    same adapter (the reference adapter switches in and out inside DDP's forward)."""
    import yaml

    from finetune.training.loop import train

    sft = assets.root / "golden-dpo" / "adapter"
    if not sft.is_dir():
        train(recipe_from_dict(raw(assets, "golden-dpo")))
    # lr 1e-3 as in test_resume_ddp: Adam turns summation-order noise of near-zero gradients into
    # updates of up to ±lr, which later losses see.
    ddp_raw = raw(assets, "ddp", reference_adapter=str(sft), batch_size=1, max_steps=3, lr=1e-3)
    path = assets.root / "ddp.yaml"
    path.write_text(yaml.safe_dump(ddp_raw))
    train_on_two_ranks(path)
    one = train(recipe_from_dict(raw(assets, "ddp-one", reference_adapter=str(sft), batch_size=2, max_steps=3,
                                     lr=1e-3)))
    ddp = [r["loss"] for r in metrics_of(assets.root / "ddp")]
    assert ddp == pytest.approx(one.losses, abs=1e-5)
