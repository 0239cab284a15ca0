"""TensorRT engine from the exported ONNX, and a runner on the current torch CUDA stream.

One code path for TensorRT 10.x and 11.x: networks are strongly typed (precision comes from the
ONNX graph, exported in the target dtype), so no FP16/BF16 builder flags, which 11.x removed.
10.x needs NetworkDefinitionCreationFlag.STRONGLY_TYPED; 11.x accepts and ignores it.
"""
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lumen.engine.errors import BackendUnavailableError, InvalidInputError, LumenError

from .cache import ArtifactCache, CacheWarning, atomic_write_bytes
from .onnx_export import OUTPUT, UNetSignature, check_latent_size
from .progress import Progress

PLAN_FILE = "unet.plan"
Shape = tuple[int, int, int]  # (batch, latent height, latent width)


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

    def input_shapes(self, sig: UNetSignature) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Input name -> (min, opt, max) full shapes; the 0-dim timestep is static."""
        def per_input(bhw: Shape, seq: int) -> dict[str, tuple[int, ...]]:
            batch, height, width = bhw
            shapes = {"sample": (batch, sig.in_channels, height, width),
                      "encoder_hidden_states": (batch, seq, sig.cross_attention_dim)}
            if sig.text_embeds_dim is not None and sig.time_ids_dim is not None:
                shapes["text_embeds"] = (batch, sig.text_embeds_dim)
                shapes["time_ids"] = (batch, sig.time_ids_dim)
            for name, (c, f) in zip(sig.residual_names, sig.residuals):  # ControlNet's
                shapes[name] = (batch, c, height // f, width // f)
            return shapes

        levels = [per_input(s, q) for s, q in zip((self.min, self.opt, self.max), self.seq)]
        return {name: tuple(level[name] for level in levels) for name in levels[0]}


def network_flags() -> int:
    import tensorrt as trt

    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(onnx_path: Path, plan_path: Path, profile: Profile, sig: UNetSignature, *,
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
                 sig: UNetSignature, *, device: torch.device, optimization_level: int = 3,
                 progress: Progress | None = None) -> tuple[Path, bool]:
    """(path of the cached plan, cache hit); builds on a miss, sharing one timing cache."""
    fields = trt_key_fields(onnx_sha256, profile, device, optimization_level)
    timing = cache.root / f"timing-{fields['tensorrt']}-sm{fields['compute_capability']}.cache"
    phase = (progress or Progress(enabled=False)).phase

    def build(staging: Path) -> None:
        with phase(f"building TensorRT engine ({profile.describe()})"), torch.cuda.device(device):
            build_engine(onnx_path, staging / PLAN_FILE, profile, sig,
                         optimization_level=optimization_level, timing_cache=timing,
                         progress=progress)

    entry, hit = cache.get_or_build(fields, build)
    return entry / PLAN_FILE, hit


class TrtRunner:
    """Deserialized engine + one execution context; enqueues on the current torch stream."""

    def __init__(self, plan_path: Path, profile: Profile, sig: UNetSignature,
                 device: torch.device, dtype: torch.dtype):
        check_available(device)
        import tensorrt as trt

        self.profile, self.signature, self.device, self.dtype = profile, sig, device, dtype
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(device):
            self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT {trt.__version__} could not load {plan_path} "
                                   f"(built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self._scratch: torch.Tensor | None = None
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names
                       if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if OUTPUT not in names:
            raise EngineBuildError(f"engine {plan_path} has tensors {names}; expected {OUTPUT!r}")

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, down=None, mid=None,
                 **added: torch.Tensor) -> torch.Tensor:
        added = {**added, **self.signature.residual_feeds(sample, down, mid)}
        feeds = self.feeds(sample, timestep, encoder_hidden_states, added)
        # Contiguous copies must outlive the enqueue; torch's allocator orders their reuse on
        # this same stream, so dropping them after the call is safe.
        keep = {name: t.contiguous() for name, t in feeds.items()}
        out = self.signature.output_like(sample)
        bind(self.context, self.inputs, keep, out, self.profile)
        enqueue(self.context, sample)
        return out

    def feeds(self, sample: torch.Tensor, timestep: torch.Tensor,
              encoder_hidden_states: torch.Tensor, added: dict) -> dict[str, torch.Tensor]:
        """The engine's inputs by name, checked against the signature and the profile."""
        self.signature.check_call(sample, encoder_hidden_states, added, self.dtype)
        batch, _, height, width = sample.shape
        if not self.profile.contains(batch, height, width, encoder_hidden_states.shape[1]):
            raise InvalidInputError(
                f"sample {tuple(sample.shape)} with sequence {encoder_hidden_states.shape[1]} is "
                f"outside the engine's profile ({self.profile.describe()}); rebuild with a wider "
                f"--min/--max")
        return {"sample": sample, "timestep": timestep.to(torch.float32),
                "encoder_hidden_states": encoder_hidden_states, **added}

    def for_graph(self) -> "GraphTrtRunner":
        """A runner for one captured loop (its own context and fixed addresses)."""
        return GraphTrtRunner(self)

    def graph_scratch(self) -> torch.Tensor:
        """Activation memory shared by every graph's context (their replays never overlap)."""
        if self._scratch is None:
            size = self.engine.device_memory_size_v2
            self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        return self._scratch


