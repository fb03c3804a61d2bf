"""Rendering: exactly which tokens carry a label, budgets, overflow, and bit-exact media caching.

Each test goes the way a record does in a run: parse (data_tools.formats) → load media from
real files (data_tools.media) → render through the tiny base's real processor.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from data_tools.accounting import Stats
from data_tools.collate import collate
from data_tools.conversation import BadRecord
from data_tools.render import IGNORE, Renderer, RenderSettings
from data_tools.render_pool import RecordWorker
from data_tools.steps import main_length, step_ids
from finetune.model.families import GEMMA4_UNIFIED

CHAT = GEMMA4_UNIFIED.chat

GEN_PROMPT_END = "<|turn>model\n<|channel>thought\n<channel|>"


@pytest.fixture
def media(tmp_path):
    """A 400×300 red PNG and a 0.5 s 16 kHz tone (13 audio tokens) on disk."""
    Image.new("RGB", (400, 300), (220, 30, 30)).save(tmp_path / "red.png")
    t = np.arange(8000) / 16000
    sf.write(tmp_path / "tone.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return tmp_path


def render(processor, make_recipe, record, fmt="messages", base_dir=".", **data):
    """(sample, conv, images, audios, renderer) for one record, the way the pipeline does it."""
    recipe = make_recipe([{"path": "unused.jsonl", "format": fmt}],
                         data={"image_tokens": 70, "max_seq_len": 512, **data})
    worker = RecordWorker(processor, recipe.data, CHAT)
    conv, images, audios = worker.load(("t.jsonl:1", record, str(base_dir), fmt, "0:t.jsonl"))
    return worker.renderer.render(conv, images, audios), conv, images, audios, worker.renderer


def labelled(processor, sample) -> list[str]:
    """What each step writes, decoded, in conversation order (`data_tools.steps`)."""
    assert all(lab in (IGNORE, tok) for tok, lab in zip(sample["input_ids"], sample["labels"]))  # the loss shifts
    return [processor.tokenizer.decode(done) for _, done in step_ids(sample)]


def media_ids(r: Renderer) -> set[int]:
    return {r.image_id, r.audio_id, r.boi_id, r.eoi_id, r.boa_id, r.eoa_id}


def check_prompt_prefix(processor, r, sample, conv, images, audios):
    """The served prompt (add_generation_prompt=True), expanded by the processor, is an exact
    prefix of the sample, and the labels start right after it."""
    prompt = r.prompt_text(conv)
    assert prompt.endswith(GEN_PROMPT_END)
    kw = {"images": images, "images_kwargs": {"max_soft_tokens": 70}} if images else {}
    if audios:
        kw["audio"] = audios
    served = processor(text=prompt, add_special_tokens=False, **kw)["input_ids"][0]
    served = list(np.asarray(served))
    assert sample["input_ids"][: len(served)] == served
    # The last answer's labels start right after it (earlier answers may be labelled too).
    assert sample["labels"][len(served) - 1] == IGNORE != sample["labels"][len(served)]


def test_messages_with_image_and_audio_labels_only_the_answer(processor, make_recipe, media):
    record = {"messages": [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": [{"type": "image", "path": "red.png"},
                                     {"type": "audio", "path": "tone.wav"},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "red"}]}
    s, conv, images, audios, r = render(processor, make_recipe, record, base_dir=media)
    assert labelled(processor, s) == ["red<turn|>"]
    check_prompt_prefix(processor, r, s, conv, images, audios)
    assert not media_ids(r) & {x for x in s["labels"] if x != IGNORE}
    types = np.asarray(s["mm_token_type_ids"])
    ids = np.asarray(s["input_ids"])
    assert (types == 1).sum() == (ids == r.image_id).sum() == len(s["pixel_values"][0])
    assert (types == 3).sum() == (ids == r.audio_id).sum() == 13 == len(s["input_features"][0])
    # The image span comes first, then the audio span, each closed.
    assert np.flatnonzero(ids == r.boi_id)[0] < np.flatnonzero(ids == r.boa_id)[0]
    assert (ids == r.eoi_id).sum() == (ids == r.eoa_id).sum() == 1


def test_sharegpt_placeholders_take_media_in_order(processor, make_recipe, media):
    record = {"conversations": [{"from": "human", "value": "<image>\nWhat colour is it? <audio>"},
                                {"from": "gpt", "value": "blue"}],
              "images": ["red.png"], "audios": ["tone.wav"]}
    s, conv, images, audios, r = render(processor, make_recipe, record, "sharegpt", media)
    assert labelled(processor, s) == ["blue<turn|>"]
    check_prompt_prefix(processor, r, s, conv, images, audios)
    text = processor.tokenizer.decode(s["input_ids"])
    assert text.index("<image|>") < text.index("What colour is it?") < text.index("<|audio>")


def test_text_format_labels_everything_after_bos(processor, make_recipe):
    s, *_ = render(processor, make_recipe, {"text": "Norvia lies north of Quentar."}, "text")
    assert s["labels"][0] == IGNORE and s["input_ids"][0] == processor.tokenizer.bos_token_id
    assert labelled(processor, s) == ["Norvia lies north of Quentar.<eos>"]
    assert set(s["mm_token_type_ids"]) == {0}


def test_instruction_with_system_and_image(processor, make_recipe, media):
    record = {"instruction": "Name the colour.", "input": "", "output": "green", "image": "red.png",
              "system": "Be brief."}
    s, conv, images, audios, r = render(processor, make_recipe, record, "instruction", media)
    assert labelled(processor, s) == ["green<turn|>"]
    check_prompt_prefix(processor, r, s, conv, images, audios)
    assert processor.tokenizer.decode(s["input_ids"]).startswith("<bos><|turn>system\nBe brief.<turn|>")


MULTI = {"messages": [{"role": "user", "content": "Capital of Norvia?"},
                      {"role": "assistant", "content": "Halden"},
                      {"role": "user", "content": "And of Quentar?"},
                      {"role": "assistant", "content": "Mirovo"}]}


@pytest.mark.parametrize("train_on, runs", [
    ("assistant", ["Halden<turn|>", "Mirovo<turn|>"]),
    ("last_assistant", ["Mirovo<turn|>"]),
])
def test_multi_turn_train_on(processor, make_recipe, train_on, runs):
    s, conv, images, audios, r = render(processor, make_recipe, MULTI, train_on=train_on)
    assert labelled(processor, s) == runs
    check_prompt_prefix(processor, r, s, conv, images, audios)
    # The history renders the earlier answer without the thinking scaffold; it is trained as
    # served (a branch after the scaffold), the last one as the continuation of the served prompt.
    text = processor.tokenizer.decode(s["input_ids"][: main_length(s)])
    assert "<|turn>model\nHalden<turn|>" in text and text.endswith(GEN_PROMPT_END + "Mirovo<turn|>\n")
    for prompt, _ in step_ids(s):
        assert processor.tokenizer.decode(prompt).endswith(GEN_PROMPT_END)


@pytest.mark.parametrize("history", [
    [{"role": "assistant", "content": "Hello, ask me."}],  # before any user turn: a greeting
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],  # empty
])
def test_history_turns_that_are_not_answers_are_context(processor, make_recipe, history):
    record = {"messages": history + [{"role": "user", "content": "Capital of Norvia?"},
                                     {"role": "assistant", "content": "Halden"}]}
    s, *_ = render(processor, make_recipe, record)
    assert labelled(processor, s) == ["Halden<turn|>"]


def test_train_on_all_labels_every_token_but_bos_and_media(processor, make_recipe, media):
    record = {"messages": [{"role": "user", "content": [{"type": "image", "path": "red.png"},
                                                        {"type": "text", "text": "Colour?"}]},
                           {"role": "assistant", "content": "red"}]}
    s, _, _, _, r = render(processor, make_recipe, record, base_dir=media, train_on="all")
    for i, (tok, lab) in enumerate(zip(s["input_ids"], s["labels"])):
        assert lab == (IGNORE if i == 0 or tok in media_ids(r) else tok)


def test_image_budget_sets_the_span_length(processor, make_recipe, media):
    record = {"messages": [{"role": "user", "content": [{"type": "image", "path": "red.png"}]},
                           {"role": "assistant", "content": "red"}]}
    img = Image.open(media / "red.png").convert("RGB")
    spans = []
    for budget in (70, 140, 280):
        s, *_ = render(processor, make_recipe, record, base_dir=media, image_tokens=budget)
        expected = processor.image_processor([img], max_soft_tokens=budget)["num_soft_tokens_per_image"][0]
        n = s["mm_token_type_ids"].count(1)
        assert n == expected == len(s["pixel_values"][0]) <= budget and s["image_budget"] == budget
        spans.append(n)
    assert spans[0] < spans[1] < spans[2]


IMAGE_AUDIO = {"messages": [{"role": "user", "content": [{"type": "image", "path": "red.png"},
                                                         {"type": "audio", "path": "tone.wav"},
                                                         {"type": "text", "text": "Colour and pitch?"}]},
                            {"role": "assistant", "content": "red, high"}]}


def test_overflow_drop_rejects_over_budget(processor, make_recipe, media):
    with pytest.raises(BadRecord) as e:
        render(processor, make_recipe, IMAGE_AUDIO, base_dir=media, image_tokens=280, max_seq_len=100,
               overflow="drop")
    assert e.value.reason == "over_budget"


def test_overflow_shrink_steps_image_budget_down_then_trims_audio(processor, make_recipe, media):
    full, *_ = render(processor, make_recipe, IMAGE_AUDIO, base_dir=media, image_tokens=280)
    at_70, *_ = render(processor, make_recipe, IMAGE_AUDIO, base_dir=media, image_tokens=70)
    n_img_280 = full["mm_token_type_ids"].count(1)
    # Fits once the image is at 140: only the image shrinks.
    s, *_ = render(processor, make_recipe, IMAGE_AUDIO, base_dir=media, image_tokens=280,
                   max_seq_len=len(full["input_ids"]) - 1)
    assert s["overflow"] == "shrink_image" and s["image_budget"] == 140
    assert s["mm_token_type_ids"].count(1) < n_img_280 and s["mm_token_type_ids"].count(3) == 13
    # Even 70 is too long: the audio is trimmed by whole frames after the image shrank.
    limit = len(at_70["input_ids"]) - 5
    s, *_ = render(processor, make_recipe, IMAGE_AUDIO, base_dir=media, image_tokens=280, max_seq_len=limit)
    assert s["overflow"] == "shrink_image+trim_audio" and s["image_budget"] == 70
    assert len(s["input_ids"]) <= limit and s["mm_token_type_ids"].count(3) < 13
    assert len(s["input_features"][0]) == s["mm_token_type_ids"].count(3)
    assert labelled(processor, s) == ["red, high<turn|>"]
    st = Stats()
    st.add_sample(s, "mixed")
    assert st.to_dict()["overflow_actions"] == {"shrink_image+trim_audio": 1}


def test_truncate_text_cuts_text_only_and_keeps_labels(processor, make_recipe, media):
    long_answer = " ".join(["red"] * 60)
    record = {"messages": [{"role": "user", "content": [{"type": "image", "path": "red.png"},
                                                        {"type": "text", "text": "Colour?"}]},
                           {"role": "assistant", "content": long_answer}]}
    full, _, _, _, r = render(processor, make_recipe, record, base_dir=media)
    limit = len(full["input_ids"]) - 20
    s, *_ = render(processor, make_recipe, record, base_dir=media, max_seq_len=limit,
                   overflow="truncate_text")
    assert s["overflow"] == "truncate_text" and len(s["input_ids"]) == limit
    assert s["input_ids"] == full["input_ids"][:limit]
    assert s["mm_token_type_ids"].count(1) == full["mm_token_type_ids"].count(1)  # the span is whole
    assert r.eoi_id in s["input_ids"] and any(x != IGNORE for x in s["labels"])
    # A limit inside the image span is never cut there: the sample is rejected instead.
    inside = s["input_ids"].index(r.eoi_id) - 3
    with pytest.raises(BadRecord, match="max_seq_len") as e:
        render(processor, make_recipe, record, base_dir=media, max_seq_len=inside, overflow="truncate_text")
    assert e.value.reason == "over_budget"


def test_truncate_text_never_removes_all_labels(processor, make_recipe, media):
    record = {"messages": [{"role": "user", "content": [{"type": "image", "path": "red.png"},
                                                        {"type": "text", "text": "Colour? " * 40}]},
                           {"role": "assistant", "content": "red"}]}
    full, *_ = render(processor, make_recipe, record, base_dir=media)
    first_label = next(i for i, x in enumerate(full["labels"]) if x != IGNORE)
    with pytest.raises(BadRecord) as e:
        render(processor, make_recipe, record, base_dir=media, max_seq_len=first_label - 1,
               overflow="truncate_text")
    assert e.value.reason == "over_budget"


def test_uint8_pixels_and_audio_frames_reproduce_the_processor_bit_exactly(processor, make_recipe, media):
    s, conv, images, audios, r = render(processor, make_recipe, IMAGE_AUDIO, base_dir=media)
    assert s["pixel_values"][0].dtype == np.uint8
    # The processor's own float output, with its default rescale.
    ref = processor(text=r.text_and_labels(conv)[0], images=images, audio=audios, add_special_tokens=False,
                    images_kwargs={"max_soft_tokens": 70}, return_tensors="pt")
    batch = collate([s], pad_id=processor.tokenizer.pad_token_id)
    n = len(s["pixel_values"][0])
    assert ref["pixel_values"].dtype == batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"][0, :n], ref["pixel_values"][0, :n])
    assert torch.equal(batch["image_position_ids"][0, :n], ref["image_position_ids"][0, :n].long())
    assert torch.equal(batch["input_features"], ref["input_features"])
    assert torch.equal(batch["input_ids"][0], ref["input_ids"][0])
    assert torch.equal(batch["mm_token_type_ids"][0], ref["mm_token_type_ids"][0])


def test_render_many_equals_render_and_isolates_bad_items(processor, make_recipe, media):
    """Batched processor calls (one per media kind) give the same samples as one by one."""
    recipe = make_recipe([{"path": "unused.jsonl"}], data={"image_tokens": 70})
    worker = RecordWorker(processor, recipe.data, CHAT)
    img = {"messages": [{"role": "user", "content": [{"type": "image", "path": "red.png"}]},
                        {"role": "assistant", "content": "red"}]}
    big = {"messages": [{"role": "user", "content": [{"type": "image", "path": "wide.png"},
                                                     {"type": "text", "text": "?"}]},
                        {"role": "assistant", "content": "a longer answer"}]}
    Image.new("RGB", (300, 90), (0, 0, 200)).save(media / "wide.png")
    no_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    records = [img, IMAGE_AUDIO, big, no_answer, MULTI, img]
    items = [worker.load((f"t:{i}", rec, str(media), "messages", "0:t")) for i, rec in enumerate(records)]
    items[3][0].messages[-1].parts = []  # an empty answer only the renderer sees
    many = worker.renderer.render_many(items)
    assert isinstance(many[3], BadRecord) and many[3].reason == "no_answer"
    assert worker.renderer.fallbacks == 0
    for k, item in enumerate(items):
        if k == 3:
            continue
        one = worker.renderer.render(*item)
        for key in ("input_ids", "labels", "mm_token_type_ids", "overflow"):
            assert many[k][key] == one[key]
        for key in ("pixel_values", "image_position_ids", "input_features"):
            assert len(many[k].get(key, [])) == len(one.get(key, []))
            assert all(np.array_equal(a, b) for a, b in zip(many[k].get(key, []), one.get(key, [])))
    # A record whose text smuggles in a placeholder spoils the shared call: it alone is rejected.
    trap = {"messages": [{"role": "user", "content": [{"type": "image", "path": "red.png"},
                                                      {"type": "text", "text": "and <|image|> too"}]},
                         {"role": "assistant", "content": "red"}]}
    batch = [items[0], worker.load(("t:trap", trap, str(media), "messages", "0:t")), items[5]]
    got = worker.renderer.render_many(batch)
    assert worker.renderer.fallbacks == 1
    assert isinstance(got[1], BadRecord) and got[1].reason == "render_failed" and got[1].origin == "t:trap"
    assert got[0]["input_ids"] == got[2]["input_ids"] == many[0]["input_ids"]


def test_fast_paths_agree_with_the_processor(processor, make_recipe):
    """Tokenizer-side template and Rust encode are used only when they match the processor's."""
    r = Renderer(processor, RenderSettings(), CHAT)
    assert r.fast_template
    msgs = [{"role": "user", "content": [{"type": "audio"},
                                         {"type": "text", "text": "Tell me ✓ the pitch."}]}]
    slow = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert r.template(msgs, True) == slow
    text = r.template(msgs, True) + "high<turn|>\n"
    assert r.encode(text) == processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    # Text-only samples skip the processor: same ids, all text.
    s, conv, *_ = render(processor, make_recipe, MULTI)
    ref = processor(text=r.text_and_labels(conv)[0], add_special_tokens=False)
    n = main_length(s)
    assert s["input_ids"][:n] == list(ref["input_ids"][0])
    assert s["mm_token_type_ids"][:n] == list(ref["mm_token_type_ids"][0])


