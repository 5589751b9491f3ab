"""Fast mode (speed="fast"): the decoder over the live canvas positions only; settled ones keep their states.

Exact mode stays the default and untouched (the parity suites); here fast mode's own promises: a live pass
computes what a whole pass computes at those positions, fast mode that settles nothing is exact mode token for
token, it forwards fewer positions where they settle, pinned positions are never live, live counts come in
buckets, and the CLI, chat and server pass the choice through.
"""

from __future__ import annotations

import json

import httpx
import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_reference_model, save_reference_checkpoint
from serve_fixtures import LiveServer
from tokenizer_fixture import write_tokenizer

import mlx_dgemma
from mlx_dgemma import Chat, FastSettings, SamplerSettings, SeededNoise, edit, fill_template, generate, infill
from mlx_dgemma.cli import common
from mlx_dgemma.cli.chat import ChatRepl
from mlx_dgemma.fast import _live_decisions, bucketed, live_positions
from mlx_dgemma.sampler import (
    BlockSampler,
    Pins,
    StepState,
    _step_decisions,
    accepted_positions,
    linear_temperature,
)
from mlx_dgemma.serve.app import create_app
from mlx_dgemma.serve.engine import Engine

NEVER = FastSettings(settle_entropy=0.0)  # nothing ever settles: every step forwards the whole canvas


@pytest.fixture(scope="module")
def flat_path(tmp_path_factory):
    """The tests' usual tiny checkpoint (final norm ×4): flat logits, near-ties, every code path."""
    path = save_reference_checkpoint(build_reference_model(seed=5, canvas_length=16), tmp_path_factory.mktemp("flat"))
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def flat(flat_path):
    return mlx_dgemma.load(flat_path)


class Certain:
    """The real decoder with its logits pushed toward a fixed reply, harder at later positions: a model that knows
    its answer, whose positions settle one after another as a trained model's do. (A random checkpoint cannot show
    fast mode keeping the text: random weights are chaotic, and in exact mode itself 0.1% noise on the logits
    changes most of a canvas.)"""

    def __init__(self, model, reply: mx.array, boost: mx.array):
        self._model, self.reply, self.boost = model, reply, boost

    def __getattr__(self, name):
        return getattr(self._model, name)

    def denoise(self, canvas, cache, conditioning=None, positions=None):
        logits = self._model.denoise(canvas, cache, conditioning, positions=positions)
        at = mx.broadcast_to(mx.arange(canvas.shape[1])[None], canvas.shape) if positions is None else positions
        vocab = logits.shape[-1]
        return logits + (mx.arange(vocab) == self.reply[at][..., None]) * self.boost[at][..., None]


@pytest.fixture(scope="module")
def certain(flat):
    model, _ = flat
    rng = np.random.default_rng(0)
    return Certain(model, mx.array(rng.integers(3, 380, 16)), mx.array(np.linspace(4, 16, 16, dtype=np.float32)))


class Passes:
    """Wraps model.denoise to record each pass's forwarded positions (None: the whole canvas)."""

    def __init__(self, model):
        self.model, self.positions = model, []
        self._denoise = model.denoise

    def __enter__(self):
        def recording(canvas, cache, conditioning=None, positions=None):
            self.positions.append(None if positions is None else np.array(positions))
            return self._denoise(canvas, cache, conditioning, positions=positions)

        self.model.denoise = recording
        return self

    def __exit__(self, *exc):
        del self.model.denoise

    @property
    def sizes(self) -> list[int | None]:
        return [None if positions is None else positions.shape[1] for positions in self.positions]


def canvases(model, settings: SamplerSettings, prompt: np.ndarray, seed: int) -> list:
    cache = model.make_cache()
    model.encode(mx.array(prompt), cache)
    return list(BlockSampler(model, settings, SeededNoise(seed)).canvases(cache, prompt.shape[0]))


# ---------------------------------------------------------------- the model and the decisions


