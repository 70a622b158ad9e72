"""fastlfm train: assistant-only labels, packed training without cross-sample leaks, the
training loop, checkpoints and resume. Oracles: transformers' Lfm2ForCausalLM (losses,
gradients, logits), labels built by hand from the special-token ids, and properties."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

from fastlfm import Lfm2ForCausalLM
from fastlfm.data import IGNORE_INDEX, DataError, Example, load_examples, pack_examples, tokenize_conversation
from fastlfm.models.lfm2 import PackedContext
from fastlfm.testing import tiny_config, write_checkpoint
from fastlfm.testing.tokenizer_files import SPECIAL_TOKEN_IDS
from fastlfm.tokenizer import Tokenizer
from fastlfm.train import main, warmup_cosine

IM_START, IM_END = SPECIAL_TOKEN_IDS["<|im_start|>"], SPECIAL_TOKEN_IDS["<|im_end|>"]

TOOLS = [{"name": "get_weather", "description": "Current weather",
          "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 37 + 48?"},
    {"role": "assistant", "content": "85"},
    {"role": "user", "content": "And the weather in Paris?"},
    {"role": "assistant", "content": '<|tool_call_start|>[get_weather(location="Paris")]<|tool_call_end|>'},
    {"role": "tool", "content": '{"temperature": 18}'},
    {"role": "assistant", "content": "It is 18 degrees in Paris.\nAnything else?"},
]


def chat_data(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in torch.randint(0, 30, (2,), generator=g))
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("train-ckpt"), tiny_config("LFM2-350M"))


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return Tokenizer.from_pretrained(ckpt)


# ----------------------------------------------------------------------------- labels
def hand_built_labels(ids: list[int], tokenizer) -> list[int]:
    """Labels from the token ids alone: inside `<|im_start|>assistant\\n` ... `<|im_end|>`
    (end token included) a token is its own label; everywhere else -100."""
    header = tokenizer.encode("assistant\n", add_special_tokens=False)
    labels, inside, i = [], False, 0
    while i < len(ids):
        if not inside and ids[i] == IM_START and ids[i + 1:i + 1 + len(header)] == header:
            labels += [IGNORE_INDEX] * (1 + len(header))
            inside, i = True, i + 1 + len(header)
            continue
        labels.append(ids[i] if inside else IGNORE_INDEX)
        if inside and ids[i] == IM_END:
            inside = False
        i += 1
    return labels


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_assistant_only_labels_match_hand_built_expectation(tokenizer, tools):
    ex = tokenize_conversation(tokenizer, CONVERSATION, tools)
    # The ids are exactly the tokenised chat template (pieces tokenised separately change nothing here).
    assert ex.input_ids == tokenizer.apply_chat_template(CONVERSATION, tools=tools)
    assert ex.labels == hand_built_labels(ex.input_ids, tokenizer)
    # Three assistant turns, each ending in a labelled <|im_end|>; system/user/tool turns carry none.
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    assert labelled.count(IM_END) == 3
    assert tokenizer.decode(labelled) == (
        "85<|im_end|>" '<|tool_call_start|>[get_weather(location="Paris")]<|tool_call_end|><|im_end|>'
        "It is 18 degrees in Paris.\nAnything else?<|im_end|>")


def test_conversations_without_assistant_turn_are_skipped_and_bad_lines_named(tokenizer, tmp_path):
    rows = chat_data(3) + [{"messages": [{"role": "user", "content": "hello"}]}]
    examples, stats = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
    assert len(examples) == 3 and stats["no_assistant"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_examples(bad, tokenizer)
    bad.write_text(json.dumps({"messages": [{"role": "narrator", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: messages\[0\] has role 'narrator'"):
        load_examples(bad, tokenizer)


# ----------------------------------------------------------------------------- packing
def random_examples(n_examples=3, vocab=1024, seed=0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in [7, 12, 9, 5][:n_examples]:
        ids = torch.randint(0, vocab, (n,), generator=g)
        keep = torch.rand(n, generator=g) < 0.6
        keep[-1] = True
        out.append(Example(ids.tolist(), torch.where(keep, ids, IGNORE_INDEX).tolist()))
    return out


def summed_loss_hf(ref, ex: Example) -> torch.Tensor:
    """Hand-computed shifted cross-entropy sum of one sample on transformers' logits."""
    ids = torch.tensor([ex.input_ids])
    labels = torch.tensor(ex.labels[1:])
    logits = ref(ids).logits[0, :-1]
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_loss_and_gradients_equal_samples_one_by_one(ckpt):
    ours = Lfm2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).train()
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).train()
    examples = random_examples()

    # Oracle: transformers, one sample at a time, summed losses and summed gradients.
    expected = sum(summed_loss_hf(ref, ex) for ex in examples)
    expected.backward()
    expected_grads = grads(ref)

    batch = pack_examples(examples)
    assert batch.seq_lens == [7, 12, 9]
    assert batch.num_targets == sum(sum(t != IGNORE_INDEX for t in ex.labels[1:]) for ex in examples)
    loss = ours(input_ids=batch.input_ids[None], labels=batch.labels[None],
                context=PackedContext(batch.seq_lens), num_items_in_batch=1).loss
    loss.backward()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-4), (loss.item(), expected.item())
    got = grads(ours)
    assert set(got) == set(expected_grads)
    for name, g in expected_grads.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-5), name

    # fastlfm's own unpacked forward agrees too (one sample per call, plain batch context).
    ours.zero_grad()
    one_by_one = sum(ours(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]),
                          num_items_in_batch=1).loss for ex in examples)
    assert torch.allclose(one_by_one, expected, rtol=1e-5, atol=1e-4)

    # Control: the same row without the packed context lets later samples see earlier ones
    # (through attention and the conv), so the loss differs; the test above can fail.
    with torch.no_grad():
        leaky = ours(input_ids=batch.input_ids[None], labels=batch.labels[None], num_items_in_batch=1).loss
    assert abs(leaky.item() - expected.item()) > 1e-2


