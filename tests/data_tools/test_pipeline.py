"""The data pass: accounting (records == used + rejected), bad records, mixing, eval split,
cache, num_proc, streaming, and `finetune data stats --json`."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data_tools.accounting import n_label_tokens
from data_tools.cache import cache_key
from data_tools.pipeline import prepare
from data_tools.render_pool import CHUNK
from data_tools.streaming import StreamingSamples
from finetune.cli.main import main
from finetune.errors import UserError
from finetune.model.families import GEMMA4_UNIFIED


def prepare_run(recipe, processor, base, **kw):
    """`prepare` the way a run calls it: rejects.jsonl in train.output_dir, the family's chat format."""
    out = Path(recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return prepare(recipe, processor, str(base), rejects_path=out / "rejects.jsonl", chat=GEMMA4_UNIFIED.chat,
                   **kw)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(question, answer, image=None):
    content = [{"type": "image", "path": image}, {"type": "text", "text": question}] if image else question
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def messy(tmp_path):
    """Two files mixing good and bad records; returns (datasets, expected reasons, bad line)."""
    Image.new("RGB", (64, 64), (0, 200, 0)).save(tmp_path / "green.png")
    (tmp_path / "fake.png").write_text("not an image")
    a = write_jsonl(tmp_path / "a.jsonl", [
        chat("Colour?", "green", "green.png"),                                    # 1 good
        "{not json",                                                             # 2 unparseable
        chat("Colour?", "green", "missing.png"),                                 # 3 missing_media
        chat("Colour?", "green", "fake.png"),                                    # 4 corrupt_media
        chat("Hi?", ""),                                                         # 5 no_answer
        {"messages": [{"role": "user", "content": [{"type": "video", "path": "v.mp4"}]},
                      {"role": "assistant", "content": "x"}]},                   # 6 unknown_part
        {"messages": [{"role": "assistant", "content": "x"}]},                   # 7 no_user_turn
        chat("Tell me everything. " * 60, "ok"),                                 # 8 over_budget
        chat("Capital of Norvia?", "Halden"),                                    # 9 good
    ])
    b = write_jsonl(tmp_path / "b.jsonl", [
        {"conversations": [{"from": "human", "value": "<image> <image> what?"},
                           {"from": "gpt", "value": "x"}], "images": ["green.png"]},  # 1 placeholder_mismatch
        {"conversations": [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "green"}],
         "images": ["green.png"]},                                               # 2 good
    ])
    datasets = [{"path": str(a)}, {"path": str(b), "format": "sharegpt"}]
    reasons = {"unparseable": 1, "missing_media": 1, "corrupt_media": 1, "no_answer": 1, "unknown_part": 1,
               "no_user_turn": 1, "over_budget": 1, "placeholder_mismatch": 1}
    return datasets, reasons, f"{a}:2"


# 7 of the 9 records of a.jsonl are bad on purpose: allowed here, so every reason is counted.
MESSY_DATA = {"max_seq_len": 128, "overflow": "drop", "image_tokens": 70, "on_bad_record": "skip",
              "max_rejected_fraction": 0.9}


def test_skip_accounts_for_every_record_and_writes_rejects(processor, make_recipe, messy, tiny_base):
    datasets, reasons, _ = messy
    recipe = make_recipe(datasets, data=MESSY_DATA)
    prep = prepare_run(recipe, processor, tiny_base, log=None, use_cache=False)
    total = prep.stats["total"]
    assert (total["records"], total["used"], total["rejected"]) == (11, 3, 8)
    assert total["records"] == total["used"] + total["rejected"]
    assert total["rejected_by_reason"] == reasons
    for name, st in prep.stats["datasets"].items():
        assert st["records"] == st["used"] + st["rejected"], name
    with open(f"{recipe.train.output_dir}/rejects.jsonl") as f:
        rejects = [json.loads(x) for x in f]
    assert sorted(r["reason"] for r in rejects) == sorted(k for k, v in reasons.items() for _ in range(v))
    by_reason = {r["reason"]: r for r in rejects}
    assert by_reason["unparseable"]["origin"].endswith("a.jsonl:2")
    assert by_reason["unparseable"]["record"] == "{not json"  # the line as read, to fix it
    assert by_reason["missing_media"]["record"]["messages"][0]["content"][0]["path"] == "missing.png"
    assert by_reason["placeholder_mismatch"]["origin"].endswith("b.jsonl:1")


def test_error_mode_names_file_and_line(processor, make_recipe, messy, tiny_base, tmp_path, capsys):
    datasets, _, where = messy
    recipe = make_recipe(datasets, data={**MESSY_DATA, "on_bad_record": "error"})
    with pytest.raises(UserError) as e:
        prepare_run(recipe, processor, tiny_base, log=None, use_cache=False)
    assert e.value.where == where and "unparseable" in e.value.what
    # Through the CLI: exit 2, one line naming file:line and the reason.
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"base": str(tiny_base)}, "datasets": datasets,
                                    "data": {**MESSY_DATA, "on_bad_record": "error"},
                                    "train": {"output_dir": str(tmp_path / "o")}}))
    assert main(["data", "stats", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {where}: bad record (unparseable)")


def _two_sets(tmp_path, n_a=8, n_b=4, long_b=False):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"A{i}?", "yes") for i in range(n_a)])
    answer = "the answer is short and the answer is yes " * 3 if long_b else "no"
    b = write_jsonl(tmp_path / "b.jsonl", [chat(f"B{i}?", answer) for i in range(n_b)])
    return a, b


def test_mix_by_samples_follows_weights(processor, make_recipe, tmp_path, tiny_base):
    a, b = _two_sets(tmp_path)
    recipe = make_recipe([{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}])
    prep = prepare_run(recipe, processor, tiny_base, log=None, use_cache=False)
    counts = {d: sum(s["dataset"] == d for s in prep.train) for d in ("0:a.jsonl", "1:b.jsonl")}
    assert counts == {"0:a.jsonl": 9, "1:b.jsonl": 3}  # 12 samples, 3:1


def test_mix_by_tokens_balances_label_tokens(processor, make_recipe, tmp_path, tiny_base):
    a, b = _two_sets(tmp_path, n_a=8, n_b=8, long_b=True)
    recipe = make_recipe([{"path": str(a)}, {"path": str(b)}], data={"mix_by": "tokens"})
    prep = prepare_run(recipe, processor, tiny_base, log=None, use_cache=False)
    labels = {d: sum(n_label_tokens(s) for s in prep.train if s["dataset"] == d)
              for d in ("0:a.jsonl", "1:b.jsonl")}
    per_b = n_label_tokens(next(s for s in prep.train if s["dataset"] == "1:b.jsonl"))
    assert per_b > 5 * n_label_tokens(next(s for s in prep.train if s["dataset"] == "0:a.jsonl"))
    assert abs(labels["0:a.jsonl"] - labels["1:b.jsonl"]) <= per_b  # equal shares, up to one sample
    counts = {d: sum(s["dataset"] == d for s in prep.train) for d in labels}
    assert counts["0:a.jsonl"] > 3 * counts["1:b.jsonl"]  # many short items, few long ones


def test_eval_fraction_splits_disjointly(processor, make_recipe, tmp_path, tiny_base):
    a, _ = _two_sets(tmp_path, n_a=12)
    recipe = make_recipe([{"path": str(a)}], data={"eval_fraction": 0.25})
    prep = prepare_run(recipe, processor, tiny_base, log=None, use_cache=False)
    train, held = {s["origin"] for s in prep.train}, {s["origin"] for s in prep.eval}
    assert len(held) == 3 and len(train) == 9 and not train & held


def _same(x, y):
    for key in ("input_ids", "labels", "mm_token_type_ids", "origin", "overflow"):
        assert list(x[key]) == list(y[key]), key
    for key in ("pixel_values", "image_position_ids", "input_features"):
        assert len(x.get(key, [])) == len(y.get(key, []))
        assert all(np.array_equal(p, q) for p, q in zip(x.get(key, []), y.get(key, []))), key


