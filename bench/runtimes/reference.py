"""The transformers reference (`DiffusionGemmaForBlockDiffusion.generate`), on torch as installed.

Step boundaries come from its streamer hook (`put_draft` after every
denoising step); encoder calls are timed with forward hooks, so the prompt
prefill inside `generate` is told apart from the denoising that follows.
Passing `stability_threshold=None, confidence_threshold=None` turns its
adaptive stopping off; `eos_token_id=None` keeps a chance EOS from stopping it.
"""

from __future__ import annotations

import time
from typing import Any

from ..record import maxrss_gb
from .base import Driver, GenerationRun, Skip


class _TimingStreamer:
    def __init__(self):
        self.drafts: list[float] = []
        self.puts: list[float] = []

    def put(self, value) -> None:
        self.puts.append(time.perf_counter())

    def put_draft(self, value=None, logits=None) -> None:
        self.drafts.append(time.perf_counter())

    def end(self) -> None:
        pass


class ReferenceDriver(Driver):
    name = "reference"

    def setup(self) -> dict[str, Any]:
        if self.shape.source == "synthetic":
            raise Skip("the reference needs a checkpoint on disk; this shape is built in memory (too big here)")
        if self.shape.bits:
            raise Skip("the reference does not load MLX-quantized checkpoints")
        try:
            import torch
            import transformers
            from transformers import DiffusionGemmaForBlockDiffusion  # noqa: F401
        except ImportError as error:
            raise Skip(f"transformers/torch with DiffusionGemma is not importable ({error})") from None

        self.torch = torch
        return {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
        }

    def load(self) -> None:
        from transformers import DiffusionGemmaForBlockDiffusion

        torch = self.torch
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.shape.dtype]
        self.model = DiffusionGemmaForBlockDiffusion.from_pretrained(self.spec.checkpoint, dtype=dtype).eval()
        self.canvas = self.model.config.canvas_length
        self.encoder_calls: list[list[float]] = []
        encoder = self.model.model.encoder
        encoder.register_forward_pre_hook(lambda module, args: self.encoder_calls.append([time.perf_counter(), 0.0]))

        def done(module, args, output):
            self.encoder_calls[-1][1] = time.perf_counter()

        encoder.register_forward_hook(done)

    def prefill(self, prompt: list[int]):
        from transformers import DynamicCache

        torch = self.torch
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        with torch.inference_mode():
            self.model.model.encoder(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        return cache

    def generate(self, prompt: list[int], steps: int, adaptive: bool, seed: int, per_step: bool) -> GenerationRun:
        torch = self.torch
        torch.manual_seed(seed)
        streamer = _TimingStreamer()
        self.encoder_calls.clear()
        ids = torch.tensor([prompt])
        out = self.model.generate(
            ids,
            max_new_tokens=self.settings.canvases * self.canvas,
            max_denoising_steps=steps,
            t_min=0.4,
            t_max=0.8,
            stability_threshold=1 if adaptive else None,
            confidence_threshold=0.005 if adaptive else None,
            eos_token_id=None,
            pad_token_id=None,
            streamer=streamer,
        )
        end = time.perf_counter()
        sequences = out.sequences if hasattr(out, "sequences") else out
        tokens = int(sequences.shape[1] - len(prompt))
        calls = list(self.encoder_calls)
        if not calls:
            raise RuntimeError("no encoder call was seen: the forward hooks did not fire")
        step_times, steps_per_canvas = [], []
        for index, (_, begin) in enumerate(calls):
            following = calls[index + 1][0] if index + 1 < len(calls) else end
            drafts = [t for t in streamer.drafts if begin <= t <= following]
            step_times.append([b - a for a, b in zip([begin, *drafts], drafts)])
            steps_per_canvas.append(len(drafts))
        return GenerationRun(
            tokens,
            end - calls[0][1],
            steps_per_canvas,
            step_times,
            extra={"prefill_in_generate_s": calls[0][1] - calls[0][0]},
        )

    def memory(self) -> dict[str, Any]:
        return {"maxrss_gb": maxrss_gb()}
