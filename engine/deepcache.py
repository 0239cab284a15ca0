"""DeepCache (Ma et al., CVPR 2024): reuse a UNet's deep features between full steps.

Every `interval`-th step of a run (the first included) runs the whole UNet and keeps each
block's output. The steps between run only the shallow branch picked by `branch_id`
(block = id // 3, layer = id % 3, DeepCache's own numbering): conv_in, the down path up to
that layer, and the up path from its mirror, reusing the kept outputs of everything deeper.
Which modules run is decided on the host from the step index alone, never from a tensor, so a
captured loop holds the choice for each step. The rule and the module numbering are DeepCache's
`DeepCacheSDHelper`'s, so an image equals that helper's on the same pipeline
(tests/test_deepcache.py).

The cached UNet is a clone of the engine's: new module objects sharing every parameter and
buffer, whose blocks consult a `Switch` (off, full, or shallow at a branch) on each call. The
engine's own UNet stays untouched, so runs without DeepCache go on concurrently, and the
clone's wrappers never change, so torch.compile compiles the clone once per switch setting.
"""
import copy
import itertools
import threading

import torch

from .errors import InvalidInputError
from .samplers import evaluation_steps

def check(unet, branch_id: int) -> None:
    """Refuse a UNet DeepCache can't split and a branch it lacks (the interval is the caller's)."""
    from .validation import check_int

    for name in ("down_blocks", "mid_block", "up_blocks"):
        if getattr(unet, name, None) is None:
            raise InvalidInputError(f"a UNet without {name} ({type(unet).__name__}); DeepCache "
                                    "splits a diffusers UNet2DConditionModel's down, mid and up blocks")
    check_int("cache_branch_id", branch_id, 0, largest_branch(unet))


def largest_branch(unet) -> int:
    """The largest branch id: the last down block's last layer DeepCache can number (0-2)."""
    blocks = unet.down_blocks
    return 3 * (len(blocks) - 1) + min(len(blocks[-1].resnets), 3) - 1


def schedule(plan, interval: int) -> tuple[bool, ...]:
    """DeepCache's uniform schedule: per evaluation point of a run, whether it runs the whole
    UNet (every interval-th step, the first included; Heun's corrector shares its step's)."""
    return tuple(step % interval == 0 for step in evaluation_steps(plan))


class Switch:
    """What the clone's blocks do on the next call: run plainly (mode None), run and keep their
    outputs ("full"), or return the kept outputs of what lies deeper than the branch
    ("shallow"). `kept` maps each block's key to its output; `where` each key to its place in
    DeepCache's numbering. Whoever sets it holds `lock` until its calls are done: one cached run
    (or scheduler call) at a time per clone; other clones, and the UNet itself, go on."""

    def __init__(self):
        self.lock = threading.Lock()
        self.mode: str | None = None
        self.block = self.layer = 0
        self.kept: dict = {}
        self.where: dict = {}

    def set(self, mode: str | None, branch_id: int = 0) -> None:
        self.mode, self.block, self.layer = mode, branch_id // 3, branch_id % 3

    def deeper(self, key: tuple) -> bool:
        """DeepCache's rule: whether the block's output is reused on a shallow step."""
        block, layer, kind = self.where[key]
        if kind == "mid" or block > self.block:
            return True
        if block < self.block:
            return False
        return layer >= self.layer if kind == "down" else layer > self.layer

    def reused(self) -> list[tuple]:
        """The keys a shallow call at the current branch reads from `kept`."""
        return [key for key in self.where if self.deeper(key)]


def clone(unet) -> tuple[torch.nn.Module, Switch]:
    """A copy of the UNet's modules sharing its parameters and buffers, wired to a new Switch."""
    shared = {id(t): t for t in itertools.chain(unet.parameters(), unet.buffers())}
    twin = copy.deepcopy(unet, shared)
    switch = Switch()
    for module, key, place in numbered(twin):
        switch.where[key] = place
        wrap(module, key, switch)
    return twin, switch


def wrap(module, key: tuple, switch: Switch) -> None:
    forward = module.forward

    def cached(*args, **kwargs):
        if switch.mode == "shallow" and switch.deeper(key):
            return switch.kept[key]
        out = forward(*args, **kwargs)
        if switch.mode == "full" and switch.deeper(key):  # what the shallow calls after it reuse
            switch.kept[key] = out
        return out
    module.forward = cached


def numbered(unet):
    """(module, key, (block, layer, kind)) of each block DeepCache numbers, as it numbers them."""
    for b, block in enumerate(unet.down_blocks):
        for i, attention in enumerate(getattr(block, "attentions", None) or []):
            yield attention, ("down", "attn", b, i), (b, i, "down")
        for i, resnet in enumerate(block.resnets):
            yield resnet, ("down", "resnet", b, i), (b, i, "down")
        for sampler in block.downsamplers or []:
            yield sampler, ("down", "sampler", b), (b, len(block.resnets), "down")
        yield block, ("down", "block", b), (b, 0, "down")
    yield unet.mid_block, ("mid",), (0, 0, "mid")
    count = len(unet.up_blocks)
    for u, block in enumerate(unet.up_blocks):
        b, layers = count - u - 1, len(block.resnets)
        for i, attention in enumerate(getattr(block, "attentions", None) or []):
            yield attention, ("up", "attn", b, i), (b, layers - i - 1, "up")
        for i, resnet in enumerate(block.resnets):
            yield resnet, ("up", "resnet", b, i), (b, layers - i - 1, "up")
        for sampler in block.upsamplers or []:
            yield sampler, ("up", "sampler", b), (b, 0, "up")
        yield block, ("up", "block", b), (b, 0, "up")


def rows_of(keys: list[tuple], sources: list[tuple]) -> dict:
    """The kept outputs of `keys` for a call's rows: row r is row sources[r][1] of the outputs
    sources[r][0] kept (each image reads its own last full call's features)."""
    return {key: _cat([_row(outputs[key], p) for outputs, p in sources]) for key in keys}


def _row(out, p: int):
    """Row p of a block's output (a tensor or a tuple of them, as UNet blocks return)."""
    if isinstance(out, torch.Tensor):
        return out[p:p + 1]
    return type(out)(_row(v, p) for v in out)


def _cat(parts: list):
    """Rows of block outputs stacked back into one output."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0])(_cat(list(v)) for v in zip(*parts))