def test_model_facts_come_from_the_processor_and_the_chat_format(processor):
    """Nothing model-specific is written into the renderer: turn tokens from the family's chat
    format, the video placeholder and the audio framing from the processor."""
    r = Renderer(processor, RenderSettings(), CHAT)
    tok = processor.tokenizer
    assert r.eot == CHAT.turn_end and r.eot_id == tok.convert_tokens_to_ids(CHAT.turn_end) != tok.unk_token_id
    assert tok.convert_tokens_to_ids(processor.video_token) in r.media_ids
    assert r.audio_frame == processor.feature_extractor.audio_samples_per_token


# ---------------------------------------------------------------- system, thinking, tools


def test_text_only_content_goes_to_the_template_as_a_string(processor, make_recipe, media):
    """The official template prints a list-valued system content as its repr; ours get a string."""
    record = {"messages": [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                           {"role": "user", "content": [{"type": "image", "path": "red.png"},
                                                        {"type": "text", "text": "Colour?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    s, conv, _, _, r = render(processor, make_recipe, record, base_dir=media)
    msgs = r.chat_text.messages(conv, False)
    assert msgs[0]["content"] == "Answer briefly." and msgs[2]["content"] == "red"
    assert msgs[1]["content"] == [{"type": "image"}, {"type": "text", "text": "Colour?"}]
    text = processor.tokenizer.decode(s["input_ids"])
    assert "<|turn>system\nAnswer briefly.<turn|>" in text and "[{'type'" not in text


def test_system_message_with_media_is_refused(processor, make_recipe, media):
    record = {"messages": [{"role": "system", "content": [{"type": "image", "path": "red.png"}]},
                           {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "red"}]}
    with pytest.raises(BadRecord, match="the system message carries media") as e:
        render(processor, make_recipe, record, base_dir=media)
    assert e.value.reason == "render_failed"


THOUGHT = "<|channel>thought\n"


@pytest.mark.parametrize("answer", [
    {"reasoning_content": "add them", "content": "4"},
    {"thinking": "add them", "content": "4"},
    {"content": "<|channel>thought\nadd them<channel|>4"},  # the thought channel inside the content
])
def test_a_reasoning_trace_is_written_after_the_thinking_prompt(processor, make_recipe, answer):
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", **answer}]}
    s, conv, images, audios, r = render(processor, make_recipe, record)
    assert labelled(processor, s) == [THOUGHT + "add them<channel|>4<turn|>"]
    text = processor.tokenizer.decode(s["input_ids"])
    # Served with thinking on: <|think|> in the system turn, no empty scaffold before the thought.
    assert text == ("<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\n2+2?<turn|>\n"
                    "<|turn>model\n" + THOUGHT + "add them<channel|>4<turn|>\n")
    assert text.count(THOUGHT) == 1 and r.prompt_text(conv, True).endswith("<|turn>model\n")


def test_thinking_off_drops_traces_and_on_serves_without_scaffold(processor, make_recipe):
    record = {"messages": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "reasoning_content": "add them", "content": "4"}]}
    off, *_ = render(processor, make_recipe, record, thinking="off")
    text = processor.tokenizer.decode(off["input_ids"])
    assert labelled(processor, off) == ["4<turn|>"] and "add them" not in text
    assert text.endswith(GEN_PROMPT_END + "4<turn|>\n") and text.count(THOUGHT) == 1
    plain = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    on, *_ = render(processor, make_recipe, plain, thinking="on")
    text = processor.tokenizer.decode(on["input_ids"])
    assert labelled(processor, on) == ["4<turn|>"] and THOUGHT not in text
    assert text.startswith("<bos><|turn>system\n<|think|>\n<turn|>\n") and text.endswith("<|turn>model\n4<turn|>\n")
    auto, *_ = render(processor, make_recipe, plain)  # auto: no trace, no thinking
    assert processor.tokenizer.decode(auto["input_ids"]).endswith(GEN_PROMPT_END + "4<turn|>\n")


def test_history_drops_thoughts_but_each_step_is_trained_with_its_own(processor, make_recipe):
    """The template strips the earlier thought from the history; served, the model writes it there."""
    record = {"messages": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "<|channel>thought\nadd<channel|>4"},
                           {"role": "user", "content": "3+3?"},
                           {"role": "assistant", "reasoning_content": "add again", "content": "6"}]}
    s, *_ = render(processor, make_recipe, record)
    assert labelled(processor, s) == [THOUGHT + "add<channel|>4<turn|>", THOUGHT + "add again<channel|>6<turn|>"]
    text = processor.tokenizer.decode(s["input_ids"][: main_length(s)])
    assert "<|turn>model\n4<turn|>" in text and text.count(THOUGHT) == 1


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "description": "City name"}},
                                                "required": ["city"]}}}
