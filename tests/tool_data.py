"""A small tool-use dataset for the tiny base: two functions (weather, time of a city), twelve
made-up cities, six phrasings per function, three phrasings asking for both (two parallel calls),
and two greetings answered without a tool.

The tiny base starts from random weights, so the answer has to be learned as copying: the city
from the question, the sky and the hour from the tool's responses. Every flow draws its result at
random (seeded), so no (city, phrasing) has a result to memorise. Made to be copied by that model:
each city is cut into the same tokens by the tiny tokenizer wherever it stands (question, call,
answer; "Porta." would be one token there and "Porta" another), and an hour is one digit, 1-8,
the only digit in the response other than the zeros of ":00" (" 9" is two tokens). Held out: per
(function, city) one phrasing no training flow of that city uses, with a result that city's
training flows don't show where one is left. Written by the tests and the `templates` tier;
nothing here is shipped.
"""

from __future__ import annotations

import json
import random

CITIES = ["Sorit", "Halor", "Mital", "Rinan", "Telar", "Gamet", "Kado", "Woran", "Kime", "Golo", "Mipar", "Vinan"]
SKY = ["sunny", "rainy", "cloudy", "snowy", "windy"]
HOURS = 9  # hours 0-8; the data draws 1-8
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


def sky_and_time(k: int) -> tuple[str, str]:
    """Result number k → (sky, time); k = 0 is the first sky at 0:00."""
    return SKY[k % len(SKY)], f"{(k // len(SKY)) % HOURS}:00"


# The results the data draws from: every (sky, hour) pair once, hour 0 left out.
DRAWN = range(len(SKY), len(SKY) * HOURS)


def flow(tool: str, city: str, question: str, k: int) -> dict:
    """user → assistant call (OpenAI layout, JSON-text arguments) → tool → final answer."""
    sky, time = sky_and_time(k)
    result = sky if tool == "get_weather" else time
    answer = f"It is {result} in {city}." if tool == "get_weather" else f"It is {result} in {city} now."
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": tool, "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": result},
        {"role": "assistant", "content": answer}]}


def parallel_flow(city: str, question: str, k: int) -> dict:
    """user → two calls at once → both responses → one answer with both results."""
    sky, time = sky_and_time(k)
    calls = [{"id": f"call_{j}", "type": "function", "function": {"name": name, "arguments": json.dumps({"city": city})}}
             for j, name in enumerate(("get_weather", "get_time"))]
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": question}, {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_0", "content": sky},
        {"role": "tool", "tool_call_id": "call_1", "content": time},
        {"role": "assistant", "content": f"It is {time} and {sky} in {city}."}]}


def _make(tool: str | None, city: str, question: str, k: int) -> dict:
    """A flow of `tool`, or a parallel flow (tool None)."""
    return parallel_flow(city, question, k) if tool is None else flow(tool, city, question, k)


def _result(tool: str | None, k: int) -> str:
    sky, time = sky_and_time(k)
    return sky if tool == "get_weather" else time if tool == "get_time" else sky + time


def tool_use_data(seed: int = 0, flows_per_pair: int = 8, parallel_per_city: int = 8, held_single: int = 12,
                  held_parallel: int = 12) -> tuple[list[dict], list[dict]]:
    """(train records, held-out flows). Per (function, city): one phrasing held out, one trained
    as a record that ends in the call (the call trained right after the served prompt), and
    `flows_per_pair` whole flows (call, response, answer) over the other phrasings, each with its
    own random result; per city `parallel_per_city` parallel flows. The first `held_single`
    cities give a held-out flow per function, the last `held_parallel` a parallel one."""
    rng = random.Random(seed)
    train, held = [], []
    for c, city in enumerate(CITIES):
        for tool, questions in list(ASK.items()) + [(None, BOTH)]:
            order = rng.sample(range(len(questions)), len(questions))
            if tool is not None:
                record = _make(tool, city, questions[order[1]].format(c=city), rng.choice(DRAWN))
                train.append({"tools": TOOLS, "messages": record["messages"][:2]})
            trained = order[1:] if tool is None else order[2:]
            n = parallel_per_city if tool is None else flows_per_pair
            ks = rng.sample(DRAWN, n)
            for i, k in enumerate(ks):
                train.append(_make(tool, city, questions[trained[i % len(trained)]].format(c=city), k))
            if c < held_single if tool is not None else c >= len(CITIES) - held_parallel:
                seen = {_result(tool, k) for k in ks}
                k = next((k for k in rng.sample(DRAWN, len(DRAWN)) if _result(tool, k) not in seen),
                         rng.choice(DRAWN))  # a result unseen with this city, where one is left
                held.append(_make(tool, city, questions[order[0]].format(c=city), k))
    for question, answer in GREETINGS:
        train += [{"tools": TOOLS, "messages": [{"role": "user", "content": question},
                                                {"role": "assistant", "content": answer}]}] * 4
    return train, held


def expected_call(record: dict) -> list[dict]:
    """The held-out flow's calls as `finetune.model.generate.read_calls` returns them."""
    return [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
            for c in record["messages"][1]["tool_calls"]]
