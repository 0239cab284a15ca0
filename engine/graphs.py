"""Whole-loop CUDA graphs: one request is one replay of S x [UNet, fused guided step].

The loop (`Engine.loop`) has no host sync and no host-to-device copy, so it is captured once per
GraphKey and replayed. Every value a request may change without changing a shape (latents,
embeddings, SDXL's added conditioning, guidance scale, rescale, the plan's coefficients, eta's
step noise) lives in a static input buffer that is copied into before each replay; only a new
shape or loop structure (batch, latent size, sequence length, steps, sampler, CFG on/off, step
noise on/off, prediction type, kernels, initial-step model) is a new key and a new capture.

Graphs share one memory pool. That is safe here because every load, replay and output clone
runs under the cache's lock on the cache's own CUDA stream, so replays are serialised on the
GPU too (whatever stream each caller uses), and each output is cloned before any other replay:
no graph's live output can sit in memory that another graph's replay reuses.
"""
import contextlib
import logging
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from .errors import InvalidInputError, LumenError
from .samplers import DevicePlan

log = logging.getLogger("lumen")
PLAN_TENSORS = tuple(f.name for f in fields(DevicePlan) if f.name != "plan")
# Captures of every engine in the process, one at a time: torch captures on a default side
# stream that two engines capturing from two threads would otherwise share.
CAPTURE_LOCK = threading.Lock()


@dataclass(frozen=True)
class GraphKey:
    """What fixes a captured loop's shapes and structure; everything else is buffer contents."""

    batch: int  # images per request (the UNet sees 2x this with CFG)
    height: int  # latent height
    width: int  # latent width
    seq_len: int  # text tokens
    steps: int
    sampler: str
    dtype: str
    backend: str
    cfg: bool  # guidance_scale != 1: the negative batch is run
    corrector: tuple[bool, ...] = ()  # Heun's per-step second evaluation (depends on the schedule)
    noise: bool = False  # the plan draws step noise (DDIM eta > 0, EDM churn)
    prediction_type: str = "v_prediction"  # the model-output conversion inside the loop
    kernels: str = "reference"  # the step implementation captured: "triton" or "reference"
    initial_step: bool = False  # a SingDiffusion hand-over runs before the loop
    inpaint: str = ""  # "concat": a 9-channel UNet's extra inputs; "blend": the kept region
    deepcache: tuple = ()  # DeepCache's (interval, branch id): which steps run the full UNet
    controlnets: tuple = ()  # the indices of the ControlNets run beside the UNet
    guess_mode: bool = False  # the ControlNets see the conditional rows only


@dataclass
class StaticInputs:
    """The buffers a captured loop reads; `load` copies one request's values into them."""

    emb: torch.Tensor  # [2N or N, L, D] model dtype
    x_T: torch.Tensor  # [N, C, h, w] fp32
    noise: torch.Tensor | None  # [N, S, C, h, w] fp32; None when the plan draws none
    w: torch.Tensor  # 0-dim fp32 guidance scale
    phi: torch.Tensor  # 0-dim fp32 guidance rescale
    plan: DevicePlan  # timesteps, a, s, coef, a_start, s_start as device tensors
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL text_embeds, time_ids
    inpaint: dict[str, torch.Tensor] = field(default_factory=dict)  # mask, kept latents
    control: dict[str, torch.Tensor] = field(default_factory=dict)  # control images, scale table

    @classmethod
    def like(cls, emb, x_T, noise, w, phi, plan: DevicePlan, added, inpaint=None,
             control=None) -> "StaticInputs":
        """Fresh buffers with the request's values (allocated outside any capture)."""
        def copy(t):
            return None if t is None else t.detach().clone(memory_format=torch.contiguous_format)
        tensors = {name: copy(getattr(plan, name)) for name in PLAN_TENSORS}
        return cls(copy(emb), copy(x_T), copy(noise), copy(w), copy(phi),
                   DevicePlan(plan.plan, **tensors), {k: copy(v) for k, v in added.items()},
                   {k: copy(v) for k, v in (inpaint or {}).items()},
                   {k: copy(v) for k, v in (control or {}).items()})

    def load(self, emb, x_T, noise, w, phi, plan: DevicePlan, added, inpaint=None,
             control=None) -> None:
        """Copy one request's values in (device-to-device, on the current stream)."""
        pairs = [(self.emb, emb), (self.x_T, x_T), (self.noise, noise), (self.w, w),
                 (self.phi, phi)] + [(getattr(self.plan, n), getattr(plan, n)) for n in PLAN_TENSORS]
        pairs += [(self.added[k], v) for k, v in added.items()]
        pairs += [(self.inpaint[k], v) for k, v in (inpaint or {}).items()]
        pairs += [(self.control[k], v) for k, v in (control or {}).items()]
        for static, value in pairs:
            if static is not None:  # noise is None in both or in neither: it is part of the key
                static.copy_(value)

    def args(self):
        return (self.emb, self.x_T, self.noise, self.plan, self.w, self.phi, self.added,
                self.inpaint, self.control)

    @property
    def device(self) -> torch.device:
        return self.x_T.device