def demo_recipe(make_recipe, demo_data, **data):
    names = ("train_image", "train_audio", "train_text", "train_mixed")
    return make_recipe([{"path": str(demo_data / f"{n}.jsonl"), "weight": 0.3 if n == "train_mixed" else 1}
                        for n in names], data={"image_tokens": 70, "max_seq_len": 256, **data})


def test_cache_is_reused_fast_and_num_proc_gives_the_same_samples(processor, make_recipe, demo_data,
                                                                   tiny_base):
    logs = []
    first = prepare_run(demo_recipe(make_recipe, demo_data), processor, tiny_base, log=logs.append)
    assert not first.from_cache and not any("reusing" in x for x in logs)
    t0 = time.perf_counter()
    again = prepare_run(demo_recipe(make_recipe, demo_data), processor, tiny_base, log=logs.append)
    assert again.from_cache and time.perf_counter() - t0 < 1.0
    assert "reusing cached tokenized data" in logs[-1]
    assert again.stats == first.stats and len(again.train) == len(first.train)
    # Settings that cannot change a sample share the cache; the data's contents do not.
    r1, r2 = demo_recipe(make_recipe, demo_data), demo_recipe(make_recipe, demo_data, num_proc=2)
    assert cache_key(r1, str(tiny_base)) == cache_key(r2, str(tiny_base))
    assert cache_key(r1, str(tiny_base)) != cache_key(demo_recipe(make_recipe, demo_data, image_tokens=140),
                                                      str(tiny_base))
    # The chat format shapes every sample, and it comes from the model family, not this package.
    other_chat = dataclasses.replace(GEMMA4_UNIFIED.chat, turn_end="<end_of_turn>")
    assert cache_key(r1, str(tiny_base), GEMMA4_UNIFIED.chat) == cache_key(r2, str(tiny_base), GEMMA4_UNIFIED.chat)
    assert cache_key(r1, str(tiny_base), GEMMA4_UNIFIED.chat) != cache_key(r1, str(tiny_base), other_chat)
    one = prepare_run(r1, processor, tiny_base, log=None, use_cache=False)
    two = prepare_run(r2, processor, tiny_base, log=None, use_cache=False)
    assert one.stats == two.stats
    assert len(one.train) == len(two.train) == len(again.train)
    for x, y, z in zip(one.train, two.train, (again.train[i] for i in range(len(again.train)))):
        _same(x, y)
        _same(x, z)  # and the cache round trip is exact