def test_packed_logits_do_not_depend_on_neighbours(ckpt):
    """Changing one packed sample leaves the other samples' logits exactly as they were."""
    model = Lfm2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    examples = random_examples()
    changed = list(examples)
    changed[1] = Example([(t + 1) % 1024 for t in examples[1].input_ids], examples[1].labels)
    outs = []
    for exs in (examples, changed):
        b = pack_examples(exs)
        with torch.no_grad():
            outs.append(model(input_ids=b.input_ids[None], context=PackedContext(b.seq_lens)).logits[0])
    a, b = outs
    assert torch.equal(a[:7], b[:7]) and torch.equal(a[19:], b[19:])
    assert not torch.allclose(a[7:19], b[7:19])


# ----------------------------------------------------------------------------- schedule
def test_warmup_cosine_schedule_by_hand():
    f = warmup_cosine(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert math.isclose(f(9), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(f(14), 0.1)


# ----------------------------------------------------------------------------- the loop
def dataset_loss_hf(folder, examples) -> float:
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        total = sum(summed_loss_hf(ref, ex).item() for ex in examples)
    return total / sum(ex.num_targets for ex in examples)


def train_args(ckpt, data, out, *extra):
    return ["--model", str(ckpt), "--data", str(data), "--output", str(out), "--lr", "3e-3",
            "--batch-tokens", "256", "--no-progress", "--log-every", "1", *extra]


def test_short_run_lowers_loss_and_checkpoint_reloads_everywhere(ckpt, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_data(48))
    out = tmp_path / "run"
    assert main(train_args(ckpt, data, out, "--max-steps", "12", "--warmup-steps", "2")) == 0

    examples, _ = load_examples(data, tokenizer)
    before, after = dataset_loss_hf(ckpt, examples), dataset_loss_hf(out, examples)
    assert after < 0.7 * before, (before, after)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13)) and all(r["tokens_per_s"] > 0 for r in log)

    ids = torch.tensor([examples[0].input_ids, examples[1].input_ids[: len(examples[0].input_ids)]])
    ours = Lfm2ForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max() <= 1e-5
    assert Tokenizer.from_pretrained(out).encode("What is 1 + 2?") == tokenizer.encode("What is 1 + 2?")


