"""Constrained canvases: pinned positions, infill, templates and span edits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_reference_model, save_reference_checkpoint
from tokenizer_fixture import write_tokenizer

import mlx_dgemma
from mlx_dgemma.constrained import edit, fill_template, infill, parse_template
from mlx_dgemma.sampler import BlockSampler, Pins, SamplerSettings, SeededNoise, StepDraft
from mlx_dgemma.tokenizer import encode_text

CANVAS = 16


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = save_reference_checkpoint(build_reference_model(seed=31), tmp_path_factory.mktemp("infill"))
    write_tokenizer(path)
    return mlx_dgemma.load(path)


class Recorder:
    """Wraps the decoder call (model.denoise) to record every canvas the model is given."""

    def __init__(self, model):
        self.model, self.inputs = model, []
        self._denoise = model.denoise

    def __enter__(self):
        def recording(canvas, cache, *args, **kwargs):
            self.inputs.append(np.array(canvas))
            return self._denoise(canvas, cache, *args, **kwargs)

        self.model.denoise = recording
        return self

    def __exit__(self, *exc):
        del self.model.denoise


def test_pinned_positions_never_change(loaded):
    model, _ = loaded
    rng = np.random.default_rng(0)
    pinned = rng.random((2, CANVAS)) < 0.4
    tokens = rng.integers(30, 380, size=(2, CANVAS))
    settings = SamplerSettings(steps=9, max_new_tokens=CANVAS)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(30, 380, size=(2, 10))), cache)
    with Recorder(model) as recorder:
        events = list(
            BlockSampler(model, settings, SeededNoise(1)).pinned_canvases(
                cache, [Pins(mx.array(pinned), mx.array(tokens))], drafts=True
            )
        )
    drafts = [np.array(event.argmax) for event in events if isinstance(event, StepDraft)]
    results = [event for event in events if not isinstance(event, StepDraft)]
    assert len(recorder.inputs) == 9 and len(drafts) == 9
    for seen in recorder.inputs + drafts + [np.array(results[0].tokens)]:
        np.testing.assert_array_equal(seen[pinned], tokens[pinned])
    # The free positions were denoised, not left as they began.
    assert (recorder.inputs[0][~pinned] != np.array(results[0].tokens)[~pinned]).any()


def test_nothing_pinned_is_the_plain_sampler(loaded):
    model, _ = loaded
    prompt = mx.array(np.random.default_rng(1).integers(30, 380, size=(2, 12)))
    settings = SamplerSettings(steps=8, max_new_tokens=CANVAS)
    plain_cache, pinned_cache = model.make_cache(), model.make_cache()
    model.encode(prompt, plain_cache)
    model.encode(prompt, pinned_cache)
    plain = next(BlockSampler(model, settings, SeededNoise(2)).canvases(plain_cache, 2))
    nothing = Pins(mx.zeros((2, CANVAS), dtype=mx.bool_), mx.zeros((2, CANVAS), dtype=mx.int32))
    pinned = next(BlockSampler(model, settings, SeededNoise(2)).pinned_canvases(pinned_cache, [nothing]))
    np.testing.assert_array_equal(np.array(plain.tokens), np.array(pinned.tokens))
    assert plain.steps == pinned.steps


def test_fill_template_keeps_fixed_text_and_fills_holes(loaded):
    model, tokenizer = loaded
    template = '{"name": "{{hole:5}}", "age": {{hole:3}}}'
    result = fill_template(model, tokenizer, "Describe a person as JSON.", template, steps=6)
    assert len(result.fills) == 2
    assert result.text == '{"name": "' + result.fills[0] + '", "age": ' + result.fills[1] + "}"
    assert len(result.tokens) <= 8 and result.stats.canvases >= 1


def test_infill_spans_several_canvases(loaded):
    model, tokenizer = loaded
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    result = infill(model, tokenizer, prefix, suffix, hole_tokens=2 * CANVAS + 5, steps=4)
    assert result.stats.canvases == 3
    assert result.text.startswith(prefix) and result.text.endswith(suffix)
    assert result.text == prefix + result.fills[0] + suffix
    assert 0 < len(result.tokens) <= 2 * CANVAS + 5


def test_edit_starts_from_the_existing_tokens(loaded):
    model, tokenizer = loaded
    text = "The quick brown fox jumps over the lazy dog."
    start, end = text.index("quick"), text.index(" jumps")
    with Recorder(model) as recorder:
        result = edit(model, tokenizer, text, start, end, steps=5, slack=2)
    span_ids = encode_text(tokenizer, text[start:end])
    assert recorder.inputs[0][0, : len(span_ids)].tolist() == span_ids
    assert result.text.startswith("The ") and result.text.endswith(" jumps over the lazy dog.")
    assert result.text == "The " + result.fills[0] + text[end:]
    instructed = edit(model, tokenizer, text, start, end, instruction="Make it slower.", steps=3)
    assert instructed.text.endswith(text[end:])


def test_eos_and_pad_in_free_positions_mean_nothing(loaded):
    model, tokenizer = loaded
    vocab = model.text_config.vocab_size
    eos = model.generation_settings.eos_token_ids[0]
    always_eos = mx.full((vocab,), -30.0).at[eos].add(60.0)

    # A head that always predicts EOS: every free position's draw and argmax is EOS.
    model.logits = lambda hidden: mx.broadcast_to(always_eos, (*hidden.shape[:2], vocab))
    try:
        result = fill_template(model, tokenizer, "x", "A{{hole:4}}B", steps=3)
    finally:
        del model.logits
    assert result.fills == [""] and result.text == "AB" and result.tokens == []


@pytest.mark.parametrize(
    "template, message",
    [
        ("no markers here", "no {{hole:N}} markers"),
        ("{{hole:0}}", "positive"),
        ("a {{hole:x}} b", "malformed"),
        ("a {{ hole }} b", "malformed"),
        ("{{hole:3}} and {{hole: 4}}", "malformed"),
    ],
)
def test_bad_template_markers(template, message):
    with pytest.raises(ValueError, match=message):
        parse_template(template)


@pytest.mark.parametrize("start, end", [(5, 2), (-1, 3), (0, 999)])
def test_bad_edit_spans(loaded, start, end):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="bad span"):
        edit(model, tokenizer, "short text", start, end)


def test_bad_hole_size(loaded):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="hole_tokens"):
        infill(model, tokenizer, "a", "b", hole_tokens=0)
