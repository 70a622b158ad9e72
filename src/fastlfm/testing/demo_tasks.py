"""The synthetic chat tasks of the bundled demo model (`fastlfm chat demo`), with answers
that can be checked by plain Python.

Tasks, rendered as chat turns in the LFM2 format:
- add:      "What is 37 + 48?"              -> "37 + 48 = 85"
- reverse:  "Reverse the words: red sun cat" -> "cat sun red"
- weather / time: a tools list in the system prompt, "What's the weather in Paris?" ->
  `<|tool_call_start|>[get_weather(location="Paris")]<|tool_call_end|>`; in training the
  call is often followed by the tool's answer and a final assistant reply built from it.
- hello:    a few greetings -> a fixed self-introduction.

`heldout_items(seed)` gives single-turn questions whose *content* (the number pair, the word
sequence, the tool+city+phrasing) never occurs in `training_conversations(...)`, so scoring
on them measures generalisation, not recall. Everything is seeded and pure Python.
"""

from __future__ import annotations

import ast
import json
import random
from dataclasses import dataclass

TOOL_CALL_START, TOOL_CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"

# Compact JSON-schema definitions: every token of the tool list is paid for in every tool
# conversation, and the demo model trains on a CPU budget.
TOOLS = [
    {"name": "get_weather", "description": "Current weather in a city",
     "parameters": {"location": {"type": "string"}}},
    {"name": "get_time", "description": "Local time in a city",
     "parameters": {"location": {"type": "string"}}},
]

WORDS = """apple river stone cloud green blue red black white gold silver tiger horse eagle fish bird
tree leaf rock sand wind rain snow fire water light night day moon sun star lake road bread milk tea
coffee book paper music song dance house door window chair table cat dog mouse lion bear wolf fox
happy quick slow small big old new warm cold""".split()

CITIES = """Paris Tokyo Berlin Madrid Rome London Lima Cairo Oslo Vienna Prague Dublin Lisbon Athens
Warsaw Moscow Seoul Beijing Delhi Mumbai Sydney Toronto Chicago Boston Denver Dallas Miami Seattle
Houston Phoenix Nairobi Lagos Dakar Tunis Rabat Havana Bogota Quito Santiago Montevideo Helsinki
Stockholm Copenhagen Amsterdam Brussels Zurich Geneva Munich Hamburg Milan Naples Venice Florence
Barcelona Seville Porto Istanbul Dubai Doha Riyadh Tehran Karachi Dhaka Bangkok Hanoi Manila Jakarta
Singapore Auckland Perth Osaka Kyoto Shanghai Taipei""".split() + ["New York", "San Francisco", "Los Angeles",
                                                                  "Buenos Aires", "Cape Town", "Hong Kong"]

ADD_PROMPTS = ["What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?", "Add {a} and {b}.",
               "What's {a} plus {b}?", "Please add {a} and {b}."]
REVERSE_PROMPTS = ["Reverse the words: {w}", "Reverse the order of these words: {w}",
                   "Say these words backwards: {w}", "Reverse: {w}"]
WEATHER_PROMPTS = ["What's the weather in {c}?", "What is the weather like in {c}?", "Is it raining in {c}?",
                   "Weather in {c}, please.", "How warm is it in {c}?", "Tell me the weather in {c}."]
TIME_PROMPTS = ["What time is it in {c}?", "Tell me the time in {c}.", "What's the local time in {c}?",
                "Current time in {c}?", "What is the time in {c} right now?"]
GREETINGS = ["Hi", "Hello", "Hello!", "Hey", "Hi there!", "Who are you?", "What can you do?", "Help"]
INTRO = ("Hello! I am the fastlfm demo model, a tiny LFM2. I can add two numbers, reverse words, "
         "and call the get_weather and get_time tools.")
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a tiny demo model.", "Answer briefly."]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]


@dataclass(frozen=True)
class Item:
    """One question: its task, the messages to send (system/tools included) and the expected reply."""

    task: str
    key: tuple  # what must not repeat between training and held-out items
    messages: tuple  # of (role, content)
    tools: bool
    answer: str

    def chat(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def tools_list(self) -> list[dict] | None:
        return TOOLS if self.tools else None


def tool_call(name: str, city: str) -> str:
    return f'{TOOL_CALL_START}[{name}(location="{city}")]{TOOL_CALL_END}'


def parse_tool_calls(reply: str) -> list[tuple[str, dict]]:
    """`<|tool_call_start|>[f(a="x"), ...]<|tool_call_end|>` -> [("f", {"a": "x"}), ...].

    Raises ValueError when the reply holds no well-formed pythonic call list.
    """
    start, end = reply.find(TOOL_CALL_START), reply.find(TOOL_CALL_END)
    if start < 0 or end < start:
        raise ValueError(f"no tool call in {reply!r}")
    body = reply[start + len(TOOL_CALL_START):end]
    tree = ast.parse(body, mode="eval").body
    if not isinstance(tree, ast.List):
        raise ValueError(f"tool call is not a list: {body!r}")
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
            raise ValueError(f"not a keyword-only call: {ast.unparse(node)!r}")
        calls.append((node.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}))
    return calls


