"""Serving many requests with one model: a worker thread runs them canvas by canvas, in turns or batched.

MLX runs on the worker thread alone. Each admitted request is a generator of
events (its prompt's encoding, then a `Commit` per canvas) that hands each
canvas it needs to the worker as a `CanvasRequest`. The worker takes turns,
round robin: a turn is one chunk's worth of one request's prompt, or one
canvas of the request whose turn it is, denoised together with the canvases
of up to `max_batch` - 1 other running requests that can share its batch (the
same step settings and canvas length, exact mode). A request that has not
started goes before a canvas, and its first canvas before the others'. So no
request waits for another to finish: a short infill that arrives behind a long
reply waits for the canvas in progress, not for the reply. A batch's rows are
the requests' own caches stacked (`EncoderCache.stacked`: each keeps its
positions) and each row draws its own noise (`RowNoise` over each request's
`SeededNoise(seed)`), so what a request gets does not depend on who else is
served, up to float rounding. A request's drafts come from its row of each
step. A cancelled request (its client gone) is dropped at its next step when it
is alone in its batch, at the canvas's end otherwise (its neighbours' canvas
runs on), at its turn without a step when it was waiting for one; its events
stop at once. Prompts are encoded in chunks, and a
prompt that extends one encoded before reuses that encoder cache
(`PromptCache`). A prompt's images are encoded with the chunk that holds their
tokens (never split), and the prompt cache tells prompts apart by their images
too.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Generator, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..cache import EncoderCache
from ..constrained import Slot, canvas_pins, fill_layout, filled_holes
from ..generate import (
    PREFILL_CHUNK,
    Commit,
    Done,
    Draft,
    GenerationStats,
    Turn,
    check_context,
    encode_chunk,
)
from ..images import PreparedImage, chunk_ends, image_spans
from ..model import Model
from ..sampler import BlockSampler, Noise, Pins, RowNoise, SamplerSettings, SeededNoise, StepDraft


class QueueFull(RuntimeError):
    """More requests are waiting than the server takes."""


@dataclass
class Failed:
    """A request that failed while it ran; `message` is one line."""

    message: str


@dataclass
class FillDone:
    """A fill-in-the-middle request's end: the text of each hole, and the stats."""

    fills: list[str]
    stats: GenerationStats


@dataclass
class Encoded:
    """A chunk of the prompt encoded: `tokens` of it so far (another request may run between chunks)."""

    tokens: int


Event = Encoded | Draft | Commit | Done | FillDone | Failed


