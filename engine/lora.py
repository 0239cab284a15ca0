"""LoRA: diffusers- or kohya-format safetensors, read by diffusers and fused into the weights.

Each LoRA i with scale s_i is merged in turn, so the model runs W + sum_i s_i * dW_i, exactly as
diffusers' `load_lora_weights` + `set_adapters` + `fuse_lora`. Fusion happens before any export
or graph capture: every backend runs plain weights, at no cost per step.
"""
import contextlib
import copy
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .clip import ClipPromptEncoder, SdxlPromptEncoder
from .errors import InvalidInputError, InvalidTypeError
from .validation import check_real

# One low-rank "down" matrix per adapted layer, in each format diffusers reads.
_DOWN_KEY = re.compile(r"(lora_A|lora\.down|lora_down|_lora\.down|lora_linear_layer\.down)\.weight$")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and the scale it is fused with."""

    path: Path
    scale: float = 1.0

    def __post_init__(self):
        check_real(f"LoRA {str(self.path)!r} scale", self.scale)
        if not math.isfinite(self.scale):
            raise InvalidInputError(f"LoRA {str(self.path)!r} scale={self.scale}; expected a finite number")
        if not self.path.is_file():
            raise InvalidInputError(f"LoRA file {str(self.path)!r} does not exist; expected a "
                                    ".safetensors file in diffusers or kohya format")
        if self.path.suffix != ".safetensors":
            raise InvalidInputError(f"LoRA file {str(self.path)!r}; expected a .safetensors file "
                                    "(pickled .bin/.pt LoRAs are not loaded)")

    @property
    def provenance(self) -> dict:
        """What identifies this LoRA in a cache key: the file's content hash and the scale."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"sha256": digest.hexdigest(), "scale": float(self.scale)}


def parse_loras(lora) -> tuple[LoraSpec, ...]:
    """`lora=` of engine.build: None, a path, (path, scale), or a list of paths / (path, scale)."""
    if lora is None:
        return ()
    if _is_path(lora) or _is_pair(lora):
        lora = [lora]
    if not isinstance(lora, (list, tuple)):
        raise InvalidTypeError(f"lora={lora!r} of type {type(lora).__name__}; expected a path, "
                               "(path, scale), or a list of them")
    specs = []
    for item in lora:
        if _is_path(item):
            specs.append(LoraSpec(Path(item)))
        elif _is_pair(item):
            specs.append(LoraSpec(Path(item[0]), item[1]))
        else:
            raise InvalidTypeError(f"lora entry {item!r}; expected a path or (path, scale)")
    return tuple(specs)


def lora_arg(text: str) -> tuple[str, float]:
    """--lora PATH or PATH:SCALE (scale 1 when the part after the last colon is no number)."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def _is_path(value) -> bool:
    return isinstance(value, (str, Path))


def _is_pair(value) -> bool:
    """(path, scale) or [path, scale] (as JSON and YAML give it); two paths are two LoRAs."""
    return (isinstance(value, (tuple, list)) and len(value) == 2 and _is_path(value[0])
            and not _is_path(value[1]))


def fuse_loras(components, specs: tuple[LoraSpec, ...], copy_modules: bool):
    """Components with every LoRA fused into the UNet and text encoders.

    copy_modules: fuse into copies of the adapted modules, so that a UNet or pipeline the caller
    passed in keeps its own weights; a model Lumen loaded itself is fused in place.
    """
    if not specs:
        return components
    _require_peft()
    mixin = _mixin(components)
    texts = _text_modules(components.text_encoder)
    loaded = []  # every file read and checked before any module is copied or changed
    for spec in specs:
        state_dict, alphas, metadata = _read(mixin, spec, components.unet)
        loaded.append((spec, _split(state_dict, spec, components.text_encoder, texts), alphas, metadata))
    adapted = {prefix for _, groups, _, _ in loaded for prefix in groups}
    modules = {"unet": components.unet, **texts}
    if copy_modules:
        modules = {k: copy.deepcopy(m) if k in adapted else m for k, m in modules.items()}
    for i, (spec, groups, alphas, metadata) in enumerate(loaded):
        for prefix, part in groups.items():
            fuse = _fuse_unet if prefix == "unet" else _fuse_text
            fuse(mixin, part, alphas, metadata, modules[prefix], prefix, spec, f"lumen_lora_{i}")
    components.unet = modules.pop("unet")
    components.text_encoder = _with_text_modules(components.text_encoder, modules)
    components.loras = tuple(spec.provenance for spec in specs)
    return components


def _require_peft() -> None:
    try:
        import peft  # noqa: F401  (diffusers injects LoRA layers through PEFT)
    except ImportError as err:
        raise InvalidInputError(f"lora= needs the peft package ({err}); pip install peft") from err


def _mixin(components):
    """diffusers' loader for this model family: SDXL's also reads text_encoder_2 keys."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    sdxl = getattr(components.unet.config, "addition_embed_type", None) == "text_time"
    return StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin


