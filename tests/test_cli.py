"""The `fastlfm` console script, run as a subprocess on a fixture checkpoint.

Expected text comes from transformers (AutoTokenizer chat template + greedy generate), not
from fastlfm, and the exit codes and one-line errors are checked for bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

SCRIPT = Path(sys.executable).with_name("fastlfm")


@pytest.fixture(scope="module")
def ckpt(wandering_ckpt):
    return wandering_ckpt


@pytest.fixture(scope="module")
def hf(ckpt):
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return tok, model


def run(*args, stdin=None, env=None):
    assert SCRIPT.is_file(), f"console script not installed at {SCRIPT}"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.run([str(SCRIPT), *map(str, args)], input=stdin, capture_output=True, text=True,
                          encoding="utf-8", env=full_env, timeout=300)


def hf_reply_ids(hf, ids, n):
    tok, model = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def hf_text(hf, new_ids):
    tok, _ = hf
    if new_ids and new_ids[-1] == tok.eos_token_id:
        new_ids = new_ids[:-1]
    return tok.decode(new_ids, skip_special_tokens=True)


def chat_ids(hf, messages):
    tok, _ = hf
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_generate_prints_the_greedy_reply(ckpt, hf):
    ids = chat_ids(hf, [{"role": "user", "content": "Tell me a story"}])
    expected = hf_text(hf, hf_reply_ids(hf, ids, 16))
    res = run("generate", ckpt, "Tell me a story", "--max-new-tokens", "16", "-q")
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"
    # --raw: no chat template; --stream prints the same text; a stop string cuts it
    raw_ids = hf[0]("Once upon", add_special_tokens=True)["input_ids"]
    raw_expected = hf_text(hf, hf_reply_ids(hf, raw_ids, 16))
    stop = next(raw_expected[i : i + 2] for i in range(4, len(raw_expected) - 2)
                if "\ufffd" not in raw_expected[i : i + 2])
    res = run("generate", ckpt, "Once upon", "--raw", "--stream", "--max-new-tokens", "16", "--stop", stop)
    assert res.returncode == 0, res.stderr
    assert res.stdout == raw_expected[: raw_expected.find(stop)] + "\n"
    assert "Loading" in res.stderr  # the progress bar (not --quiet)


def test_chat_streams_replies_keeps_history_and_resets(ckpt, hf):
    tok, _ = hf
    n = 10
    p1 = chat_ids(hf, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])
    g1 = hf_reply_ids(hf, p1, n)
    r1 = hf_text(hf, g1)
    # Turn 2 continues the token history: turn 1's prompt and reply tokens, then the new turn.
    assert g1[-1] != tok.eos_token_id  # (the fixture's reply runs to the token limit)
    reply_raw = tok.decode(g1, skip_special_tokens=False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": reply_raw}, {"role": "user", "content": "What next?"}]
    full = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    before = tok.decode(p1, skip_special_tokens=False) + reply_raw
    assert full.startswith(before)
    p2 = p1 + g1 + tok(full[len(before):], add_special_tokens=False)["input_ids"]
    r2 = hf_text(hf, hf_reply_ids(hf, p2, n))

    script = "Hi there\n/reset\n\nHi there\nWhat next?\n/exit\nnever sent\n"
    res = run("chat", ckpt, "--system", "Be brief.", "--max-new-tokens", n, "-q", stdin=script)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{r1}\n{r1}\n{r2}\n"
    assert "(conversation reset)" in res.stderr
    # end of input also ends the chat cleanly
    res = run("chat", ckpt, "--max-new-tokens", "4", "-q", stdin="Hello\n")
    assert res.returncode == 0 and res.stdout.count("\n") >= 1


@pytest.mark.parametrize("args,code,message", [
    (["generate", "{ckpt}", "hi", "--top-p", "1.5"], 2, "top_p=1.5"),
    (["generate", "{ckpt}", "hi", "--max-new-tokens", "ten"], 2, "--max-new-tokens: invalid int value"),
    (["generate", "{ckpt}", "hi", "--temperature", "-1"], 2, "temperature=-1.0"),
    (["generate", "{ckpt}", "hi", "--dtype", "int3"], 2, "unknown dtype 'int3'"),
    (["chat", "{ckpt}", "--device", "bogus"], 2, "invalid --device 'bogus'"),
    (["generate", "{ckpt}"], 2, "required: prompt"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["generate", "/nonexistent/model/folder", "hi"], 1, "is not a folder with a config.json"),
    (["generate", "nobody/no-such-model", "hi"], 1, "cannot resolve model 'nobody/no-such-model'"),
])
def test_errors_are_one_line_with_exit_codes(ckpt, args, code, message):
    res = run(*[a.format(ckpt=ckpt) for a in args])
    assert res.returncode == code
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("fastlfm: error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_unreachable_hub_is_a_one_line_error(tmp_path):
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)}
    res = run("generate", "nobody/no-such-model", "hi", "-q", env=env)
    assert res.returncode == 1
    assert res.stderr.strip().startswith("fastlfm: error:") and "could not be reached" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_train_and_serve_are_delegated():
    res = run("train", "--help")
    assert res.returncode == 0 and "usage: fastlfm train" in res.stdout
    res = run("serve", "--help")
    assert res.returncode == 0 and "usage: fastlfm serve" in res.stdout