def test_a_live_pass_is_the_whole_pass_at_its_positions(flat):
    """With the others' states from a whole pass over the same canvas, a pass over some positions (any order, each
    row its own) gives exactly the whole pass's logits there."""
    model, _ = flat
    rng = np.random.default_rng(0)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(3, 380, (2, 20))), cache)
    canvas = mx.array(rng.integers(3, 380, (2, 16)))
    conditioning = mx.array(rng.normal(size=(2, 16, 384)).astype(np.float32))
    whole = model.denoise(canvas, cache, conditioning)
    for positions in ([[0, 3, 4, 9, 15], [7, 1, 2, 14, 5]], [list(range(16))[::-1], list(range(16))]):
        positions = mx.array(positions)
        live = model.denoise(
            mx.take_along_axis(canvas, positions, axis=1),
            cache,
            mx.take_along_axis(conditioning, positions[..., None], axis=1),
            positions=positions,
        )
        expected = mx.take_along_axis(whole, positions[..., None], axis=1)
        np.testing.assert_allclose(np.array(live), np.array(expected), rtol=0, atol=1e-5)
    # The cache itself is unchanged: the prompt's states are where they were.
    assert cache.offset == 20 and all(layer.length == min(20, layer.keep or 20) for layer in cache.layers)


def test_a_live_pass_needs_a_whole_pass_first(flat):
    model, _ = flat
    cache = model.make_cache()
    model.encode(mx.array([[5, 6, 7]]), cache)
    with pytest.raises(ValueError, match="whole canvas comes first"):
        model.denoise(mx.array([[5]]), cache, None, positions=mx.array([[0]]))


def test_live_decisions_over_every_position_are_exact_modes():
    """Given every position's fresh logits (in any order), a live step decides exactly as exact mode does."""
    rng = np.random.default_rng(3)
    batch, length, vocab = 2, 12, 50
    logits = mx.array(rng.normal(scale=4, size=(batch, length, vocab)).astype(np.float32))
    gumbel = mx.array(rng.gumbel(size=(batch, length, vocab)).astype(np.float32))
    fresh = mx.array(rng.integers(0, vocab, (batch, length)))
    previous = mx.array(rng.integers(0, vocab, (batch, length)))
    history = mx.full((1, batch, length), -1, dtype=mx.int32)
    temperature = mx.array(0.6)
    state = StepState(previous, previous, None, mx.zeros((batch,), dtype=mx.bool_), history)
    expected = _step_decisions(logits, temperature, gumbel, fresh, state, None, None, 0.5, 0.005, mx.float32)
    positions = mx.array(np.stack([rng.permutation(length) for _ in range(batch)]))
    stale = StepState(
        previous,
        previous,
        None,
        state.finished,
        history,
        mx.zeros((batch, length, vocab)),
        None,
        mx.zeros((batch, length)),
        mx.zeros((batch, length), dtype=mx.int32),
    )
    live = _live_decisions(
        mx.take_along_axis(logits, positions[..., None], axis=1),
        positions,
        temperature,
        mx.take_along_axis(gumbel, positions[..., None], axis=1),
        fresh,
        stale,
        (None, None),
        (0.5, 0.005),
        (2, 1e-3),
    )
    canvas, argmax, finished, _, merged, *_ = live
    np.testing.assert_array_equal(np.array(canvas), np.array(expected.canvas))
    np.testing.assert_array_equal(np.array(argmax), np.array(expected.argmax))
    np.testing.assert_array_equal(np.array(finished), np.array(expected.finished))
    np.testing.assert_array_equal(np.array(merged), np.array(logits))
    assert 0 < np.array(accepted_positions(mx.zeros((1, 4)), 0.1)).sum()


def test_seeded_noise_rows_are_the_whole_draws_rows():
    noise = SeededNoise(11)
    shape = (2, 9, 40)
    positions = mx.array([[8, 0, 3], [2, 2, 5]])
    whole = noise.gumbel(3, 4, shape)
    np.testing.assert_array_equal(
        np.array(noise.gumbel_rows(3, 4, shape, positions)),
        np.array(mx.take_along_axis(whole, positions[..., None], axis=1)),
    )


def test_live_positions_and_buckets():
    settled = mx.array([[True, False, True, True, False, True]])
    streak = mx.array([[5, 0, 2, 9, 0, 3]])
    pinned = mx.array([[False, False, False, True, False, False]])
    # Live first, then the most recently settled; pinned last.
    assert sorted(np.array(live_positions(settled, streak, pinned, 3))[0].tolist()[:2]) == [1, 4]
    assert np.array(live_positions(settled, streak, pinned, 3))[0, 2] == 2
    assert np.array(live_positions(settled, streak, pinned, 6))[0, 5] == 3
    assert [bucketed(n, 32, 256) for n in (0, 1, 32, 33, 250)] == [32, 32, 32, 64, 256]
    assert bucketed(40, 32, 50) == 50


