"""Prefix caching (CPU, fp32): requests that share a start reuse its KV blocks and the conv state
where it ends, and still give exactly the greedy tokens of the model run alone
(`greedy_reference`: Lfm2ForCausalLM + Lfm2Cache, token by token, parity-tested against
transformers) and of an engine without the cache. Counted: the tokens each request found cached
(a hand computation from the prompts and the block size) and the tokens the model was fed.
Every block comes back free or cached with no user, every slot and snapshot is accounted for."""

import pytest
import torch

from fastlfm.engine import LLMEngine
from fastlfm.engine.block_manager import BlockManager, CacheLeakError
from fastlfm.engine.sequence import Sequence
from fastlfm.sampling import SamplingParams
from fastlfm.testing import greedy_reference

NEW = 6
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
BS = 4


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 1000, (n,), generator=g).tolist()


SYSTEM = tokens(18, 1)  # ends inside a block of 4: 16 tokens of it are block-aligned


def fed_tokens(engine):
    """Count the tokens the model is fed, per request id (wraps the runner)."""
    fed = {}
    execute = engine.runner.execute

    def wrapped(batch, *args):
        for s, n in zip(batch.seqs, batch.num_tokens):
            fed[s.request_id] = fed.get(s.request_id, 0) + n
        return execute(batch, *args)

    engine.runner.execute = wrapped
    return fed


def run(engine, prompts, ids=None):
    return engine.generate(prompts, GREEDY) if ids is None else [
        out for out in engine.generate(prompts, GREEDY)]


@pytest.fixture(params=["sync", "async", "graph"])
def async_scheduling(request):
    """Each test runs synchronously, asynchronously, and asynchronously on the graph paths
    (replayed eagerly on CPU): decode graphs, where snapshots at block ends are copied out after the
    replay, and prefill graphs, which take the snapshots inside a chunk into fixed-size buffers."""
    return request.param


def engine_for(model, kind, **kw):
    kw = {"max_num_seqs": 4, "max_model_len": 96, "block_size": BS, **kw}
    engine = LLMEngine(model, async_scheduling=kind != "sync", **kw)
    if kind == "graph":
        engine.runner.capture_graphs(engine.max_num_seqs)
        engine.runner.enable_prefill_graphs(min(64, engine.max_num_batched_tokens))
    return engine


def test_shared_system_prompt(model, async_scheduling):
    """Later requests reuse the system prompt's full blocks (16 of its 18 tokens), whatever
    follows; the answers equal the reference and the no-cache engine's."""
    prompts = [SYSTEM + tokens(n, 10 + n) for n in (3, 7, 9, 2)]
    refs = [greedy_reference(model, p, NEW) for p in prompts]
    engine = engine_for(model, async_scheduling)
    fed = fed_tokens(engine)
    first = engine.generate(prompts[:1], GREEDY)[0]
    assert first.num_cached_tokens == 0 and first.token_ids == refs[0]
    outs = engine.generate(prompts[1:], GREEDY)
    assert [o.token_ids for o in outs] == refs[1:]
    assert [o.num_cached_tokens for o in outs] == [16, 16, 16]
    assert [fed[o.request_id] for o in outs] == [len(p) - 16 + NEW - 1 for p in prompts[1:]]
    plain = engine_for(model, async_scheduling, enable_prefix_caching=False).generate(prompts, GREEDY)
    assert [o.token_ids for o in plain] == refs and all(o.num_cached_tokens == 0 for o in plain)
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (sum(map(len, prompts)), 48)
    engine.check_no_leaks()
    assert engine.block_manager.num_used_blocks == 0 and engine.block_manager.num_cached_blocks > 0