@dataclass
class CapturedLoop:
    """One captured loop: its static inputs, its output buffer and how to replay it."""

    inputs: object  # StaticInputs, or a step graph's (engine.step_graphs): .args(), .device
    output: torch.Tensor | tuple  # [N, C, h, w] fp32 (a step graph: x0 and eps), overwritten by every replay
    replay: Callable[[], None]
    capture_s: float  # warm-up + capture wall time
    keepalive: object = None  # the captured loop and its runner: their memory is in the graph


class CaptureError(RuntimeError):
    """The loop ran (warm-up) but could not be captured into a CUDA graph."""


class GraphCaptureError(LumenError, RuntimeError):
    """A request's loop could not be captured; the message names the cause and the way out."""


def capture_cuda(loop: Callable[[], torch.Tensor], pool, warmup: int = 1):
    """(replay, output): warm `loop` up on a side stream, then capture it into one CUDA graph.

    Warm-up errors propagate as they are; a failure during capture becomes CaptureError, with
    the caller's stream restored (torch.cuda.graph does not restore it when capture_end fails).
    """
    caller = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(caller)
    with torch.cuda.stream(side):
        for _ in range(warmup):  # lazy init, cuBLAS workspaces, Triton/torch.compile autotuning
            loop()
    caller.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: other threads' allocations and syncs neither fail nor break this capture
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            output = loop()
    except Exception as err:
        torch.cuda.set_stream(caller)
        # capture_end's error hides the first failure inside the capture: report that one.
        cause = err.__context__ if err.__context__ is not None else err
        raise CaptureError(f"{type(cause).__name__}: {cause}") from err
    return graph.replay, output


