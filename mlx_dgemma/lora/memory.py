"""What a LoRA training run needs in memory, worked out before the model loads, and what would fit instead.

Everything comes from config.json and the safetensors headers (`mlx_dgemma.memory`), never from tensor data.
For a batch of B sequences of up to L tokens (prompt and response; R of them response tokens, whose next-token
logits the autoregressive term reads), the canvas C, the vocabulary V, the activation dtype's b bytes:

    weights          the tensors as stored (quantized or float; config.json's quantization block when there are
                     no weights yet), as the load-time check counts them
  + adapter          the LoRA factors, float32: rank x (in + out) per adapted matrix (per expert for the
                     experts), x 4 for the parameters, their gradients and Adam's two moments (x 3 for SGD)
  + activations      what the backward pass reads. Per layer, for each of its T tokens (B x L through the
                     encoder, B x C through the decoder), with H hidden, Q = heads x head_dim, K = kv_heads x
                     head_dim, I the dense MLP's width, k experts of width M per token:
                         b x (16 H + 5 Q + 5 K + 7 I + k x (3 H + 7 M))
                       + per adapted matrix 4 x rank + 12 x out (mlx-lm's LoRA computes its update in float32)
                     and the attention probabilities, 4 x b x heads x queries x keys (the encoder's L x L, the
                     decoder's C x (context + C); MLX differentiates attention through its unfused form), plus
                     the vocabulary-wide arrays of the canvas's and the response's positions:
                         LOGIT_ARRAYS x B x (C + R) x V x 4 bytes (float32 logits, soft-cap, softmax, gradients)
                     With --grad-checkpoint a layer keeps only its input (the encoder its keys and values too) and
                     one layer at a time is recomputed, its activations and their gradients alive together.
  + workspace        the largest single layer's activations again (the gradients flowing back through it)

The coefficients were counted from the graph (model.py, objective.py) and checked against MLX's peak memory for
training steps at the bench shape (4-bit, CPU): see tests/test_lora_memory.py and bench/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..config import ModelConfig
from ..memory import InsufficientMemoryError, available_memory, config_and_weights, format_bytes
from .adapters import EXPERT_KEYS, LoraSettings
from .objective import LOGIT_CHUNK

FLOAT32 = 4
# Float32 arrays of positions x vocab alive at the loss's peak: the head's output cast to float32, the soft-cap's
# tanh, the cross-entropy's softmax, the gradient through the soft-cap, and the casts between them.
LOGIT_ARRAYS = 6
# Arrays of (tokens x width) a layer keeps for its backward pass, by width (see the module docstring).
HIDDEN_ARRAYS, QUERY_ARRAYS, KV_ARRAYS, DENSE_ARRAYS = 10, 3, 3, 4
EXPERT_HIDDEN_ARRAYS, EXPERT_INNER_ARRAYS = 2, 4
# Float32 copies of each adapted matrix's output (mlx-lm's LoRA computes x·A·B and its scaled copy in float32).
LORA_OUTPUT_ARRAYS = 2
# The attention probabilities of every head, float32 (MLX differentiates attention through its unfused form).
ATTENTION_ARRAYS = 1
# Under checkpointing: the recomputed layer's activations, their gradients, and the temporaries between them.
WORKSPACE_LAYERS = 2.5
# Optimizer state per trainable parameter, in parameter copies (Adam and AdamW: two moments).
OPTIMIZER_COPIES = {"adam": 2, "adamw": 2, "sgd": 0, "adafactor": 1}


class TrainingMemoryError(InsufficientMemoryError):
    """A training plan that cannot fit this machine; the message is one line saying what would."""


@dataclass(frozen=True)
class TrainingShape:
    """What one step processes: `batch` sequences of up to `length` tokens, `responses` of them response tokens
    (the autoregressive term's positions)."""

    batch: int
    length: int
    responses: int
    grad_checkpoint: bool = False


@dataclass(frozen=True)
class TrainingPlan:
    shape: TrainingShape
    weights: int
    adapter_parameters: int  # how many trainable numbers
    adapter: int  # bytes: parameters, gradients, optimizer state
    layers: int  # activations of the transformer layers kept for the backward pass
    logits: int  # vocabulary-wide arrays
    workspace: int  # one layer recomputed or differentiated at a time
    available: int = 0
    source: str = ""

    @property
    def activations(self) -> int:
        return self.layers + self.logits + self.workspace

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def describe(self) -> str:
        """One line: the total and its parts, against the machine."""
        shape = self.shape
        checkpoint = "with" if shape.grad_checkpoint else "without"
        workspace = f", recomputed layer {format_bytes(self.workspace)}" if self.workspace else ""
        machine = f" of this machine's {format_bytes(self.available)} ({self.source})" if self.available else ""
        return (
            f"memory plan: {format_bytes(self.total)}{machine} = weights {format_bytes(self.weights)} + adapter "
            f"and optimizer {format_bytes(self.adapter)} ({self.adapter_parameters:,} parameters) + activations "
            f"{format_bytes(self.activations)} (layers {format_bytes(self.layers)}, logits {format_bytes(self.logits)}"
            f"{workspace}) for batch {shape.batch} x {shape.length} tokens, {checkpoint} gradient checkpointing"
        )


def _adapted(settings: LoraSettings, index: int, layers: int) -> bool:
    count = layers if settings.num_layers == -1 else settings.num_layers
    return index >= layers - count


def _projections(config: ModelConfig, shape) -> dict[str, tuple[int, int, int]]:
    """key -> (input width, output width, copies: experts for the experts' stacks) of one layer."""
    text = config.text
    hidden, q_width = text.hidden_size, text.num_attention_heads * shape.head_dim
    kv_width = shape.num_key_value_heads * shape.head_dim
    widths = {
        "self_attn.q_proj": (hidden, q_width, 1),
        "self_attn.k_proj": (hidden, kv_width, 1),
        "self_attn.o_proj": (q_width, hidden, 1),
        "mlp.gate_proj": (hidden, text.intermediate_size, 1),
        "mlp.up_proj": (hidden, text.intermediate_size, 1),
        "mlp.down_proj": (text.intermediate_size, hidden, 1),
        "experts.gate_up_proj": (hidden, 2 * text.moe_intermediate_size, text.num_experts),
        "experts.down_proj": (text.moe_intermediate_size, hidden, text.num_experts),
    }
    if shape.is_sliding:  # full layers have no v_proj
        widths["self_attn.v_proj"] = (hidden, kv_width, 1)
    return widths


def adapter_parameter_count(config: ModelConfig, settings: LoraSettings) -> int:
    """Trainable numbers of the LoRA factors `settings` puts on a model of `config`."""
    total = 0
    layers = config.text.layers
    for index, shape in enumerate(layers):
        if not _adapted(settings, index, len(layers)):
            continue
        for key, (inputs, outputs, copies) in _projections(config, shape).items():
            if key in settings.keys:
                total += copies * settings.rank * (inputs + outputs)
    return total


def _layer_activation_bytes(
    config: ModelConfig, shape, adapted: tuple[str, ...], rank: int, tokens: int, queries: int, keys: int,
    batch: int, value_bytes: int,
) -> int:  # fmt: skip
    """Bytes one layer keeps for its backward pass over `tokens` tokens (`batch` rows of `queries` queries
    attending over `keys` positions)."""
    text = config.text
    hidden, heads = text.hidden_size, text.num_attention_heads
    q_width, kv_width = heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    per_token = (
        HIDDEN_ARRAYS * hidden
        + QUERY_ARRAYS * q_width
        + KV_ARRAYS * kv_width
        + DENSE_ARRAYS * text.intermediate_size
        + text.top_k_experts * (EXPERT_HIDDEN_ARRAYS * hidden + EXPERT_INNER_ARRAYS * text.moe_intermediate_size)
    ) * value_bytes
    widths = _projections(config, shape)
    for key in adapted:
        if key in widths:
            outputs = widths[key][1]
            per_expert = text.top_k_experts if key in EXPERT_KEYS else 1
            per_token += per_expert * FLOAT32 * (rank + LORA_OUTPUT_ARRAYS * outputs)
    scores = ATTENTION_ARRAYS * FLOAT32 * batch * heads * queries * keys
    return tokens * per_token + scores


def training_plan(
    path_or_config: str | Path | ModelConfig,
    settings: LoraSettings,
    shape: TrainingShape,
    optimizer: str = "adam",
) -> TrainingPlan:
    """The memory a training run of `shape` needs (see the module docstring); `available` left 0."""
    config, weights, value_bytes = config_and_weights(path_or_config)
    text = config.text
    canvas, batch = config.canvas_length, shape.batch
    length = max(1, shape.length)
    parameters = adapter_parameter_count(config, settings)
    adapter = parameters * FLOAT32 * (2 + OPTIMIZER_COPIES.get(optimizer, 2))
    kept = layer_peak = 0
    for index, layer in enumerate(text.layers):
        adapted = settings.keys if _adapted(settings, index, len(text.layers)) else ()
        # The decoder's canvas attends to the context before it: the sliding layers' last window - 1 positions.
        context = min(length, text.sliding_window - 1) if layer.is_sliding else length
        encoder = _layer_activation_bytes(
            config, layer, adapted, settings.rank, batch * length, length, length, batch, value_bytes
        )
        decoder = _layer_activation_bytes(
            config, layer, adapted, settings.rank, batch * canvas, canvas, context + canvas, batch, value_bytes
        )
        layer_peak = max(layer_peak, encoder, decoder)
        if shape.grad_checkpoint:
            kv_width = layer.num_key_value_heads * layer.head_dim
            kept += (batch * length * (text.hidden_size + 2 * kv_width) + batch * canvas * text.hidden_size) * (
                value_bytes
            )
        else:
            kept += encoder + decoder
    # Without checkpointing every layer's activations are kept already; with it, one layer is recomputed at a time.
    workspace = int(WORKSPACE_LAYERS * layer_peak) if shape.grad_checkpoint else 0
    positions = batch * canvas + batch * shape.responses
    if shape.grad_checkpoint:
        # The head's logits go through the loss LOGIT_CHUNK positions at a time (objective.head_cross_entropy); the
        # first, self-conditioning pass keeps its canvas's logits and their softmax a moment (half the arrays).
        chunked = min(batch * canvas, LOGIT_CHUNK) + min(batch * shape.responses, LOGIT_CHUNK)
        positions = max(chunked, batch * canvas // 2)
    logits = LOGIT_ARRAYS * positions * text.vocab_size * FLOAT32
    return TrainingPlan(shape, int(weights), parameters, adapter, kept, logits, workspace)


def plan_for_machine(
    path_or_config: str | Path | ModelConfig,
    settings: LoraSettings,
    shape: TrainingShape,
    optimizer: str = "adam",
    max_seq_length: int | None = None,
) -> TrainingPlan:
    """`training_plan` against this machine's memory (the figure the load-time check uses); raises
    `TrainingMemoryError` with what would fit (gradient checkpointing, batch 1, a shorter --max-seq-length) when
    it cannot fit."""
    available, source = available_memory()
    plan = replace(training_plan(path_or_config, settings, shape, optimizer), available=available, source=source)
    if plan.fits:
        return plan
    needs = f"training needs about {format_bytes(plan.total)}, this machine has {format_bytes(available)} ({source})"
    suggestion = _what_fits(path_or_config, settings, shape, optimizer, available, max_seq_length or shape.length)
    raise TrainingMemoryError(f"{needs}: {suggestion}")


def _what_fits(
    path_or_config: str | Path | ModelConfig,
    settings: LoraSettings,
    shape: TrainingShape,
    optimizer: str,
    available: int,
    max_seq_length: int,
) -> str:
    """The first of: gradient checkpointing, then batch 1, then halving the sequence length, that fits."""
    flags: list[str] = []
    candidate = shape
    steps: list[tuple[str, TrainingShape]] = []
    if not shape.grad_checkpoint:
        steps.append(("--grad-checkpoint", replace(shape, grad_checkpoint=True)))
    if shape.batch > 1:
        steps.append(("--batch-size 1", replace(shape, batch=1, grad_checkpoint=True)))
    plan = None
    for flag, candidate in steps:
        flags.append(flag)
        plan = training_plan(path_or_config, settings, candidate, optimizer)
        if plan.total <= available:
            return f"try {' '.join(flags)} (about {format_bytes(plan.total)})"
    candidate = replace(shape, batch=1, grad_checkpoint=True)
    length = min(max_seq_length, candidate.length)
    while length > 64:
        length //= 2
        shorter = replace(candidate, length=length, responses=min(candidate.responses, length))
        plan = training_plan(path_or_config, settings, shorter, optimizer)
        if plan.total <= available:
            flags.append(f"--max-seq-length {length}")
            return f"try {' '.join(flags)} (about {format_bytes(plan.total)})"
    weights = (plan or training_plan(path_or_config, settings, candidate, optimizer)).weights
    return (
        f"even batch 1 of 64 tokens with --grad-checkpoint does not fit beside the weights "
        f"({format_bytes(weights)}); use a smaller quantization (dgemma convert --bits 4) or a machine with more "
        "memory"
    )
