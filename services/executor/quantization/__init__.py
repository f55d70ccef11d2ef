"""Quantized weights: which scheme a model's linear layers use, chosen once when the model is built.

`resolve(flag, hf_config)` makes the QuantConfig from --quantization and the checkpoint's
`quantization_config`; load_model builds the model inside `building_with(config)`, and every linear
layer asks `linear_method()` at construction (None: an unquantized bf16/fp16/fp32 weight)."""

from __future__ import annotations

import contextlib
import importlib

from radixserve.executor.quantization.base import LinearMethod, QuantConfig

# --quantization value (or a checkpoint's quant_method) -> "module:class" under this package.
SCHEMES = {
    "fp8": "fp8:Fp8Config",
    "compressed-tensors": "compressed_tensors:CompressedTensorsConfig",
    "awq": "awq:AwqConfig",
    "gptq": "gptq:GptqConfig",
    "gguf": "gguf:GgufConfig",
}

_building: list[QuantConfig | None] = [None]


def scheme_class(name: str) -> type[QuantConfig]:
    if name not in SCHEMES:
        raise ValueError(
            f"quantization {name!r} is not supported; supported: {', '.join(sorted(SCHEMES))}"
        )
    module, cls = SCHEMES[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def resolve(flag: str | None, hf_config: dict) -> QuantConfig | None:
    """The model's quantization. A checkpoint that says how it is quantized is loaded that way (a flag
    naming another scheme is an error); an unquantized one is quantized online when the flag asks."""
    checkpoint = hf_config.get("quantization_config")
    if checkpoint:
        method = str(checkpoint.get("quant_method", "")).lower()
        if flag and flag != method:
            raise ValueError(
                f"--quantization {flag}: the checkpoint is already quantized with {method!r}"
            )
        return scheme_class(method).from_checkpoint(checkpoint)
    if flag in (None, "unquant", "gguf"):
        # gguf: a .gguf file, which model_files converts (dequantized) or a native GGUF loader reads.
        return None
    return scheme_class(flag).from_checkpoint(None)


@contextlib.contextmanager
def building_with(config: QuantConfig | None):
    """Linear layers constructed inside take their method from config."""
    _building.append(config)
    try:
        yield
    finally:
        _building.pop()


def unquantize_skipped(model, config: QuantConfig | None) -> None:
    """Turn the linear layers that config.skip names back into plain ones (call while building, on the
    model's device and dtype). A fused layer (q/k/v, gate/up) goes by the HF names of its shards
    (model.stacked_params), which must all be skipped or none."""
    if config is None:
        return
    stacked = getattr(model, "stacked_params", {})
    for name, module in model.named_modules():
        if getattr(module, "quant", None) is None or not hasattr(module, "drop_quantization"):
            continue
        dotted = f".{name}."
        hf_names = [
            dotted.replace(fused, fragment).strip(".")
            for fragment, (fused, _) in stacked.items()
            if fused in dotted
        ] or [name]
        skipped = [config.skip(n) for n in hf_names]
        if all(skipped):
            module.drop_quantization()
        elif any(skipped):
            raise ValueError(
                f"the checkpoint quantizes only some of {hf_names}, which are one fused layer here"
            )


def building_lm_head():
    """The scope an LM head is built in: unquantized unless the scheme quantizes it (quantizes_lm_head)."""
    config = _building[-1]
    return building_with(config if config is not None and config.quantizes_lm_head else None)


def linear_method() -> LinearMethod | None:
    config = _building[-1]
    return None if config is None else config.linear_method()


def weight_bytes(model) -> int:
    """Bytes of weight data a forward reads: quantized layers by their method, others by their
    parameters (a parameter shared by two modules, e.g. a tied LM head, once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        method = getattr(module, "quant", None)
        if method is not None:
            if any(p is getattr(module, "weight", None) for p in own):
                total += method.weight_bytes(module)
            own = [p for p in own if p is getattr(module, "bias", None)]
        total += sum(p.numel() * p.element_size() for p in own)
    return total


def embedding_method() -> LinearMethod | None:
    config = _building[-1]
    return None if config is None else config.embedding_method()


__all__ = [
    "LinearMethod",
    "QuantConfig",
    "building_with",
    "embedding_method",
    "linear_method",
    "resolve",
    "unquantize_skipped",
]
