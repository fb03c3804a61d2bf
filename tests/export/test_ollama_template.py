"""The Modelfile's Go TEMPLATE renders what Google's Gemma 4 chat template renders (tier
`ollama_template`: needs `go` (Debian golang-go) and llama-cpp-python's source archive from
`bash scripts/setup_llamacpp.sh --source-only`).

tests/export/ollama_template/render.go executes the TEMPLATE with Go's text/template over data shaped
as Ollama's (its structs and `json` func mirrored from Ollama's source). For each conversation,
every prompt a server builds (before each assistant message, and at the end when the
conversation ends on a user or tool message) equals the official template's rendering with
`add_generation_prompt=True`, thinking off and on (thoughts on the call steps), minus the
leading bos; a conversation that ends
on an assistant message (Ollama's prefill) equals the official history rendering without its
closing `<turn|>\n`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from finetune.export.ollama import TEMPLATE_SAMPLE
from finetune.export.ollama_template import TEMPLATE
from tests.data_tools.test_official_templates import MAIN, WEATHER, official_template

pytestmark = pytest.mark.ollama_template

RENDER = Path(__file__).resolve().parent / "ollama_template"
BOS = "<bos>"

TIME = {"type": "function", "function": {"name": "get_time", "description": "Time of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# Every schema shape the template knows: enum, array items, nested object, number, boolean.
BOOK = {"type": "function", "function": {"name": "book", "description": "Book a table", "parameters": {
    "type": "object", "required": ["place", "guests"], "properties": {
        "place": {"type": "string", "enum": ["inside", "terrace"], "description": "Where"},
        "guests": {"type": "array", "items": {"type": "string"}, "description": "Names"},
        "when": {"type": "object", "description": "Date and hour", "required": ["day"], "properties": {
            "day": {"type": "string"}, "hour": {"type": "integer"}}},
        "budget": {"type": "number"}, "vegan": {"type": "boolean"}}}}}


def call(id_, name, **args):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": args}}


def tool(id_, content):
    return {"role": "tool", "tool_call_id": id_, "content": content}


def user(text):
    return {"role": "user", "content": text}


def answer(text=None, *calls, thought=None):
    return {"role": "assistant", "content": text, **({"tool_calls": list(calls)} if calls else {}),
            **({"reasoning_content": thought} if thought else {})}


SYSTEM = {"role": "system", "content": "Answer briefly."}
CONVERSATIONS = {
    "plain": ([], [user("Hi")]),
    "plain-multi-turn": ([], [SYSTEM, user("Capital of Norvia?"), answer("Halden"), user("And of Quentar?"),
                              answer("Mirovo")]),
    "system-tools-call-response-answer": ([WEATHER, TIME], [
        SYSTEM, user("Weather in Paris?"), answer(None, call("a", "get_weather", city="Paris")),
        tool("a", "sunny"), answer("It is sunny in Paris.")]),
    "parallel-calls": ([WEATHER, TIME], [
        user("Weather and time in Rome?"),
        answer(None, call("a", "get_weather", city="Rome", days=2), call("b", "get_time", city="Rome"),
               thought="Two tools at once."),
        tool("a", '{"sky": "rain"}'), tool("b", "14:00"), answer("Rain at 14:00 in Rome.")]),
    "multi-turn-earlier-call": ([WEATHER], [
        SYSTEM, user("Weather in Paris?"), answer(None, call("a", "get_weather", city="Paris"), thought="Paris."),
        tool("a", "sunny"), answer("Sunny.", thought="Sunny it is."), user("And in Oslo for 3 days?"),
        answer(None, call("b", "get_weather", city="Oslo", days=3), thought="Oslo, 3 days."),
        tool("b", "snowy"), answer("Snowy."), user("Thanks!")]),
    "rich-schema-and-arguments": ([BOOK], [
        user("Book the terrace for Ana and Bo on Friday at 8, 40 euros, vegan."),
        answer(None, call("c", "book", place="terrace", guests=["Ana", "Bo"], when={"day": "Friday", "hour": 20},
                          budget=40.5, vegan=True)),
        tool("c", "booked")]),
}


def official(messages, tools, generation, think=False):
    from transformers.utils.chat_template_utils import render_jinja_template

    text = render_jinja_template([messages], tools=tools or None, chat_template=official_template(MAIN).read_text(),
                                 add_generation_prompt=generation, bos_token=BOS, enable_thinking=think)[0][0]
    assert text.startswith(BOS)
    return text[len(BOS):]


def ollama_message(m):
    """An OpenAI-layout message as Ollama's /api/chat takes it (content a string, arguments a map)."""
    out = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c["id"], "function": {"name": c["function"]["name"],
                                                          "arguments": c["function"]["arguments"]}}
                             for c in m["tool_calls"]]
    if m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    if m.get("reasoning_content"):
        out["thinking"] = m["reasoning_content"]
    return out


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.skip("go is not installed (Debian: apt-get install golang-go)")
    binary = tmp_path_factory.mktemp("go") / "render"
    env = dict(os.environ)
    if not (env.get("HOME") or env.get("XDG_CACHE_HOME") or env.get("GOCACHE")):
        env["GOCACHE"] = str(tmp_path_factory.mktemp("gocache"))  # go refuses to build without one
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=RENDER, env=env, check=True)

    def run(messages, tools, think=False):
        data = {"template": TEMPLATE, "messages": [ollama_message(m) for m in messages], "tools": tools,
                "think": think}
        done = subprocess.run([str(binary)], input=json.dumps(data), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout
    return run


@pytest.mark.parametrize("think", [False, True], ids=["thinking-off", "thinking-on"])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_every_served_prompt_is_the_official_one(render, name, think):
    tools, messages = CONVERSATIONS[name]
    ends = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if messages[-1]["role"] != "assistant":
        ends.append(len(messages))
    for k in ends:
        assert render(messages[:k], tools, think) == official(messages[:k], tools, True, think), (name, k)


@pytest.mark.parametrize("name", [n for n, (_, m) in CONVERSATIONS.items() if m[-1]["role"] == "assistant"])
def test_a_last_assistant_message_is_an_open_prefill(render, name):
    tools, messages = CONVERSATIONS[name]
    history = official(messages, tools, False)
    assert history.endswith("<turn|>\n")
    assert render(messages, tools) == history[:-len("<turn|>\n")]


def test_the_sample_the_export_checks_against_the_base(render):
    assert render([user("Hi")], []) == TEMPLATE_SAMPLE == official([user("Hi")], [], True)


def test_call_syntax_spelled_out(render):
    """The rich case's call, written out: keys sorted, strings in <|"|>, numbers and booleans bare."""
    tools, messages = CONVERSATIONS["rich-schema-and-arguments"]
    assert ('<|tool_call>call:book{budget:40.5,guests:[<|"|>Ana<|"|>,<|"|>Bo<|"|>],place:<|"|>terrace<|"|>,'
            'vegan:true,when:{day:<|"|>Friday<|"|>,hour:20}}<tool_call|>'
            '<|tool_response>response:book{value:<|"|>booked<|"|>}<tool_response|>') in render(messages, tools)
