"""Requests denoised together: one-row caches stacked into a batch, each row with its own noise and pins.

What the decoder computes for a row of a stacked batch is what it computes for
that row's cache alone (each row keeps its own positions), and what the server's
engine gives a request in a batch is what it gives it alone.
"""

from __future__ import annotations

import asyncio

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_reference_model, save_reference_checkpoint
from serve_fixtures import BrokenModel, GatedModel, wait_until
from tokenizer_fixture import write_tokenizer

import mlx_dgemma
from mlx_dgemma.cache import EncoderCache
from mlx_dgemma.constrained import infill_layout
from mlx_dgemma.generate import PREFILL_CHUNK, Commit, Done, Draft, default_settings
from mlx_dgemma.sampler import Pins, RowNoise, SeededNoise
from mlx_dgemma.serve.engine import Encoded, Engine, Failed, FillDone, Job

CANVAS = 16
PROMPT_LENGTHS = (5, 9, 30)  # shorter and longer than the sliding window (12)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = tmp_path_factory.mktemp("batching") / "hf"
    save_reference_checkpoint(build_reference_model(seed=3, canvas_length=CANVAS), path)
    write_tokenizer(path, vocab_size=384)
    return mlx_dgemma.load(path)


def encoded(model, ids: list[int]) -> EncoderCache:
    cache = model.make_cache()
    model.encode(mx.array([ids]), cache)
    return cache


def test_stacked_rows_denoise_as_they_do_alone(loaded):
    """Prompts of different lengths (some past the sliding window) stacked: each row's logits are its own cache's,
    on a whole-canvas pass and on a fast-mode pass over some positions; the rows' caches are left as they were."""
    model, _ = loaded
    generator = np.random.default_rng(0)
    vocab = model.text_config.vocab_size
    caches = [encoded(model, generator.integers(0, vocab, length).tolist()) for length in PROMPT_LENGTHS]
    canvases = mx.array(generator.integers(0, vocab, (len(caches), CANVAS)))
    conditioning = mx.array(generator.normal(size=(len(caches), CANVAS, vocab)).astype(np.float32))
    positions = mx.array(np.sort(generator.permutation(CANVAS)[:5]))[None].astype(mx.int32)
    positions = mx.broadcast_to(positions, (len(caches), 5))

    stacked = EncoderCache.stacked(caches, CANVAS)
    assert stacked.offset == max(PROMPT_LENGTHS) and stacked.batch_size == len(caches)
    together = model.denoise(canvases, stacked, conditioning)
    live = mx.take_along_axis(canvases, positions, axis=1)
    live_conditioning = mx.take_along_axis(conditioning, positions[..., None], axis=1)
    together_live = model.denoise(live, stacked, live_conditioning, positions=positions)
    for row, cache in enumerate(caches):
        alone = model.denoise(canvases[row : row + 1], cache, conditioning[row : row + 1])
        np.testing.assert_allclose(np.array(together[row]), np.array(alone[0]), rtol=0, atol=1e-4)
        alone_live = model.denoise(live[row : row + 1], cache, live_conditioning[row : row + 1], positions[:1])
        np.testing.assert_allclose(np.array(together_live[row]), np.array(alone_live[0]), rtol=0, atol=1e-4)
        assert cache.offset == PROMPT_LENGTHS[row] and cache.batch_size == 1 and cache.position_shift is None


def test_only_one_row_caches_holding_a_prompt_are_stacked(loaded):
    model, _ = loaded
    two_rows = model.make_cache()
    model.encode(mx.array([[1, 2, 3], [4, 5, 6]]), two_rows)
    with pytest.raises(ValueError, match="one-row caches"):
        EncoderCache.stacked([two_rows, encoded(model, [1, 2])], CANVAS)
    with pytest.raises(ValueError, match="one-row caches"):
        EncoderCache.stacked([model.make_cache(), encoded(model, [1, 2])], CANVAS)


def test_row_noise_draws_each_rows_own_numbers():
    rows = [(SeededNoise(5), 0), (SeededNoise(6), 3)]
    noise = RowNoise(rows)
    tokens, gumbel = noise.tokens(0, 2, (2, 8), 50), noise.gumbel(0, 2, (2, 8, 50))
    for row, (own, canvas) in enumerate(rows):
        np.testing.assert_array_equal(np.array(tokens[row]), np.array(own.tokens(canvas, 2, (1, 8), 50)[0]))
        np.testing.assert_array_equal(np.array(gumbel[row]), np.array(own.gumbel(canvas, 2, (1, 8, 50))[0]))
    assert not np.array_equal(np.array(tokens[0]), np.array(tokens[1]))


