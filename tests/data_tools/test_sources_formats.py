"""Reading records from every source kind and parsing every record layout."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import pickle

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_tools.conversation import REASONS, BadRecord, Conversation
from data_tools.formats import iter_conversations, parse_record
from data_tools.media import load_image
from data_tools.sources import check_source, iter_records
from finetune.config.recipe import DatasetSpec
from finetune.errors import UserError

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def records(path, **spec):
    return list(iter_records(DatasetSpec(path=str(path), **spec)))


def png_bytes(color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, "PNG")
    return buf.getvalue()


# -- sources -------------------------------------------------------------------------------

def test_jsonl_origins_blank_lines_and_bad_lines(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, "", "{not json", "[1, 2]", {"text": "x"}])
    got = records(path)
    assert [o for o, _, _ in got] == [f"{path}:1", f"{path}:3", f"{path}:4", f"{path}:5"]
    assert got[0][1] == CHAT and got[0][2] == str(tmp_path)
    bad, not_object = got[1][1], got[2][1]
    assert isinstance(bad, BadRecord) and bad.reason == "unparseable"
    assert bad.origin == f"{path}:3" and bad.raw == "{not json"
    assert isinstance(not_object, BadRecord) and not_object.reason == "wrong_shape"
    assert not_object.origin == f"{path}:4"


def test_jsonl_line_that_is_not_utf8_is_one_bad_record(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b'\n{"text": "\xff\xfe"}\n')
    got = records(path)
    assert got[0][1] == CHAT
    assert got[1][1].reason == "unparseable" and got[1][1].origin == f"{path}:2"


@pytest.mark.parametrize("payload", [[CHAT, CHAT], {"data": [CHAT, CHAT]}])
def test_json_array_and_data_wrapper(tmp_path, payload):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(payload))
    got = records(path)
    assert [o for o, _, _ in got] == [f"{path}:row 1", f"{path}:row 2"]  # 1-based, like JSONL lines
    assert all(r == CHAT for _, r, _ in got)


def test_json_file_holding_json_lines_is_read_as_such(tmp_path):
    path = write_jsonl(tmp_path / "train.json", [CHAT, {"text": "x"}])
    assert [r for _, r, _ in records(path)] == [CHAT, {"text": "x"}]
    assert records(path)[1][0] == f"{path}:2"


def test_json_array_item_that_is_not_an_object(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([CHAT, "oops"]))
    bad = records(path)[1][1]
    assert bad.reason == "wrong_shape" and bad.origin == f"{path}:row 2"


@pytest.mark.parametrize("text,where", [('[{"a": 1},\n {"a": ', ":2"), ('{"rows": []}', "")])
def test_json_file_that_cannot_be_read_is_a_user_error(tmp_path, text, where):
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        records(path)
    assert e.value.where == f"{path}{where}"


def test_parquet_rows_and_embedded_image_bytes(tmp_path):
    path = tmp_path / "train.parquet"
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "prompt": ["what colour?", "and this?"],
        "response": ["red", "green"],
        "image": pa.array([{"bytes": png_bytes(), "path": None}, {"bytes": None, "path": "g.png"}], image_type),
    })
    pq.write_table(table, path)
    got = records(path)
    assert [o for o, _, _ in got] == [f"{path}:row 1", f"{path}:row 2"]  # 1-based, like JSONL lines
    conv = parse_record(got[0][1], "instruction", got[0][0], got[0][2])
    image = conv.messages[0].parts[0]
    assert image.ref_kind == "base64"
    pixels = load_image(image, conv.base_dir, max_pixels=100, max_bytes=10_000, allow_network=False)
    assert pixels.getpixel((0, 0)) == (255, 0, 0)
    second = parse_record(got[1][1], "instruction", got[1][0], got[1][2])
    assert (second.messages[0].parts[0].ref, second.messages[0].parts[0].ref_kind) == ("g.png", "path")


def test_csv_rows_json_columns_and_extra_fields(tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "response", "images"])
        w.writerow(["[not a list] what?", "an answer", '["a.png", "b.png"]'])
        w.writerow(["q", "", ""])
        w.writerow(["q", "a", "x.png", "surplus"])
    got = records(path)
    assert [o for o, _, _ in got] == [f"{path}:row 1", f"{path}:row 2", f"{path}:row 3"]
    # Only list/object columns are decoded from JSON; a prompt starting with "[" stays text.
    assert got[0][1] == {"prompt": "[not a list] what?", "response": "an answer", "images": ["a.png", "b.png"]}
    assert got[1][1] == {"prompt": "q", "response": None, "images": None}
    assert got[2][1].reason == "unparseable" and got[2][1].origin == f"{path}:row 3"


def test_csv_messages_column_as_json(tmp_path):
    path = tmp_path / "chat.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["dialog"], [json.dumps(CHAT["messages"])]])
    (conv,) = iter_conversations(DatasetSpec(path=str(path), columns={"messages": "dialog"}))
    assert isinstance(conv, Conversation) and conv.messages[1].text() == "hello"


def test_folder_and_glob_read_all_data_files_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "c"}])
    (tmp_path / "notes.txt").write_text("not data")
    texts = [r["text"] for _, r, _ in records(tmp_path)]
    assert texts == ["a", "b", "c"]
    sub = records(tmp_path)[2]
    assert sub[2] == str(tmp_path / "sub")  # media of sub/c.jsonl resolve against sub/
    assert [r["text"] for _, r, _ in records(tmp_path / "*.jsonl")] == ["a", "b"]


def test_columns_rename_and_max_samples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": f"q{i}", "a": f"a{i}", "keep": i} for i in range(5)])
    got = records(path, columns={"prompt": "q", "response": "a"}, max_samples=2)
    assert [r for _, r, _ in got] == [{"keep": 0, "prompt": "q0", "response": "a0"},
                                      {"keep": 1, "prompt": "q1", "response": "a1"}]
    swapped = records(path, columns={"q": "a", "a": "q"}, max_samples=1)[0][1]
    assert (swapped["q"], swapped["a"]) == ("a0", "q0")


def test_relative_path_resolves_against_base_dir(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "t.jsonl", [{"text": "x"}])
    spec = DatasetSpec(path="data/t.jsonl")
    (got,) = iter_records(spec, base_dir=str(tmp_path))
    assert got[1] == {"text": "x"} and got[2] == str(tmp_path / "data")
    check_source(spec, base_dir=str(tmp_path))


def test_saved_dataset_and_dataset_dict(tmp_path):
    image = datasets.Image()
    ds = datasets.Dataset.from_dict({
        "text": ["one", "two"],
        "image": [{"bytes": png_bytes(), "path": None}, {"bytes": png_bytes((0, 0, 255)), "path": None}],
    }).cast_column("image", image)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(train=ds.select([0]), test=ds.select([1])).save_to_disk(str(tmp_path / "dict"))

    single = records(tmp_path / "single")
    assert [o for o, _, _ in single] == [f"{tmp_path}/single[train]:row 1", f"{tmp_path}/single[train]:row 2"]
    assert single[1][1]["image"]["bytes"] == png_bytes((0, 0, 255))  # undecoded: bytes, not PIL
    assert [r["text"] for _, r, _ in records(tmp_path / "dict")] == ["one"]  # default split: train
    assert [r["text"] for _, r, _ in records(tmp_path / "dict", split="test")] == ["two"]
    with pytest.raises(UserError, match="split 'dev' not found"):
        records(tmp_path / "dict", split="dev")
    check_source(DatasetSpec(path=str(tmp_path / "dict"), split="test"))


def test_hub_id_offline_is_a_user_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(datasets, "load_dataset_builder", offline)
    with pytest.raises(UserError, match="cannot load this dataset from the Hugging Face hub") as e:
        records("owner/name")
    assert e.value.where == "owner/name" and "download it" in e.value.fix
    with pytest.raises(UserError, match="hub"):
        check_source(DatasetSpec(path="owner/name"))


def test_hub_id_reads_rows(monkeypatch):
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"text": "hub row"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    got = records("owner/name", split="validation")
    assert calls == [("owner/name", "validation")]
    assert got[0][:2] == ("owner/name[validation]:row 1", {"text": "hub row"})


@pytest.mark.parametrize("name,content,what", [
    ("empty.jsonl", b"", "empty"),
    ("blank.jsonl", b"\n  \n", "only whitespace"),
    ("binary.jsonl", b'{"a": 1}\n\x00\x01\x02', "binary"),
    ("binary.csv", b"a,b\n\x00\x00", "binary"),
    ("header_only.csv", b"prompt,response\n", "no records"),
    ("fake.parquet", b"this is not parquet", "not a Parquet file"),
    ("data.txt", b"hello", "unsupported file type"),
    ("latin1.csv", "prompt\ncaf\xe9\n".encode("latin-1"), "not UTF-8"),
])
def test_unreadable_files_are_user_errors(tmp_path, name, content, what):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=what) as e:
        records(path)
    assert e.value.where == str(path)


@pytest.mark.parametrize("name,content,what", [
    ("empty.jsonl", b"", "empty"),
    ("binary.json", b"\x00\x01", "binary"),
    ("fake.parquet", b"PAR0", "not a Parquet file"),
])
def test_check_source_catches_unreadable_files(tmp_path, name, content, what):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=what):
        check_source(DatasetSpec(path=str(path)))


def test_check_source_empty_parquet(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(UserError, match="no rows"):
        check_source(DatasetSpec(path=str(tmp_path / "e.parquet")))


@pytest.mark.parametrize("path,what", [
    ("missing.jsonl", "no such file or folder"),
    ("nofolder/x.jsonl", "no such file or folder"),
    ("sub/train", "no such file or folder"),  # looks like a hub id, but sub/ is a local folder
    ("*.nothing", "matches this pattern"),
    (".", "holds no .jsonl"),
])
def test_missing_paths_are_user_errors(tmp_path, path, what):
    (tmp_path / "readme.md").write_text("no data here")
    (tmp_path / "sub").mkdir()
    spec = DatasetSpec(path=path)
    with pytest.raises(UserError, match=what):
        check_source(spec, base_dir=str(tmp_path))
    with pytest.raises(UserError, match=what):
        list(iter_records(spec, base_dir=str(tmp_path)))


# -- formats: good records --------------------------------------------------------------------

def parse(record, fmt, base_dir="/data"):
    return parse_record(record, fmt, "t.jsonl:1", base_dir)


def kinds(message):
    return [(p.type, p.text if p.type == "text" else (p.ref, p.ref_kind)) for p in message.parts]


def test_messages_all_part_spellings():
    b64 = base64.b64encode(b"img").decode()
    conv = parse({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "human", "content": [
            {"type": "image", "path": "a.png"},
            {"type": "image", "url": "https://x.org/b.jpg"},
            {"type": "image", "base64": b64},
            {"type": "image", "image": f"data:image/png;base64,{b64}"},
            {"type": "image_url", "image_url": {"url": "http://x.org/c.png"}},
            {"type": "audio", "audio": "file:///abs/d.wav"},
            {"type": "audio_url", "audio_url": {"url": "e.flac"}},
            {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
            {"type": "image", "image": {"bytes": b"raw", "path": None}},
            {"type": "text", "text": "what is this?"},
        ]},
        {"role": "model", "content": [{"type": "text", "text": "a cat"}]},
    ]}, "messages")
    assert conv.kind == "chat" and conv.origin == "t.jsonl:1" and conv.base_dir == "/data"
    assert [m.role for m in conv.messages] == ["system", "user", "assistant"]
    assert kinds(conv.messages[1]) == [
        ("image", ("a.png", "path")), ("image", ("https://x.org/b.jpg", "url")),
        ("image", (b64, "base64")), ("image", (b64, "base64")), ("image", ("http://x.org/c.png", "url")),
        ("audio", ("/abs/d.wav", "path")), ("audio", ("e.flac", "path")), ("audio", (b64, "base64")),
        ("image", (base64.b64encode(b"raw").decode(), "base64")), ("text", "what is this?"),
    ]
    assert conv.modality() == "mixed" and conv.messages[2].text() == "a cat"


def test_messages_trl_placeholders_take_the_images_column():
    conv = parse({"images": ["a.png", "b.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
        {"role": "assistant", "content": "two"}]}, "messages")
    assert kinds(conv.messages[0]) == [("image", ("a.png", "path")), ("text", "and"), ("image", ("b.png", "path"))]


def test_sharegpt_placeholders_split_text_in_order():
    conv = parse({
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "<image>\nCompare with <image> and hear <audio>"},
            {"from": "gpt", "value": "same"},
        ],
        "images": ["a.png", "https://x.org/b.png"], "audio": "c.wav",
    }, "sharegpt")
    assert kinds(conv.messages[1]) == [
        ("image", ("a.png", "path")), ("text", "Compare with "), ("image", ("https://x.org/b.png", "url")),
        ("text", " and hear "), ("audio", ("c.wav", "path"))]
    assert conv.messages[2].role == "assistant"


def test_text_format_is_one_user_message_of_kind_text():
    conv = parse({"text": "Once upon a time"}, "text")
    assert conv.kind == "text" and len(conv.messages) == 1
    assert conv.messages[0].role == "user" and conv.messages[0].text() == "Once upon a time"


def test_instruction_media_before_prompt_and_alpaca_spelling():
    conv = parse({"system": "sys", "prompt": "describe", "response": "a dog",
                  "images": ["a.png", "b.png"], "audio": "c.wav"}, "instruction")
    assert [m.role for m in conv.messages] == ["system", "user", "assistant"]
    assert kinds(conv.messages[1]) == [("image", ("a.png", "path")), ("image", ("b.png", "path")),
                                       ("audio", ("c.wav", "path")), ("text", "describe")]
    alpaca = parse({"instruction": "translate", "input": "bonjour", "output": "hello"}, "instruction")
    assert alpaca.messages[0].text() == "translate\n\nbonjour" and alpaca.messages[1].text() == "hello"
    trl = parse({"prompt": "2+2", "completion": "4", "image": None}, "instruction")
    assert [m.text() for m in trl.messages] == ["2+2", "4"]


# -- tool use and reasoning (OpenAI / Hugging Face / TRL layouts) --------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"name": "get_time", "description": "Time of a city", "parameters": {"type": "object"}}  # HF's bare form


def call(name="get_weather", args='{"city": "Paris"}', id_="c1"):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": args}}


def tool_record(*turns, tools=(WEATHER, TIME)):
    return {"tools": list(tools), "messages": [{"role": "user", "content": "Weather in Paris and Rome?"}, *turns]}


def test_tool_calls_responses_and_declarations():
    conv = parse(tool_record(
        {"role": "assistant", "content": None, "tool_calls": [
            call(), {"function": {"name": "get_time", "arguments": {"city": "Rome"}}}]},  # HF: no id, dict args
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "name": "get_time", "content": {"hour": 9}},  # structured: kept as its JSON text
        {"role": "assistant", "content": "Sunny in Paris; 9 in Rome."}), "messages")
    assert [t["function"]["name"] for t in conv.tools] == ["get_weather", "get_time"]
    assert all(t["type"] == "function" for t in conv.tools)
    calls = conv.messages[1].tool_calls
    assert [(c.name, c.arguments, c.id) for c in calls] == [("get_weather", {"city": "Paris"}, "c1"),
                                                             ("get_time", {"city": "Rome"}, None)]
    assert conv.messages[1].parts == [] and conv.messages[1].role == "assistant"
    assert [(m.role, m.tool_call_id, m.name, m.text()) for m in conv.messages[2:4]] == [
        ("tool", "c1", None, "sunny"), ("tool", None, "get_time", '{"hour": 9}')]
    as_text = parse({**tool_record({"role": "assistant", "tool_calls": [call()]}),
                     "tools": json.dumps([WEATHER])}, "messages")  # a call may end the sample
    assert [t["function"]["name"] for t in as_text.tools] == ["get_weather"]


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_trace_on_assistant_turns(key):
    conv = parse({"messages": [{"role": "user", "content": "2+2?"},
                               {"role": "assistant", key: " add them ", "content": "4"}]}, "messages")
    assert conv.messages[1].thinking == "add them" and conv.messages[1].text() == "4"


BAD_TOOLS = [
    (tool_record({"role": "assistant", "tool_calls": [call()]}, {"role": "assistant", "content": "x"}),
     "unanswered_call", "no tool message answers the call to 'get_weather' before message 2"),
    (tool_record({"role": "assistant", "tool_calls": [call(), call("get_time", id_="c2")]},
                 {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "assistant", "content": "x"}),
     "unanswered_call", "no tool message answers the call to 'get_time' before message 3"),
    (tool_record({"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "assistant", "content": "x"}),
     "orphan_response", "message 1 answers tool call 'c1', which no earlier assistant turn left unanswered"),
    (tool_record({"role": "assistant", "tool_calls": [call()]}, {"role": "tool", "tool_call_id": "c9", "content": "?"},
                 {"role": "assistant", "content": "x"}),
     "orphan_response", "message 2 answers tool call 'c9', which no earlier assistant turn left unanswered"),
    (tool_record({"role": "assistant", "tool_calls": [call()]}, {"role": "tool", "tool_call_id": "c1", "content": "a"},
                 {"role": "tool", "name": "get_weather", "content": "b"}, {"role": "assistant", "content": "x"}),
     "orphan_response", "message 3 answers a call to 'get_weather', which no earlier assistant turn left unanswered"),
    (tool_record({"role": "assistant", "tool_calls": [call(args="{city: Paris")]}),
     "bad_arguments", "message 1 calls 'get_weather' with arguments that are not JSON: '{city: Paris'"),
    (tool_record({"role": "assistant", "tool_calls": [call(args="[1, 2]")]}),
     "bad_arguments", "message 1 calls 'get_weather' with arguments that are a list, not a JSON object"),
    (tool_record({"role": "assistant", "tool_calls": [call("book_flight")]}),
     "undeclared_tool", "message 1 calls 'book_flight', but the record's tools do not declare it"),
    (tool_record({"role": "assistant", "tool_calls": [call()]}, tools=()),
     "undeclared_tool", "message 1 calls 'get_weather', but the record declares no tools"),
    (tool_record({"role": "tool", "content": "x"}, {"role": "assistant", "content": "x"}),
     "wrong_shape", "message 1 (tool) has neither tool_call_id nor name"),
    (tool_record({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}),
     "wrong_shape", "message 1 has a tool call without a function name"),
    (tool_record({"role": "assistant", "content": "x"}, tools=({"description": "no name"},)),
     "wrong_shape", "tools[0] is not a function declaration with a name"),
    ({"tools": "[oops", **CHAT}, "wrong_shape", "'tools' is text that is not JSON"),
    (tool_record({"role": "user", "content": "x", "tool_calls": [call()]}, {"role": "assistant", "content": "x"}),
     "wrong_shape", "message 1 has tool_calls but role 'user'; only the assistant calls tools"),
]


@pytest.mark.parametrize("record,reason,detail", BAD_TOOLS, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(BAD_TOOLS)])
def test_bad_tool_records_are_rejected_with_reason_and_detail(tmp_path, record, reason, detail):
    path = write_jsonl(tmp_path / "tools.jsonl", [CHAT, record])
    good, bad = iter_conversations(DatasetSpec(path=str(path), format="messages"))
    assert isinstance(good, Conversation) and isinstance(bad, BadRecord)
    assert (bad.reason, bad.detail, bad.origin, bad.raw) == (reason, detail, f"{path}:2", record)
    assert reason in REASONS


def test_bad_tool_record_under_on_bad_record_error_names_record_and_file(tmp_path, make_recipe, processor):
    """`on_bad_record: error` stops at the record with its file and line; `skip` counts it."""
    from data_tools.render_pool import collect
    from finetune.model.families import GEMMA4_UNIFIED

    record, reason, detail = BAD_TOOLS[7]
    path = write_jsonl(tmp_path / "tools.jsonl", [CHAT, record])
    recipe = make_recipe([{"path": str(path)}], data={"on_bad_record": "error"})
    with pytest.raises(UserError) as e:
        collect(recipe.datasets, processor, recipe.data, GEMMA4_UNIFIED.chat, rejects_path=None, progress=False)
    assert f"{path}:2" in e.value.line() and detail in e.value.line()
    skip = make_recipe([{"path": str(path)}], data={"on_bad_record": "skip"})
    samples, _, total, _ = collect(skip.datasets, processor, skip.data, GEMMA4_UNIFIED.chat, rejects_path=None,
                                progress=False)
    assert len(samples) == 1 and total.rejected_by_reason == {reason: 1}


# -- formats: every bad-record reason, read from a file so the origin is checked -----------------

GOOD = {
    "messages": CHAT,
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "text": {"text": "filler"},
    "instruction": {"prompt": "q", "response": "a"},
}
BAD = [
    ("messages", {"messages": "hi"}, "wrong_shape"),
    ("messages", {"chat": []}, "wrong_shape"),
    ("messages", {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "wrong_shape"),
    ("messages", {"messages": ["hi", {"role": "assistant", "content": "a"}]}, "wrong_shape"),
    ("messages", {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]}, "wrong_shape"),
    ("messages", {"messages": [{"role": "user", "content": [3]}, {"role": "assistant", "content": "a"}]}, "wrong_shape"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "image", "path": 7}]},
                               {"role": "assistant", "content": "a"}]}, "wrong_shape"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "image", "url": "data:text/plain,hi"}]},
                               {"role": "assistant", "content": "a"}]}, "wrong_shape"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "video", "path": "v.mp4"}]},
                               {"role": "assistant", "content": "a"}]}, "unknown_part"),
    ("messages", {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}, "no_user_turn"),
    ("messages", {"messages": []}, "no_user_turn"),
    ("messages", {"messages": [{"role": "user", "content": "q"}]}, "no_answer"),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}, "no_answer"),
    ("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, "no_answer"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "image"}]},
                               {"role": "assistant", "content": "a"}]}, "placeholder_mismatch"),
    ("messages", {"images": ["a.png"], **CHAT}, "placeholder_mismatch"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "a"}]},
     "placeholder_mismatch"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}], "images": "x.png"},
     "placeholder_mismatch"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "<audio>"}, {"from": "gpt", "value": "a"}],
                  "audios": ["x.wav", "y.wav"]}, "placeholder_mismatch"),
    ("sharegpt", {"conversations": [{"from": "alien", "value": "hi"}, {"from": "gpt", "value": "a"}]}, "wrong_shape"),
    ("sharegpt", {"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "a"}]}, "wrong_shape"),
    ("sharegpt", {"conversations": [{"from": "gpt", "value": "a"}]}, "no_user_turn"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}, "no_answer"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}],
                  "images": 3}, "wrong_shape"),
    ("text", {"text": "   "}, "no_answer"),
    ("text", {"text": ["a"]}, "wrong_shape"),
    ("text", {"body": "x"}, "wrong_shape"),
    ("instruction", {"question": "q", "answer": "a"}, "wrong_shape"),
    ("instruction", {"prompt": 5, "response": "a"}, "wrong_shape"),
    ("instruction", {"prompt": "", "response": "a"}, "no_user_turn"),
    ("instruction", {"prompt": "q"}, "no_answer"),
    ("instruction", {"prompt": "q", "response": ""}, "no_answer"),
    ("instruction", {"prompt": "q", "response": "a", "image": ""}, "wrong_shape"),
]


@pytest.mark.parametrize("fmt,record,reason", BAD, ids=[f"{f}-{r}-{i}" for i, (f, _, r) in enumerate(BAD)])
def test_bad_records_carry_reason_and_origin(tmp_path, fmt, record, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[fmt], record])
    good, bad = iter_conversations(DatasetSpec(path=str(path), format=fmt))
    assert isinstance(good, Conversation) and good.dataset == str(path)
    assert isinstance(bad, BadRecord), bad
    assert bad.reason == reason and bad.reason in REASONS
    assert bad.origin == f"{path}:2" and bad.raw == record


def test_unparseable_line_passes_through_iter_conversations(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ["{oops", CHAT])
    bad, good = iter_conversations(DatasetSpec(path=str(path)))
    assert bad.reason == "unparseable" and bad.origin == f"{path}:1"
    assert isinstance(good, Conversation) and good.origin == f"{path}:2"
    assert good.base_dir == str(tmp_path) and good.raw == CHAT


# -- property: parse_record returns a Conversation or raises BadRecord, never anything else ------

_WORDS = ["messages", "conversations", "role", "content", "type", "text", "image", "audio", "images",
          "audios", "path", "url", "base64", "image_url", "input_audio", "audio_url", "data", "bytes",
          "from", "value", "user", "assistant", "system", "human", "gpt", "prompt", "response",
          "instruction", "input", "output", "completion", "<image>", "<audio>", "data:x;base64,AA",
          "http://h/x", "", "tools", "tool_calls", "tool_call_id", "name", "function", "arguments",
          "reasoning_content", "thinking", "tool", '{"a": 1}']
_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.binary(max_size=4)
    | st.sampled_from(_WORDS) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_WORDS), inner, max_size=4),
    max_leaves=12,
)


def _or_junk(strategy):
    """Mostly well-formed values, sometimes anything: reaches deep code and every type check."""
    return st.integers(0, 9).flatmap(lambda n: _junk if n == 5 else strategy)  # not 0: hypothesis favours bounds


_text = st.lists(st.sampled_from(["a", "a", " ", "\n", "<image>", "<audio>"]), min_size=1, max_size=5).map("".join)
_ref = _or_junk(st.sampled_from(["a.png", "http://h/x.wav", "data:i;base64,AA==", "data:i,x"])
                | st.fixed_dictionaries({"bytes": st.binary(max_size=3), "path": st.none() | st.just("p.png")}))
_media_col = _or_junk(st.none() | _ref | st.lists(_ref, max_size=3))
_part = _or_junk(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "audio", "image_url", "audio_url", "input_audio", "video"])},
    optional={"text": _or_junk(_text), "path": _ref, "url": _ref, "base64": _ref, "image": _ref, "audio": _ref,
              "image_url": _or_junk(st.fixed_dictionaries({"url": _ref})),
              "input_audio": _or_junk(st.fixed_dictionaries({"data": _ref}))}))
_roles = st.sampled_from(["system", "user", "assistant", "human", "gpt", "model", "tool"])


def _chat(role_key, content_key, content):
    """Turn lists: mostly user/assistant pairs (so some records are valid), sometimes anything."""
    def turn(roles):
        return _or_junk(st.fixed_dictionaries({role_key: _or_junk(roles), content_key: _or_junk(content)}))
    pairs = st.lists(st.tuples(turn(st.sampled_from(["user", "human"])),
                               turn(st.sampled_from(["assistant", "gpt", "model"]))), min_size=1, max_size=2)
    return _or_junk(pairs.map(lambda ps: [t for p in ps for t in p]) | st.lists(turn(_roles), max_size=3))


_RECORDS = {
    "messages": st.fixed_dictionaries({"messages": _chat("role", "content", _text | st.lists(_part, max_size=3))},
                                      optional={"images": _media_col, "audios": _media_col, "tools": _junk}),
    "sharegpt": st.fixed_dictionaries({"conversations": _chat("from", "value", _text)},
                                      optional={"images": _media_col, "image": _media_col, "audios": _media_col}),
    "text": st.fixed_dictionaries({}, optional={"text": _or_junk(_text)}),
    "instruction": st.fixed_dictionaries({}, optional={
        k: _or_junk(_text) for k in ("prompt", "instruction", "input", "response", "output", "system")
    } | {"images": _media_col, "audio": _media_col}),
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), fmt=st.sampled_from(sorted(_RECORDS)))
def test_parse_record_only_ever_raises_bad_record(data, fmt):
    record = data.draw(_or_junk(_RECORDS[fmt]))
    try:
        conv = parse_record(record, fmt, "p.jsonl:1", os.sep)
    except BadRecord as bad:
        assert bad.reason in REASONS and bad.origin == "p.jsonl:1"
    else:
        assert isinstance(conv, Conversation) and conv.messages
        assert all(p.ref and p.ref_kind in ("path", "url", "base64") for p in conv.media())


def test_bad_record_survives_pickling():
    """Worker processes (datasets.map num_proc, DataLoader) send rejects back pickled."""
    bad = pickle.loads(pickle.dumps(BadRecord("no_answer", "empty", "t.jsonl:3", raw={"text": ""})))
    assert (bad.reason, bad.detail, bad.origin, bad.raw, str(bad)) == (
        "no_answer", "empty", "t.jsonl:3", {"text": ""}, "t.jsonl:3: empty")


def test_prompt_layout_keeps_its_columns_for_the_rewards():
    """TRL's prompt-only layout: text or messages, media columns, a `solution` as the reference;
    every other column travels as JSON."""
    from data_tools.formats import prompt_columns

    rec = {"prompt": "Which colour?", "images": ["a.png"], "solution": "red", "difficulty": 3, "tags": ["x"]}
    conv = parse_record(rec, "prompt", "f.jsonl:1", "/data")
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert [p.type for p in conv.messages[0].parts] == ["image", "text"]
    assert conv.messages[-1].text() == "red"
    assert json.loads(prompt_columns(rec)) == {"solution": "red", "difficulty": 3, "tags": ["x"]}
    chat = {"prompt": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "High or low?"}]}],
            "audios": ["t.wav"], "level": "easy"}
    conv = parse_record(chat, "prompt", "f.jsonl:2", "/data")
    assert [m.role for m in conv.messages] == ["system", "user", "assistant"]
    assert conv.messages[-1].parts == []  # no reference: only the answer turn's end is labelled
    assert json.loads(prompt_columns(chat)) == {"level": "easy"}
    for bad, reason in (({"question": "x"}, "wrong_shape"),
                        ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                         "wrong_shape"),
                        ({"prompt": [{"role": "system", "content": "a"}]}, "no_user_turn")):
        with pytest.raises(BadRecord) as e:
            parse_record(bad, "prompt", "f.jsonl:3", "/data")
        assert e.value.reason == reason
