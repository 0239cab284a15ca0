"""TensorRT engine from the exported ONNX, and a runner on the current torch CUDA stream.

One code path for TensorRT 10.x and 11.x: networks are strongly typed (precision comes from the
ONNX graph, exported in the target dtype), so no FP16/BF16 builder flags, which 11.x removed.
10.x needs NetworkDefinitionCreationFlag.STRONGLY_TYPED; 11.x accepts and ignores it.
"""
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Protocol

import torch

from lumen.engine.errors import BackendUnavailableError, InvalidInputError, LumenError

from .cache import ArtifactCache, CacheWarning, atomic_write_bytes
from .controlnet_export import ExportedControlNet
from .onnx_export import OUTPUT, UNetSignature, check_latent_size
from .progress import Progress

PLAN_FILE = "unet.plan"
CONTROL_PLAN_FILE = "controlnet.plan"
Shape = tuple[int, int, int]  # (batch, latent height, latent width)


class Signature(Protocol):
    """A graph's inputs as a profile sets them (onnx_export.UNetSignature, a ControlNet's
    controlnet_export.ControlSignature): every dynamic input's full shape at one latent size."""

    def input_shapes(self, batch: int, height: int, width: int,
                     seq: int) -> dict[str, tuple[int, ...]]: ...


class EngineBuildError(LumenError, RuntimeError):
    """TensorRT could not parse the ONNX file or build or load an engine from it."""


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or BackendUnavailableError naming the fallbacks.

    Callers then `import tensorrt as trt` themselves, so mypy checks them against the stubs.
    """
    fallback = "fall back to backend 'onnxruntime' or 'torch'"
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailableError(f"backend 'tensorrt' needs the tensorrt package (pip "
                                      f"install tensorrt) and a CUDA GPU; {fallback}") from e
    # tensorrt-stubs alone leaves a bare `tensorrt/` folder that imports as a namespace package.
    if not hasattr(trt, "Builder"):
        raise BackendUnavailableError(f"'tensorrt' imports but has no Builder (only type stubs "
                                      f"are installed?); install tensorrt, or {fallback}")
    return trt


def check_available(device: torch.device) -> None:
    """Raise before any export if TensorRT cannot run on device."""
    import_tensorrt()
    if device.type != "cuda" or not torch.cuda.is_available():
        raise BackendUnavailableError(f"backend 'tensorrt' needs a CUDA device, got {device} "
                                      f"(CUDA available: {torch.cuda.is_available()}); fall back "
                                      f"to backend 'onnxruntime' or 'torch'")


@dataclass(frozen=True)
class Profile:
    """One optimization profile: min/opt/max (batch, latent H, latent W) and sequence lengths."""

    min: Shape
    opt: Shape
    max: Shape
    seq: tuple[int, int, int] = (77, 77, 77)

    def __post_init__(self):
        for name in ("min", "opt", "max", "seq"):
            value = getattr(self, name)
            if (len(value) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                       for v in value)):
                raise InvalidInputError(f"profile {name}={value!r}; expected 3 positive ints")
        for axis in range(3):
            lo, mid, hi = self.min[axis], self.opt[axis], self.max[axis]
            if not lo <= mid <= hi:
                raise InvalidInputError(f"profile {self}: axis {axis} has min {lo}, opt {mid}, "
                                        f"max {hi}; expected min <= opt <= max")
        if not self.seq[0] <= self.seq[1] <= self.seq[2]:
            raise InvalidInputError(f"profile seq={self.seq}; expected min <= opt <= max")

    def check_multiple(self, multiple: int) -> None:
        for shape in (self.min, self.opt, self.max):
            check_latent_size(shape[1], shape[2], multiple)

    def contains(self, batch: int, height: int, width: int, seq: int) -> bool:
        inside = all(lo <= v <= hi for lo, v, hi in zip(self.min, (batch, height, width), self.max))
        return inside and self.seq[0] <= seq <= self.seq[2]

    def describe(self) -> str:
        (b0, h0, w0), (b1, h1, w1) = self.min, self.max
        return (f"batch {b0}..{b1}, latent {h0}x{w0}..{h1}x{w1}, "
                f"sequence {self.seq[0]}..{self.seq[2]}")

    def input_shapes(self, sig: Signature) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Input name -> (min, opt, max) full shapes; the 0-dim timestep is static."""
        levels = [sig.input_shapes(*bhw, seq)
                  for bhw, seq in zip((self.min, self.opt, self.max), self.seq)]
        return {name: tuple(level[name] for level in levels) for name in levels[0]}


