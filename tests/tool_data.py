"""A small tool-use dataset for the tiny base: two functions (weather, time of a city), eight
cities, six phrasings per function, three phrasings asking for both (two parallel calls), and
two greetings answered without a tool.

Each (function, city) pair holds out one phrasing (a different one per city), so a held-out
prompt is a city and a phrasing each seen in training, never together. A training pair comes
twice: as a record that ends in the call (the call trained right after the served prompt) and
as the whole flow (call, tool response, final answer). Written by the tests and the
`templates` tier; nothing here is shipped.
"""

from __future__ import annotations

import json

CITIES = ["Halden", "Mirovo", "Tessel", "Kaveny", "Porta", "Lindor", "Sorrin", "Ulmet"]
SKY = ["sunny", "rainy", "cloudy", "snowy", "windy"]
ASK = {
    "get_weather": ["What is the weather in {c}?", "Is it sunny in {c}?", "How is the weather in {c} now?",
                    "Weather in {c}?", "Tell me the weather in {c}.", "Is it rainy in {c} now?"],
    "get_time": ["What time is it in {c}?", "Tell me the time in {c}.", "What is the time in {c} now?",
                 "Time in {c}?", "What time is it now in {c}?", "Is it late in {c} now?"],
}
BOTH = ["What are the weather and the time in {c}?", "Weather and time in {c}?",
        "Tell me the weather and the time in {c}."]
GREETINGS = [("Hello!", "Hello! Ask me about the weather or the time."), ("Thanks, bye.", "Bye!")]
TOOLS = [{"type": "function", "function": {
    "name": name, "description": desc,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    for name, desc in (("get_weather", "Weather of a city"), ("get_time", "Time of a city"))]


def flow(tool: str, city: str, question: str, k: int) -> dict:
    """user → assistant call (OpenAI layout, JSON-text arguments) → tool → final answer."""
    result = SKY[k % len(SKY)] if tool == "get_weather" else f"{(k * 7) % 24}:00"
    answer = f"It is {result} in {city}." if tool == "get_weather" else f"It is {result} in {city} now."
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": tool, "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": result},
        {"role": "assistant", "content": answer}]}


def parallel_flow(city: str, question: str, k: int) -> dict:
    """user → two calls at once → both responses → one answer with both results."""
    sky, time = SKY[k % len(SKY)], f"{(k * 5) % 24}:00"
    calls = [{"id": f"call_{j}", "type": "function", "function": {"name": name, "arguments": json.dumps({"city": city})}}
             for j, name in enumerate(("get_weather", "get_time"))]
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": question}, {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_0", "content": sky},
        {"role": "tool", "tool_call_id": "call_1", "content": time},
        {"role": "assistant", "content": f"It is {sky} at {time} in {city}."}]}


def tool_use_data() -> tuple[list[dict], list[dict]]:
    """(train records, held-out flows): see the module doc."""
    train, held = [], []
    k = 0
    for t, (tool, questions) in enumerate(ASK.items()):
        for c, city in enumerate(CITIES):
            for q, question in enumerate(questions):
                record = flow(tool, city, question.format(c=city), k)
                k += 1
                if q == (c + t) % len(questions):
                    held.append(record)
                else:
                    train += [{"tools": TOOLS, "messages": record["messages"][:2]}, record]
    for c, city in enumerate(CITIES):
        for q, question in enumerate(BOTH):
            (held if q == c % len(BOTH) else train).append(parallel_flow(city, question.format(c=city), c + q))
    for question, answer in GREETINGS:
        train += [{"tools": TOOLS, "messages": [{"role": "user", "content": question},
                                                {"role": "assistant", "content": answer}]}] * 4
    return train, held


def expected_call(record: dict) -> list[dict]:
    """The held-out flow's calls as `finetune.model.generate.read_calls` returns them."""
    return [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
            for c in record["messages"][1]["tool_calls"]]