DECLARED = ('<|tool>declaration:get_weather{description:<|"|>Weather of a city<|"|>,parameters:{properties:'
            '{city:{description:<|"|>City name<|"|>,type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],'
            'type:<|"|>OBJECT<|"|>}}<tool|>')


def weather_call(city, id_):
    return {"id": id_, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


def call_text(city):
    return f'<|tool_call>call:get_weather{{city:<|"|>{city}<|"|>}}<tool_call|>'


def response_text(value):
    return f'<|tool_response>response:get_weather{{value:<|"|>{value}<|"|>}}<tool_response|>'


TOOL_FLOW = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "tool_calls": [weather_call("Paris", "a"), weather_call("Rome", "b")]},
    {"role": "tool", "tool_call_id": "a", "content": "sunny"},
    {"role": "tool", "tool_call_id": "b", "content": "rain"},
    {"role": "assistant", "content": "Sunny in Paris, rain in Rome."}]}


@pytest.mark.parametrize("train_on, runs", [
    ("assistant", [call_text("Paris") + call_text("Rome") + "<|tool_response>", "Sunny in Paris, rain in Rome.<turn|>"]),
    ("last_assistant", ["Sunny in Paris, rain in Rome.<turn|>"]),
])
def test_parallel_tool_calls_label_the_calls_and_the_answer(processor, make_recipe, train_on, runs):
    s, conv, images, audios, r = render(processor, make_recipe, TOOL_FLOW, train_on=train_on)
    assert labelled(processor, s) == runs
    # Declarations in the system turn and the responses are context; calls end where the tools take over.
    assert processor.tokenizer.decode(s["input_ids"][: main_length(s)]) == (
        "<bos><|turn>system\n" + DECLARED + "<turn|>\n<|turn>user\nWeather in Paris and Rome?<turn|>\n"
        "<|turn>model\n" + call_text("Paris") + call_text("Rome") + response_text("sunny") + response_text("rain")
        + "Sunny in Paris, rain in Rome.<turn|>\n")
    assert r.prompt_text(conv).endswith(response_text("rain"))  # after the tools, no new header