class GraphTrtRunner:
    """TrtRunner for one CUDA graph: own execution context, static I/O buffers.

    TensorRT's rules for capturing enqueue: input shapes and tensor addresses are set before
    capture and never change, and one enqueue runs before capture (the graph's warm-up loop
    makes it). Each call copies its inputs into the buffers (device copies, captured) and
    enqueues; the returned output buffer is overwritten by the next call, which is how the
    sampling loop uses it (each output is consumed before the next UNet call, in stream order).
    A context per graph keeps one graph's shapes and addresses from moving under another's.
    The contexts share one activation buffer (USER_MANAGED) instead of one each: the graph
    cache replays them one at a time on one stream, so they never use it at the same time.
    """

    def __init__(self, parent: TrtRunner):
        import tensorrt as trt

        self.parent = parent
        with torch.cuda.device(parent.device):
            self.context = parent.engine.create_execution_context(
                trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if self.context is None:
                raise EngineBuildError("TensorRT could not create an execution context for a graph")
            scratch = parent.graph_scratch()
            self.context.set_device_memory(scratch.data_ptr(), scratch.numel())
        self.buffers: dict[str, torch.Tensor] = {}
        self.out: torch.Tensor | None = None

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, down=None, mid=None,
                 **added: torch.Tensor) -> torch.Tensor:
        added = {**added, **self.parent.signature.residual_feeds(sample, down, mid)}
        feeds = self.parent.feeds(sample, timestep, encoder_hidden_states, added)
        if self.out is None:  # first call: the warm-up outside capture
            self.buffers = {name: t.contiguous().clone() for name, t in feeds.items()}
            self.out = self.parent.signature.output_like(sample)
            bind(self.context, self.parent.inputs, self.buffers, self.out, self.parent.profile)
        for name, t in feeds.items():
            if t.shape != self.buffers[name].shape:
                raise InvalidInputError(f"{name} of shape {tuple(t.shape)} in a graph captured "
                                        f"for {tuple(self.buffers[name].shape)}")
            self.buffers[name].copy_(t)
        enqueue(self.context, sample)
        return self.out


def bind(context: Any, inputs: list[str], feeds: dict[str, torch.Tensor], out: torch.Tensor,
         profile: Profile) -> None:
    """Set every input's shape and address and the output's address on context."""
    for name in inputs:
        if not context.set_input_shape(name, tuple(feeds[name].shape)):
            raise InvalidInputError(f"TensorRT refused {name} of shape {tuple(feeds[name].shape)}; "
                                    f"expected a shape inside the profile {profile.describe()}")
        if not context.set_tensor_address(name, feeds[name].data_ptr()):
            raise EngineBuildError(f"TensorRT refused the address of {name}")
    if not context.set_tensor_address(OUTPUT, out.data_ptr()):
        raise EngineBuildError(f"TensorRT refused the address of {OUTPUT}")


def enqueue(context: Any, sample: torch.Tensor) -> None:
    """Run context on the current torch stream of sample's device."""
    stream = torch.cuda.current_stream(sample.device)
    if not context.execute_async_v3(stream.cuda_stream):
        raise EngineBuildError(f"TensorRT execute_async_v3 failed for sample "
                               f"{tuple(sample.shape)}; see the TensorRT log above")