class GraphCache:
    """Captured loops by GraphKey, least recently used evicted beyond `capacity`; one pool."""

    def __init__(self, capacity: int = 8, capture=capture_cuda):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InvalidInputError(f"graph_cache_size={capacity!r}; expected an int >= 1")
        self.capacity, self.capture = capacity, capture
        self.entries: OrderedDict[GraphKey, CapturedLoop] = OrderedDict()
        self.captures = self.replays = self.evictions = 0
        self.lock = threading.Lock()
        self._pool = None
        self._stream = None  # CUDA stream of every load, replay and clone

    def keys(self) -> list[GraphKey]:
        """Cached keys, least recently used first."""
        return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key) -> bool:
        return key in self.entries

    def clear(self) -> None:
        """Drop every graph and the pool they shared (its memory returns with the last graph)."""
        with self.lock:
            self.entries.clear()
            self._pool = None

    def run(self, key: GraphKey, make_loop: Callable[[], Callable[..., torch.Tensor]], emb, x_T,
            noise, plan, w, phi, added, inpaint=None, control=None) -> torch.Tensor:
        """loop(emb, x_T, noise, plan, w, phi, added, inpaint, control)'s result, from a replay
        of key's graph.

        make_loop() gives the loop to capture; it is called only when key is not cached.
        """
        return self.replay(key, make_loop,
                           lambda: StaticInputs.like(emb, x_T, noise, w, phi, plan, added, inpaint,
                                                     control),
                           lambda inputs: inputs.load(emb, x_T, noise, w, phi, plan, added, inpaint,
                                                      control),
                           x_T.device)

    def replay(self, key, make_fn: Callable, new_inputs: Callable, load: Callable, device):
        """fn(*inputs.args())'s result (a tensor or a tuple of them) from a replay of key's graph.

        On a miss, make_fn() gives the function to capture and new_inputs() its static inputs;
        on a hit, load(inputs) copies the new values into the cached entry's inputs.
        """
        with self.lock, torch.inference_mode(), self._ordered(device) as done:
            entry = self.entries.get(key)
            if entry is None:
                entry = self._capture(key, make_fn(), new_inputs())
            else:
                self.entries.move_to_end(key)
                load(entry.inputs)
            entry.replay()
            self.replays += 1
            # the buffers are overwritten by the next replay
            if isinstance(entry.output, tuple):
                out = tuple(t.clone() for t in entry.output)
            else:
                out = entry.output.clone()
            done.extend(out if isinstance(out, tuple) else (out,))
        return out

    @contextlib.contextmanager
    def _ordered(self, device: torch.device):
        """On CUDA: run the body on `device` and the cache's stream, ordered after the caller's
        stream, and the caller's stream after it; tensors put in the yielded list are recorded
        as used by the caller's stream."""
        done: list[torch.Tensor] = []
        if device.type != "cuda":
            yield done
            return
        with torch.cuda.device(device):
            caller = torch.cuda.current_stream()
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            self._stream.wait_stream(caller)
            with torch.cuda.stream(self._stream):
                yield done
            caller.wait_stream(self._stream)
            for t in done:
                t.record_stream(caller)

    def _capture(self, key, loop, inputs) -> CapturedLoop:
        """Warm up and capture; a failed capture raises, leaving no entry.

        A capture that failed may leave the CUDA allocator inside an unfinished capture, so
        running on eagerly in the same process is not known to be safe: the error says so.
        """
        if self._pool is None and inputs.device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        start = time.perf_counter()
        try:
            with CAPTURE_LOCK:
                replay, output = self.capture(lambda: loop(*inputs.args()), self._pool)
        except CaptureError as err:  # e.g. a backend op that cannot be captured
            raise GraphCaptureError(f"CUDA graph capture failed for {key}: {err}; build the "
                                    "engine with cuda_graph=False to run this model eagerly") from err
        entry = CapturedLoop(inputs, output, replay, time.perf_counter() - start, loop)
        self.captures += 1
        self.entries[key] = entry
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
            self.evictions += 1
        log.info("captured %s in %.2f s", key, entry.capture_s)
        return entry


def inpaint_kind(inpaint: dict) -> str:
    """GraphKey.inpaint of a request's inpainting inputs: "", "concat" or "blend"."""
    return "concat" if "cond" in inpaint else "blend" if "mask" in inpaint else ""


def graph_runner(runner):
    """The runner a captured loop uses: its own, for runners with per-graph state (for_graph)."""
    for_graph = getattr(runner, "for_graph", None)
    return for_graph() if for_graph is not None else runner


def graph_runners(runners: tuple) -> tuple:
    """graph_runner of each runner (the ControlNets')."""
    return tuple(graph_runner(r) for r in runners)


def resolve_mode(cuda_graph, device: torch.device, backend: str) -> bool:
    """Whether the engine replays captured loops; CPU is a no-op that says so once."""
    if not (isinstance(cuda_graph, bool) or cuda_graph == "auto"):
        raise InvalidInputError(f"cuda_graph={cuda_graph!r}; expected 'auto', True or False")
    if cuda_graph is False:
        return False
    if device.type != "cuda":
        message = f"cuda_graph={cuda_graph!r} on {device}: CUDA graphs need a CUDA device; running eagerly"
        if cuda_graph is True:  # asked for explicitly: a warning (Python shows it once)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        else:
            log.info(message)
        return False
    if backend == "onnxruntime":
        if cuda_graph is True:
            raise InvalidInputError("cuda_graph=True with backend='onnxruntime': onnxruntime runs "
                                    "on its own stream and syncs once per call, so the loop cannot "
                                    "be captured; use backend 'torch' or 'tensorrt', or "
                                    "cuda_graph=False")
        return False
    return True