def test_a_record_ending_in_a_call_trains_the_call_after_the_served_prompt(processor, make_recipe):
    record = {"tools": [WEATHER], "messages": [{"role": "user", "content": "Weather in Paris?"},
                                               {"role": "assistant", "tool_calls": [weather_call("Paris", "a")]}]}
    s, conv, images, audios, r = render(processor, make_recipe, record)
    assert labelled(processor, s) == [call_text("Paris") + "<|tool_response>"]
    check_prompt_prefix(processor, r, s, conv, images, audios)
    everything, *_ = render(processor, make_recipe, record, train_on="all")
    assert everything["labels"][0] == IGNORE and everything["labels"][1:] == everything["input_ids"][1:]


def test_reasoning_before_a_call_is_kept_in_the_call_turn(processor, make_recipe):
    flow = {"tools": [WEATHER], "messages": [
        TOOL_FLOW["messages"][0],
        {"role": "assistant", "reasoning_content": "Two cities.", "tool_calls": TOOL_FLOW["messages"][1]["tool_calls"]},
        *TOOL_FLOW["messages"][2:]]}
    s, *_ = render(processor, make_recipe, flow)
    # As the model writes it (the history renders a newline before `<channel|>`).
    assert labelled(processor, s) == [THOUGHT + "Two cities.<channel|>" + call_text("Paris") + call_text("Rome")
                                      + "<|tool_response>", "Sunny in Paris, rain in Rome.<turn|>"]
    assert processor.tokenizer.decode(s["input_ids"]).startswith("<bos><|turn>system\n<|think|>\n")