def test_data_stats_json(tiny_base, demo_data, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"base": str(tiny_base)},
        "datasets": [{"path": str(demo_data / f"train_{k}.jsonl")} for k in ("mixed", "text")],
        "data": {"image_tokens": 70, "max_seq_len": 256, "cache_dir": str(tmp_path / "c")},
        "train": {"output_dir": str(tmp_path / "o")}}))
    assert main(["data", "stats", str(path), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    s = json.loads(out[0])
    assert {"records", "used", "rejected", "rejected_by_reason", "overflow_actions", "tokens",
            "length_percentiles"} <= s.keys()
    assert set(s["tokens"]) == {"text", "image", "audio", "label"}
    assert s["records"] == s["used"] + s["rejected"] == 12
    assert s["tokens"]["image"] > 0 and s["tokens"]["audio"] > 0 and s["tokens"]["label"] > 0
    assert set(s["length_percentiles"]) == {"min", "p50", "p90", "p99", "max"}


# ---------------------------------------------------------------- streaming


def test_streaming_is_lazy_and_accounts_by_the_end(processor, make_recipe, messy, demo_data, tiny_base):
    datasets, reasons, _ = messy
    recipe_datasets = datasets + [{"path": str(demo_data / "train_text.jsonl")}]
    recipe = make_recipe(recipe_datasets, data={**MESSY_DATA, "streaming": True})
    prep = prepare_run(recipe, processor, tiny_base, log=None)
    assert prep.streaming and isinstance(prep.train, StreamingSamples) and prep.cache_dir is None
    assert prep.train.stats.records == 0  # nothing read up front
    it = iter(prep.train)
    first = next(it)
    assert 0 < prep.train.stats.records <= CHUNK * 3 and not prep.train.complete
    partial = prep.train.stats_dict()  # what a run that stops mid-epoch can still write
    assert partial["complete"] is False and partial["total"]["records"] == prep.train.stats.records
    epoch = [first, *it]
    assert prep.train.complete and prep.stats["complete"] and prep.train.stats_dict() is prep.stats
    cached = prepare_run(make_recipe(recipe_datasets, data=MESSY_DATA), processor, tiny_base, log=None)
    for key in ("records", "used", "rejected", "rejected_by_reason", "tokens", "overflow_actions"):
        assert prep.stats["total"][key] == cached.stats["total"][key], key
    assert prep.stats["total"]["rejected_by_reason"] == reasons
    # Every usable record was streamed at least once (short datasets cycle to keep their share).
    assert len({s["origin"] for s in epoch}) == cached.stats["total"]["used"]
    with open(f"{recipe.train.output_dir}/rejects.jsonl") as f:
        assert len(f.readlines()) == cached.stats["total"]["rejected"] == 8


def test_streaming_counts_only_where_counts_records(processor, make_recipe, messy, tiny_base):
    """The ranks that do not count (counts_records False) read the same samples and write nothing."""
    datasets, _, _ = messy
    recipe = make_recipe(datasets, data={**MESSY_DATA, "streaming": True})
    prep = prepare_run(recipe, processor, tiny_base, log=None)
    prep.train.counts_records = False
    quiet = list(prep.train)
    assert prep.train.stats.records == 0 and not prep.train.complete
    assert (Path(recipe.train.output_dir) / "rejects.jsonl").read_text() == ""
    prep.train.counts_records = True
    counted = list(prep.train)
    assert prep.train.complete and prep.stats["total"]["records"] == 11
    assert [s["origin"] for s in quiet] == [s["origin"] for s in counted]


def test_streaming_interleaves_by_weight_and_batches_resume(processor, make_recipe, tmp_path, tiny_base):
    a, b = _two_sets(tmp_path, n_a=8, n_b=4)
    recipe = make_recipe([{"path": str(a)}, {"path": str(b)}], data={"streaming": True})
    prep = prepare_run(recipe, processor, tiny_base, log=None)
    next(iter(prep.train))  # an abandoned first pass: the next one counts afresh
    epoch = list(prep.train)
    assert prep.stats["total"]["records"] == 12
    counts = {d: sum(s["dataset"] == d for s in epoch) for d in ("0:a.jsonl", "1:b.jsonl")}
    assert counts == {"0:a.jsonl": 8, "1:b.jsonl": 8}  # equal weights: b goes round twice
    assert len({s["origin"] for s in epoch}) == 12
    from finetune.training.batches import stream_micro_batches

    pad = processor.tokenizer.pad_token_id
    fresh = stream_micro_batches(prep.train, 2, pad)
    batches = [next(fresh) for _ in range(10)]  # crosses into the second epoch
    assert all(b["input_ids"].shape[0] == 2 for b in batches)
    resumed = stream_micro_batches(prep.train, 2, pad, start=7)
    for want in batches[7:]:
        got = next(resumed)
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
    r0 = next(stream_micro_batches(prep.train, 1, pad, rank=0, world=2))
    r1 = next(stream_micro_batches(prep.train, 1, pad, rank=1, world=2))
    assert not torch.equal(r0["input_ids"], r1["input_ids"])  # each rank its own slice


def test_streaming_eval_fraction_holds_out_records(processor, make_recipe, tmp_path, tiny_base):
    a, _ = _two_sets(tmp_path, n_a=40)
    recipe = make_recipe([{"path": str(a)}], data={"streaming": True, "eval_fraction": 0.25})
    prep = prepare_run(recipe, processor, tiny_base, log=None)
    train = {s["origin"] for s in prep.train}
    held = {s["origin"] for s in prep.eval}
    assert not train & held and len(train | held) == 40 and 3 <= len(held) <= 20
    assert prep.stats["eval"]["records"] == len(held) and prep.stats["total"]["records"] == len(train)