def test_stacked_pins_leave_rows_without_pins_free():
    pinned = Pins(mx.array([[True, False, False]]), mx.array([[7, 0, 0]]), start=mx.array([[False, True, False]]))
    stacked = Pins.stacked([None, pinned], 3)
    assert stacked.pinned.tolist() == [[False, False, False], [True, False, False]]
    assert stacked.tokens[1].tolist() == [7, 0, 0]
    assert stacked.start.tolist() == [[False, False, False], [False, True, False]]
    assert Pins.stacked([None, None], 3) is None


def _comparable(event) -> tuple | None:
    if isinstance(event, Draft):
        return ("draft", event.canvas, event.step, event.text)
    if isinstance(event, Commit):
        return ("commit", event.text, event.thinking, tuple(event.tokens))
    if isinstance(event, Done):
        return ("done", tuple(event.result.tokens), event.result.finish_reason)
    if isinstance(event, FillDone):
        return ("fill", tuple(event.fills))
    assert isinstance(event, Encoded), event
    return None


def _served(engine: Engine, jobs: list[Job], gate=None) -> list[list[tuple]]:
    """Every job's events, the jobs submitted at once (the worker held at `gate` until all are in)."""

    async def run() -> list[list[tuple]]:
        for job in jobs:
            engine.submit(job)
        if gate is not None:
            gate.set()

        async def collect(job: Job) -> list[tuple]:
            return [seen for event in [e async for e in job.events()] if (seen := _comparable(event))]

        return await asyncio.gather(*(collect(job) for job in jobs))

    return asyncio.run(run())


def test_requests_in_one_batch_get_what_they_get_alone(loaded):
    """Replies after prompts of different lengths, a fill-in-the-middle whose first canvas is a whole one (pinned
    rows beside free ones), a reply with other step settings and one in fast mode (neither can share their
    batch): on an engine that batches, each gets the commits, drafts and text it gets served alone."""
    model, tokenizer = loaded
    settings = default_settings(model).updated(steps=3, max_new_tokens=2 * CANVAS)
    generator = np.random.default_rng(1)
    fill_ids, slots = infill_layout(tokenizer, "def add(a, b):\n    return ", "\n\nprint(add(2, 3))\n", CANVAS + 4)

    def jobs() -> list[Job]:
        replies = [
            Job(generator_ids, settings.updated(seed=seed), drafts=True)
            for seed, generator_ids in zip((11, 12, 13), prompts)
        ]
        fill = Job(fill_ids, settings.updated(seed=14), slots=slots, drafts=True)
        other_steps = Job(prompts[0], settings.updated(seed=15, steps=4))
        fast = Job(prompts[1], settings.updated(seed=16, speed="fast"))  # alone: its forwarded rows are its own
        return [*replies, fill, other_steps, fast]

    prompts = [[2, *generator.integers(10, 300, length).tolist()] for length in PROMPT_LENGTHS]
    alone_engine = Engine(model, tokenizer, max_concurrent=1, max_batch=1)
    try:
        alone = [_served(alone_engine, [job])[0] for job in jobs()]
    finally:
        alone_engine.close()
    gated = GatedModel(model)
    engine = Engine(gated, tokenizer, max_concurrent=8, max_batch=8)
    try:
        together = _served(engine, jobs(), gated.gate)
    finally:
        gated.gate.set()
        engine.close()
    assert together == alone
    assert max(gated.batch_sizes) == 4, gated.batch_sizes  # three replies and the fill's first canvas
    assert [kind for kind, *_ in alone[3]].count("draft") > 0 and alone[3][-1][0] == "fill"


def test_a_long_prompt_takes_turns_with_a_running_reply(loaded):
    """A prompt of several chunks is encoded a chunk's worth per turn: a running reply commits canvases in
    between, and both get what they get alone."""
    model, tokenizer = loaded
    settings = default_settings(model).updated(steps=2, eos_token_ids=[])
    generator = np.random.default_rng(2)
    long_prompt = [2, *generator.integers(10, 300, 2 * PREFILL_CHUNK + 100).tolist()]

    def jobs() -> list[Job]:
        reply = Job([2, 40, 41, 42], settings.updated(seed=21, max_new_tokens=4 * CANVAS))
        return [reply, Job(long_prompt, settings.updated(seed=22, max_new_tokens=CANVAS))]

    alone_engine = Engine(model, tokenizer, max_concurrent=1)
    try:
        alone = [_served(alone_engine, [job])[0] for job in jobs()]
    finally:
        alone_engine.close()
    gated = GatedModel(model)  # the reply is held at its prompt until the long prompt is queued too
    engine = Engine(gated, tokenizer, max_concurrent=2)
    order: list[tuple[int, str]] = []
    together_jobs = jobs()
    for index, job in enumerate(together_jobs):  # what the worker hands each job, in the order it does
        emit = job._emit
        job._emit = lambda event, index=index, emit=emit: (order.append((index, type(event).__name__)), emit(event))
    try:
        together = _served(engine, together_jobs, gated.gate)
    finally:
        gated.gate.set()
        engine.close()
    assert together == alone
    chunk_turns = [at for at, (job, kind) in enumerate(order) if job == 1 and kind == "Encoded"]
    assert len(chunk_turns) == 2, order
    assert any(job == 0 and kind == "Commit" for job, kind in order[chunk_turns[0] : chunk_turns[1]]), order