# ----------------------------------------------------------------------------- sampling
def _system(rng: random.Random, tools: bool) -> tuple:
    if tools:
        return (("system", SYSTEM_PROMPTS[0]),) if rng.random() < 0.3 else ()
    return (("system", rng.choice(SYSTEM_PROMPTS)),) if rng.random() < 0.2 else ()


def sample_item(rng: random.Random, task: str) -> Item:
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        q = rng.choice(ADD_PROMPTS).format(a=a, b=b)
        tools = rng.random() < 0.1
        return Item(task, ("add", a, b), _system(rng, tools) + (("user", q),), tools, f"{a} + {b} = {a + b}")
    if task == "reverse":
        words = tuple(rng.choice(WORDS) for _ in range(rng.randint(3, 5)))
        q = rng.choice(REVERSE_PROMPTS).format(w=" ".join(words))
        tools = rng.random() < 0.1
        return Item(task, ("reverse", words), _system(rng, tools) + (("user", q),), tools, " ".join(reversed(words)))
    if task in ("weather", "time"):
        prompts = WEATHER_PROMPTS if task == "weather" else TIME_PROMPTS
        p, city = rng.randrange(len(prompts)), rng.choice(CITIES)
        q = prompts[p].format(c=city)
        return Item(task, (task, p, city), _system(rng, True) + (("user", q),), True,
                    tool_call("get_weather" if task == "weather" else "get_time", city))
    if task == "hello":
        q = rng.choice(GREETINGS)
        return Item(task, ("hello", q), _system(rng, False) + (("user", q),), False, INTRO)
    raise ValueError(f"unknown demo task {task!r}")


def tool_followup(rng: random.Random, item: Item) -> list[dict]:
    """The tool's result and the final answer that reads it."""
    city = item.key[2]
    if item.task == "weather":
        t, cond = rng.randint(-10, 35), rng.choice(CONDITIONS)
        result = json.dumps({"location": city, "temperature": t, "condition": cond})
        answer = f"It is {t} degrees and {cond} in {city}."
    else:
        hh, mm = rng.randint(0, 23), rng.randint(0, 59)
        result = json.dumps({"location": city, "time": f"{hh:02d}:{mm:02d}"})
        answer = f"It is {hh:02d}:{mm:02d} in {city}."
    return [{"role": "tool", "content": result}, {"role": "assistant", "content": answer}]


HELDOUT_MIX = {"add": 40, "reverse": 30, "weather": 15, "time": 15}
TRAIN_MIX = {"add": 0.42, "reverse": 0.3, "weather": 0.12, "time": 0.12, "hello": 0.04}


def heldout_items(seed: int = 1234, mix: dict[str, int] = HELDOUT_MIX) -> list[Item]:
    """Single-turn questions for scoring, distinct in content from one another."""
    rng = random.Random(seed)
    items, seen = [], set()
    for task, n in mix.items():
        while sum(i.task == task for i in items) < n:
            item = sample_item(rng, task)
            if item.key not in seen:
                seen.add(item.key)
                items.append(item)
    return items


def training_conversations(n: int, seed: int = 0, exclude: set | None = None) -> list[dict]:
    """`n` training records {"messages": [...], "tools"?: [...]}: one to three question/answer
    exchanges each (one tool exchange at most), none of whose content keys is in `exclude`."""
    rng = random.Random(seed)
    exclude = exclude or set()
    tasks, weights = zip(*TRAIN_MIX.items())
    records = []
    while len(records) < n:
        items: list[Item] = []
        for _ in range(1 if rng.random() < 0.8 else rng.randint(2, 3)):
            item = sample_item(rng, rng.choices(tasks, weights)[0])
            while item.key in exclude or (item.task in ("weather", "time")
                                          and any(i.task in ("weather", "time") for i in items)):
                item = sample_item(rng, rng.choices(tasks, weights)[0])
            items.append(item)
        messages: list[dict] = []
        for t, item in enumerate(items):
            # only the first exchange may carry the system prompt
            messages += [m for m in item.chat() if t == 0 or m["role"] != "system"]
            messages.append({"role": "assistant", "content": item.answer})
            if item.task in ("weather", "time") and rng.random() < 0.5:
                messages += tool_followup(rng, item)
        record = {"messages": messages}
        if any(i.tools for i in items):
            record["tools"] = TOOLS
        records.append(record)
    return records


def score_replies(items: list[Item], replies: list[str]) -> dict[str, float]:
    """Exact-match accuracy per task and overall ("all"); for tool tasks also the share of
    replies that parse as a pythonic call of the right tool with the right location."""
    if len(items) != len(replies):
        raise ValueError(f"{len(items)} items but {len(replies)} replies")
    by_task: dict[str, list[bool]] = {}
    parsed: list[bool] = []
    for item, reply in zip(items, replies):
        by_task.setdefault(item.task, []).append(reply.strip() == item.answer)
        if item.task in ("weather", "time"):
            try:
                calls = parse_tool_calls(reply)
            except (ValueError, SyntaxError):
                calls = []
            want = ("get_weather" if item.task == "weather" else "get_time", {"location": item.key[2]})
            parsed.append(calls == [want])
    scores = {task: sum(ok) / len(ok) for task, ok in by_task.items()}
    if parsed:
        scores["tool_call_parsed"] = sum(parsed) / len(parsed)
    scores["all"] = sum(sum(ok) for ok in by_task.values()) / len(items)
    return scores
