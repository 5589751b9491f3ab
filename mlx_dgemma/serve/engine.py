"""Serving many requests with one model: a worker thread interleaves them canvas by canvas.

MLX runs on the worker thread alone. Each admitted request is a generator of
events (its prompt's encoding, then a `Draft` per denoising step and a `Commit`
per canvas); the worker advances one request until it commits a canvas (or
ends), hands its events to the request's asyncio queue, then moves on to the
next, round robin, a newly admitted request first. So no request waits for
another to finish: a short infill that arrives behind a long reply starts after
the canvas in progress. A long prompt's chunks take turns the same way. A
request's randomness is its own (`SeededNoise(seed)`), so what it gets does not
depend on who else is served. A cancelled request (its client gone) is dropped
at its next step. Prompts are encoded in chunks, and a prompt that extends one
encoded before reuses that encoder cache (`PromptCache`). A prompt's images are
encoded with the chunk that holds their tokens (never split), and the prompt
cache tells prompts apart by their images too.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..cache import EncoderCache
from ..constrained import Slot, fill_canvases, fill_layout, filled_holes
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
from ..sampler import CanvasResult, SamplerSettings, SeededNoise, StepDraft


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


class Engine:
    """The model, its tokenizer and the worker thread that serves every request."""

    def __init__(
        self,
        model: Model,
        tokenizer: TokenizerWrapper,
        max_concurrent: int = 4,
        max_queue: int = 16,
        prompt_cache_entries: int = 8,
    ):
        self.model, self.tokenizer = model, tokenizer
        # MLX streams are per thread (MLX >= 0.31.2): an array the model left lazy on this thread (RoPE's
        # frequencies are not parameters) cannot be evaluated on the worker's, so evaluate every one here.
        mx.eval(model.filter_and_map(lambda _module, _key, _value: True))
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.prompt_cache = PromptCache(prompt_cache_entries)
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: collections.deque[tuple[Job, Iterator[Event]]] = collections.deque()
        self._advancing = 0  # the request the worker is running now (1), which `_active` lacks meanwhile
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
                while self._waiting and len(self._active) < self.max_concurrent:
                    job = self._waiting.popleft()
                    if job.cancelled.is_set():  # its client left while it waited
                        job._emit(None)
                        continue
                    # A newcomer goes first: its wait for a first canvas is the canvas in progress, not a round.
                    self._active.appendleft((job, self._run(job)))
                if not self._active:
                    continue
                job, events = self._active.popleft()
                self._advancing = 1  # off `_active` while it runs, but still a request being served
            more = self._advance(job, events)
            with self._wake:
                self._advancing = 0
                if more:
                    self._active.append((job, events))
        for job, events in self._active:
            events.close()
            job._emit(Failed("the server is shutting down"))
            job._emit(None)

    def _advance(self, job: Job, events: Iterator[Event]) -> bool:
        """Run `job` up to its next committed canvas (or encoded prompt chunk); whether it has more to do."""
        try:
            if job.cancelled.is_set():
                events.close()
                job._emit(None)
                return False
            for event in events:
                if job.cancelled.is_set():
                    events.close()
                    job._emit(None)
                    return False
                job._emit(event)
                if isinstance(event, (Done, FillDone)):
                    job._emit(None)
                    return False
                if isinstance(event, (Commit, Encoded)):
                    return True
        except Exception as error:  # a failure ends this request, never the server
            job._emit(Failed(_one_line(error)))
            job._emit(None)
            return False
        job._emit(None)
        return False

    def _run(self, job: Job) -> Iterator[Event]:
        """A job's events: its prompt encoded (reusing a cached prefix), then its canvases."""
        stats = GenerationStats()
        cache = yield from self._encoded(job, stats)
        noise = SeededNoise(job.settings.seed)
        if job.slots is None:
            turn = Turn(self.model, self.tokenizer, job.settings, noise)
            turn.stats = stats
            yield from turn.run(cache, drafts=True)
            yield Done(turn.result())
            return
        yield from self._fill(job, cache, noise, stats)

    def _encoded(self, job: Job, stats: GenerationStats) -> Iterator[Event]:
        """Encode what the prompt cache lacks, a chunk at a time, the end of each chunk but the last a turn for
        the next request (a long prompt does not hold the others up); returns the cache."""
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
        begin = reused
        for end in ends:
            if begin > reused:
                yield Encoded(begin)
            encode_chunk(self.model, cache, ids, begin, end, spans, job.images)
            if end == job.keep_prefix:
                self.prompt_cache.store(key[:end], cache)
            begin = end
        elapsed = time.perf_counter() - start
        stats.prompt_tokens = len(ids) - reused
        stats.prompt_tps = stats.prompt_tokens / elapsed if elapsed > 0 else 0.0
        self.prompt_cache.store(key, cache)
        return cache

    def _fill(self, job: Job, cache: EncoderCache, noise: SeededNoise, stats: GenerationStats) -> Iterator[Event]:
        slots = fill_layout(self.model, job.prompt_ids, job.slots, job.settings)
        tokens: list[int] = []
        begin = time.perf_counter()
        for result in fill_canvases(self.model, cache, slots, job.settings, noise, drafts=True):
            if isinstance(result, StepDraft):
                text = self.tokenizer.decode(result.argmax[0].tolist(), skip_special_tokens=True)
                yield Draft(result.canvas, result.step, text)
                continue
            assert isinstance(result, CanvasResult)
            row = result.tokens[0].tolist()
            tokens += row
            stats.canvases += 1
            stats.denoising_steps += result.steps[0]
            stats.positions_forwarded += result.forwarded
            if not result.finished[0]:  # a turn for the others; after the last canvas, the holes come at once
                yield Commit("", "", row)
        holes = filled_holes(self.model, slots, tokens)
        stats.record_generation(sum(len(hole) for hole in holes), time.perf_counter() - begin)
        yield FillDone([self.tokenizer.decode(hole, skip_special_tokens=True) for hole in holes], stats)


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