def test_prefix_ending_mid_block_and_the_last_token_recomputed(model, async_scheduling):
    """A prompt that is a cached prompt's start, cut inside a block, reuses only whole blocks;
    a prompt equal to a cached one still computes its last token (its logits are needed)."""
    base = tokens(21, 2)
    refs = {n: greedy_reference(model, base[:n], NEW) for n in (21, 14, 12, 9)}
    engine = engine_for(model, async_scheduling)
    fed = fed_tokens(engine)
    assert engine.generate([base], GREEDY)[0].token_ids == refs[21]
    for n, cached in ((14, 12), (12, 8), (9, 8)):  # 12 tokens = 3 blocks, but the last must be fed
        out = engine.generate([base[:n]], GREEDY)[0]
        assert (out.token_ids, out.num_cached_tokens) == (refs[n], cached)
        assert fed[out.request_id] == n - cached + NEW - 1
    again = engine.generate([base], GREEDY)[0]
    assert again.token_ids == refs[21] and again.num_cached_tokens == 20
    engine.check_no_leaks()


@pytest.mark.parametrize("budget", [3, 5])
def test_snapshots_inside_chunks_that_start_off_the_block_grid(model, async_scheduling, budget):
    """Chunks of 3 (or 5) tokens over blocks of 4: block ends fall 1 or 2 tokens into a chunk (the
    conv state there mixes the step's start state with its inputs), inside it, or at its end (the
    slot's state after the step). Later prompts that diverge right after each block end resume
    from those snapshots and still give the reference tokens."""
    base = tokens(22, 11)
    engine = engine_for(model, async_scheduling, max_num_batched_tokens=budget)
    assert engine.generate([base], GREEDY)[0].token_ids == greedy_reference(model, base, NEW)
    for k in (4, 8, 12, 16, 20):
        prompt = base[:k] + [7, 7, 7]
        out = engine.generate([prompt], GREEDY)[0]
        assert (out.token_ids, out.num_cached_tokens) == (greedy_reference(model, prompt, NEW), k)
    engine.check_no_leaks()


def test_multi_turn_reuses_the_previous_turn_including_its_answer(model, async_scheduling):
    """Turn k+1's prompt is turn k's prompt + its answer + a new message, sent as a new request
    (as a server client does): the blocks of the answer (filled by decode steps) are reused too."""
    engine = engine_for(model, async_scheduling, max_model_len=128)
    fed = fed_tokens(engine)
    history = SYSTEM + tokens(5, 3)
    for turn in range(4):
        ref = greedy_reference(model, history, NEW)
        out = engine.generate([history], GREEDY)[0]
        assert out.token_ids == ref
        if turn:  # everything up to the last full block of the previous prompt + answer is cached
            assert out.num_cached_tokens == min(previous, len(history) - 1) // BS * BS
            assert fed[out.request_id] == len(history) - out.num_cached_tokens + NEW - 1
        # the last sampled token was never fed: the cache holds the tokens before it
        previous = len(history) + NEW - 1
        history = history + out.token_ids + tokens(3 + turn, 20 + turn)
    engine.check_no_leaks()


def test_concurrent_requests_share_blocks_with_reference_counts(model, async_scheduling):
    """Requests running together share the cached blocks (counted once per user), and the
    counts drop back to zero."""
    prompts = [SYSTEM + tokens(4 + i, 30 + i) for i in range(3)]
    refs = [greedy_reference(model, p, NEW) for p in prompts]
    engine = engine_for(model, async_scheduling)
    engine.generate([SYSTEM + [5]], GREEDY)
    bm = engine.block_manager
    seqs = [engine.add_request(p, GREEDY) for p in prompts]
    engine.step()
    shared = seqs[0].block_table[:4]
    assert all(s.block_table[:4] == shared for s in seqs)
    assert [bm.ref_count(b) for b in shared] == [3] * 4
    outs = {o.request_id: o for o in engine.iter_outputs(seqs) if o.finished}
    assert [outs[s.request_id].token_ids for s in seqs] == refs
    assert [bm.ref_count(b) for b in shared] == [0] * 4
    engine.check_no_leaks()


