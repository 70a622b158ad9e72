"""Engine lifecycle on CPU: failures inside a step, sessions that keep their cache between
turns, and the synchronous output iterator. Every path runs synchronously, asynchronously
and through the CUDA-graph code (replayed eagerly on CPU).

Oracle: greedy continuations computed one token at a time over the model's own cache."""

import gc

import pytest

from fastlfm.engine import LLMEngine
from fastlfm.engine.sequence import SequenceStatus
from fastlfm.sampling import SamplingParams
from fastlfm.testing import greedy_reference

NEW = 8
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)


def greedy(model, prompt, n=NEW):
    return greedy_reference(model, prompt, n)


@pytest.fixture(scope="module")
def reference(model, prompts):
    return [greedy(model, p) for p in prompts]


@pytest.fixture(params=["sync", "async", "graph"])
def make_engine(request, model):
    """Engines of one kind: synchronous, asynchronous, or asynchronous on the graph decode path."""

    def make(**kwargs):
        engine = LLMEngine(model, async_scheduling=request.param != "sync", **kwargs)
        if request.param == "graph":
            engine.runner.capture_graphs(min(4, engine.max_num_seqs))
        return engine

    return make


# ----------------------------------------------------------------------------- failures
class Boom(Exception):
    pass


def fail_once(obj, name, at_call, error):
    """Make obj.name raise `error` on its `at_call`-th call (counting from 1), then work again."""
    original = getattr(obj, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at_call:
            raise error
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)
    return lambda: setattr(obj, name, original)


@pytest.mark.parametrize("where", ["forward", "sampler", "read back"])
@pytest.mark.parametrize("error", [KeyboardInterrupt(), Boom("CUDA out of memory")], ids=["ctrl-c", "oom"])
def test_a_failed_step_aborts_its_requests_and_the_engine_goes_on(make_engine, model, prompts, reference,
                                                                  where, error):
    engine = make_engine(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=4)
    target = {"forward": (engine.runner, "execute"), "sampler": (engine, "_sample"),
              "read back": (engine, "_process")}[where]
    restore = fail_once(*target, at_call=4, error=error)
    with pytest.raises(type(error)):
        engine.generate(prompts, GREEDY)
    restore()
    # the interrupted call's requests are gone, their cache is back, and the engine works
    assert not engine.requests and not engine.has_unfinished()
    engine.check_no_leaks()
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == reference
    engine.check_no_leaks()


def test_a_failed_step_spares_the_requests_still_waiting(make_engine, prompts, reference):
    """Two slots: two requests run, three wait. The step fails: the two running ones are aborted
    (reported in failed_outputs with the error), the waiting ones run on to the right tokens."""
    engine = make_engine(max_num_seqs=2, max_model_len=64, block_size=4)
    for i, p in enumerate(prompts):
        engine.add_request(p, GREEDY, f"r{i}")
    engine.step()
    restore = fail_once(engine.runner, "execute", at_call=1, error=Boom("device lost"))
    with pytest.raises(Boom):
        engine.step()
    restore()
    aborted = {o.request_id for o in engine.failed_outputs}
    assert aborted == {"r0", "r1"} and all(isinstance(o.error, Boom) for o in engine.failed_outputs)
    assert all(o.finished and o.finish_reason == "abort" for o in engine.failed_outputs)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert sorted(finals) == ["r2", "r3", "r4"]
    assert [finals[f"r{i}"].token_ids for i in (2, 3, 4)] == [reference[2], reference[3], reference[4]]
    engine.check_no_leaks()


def test_an_error_in_one_requests_output_aborts_it_alone(make_engine, prompts, reference):
    engine = make_engine(max_num_seqs=4, max_model_len=64)
    seqs = [engine.add_request(p, GREEDY, f"r{i}") for i, p in enumerate(prompts[:3])]

    class BrokenText:  # this request's text stream fails on its third token
        num_chars, stopped = 0, False
        calls = 0

        def add(self, token_id):
            BrokenText.calls += 1
            if BrokenText.calls == 3:
                raise UnicodeError("bad bytes")
            return ""

        def finish(self):
            return ""

    seqs[1].text_stream = BrokenText()
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["r1"].finish_reason == "abort" and isinstance(finals["r1"].error, UnicodeError)
    assert finals["r0"].token_ids == reference[0] and finals["r2"].token_ids == reference[2]
    engine.check_no_leaks()
    with pytest.raises(UnicodeError):  # the synchronous API raises the request's error
        seq = engine.add_request(prompts[1], GREEDY)
        BrokenText.calls = 0
        seq.text_stream = BrokenText()
        list(engine.iter_outputs([seq]))
    engine.check_no_leaks()


# ----------------------------------------------------------------------------- sessions
def run(engine, seq):
    *_, last = engine.iter_outputs([seq])
    return last


def test_session_turns_continue_from_the_cache(make_engine, model, prompts):
    """Turn 2 appends its tokens to the session and continues from its cache: its reply is the
    greedy continuation of the whole history, and only the new tokens are computed."""
    engine = make_engine(max_num_seqs=4, max_model_len=128, block_size=4)
    seq = engine.add_request(prompts[1], GREEDY, keep_cache=True)
    first = run(engine, seq)
    assert seq.status is SequenceStatus.PARKED and seq.holds_cache
    assert first.token_ids == greedy(model, prompts[1])
    computed = seq.num_computed_tokens
    assert computed >= len(prompts[1]) + NEW - 1
    engine.check_no_leaks()  # a parked session's cache is not a leak
    turn = [17, 18, 19]
    history = seq.token_ids + turn
    fed = []
    execute = engine.runner.execute
    engine.runner.execute = lambda batch, *a: (fed.append(sum(batch.num_tokens)), execute(batch, *a))[1]
    second = run(engine, engine.add_request(turn, GREEDY, continue_from=seq))
    engine.runner.execute = execute
    assert second.token_ids == greedy(model, history)
    assert second.num_prompt_tokens == len(history)
    assert sum(fed) == len(history) - computed + NEW - 1  # the cached history was not fed again
    engine.release(seq)
    engine.check_no_leaks()
    assert engine.block_manager.num_used_blocks == 0