def test_resume_reproduces_the_uninterrupted_run(ckpt, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_data(32, seed=1))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--max-steps", "6", "--grad-accum", "2", "--batch-tokens", "128", "--weight-decay", "0.1"]
    assert main(train_args(ckpt, data, full, *common, "--save-every", "3")) == 0
    assert (full / "step-3" / "trainer_state.pt").is_file()
    assert main(train_args(ckpt, data, resumed, *common, "--resume", str(full / "step-3"))) == 0
    a = Lfm2ForCausalLM.from_pretrained(full, dtype=torch.float32).state_dict()
    b = Lfm2ForCausalLM.from_pretrained(resumed, dtype=torch.float32).state_dict()
    step3 = Lfm2ForCausalLM.from_pretrained(full / "step-3", dtype=torch.float32).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], step3[k]) for k in a)  # the resumed half did train
    # A resumed run with a different data plan is refused, naming the argument.
    assert main(train_args(ckpt, data, tmp_path / "x", "--max-steps", "7", "--resume", str(full / "step-3"))) == 2


def test_from_scratch_with_init_config_in_bf16(tokenizer, ckpt, tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config("LFM2-350M", num_hidden_layers=4, full_attn_idxs=[1, 3])))
    data = write_jsonl(tmp_path / "train.jsonl", chat_data(16))
    out = tmp_path / "scratch"
    # --init without a tokenizer next to the config: a clear error, not a stack trace.
    assert main(["--init", str(cfg), "--data", str(data), "--output", str(out)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["--init", str(cfg), "--tokenizer", str(ckpt), "--data", str(data), "--output", str(out),
                 "--max-steps", "3", "--lr", "1e-3", "--dtype", "bf16", "--no-progress"]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    model = Lfm2ForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 4
    assert model.config.layer_types == ["conv", "full_attention", "conv", "full_attention"]
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_vocabulary_mismatch_is_refused(tmp_path, capsys):
    small = write_checkpoint(tmp_path / "small", tiny_config("LFM2-350M", vocab_size=512), tokenizer=False)
    write_checkpoint(tmp_path / "tok", tiny_config("LFM2-350M"))
    data = write_jsonl(tmp_path / "train.jsonl", chat_data(4))
    assert main(["--model", str(small), "--tokenizer", str(tmp_path / "tok"), "--data", str(data),
                 "--output", str(tmp_path / "o")]) == 2
    assert "1024 tokens but the model's vocab_size is 512" in capsys.readouterr().err


# ----------------------------------------------------------------------------- LoRA
def test_lora_trains_adapters_only_and_saves_a_merged_checkpoint(ckpt, tokenizer, tmp_path):
    from fastlfm.lora import apply_lora, merged_state_dict

    # Merging is exact: a wrapped model with non-zero adapters computes what its merged weights do.
    model = Lfm2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    apply_lora(model, rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}
    plain = Lfm2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    plain.load_state_dict(merged_state_dict(model))
    ids = torch.randint(0, 1024, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids).logits - plain(ids).logits).abs().max() <= 1e-5

    data = write_jsonl(tmp_path / "train.jsonl", chat_data(48))
    out = tmp_path / "lora"
    lora_args = ["--lora-rank", "8", "--lr", "1e-2", "--max-steps", "12", "--warmup-steps", "2", "--save-every", "6"]
    assert main(train_args(ckpt, data, out, *lora_args)) == 0
    examples, _ = load_examples(data, tokenizer)
    # The frozen random embeddings and norms bound how sharp the fixture's logits can get, so
    # LoRA lowers its loss less than full fine-tuning does; it must still clearly lower it.
    assert dataset_loss_hf(out, examples) < 0.95 * dataset_loss_hf(ckpt, examples)
    base = Lfm2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).state_dict()
    tuned = Lfm2ForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert set(base) == set(tuned)
    # Only the adapted projections moved; embeddings and norms are the base model's.
    for key in base:
        moved = not torch.equal(base[key], tuned[key])
        assert moved == any(f".{t}.weight" in key for t in ("q_proj", "k_proj", "v_proj", "out_proj",
                                                              "in_proj", "w1", "w2", "w3")), key
    # Resuming a LoRA run from its adapters reproduces the uninterrupted run.
    resumed = tmp_path / "lora-resumed"
    assert main(train_args(ckpt, data, resumed, *lora_args, "--resume", str(out / "step-6"))) == 0
    again = Lfm2ForCausalLM.from_pretrained(resumed, dtype=torch.float32).state_dict()
    assert all(torch.allclose(tuned[k], again[k], atol=1e-6) for k in tuned)