def test_preemption_while_blocks_are_shared(model, prompts, async_scheduling):
    """A KV pool too small for the load: sequences holding shared blocks are preempted and
    recomputed (from the cache when it still has their start); the tokens stay exact, no
    shared block is written or freed twice."""
    base = SYSTEM + tokens(6, 4)
    load = [base + tokens(3 + i, 40 + i) for i in range(4)] + [SYSTEM + p for p in prompts]
    refs = [greedy_reference(model, p, NEW) for p in load]
    engine = engine_for(model, async_scheduling, max_num_seqs=6, num_kv_blocks=24, max_num_batched_tokens=16)
    engine.generate([base], GREEDY)
    preempted = []
    preempt = engine.scheduler._preempt

    def spy(seq):
        preempted.append([engine.block_manager.ref_count(b) for b in seq.block_table])
        preempt(seq)

    engine.scheduler._preempt = spy
    outs = engine.generate(load, GREEDY)
    assert [o.token_ids for o in outs] == refs
    assert any(max(counts) > 1 for counts in preempted), preempted  # a victim shared blocks
    engine.check_no_leaks()


def test_eviction_is_lru_and_spares_blocks_in_use(model, async_scheduling):
    """A pool of 24 blocks: when a new prompt needs room, the least recently freed cached blocks
    go first (a prefix's tail before its head), and blocks of a running request are never taken."""
    engine = engine_for(model, async_scheduling, max_num_seqs=2, num_kv_blocks=24, num_conv_snapshots=24)
    bm = engine.block_manager
    a, b, c = tokens(40, 5), tokens(40, 6), tokens(40, 7)
    for p in (a, b):
        assert engine.generate([p], GREEDY)[0].token_ids == greedy_reference(model, p, NEW)
    assert bm.num_cached_blocks == 22  # 45 computed tokens each: 11 full blocks; 2 blocks never used
    engine.generate([c], GREEDY)  # 12 blocks: the 2 unused + the 10 that a freed last (its tail)
    cached = lambda p: bm.match_prefix(Sequence("probe", p, GREEDY)).num_tokens  # noqa: E731
    assert (cached(a), cached(b), cached(c)) == (4, 36, 36)
    # b's blocks in use by d; e needs room: it evicts the rest of the cache, never d's blocks
    d = engine.add_request(b + [1, 2, 3], GREEDY)
    engine.step()
    assert d.num_cached_tokens == 40 and all(bm.ref_count(x) == 1 for x in d.block_table)
    e = engine.add_request(tokens(60, 8), GREEDY)
    engine.step()
    assert not set(d.block_table) & set(e.block_table)
    outs = {o.request_id: o for o in engine.iter_outputs([d, e]) if o.finished}
    assert outs[d.request_id].token_ids == greedy_reference(model, b + [1, 2, 3], NEW)
    assert outs[e.request_id].token_ids == greedy_reference(model, tokens(60, 8), NEW)
    engine.check_no_leaks()


def test_sessions_share_and_keep_working(model, async_scheduling):
    """Conversation sessions (keep_cache / continue_from) register their blocks, other requests
    reuse them while the session is parked, and the session's next turn is exact; after the
    session is evicted, its next turn resumes from the cached blocks of its own history."""
    engine = engine_for(model, async_scheduling, max_num_seqs=2)
    first = SYSTEM + tokens(4, 7)
    s = engine.add_request(first, GREEDY, keep_cache=True)
    out1 = [o for o in engine.iter_outputs([s]) if o.finished][0]
    assert out1.token_ids == greedy_reference(model, first, NEW)
    other = engine.generate([SYSTEM + [9, 9]], GREEDY)[0]
    assert other.num_cached_tokens == 16 and other.token_ids == greedy_reference(model, SYSTEM + [9, 9], NEW)
    more = tokens(5, 8)
    engine.add_request(more, GREEDY, continue_from=s)
    out2 = [o for o in engine.iter_outputs([s]) if o.finished][0]
    history = first + out1.token_ids + more
    assert out2.token_ids == greedy_reference(model, history, NEW)
    assert out2.num_cached_tokens == len(first) + NEW - 1  # its own cache: all but the last answer token
    engine.check_no_leaks()  # the parked session's blocks are its own and shared ones, counted once
    assert engine.scheduler.evict_parked()
    more2 = tokens(2, 9)
    engine.add_request(more2, GREEDY, continue_from=s)
    out3 = [o for o in engine.iter_outputs([s]) if o.finished][0]
    history = history + out2.token_ids + more2
    assert out3.token_ids == greedy_reference(model, history, NEW)
    assert out3.num_cached_tokens == (len(history) - len(more2) - 1) // BS * BS
    engine.release(s)
    engine.check_no_leaks()


