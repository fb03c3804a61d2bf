"""TRL as the reference: our DPO (sigmoid, IPO), ORPO and KTO losses, rewards and margins equal
what TRL 1.16's own trainers compute on the same tiny model, batch and settings.

The batch is ours (rendered by data_tools.preference: image, audio and text pairs), handed to
TRL in its collators' layout (`completion_mask` = our answer labels), and both sides run on the
one PEFT model TRL built. TRL's tokenization differs from ours on purpose (last test): it drops
Gemma 4's empty thinking scaffold from the prompt and trains on the newline after `<turn|>`.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from data_tools.pipeline import prepare  # noqa: E402
from data_tools.render import IGNORE  # noqa: E402
from finetune.config.recipe import recipe_from_dict  # noqa: E402
from finetune.model.families import GEMMA4_UNIFIED  # noqa: E402
from finetune.objectives import build  # noqa: E402
from finetune.objectives.preference import REWARD_METRICS  # noqa: E402

TOL = 1e-5
# fp32 on the CPU. TRL's configs default to bf16, which would also leave accelerate's
# process-wide state in bf16 mixed precision for every later in-process run of the suite.
TRL_ARGS = {"use_cpu": True, "bf16": False, "report_to": []}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": False}
TEXT_ROWS = [{"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
              "rejected": [{"role": "assistant", "content": "No."}]}] * 2


def pairs(d) -> list[dict]:
    """An image, an audio and two text pairs in TRL's layouts (the demo's pictures and tones)."""
    return [
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
         "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}],
         "images": [str(d / "images/train_0000.png")]},
        {"prompt": "Is this tone high or low?", "chosen": "high", "rejected": "low, surely",
         "audios": [str(d / "audio/train_0000.wav")]},
        {"prompt": "What is the capital of Norvia?", "chosen": "Halden", "rejected": "Mirovo"},
        {"chosen": [{"role": "system", "content": "Answer with one word."},
                    {"role": "user", "content": "Capital of Orlund?"}, {"role": "assistant", "content": "Kaveny"}],
         "rejected": [{"role": "system", "content": "Answer with one word."},
                      {"role": "user", "content": "Capital of Orlund?"}, {"role": "assistant", "content": "Porta."}]},
    ]


def unpaired(d) -> list[dict]:
    return [{"prompt": "What is the capital of Norvia?", "completion": "Halden", "label": True},
            {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
             "completion": [{"role": "assistant", "content": "green"}], "label": False,
             "images": [str(d / "images/train_0001.png")]},
            {"prompt": "Is this tone high or low?", "completion": "low", "label": True,
             "audios": [str(d / "audio/train_0001.wav")]}]


def recipe(tmp, base, objective, path, **preference):
    return recipe_from_dict({
        "model": {"base": str(base), "quantization": "none"},
        "datasets": [{"path": str(path), "format": "preference"}],
        "data": {"image_tokens": 70, "max_seq_len": 256, "cache_dir": str(tmp / "cache")},
        "train": {"objective": objective, "output_dir": str(tmp / "out")},
        "preference": preference})


def samples_of(r, processor, tmp) -> list[dict]:
    (tmp / "out").mkdir(exist_ok=True)
    data = prepare(r, processor, r.model.base, rejects_path=tmp / "out" / "rejects.jsonl", chat=GEMMA4_UNIFIED.chat,
                   use_cache=False)
    return sorted(data.train, key=lambda s: s["origin"])


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo_data):
    tmp = tmp_path_factory.mktemp("pref")
    for name, rows in (("pairs.jsonl", pairs(demo_data)), ("unpaired.jsonl", unpaired(demo_data))):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp


def base_model(tiny_base):
    from finetune.model.load import load_base

    torch.manual_seed(0)
    return load_base(str(tiny_base), device="cpu")


def trl_inputs(batch: dict, prefix: str = "") -> dict:
    """Our micro-batch in the layout TRL's collators make."""
    out = {k: v for k, v in batch.items() if k not in ("labels", "desirable") and not k.startswith("kl_")}
    out["completion_mask"] = (batch["labels"] != IGNORE).long()
    return out


