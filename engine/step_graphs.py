"""Step graphs: the step scheduler's model step, captured per bucket and size and replayed.

As LLM servers capture one decode step per batch size, the scheduler captures
`engine.slots.model_step` (the UNet call over every row, then the fused CFG + rescale + x0/eps
launches with per-sample scalars) once per StepKey: the CFG images and the other images each
padded up to a bucket (1, 2, 4, 8, ...), one latent and text shape, one dtype, backend,
prediction type and kernel choice. Each replay loads the running images' values into the
graph's static inputs; padded images hold finite filler (or an earlier image's values) and
their outputs are dropped. Samples never mix inside the UNet or the fused launches, so padding
changes no real image beyond the UNet's batch-size-dependent rounding.

ControlNet rows replay too: the step runs each ControlNet the tick uses over every row, weighted
by each row's own scale (zero where a row, or padding, does not use it), so the graph depends on
which ControlNets run, not on which rows use them (StepInputs.dense_control).

The sampler updates after the step stay eager: each image has its own sampler, and one graph
per mix of samplers would multiply the captures. The whole-loop graph (engine.graphs) stays
what `Engine.run` replays.
"""
import dataclasses
from dataclasses import dataclass

import torch

from lumen import kernels

from .graphs import GraphCache, graph_runner, graph_runners
from .slots import StepInputs, model_step

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket(n: int) -> int:
    """The captured size for n images: 0, a BUCKETS entry, or beyond them a multiple of 64."""
    if n == 0:
        return 0
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // BUCKETS[-1]) * BUCKETS[-1]


@dataclass(frozen=True)
class StepKey:
    """What fixes a step graph's shapes and structure; everything else is buffer contents."""

    cfg_images: int  # bucket of the images with CFG (two UNet rows each)
    plain_images: int  # bucket of the others (one row each)
    latent: tuple[int, ...]  # (C, h, w)
    text: tuple[int, ...]  # (L, D)
    added: tuple  # SDXL's added conditioning: (name, row shape) pairs
    dtype: str
    backend: str
    prediction_type: str
    kernels: str  # "triton" or "reference"
    cond: bool = False  # a 9-channel inpainting UNet's mask and masked-image rows
    controlnets: tuple = ()  # the ControlNets any row uses: (index, control image shape) pairs


def step_key(engine, inputs: StepInputs) -> StepKey:
    n = inputs.x.shape[0]
    return StepKey(bucket(inputs.n_cfg), bucket(n - inputs.n_cfg), tuple(inputs.x.shape[1:]),
                   tuple(inputs.emb.shape[1:]),
                   tuple((k, tuple(v.shape[1:])) for k, v in sorted(inputs.added.items())),
                   str(engine.dtype).removeprefix("torch."), engine.backend,
                   engine.config.prediction_type,
                   "triton" if kernels.use_triton(inputs.x) else "reference", inputs.cond is not None,
                   tuple((int(k.removeprefix("image")), tuple(v.shape[1:]))
                         for k, v in sorted((inputs.control or {}).items()) if k.startswith("image")))


def image_rows(n_cfg: int, n: int, key: StepKey) -> torch.Tensor:
    """Where the n real images sit among the bucket's images: CFG ones first, then the others."""
    return torch.cat([torch.arange(n_cfg), key.cfg_images + torch.arange(n - n_cfg)])


def text_rows(n_cfg: int, n: int, key: StepKey) -> torch.Tensor:
    """Where the real text rows sit: [neg (CFG), pos (CFG), the others], each part padded."""
    cb = key.cfg_images
    return torch.cat([torch.arange(n_cfg), cb + torch.arange(n_cfg), 2 * cb + torch.arange(n - n_cfg)])


def empty_inputs(inputs: StepInputs, key: StepKey) -> StepInputs:
    """Static buffers of the bucket's size: finite filler (abar = 1/2, w = 1, phi = 0)."""
    n = key.cfg_images + key.plain_images
    rows = n + key.cfg_images

    def zeros(t: torch.Tensor, count: int) -> torch.Tensor:
        return torch.zeros((count, *t.shape[1:]), dtype=t.dtype, device=t.device)

    def full(t: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full((n,), value, dtype=t.dtype, device=t.device)
    control = None if inputs.control is None else {  # scale 0: a padded row gets no residual
        k: zeros(v, rows) for k, v in inputs.control.items()}
    return StepInputs(key.cfg_images, zeros(inputs.x, n), zeros(inputs.t, n),
                      zeros(inputs.emb, rows), {k: zeros(v, rows) for k, v in inputs.added.items()},
                      full(inputs.a, 0.5**0.5), full(inputs.s, 0.5**0.5), full(inputs.w, 1.0),
                      full(inputs.phi, 0.0), None if inputs.cond is None else zeros(inputs.cond, rows),
                      control=control)


def load(static: StepInputs, inputs: StepInputs, key: StepKey) -> None:
    """Copy the real images' values into their rows of the static buffers (on the device)."""
    n = inputs.x.shape[0]
    images = image_rows(inputs.n_cfg, n, key).to(inputs.device)
    text = text_rows(inputs.n_cfg, n, key).to(inputs.device)
    for name in ("x", "t", "a", "s", "w", "phi"):
        getattr(static, name).index_copy_(0, images, getattr(inputs, name))
    static.emb.index_copy_(0, text, inputs.emb)
    if inputs.cond is not None:
        static.cond.index_copy_(0, text, inputs.cond)
    for k, v in inputs.added.items():
        static.added[k].index_copy_(0, text, v)
    for k, v in (inputs.control or {}).items():
        static.control[k].index_copy_(0, text, v)


def run_graphed(engine, graphs: GraphCache, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """model_step's (x0, eps) of the real images, from a replay of their bucket's graph."""
    inputs = dataclasses.replace(inputs, control=inputs.dense_control(), owners=None)
    key = step_key(engine, inputs)

    def make_step():
        runner, nets = graph_runner(engine.runner), graph_runners(engine.control_runners)

        def step(x, t, emb, added, a, s, w, phi, cond, control):
            return model_step(engine, runner, StepInputs(key.cfg_images, x, t, emb, added, a, s, w,
                                                         phi, cond, control=control), nets)
        return step

    def new_inputs() -> StepInputs:
        static = empty_inputs(inputs, key)
        load(static, inputs, key)
        return static
    x0, eps = graphs.replay(key, make_step, new_inputs, lambda static: load(static, inputs, key),
                            inputs.device)
    rows = image_rows(inputs.n_cfg, inputs.x.shape[0], key).to(inputs.device)
    return x0.index_select(0, rows), eps.index_select(0, rows)