@pytest.mark.parametrize("max_batch", [1, 2])
def test_a_failing_canvas_ends_its_requests_and_the_engine_serves_on(loaded, max_batch):
    """A step that raises fails the requests whose canvas it was (each with the error in one line); the next
    request is served."""
    model, tokenizer = loaded
    settings = default_settings(model).updated(steps=2, max_new_tokens=CANVAS)
    broken = BrokenModel(model)
    gated = GatedModel(broken)
    engine = Engine(gated, tokenizer, max_concurrent=2, max_batch=max_batch)

    async def events_of(jobs: list[Job], gate=None) -> list[list]:
        for job in jobs:
            engine.submit(job)
        if gate is not None:
            gate.set()

        async def collect(job: Job) -> list:
            return [event async for event in job.events()]

        return await asyncio.gather(*(collect(job) for job in jobs))

    try:
        failed = asyncio.run(events_of([Job([2, 40, 41], settings.updated(seed=s)) for s in (1, 2)], gated.gate))
        for events in failed:
            assert isinstance(events[-1], Failed), events
            assert events[-1].message == "the device went away in the middle of a step"
            assert not any(isinstance(event, (Commit, Done)) for event in events)
        broken.broken = False
        (served,) = asyncio.run(events_of([Job([2, 40, 41], settings.updated(seed=3))]))
        assert isinstance(served[-1], Done), served
        wait_until(lambda: engine.load == {"active": 0, "waiting": 0}, "the engine to be idle")
    finally:
        gated.gate.set()
        engine.close()


def test_engine_settings_are_checked(loaded):
    model, tokenizer = loaded
    for settings in ({"max_batch": 0}, {"max_concurrent": 0}, {"max_queue": -1}):
        with pytest.raises(ValueError, match="max_batch >= 1"):
            Engine(model, tokenizer, **settings)


@pytest.mark.parametrize("max_batch", [1, 2])
def test_a_request_cancelled_while_it_waits_for_its_canvas_costs_no_step(loaded, max_batch):
    """A request whose client leaves while another request's turn runs is dropped at its own turn, before any
    step of its canvas (alone, or in the batch it would have joined)."""
    model, tokenizer = loaded
    settings = default_settings(model).updated(steps=2, max_new_tokens=3 * CANVAS, eos_token_ids=[])
    gated = GatedModel(model, hold="canvas")  # held when a first committed canvas is appended to its cache
    engine = Engine(gated, tokenizer, max_concurrent=2, max_batch=max_batch)
    prompts = {5: [2, 40, 41, 42, 43], 9: [2, 50, 51, 52, 53, 54, 55, 56, 57]}  # by length: the cache's offset
    jobs = {length: Job(ids, settings.updated(seed=length)) for length, ids in prompts.items()}

    async def run() -> dict[int, list]:
        for job in jobs.values():
            engine.submit(job)
        while not gated.entered.is_set():
            await asyncio.sleep(0.01)
        waiting = next(length for length in prompts if length != gated.held_offset)
        jobs[waiting].cancel()
        gated.denoised_offsets.clear()
        gated.gate.set()

        async def collect(job: Job) -> list:
            return [type(event).__name__ async for event in job.events()]

        return dict(zip(jobs, await asyncio.gather(*(collect(job) for job in jobs.values())))), waiting

    try:
        events, waiting = asyncio.run(run())
    finally:
        gated.gate.set()
        engine.close()
    served = next(length for length in prompts if length != waiting)
    assert events[served][-1] == "Done" and "Done" not in events[waiting], events
    assert waiting not in gated.denoised_offsets and gated.denoised_offsets, gated.denoised_offsets
    assert set(gated.batch_sizes[-len(gated.denoised_offsets) :]) == {1}