def close(ours, theirs) -> bool:
    return abs(float(torch.as_tensor(ours).detach()) - float(torch.as_tensor(theirs).detach())) <= TOL


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_dpo_equals_trl(files, tiny_base, processor, loss_type, beta):
    """Reference = the base with the adapter off, on both sides."""
    from trl import DPOConfig, DPOTrainer

    r = recipe(files, tiny_base, "dpo", files / "pairs.jsonl", beta=beta, loss_type=loss_type)
    ours = build(r)
    batch = ours.collate(samples_of(r, processor, files), processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 2 and batch["input_features"].shape[0] == 2  # both sides carry media
    args = DPOConfig(output_dir=str(files / "trl"), **TRL_ARGS, beta=beta, loss_type=[loss_type],
                     gradient_checkpointing=False, per_device_train_batch_size=2, seed=0)
    trl = DPOTrainer(model=base_model(tiny_base), args=args, train_dataset=Dataset.from_list(TEXT_ROWS),
                     processing_class=processor, peft_config=LoraConfig(**LORA))
    loss, metrics = ours.loss(trl.model, batch)
    n = ours.weight(batch)
    theirs = trl.compute_loss(trl.model, trl_inputs(batch))
    got = trl._metrics["train"]
    assert n == 4 and close(loss / n, theirs), (float(loss / n), float(theirs))
    for k in REWARD_METRICS:
        assert close(metrics[k] / n, got[k][-1]), (k, float(metrics[k] / n), got[k][-1])
    assert abs(got["rewards/margins"][-1]) > 0.01  # the adapter moved away from the reference


def test_dpo_with_the_sft_term_equals_trl_per_pair(files, tiny_base, processor):
    """`preference.sft_weight` = TRL's loss_type [sigmoid, sft] with loss_weights [1, α]. Ours is
    the mean token NLL per pair, TRL's over the batch's tokens: one pair per batch, they agree."""
    from trl import DPOConfig, DPOTrainer

    r = recipe(files, tiny_base, "dpo", files / "pairs.jsonl", beta=0.1, sft_weight=0.7)
    ours = build(r)
    args = DPOConfig(output_dir=str(files / "trl-sft"), **TRL_ARGS, beta=0.1,
                     loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], gradient_checkpointing=False,
                     per_device_train_batch_size=1, seed=0)
    trl = DPOTrainer(model=base_model(tiny_base), args=args, train_dataset=Dataset.from_list(TEXT_ROWS),
                     processing_class=processor, peft_config=LoraConfig(**LORA))
    for sample in samples_of(r, processor, files):
        batch = ours.collate([sample], processor.tokenizer.pad_token_id)
        loss, metrics = ours.loss(trl.model, batch)
        assert close(loss, trl.compute_loss(trl.model, trl_inputs(batch))), sample["origin"]
        assert close(metrics["rewards/margins"], trl._metrics["train"]["rewards/margins"][-1])
        assert metrics["nll_loss"] > 0


def test_dpo_with_a_reference_adapter_equals_trl(files, tiny_base, processor):
    """The DPO-after-SFT flow: the reference is a frozen copy of the adapter (`ref`, TRL's name)."""
    from trl import DPOConfig, DPOTrainer

    r = recipe(files, tiny_base, "dpo", files / "pairs.jsonl", beta=0.2)
    ours = build(r)
    batch = ours.collate(samples_of(r, processor, files), processor.tokenizer.pad_token_id)
    torch.manual_seed(1)
    model = get_peft_model(base_model(tiny_base), LoraConfig(**LORA))
    args = DPOConfig(output_dir=str(files / "trl-ref"), **TRL_ARGS, beta=0.2,
                     gradient_checkpointing=False, per_device_train_batch_size=2, seed=0)
    trl = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(TEXT_ROWS), processing_class=processor)
    assert set(trl.model.peft_config) == {"default", "ref"}
    with torch.no_grad():  # the policy moves off the reference it started from
        for name, p in trl.model.named_parameters():
            if ".default." in name:
                p.add_(0.05 * torch.randn_like(p))
    loss, metrics = ours.loss(trl.model, batch)
    theirs = trl.compute_loss(trl.model, trl_inputs(batch))
    got, n = trl._metrics["train"], ours.weight(batch)
    assert close(loss / n, theirs)
    for k in REWARD_METRICS:
        assert close(metrics[k] / n, got[k][-1]), k
    assert abs(got["rewards/margins"][-1]) > 0.01


