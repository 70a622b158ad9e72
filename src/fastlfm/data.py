"""Chat data for supervised fine-tuning: JSONL conversations -> token ids, assistant-only
labels, and packed micro-batches.

Labels are found through the checkpoint's own chat template, not by pattern-matching its
output: for every assistant message we render the conversation *up to* that message with
the generation prompt (what the model sees at inference before it answers) and *through*
that message. The text between the two is the assistant's turn. Each piece of the full
rendering is tokenised separately, so the prompt part is tokenised exactly as it will be at
inference, and the turn's tokens up to and including its end-of-turn token (`<|im_end|>`)
carry their ids as labels; everything else carries -100.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .tokenizer import Tokenizer

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A training file or conversation that cannot be used."""


@dataclass
class Example:
    """One tokenised conversation: ids and labels of the same length (-100 = no loss)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


# ----------------------------------------------------------------------------- reading
def _check_conversation(record: Any, where: str) -> tuple[list[dict], list | None]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DataError(f"{where}: expected an object with a 'messages' list, got {type(record).__name__}"
                        + (f" with keys {sorted(record)}" if isinstance(record, dict) else ""))
    messages = record["messages"]
    if not messages:
        raise DataError(f"{where}: 'messages' is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if m.get("content") is None:
            raise DataError(f"{where}: messages[{i}] ({m['role']}) has no 'content'")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list of tool definitions, got {type(tools).__name__}")
    return messages, tools


def read_conversations(path: str | os.PathLike) -> list[tuple[list[dict], list | None]]:
    """(messages, tools) for every line of a JSONL file of {"messages": [...], "tools"?: [...]}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data {str(path)!r} is not a file")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            conversations.append(_check_conversation(record, where))
    if not conversations:
        raise DataError(f"{path}: no conversations (the file is empty)")
    return conversations


# ----------------------------------------------------------------------------- labels
def assistant_spans(tokenizer: Tokenizer, messages: Sequence[dict], tools: list | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn in it.

    A turn's span runs from the end of the generation prompt to the end of the turn as the
    template renders it (content, end-of-turn token and any glue the template adds after it).
    """
    def render(msgs, add_generation_prompt):
        return tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not (full.startswith(through) and through.startswith(prompt)):
            # e.g. a template that rewrites earlier turns (drops past reasoning): the prompt the
            # model would see is not a prefix of the training text, so there is no honest label.
            raise DataError(
                f"the chat template does not render assistant message {i} as a continuation of the "
                f"conversation before it; cannot locate the assistant tokens"
            )
        spans.append((len(prompt), len(through)))
    return full, spans


def tokenize_conversation(tokenizer: Tokenizer, messages: Sequence[dict], tools: list | None = None) -> Example:
    """Ids of the rendered conversation; labels = ids on assistant turns (through their
    end-of-turn token), -100 elsewhere."""
    text, spans = assistant_spans(tokenizer, messages, tools)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for start, end in spans:
        prompt_ids = tokenizer.encode(text[cursor:start], add_special_tokens=False)
        turn_ids = tokenizer.encode(text[start:end], add_special_tokens=False)
        # Train on the turn up to its end-of-turn token; what follows it (the template's "\n")
        # is glue the model never generates, since generation stops at the eos.
        n_train = len(turn_ids)
        if eos is not None and eos in turn_ids:
            n_train = len(turn_ids) - turn_ids[::-1].index(eos)
        ids += prompt_ids + turn_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + turn_ids[:n_train] + [IGNORE_INDEX] * (len(turn_ids) - n_train)
        cursor = end
    tail = tokenizer.encode(text[cursor:], add_special_tokens=False)
    ids += tail
    labels += [IGNORE_INDEX] * len(tail)
    return Example(ids, labels)


def load_examples(path: str | os.PathLike, tokenizer: Tokenizer, max_length: int | None = None,
                  vocab_size: int | None = None) -> tuple[list[Example], dict[str, int]]:
    """Tokenise a JSONL file. Returns the examples and counts of what was dropped or cut:
    conversations without an assistant turn are dropped, longer ones are truncated."""
    stats = {"conversations": 0, "no_assistant": 0, "truncated": 0}
    examples = []
    for n, (messages, tools) in enumerate(read_conversations(path)):
        stats["conversations"] += 1
        try:
            ex = tokenize_conversation(tokenizer, messages, tools)
        except Exception as e:  # template errors carry no location; add it
            raise DataError(f"{path}: conversation {n + 1}: {e}") from None
        if max_length is not None and len(ex.input_ids) > max_length:
            stats["truncated"] += 1
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
        if ex.num_targets <= 1:  # the first label is dropped when packing (see pack_examples)
            stats["no_assistant"] += 1
            continue
        if vocab_size is not None and max(ex.input_ids) >= vocab_size:
            raise DataError(f"{path}: conversation {n + 1} has token id {max(ex.input_ids)}, but the model's "
                            f"vocab_size is {vocab_size} (is the tokenizer the model's?)")
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no conversation has an assistant turn to train on")
    return examples, stats


# ----------------------------------------------------------------------------- packing
@dataclass
class PackedBatch:
    """Several examples back to back in one row, for `PackedContext(seq_lens)`."""

    input_ids: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)
    seq_lens: list[int]

    @property
    def num_targets(self) -> int:
        # The loss scores position t against labels[t + 1]: one prediction per non-ignored label.
        return int((self.labels != IGNORE_INDEX).sum())


def pack_examples(examples: Sequence[Example]) -> PackedBatch:
    """Concatenate examples into one row.

    The loss shifts labels inside the model (position t is scored against labels[t+1]), so in
    a packed row the last token of one sample would be trained to predict the first token of
    the next. Each sample's first label is therefore set to -100: nothing is predicted across
    a boundary, and the packed loss equals the sum of the per-sample losses.
    """
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ids += ex.input_ids
        labels += [IGNORE_INDEX] + ex.labels[1:]
    return PackedBatch(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                       [len(ex.input_ids) for ex in examples])


def plan_batches(lengths: Sequence[int], tokens_per_batch: int, seed: int) -> list[list[int]]:
    """Shuffle example indices (seeded) and group them greedily, in order, into micro-batches
    of at most `tokens_per_batch` tokens. Deterministic, so a resumed run sees the same batches."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        if n > tokens_per_batch:
            raise DataError(f"an example has {n} tokens, more than --batch-tokens {tokens_per_batch}; "
                            f"raise --batch-tokens or lower --max-length")
        if current and used + n > tokens_per_batch:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches

