"""ControlNet (Zhang et al., ICCV 2023): control images steer the UNet through residuals that
are added to its skip connections and its middle block.

Semantics are diffusers' ControlNet pipelines': each ControlNet sees the same rows as the UNet
(both CFG halves; in guess mode the conditional half only, the other half getting zero
residuals), its control image, and a conditioning scale; several ControlNets' residuals are
summed (MultiControlNetModel). The guidance window (control_guidance_start/end) is part of the
plan: a table of per-evaluation scales (zero outside the window) that the loop only indexes,
so the loop has no host branch on it and a captured graph holds it as a buffer.
"""
import math
from pathlib import Path

import torch

from .errors import InvalidInputError, InvalidTypeError


def load(controlnet) -> tuple:
    """The ControlNets of build(controlnet=...): a ControlNetModel, a local folder holding one,
    a built-in model's name (its own ControlNet: "default"), a MultiControlNetModel, or a list
    of those; None gives none."""
    if controlnet is None:
        return ()
    from diffusers import ControlNetModel

    items = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    if not items:
        raise InvalidInputError("controlnet=[]; expected a ControlNetModel, a folder, or a list of them")
    nets = []
    for i, item in enumerate(items):
        if hasattr(item, "nets"):  # diffusers' MultiControlNetModel
            nets.extend(item.nets)
        elif isinstance(item, ControlNetModel):
            nets.append(item)
        elif isinstance(item, (str, Path)):
            nets.append(_folder(Path(item)))
        else:
            raise InvalidTypeError(f"controlnet item {i} of type {type(item).__name__}; expected a "
                                   "diffusers ControlNetModel, a local folder holding one, or a "
                                   "MultiControlNetModel")
    return tuple(nets)


def _folder(path: Path):
    from diffusers import ControlNetModel

    from . import builtin
    from .models import _load

    if str(path) in builtin.MODEL_NAMES and not path.is_dir():
        path = builtin.model_dir(str(path)) / "controlnet"
        if not (path / "config.json").is_file():
            raise InvalidInputError(f"controlnet={path.parent.name!r}: that built-in model ships "
                                    "no ControlNet; expected 'default' or a local folder")
    if not path.is_dir():
        raise InvalidInputError(f"controlnet={str(path)!r} is not an existing local folder; "
                                "Lumen never downloads weights")
    if (path / "controlnet").is_dir() and not (path / "config.json").is_file():
        path = path / "controlnet"  # a pipeline folder's ControlNet
    return _load(ControlNetModel, path)


def check(unet, nets: tuple) -> None:
    """Refuse a ControlNet whose residuals cannot add to this UNet's."""
    for i, net in enumerate(nets):
        for name in ("cross_attention_dim", "down_block_types", "block_out_channels",
                     "layers_per_block", "addition_embed_type"):
            theirs, ours = _config(net, name), _config(unet, name)
            if theirs != ours:
                raise InvalidInputError(f"ControlNet {i} has {name}={theirs!r}, the UNet {ours!r}; "
                                        "expected a ControlNet made for this UNet (its residuals "
                                        "add to the UNet's blocks)")
        if net.config.in_channels != unet.config.out_channels:
            raise InvalidInputError(f"ControlNet {i} takes in_channels={net.config.in_channels}; "
                                    f"expected the UNet's latent channels {unet.config.out_channels}")


def _config(model, name):
    value = getattr(model.config, name, None)
    return list(value) if isinstance(value, (list, tuple)) else value


UNIT_NAMES = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")