# ---------------------------------------------------------------- the sampler


def test_settling_nothing_is_exact_mode_token_for_token(flat):
    """Thresholds that settle nothing: every step forwards the whole canvas, and the canvases, steps and counts
    are exact mode's. A constrained canvas's pinned positions are settled all the same: with a refresh at every
    step, it is exact mode's too."""
    model, _ = flat
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, 380, (2, 14))
    exact = SamplerSettings(steps=10, max_new_tokens=32)
    never = exact.updated(speed="fast", fast=NEVER)
    with Passes(model) as passes:
        fast_results = canvases(model, never, prompt, seed=4)
    exact_results = canvases(model, exact, prompt, seed=4)
    assert all(size is None for size in passes.sizes)
    for ours, theirs in zip(fast_results, exact_results, strict=True):
        np.testing.assert_array_equal(np.array(ours.tokens), np.array(theirs.tokens))
        assert ours.steps == theirs.steps and ours.forwarded == theirs.forwarded

    pins = Pins(mx.array(rng.random((1, 16)) < 0.3), mx.array(rng.integers(3, 380, (1, 16))))
    results = []
    for settings in (exact, never.updated(fast=FastSettings(settle_entropy=0.0, refresh_every=1))):
        cache = model.make_cache()
        model.encode(mx.array(prompt[:1]), cache)
        results.append(next(BlockSampler(model, settings, SeededNoise(2)).pinned_canvases(cache, [pins])))
    np.testing.assert_array_equal(np.array(results[0].tokens), np.array(results[1].tokens))


def test_fast_mode_forwards_fewer_positions_and_keeps_the_text(certain):
    """Where positions settle, fast mode forwards far fewer of them and commits the same canvas."""
    exact = SamplerSettings(steps=48, max_new_tokens=16)
    fast = exact.updated(speed="fast", fast=FastSettings(bucket=2))
    shared, forwarded, whole = [], 0, 0
    for seed in range(3):
        prompt = np.random.default_rng(seed).integers(3, 380, (1, 12))
        [ours], [theirs] = canvases(certain, fast, prompt, seed), canvases(certain, exact, prompt, seed)
        shared.append((np.array(ours.tokens) == np.array(theirs.tokens)).mean())
        forwarded, whole = forwarded + ours.forwarded, whole + theirs.forwarded
    assert forwarded < 0.6 * whole, (forwarded, whole)
    assert np.mean(shared) >= 0.95, shared


def test_pinned_positions_are_never_live(flat):
    """A constrained canvas: after the first step no pass forwards a pinned position, save whole-canvas passes
    (refreshes and the final pass), and with those off none at all."""
    model, _ = flat
    rng = np.random.default_rng(2)
    pinned = np.zeros((1, 16), dtype=bool)
    pinned[0, 6:] = True  # a hole of six, then a pinned suffix
    pins = Pins(mx.array(pinned), mx.array(rng.integers(3, 380, (1, 16))))
    loose = FastSettings(settle_entropy=10.0, settle_steps=1, bucket=2, refresh_every=0, final_pass=False)
    settings = SamplerSettings(steps=12, speed="fast", fast=loose)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(3, 380, (1, 10))), cache)
    with Passes(model) as passes:
        [result] = list(BlockSampler(model, settings, SeededNoise(3)).pinned_canvases(cache, [pins]))
    assert passes.positions[0] is None and len(passes.positions) > 1
    for positions in passes.positions[1:]:
        assert positions is not None and not pinned[0, positions[0]].any(), positions
    np.testing.assert_array_equal(np.array(result.tokens)[pinned], np.array(pins.tokens)[pinned])


