"""`format: preference`: TRL's layouts parse, both answers render after the served prompt (the
SFT renderer is the kept reference), bad pairs are counted and written to rejects.jsonl, and
the cache and the stream carry the second answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools.conversation import REASONS, BadRecord
from data_tools.pipeline import prepare
from data_tools.preference import parse_preference
from data_tools.render import IGNORE, Renderer, RenderSettings
from finetune.errors import RecipeErrors
from finetune.model.families import GEMMA4_UNIFIED

SYSTEM = {"role": "system", "content": "Answer with one word."}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def good_rows(d: Path) -> list[dict]:
    img, wav = str(d / "images/train_0000.png"), str(d / "audio/train_0000.wav")
    return [
        # conversational, bare image placeholder filled from `images`
        {"prompt": [SYSTEM, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
         "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}],
         "images": [img]},
        # plain text with an `audios` column and no media part: the clip goes before the text
        {"prompt": "High or low?", "chosen": "high", "rejected": "low", "audios": [wav]},
        # implicit prompt: two whole conversations
        {"chosen": [SYSTEM, {"role": "user", "content": "Capital of Norvia?"}, {"role": "assistant", "content": "Halden"}],
         "rejected": [SYSTEM, {"role": "user", "content": "Capital of Norvia?"}, {"role": "assistant", "content": "Porta"}]},
        # a media part with its own path; a longer rejected answer
        {"prompt": [{"role": "user", "content": [{"type": "image", "path": img}, {"type": "text", "text": "Colour?"}]}],
         "chosen": "red", "rejected": "a deep and vivid blue, I would say"},
    ]


BAD = [  # (record, reason)
    ({"prompt": "Q?", "chosen": "yes"}, "no_answer"),
    ({"prompt": "Q?", "chosen": "   ", "rejected": "no"}, "no_answer"),
    ({"prompt": "Q?", "chosen": "same", "rejected": "same "}, "same_answers"),
    ({"chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "y"}]}, "prompt_mismatch"),
    ({"chosen": "x", "rejected": "y"}, "wrong_shape"),  # plain text needs a prompt
    ({"prompt": "Q?", "chosen": [{"role": "assistant", "content": [{"type": "image", "path": "a.png"}]}],
      "rejected": "no"}, "wrong_shape"),  # media in an answer
    ({"prompt": "Q?", "completion": "x", "label": "yes"}, "wrong_shape"),
    ({"prompt": "Q?", "answer": "x"}, "wrong_shape"),
    ({"prompt": "Q?", "chosen": "a", "rejected": "b", "images": ["x.png", "y.png"]}, "missing_media"),
    ({"prompt": [{"role": "user", "content": [{"type": "image"}]}], "chosen": "a", "rejected": "b"},
     "placeholder_mismatch"),
]


@pytest.mark.parametrize("record,reason", [b for b in BAD if b[1] != "missing_media"])  # media load later
def test_bad_pairs_raise_their_reason(record, reason):
    with pytest.raises(BadRecord) as e:
        parse_preference(record, "p.jsonl:1", ".")
    assert e.value.reason == reason and reason in REASONS and e.value.origin == "p.jsonl:1"


def test_layouts_parse_to_the_same_conversations(demo_data):
    rows = good_rows(demo_data)
    first = parse_preference(rows[0], "x:1", str(demo_data))
    assert [p.type for p in first.chosen.messages[1].parts] == ["image", "text"]
    assert first.chosen.messages[-1].text() == "red" and first.rejected.messages[-1].text() == "blue"
    assert first.chosen.messages[:-1] == first.rejected.messages[:-1]
    audio = parse_preference(rows[1], "x:2", str(demo_data))
    assert [p.type for p in audio.chosen.messages[0].parts] == ["audio", "text"]  # TRL's placement
    implicit = parse_preference(rows[2], "x:3", ".")
    assert [m.role for m in implicit.chosen.messages] == ["system", "user", "assistant"]
    kto = parse_preference({"prompt": "Q?", "completion": "x", "label": False}, "x:4", ".")
    assert kto.rejected is None and kto.desirable is False


@pytest.fixture
def recipe_for(tiny_base, tmp_path):
    from finetune.config.recipe import recipe_from_dict

    def make(path, objective="dpo", **data):
        return recipe_from_dict({
            "model": {"base": str(tiny_base), "quantization": "none"},
            "datasets": [{"path": str(path), "format": "preference"}],
            "data": {"image_tokens": 70, "max_seq_len": 256, "on_bad_record": "skip",
                     "cache_dir": str(tmp_path / "cache"), **data},
            "train": {"objective": objective, "output_dir": str(tmp_path / "out")}})
    return make


def run_prepare(recipe, processor, **kw):
    out = Path(recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return prepare(recipe, processor, recipe.model.base, rejects_path=out / "rejects.jsonl",
                   chat=GEMMA4_UNIFIED.chat, **kw)


def test_both_answers_follow_the_served_prompt(recipe_for, processor, demo_data, tmp_path):
    """Kept reference: the SFT renderer (last answer only) on prompt + each answer."""
    from data_tools.media import load_media

    path = write_jsonl(tmp_path / "p.jsonl", good_rows(demo_data))
    r = recipe_for(path)
    samples = sorted(run_prepare(r, processor, use_cache=False).train, key=lambda s: s["origin"])
    assert [s["modality"] for s in samples] == ["image", "audio", "text", "image"]
    ref = Renderer(processor, RenderSettings(max_seq_len=256, train_on="last_assistant", image_tokens=70),
                   GEMMA4_UNIFIED.chat)
    for s, row in zip(samples, good_rows(demo_data)):
        pref = parse_preference(row, "x", str(tmp_path))
        images, audios = load_media(pref.chosen, r.data)
        for conv, answer in ((pref.chosen, None), (pref.rejected, s["rejected_ids"])):
            want = ref.render(conv, images, audios)
            start = want["labels"].index(next(x for x in want["labels"] if x != IGNORE))
            stop = max(k for k, x in enumerate(want["labels"]) if x != IGNORE) + 1
            if answer is None:  # the stored sequence is the chosen one, through its <turn|>
                assert s["input_ids"] == want["input_ids"][:stop] and s["labels"] == want["labels"][:stop]
                assert s["mm_token_type_ids"] == want["mm_token_type_ids"][:stop]
            else:
                assert answer == want["input_ids"][start:stop]
        prompt = processor.tokenizer(ref.prompt_text(pref.chosen), add_special_tokens=False)["input_ids"]
        assert processor.tokenizer.decode(s["input_ids"][:start]).endswith("<|turn>model\n<|channel>thought\n<channel|>")
        assert len(prompt) <= start  # media expand inside the prompt, never inside an answer
    assert len(samples[0]["pixel_values"]) == 1 and len(samples[1]["input_features"]) == 1  # media once


def test_bad_pairs_are_counted_and_written_to_rejects(recipe_for, processor, demo_data, tmp_path):
    rows = good_rows(demo_data)[:2] + [rec for rec, _ in BAD] + ["{not json"]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    # 11 of 13 records are bad on purpose: the counts are the point here, not the yield rule.
    data = run_prepare(recipe_for(path), processor, use_cache=False, check=False)
    total = data.stats["total"]
    want = {}
    for _, reason in BAD:
        want[reason] = want.get(reason, 0) + 1
    want["unparseable"] = 1
    assert total["records"] == len(rows) and total["used"] == 2 and total["rejected_by_reason"] == want
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["origin"] for r in rejects) == sorted(f"{path}:{i}" for i in range(3, len(rows) + 1))
    assert rejects[0]["record"] == BAD[0][0]  # the record as read, to fix and re-run


def test_bad_pairs_stop_the_run_under_on_bad_record_error(recipe_for, processor, tmp_path):
    from finetune.errors import UserError

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "same", "rejected": "same"}])
    with pytest.raises(UserError) as e:
        run_prepare(recipe_for(path, on_bad_record="error"), processor, use_cache=False)
    assert e.value.line() == (f"{path}:1: bad record (same_answers): the chosen and rejected answers "
                              "are the same: nothing to prefer. Fix the record, or set data.on_bad_record: "
                              "skip to write it to rejects.jsonl and go on.")


def test_overflow_sees_the_longer_answer(recipe_for, processor, tmp_path):
    long = " ".join(["Halden"] * 40)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Capital of Norvia?", "chosen": "Halden", "rejected": long}])
    dropped = run_prepare(recipe_for(path, max_seq_len=48, overflow="drop"), processor, use_cache=False,
                          check=False)  # the one record dropped: counted here, a run would stop on it
    assert dropped.stats["total"]["rejected_by_reason"] == {"over_budget": 1}
    cut = run_prepare(recipe_for(path, max_seq_len=48, overflow="truncate_text"), processor, use_cache=False).train[0]
    start = next(k for k, x in enumerate(cut["labels"]) if x != IGNORE)
    assert start + len(cut["rejected_ids"]) == 48 and cut["overflow"] == "truncate_text"


def test_cache_and_stream_carry_both_answers(recipe_for, processor, demo_data, tmp_path):
    rows = good_rows(demo_data) + [{"prompt": "Q?", "completion": "fine", "label": True},
                                   {"prompt": "Q?", "completion": "bad", "label": False}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    r = recipe_for(path, "kto")
    fresh = {s["origin"]: s for s in run_prepare(r, processor, use_cache=False).train}
    run_prepare(r, processor)
    cached = run_prepare(r, processor)
    assert cached.from_cache
    again = {s["origin"]: s for s in (cached.train[i] for i in range(len(cached.train)))}
    streamed = {s["origin"]: s for s in run_prepare(r, processor, streaming=True).train.samples(0)}
    for other in (again, streamed):
        assert other.keys() == fresh.keys()
        for k, s in fresh.items():
            assert list(other[k]["input_ids"]) == s["input_ids"]
            assert list(other[k].get("rejected_ids", [])) == list(s.get("rejected_ids", []))
            assert other[k].get("desirable") == s.get("desirable")
    assert sorted(s.get("desirable", -1) for s in fresh.values()) == [-1, -1, -1, -1, 0, 1]


@pytest.mark.parametrize("train,fix", [
    ({"objective": "sft"}, "datasets[0].format: preference data can't train objective 'sft'"),
    ({"objective": "orpo", "reference_adapter": "x"}, "train.reference_adapter: objective 'orpo' has no reference"),
    ({"objective": "dpo", "packing": True}, "train.packing: objective 'dpo' does not pack samples"),
])
def test_recipe_errors(tiny_base, train, fix):
    from finetune.config.recipe import recipe_from_dict

    with pytest.raises(RecipeErrors) as e:
        recipe_from_dict({"model": {"base": str(tiny_base)}, "datasets": [{"path": "p.jsonl", "format": "preference"}],
                          "train": train})
    assert any(x.line().startswith(fix) for x in e.value.errors), [x.line() for x in e.value.errors]


def test_preference_settings_are_checked(tiny_base):
    from finetune.config.recipe import recipe_from_dict

    with pytest.raises(RecipeErrors) as e:
        recipe_from_dict({"model": {"base": str(tiny_base)}, "datasets": [{"path": "p.jsonl", "format": "preference"}],
                          "train": {"objective": "dpo"}, "preference": {"beta": 0, "loss_type": "hinge"}})
    lines = [x.line() for x in e.value.errors]
    assert "preference.beta: 0.0 is below the minimum 1e-06. Use a value >= 1e-06." in lines
    assert any(x.startswith("preference.loss_type: 'hinge' is not one of 'sigmoid' | 'ipo'") for x in lines)