def test_kto_equals_trl(files, tiny_base, processor):
    """Unpaired examples and pairs taken apart, the KL baseline from mismatched rows, and a
    reference adapter (`ref`)."""
    from trl import KTOConfig, KTOTrainer

    r = recipe(files, tiny_base, "kto", files / "unpaired.jsonl", beta=0.3, desirable_weight=1.3,
               undesirable_weight=0.7)
    ours = build(r)
    samples = samples_of(r, processor, files) + samples_of(recipe(files, tiny_base, "kto", files / "pairs.jsonl"),
                                                           processor, files)[:2]
    batch = ours.collate(samples, processor.tokenizer.pad_token_id)
    # the pairs taken apart (chosen, then rejected), then the unpaired examples
    assert batch["desirable"].tolist() == [True, True, False, False, True, False, True]
    args = KTOConfig(output_dir=str(files / "trl-kto"), **TRL_ARGS, beta=0.3, desirable_weight=1.3,
                     undesirable_weight=0.7, gradient_checkpointing=False, per_device_train_batch_size=2, seed=0,
                     train_sampling_strategy="sequential")
    rows = [{"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Yes."}],
             "label": lab} for lab in (True, False)]
    torch.manual_seed(3)
    model = get_peft_model(base_model(tiny_base), LoraConfig(**LORA))
    trl = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor)
    # A policy that has learnt the mismatched answers better than its reference (the copy TRL
    # made): the KL baseline is positive, so its clamp does not hide it.
    from finetune.objectives.preference import sequence_logps

    opt = torch.optim.Adam([p for p in trl.model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (-sequence_logps(trl.model, batch, prefix="kl_")[0].sum()).backward()
        opt.step()
    loss, metrics = ours.loss(trl.model, batch)
    inputs = trl_inputs(batch)
    inputs |= {"KL_input_ids": batch["kl_input_ids"], "KL_attention_mask": batch["kl_attention_mask"],
               "KL_completion_mask": (batch["kl_labels"] != IGNORE).long(),
               "KL_mm_token_type_ids": batch["kl_mm_token_type_ids"], "label": batch["desirable"]}
    theirs = trl.compute_loss(trl.model, inputs)
    got, n = trl._metrics["train"], ours.weight(batch)
    assert n == 7 and close(loss / n, theirs), (float(loss / n), float(theirs))
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        assert close(metrics[k] / n, got[k][-1]), (k, float(metrics[k] / n), got[k][-1])
    assert got["kl"][-1] > 0  # the baseline is in play, not clamped away


class WithMedia(torch.nn.Module):
    """TRL's ORPO trainer calls `model(input_ids, attention_mask=...)`: hand the batch's media along."""

    def __init__(self, model, batch):
        super().__init__()
        self.model = model
        self.media = {k: batch[k] for k in ("mm_token_type_ids", "pixel_values", "image_position_ids",
                                            "input_features", "input_features_mask") if k in batch}

    def forward(self, input_ids, attention_mask=None, **kw):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.media, **kw)


def test_orpo_equals_trl(files, tiny_base, processor):
    """Odds-ratio term, rewards, margins and log-odds equal TRL's; the NLL term is over the chosen
    answer (TRL's ORPO also counts the prompt), checked against cross-entropy on full logits."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    r = recipe(files, tiny_base, "orpo", files / "pairs.jsonl", beta=0.25)
    ours = build(r)
    batch = ours.collate(samples_of(r, processor, files), processor.tokenizer.pad_token_id)
    torch.manual_seed(2)
    model = get_peft_model(base_model(tiny_base), LoraConfig(**LORA))
    args = ORPOConfig(output_dir=str(files / "trl-orpo"), **TRL_ARGS, beta=0.25, max_length=256,
                      gradient_checkpointing=False, per_device_train_batch_size=2, seed=0)
    trl = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(TEXT_ROWS),
                      processing_class=processor.tokenizer)
    loss, metrics = ours.loss(model, batch)
    n = ours.weight(batch)
    half = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    trl_batch = {f"{side}_{k}": v[sl] for k, v in half.items()
                 for side, sl in (("chosen", slice(0, n)), ("rejected", slice(n, None)))}
    theirs, got = trl.get_batch_loss_metrics(WithMedia(model, batch), trl_batch)
    for k in (*REWARD_METRICS, "log_odds_ratio", "log_odds_chosen"):
        assert close(metrics[k] / n, got[k]), (k, float(metrics[k] / n), got[k])
    assert close((loss - metrics["nll_loss"]) / n, theirs - got["nll_loss"])  # -λ·mean log σ(log odds)
    with torch.no_grad():
        logits = WithMedia(model, batch)(batch["input_ids"], batch["attention_mask"]).logits
    labels = batch["labels"]
    nll = [torch.nn.functional.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=IGNORE) for i in range(n)]
    assert close(metrics["nll_loss"] / n, sum(nll) / n)


def test_trl_tokenizes_gemma4_pairs_differently(files, tiny_base, processor):
    """Why our rendering and not TRL's: TRL's prompt lacks the empty thinking scaffold the served
    generation prompt ends with, and its completion carries the newline after `<turn|>`."""
    from trl import DPOConfig, DPOTrainer

    r = recipe(files, tiny_base, "dpo", files / "pairs.jsonl")
    ours = {s["origin"].rsplit(":", 1)[1]: s for s in samples_of(r, processor, files)}["3"]
    row = {"prompt": [{"role": "user", "content": "What is the capital of Norvia?"}],
           "chosen": [{"role": "assistant", "content": "Halden"}], "rejected": [{"role": "assistant", "content": "Mirovo"}]}
    args = DPOConfig(output_dir=str(files / "trl-tok"), **TRL_ARGS, gradient_checkpointing=False)
    trl = DPOTrainer(model=base_model(tiny_base), args=args, train_dataset=Dataset.from_list([row]),
                     processing_class=processor, peft_config=LoraConfig(r=4, target_modules="all-linear"))
    t = trl.train_dataset[0]
    tok = processor.tokenizer
    scaffold = tok("<|channel>thought\n<channel|>", add_special_tokens=False)["input_ids"]
    assert ours["input_ids"] == t["prompt_ids"] + scaffold + t["chosen_ids"][:-1]
    assert tok.decode(t["chosen_ids"][-1:]) == "\n"
    assert ours["rejected_ids"] == t["rejected_ids"][:-1]