def test_live_counts_come_in_buckets(certain):
    """Each pass forwards the whole canvas or a multiple of the bucket: a canvas's passes reuse a few shapes."""
    settings = SamplerSettings(steps=48, max_new_tokens=32, speed="fast", fast=FastSettings(bucket=4))
    with Passes(certain) as passes:
        results = canvases(certain, settings, np.random.default_rng(4).integers(3, 380, (1, 12)), seed=4)
    sizes = passes.sizes
    assert None in sizes and any(size is not None for size in sizes)
    assert {size for size in sizes if size is not None} <= {4, 8, 12}
    steps = sum(result.steps[0] for result in results)
    assert sum(result.forwarded for result in results) < steps * 16


# ---------------------------------------------------------------- the API, the command line and the server


def test_generate_chat_and_infill_take_speed(flat):
    model, tokenizer = flat
    exact = generate(model, tokenizer, "Hello there.", max_new_tokens=16, steps=6, seed=2)
    never = generate(model, tokenizer, "Hello there.", max_new_tokens=16, steps=6, seed=2, speed="fast", fast=NEVER)
    assert never.tokens == exact.tokens
    fast = generate(model, tokenizer, "Hello there.", max_new_tokens=16, steps=6, seed=2, speed="fast")
    assert 0 < fast.stats.positions_forwarded and fast.stats.generation_tokens == len(fast.tokens)
    filled = infill(model, tokenizer, "def f(x):\n    return ", "\n", hole_tokens=6, steps=6, speed="fast")
    assert filled.text.startswith("def f(x):\n    return ") and filled.stats.positions_forwarded > 0
    record = fill_template(model, tokenizer, "A name?", '{"name": "{{hole:3}}"}', steps=4, speed="fast")
    assert record.text.startswith('{"name": "') and record.text.endswith('"}')
    edited = edit(model, tokenizer, "x = 1\ny = 2\n", 4, 5, steps=4, speed="fast")
    assert edited.text.startswith("x = ") and edited.text.endswith("\ny = 2\n")
    chat = Chat(model, tokenizer, steps=4, max_new_tokens=16)
    repl = ChatRepl(chat, __import__("io").StringIO(), live=False, interactive=False)
    repl.command("/set speed=fast")
    assert chat.settings.speed == "fast"
    assert "speed=fast" in repl.describe_settings()
    with pytest.raises(ValueError, match="speed must be one of exact, fast"):
        generate(model, tokenizer, "Hi", speed="turbo")


def test_the_fast_flag_and_speed_assignments():
    assert common.sampler_params(None, None, None, None, fast=True) == {"speed": "fast"}
    assert common.parse_assignments(["speed=FAST", "steps=3"]) == {"speed": "fast", "steps": 3}
    with pytest.raises(ValueError, match="speed must be one of exact, fast, got 'quick'"):
        common.parse_assignments(["speed=quick"])