def network_flags() -> int:
    import tensorrt as trt

    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(onnx_path: Path, plan_path: Path, profile: Profile, sig: Signature, *,
                 optimization_level: int = 3, timing_cache: Path | None = None,
                 progress: Progress | None = None) -> None:
    """Parse onnx_path, build a strongly typed engine for profile, write plan_path."""
    import_tensorrt()
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    trt_profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.input_shapes(sig).items():
        trt_profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(mid)), trt.Dims(list(hi)))
    config.add_optimization_profile(trt_profile)
    set_timing_cache(config, timing_cache)
    monitor = make_progress_monitor(progress)
    if monitor is not None:
        config.progress_monitor = monitor
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} returned no engine for {onnx_path} "
                               f"with profile {profile.describe()}; see the TensorRT log above")
    plan_path.write_bytes(memoryview(plan))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))


def set_timing_cache(config: Any, path: Path | None) -> None:
    """Reuse tactic timings across builds; an unreadable cache file only costs build time."""
    data = path.read_bytes() if path is not None and path.exists() else b""
    try:
        cache = config.create_timing_cache(data)
        usable = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except (RuntimeError, TypeError, ValueError):
        usable = False
    if not usable:
        warnings.warn(f"TensorRT timing cache {path} is unusable; starting an empty one",
                      CacheWarning, stacklevel=2)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def make_progress_monitor(progress: Progress | None) -> Any:
    """A trt.IProgressMonitor printing top-level build phases; None when progress is off."""
    if progress is None or not progress.enabled:
        return None
    import tensorrt as trt

    note = progress.note

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                self.steps[phase_name] = num_steps
                note(f"  TensorRT: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            if phase_name in self.steps:
                note(f"  TensorRT: {phase_name} done")

    return Monitor()


def trt_key_fields(onnx_sha256: str, profile: Profile, device: torch.device,
                   optimization_level: int) -> dict[str, Any]:
    """The ONNX file's hash covers weights, config, dtype and exporter; the rest is the build."""
    import_tensorrt()
    import tensorrt as trt
    major, minor = torch.cuda.get_device_capability(device)
    return {"artifact": "tensorrt", "onnx_sha256": onnx_sha256,
            "profile": [profile.min, profile.opt, profile.max, profile.seq],
            "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(device),
            "compute_capability": f"{major}.{minor}", "optimization_level": optimization_level}


def build_cached(onnx_path: Path, onnx_sha256: str, cache: ArtifactCache, profile: Profile,
                 sig: Signature, *, device: torch.device, optimization_level: int = 3,
                 progress: Progress | None = None,
                 plan_file: str = PLAN_FILE) -> tuple[Path, bool]:
    """(path of the cached plan, cache hit); builds on a miss, sharing one timing cache."""
    fields = trt_key_fields(onnx_sha256, profile, device, optimization_level)
    timing = cache.root / f"timing-{fields['tensorrt']}-sm{fields['compute_capability']}.cache"
    phase = (progress or Progress(enabled=False)).phase

    def build(staging: Path) -> None:
        with phase(f"building TensorRT engine ({profile.describe()})"), torch.cuda.device(device):
            build_engine(onnx_path, staging / plan_file, profile, sig,
                         optimization_level=optimization_level, timing_cache=timing,
                         progress=progress)

    entry, hit = cache.get_or_build(fields, build)
    return entry / plan_file, hit


class TrtEngine:
    """A deserialized plan and one execution context for eager calls, enqueued on the current
    torch stream. A context runs one enqueue at a time (its activation memory is one buffer):
    under a lock, each call binds, waits on the stream for the previous call's enqueue (which
    may be on another thread's stream), enqueues and records its own."""

    def __init__(self, plan_path: Path, profile: Profile, device: torch.device,
                 dtype: torch.dtype, outputs: tuple[str, ...]):
        check_available(device)
        import tensorrt as trt

        self.profile, self.device, self.dtype, self.outputs = profile, device, dtype, outputs
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(device):
            self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT {trt.__version__} could not load {plan_path} "
                                   f"(built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self._lock = threading.Lock()
        self._done: torch.cuda.Event | None = None  # the last eager enqueue
        self._scratch: dict[int, torch.Tensor] = {}  # by replay stream (graph_scratch)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names
                       if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if not set(outputs) <= set(names):
            raise EngineBuildError(f"engine {plan_path} has tensors {names}; expected outputs "
                                   f"{list(outputs)}")

    def check_profile(self, sample: torch.Tensor, seq: int) -> None:
        batch, _, height, width = sample.shape
        if not self.profile.contains(batch, height, width, seq):
            raise InvalidInputError(
                f"sample {tuple(sample.shape)} with sequence {seq} is outside the engine's "
                f"profile ({self.profile.describe()}); rebuild with a wider --min/--max")

    def execute(self, feeds: dict[str, torch.Tensor], outs: dict[str, torch.Tensor],
                sample: torch.Tensor) -> None:
        """Run the engine on feeds into outs (tensors by name) on sample's current stream."""
        # Contiguous copies must outlive the enqueue; torch's allocator orders their reuse on
        # this same stream, so dropping them after the call is safe.
        keep = {name: t.contiguous() for name, t in feeds.items()}
        with self._lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            if self._done is not None:
                stream.wait_event(self._done)
            bind(self.context, self.inputs, keep, outs, self.profile)
            enqueue(self.context, sample)
            self._done = torch.cuda.Event()
            self._done.record(stream)

    def graph_context(self, stream: int) -> Any:
        """A new execution context for one captured graph, on the activation buffer of the
        graphs that replay on `stream` (graph_scratch)."""
        import tensorrt as trt

        with torch.cuda.device(self.device):
            context = self.engine.create_execution_context(
                trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise EngineBuildError("TensorRT could not create an execution context for a graph")
            scratch = self.graph_scratch(stream)
            context.set_device_memory(scratch.data_ptr(), scratch.numel())
        return context

    def graph_scratch(self, stream: int) -> torch.Tensor:
        """Activation memory shared by the contexts of the graphs that replay on one stream
        (a graph cache's: it replays them one at a time); graphs that may replay at the same
        time on other streams (another cache's) get their own."""
        if stream not in self._scratch:
            size = self.engine.device_memory_size_v2
            self._scratch[stream] = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        return self._scratch[stream]


class GraphCall:
    """One CUDA graph's calls of a TrtEngine: its own execution context, static I/O buffers.

    TensorRT's rules for capturing enqueue: input shapes and tensor addresses are set before
    capture and never change, and one enqueue runs before capture (the graph's warm-up loop
    makes it). Each call copies its inputs into the buffers (device copies, captured) and
    enqueues; the returned output buffers are overwritten by the next call, which is how the
    sampling loop uses them (each output is consumed before the next call, in stream order).
    A context per graph keeps one graph's shapes and addresses from moving under another's.
    The contexts of graphs that replay on one stream share one activation buffer (USER_MANAGED)
    instead of one each: a graph cache makes and replays its graphs on its own stream, one at a
    time, so they never use it at the same time. The stream is the one current when the graph's
    runners are made (GraphCache.replay calls make_fn on the cache's stream).
    """

    def __init__(self, parent: TrtEngine):
        self.parent = parent
        self.stream = torch.cuda.current_stream(parent.device).cuda_stream  # where it replays
        self.context: Any = None  # made on the first call: a graph may never call this engine
        self.buffers: dict[str, torch.Tensor] = {}
        self.outs: dict[str, torch.Tensor] | None = None

    def __call__(self, feeds: dict[str, torch.Tensor],
                 outs_like: Callable[[], dict[str, torch.Tensor]],
                 sample: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.cuda.device(self.parent.device):
            if self.outs is None:  # first call: the warm-up outside capture
                if self.context is None:
                    self.context = self.parent.graph_context(self.stream)
                buffers = {name: t.contiguous().clone() for name, t in feeds.items()}
                outs = outs_like()
                bind(self.context, self.parent.inputs, buffers, outs, self.parent.profile)
                self.buffers, self.outs = buffers, outs
            for name, t in feeds.items():
                if t.shape != self.buffers[name].shape:
                    raise InvalidInputError(f"{name} of shape {tuple(t.shape)} in a graph "
                                            f"captured for {tuple(self.buffers[name].shape)}")
                self.buffers[name].copy_(t)
            enqueue(self.context, sample)
        return self.outs


class TrtRunner(TrtEngine):
    """The UNet's engine, called as the torch backend's runner is."""

    def __init__(self, plan_path: Path, profile: Profile, sig: UNetSignature,
                 device: torch.device, dtype: torch.dtype):
        super().__init__(plan_path, profile, device, dtype, (OUTPUT,))
        self.signature = sig

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, down=None, mid=None,
                 **added: torch.Tensor) -> torch.Tensor:
        feeds = self.feeds(sample, timestep, encoder_hidden_states, down, mid, added)
        out = self.signature.output_like(sample)
        self.execute(feeds, {OUTPUT: out}, sample)
        return out

    def feeds(self, sample: torch.Tensor, timestep: torch.Tensor,
              encoder_hidden_states: torch.Tensor, down, mid,
              added: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The engine's inputs by name, checked against the signature and the profile."""
        added = {**added, **self.signature.residual_feeds(sample, down, mid)}
        self.signature.check_call(sample, encoder_hidden_states, added, self.dtype)
        self.check_profile(sample, encoder_hidden_states.shape[1])
        return {"sample": sample, "timestep": timestep.to(torch.float32),
                "encoder_hidden_states": encoder_hidden_states, **added}

    def for_graph(self) -> "GraphTrtRunner":
        """A runner for one captured loop (its own context and fixed addresses)."""
        return GraphTrtRunner(self)


class GraphTrtRunner:
    """TrtRunner for one CUDA graph (GraphCall)."""

    def __init__(self, parent: TrtRunner):
        self.parent, self.call = parent, GraphCall(parent)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, down=None, mid=None,
                 **added: torch.Tensor) -> torch.Tensor:
        feeds = self.parent.feeds(sample, timestep, encoder_hidden_states, down, mid, added)
        outs = self.call(feeds, lambda: {OUTPUT: self.parent.signature.output_like(sample)}, sample)
        return outs[OUTPUT]


class TrtControlNet(ExportedControlNet):
    """A ControlNet's engine (controlnet_export), called as diffusers' ControlNetModel is at
    scale 1 without guess mode, on the same stream as the UNet's engine. graph: the calls of
    one captured loop (for_graph), else eager calls on the engine's own context."""

    def __init__(self, engine: TrtEngine, config: Any, graph: GraphCall | None = None):
        super().__init__(config, engine.device, engine.dtype)
        self.trt, self.graph = engine, graph

    def _run(self, feeds: dict[str, torch.Tensor], sample: torch.Tensor) -> list[torch.Tensor]:
        self.trt.check_profile(sample, feeds["encoder_hidden_states"].shape[1])

        def outs_like() -> dict[str, torch.Tensor]:
            return dict(zip(self.signature.output_names, self.signature.outputs_like(sample)))
        if self.graph is not None:
            return list(self.graph(feeds, outs_like, sample).values())
        outs = outs_like()
        self.trt.execute(feeds, outs, sample)
        return list(outs.values())

    def for_graph(self) -> "TrtControlNet":
        """A runner for one captured loop (its own context and fixed addresses)."""
        return TrtControlNet(self.trt, self.config, GraphCall(self.trt))


def bind(context: Any, inputs: list[str], feeds: dict[str, torch.Tensor],
         outs: dict[str, torch.Tensor], profile: Profile) -> None:
    """Set every input's shape and address and every output's address on context."""
    for name in inputs:
        if not context.set_input_shape(name, tuple(feeds[name].shape)):
            raise InvalidInputError(f"TensorRT refused {name} of shape {tuple(feeds[name].shape)}; "
                                    f"expected a shape inside the profile {profile.describe()}")
        if not context.set_tensor_address(name, feeds[name].data_ptr()):
            raise EngineBuildError(f"TensorRT refused the address of {name}")
    for name, out in outs.items():
        if not context.set_tensor_address(name, out.data_ptr()):
            raise EngineBuildError(f"TensorRT refused the address of {name}")


def enqueue(context: Any, sample: torch.Tensor) -> None:
    """Run context on the current torch stream of sample's device."""
    stream = torch.cuda.current_stream(sample.device)
    if not context.execute_async_v3(stream.cuda_stream):
        raise EngineBuildError(f"TensorRT execute_async_v3 failed for sample "
                               f"{tuple(sample.shape)}; see the TensorRT log above")
