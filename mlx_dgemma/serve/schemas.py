"""Request bodies of the OpenAI, Ollama and llama.cpp routes.

Strict types (no "16" for 16, no true for 1): a mistyped field is a 400 naming
it. Fields a client may send that we do not use (temperature, top_p,
frequency_penalty, tools, ...) are accepted and ignored, so that stock clients
work; the few that would change what the client expects (n > 1, logprobs) are
declared here so the routes can refuse them. Every model also takes our
sampler's parameters and `drafts`, the diffusion UIs' opt-in to each
denoising step's draft.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Our sampler's parameters, accepted as extra fields by every generating route.
SAMPLER_FIELDS = ("steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold", "speed")


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class SamplerFields(Body):
    steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    speed: str | None = None  # "exact" (the default) or "fast": forward only the canvas positions still changing
    drafts: bool = False

    def sampler_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SAMPLER_FIELDS}


# ----------------------------------------------------------------- OpenAI


class ContentPart(Body):
    model_config = ConfigDict(extra="allow", strict=True)  # image parts carry other fields; refused by type
    type: str
    text: str | None = None


class ChatMessage(Body):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(Body):
    include_usage: bool | None = False


class ChatTemplateKwargs(Body):
    enable_thinking: bool | None = None


class ChatCompletionRequest(SamplerFields):
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    temperature: float | None = None  # accepted and ignored: the sampler's schedule is its own
    top_p: float | None = None  # accepted and ignored
    chat_template_kwargs: ChatTemplateKwargs | None = None  # vLLM's way to turn thinking on


class CompletionRequest(SamplerFields):
    model: str | None = None
    prompt: str | list[str] | list[int]
    suffix: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    temperature: float | None = None
    top_p: float | None = None


# ----------------------------------------------------------------- Ollama


class OllamaOptions(SamplerFields):
    num_predict: int | None = None  # -1 (unlimited) and -2 (fill the context) mean the default
    seed: int | None = None
    stop: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


class OllamaRequest(SamplerFields):
    model: str | None = None
    stream: bool = True
    think: bool | None = None
    options: OllamaOptions | None = None
    images: list[str] | None = None


class OllamaGenerateRequest(OllamaRequest):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False


class OllamaMessage(Body):
    role: str
    content: str = ""
    images: list[str] | None = None


class OllamaChatRequest(OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)


class OllamaShowRequest(Body):
    model: str | None = None
    name: str | None = None  # older clients' spelling


# ----------------------------------------------------------------- llama.cpp


class InputExtra(Body):
    filename: str = ""
    text: str = ""


class LlamaCppRequest(SamplerFields):
    n_predict: int | None = None  # negative means the default
    seed: int | None = None  # negative (llama.cpp's -1: random) means the default
    stop: list[str] | None = None
    stream: bool = False
    cache_prompt: bool | None = None  # accepted: prompts are always cached
    response_fields: list[str] | None = None


class InfillRequest(LlamaCppRequest):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InputExtra] = Field(default_factory=list)
    prompt: str = ""


class LlamaCompletionRequest(LlamaCppRequest):
    prompt: str | list[int]