def per_net(name: str, value, n: int) -> list:
    """One value per ControlNet: a value for all, or a list of n."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise InvalidInputError(f"{name} has {len(values)} values for {n} ControlNets; expected "
                                "one value, or one per ControlNet")
    return values


def unit_problem(scale, start, end, names: tuple = UNIT_NAMES) -> tuple[str, str] | None:
    """What is wrong with one ControlNet's scale and window (guidance start and end, fractions
    of the run), as (the value's name, a message naming it), or None; names: the caller's
    names of the three (the server's A1111 units call them weight, guidance_start, ...)."""
    for value, name, high in zip((scale, start, end), names, (math.inf, 1.0, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or not 0 <= value <= high:
            return name, f"{name}={value!r}; expected a number in [0, {high:g}]"
    if start > end:
        return names[1], f"{names[1]}={start} > {names[2]}={end}; expected start <= end"
    return None


def scales(n: int, scale, start, end, evaluations: int) -> torch.Tensor:
    """[evaluations, n] fp32: ControlNet j's conditioning scale at each evaluation point, zero
    outside its window (diffusers' controlnet_keep: point i runs when i/E >= start and
    (i + 1)/E <= end, E the run's evaluation points)."""
    scale, start, end = (per_net(name, v, n) for name, v in zip(UNIT_NAMES, (scale, start, end)))
    for j in range(n):
        problem = unit_problem(scale[j], start[j], end[j])
        if problem is not None:
            raise InvalidInputError(f"{problem[1]} (ControlNet {j})")
    table = [[scale[j] * (1.0 - float(i / evaluations < start[j] or (i + 1) / evaluations > end[j]))
              for j in range(n)] for i in range(evaluations)]
    return torch.tensor(table, dtype=torch.float32)


def images(control_image, n: int, images_per_row: int, height: int, width: int) -> list:
    """Each ControlNet's control images [N, 3, H, W] fp32 in [0, 1], one per image of the run
    (one given for all is repeated, as diffusers repeats it), or None for a ControlNet the
    request leaves out; the size must be the output's."""
    from .images import pixels

    items = control_image if n > 1 else [control_image]
    if n > 1 and (not isinstance(control_image, (list, tuple)) or len(control_image) != n):
        count = len(control_image) if isinstance(control_image, (list, tuple)) else 1
        raise InvalidInputError(f"{count} control images for {n} ControlNets; expected a list of "
                                f"{n}, one per ControlNet")
    if all(item is None for item in items):
        raise InvalidInputError(f"control_image={control_image!r}; expected an image for at least "
                                "one ControlNet (or control_image=None for none)")
    out = []
    for j, item in enumerate(items):
        if item is None:
            out.append(None)
            continue
        image = pixels(item)
        if tuple(image.shape[2:]) != (height, width):
            raise InvalidInputError(f"control image {j} is {image.shape[2]}x{image.shape[3]} "
                                    f"(height x width); expected the output's {height}x{width} "
                                    "(Lumen does not resize)")
        if image.shape[0] not in (1, images_per_row):
            raise InvalidInputError(f"control image {j} holds {image.shape[0]} images; expected 1 "
                                    f"or one per image ({images_per_row})")
        out.append(image.expand(images_per_row, -1, -1, -1) if image.shape[0] == 1 else image)
    return out


def used(control: dict) -> tuple[int, ...]:
    """The indices of the ControlNets a request's control inputs use."""
    return tuple(sorted(int(k.removeprefix("image")) for k in control if k.startswith("image")))


def run(net, sample, t, emb, added: dict, image, scale, guess_mode) -> tuple[list, object]:
    """One ControlNet's (down, mid) residuals over the rows of sample, each level weighted as
    diffusers' ControlNetModel weights it (`level_weights`), the product taken in fp32 and
    rounded once to the residuals' dtype as diffusers' `sample * scale` is. scale: fp32, 0-dim
    or one per row; guess_mode: a bool, or [rows] fp32 1/0 (a step graph's rows differ)."""
    d, m = net(sample, t, encoder_hidden_states=emb, controlnet_cond=image, conditioning_scale=1.0,
               guess_mode=False, added_cond_kwargs=added or None, return_dict=False)
    weight = level_weights(net, len(d) + 1, scale, guess_mode)
    return ([(x * weight[..., i].reshape(-1, 1, 1, 1)).to(x.dtype) for i, x in enumerate(d)],
            (m * weight[..., -1].reshape(-1, 1, 1, 1)).to(m.dtype))


def level_weights(net, levels: int, scale, guess_mode):
    """[levels] (or [rows, levels]) fp32: the conditioning scale of each residual level, times
    ControlNet's guess-mode weights (logspace from 0.1 to 1, shallowest first; none for a
    ControlNet with global_pool_conditions), as ControlNetModel's step 6 computes them."""
    logspace = torch.logspace(-1, 0, levels, device=scale.device)
    if getattr(net.config, "global_pool_conditions", False):
        guess_mode = False
    if isinstance(guess_mode, bool):
        factor = logspace if guess_mode else torch.ones_like(logspace)
        return scale[..., None] * factor
    return scale[:, None] * torch.where(guess_mode[:, None] > 0, logspace, torch.ones_like(logspace))


def residuals(nets: tuple, sample, t, emb, added: dict, control: dict, k: int, cfg: bool,
              guess_mode: bool) -> dict:
    """{"down": [...], "mid": ...}: the summed residuals of every ControlNet at evaluation k.

    sample, emb, added: the UNet's rows ([negative, positive] with CFG); control: "image{j}"
    (ControlNet j's images, rows like the ControlNet's input; absent for a ControlNet the request
    leaves out) and "scales" [E, n].
    """
    half = guess_mode and cfg  # guess mode: the ControlNets see the conditional half only
    if half:
        n = sample.shape[0] // 2
        sample, emb = sample[n:], emb[n:]
        added = {key: v[n:] for key, v in added.items()}
    down = mid = None
    for j, net in enumerate(nets):
        if f"image{j}" not in control:
            continue
        d, m = run(net, sample, t, emb, added, control[f"image{j}"], control["scales"][k, j],
                   guess_mode)
        down = list(d) if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    if half:  # the unconditional half gets no control
        down = [torch.cat([torch.zeros_like(d), d]) for d in down]
        mid = torch.cat([torch.zeros_like(mid), mid])
    return {"down": down, "mid": mid}