def test_sessions_give_their_cache_back_under_pressure(make_engine, model, prompts):
    """A pool too small for everything: parked sessions are evicted before anything else waits,
    and an evicted session's next turn recomputes its history, with the same tokens."""
    engine = make_engine(max_num_seqs=2, max_model_len=48, num_kv_blocks=12, block_size=4,
                         max_num_batched_tokens=16)
    a = engine.add_request(prompts[3], GREEDY, keep_cache=True)  # 37 + 8 tokens: 12 blocks
    run(engine, a)
    assert a.holds_cache
    others = engine.generate([prompts[0], prompts[4]], GREEDY)  # need blocks and slots
    assert [o.token_ids for o in others] == [greedy(model, prompts[0]), greedy(model, prompts[4])]
    assert not a.holds_cache and a.num_computed_tokens == 0  # evicted
    engine.check_no_leaks()
    b = engine.add_request(prompts[2], GREEDY, keep_cache=True)
    run(engine, b)
    history = b.token_ids + [5, 6]
    out = run(engine, engine.add_request([5, 6], GREEDY, continue_from=b))
    assert out.token_ids == greedy(model, history)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(10, 50)), GREEDY, continue_from=b)
    engine.release(b)
    engine.release(a)
    engine.check_no_leaks()
    assert engine.block_manager.num_used_blocks == 0 and engine.block_manager.num_used_slots == 0


def test_session_rules(make_engine, prompts):
    engine = make_engine(max_num_seqs=4, max_model_len=64)
    plain = engine.add_request(prompts[0], GREEDY)
    run(engine, plain)
    with pytest.raises(ValueError, match="only a session"):
        engine.add_request([5], GREEDY, continue_from=plain)
    s = engine.add_request(prompts[0], GREEDY, keep_cache=True)
    with pytest.raises(ValueError, match="only a session"):  # its turn has not ended
        engine.add_request([5], GREEDY, continue_from=s)
    engine.abort(s.request_id)  # an aborted turn ends the session: its cache may be half-updated
    assert not s.keep_cache and not s.holds_cache
    engine.check_no_leaks()
    s = engine.add_request(prompts[0], GREEDY, keep_cache=True)
    run(engine, s)
    engine.release_later(s)  # from a finalizer: applied before the next step or request
    assert s.holds_cache
    engine.check_no_leaks()
    assert not s.holds_cache and engine.block_manager.num_used_blocks == 0


def test_drop_uncomputed_only_drops_what_is_not_cached(make_engine, prompts):
    engine = make_engine(max_num_seqs=4, max_model_len=64)
    s = engine.add_request(prompts[0], GREEDY, keep_cache=True)
    run(engine, s)
    n = len(s.token_ids)
    if s.num_computed_tokens == n:  # asynchronous: the last token rode in a discarded row
        assert not engine.drop_uncomputed(s, 1) and len(s.token_ids) == n
    else:
        assert engine.drop_uncomputed(s, 1) and len(s.token_ids) == n - 1
        assert not engine.drop_uncomputed(s, 1)  # the next one is in the cache
    engine.release(s)
    engine.check_no_leaks()


# ----------------------------------------------------------------------------- output iterator
def test_iter_outputs_streams_in_turns_and_aborts_on_exit(make_engine, prompts, reference):
    engine = make_engine(max_num_seqs=4, max_model_len=64)
    a, b = (engine.add_request(p, GREEDY) for p in prompts[:2])
    streams = {"a": engine.iter_outputs([a]), "b": engine.iter_outputs([b])}
    got = {"a": [], "b": []}
    while streams:  # one output from each stream in turn
        for name in list(streams):
            out = next(streams[name], None)
            if out is None:
                del streams[name]
            else:
                got[name] += out.new_token_ids
    assert (got["a"], got["b"]) == (reference[0], reference[1])
    c = engine.add_request(prompts[3], GREEDY)
    it = engine.iter_outputs([c])
    next(it)
    it.close()  # leaving early aborts the request
    assert not engine.has_unfinished() or all(s.is_finished for s in [c])
    while engine.has_unfinished():
        engine.step()
    engine.check_no_leaks()


def test_a_generator_collected_mid_step_defers_its_abort(make_engine, prompts):
    """An abandoned stream closed by garbage collection while a step runs must not touch the
    scheduler then: its abort waits for the step to end."""
    engine = make_engine(max_num_seqs=4, max_model_len=64)
    seq = engine.add_request(prompts[0], GREEDY)
    it = engine.iter_outputs([seq])
    next(it)
    execute = engine.runner.execute

    def execute_and_collect(batch, *a):
        nonlocal it
        it = None  # the last reference goes: the generator closes now, inside the step
        gc.collect()
        return execute(batch, *a)

    engine.runner.execute = execute_and_collect
    engine.step()
    engine.runner.execute = execute
    assert engine._deferred or seq.is_finished
    engine.check_no_leaks()  # applies the deferred abort
    assert seq.is_finished and seq.finish_reason == "abort"