class Boom(Exception):
    pass


@pytest.mark.parametrize("at_call", [2, 3, 5])
def test_a_failed_step_while_blocks_are_shared_leaks_nothing(model, async_scheduling, at_call):
    """A step fails while requests share cached blocks: they are aborted, no reference is lost or
    dropped twice, the blocks of the failed step are not cached, and the engine goes on exactly."""
    prompts = [SYSTEM + tokens(5 + i, 50 + i) for i in range(3)]
    refs = [greedy_reference(model, p, NEW) for p in prompts]
    engine = engine_for(model, async_scheduling, max_num_batched_tokens=16)
    engine.generate([SYSTEM + [3]], GREEDY)
    execute, calls = engine.runner.execute, [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == at_call:
            raise Boom("device lost")
        return execute(*args)

    engine.runner.execute = failing
    with pytest.raises(Boom):
        engine.generate(prompts, GREEDY)
    engine.runner.execute = execute
    assert not engine.requests and not engine.has_unfinished()
    engine.check_no_leaks()
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == refs and all(o.num_cached_tokens >= 16 for o in outs)
    engine.check_no_leaks()


def test_disabled_cache_never_shares(model, async_scheduling):
    engine = engine_for(model, async_scheduling, enable_prefix_caching=False)
    fed = fed_tokens(engine)
    outs = [engine.generate([SYSTEM + [7]], GREEDY)[0] for _ in range(2)]
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    assert [fed[o.request_id] for o in outs] == [len(SYSTEM) + NEW] * 2
    assert engine.block_manager.num_cached_blocks == 0 and engine.runner.conv_snapshots is None
    engine.check_no_leaks()


# -- the block manager on its own ------------------------------------------------------------

def make_seq(toks, rid="s"):
    return Sequence(rid, toks, GREEDY)


def test_block_manager_hashes_chain_and_leak_checks():
    bm = BlockManager(num_blocks=6, block_size=2, num_conv_slots=2, num_snapshots=2)
    a = make_seq([1, 2, 3, 4, 5])
    bm.admit(a, 5)
    a.num_computed_tokens = 5
    snap = bm.new_snapshot(a, 1)
    bm.register(a)
    # the chain: the same block content after another first block has another hash
    b = make_seq([9, 9, 3, 4, 5], "b")
    assert bm.num_hashed(b, 4) == 2 and b.block_hashes[1] != a.block_hashes[1] and bm.match_prefix(b).num_tokens == 0
    c = make_seq([1, 2, 3, 4, 7], "c")
    hit = bm.match_prefix(c)  # block 0 has no snapshot: the hit is both blocks, ending at block 1
    assert (hit.blocks, hit.snapshot, hit.num_tokens) == (a.block_table[:2], snap, 4)
    bm.admit(c, 5, hit)
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    with pytest.raises(CacheLeakError):
        bm.check_no_leaks([a])  # c holds blocks too
    bm.check_no_leaks([a, c])
    bm.free(a)
    bm.free(c)
    bm.check_no_leaks()
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2
    a.block_table, a.num_computed_tokens = [0], 0
    with pytest.raises(CacheLeakError):
        bm.free(a)  # block 0 is not held


def test_image_digest_separates_same_tokens():
    bm = BlockManager(num_blocks=4, block_size=2, num_conv_slots=1, num_snapshots=1)
    x, y = make_seq([5, 5, 5, 1]), make_seq([5, 5, 5, 1], "y")
    x.image_keys, y.image_keys = [(0, 2, b"a")], [(0, 2, b"b")]
    z = make_seq([5, 5, 5, 1], "z")
    z.image_keys = [(2, 2, b"b")]  # an image only in the second block: the first block is text alone
    plain = make_seq([5, 5, 5, 1], "p")
    for s in (x, y, z, plain):
        assert bm.num_hashed(s, 4) == 2
    assert x.block_hashes[0] != y.block_hashes[0]
    assert z.block_hashes[0] == plain.block_hashes[0] and z.block_hashes[1] != plain.block_hashes[1]
