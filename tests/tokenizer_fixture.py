"""A small, real Gemma-4-style tokenizer for tests.

``write_tokenizer(path, vocab_size)`` writes the tokenizer files a Gemma 4 checkpoint carries
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``) into a checkpoint directory,
sized for the tiny random-weight models the tests build.

What makes it Gemma-like:

* the same ``tokenizers`` pipeline ``transformers.GemmaTokenizer`` builds: spaces normalised to ``▁``
  (no dummy prefix), a BPE model with byte fallback over ``<0x00>`` … ``<0xFF>``, and the decoder
  ``Replace(▁→space) → ByteFallback → Fuse``, so any UTF-8 text round-trips and mlx-lm picks its
  SentencePiece streaming detokenizer for it, as for real Gemma checkpoints;
* Gemma's fixed low ids for ``<pad>``/``<eos>``/``<bos>``/``<unk>``/``<mask>`` (0–4), then the Gemma 4
  turn, thinking-channel, tool and media markers as single special tokens with fixed ids;
* merges learned deterministically from a small in-file English/code corpus fill the rest of the vocab.

The real Gemma 4 vocabulary puts the markers at other ids (``<|think|>`` 98, ``<|channel>`` 100,
``<channel|>`` 101, ``<|turn>`` 105, ``<turn|>`` 106, …); with a few hundred ids to spend we pack them
right after ``<mask>`` instead.  Code under test must look ids up by token string, never hard-code them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = [
    "BYTE_TOKENS",
    "CHAT_TEMPLATE",
    "FIRST_BYTE_ID",
    "SPECIAL_TOKENS",
    "SPECIAL_TOKEN_IDS",
    "build_tokenizer",
    "processor_config",
    "write_processor_config",
    "write_tokenizer",
]

# Fixed ids at the start of the vocabulary, in this order.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",  # 0
    "<eos>",  # 1
    "<bos>",  # 2
    "<unk>",  # 3
    "<mask>",  # 4
    "<|turn>",  # 5   start of a turn: <|turn>user\n … <turn|>\n
    "<turn|>",  # 6   end of a turn (the chat models' stop token)
    "<|think|>",  # 7   put at the top of the system turn to switch thinking on
    "<|channel>",  # 8   opens a channel: <|channel>thought\n … <channel|>
    "<channel|>",  # 9   closes it
    "<|tool>",  # 10  tool declaration, in the system turn
    "<tool|>",  # 11
    "<|tool_call>",  # 12  call:name{…}
    "<tool_call|>",  # 13
    "<|tool_response>",  # 14  response:name{…}
    "<tool_response|>",  # 15
    '<|"|>',  # 16  string delimiter inside tool declarations/calls
    "<|image>",  # 17
    "<image|>",  # 18
    "<|image|>",  # 19
    "<|audio>",  # 20
    "<audio|>",  # 21
    "<|audio|>",  # 22
    "<|video|>",  # 23
)
SPECIAL_TOKEN_IDS: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
FIRST_BYTE_ID = len(SPECIAL_TOKENS)
BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))
_FIRST_LEARNED_ID = FIRST_BYTE_ID + len(BYTE_TOKENS)
# Below this many learned pieces the "BPE" would be little more than bytes.
_MIN_LEARNED = 32

# Named special tokens as Gemma 4's tokenizer_config.json spells them.
_NAMED_TOKENS = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "think_token": "<|think|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "escape_token": '<|"|>',
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
}

# Training text for the merges: plain English plus a little Python, written for this fixture.
_CORPUS = """\
The model reads the prompt and then writes the answer one block at a time.
Each block starts as noise and the model refines it over a few steps until the tokens settle.
When the tokens in a block are stable and confident, the block is committed and the next one begins.
The prompt is encoded once, and the cache holds the keys and values for every committed token.
This is a test of the tokenizer. It should be small, fast, and the same every time it is built.
We want the common words of English to take fewer tokens than their bytes would.
The quick brown fox jumps over the lazy dog, and then the dog sleeps in the sun.
She said that the weather would be warm in the morning and cold in the evening.
There are three things to check: the ids of the special tokens, the chat template, and the round trip.
In the beginning there was a small model with a small vocabulary and a very large ambition.
It was not the fastest model in the world, but it was correct, and that was what mattered most.
If the answer is wrong, the test fails, and the person who wrote the code learns something new.
The user asks a question, the assistant thinks for a while, and then it gives a short answer.
Please write a function that returns the sum of the numbers in a list.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
How many days are there in a week? There are seven days in a week and twelve months in a year.
The system prompt tells the assistant to be helpful, honest, and brief in all of its answers.
A good test is one that could fail: it checks the thing that matters and nothing else.
Tokens are pieces of text. Some are whole words, some are parts of words, and some are single bytes.
The diffusion model writes many tokens in parallel, and then it keeps the ones it is sure about.
A turn belongs to the system, the user, or the model. The model may think before it answers the user.
Its thought goes in a separate channel, and the chat template removes old thoughts from the history.
Thinking can be switched on or off; with thinking off the model answers directly, without a thought.
Numbers, names, and dates are easy for people and hard for a small tokenizer with only a few merges.
Good morning! How are you today? I am well, thank you, and I hope that you are well too.
The train leaves the station at nine in the morning and arrives in the city before noon.
Water boils at one hundred degrees and freezes at zero, at least at the level of the sea.
def add(a, b):
    return a + b