def test_tool_messages_fold_into_the_calling_turn_as_llama_cpp_serves_older_templates():
    """For templates that do not read `tool` messages (the interleaved Gemma 4 one): calls, their
    responses (JSON content decoded, names by position) and the answer become one turn."""
    from data_tools.tools import fold_tool_responses

    calls = [weather_call("Paris", "a"), weather_call("Rome", "b")]
    msgs = [{"role": "user", "content": "?"},
            {"role": "assistant", "content": None, "tool_calls": calls, "reasoning_content": "Two."},
            {"role": "tool", "tool_call_id": "a", "content": '{"sky": "sun"}'},
            {"role": "tool", "tool_call_id": "b", "content": "rain"},
            {"role": "assistant", "content": "Mixed."},
            {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Bye."}]
    assert fold_tool_responses(msgs) == [
        msgs[0],
        {"role": "assistant", "tool_calls": calls, "reasoning_content": "Two.", "content": "Mixed.",
         "tool_responses": [{"name": "get_weather", "response": {"sky": "sun"}},
                            {"name": "get_weather", "response": "rain"}]},
        msgs[5], msgs[6]]
    pending = fold_tool_responses(msgs[:2])  # a call not answered yet: the calls alone
    assert pending == [msgs[0], {"role": "assistant", "tool_calls": calls, "reasoning_content": "Two."}]