def _text_modules(encoder) -> dict:
    """The CLIP text encoders a LoRA may adapt, by their diffusers key prefix."""
    if isinstance(encoder, ClipPromptEncoder):
        return {"text_encoder": encoder.module}
    if isinstance(encoder, SdxlPromptEncoder):
        # SDXL has text_encoder and text_encoder_2; its refiner has only the second
        prefixes = ("text_encoder", "text_encoder_2")[-len(encoder.parts):]
        return dict(zip(prefixes, encoder.parts))
    return {}


def _with_text_modules(encoder, texts: dict):
    if isinstance(encoder, ClipPromptEncoder):
        return ClipPromptEncoder(encoder.tokenizer, texts["text_encoder"])
    if isinstance(encoder, SdxlPromptEncoder):
        return SdxlPromptEncoder(encoder.tokenizers, tuple(texts.values()),
                                 encoder.force_zeros_for_empty_prompt)
    return encoder


def _read(mixin, spec: LoraSpec, unet):
    """(state_dict, network_alphas, metadata) in diffusers' format, kohya keys converted."""
    try:
        state_dict, alphas, metadata = mixin.lora_state_dict(
            str(spec.path), unet_config=unet.config, return_lora_metadata=True)
    except Exception as err:  # safetensors, diffusers' converters: any failure means a bad file
        raise InvalidInputError(f"cannot read LoRA {str(spec.path)!r}: {err}; expected LoRA "
                                "safetensors in diffusers or kohya format") from err
    if not state_dict or not any("lora" in k for k in state_dict):
        raise InvalidInputError(f"{str(spec.path)!r} holds no LoRA weights (no key names 'lora'); "
                                "expected LoRA safetensors in diffusers or kohya format")
    return state_dict, alphas, metadata


def _split(state_dict: dict, spec: LoraSpec, encoder, texts: dict) -> dict:
    """Keys grouped by the component they adapt; keys for a component the model lacks raise."""
    groups: dict[str, dict] = {}
    for key, value in state_dict.items():
        prefix = key.split(".", 1)[0]
        groups.setdefault(prefix, {})[key] = value
    unknown = sorted(set(groups) - {"unet", *texts})
    if unknown:
        has = ", ".join(["unet", *texts])
        what = type(encoder).__name__ if encoder is not None else "no text encoder"
        raise InvalidInputError(f"LoRA {str(spec.path)!r} adapts {', '.join(unknown)}, which this "
                                f"model does not have (it has {has}; text encoder: {what}); "
                                "expected a LoRA made for this model family")
    return groups


def _fuse_unet(mixin, state_dict, alphas, metadata, unet, prefix: str, spec: LoraSpec,
               name: str) -> None:
    try:
        mixin.load_lora_into_unet(state_dict, alphas, unet, adapter_name=name, metadata=metadata)
    except (RuntimeError, ValueError, KeyError) as err:
        raise InvalidInputError(f"LoRA {str(spec.path)!r} does not fit this UNet: {_first_line(err)}; "
                                "expected a LoRA made for this model") from err
    _check_injected(unet, state_dict, prefix, spec)
    unet.fuse_lora(lora_scale=spec.scale, adapter_names=[name])
    unet.unload_lora()


def _fuse_text(mixin, state_dict, alphas, metadata, module, prefix: str, spec: LoraSpec,
               name: str) -> None:
    from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch, fuse_text_encoder_lora

    try:
        with _no_progress_bar():  # transformers' per-load "Loading weights" bar
            mixin.load_lora_into_text_encoder(state_dict, alphas, module, prefix=prefix,
                                              adapter_name=name, metadata=metadata)
    except (RuntimeError, ValueError, KeyError, IndexError) as err:
        raise InvalidInputError(f"LoRA {str(spec.path)!r} does not fit {prefix}: {_first_line(err)}; "
                                "expected a LoRA made for this model") from err
    _check_injected(module, state_dict, prefix, spec)
    fuse_text_encoder_lora(module, lora_scale=spec.scale, adapter_names=[name])
    _remove_text_encoder_monkey_patch(module)  # diffusers' unload: merged base layers stay


@contextlib.contextmanager
def _no_progress_bar():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_injected(module: torch.nn.Module, state_dict: dict, prefix: str, spec: LoraSpec) -> None:
    """Every adapted layer in the file must exist in the model: a partial match is a wrong model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wanted = sum(1 for k in state_dict if _DOWN_KEY.search(k))
    found = sum(1 for m in module.modules() if isinstance(m, BaseTunerLayer))
    if found < wanted:
        raise InvalidInputError(f"LoRA {str(spec.path)!r} adapts {wanted} {prefix} layers but this "
                                f"model has only {found} of them; expected a LoRA made for this model")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