def mean(values):
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)


class Counter:
    def __init__(self, start=0):
        self.count = start

    def step(self, n=1):
        self.count += n
        return self.count


for i in range(10):
    print(f"step {i}: {i * i}")

import json
with open("config.json") as f:
    config = json.load(f)
print(config["vocab_size"], config["hidden_size"])
"""


def _normalizer() -> normalizers.Normalizer:
    # Gemma: no dummy prefix, every space becomes ▁ before the model sees the text.
    return normalizers.Replace(" ", "▁")


def _train(budget: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn at most ``budget`` pieces (base characters + merges) from the corpus.

    Returns the learned vocabulary (piece -> rank, starting at 0) and the merges, in order.
    """
    text = _normalizer().normalize_str(_CORPUS)
    chars = Counter(text)
    # Keep the most common characters; a small vocabulary cannot afford the whole alphabet and the
    # rest fall back to bytes.  ▁ and \n are always kept, as in Gemma's vocabulary.
    alphabet_size = min(len(chars), max(24, budget // 3))
    ranked = sorted(chars, key=lambda c: (-chars[c], c))
    alphabet = sorted(set(ranked[:alphabet_size]) | {"▁", "\n"})

    trainer_tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    trainer_tok.normalizer = _normalizer()
    # Learn merges inside words only: ▁ starts a word, \n stands alone.
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Split("▁", behavior="merged_with_next"),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=budget,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
    )
    trainer_tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = dict(sorted(learned["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    return vocab, merges


def build_tokenizer(vocab_size: int = 384) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` ``write_tokenizer`` saves; exactly ``vocab_size`` ids."""
    budget = vocab_size - _FIRST_LEARNED_ID
    if budget < _MIN_LEARNED:
        raise ValueError(f"vocab_size must be at least {_FIRST_LEARNED_ID + _MIN_LEARNED}, got {vocab_size}")

    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *BYTE_TOKENS):
        vocab[tok] = len(vocab)
    learned, merges = _train(budget)
    for piece in learned:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    # Fill what the corpus could not with inert placeholders, as Gemma reserves <unusedN> ids, so that
    # every id a model of this vocab_size can emit decodes to something.
    n = 0
    while len(vocab) < vocab_size:
        vocab[f"<unused{n}>"] = len(vocab)
        n += 1
    assert len(vocab) == vocab_size

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = _normalizer()
    # What transformers.GemmaTokenizer installs; a no-op after the normaliser, kept for parity.
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = SPECIAL_TOKEN_IDS["<bos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


# Gemma 4-style chat template, written for this fixture (same rendering rules as Google's: <bos>; a
# system turn when thinking is on, tools are given or the first message is system/developer; <|think|>
# at its top when thinking is on; assistant -> model; earlier model turns lose their thinking channel;
# the generation prompt closes an empty thought channel when thinking is off, as the Gemma 4 26B-A4B and
# 31B templates do; E2B/E4B templates end at '<|turn>model\n'.  DiffusionGemma is built on 26B-A4B, but
# its own template was not available to compare against).
CHAT_TEMPLATE = r"""{#- Gemma 4-style chat template (test fixture). -#}
{%- macro tool_value(v, quote_keys) -%}
    {%- if v is string -%}
        {{- '<|"|>' + v + '<|"|>' -}}
    {%- elif v is boolean -%}
        {{- 'true' if v else 'false' -}}
    {%- elif v is none -%}
        {{- 'null' -}}
    {%- elif v is mapping -%}
        {{- '{' -}}
        {%- for k in v | sort -%}
            {{- ('<|"|>' + k + '<|"|>' if quote_keys else k) + ':' + tool_value(v[k], quote_keys) -}}
            {{- ',' if not loop.last -}}
        {%- endfor -%}
        {{- '}' -}}
    {%- elif v is sequence -%}
        {{- '[' -}}
        {%- for item in v -%}
            {{- tool_value(item, quote_keys) + (',' if not loop.last else '') -}}
        {%- endfor -%}
        {{- ']' -}}
    {%- else -%}
        {{- v | string -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro without_thoughts(text) -%}
    {%- set kept = namespace(text='') -%}
    {%- for chunk in text.split('<channel|>') -%}
        {%- set kept.text = kept.text + chunk.split('<|channel>')[0] -%}
    {%- endfor -%}
    {{- kept.text | trim -}}
{%- endmacro -%}
{%- macro content_of(content, role) -%}
    {%- if content is string -%}
        {{- without_thoughts(content) if role == 'model' else content | trim -}}
    {%- elif content is iterable -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' -%}
                {{- without_thoughts(part['text']) if role == 'model' else part['text'] | trim -}}
            {%- elif part['type'] == 'image' -%}
                {{- '\n\n<|image|>\n\n' -}}
            {%- elif part['type'] == 'video' -%}
                {{- '\n\n<|video|>\n\n' -}}
            {%- elif part['type'] == 'audio' -%}
                {{- '<|audio|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set state = namespace(last='', open_model_turn=false) -%}
{%- set rest = messages -%}
{{- bos_token -}}
{%- if thinking or tools or (messages and messages[0]['role'] in ['system', 'developer']) -%}
    {{- '<|turn>system\n' -}}
    {%- if thinking -%}
        {{- '<|think|>\n' -}}
    {%- endif -%}
    {%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
        {{- content_of(messages[0]['content'], 'system') -}}
        {%- set rest = messages[1:] -%}
    {%- endif -%}
    {%- for tool in tools or [] -%}
        {%- set fn = tool['function'] if 'function' in tool else tool -%}
        {{- '<|tool>declaration:' + fn['name'] -}}
        {{- tool_value({'description': fn['description'] or '', 'parameters': fn['parameters'] or {}}, false) -}}
        {{- '<tool|>' -}}
    {%- endfor -%}
    {{- '<turn|>\n' -}}
{%- endif -%}
{%- for message in rest -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {%- if role == 'tool' -%}
        {#- A tool result continues the model turn that asked for it. -#}
        {{- '<|tool_response>response:' + (message['name'] or 'unknown') -}}
        {%- if message['content'] is mapping -%}
            {{- tool_value(message['content'], false) -}}
        {%- else -%}
            {{- '{value:' + tool_value(message['content'], false) + '}' -}}
        {%- endif -%}
        {{- '<tool_response|>' -}}
        {%- set state.last = 'tool_response' -%}
    {%- else -%}
        {%- if not (role == 'model' and state.open_model_turn) -%}
            {%- if state.open_model_turn -%}
                {{- '<turn|>\n' -}}
            {%- endif -%}
            {{- '<|turn>' + role + '\n' -}}
        {%- endif -%}
        {%- set state.open_model_turn = false -%}
        {{- content_of(message['content'], role) -}}
        {%- if message['tool_calls'] -%}
            {%- for call in message['tool_calls'] -%}
                {%- set fn = call['function'] if 'function' in call else call -%}
                {{- '<|tool_call>call:' + fn['name'] -}}
                {{- fn['arguments'] if fn['arguments'] is string else tool_value(fn['arguments'] or {}, false) -}}
                {{- '<tool_call|>' -}}
            {%- endfor -%}
            {%- set state.open_model_turn = true -%}
            {%- set state.last = 'tool_call' -%}
        {%- else -%}
            {{- '<turn|>\n' -}}
            {%- set state.last = role -%}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {%- if state.last not in ['tool_call', 'tool_response'] -%}
        {{- '<|turn>model\n' -}}
        {%- if not thinking -%}
            {{- '<|channel>thought\n<channel|>' -}}
        {%- endif -%}
    {%- endif -%}
{%- elif state.open_model_turn -%}
    {{- '<turn|>\n' -}}
{%- endif -%}
"""


def _tokenizer_config() -> dict:
    cfg: dict = {
        "backend": "tokenizers",
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
        "extra_special_tokens": ["<|video|>"],
    }
    cfg.update(_NAMED_TOKENS)
    # Like transformers 5, no added_tokens_decoder: tokenizer.json's added_tokens hold the ids.
    return dict(sorted(cfg.items()))


def write_tokenizer(path: Path, vocab_size: int = 384) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` into ``path``.

    ``path`` is created if needed; returns it.  The tokenizer has exactly ``vocab_size`` ids (>= 312).
    Loads with ``transformers.AutoTokenizer.from_pretrained(path)`` and ``mlx_lm.utils.load_tokenizer(path)``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def processor_config(max_soft_tokens: int = 280, patch_size: int = 16, pooling_kernel_size: int = 3) -> dict:
    """``processor_config.json`` as Gemma 4 checkpoints carry it: the image processor's settings, nested."""
    image_processor = {
        "do_convert_rgb": True,
        "do_normalize": False,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_processor_type": "Gemma4ImageProcessor",
        "image_seq_length": max_soft_tokens,
        "image_std": [1.0, 1.0, 1.0],
        "max_soft_tokens": max_soft_tokens,
        "patch_size": patch_size,
        "pooling_kernel_size": pooling_kernel_size,
        "resample": 3,
        "rescale_factor": 1 / 255,
    }
    return {
        "image_processor": image_processor,
        "image_seq_length": max_soft_tokens,
        "processor_class": "Gemma4Processor",
    }


def write_processor_config(path: Path, **settings: int) -> Path:
    """Write ``processor_config.json`` (see ``processor_config``) into ``path``; returns the file's path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    target = path / "processor_config.json"
    target.write_text(json.dumps(processor_config(**settings), indent=2) + "\n")
    return target
