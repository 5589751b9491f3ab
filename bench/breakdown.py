"""Where one of our denoising steps spends its time.

Nothing here re-implements the step. A short real sampler run records the
arguments of its second step (self-conditioned, as every step but the first):
the decoder call (`Model.denoise_hidden`) and the sampling call
(`BlockSampler._sample`: head, soft-cap and vocabulary math per row block,
each on its stream, then the accepted positions' draw and the step's
decisions), exactly as `BlockSampler` makes them. One more decoder call with
the layer classes' `__call__` (and the model's embedding / self-conditioning
methods) wrapped records every part's inputs and the stream each call ran on.
Each part is then re-run alone on its recorded (evaluated) inputs, its row
blocks' calls side by side on their streams as in the real step: `mx.eval` +
`time.perf_counter`, median of repeats. The parts are therefore timed in
isolation on the very inputs of a real step, and the whole step is timed the
same way for comparison; the difference shows as "unaccounted" (graph
building and scheduling that only appear when the parts run together, and
any part not wrapped).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from .record import summary, time_repeated
from .shapes import our_settings

# Modules whose calls are parts of a step; containers hold parts and are timed whole.
PART_CLASSES = {
    "Attention": ("attention", "attention"),
    "GatedMLP": ("dense MLP", "dense MLP"),
    "Router": ("MoE: router", "MoE"),
    "Experts": ("MoE: experts", "MoE"),
    "SelfConditioning": ("self-conditioning: MLP + norm", "self-conditioning"),
}
# Methods other than `__call__` that are parts: on the CPU the dense MLP and the experts run in C in one pass, or
# (float32, heads that fill the kernels' panels) the whole layer does.
PART_METHODS = {
    ("Experts", "on_host"): ("feed-forward in C: dense MLP + MoE experts, one pass", "feed-forward in C"),
    ("TransformerLayer", "_on_host"): ("decoder layer in C: attention, norms, router, MLP + experts", "layer in C"),
}
CONTAINER_CLASSES = {"TransformerLayer": ("layer total", "layer totals")}
# The groups a layer's total holds besides its glue.
LAYER_PART_GROUPS = ("attention", "dense MLP", "MoE", "feed-forward in C", "layer in C")
MODEL_METHODS = {
    "_embed": ("embedding lookup", "embedding"),
    "_soft_embeddings": ("self-conditioning: probs @ embeddings", "self-conditioning"),
    "_conditioned_on_host": (
        "self-conditioning in C: embedding lookup, probs @ embeddings, MLP, norms",
        "self-conditioning",
    ),
}
SAMPLING = "sampling: head, soft-cap, vocab-wide math per row block; draw of accepted positions; decisions"
# Ablations: the whole step again with these calls answered from the real step's recorded outputs; the time
# it saves is what they cost inside the step, overlap and launch latency included. An op whose only consumer
# is ablated goes with it (MLX is lazy), so the router is ablated with the experts and alone.
ABLATIONS = {
    "decoder (the whole forward)": (("Model", "denoise_hidden"),),
    "attention": (("Attention", "__call__"),),
    "dense MLPs (layers and self-conditioning)": (("GatedMLP", "__call__"),),
    "MoE (router + experts)": (("Router", "__call__"), ("Experts", "__call__")),
    "MoE router": (("Router", "__call__"),),
    "feed-forward in C (dense MLPs + experts)": (("Experts", "on_host"),),
    "decoder layers in C": (("TransformerLayer", "_on_host"),),
    "self-conditioning: probs @ embeddings (in C: with the lookup, MLP and norms)": (
        ("Model", "_soft_embeddings"),
        ("Model", "_conditioned_on_host"),
    ),
}
# Parts timed only for scale, not in the sum: they overlap the parts that are.
FOR_SCALE = "for scale"
_NOT_SUMMED = ("total", "layer totals", FOR_SCALE)


def arrays_in(obj: Any) -> list:
    """Every mx.array inside nested tuples, lists, dicts and dataclasses."""
    import mlx.core as mx

    if isinstance(obj, mx.array):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [a for item in obj for a in arrays_in(item)]
    if isinstance(obj, dict):
        return [a for item in obj.values() for a in arrays_in(item)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [a for f in dataclasses.fields(obj) for a in arrays_in(getattr(obj, f.name))]
    return []


def _row_block_groups(sink: list) -> list[list]:
    """Recorded calls grouped so that one module's calls for the row blocks of one layer form one group.

    A part called once per row block (each on its block's stream) runs its calls
    side by side in a real step, so they are timed together, not summed.
    """
    groups: list[list] = []
    open_groups: dict[tuple, list] = {}
    for entry in sink:
        key = (id(entry[2]), entry[1], entry[5])
        group = open_groups.get(key)
        if group is None or any(stream == entry[6] for *_, stream in group):
            group = open_groups[key] = []
            groups.append(group)
        group.append(entry)
    return groups


@contextlib.contextmanager
def _patched(cls: type, attr: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    original = cls.__dict__.get(attr)
    if original is None:
        yield
        return
    setattr(cls, attr, make(original))
    try:
        yield
    finally:
        setattr(cls, attr, original)


class StepBreakdown:
    def __init__(self, driver, prompt: list[int]):
        import mlx.core as mx

        self.mx = mx
        self.driver = driver
        self.model = driver.model
        self.prompt = prompt
        self.repeats = driver.settings.breakdown_repeats
        self.parts: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}

    # -- timing --------------------------------------------------------------------------------------------------

    def time(self, name: str, group: str, run: Callable[[], Any], layer: int | None = None) -> float | None:
        mx = self.mx
        try:
            times = time_repeated(run, lambda out: mx.eval(arrays_in(out)), self.repeats)
        except Exception as error:  # a part that cannot be re-run alone must not sink the breakdown
            self.errors[name] = f"{type(error).__name__}: {error}"
            return None
        ms = summary(times)["median"] * 1e3
        entry = self.parts.setdefault(name, {"ms": 0.0, "calls": 0, "group": group, "per_layer": {}})
        entry["ms"] += ms
        entry["calls"] += 1
        if layer is not None:
            entry["per_layer"][layer] = round(entry["per_layer"].get(layer, 0.0) + ms, 3)
        return ms

    # -- recording a real step -----------------------------------------------------------------------------------

    def capture_second_step(self):
        """The (args, kwargs) of the decoder call and of `BlockSampler._sample` at a real second step."""
        from mlx_dgemma.sampler import BlockSampler, SeededNoise

        from .runtimes.ours import sampler_events

        driver, model = self.driver, self.model
        settings = driver.sampler_settings(driver.settings.steps, adaptive=False, seed=driver.settings.seed)
        calls: dict[str, list] = {"denoise": [], "sample": []}

        def recorder(kind):
            def make(original):
                def record(this, *args, **kwargs):
                    calls[kind].append((args, kwargs))
                    return original(this, *args, **kwargs)

                return record

            return make

        cache = driver.prefill(self.prompt)
        sampler = BlockSampler(model, settings, SeededNoise(driver.settings.seed))
        with _patched(type(model), "denoise_hidden", recorder("denoise")):
            with _patched(BlockSampler, "_sample", recorder("sample")):
                events = sampler_events(sampler, cache)
                for kind, item in events:
                    if kind == "draft" and item.step >= 2:
                        events.close()
                        break
        if len(calls["denoise"]) < 2 or len(calls["sample"]) < 2:
            raise RuntimeError("could not record a second denoising step")
        self.mx.eval(arrays_in(calls["denoise"][1]), arrays_in(calls["sample"][1]))
        return calls["denoise"][1], calls["sample"][1], sampler

    def record_parts(self, denoise_call) -> list[tuple[str, str, Any, tuple, dict, tuple[str, ...], Any]]:
        """Every part's call during one `denoise`: (class, method, module, args, kwargs, enclosing classes, stream)."""
        import mlx_dgemma.layers as layers_module
        import mlx_dgemma.model as model_module
        import mlx_dgemma.moe as moe_module

        model = self.model
        sink: list = []
        stack: list[str] = []
        self.outputs = {}  # (class, method, id(module)) -> that module's outputs, in call order

        def recorder(cls_name: str, attr: str) -> Callable[[Callable], Callable]:
            def make(original):
                def wrapper(this, *args, **kwargs):
                    parents = tuple(stack)
                    stream = self.mx.default_stream(self.mx.default_device())
                    stack.append(cls_name)
                    try:
                        out = original(this, *args, **kwargs)
                        self.outputs.setdefault((cls_name, attr, id(this)), []).append(out)
                        return out
                    finally:
                        stack.pop()
                        sink.append((cls_name, attr, this, args, kwargs, parents, stream))

                return wrapper

            return make

        targets = []
        for cls_name in (*PART_CLASSES, *CONTAINER_CLASSES, "RMSNorm"):
            for module in (layers_module, model_module, moe_module):
                cls = getattr(module, cls_name, None)
                if isinstance(cls, type):
                    targets.append((cls, "__call__", recorder(cls_name, "__call__")))
                    break
        for method in MODEL_METHODS:
            targets.append((type(model), method, recorder("Model", method)))
        for cls_name, method in PART_METHODS:
            for module in (moe_module, model_module):
                cls = getattr(module, cls_name, None)
                if isinstance(cls, type) and method in cls.__dict__:
                    targets.append((cls, method, recorder(cls_name, method)))
        self.classes = {cls.__name__: cls for cls, _, _ in targets}
        with contextlib.ExitStack() as patches:
            for cls, attr, make in targets:
                patches.enter_context(_patched(cls, attr, make))
            args, kwargs = denoise_call
            hidden = model.denoise_hidden(*args, **kwargs)
            self.outputs[("Model", "denoise_hidden", id(model))] = [hidden]
            self.mx.eval(hidden)
        self.mx.eval([arrays_in(entry[3:5]) for entry in sink], arrays_in(list(self.outputs.values())))
        return sink

    def ablate(self, whole: Callable[[], Any]) -> dict[str, float]:
        """What each of ABLATIONS saves: whole step minus the whole step with those calls answered from records."""
        mx = self.mx
        sync = lambda out: mx.eval(arrays_in(out))  # noqa: E731
        base = summary(time_repeated(whole, sync, self.repeats))["median"]
        saved = {}
        for label, calls in ABLATIONS.items():
            with contextlib.ExitStack() as patches:
                for cls_name, attr in calls:
                    cls = type(self.model) if cls_name == "Model" else self.classes.get(cls_name)
                    if cls is None:
                        continue
                    patches.enter_context(_patched(cls, attr, lambda _, key=(cls_name, attr): self._answer(key)))
                try:
                    times = time_repeated(whole, sync, self.repeats)
                except Exception as error:
                    self.errors[f"ablation {label}"] = f"{type(error).__name__}: {error}"
                    continue
            saved[label] = round((base - summary(times)["median"]) * 1e3, 3)
        return saved

    def _answer(self, key: tuple[str, str]) -> Callable:
        """A stand-in method that returns each module's recorded outputs in turn."""
        turns: dict[int, int] = {}

        def answer(this, *args, **kwargs):
            recorded = self.outputs[(*key, id(this))]
            turn = turns.get(id(this), 0)
            turns[id(this)] = turn + 1
            return recorded[turn % len(recorded)]

        return answer

    def _replay(self, calls: list) -> list:
        """Re-run one part's recorded calls, each on the stream it ran on (the row blocks' calls side by side)."""
        outputs = []
        for _, attr, module, args, kwargs, _, stream in calls:
            call = getattr(module, attr) if attr != "__call__" else module
            with self.mx.stream(stream):
                outputs.append(call(*args, **kwargs))
        return outputs

    # -- the report ----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        import mlx_dgemma.model as model_module

        # The parts are timed one by one, which a layer's compiled graphs would hide (and patched calls traced
        # into them would stay there): the breakdown's step runs them uncompiled (a tree without them, as it is).
        uncompiled = {"model.COMPILE_LAYERS": False} if hasattr(model_module, "COMPILE_LAYERS") else {}
        with our_settings(uncompiled):
            return self._run()

    def _run(self) -> dict[str, Any]:
        from mlx_dgemma import moe
        from mlx_dgemma.cpu import RowBlocks

        model = self.model
        (d_args, d_kwargs), (s_args, s_kwargs), sampler = self.capture_second_step()
        canvas_len, vocab = self.driver.canvas, self.driver.vocab

        def whole():
            return sampler._sample(model.denoise_hidden(*d_args, **d_kwargs), *s_args[1:], **s_kwargs)

        self.time("whole step (decoder + sampling)", "total", whole)
        self.time("decoder forward (Model.denoise_hidden)", "total", lambda: model.denoise_hidden(*d_args, **d_kwargs))
        self.time(SAMPLING, "sampling", lambda: sampler._sample(*s_args, **s_kwargs))
        # For scale: the head over all positions on one stream, and the whole-vocabulary Gumbel draw a GPU makes
        # (the CPU draws only the accepted positions).
        hidden, noise = RowBlocks.join(s_args[0]), sampler.noise
        self.time("head matmul + soft-cap", FOR_SCALE, lambda: model.logits(hidden))
        self.time(
            "Gumbel draw over the whole vocabulary + re-noise tokens",
            FOR_SCALE,
            lambda: (noise.gumbel(0, 3, (1, canvas_len, vocab)), noise.tokens(0, 3, (1, canvas_len), vocab)),
        )

        owner, kinds = {}, {}
        for index, layer in enumerate(model.layers):
            for _, module in layer.named_modules():
                owner[id(module)] = index
        for index, shape in enumerate(getattr(model.text_config, "layers", ())):
            kinds[index] = "sliding" if shape.is_sliding else "full"
        final_norm = getattr(getattr(getattr(model, "model", None), "decoder", None), "norm", None)

        experts_layer0 = None
        for calls in _row_block_groups(self.record_parts((d_args, d_kwargs))):
            cls_name, attr, module, args, kwargs, parents, _ = calls[0]
            if any(parent in PART_CLASSES for parent in parents):
                continue  # inside a part that is timed whole
            layer = owner.get(id(module))
            if cls_name == "RMSNorm":
                if module is not final_norm:
                    continue  # layer norms are in the layer glue
                name, group = "final norm", "head"
            elif cls_name == "Model":
                name, group = MODEL_METHODS[attr]
            elif (cls_name, attr) in PART_METHODS:
                name, group = PART_METHODS[(cls_name, attr)]
            else:
                name, group = {**PART_CLASSES, **CONTAINER_CLASSES}[cls_name]
                if cls_name == "Attention" and layer in kinds:
                    name = f"attention ({kinds[layer]})"
            self.time(name, group, lambda calls=calls: self._replay(calls), layer)
            if cls_name == "Experts" and layer == 0:
                # The dispatches compared below take the experts alone (on_host's first four arguments).
                experts_layer0 = (module, args[:4], {}) if attr == "on_host" else (module, args, kwargs)

        compare = {}
        if self.driver.settings.moe_compare and experts_layer0 is not None:
            module, args, kwargs = experts_layer0
            forced = getattr(moe, "_forced_dispatch", None)
            try:
                for dispatch in moe.available_dispatches():
                    moe.set_moe_dispatch(dispatch)
                    times = time_repeated(lambda: module(*args, **kwargs), self.mx.eval, self.repeats)
                    compare[f"MoE experts, layer 0, dispatch {dispatch!r}"] = summary(times)["median"] * 1e3
            except Exception as error:
                self.errors["moe compare"] = f"{type(error).__name__}: {error}"
            finally:
                moe.set_moe_dispatch(forced)
        return self.report(compare, self.ablate(whole))

    def report(self, compare: dict[str, float], ablated: dict[str, float]) -> dict[str, Any]:
        from mlx_dgemma.cpu import block_count

        parts = self.parts
        whole = parts.get("whole step (decoder + sampling)", {}).get("ms")
        components = {n: p for n, p in parts.items() if p["group"] not in _NOT_SUMMED}
        rows = [
            {"component": n, "group": p["group"], "ms": round(p["ms"], 3), "calls": p["calls"]}
            for n, p in components.items()
        ]
        layer_total = parts.get("layer total")
        if layer_total:
            inside = sum(p["ms"] for p in components.values() if p["group"] in LAYER_PART_GROUPS)
            rows.append(
                {
                    "component": "layer glue (norms, residual adds, scalars)",
                    "group": "layer glue",
                    "ms": round(layer_total["ms"] - inside, 3),
                    "calls": layer_total["calls"],
                }
            )
        if whole is not None:
            rows.append(
                {
                    "component": "unaccounted (whole step minus the parts)",
                    "group": "unaccounted",
                    "ms": round(whole - sum(r["ms"] for r in rows), 3),
                    "calls": 1,
                }
            )
        rows.sort(key=lambda r: -r["ms"])
        for row in rows:
            row["share"] = row["ms"] / whole if whole else None
        groups: dict[str, float] = {}
        for row in rows:
            groups[row["group"]] = groups.get(row["group"], 0.0) + row["ms"]
        per_layer: dict[int, dict[str, float]] = {}
        for name, part in parts.items():
            for layer, ms in part["per_layer"].items():
                per_layer.setdefault(layer, {})[name] = ms
        return {
            "step_ms": whole,
            "decoder_forward_ms": parts.get("decoder forward (Model.denoise_hidden)", {}).get("ms"),
            "row_blocks": block_count(self.driver.canvas),
            "serial_ms": {n: round(p["ms"], 3) for n, p in parts.items() if p["group"] == FOR_SCALE},
            "rows": rows,
            "groups_ms": {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda item: -item[1])},
            "per_layer": {str(k): v for k, v in sorted(per_layer.items())},
            "compare": compare,
            "ablated_ms": ablated,
            "repeats": self.repeats,
            "errors": self.errors,
            "method": "each part re-run alone on the recorded inputs of a real second (self-conditioned) step; "
            "mx.eval + perf_counter, median of repeats; the layers uncompiled",
        }
