"""Tool use in records: declarations, calls and responses read and checked; the layout for
templates that do not read `tool` messages.

Record layouts (OpenAI chat completions, Hugging Face chat templates, TRL):
- `tools`: a list (or its JSON text) of `{"type": "function", "function": {"name", "description",
  "parameters"}}`, or the bare `{"name", "description", "parameters"}` Hugging Face also takes;
- an assistant message's `tool_calls`: `[{"id"?, "type": "function", "function": {"name",
  "arguments"}}]` (or bare `{"name", "arguments"}`), the arguments a JSON object or its text;
- `{"role": "tool", "tool_call_id" | "name", "content"}`: the answer to one call.

`check_tool_flow` rejects what a model can't learn from: a call no tool message answers before
the conversation moves on (a call that ends the conversation is the answer being trained), a
tool message that answers no call, a call to a function the record does not declare. Arguments
that are not a JSON object are rejected when the call is read.
"""

from __future__ import annotations

import json

from data_tools.conversation import BadRecord, Message, ToolCall


def parse_tools(value) -> list[dict]:
    """A record's `tools` → OpenAI function declarations (`[]` when absent)."""
    if value is None:
        return []
    if isinstance(value, str):  # datasets often keep the list as JSON text
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRecord("wrong_shape", "'tools' is text that is not JSON") from None
    if not isinstance(value, list):
        raise BadRecord("wrong_shape", f"'tools' is a {type(value).__name__}, not a list")
    out = []
    for k, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRecord("wrong_shape", f"tools[{k}] is not a function declaration with a name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadRecord("wrong_shape", f"tools[{k}] ({fn['name']}) has parameters that are not an object")
        out.append({"type": "function", "function": fn})
    return out


def parse_tool_calls(value, i: int) -> list[ToolCall]:
    """Message `i`'s `tool_calls` → `ToolCall`s with decoded arguments."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRecord("wrong_shape", f"message {i} tool_calls is a {type(value).__name__}, not a list")
    calls = []
    for call in value:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRecord("wrong_shape", f"message {i} has a tool call without a function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise BadRecord("bad_arguments", f"message {i} calls {fn['name']!r} with arguments that "
                                f"are not JSON: {args[:60]!r}") from None
        if not isinstance(args, dict):
            raise BadRecord("bad_arguments", f"message {i} calls {fn['name']!r} with arguments that are "
                            f"a {type(args).__name__}, not a JSON object")
        call_id = call.get("id")
        calls.append(ToolCall(fn["name"], args, str(call_id) if call_id is not None else None))
    return calls


def check_tool_flow(messages: list[Message], tools: list[dict]) -> None:
    """Every call is declared and answered, every tool message answers a call (see module doc)."""
    declared = {t["function"]["name"] for t in tools}
    pending: list[ToolCall] = []  # calls of the latest calling turn not answered yet
    for i, m in enumerate(messages):
        if m.role == "tool":
            match = _answered(pending, m)
            if match is None:
                what = (f"tool call {m.tool_call_id!r}" if m.tool_call_id is not None
                        else f"a call to {m.name!r}" if m.name else "a tool call")
                raise BadRecord("orphan_response", f"message {i} answers {what}, which no earlier "
                                "assistant turn left unanswered")
            pending.remove(match)
            continue
        if pending:
            raise BadRecord("unanswered_call", f"no tool message answers the call to {pending[0].name!r} "
                            f"before message {i}")
        for call in m.tool_calls:
            if call.name not in declared:
                where = "the record's tools do not declare it" if declared else "the record declares no tools"
                raise BadRecord("undeclared_tool", f"message {i} calls {call.name!r}, but {where}")
        pending = list(m.tool_calls)
    # Calls left open by the last message are the answer the sample trains; earlier ones are not.
    if pending and messages[-1].role == "tool":
        raise BadRecord("unanswered_call", f"no tool message answers the call to {pending[0].name!r}")


def _answered(pending: list[ToolCall], reply: Message) -> ToolCall | None:
    """The pending call a tool message answers: by id, else by name, else the next in order."""
    if reply.tool_call_id is not None:
        return next((c for c in pending if c.id == reply.tool_call_id), None)
    if reply.name:
        return next((c for c in pending if c.name == reply.name), None)
    return pending[0] if pending else None


def fold_tool_responses(messages: list[dict]) -> list[dict]:
    """OpenAI-layout chat messages → Gemma's native layout, as llama.cpp serves templates that
    do not read `tool` messages: a calling assistant turn, the tool messages after it and a
    plain answer right after them become ONE assistant message with `tool_calls`,
    `tool_responses` (`{"name", "response"}`, the content decoded when it is JSON) and the
    answer as `content`. The response's name is the call's at the same position."""
    out, i = [], 0
    while i < len(messages):
        m = messages[i]
        if m.get("role") != "assistant" or not m.get("tool_calls"):
            out.append(m)
            i += 1
            continue
        merged = {"role": "assistant", "tool_calls": m["tool_calls"]}
        if m.get("reasoning_content"):
            merged["reasoning_content"] = m["reasoning_content"]
        responses = []
        i += 1
        while i < len(messages) and messages[i].get("role") == "tool":
            reply = messages[i]
            k = len(responses)
            name = m["tool_calls"][k]["function"]["name"] if k < len(m["tool_calls"]) else ""
            responses.append({"name": name or reply.get("tool_call_id", ""),
                              "response": _decoded(reply.get("content"))})
            i += 1
        if responses:
            merged["tool_responses"] = responses
        if i < len(messages) and messages[i].get("role") == "assistant" and not messages[i].get("tool_calls") \
                and messages[i].get("content"):
            merged["content"] = messages[i]["content"]
            i += 1
        out.append(merged)
    return out


def _decoded(content):
    if isinstance(content, str):
        try:
            return json.loads(content)
        except ValueError:
            return content
    return content