@dataclass
class CanvasRequest:
    """A request's next canvas, for the worker to denoise (with others' when it can): its sampler yields this
    and reads `result` when the request resumes."""

    settings: SamplerSettings
    noise: Noise
    cache: EncoderCache
    canvas_index: int
    pins: Pins | None
    length: int
    result: tuple[mx.array, list[int], int] | None = None  # as BlockSampler.denoise_canvas returns it

    @property
    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share a denoising batch: the same steps, schedule, decisions and canvas
        length. None: this one runs alone (in fast mode the positions a row forwards would depend on the
        other rows')."""
        s = self.settings
        if s.speed != "exact":
            return None
        return (s.steps, s.entropy_bound, s.t_min, s.t_max, s.stability_threshold, s.confidence_threshold, self.length)


class ScheduledSampler(BlockSampler):
    """A request's sampler whose canvases the worker denoises: each is a CanvasRequest yielded up the request's
    events, answered before the request resumes."""

    def denoise_canvas(
        self,
        cache: EncoderCache,
        batch: int,
        canvas_index: int,
        finished: list[bool],
        drafts: bool,
        pins: Pins | None = None,
    ) -> Generator[CanvasRequest, None, tuple[mx.array, list[int], int]]:
        length = self.canvas_length if pins is None else pins.tokens.shape[1]
        request = CanvasRequest(self.settings, self.noise, cache, canvas_index, pins, length)
        yield request
        return request.result


def prompt_key(ids: Sequence[int], spans: Sequence[tuple[int, int]], images: Sequence[PreparedImage]) -> tuple:
    """What identifies a prompt's encoding: its ids, each image's tokens standing for that image's pixels
    (two prompts that differ only in an image share no cache)."""
    key: list[Hashable] = list(ids)
    for (start, end), image in zip(spans, images):
        key[start:end] = [image.digest] * (end - start)
    return tuple(key)


class PromptCache:
    """Encoder caches of recent prompts, least recently used first out.

    A new prompt that starts with one of them copies its cache and encodes only
    the rest: the next turn of a conversation re-sends the history, and the
    history's cache is here. Keys are `prompt_key`s (token ids, image tokens
    standing for their images), or plain ids for prompts without images.
    """

    def __init__(self, entries: int = 8):
        self.entries = entries
        self._caches: collections.OrderedDict[tuple, EncoderCache] = collections.OrderedDict()

    def longest_prefix(self, key: Sequence[Hashable]) -> tuple[int, EncoderCache | None]:
        """How many leading positions of `key` a cached prompt covers, and a copy of its cache."""
        best: tuple = ()
        for cached in self._caches:
            if len(best) < len(cached) <= len(key) and tuple(key[: len(cached)]) == cached:
                best = cached
        if not best:
            return 0, None
        self._caches.move_to_end(best)
        return len(best), self._caches[best].copy()

    def store(self, key: Sequence[Hashable], cache: EncoderCache) -> None:
        key = tuple(key)
        self._caches[key] = cache.copy()
        self._caches.move_to_end(key)
        while len(self._caches) > self.entries:
            self._caches.popitem(last=False)


@dataclass
class Job:
    """One request: what to run, and where its events go."""

    prompt_ids: list[int]
    settings: SamplerSettings
    slots: list[Slot] | None = None  # a constrained layout (fill-in-the-middle); None: free generation
    # A prompt length whose cache is worth keeping too: a chat's history before this turn's generation prompt,
    # which the next turn's prompt extends (its full prompt, which the next turn does not, is kept anyway).
    keep_prefix: int | None = None
    images: list[PreparedImage] = field(default_factory=list)  # one per run of image tokens, in order
    drafts: bool = False  # hand out each denoising step's draft of the canvas
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    _queue: asyncio.Queue | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def cancel(self) -> None:
        """Drop this request at its next step (its client is gone, or it has what it wanted)."""
        self.cancelled.set()

    def _emit(self, event: Event | None) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        """The request's events as the worker makes them; ends after Done, FillDone or Failed."""
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event


@dataclass
class _Running:
    """An admitted request on the worker: its events, and the canvas it waits for (None: other work first)."""

    job: Job
    events: Iterator[Event | CanvasRequest]
    request: CanvasRequest | None = None
    started: bool = False  # it has had a turn
    canvases: int = 0  # canvases denoised for it so far
    failure: str | None = None  # its canvas failed: the one-line reason


class Engine:
    """The model, its tokenizer and the worker thread that serves every request.

    `max_concurrent` requests run at once, up to `max_batch` of them denoised as one batch (1: they take turns
    canvas by canvas); beyond them up to `max_queue` wait. Where a step is bound by compute (a Mac's GPU, a
    CPU), a batch of N takes about N times one row's time: the same throughput as taking turns, and each row's
    canvas later; where it is bound by memory, a batch costs little more than a row.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: TokenizerWrapper,
        max_concurrent: int = 4,
        max_queue: int = 16,
        prompt_cache_entries: int = 8,
        max_batch: int = 1,
    ):
        if max_concurrent < 1 or max_batch < 1 or max_queue < 0:
            raise ValueError(
                f"need max_concurrent >= 1, max_batch >= 1 and max_queue >= 0, got {max_concurrent}, "
                f"{max_batch} and {max_queue}"
            )
        self.model, self.tokenizer = model, tokenizer
        # MLX streams are per thread (MLX >= 0.31.2): an array the model left lazy on this thread (RoPE's
        # frequencies are not parameters) cannot be evaluated on the worker's, so evaluate every one here.
        mx.eval(model.filter_and_map(lambda _module, _key, _value: True))
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.max_batch = max_batch
        self.prompt_cache = PromptCache(prompt_cache_entries)
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: collections.deque[_Running] = collections.deque()
        self._advancing = 0  # requests in the worker's turn now, which `_active` lacks meanwhile
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="dgemma-engine", daemon=True)
        self._thread.start()

    # -- the event loop's side ------------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        """Queue `job` (from the asyncio event loop); raises QueueFull beyond `max_queue` waiting requests."""
        job._loop, job._queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._wake:
            free_slots = max(0, self.max_concurrent - len(self._active) - self._advancing)
            if len(self._waiting) >= self.max_queue + free_slots:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already; try again shortly")
            self._waiting.append(job)
            self._wake.notify()
        return job

    @property
    def load(self) -> dict[str, int]:
        with self._wake:
            return {"active": len(self._active) + self._advancing, "waiting": len(self._waiting)}

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the worker thread -------------------------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            self._serve_until_stopped()
        finally:
            # A thread that used MLX must let go of its streams before it ends, or the process may abort at exit.
            mx.clear_streams()

    def _serve_until_stopped(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._active:
                    self._wake.wait()
                if self._stopping:
                    break
                self._admit()
                if not self._active:
                    continue
                turn = self._next_turn()
                self._advancing = len(turn)
            to_denoise = [r for r in turn if r.request is not None and not r.job.cancelled.is_set()]
            if to_denoise:
                self._denoise(to_denoise)
            ahead, behind = [], []
            for running in turn:
                if self._advance(running):
                    # A request's first canvas goes first: its wait is the turn in progress, not a round.
                    (ahead if running.request is not None and not running.canvases else behind).append(running)
            with self._wake:
                self._advancing = 0
                self._active.extendleft(reversed(ahead))
                self._active.extend(behind)
        for running in self._active:
            running.events.close()
            running.job._emit(Failed("the server is shutting down"))
            running.job._emit(None)

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.max_concurrent:
            job = self._waiting.popleft()
            if job.cancelled.is_set():  # its client left while it waited
                job._emit(None)
                continue
            self._active.appendleft(_Running(job, self._run(job)))

    def _next_turn(self) -> list[_Running]:
        """The request whose turn it is, and those whose canvas can share a batch with its canvas. A request that
        has not started yet goes before a canvas: its prompt's first chunk (a short prompt's whole) is encoded,
        and it joins that canvas's batch rather than the next."""
        if self._active[0].request is not None:
            newcomer = next((running for running in self._active if not running.started), None)
            if newcomer is not None:
                self._active.remove(newcomer)
                return [newcomer]
        turn = [self._active.popleft()]
        key = turn[0].request.batch_key if turn[0].request is not None else None
        if key is None:
            return turn
        for running in list(self._active):
            if len(turn) == self.max_batch:
                break
            if running.request is not None and running.request.batch_key == key and not running.job.cancelled.is_set():
                self._active.remove(running)
                turn.append(running)
        return turn

    def _denoise(self, turn: list[_Running]) -> None:
        """One canvas for every request of `turn` as one denoising batch; each request's `result` is its row's."""
        requests = [running.request for running in turn]
        try:
            steps = self._canvas_steps(requests)
            while True:
                try:
                    draft = next(steps)
                except StopIteration as done:
                    argmax, rows_steps, forwarded = done.value
                    break
                if all(running.job.cancelled.is_set() for running in turn):  # everyone left: stop here
                    steps.close()
                    return
                self._hand_out_drafts(turn, draft)
        except Exception as error:  # a failure ends these requests, never the server
            for running in turn:
                running.failure = _one_line(error)
            return
        for row, (running, request) in enumerate(zip(turn, requests)):
            request.result = argmax[row : row + 1], [rows_steps[row]], forwarded
            running.canvases += 1

    def _canvas_steps(self, requests: list[CanvasRequest]) -> Iterator[StepDraft]:
        """The requests' canvas denoised, a step at a time: one request's alone, or several stacked as one batch."""
        first = requests[0]
        if len(requests) == 1:
            sampler = BlockSampler(self.model, first.settings, first.noise)
            return sampler.denoise_canvas(first.cache, 1, first.canvas_index, [False], True, first.pins)
        batch = len(requests)
        cache = EncoderCache.stacked([request.cache for request in requests], first.length)
        noise = RowNoise([(request.noise, request.canvas_index) for request in requests])
        pins = Pins.stacked([request.pins for request in requests], first.length)
        sampler = BlockSampler(self.model, first.settings, noise)
        return sampler.denoise_canvas(cache, batch, 0, [False] * batch, True, pins)

    def _hand_out_drafts(self, turn: list[_Running], draft: StepDraft) -> None:
        wanted = [row for row, running in enumerate(turn) if running.job.drafts and not running.job.cancelled.is_set()]
        if not wanted:
            return
        rows = draft.argmax.tolist()
        for row in wanted:
            text = self.tokenizer.decode(rows[row], skip_special_tokens=True)
            turn[row].job._emit(Draft(turn[row].request.canvas_index, draft.step, text))

    def _advance(self, running: _Running) -> bool:
        """Run a request up to its next canvas (or the next chunk of its prompt); whether it has more to do."""
        job = running.job
        if running.failure is not None or job.cancelled.is_set():
            running.events.close()
            if running.failure is not None:
                job._emit(Failed(running.failure))
            job._emit(None)
            return False
        running.request, running.started = None, True
        try:
            for event in running.events:
                if isinstance(event, CanvasRequest):
                    running.request = event
                    return True
                if job.cancelled.is_set():
                    running.events.close()
                    job._emit(None)
                    return False
                job._emit(event)
                if isinstance(event, (Done, FillDone)):
                    job._emit(None)
                    return False
                if isinstance(event, Encoded):
                    return True
        except Exception as error:  # a failure ends this request, never the server
            job._emit(Failed(_one_line(error)))
            job._emit(None)
            return False
        job._emit(None)
        return False

    def _run(self, job: Job) -> Iterator[Event | CanvasRequest]:
        """A request's events: its prompt encoded (reusing a cached prefix), then its canvases."""
        stats = GenerationStats()
        cache = yield from self._encoded(job, stats)
        sampler = ScheduledSampler(self.model, job.settings, SeededNoise(job.settings.seed))
        if job.slots is None:
            turn = Turn(self.model, self.tokenizer, job.settings, None, sampler=sampler)
            turn.stats = stats
            yield from turn.run(cache, drafts=False)
            yield Done(turn.result())
            return
        yield from self._fill(job, cache, sampler, stats)

    def _encoded(self, job: Job, stats: GenerationStats) -> Iterator[Event]:
        """Encode what the prompt cache lacks, a chunk at a time, a turn for the next request after each chunk's
        worth of tokens (a long prompt does not hold the others up); returns the cache."""
        ids = job.prompt_ids
        spans = image_spans(ids, self.model.config.image_token_id) if job.images else []
        if len(spans) != len(job.images):
            raise ValueError(f"the prompt has {len(spans)} runs of image tokens for {len(job.images)} images")
        key = prompt_key(ids, spans, job.images)
        reused, cache = self.prompt_cache.longest_prefix(key)
        cache = cache or self.model.make_cache()
        if job.slots is None:
            check_context(self.model, 0, len(ids), job.settings, job.images)
        start = time.perf_counter()
        extra = [job.keep_prefix] if job.keep_prefix is not None else []
        ends = chunk_ends(len(ids), spans, PREFILL_CHUNK, start=reused, extra=extra) if reused < len(ids) else []
        begin = this_turn = reused
        for end in ends:
            if begin - this_turn >= PREFILL_CHUNK:
                yield Encoded(begin)
                this_turn = begin
            encode_chunk(self.model, cache, ids, begin, end, spans, job.images)
            if end == job.keep_prefix:
                self.prompt_cache.store(key[:end], cache)
            begin = end
        elapsed = time.perf_counter() - start
        stats.prompt_tokens = len(ids) - reused
        stats.prompt_tps = stats.prompt_tokens / elapsed if elapsed > 0 else 0.0
        self.prompt_cache.store(key, cache)
        return cache

    def _fill(
        self, job: Job, cache: EncoderCache, sampler: ScheduledSampler, stats: GenerationStats
    ) -> Iterator[Event | CanvasRequest]:
        slots = fill_layout(self.model, job.prompt_ids, job.slots, job.settings)
        tokens: list[int] = []
        begin = time.perf_counter()
        for result in sampler.pinned_canvases(cache, canvas_pins(self.model, slots)):
            if isinstance(result, CanvasRequest):
                yield result
                continue
            tokens += result.tokens[0].tolist()
            stats.canvases += 1
            stats.denoising_steps += result.steps[0]
            stats.positions_forwarded += result.forwarded
        holes = filled_holes(self.model, slots, tokens)
        stats.record_generation(sum(len(hole) for hole in holes), time.perf_counter() - begin)
        yield FillDone([self.tokenizer.decode(hole, skip_special_tokens=True) for hole in holes], stats)


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
