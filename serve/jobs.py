"""What the server queues: jobs (one per request), their loop settings, and how they fail.

A Job holds one request's images (prompt, negative prompt and seed each), the settings that
shape its loop (BatchKey) and the future its images come back on; `prepare` turns it into the
engine's inputs (text rows, plan, noise drawn from each image's own generator).
"""
import concurrent.futures
import time
from dataclasses import dataclass, field

import torch

from lumen.engine import SamplerConfig


class QueueFullError(Exception):
    """Admission refused: too many images are waiting; retry_after is a guess in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ModelError(Exception):
    """The model failed on a step (out of memory, a runtime error, non-finite latents); the
    server keeps serving."""


class DroppedError(Exception):
    """The request left before it was answered (client gone or server stopping)."""


class Interrupted(Exception):
    """POST /sdapi/v1/interrupt cancelled the request before its first step."""


INTERRUPTED = "interrupted by POST /sdapi/v1/interrupt before its first step"


@dataclass(frozen=True)
class BatchKey:
    """What shapes one request's loop; "request" batching puts only equal keys together."""

    height: int
    width: int
    steps: int
    config: SamplerConfig  # sampler, spacing and churn
    guidance_scale: float  # 1 means CFG off
    guidance_rescale: float
    eta: float
    clip_skip: int | None = None  # text-encoder layers skipped (A1111's CLIP_stop_at_last_layers - 1)
    strength: float | None = None  # image-to-image: the share of the steps that run; None: text
    inpaint: bool = False  # a mask came with the image
    masked_content: str = "original"  # where the masked region starts: the image, or "noise"
    cache_interval: int = 1  # DeepCache: the full UNet every cache_interval-th step (1: off)
    cache_branch_id: int = 0  # DeepCache's shallow branch
    control: object = None  # serve.controlnet.Control: the ControlNets used, weights, windows

    @property
    def cfg(self) -> bool:
        return self.guidance_scale != 1


@dataclass(eq=False)
class Job:
    """One request: its images' prompts and seeds, and the future its images come back on.

    request: Engine.prepare's result when the server already checked the job (else the
    scheduler prepares it when it joins). stopped: "interrupted" or "skipped" when the job was
    answered with its current x0 estimates instead of finished images.
    """

    key: BatchKey
    prompts: tuple[str, ...]  # one per image
    negative_prompts: tuple[str, ...]  # one per image
    seeds: tuple[int, ...]  # one per image
    request: dict | None = None
    image: torch.Tensor | None = None  # [1, 3, H, W] in [0, 1] for image-to-image
    mask: torch.Tensor | None = None  # [1, 1, H, W] in [0, 1], white repaints
    control_images: tuple = ()  # [1, 3, H, W] in [0, 1], one per unit of key.control
    created: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    dropped: bool = False  # the client left: free the slots at the next step boundary
    stopped: str | None = None
    started: float | None = None  # time.monotonic() of its first step
    joined: int | None = None  # the scheduler's tick count when it joined
    parts: list = field(default_factory=list)  # its slots, once it joined

    def __post_init__(self):
        assert len(self.prompts) == len(self.negative_prompts) == len(self.seeds) > 0

    @classmethod
    def prepared(cls, request: dict) -> "Job":
        """A job of an `Engine.prepare` result (benchmarks, tests): its key and texts are not read."""
        n = request["x_T"].shape[0]
        return cls(BatchKey(0, 0, 0, None, 0.0, 0.0, 0.0), ("",) * n, ("",) * n, tuple(range(n)),
                   request=request)

    @property
    def n(self) -> int:
        return len(self.seeds)

    def cancel(self) -> None:
        """Drop the job: now if it waits, at the next step boundary if it runs."""
        self.dropped = True
        self.future.cancel()

    def generators(self) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in self.seeds]


def prepare(engine, job: Job) -> dict:
    """Engine.prepare of the job's images: text rows, plan, noise (image i: seed i's generator)."""
    key = job.key
    return engine.with_config(key.config).prepare(
        prompt=list(job.prompts), negative_prompt=list(job.negative_prompts) if key.cfg else None,
        num_inference_steps=key.steps, guidance_scale=key.guidance_scale,
        guidance_rescale=key.guidance_rescale, eta=key.eta, generator=job.generators(),
        height=key.height, width=key.width, clip_skip=key.clip_skip, image=job.image,
        strength=0.8 if key.strength is None else key.strength, mask_image=job.mask,
        masked_content=key.masked_content, cache_interval=key.cache_interval,
        cache_branch_id=key.cache_branch_id,
        **(key.control.run_args(len(engine.components.controlnets), job.control_images)
           if key.control is not None else {}))
