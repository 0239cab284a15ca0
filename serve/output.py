"""Responses' images: PNGs carrying their generation parameters as AUTOMATIC1111 writes them."""
import base64
import io

from PIL.PngImagePlugin import PngInfo

from .jobs import BatchKey
from .schemas import A1111_SAMPLERS

LUMEN_TO_A1111 = {sampler: label for label, (sampler, _) in A1111_SAMPLERS.items()}


def infotext(prompt: str, negative_prompt: str, key: BatchKey, seed: int, model: str) -> str:
    """A1111's "parameters" text: prompt, negative prompt, then "Name: value" pairs."""
    config = key.config
    fields = {
        "Steps": key.steps,
        "Sampler": LUMEN_TO_A1111.get(config.sampler, config.sampler),
        "Schedule type": "Karras" if config.timestep_spacing == "karras" else config.timestep_spacing,
        "CFG scale": key.guidance_scale,
        "Seed": seed,
        "Size": f"{key.width}x{key.height}",
        "Model": model,
        "Guidance rescale": key.guidance_rescale,
    }
    if key.strength is not None:
        fields["Denoising strength"] = key.strength
    if key.eta:
        fields["Eta"] = key.eta
    if key.clip_skip:
        fields["Clip skip"] = key.clip_skip + 1  # A1111's CLIP_stop_at_last_layers
    if config.s_churn and config.sampler in ("euler", "heun"):
        fields.update({"Sigma churn": config.s_churn, "Sigma tmin": config.s_tmin,
                       "Sigma tmax": config.s_tmax, "Sigma noise": config.s_noise})
    if key.control is not None:
        for i, ((_, w, s, e), name) in enumerate(zip(key.control.units, key.control.names)):
            fields[f"ControlNet {i}"] = (f'"Model: {name}, Weight: {w:g}, Guidance Start: {s:g}, '
                                         f'Guidance End: {e:g}, Control Mode: '
                                         f'{"ControlNet is more important" if key.control.guess_mode else "Balanced"}"')
    if key.cache_interval > 1:
        fields.update({"DeepCache interval": key.cache_interval,
                       "DeepCache branch": key.cache_branch_id})
    fields["Version"] = "Lumen"
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def png_base64(image, parameters: str) -> str:
    """A PIL image as base64 PNG with a "parameters" text chunk."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode(images: list, texts: list[str]) -> list[str]:
    return [png_base64(image, text) for image, text in zip(images, texts, strict=True)]