def test_generate_fast_on_the_command_line(flat_path, capsys):
    from mlx_dgemma import cli

    arguments = ["generate", "--model", str(flat_path), "--steps", "4", "--max-tokens", "16", "--seed", "1", "--json"]
    assert cli.main([*arguments, "Say hi."]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert cli.main([*arguments, "--fast", "Say hi."]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["stats"]["generation_tokens"] == len(fast["tokens"]) > 0
    assert exact["stats"]["positions_forwarded"] == exact["stats"]["denoising_steps"] * 16


def _encoded(model, seed: int):
    cache = model.make_cache()
    model.encode(mx.array(np.random.default_rng(seed).integers(3, 380, (1, 12))), cache)
    return cache


def test_the_reveal_sampler_reveals_everything_it_may_at_once(certain):
    from bench.reveal import reveal_canvas

    settings = SamplerSettings(max_new_tokens=16)
    cache = _encoded(certain, 3)
    run = reveal_canvas(certain, cache, settings, seed=3, threshold=1e-6, bucket=4)
    assert (run["steps"], run["forwarded"]) == (1, 16)
    # Every position takes its first draw: the first step's logits at its temperature, with exact mode's noise.
    logits = certain.denoise(SeededNoise(3).tokens(0, 0, (1, 16), certain.text_config.vocab_size), cache)
    temperature = linear_temperature(settings.steps, settings)
    draws = mx.argmax(logits / temperature + SeededNoise(3).gumbel(0, 1, logits.shape), axis=-1)
    np.testing.assert_array_equal(run["tokens"], np.array(draws[0]))


def test_the_reveal_sampler_forwards_what_is_not_revealed_and_what_was_just_revealed(flat):
    from bench.reveal import reveal_canvas

    model, _ = flat
    # No draw of these flat logits is certain: one position is revealed a step, the most confident one.
    with Passes(model) as passes:
        run = reveal_canvas(model, _encoded(model, 4), SamplerSettings(max_new_tokens=16), 4, 1.0, bucket=1)
    assert run["steps"] == 16
    # Step k > 1 forwards the 17 - k positions not yet revealed and the one the step before revealed.
    assert passes.sizes == [None, *(18 - k for k in range(2, 17))]
    assert run["forwarded"] == 16 + sum(18 - k for k in range(2, 17))
    revealed_after = [set(np.setdiff1d(np.arange(16), passes.positions[k][0])) for k in range(2, 16)]
    assert all(earlier <= later for earlier, later in zip(revealed_after, revealed_after[1:]))


def test_bench_quality_runs_on_a_tiny_checkpoint(flat_path, capsys, tmp_path):
    """Random weights score nothing; the run proves every task is made, run in both modes and checked."""
    from bench import quality

    out = tmp_path / "quality.json"
    arguments = ["--model", str(flat_path), "--per-task", "1", "--steps", "3", "--max-tokens", "16", "--json", str(out)]
    assert quality.main(arguments) == 0
    table = capsys.readouterr().out
    for task in ("arithmetic", "copy", "json template", "infill a function body", "counted list", "all"):
        assert f"| {task} | " in table, table
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 and all(0 <= row["shared"] <= 1 for row in rows)
    assert quality.computes("a*a + b*b", "a * a + b * b") and not quality.computes("a ** 99 ** 99", "a")
    assert not quality.computes("__import__('os')", "a")


def test_bench_fast_quick_runs(tmp_path, capsys):
    from bench import fast

    arguments = ["--quick", "--prompts", "1", "--no-openblas", "--out", str(tmp_path)]
    checkpoints = ["--checkpoints", "confident,flat,ordered,trained-ends", "--training-steps", "3"]
    assert fast.main([*arguments, *checkpoints, "--variant", "bucket=4,refresh_every=0", "--reveal", "0.9"]) == 0
    table = capsys.readouterr().out
    assert "| confident (final norm ×11, well conditioned) | exact |" in table
    assert "| flat (final norm ×4) | fast bucket=4" in table
    assert "| ordered (final norm ×11, well conditioned, feed-forward ×0.3) | exact |" in table
    trained = "trained-ends (Markov language, answers ending with chance 1/64 a token, 3 steps, canvas 64)"
    assert f"| {trained} | exact | " in table and f"| {trained} | fast bucket=4, refresh_every=0 | " in table
    assert f"| {trained} | another sampler: revealed for good at p ≥ 0.9 | " in table
    assert f"| {trained} | exact, another seed | " in table
    assert "| positions forwarded | first step, ms |" in table
    assert "Exact mode, confident (final norm ×11, well conditioned): " in table and "change their argmax" in table
    assert "the first step predicts the random token a position started with at " in table
    assert "a position's argmax takes its final value after " in table
    assert "of the positions read another token than at the step before" in table
    assert "Tokens/s against exact mode had each step cost what the 'quick' shape's does" in table
    results = json.loads((tmp_path / "quick.json").read_text())["results"]
    own_noise = [row["own_noise"] for rows in results.values() for row in rows if row["variant"] == "exact"]
    assert len(own_noise) == 4 and all(0 <= share <= 1 for pair in own_noise for share in pair)
    exact_rows = [row for rows in results.values() for row in rows if row["variant"] == "exact"]
    assert all(1 / row["steps"] <= row["inputs_changing"] <= 1 for row in exact_rows)  # the first step: every one
    valid = [row["valid"] for row in results[trained]]
    assert len(valid) == 5 and all(0 <= share <= 1 for share in valid)
    revealed = [row for rows in results.values() for row in rows if row["variant"] == "reveal 0.9"]
    assert len(revealed) == 4 and all(row["forwarded"] <= row["steps"] * 64 for row in revealed)
    assert all(row["valid"] is None for row in results["flat (final norm ×4)"])
    with pytest.raises(SystemExit, match="unknown learned"):
        fast.main([*arguments, "--checkpoints", "confident,learned"])
    with pytest.raises(SystemExit):
        fast.main([*arguments, "--reveal", "1.5"])
    assert "--reveal takes a probability in (0, 1]" in capsys.readouterr().err


def test_the_trained_checkpoints_language():
    """The bench's Markov language: its own text is valid, answers end with fill (what follows is not read), other
    pairs are not."""
    from bench.trained import FILL, FIRST_SYMBOL, PROMPT_TOKENS, SYMBOLS, MarkovLanguage

    rng = np.random.default_rng(0)
    text, answers = MarkovLanguage.seeded(), MarkovLanguage.seeded(ending=1 / 8)
    assert text.valid(np.array(text.example(rng, 64))) == 1.0
    lengths = [len(answers.example(rng, 64)) - PROMPT_TOKENS for _ in range(50)]
    assert min(lengths) >= 1 and max(lengths) <= 64 and np.mean(lengths) < 16
    sample = np.array(answers.example(rng, 64))
    ended = np.append(sample, [FILL, 0, 0])
    assert answers.valid(ended) == 1.0 and text.valid(ended) < 1.0
    assert answers.valid(np.array([FILL, sample[0]])) == 0.0  # nothing follows an end
    successors = set(text.successors[sample[0] - FIRST_SYMBOL].tolist())
    stranger = next(token for token in range(FIRST_SYMBOL, FIRST_SYMBOL + SYMBOLS) if token not in successors)
    assert text.valid(np.array([sample[0], stranger])) == 0.0


def test_the_trained_checkpoint_is_the_same_from_every_clone(tmp_path):
    """Training is seeded throughout: two builds of the bench's trained checkpoint write the same weights, so what
    bench/RESULTS.md reports for it is what a fresh clone trains on the same machine."""
    from bench.trained import MarkovLanguage, checkpoint

    language = MarkovLanguage.seeded(ending=1 / 8)
    first, second = (checkpoint(tmp_path / name, language, steps=2) for name in ("a", "b"))
    assert first.name == second.name and not list(tmp_path.rglob("*.partial"))
    weights = [(path / "model.safetensors").read_bytes() for path in (first, second)]
    assert weights[0] == weights[1]
    losses = json.loads((first / "training.json").read_text())["losses"]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_the_server_takes_speed_under_concurrent_requests(flat):
    """ "speed": "fast" on each API's route: concurrent fast requests each get what the library gives alone;
    a bad value is a 400 naming the field."""
    model, tokenizer = flat
    engine = Engine(model, tokenizer, max_concurrent=4)
    chat_body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 32, "steps": 5, "seed": 7}
    fill_body = {"prompt": "def f(x):\n    return ", "suffix": "\n", "max_tokens": 8, "steps": 5, "seed": 8}
    requests = [
        ("/v1/chat/completions", {**chat_body, "speed": "fast"}),
        ("/v1/completions", {**fill_body, "speed": "fast"}),
        (
            "/api/generate",
            {
                "prompt": "Count.",
                "stream": False,
                "options": {"seed": 9, "num_predict": 16, "steps": 5, "speed": "fast"},
            },
        ),
        (
            "/infill",
            {"input_prefix": "x = ", "input_suffix": "\n", "n_predict": 6, "steps": 5, "seed": 3, "speed": "fast"},
        ),
    ]
    expected_chat = generate(
        model, tokenizer, chat_body["messages"], max_new_tokens=32, steps=5, seed=7, speed="fast"
    ).text
    expected_fill = infill(model, tokenizer, fill_body["prompt"], "\n", 8, steps=5, seed=8, speed="fast").fills[0]
    try:
        with LiveServer(create_app(engine, "m")) as live:
            import asyncio

            async def send_all():
                async with httpx.AsyncClient(base_url=live.url, timeout=120) as session:
                    return await asyncio.gather(*(session.post(path, json=body) for path, body in requests))

            responses = asyncio.run(send_all())
            assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
            assert responses[0].json()["choices"][0]["message"]["content"] == expected_chat
            assert responses[1].json()["choices"][0]["text"] == expected_fill
            bad = httpx.post(f"{live.url}/v1/chat/completions", json={**chat_body, "speed": "turbo"}, timeout=60)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "speed"
    finally:
        engine.close()
