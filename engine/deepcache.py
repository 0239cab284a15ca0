"""DeepCache (Ma et al., CVPR 2024): reuse a UNet's deep features between full steps.

Every `interval`-th step of a run (the first included) runs the whole UNet and keeps each
block's output. The steps between run only the shallow branch picked by `branch_id`
(block = id // 3, layer = id % 3, DeepCache's own numbering): conv_in, the down path up to
that layer, and the up path from its mirror, reusing the kept outputs of everything deeper.
Which modules run is decided on the host from the step index alone, never from a tensor, so a
captured loop holds the choice for each step. The rule and the module numbering are DeepCache's
`DeepCacheSDHelper`'s, so an image equals that helper's on the same pipeline
(tests/test_deepcache.py).
"""
import contextlib
import threading

from .errors import InvalidInputError

_LOCK = threading.Lock()  # one run at a time may wrap a UNet's modules


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


class DeepCache:
    """The skip rule and the kept outputs of one run; `skip` is set before each UNet call."""

    def __init__(self, interval: int, branch_id: int):
        self.interval, self.block, self.layer = interval, branch_id // 3, branch_id % 3
        self.skip = False
        self.kept: dict = {}

    def set_step(self, step: int) -> None:
        """Step `step` of the run (0 first): a full step every interval-th one."""
        self.skip = step % self.interval != 0

    def skipped(self, block: int, layer: int, kind: str) -> bool:
        """DeepCache's rule: on a shallow step, what lies deeper than the branch is reused."""
        if not self.skip:
            return False
        if kind == "mid" or block > self.block:
            return True
        if block < self.block:
            return False
        return layer >= self.layer if kind == "down" else layer > self.layer

    def wrap(self, module, key: tuple, block: int, layer: int, kind: str, restore: list) -> None:
        forward = module.forward
        restore.append((module, forward))

        def cached(*args, **kwargs):
            if self.skipped(block, layer, kind):
                return self.kept[key]
            out = self.kept[key] = forward(*args, **kwargs)
            return out
        module.forward = cached

    @contextlib.contextmanager
    def active(self, unet):
        """Wrap the UNet's blocks (numbered as DeepCache numbers them) for one run."""
        with _LOCK:
            restore: list = []
            try:
                self.wrap_all(unet, restore)
                yield self
            finally:
                for module, forward in reversed(restore):
                    module.forward = forward
                self.kept.clear()

    def wrap_all(self, unet, restore: list) -> None:
        for b, block in enumerate(unet.down_blocks):
            for i, attention in enumerate(getattr(block, "attentions", None) or []):
                self.wrap(attention, ("down", "attn", b, i), b, i, "down", restore)
            for i, resnet in enumerate(block.resnets):
                self.wrap(resnet, ("down", "resnet", b, i), b, i, "down", restore)
            for sampler in block.downsamplers or []:
                self.wrap(sampler, ("down", "sampler", b), b, len(block.resnets), "down", restore)
            self.wrap(block, ("down", "block", b), b, 0, "down", restore)
        self.wrap(unet.mid_block, ("mid",), 0, 0, "mid", restore)
        count = len(unet.up_blocks)
        for u, block in enumerate(unet.up_blocks):
            b, layers = count - u - 1, len(block.resnets)
            for i, attention in enumerate(getattr(block, "attentions", None) or []):
                self.wrap(attention, ("up", "attn", b, i), b, layers - i - 1, "up", restore)
            for i, resnet in enumerate(block.resnets):
                self.wrap(resnet, ("up", "resnet", b, i), b, layers - i - 1, "up", restore)
            for sampler in block.upsamplers or []:
                self.wrap(sampler, ("up", "sampler", b), b, 0, "up", restore)
            self.wrap(block, ("up", "block", b), b, 0, "up", restore)
