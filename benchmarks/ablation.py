"""`lumen bench` (also `python -m lumen.benchmarks`): cumulative ablations of one request's loop.

One row per configuration, each adding one optimisation to the row before, in one run:
  diffusers  diffusers-style loop: UNet, rescale_noise_cfg, DDIMScheduler.step, eager (baseline)
  eager      Lumen's loop with the torch reference step (LUMEN_KERNELS=reference)
  fused      + the fused Triton guided step (CUDA)
  graph      + the whole loop captured in one CUDA graph (CUDA)
  compiled   + torch.compile'd UNet (on CPU only when named in --rows: compiling takes minutes)
  tensorrt   + a TensorRT UNet in place of torch.compile (CUDA, tensorrt installed)
and one floor per UNet implementation used: the bare UNet alone, called as often as a request
calls it, replayed from one CUDA graph (called eagerly on CPU). A row's overhead is its loop
time over its UNet's floor (the physical limit is 1.00). Warm-up, capture and compile times
are measured apart from the loop time; `max diff` is the largest |x0 - x0 of the eager row|.
"""
import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from lumen.engine.config import SamplerConfig
from lumen.engine.graphs import GraphCache, capture_cuda, graph_runner
from lumen.engine.models import Components
from lumen.engine.runtime import Engine, TorchRunner

from .presets import PRESETS

ROWS = ("diffusers", "eager", "fused", "graph", "deepcache", "controlnet", "compiled",
        "deepcache_compiled", "tensorrt")
DEEPCACHE = (3, 0)  # the deepcache row's (cache_interval, cache_branch_id): DeepCache's default
APPROXIMATE = ("deepcache", "deepcache_compiled")  # rows that change the result by design: max_diff reported, not checked
PROMPT = "a red circle on a solid black background"  # in the built-in models' vocabulary


@dataclass(frozen=True)
class Settings:
    """One benchmark run: model, request shape and what to measure."""

    model: str = "default"
    height: int | None = None  # pixels; None: the model's native size
    width: int | None = None
    batch: int = 1  # images per request
    steps: int = 30
    guidance: float = 7.5  # 1 runs without CFG
    rescale: float = 0.7
    dtype: str | None = None  # float16 on CUDA, float32 on CPU
    device: str | None = None
    iters: int = 5  # timed requests per row (median)
    rows: tuple[str, ...] | None = None  # None: every row (on CPU, all but `compiled`)
    compile_mode: str = "default"


@dataclass
class Setup:
    """The loaded model and one request's device inputs."""

    name: str
    components: Components
    config: SamplerConfig
    device: torch.device
    dtype: torch.dtype
    params: int
    request: dict = field(repr=False)  # Engine.sample keyword arguments
    height: int = 0
    width: int = 0


@dataclass
class Row:
    """One configuration's measurements (times in seconds unless named otherwise)."""

    row: str
    unet: str  # eager, compiled or tensorrt
    what: str  # what the row actually ran
    loop_ms: float | None = None
    it_per_s: float | None = None
    ms_per_image: float | None = None
    overhead: float | None = None  # loop time / floor of the same UNet
    peak_mib: float | None = None
    warmup_s: float | None = None
    capture_s: float | None = None
    compile_s: float | None = None
    max_diff: float | None = None
    skipped: str | None = None


# ---------------------------------------------------------------------------------------------
# Model and request


def load(s: Settings) -> Setup:
    """A preset (random weights, real config), a built-in model or a local folder, on device."""
    from lumen import engine

    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, s.dtype) if s.dtype else (torch.float16 if device.type == "cuda"
                                                     else torch.float32)
    if s.model in PRESETS:
        preset = PRESETS[s.model]
        components, config = Components(preset.build(device, dtype)), SamplerConfig()
        f, seq, pooled = preset.vae_factor, preset.seq_len, preset.pooled_dim
    else:
        eng = engine.build(s.model, device=device, dtype=dtype, cuda_graph=False)
        components, config = eng.components, eng.config
        f, seq, pooled = components.vae_scale_factor, 77, None
    config = config.replace(sampler="ddim", timestep_spacing=(
        "trailing" if config.timestep_spacing == "karras" else config.timestep_spacing))
    size = components.unet.config.sample_size * f
    height, width = s.height or size, s.width or size
    params = sum(p.numel() for p in components.unet.parameters())
    setup = Setup(s.model, components, config, device, dtype, params, {}, height, width)
    setup.request = make_request(setup, s, (height // f, width // f), seq, pooled)
    return setup


def make_request(setup: Setup, s: Settings, latent: tuple[int, int], seq: int, pooled_dim):
    """Engine.sample's inputs for one request of s.batch images (seed 0), via Engine.prepare.

    Presets have no VAE, so their engine's sizes are latent sizes (and SDXL's time ids are
    latent sizes too: values the UNet embeds, which change no timing).
    """
    unet, n, cfg = setup.components.unet, s.batch, s.guidance != 1
    eng = Engine(setup.components, setup.config, None, setup.device, setup.dtype)
    f = setup.components.vae_scale_factor
    g = torch.Generator().manual_seed(1)
    if setup.components.text_encoder is not None:
        text = dict(prompt=[PROMPT] * n)
    else:
        shape = (n, seq, unet.config.cross_attention_dim)
        text = dict(prompt_embeds=torch.randn(shape, generator=g),
                    negative_prompt_embeds=torch.randn(shape, generator=g) if cfg else None)
    if pooled_dim and "prompt_embeds" in text:  # text prompts get theirs from the encoder
        text["pooled_prompt_embeds"] = torch.randn(n, pooled_dim, generator=g)
    return eng.prepare(**text, num_inference_steps=s.steps, guidance_scale=s.guidance,
                       guidance_rescale=s.rescale, generator=torch.Generator().manual_seed(0),
                       height=latent[0] * f, width=latent[1] * f)


# ---------------------------------------------------------------------------------------------
# The loops, one per row


def diffusers_loop(setup: Setup, s: Settings):
    """A diffusers pipeline's denoising loop (latents in the model dtype, as its pipelines)."""
    from diffusers import DDIMScheduler
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    c, r, unet = setup.config, setup.request, setup.components.unet
    scheduler = DDIMScheduler(num_train_timesteps=c.num_train_timesteps,
                              beta_schedule=c.beta_schedule, beta_start=c.beta_start,
                              beta_end=c.beta_end, prediction_type=c.prediction_type,
                              rescale_betas_zero_snr=c.zero_terminal_snr,
                              timestep_spacing=c.timestep_spacing, steps_offset=c.steps_offset,
                              set_alpha_to_one=True, clip_sample=False)
    added = r["added"] or None

    @torch.inference_mode()
    def loop():
        scheduler.set_timesteps(s.steps, device=setup.device)
        x = r["x_T"].to(setup.dtype)
        for t in scheduler.timesteps:
            x_in = torch.cat([x, x]) if r["cfg"] else x
            m = unet(x_in, t, encoder_hidden_states=r["emb"], added_cond_kwargs=added).sample
            if r["cfg"]:
                u, c_ = m.chunk(2)
                m = rescale_noise_cfg(u + s.guidance * (c_ - u), c_, guidance_rescale=s.rescale)
            x = scheduler.step(m, t, x).prev_sample
        return x.float()
    return loop


def engine_loop(setup: Setup, runner, backend: str, graph: bool, kernels: str, cache=None):
    """Lumen's loop through Engine.sample; `kernels` is the LUMEN_KERNELS mode, `cache`
    DeepCache's (interval, branch id) or None."""
    eng = Engine(setup.components, setup.config, runner, setup.device, setup.dtype, backend,
                 cuda_graph=graph, graphs=GraphCache(1))
    request = {**setup.request, "cache": cache}

    def loop():
        with kernel_mode(kernels):
            return eng.sample(**request)
    loop.engine = eng
    return loop


def controlnet_loop(setup: Setup, runner, graph: bool):
    """The engine loop with one ControlNet beside the UNet (ControlNetModel.from_unet: the
    UNet's weights, zero-initialised output convs, so the image equals the eager row's; scale 1
    on every step): what running a ControlNet costs. Its conditioning embedding downsamples by
    the model's VAE factor; presets have no VAE (the request is in latent pixels), so theirs
    keeps full size."""
    import dataclasses

    from diffusers import ControlNetModel

    unet = setup.components.unet
    f = setup.components.vae_scale_factor
    channels = {1: (16,), 2: (16, 32), 4: (16, 32, 96), 8: (16, 32, 96, 256)}[f]
    torch.manual_seed(0)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    net = net.to(setup.device).eval().requires_grad_(False)
    if setup.dtype != torch.float32:
        net = net.to(dtype=setup.dtype)
    components = dataclasses.replace(setup.components, controlnets=(net,))
    eng = Engine(components, setup.config, runner, setup.device, setup.dtype, "torch",
                 cuda_graph=graph, graphs=GraphCache(1))
    r = setup.request
    n, _, h, w = r["x_T"].shape
    g = torch.Generator().manual_seed(2)
    image = torch.rand(n, 3, h * f, w * f, generator=g)
    scales = torch.ones(len(r["dp"].timesteps), 1)  # [evaluations, ControlNets]
    control = eng._control(image, scales, False, r["x_T"].shape, r["cfg"])  # as Engine.prepare lays it out
    request = {**r, "control": control, "guess_mode": False}

    def loop():
        with kernel_mode("auto"):
            return eng.sample(**request)
    loop.engine = eng
    return loop


def floor_loop(setup: Setup, runner, graph: bool):
    """The bare UNet, once per evaluation point of the plan, on fixed inputs."""
    r = setup.request
    x_in = unet_input(setup)
    timesteps = r["dp"].timesteps
    runner = graph_runner(runner) if graph else runner

    @torch.inference_mode()
    def calls():
        for k in range(len(timesteps)):
            out = runner(x_in, timesteps[k], r["emb"], **r["added"])
        return out
    if not graph:
        return calls
    replay, out = capture_cuda(calls, None)

    def replayed():
        replay()
        return out
    replayed.keepalive = calls  # the graph holds raw addresses of the runner's buffers
    return replayed


def unet_input(setup: Setup) -> torch.Tensor:
    """The request's x_T as the UNet sees it: model dtype, doubled for CFG."""
    x_in = setup.request["x_T"].to(setup.dtype)
    return torch.cat([x_in, x_in]) if setup.request["cfg"] else x_in


@contextlib.contextmanager
def kernel_mode(mode: str):
    old = os.environ.get("LUMEN_KERNELS")
    os.environ["LUMEN_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LUMEN_KERNELS", None)
        else:
            os.environ["LUMEN_KERNELS"] = old


# ---------------------------------------------------------------------------------------------
# Measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA allocator stats, or the process's RSS high-water mark on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM


def peak_mib(device: torch.device) -> float | None:
    """CUDA: peak reserved by torch's allocator, so captured graphs' pools count (their memory
    is allocated at capture, not at replay); CPU: peak RSS of the process (weights included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return None


def timed_call(loop, device: torch.device) -> tuple[float, float | None, torch.Tensor]:
    """(seconds, peak MiB, output) of one synchronised call."""
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    out = loop()
    synchronize(device)
    return time.perf_counter() - start, peak_mib(device), out


def timed_first_call(runner, setup: Setup) -> float:
    """Seconds of one UNet call: torch.compile's tracing and code generation happen here."""
    r = setup.request
    x_in = unet_input(setup)
    synchronize(setup.device)
    start = time.perf_counter()
    with torch.inference_mode():
        runner(x_in, r["dp"].timesteps[0], r["emb"], **r["added"])
    synchronize(setup.device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The run


def skip_reason(row: str, s: Settings, device: torch.device) -> str | None:
    cuda = device.type == "cuda"
    if row in ("fused", "graph") and not cuda:
        return "needs CUDA (on CPU the step runs the torch reference; graphs are CUDA-only)"
    if row in ("compiled", "deepcache_compiled") and not cuda and s.rows is None:
        return "torch.compile on CPU takes minutes; name it in --rows to run it"
    if row == "tensorrt":
        from lumen.engine.errors import BackendUnavailableError
        from lumen.export.trt_backend import check_available

        try:
            check_available(device)
        except BackendUnavailableError as err:
            return str(err)
    return None


def row_loop(row: str, setup: Setup, s: Settings, runners: dict) -> tuple:
    """(loop, UNet name, description) of a row; cumulative where the device allows."""
    cuda = setup.device.type == "cuda"
    if row == "diffusers":
        return diffusers_loop(setup, s), "eager", "UNet + rescale_noise_cfg + DDIMScheduler.step"
    if row == "eager":
        return (engine_loop(setup, runners["eager"], "torch", False, "reference"), "eager",
                "Lumen loop, torch reference step")
    if row == "fused":
        return (engine_loop(setup, runners["eager"], "torch", False, "auto"), "eager",
                "Lumen loop, fused Triton step")
    if row == "controlnet":
        return (controlnet_loop(setup, runners["eager"], cuda), "eager",
                "ControlNet (from_unet, random weights) + UNet" +
                (", fused step, whole-loop CUDA graph" if cuda else ", torch reference step"))
    if row in ("deepcache", "deepcache_compiled"):
        unet = "compiled" if row == "deepcache_compiled" else "eager"
        return (engine_loop(setup, runners[unet], "torch", cuda, "auto", DEEPCACHE), unet,
                f"DeepCache interval {DEEPCACHE[0]}, branch {DEEPCACHE[1]}" +
                (f", torch.compile({s.compile_mode}) UNet" if unet == "compiled" else "") +
                (", fused step, whole-loop CUDA graph" if cuda else ", torch reference step"))
    unet = {"graph": "eager", "compiled": "compiled", "tensorrt": "tensorrt"}[row]
    backend = "tensorrt" if row == "tensorrt" else "torch"
    what = {"eager": "fused step, whole-loop CUDA graph", "compiled":
            f"torch.compile({s.compile_mode}) UNet", "tensorrt": "TensorRT UNet"}[unet]
    if row != "graph":
        what += (", fused step, whole-loop CUDA graph" if cuda else ", torch reference step")
    return engine_loop(setup, runners[unet], backend, cuda, "auto"), unet, what


def make_runner(unet: str, setup: Setup, s: Settings) -> tuple[object, float | None]:
    """(runner, build or compile seconds) of a UNet implementation."""
    module = setup.components.unet
    if unet == "eager":
        return TorchRunner(module), None
    if unet == "compiled":
        runner = TorchRunner(module, s.compile_mode)
        return runner, timed_first_call(runner, setup)
    from lumen.export import load_runner

    r = setup.request
    batch, _, h, w = r["x_T"].shape
    start = time.perf_counter()
    runner = load_runner(module, "tensorrt", device=setup.device, dtype=setup.dtype,
                         opt_shape=(batch * (2 if r["cfg"] else 1), h, w))
    return runner, time.perf_counter() - start


def run_rows(setup: Setup, s: Settings, say=print) -> list[Row]:
    """Every row of s.rows plus the floors of the UNets they used, measured in this process.

    Each loop is warmed up (and captured, compiled) first; then the timed calls go round
    robin, one call of every row per round, so drift of a noisy machine spreads over all rows.
    """
    rows: list[Row] = []
    loops: dict[str, object] = {}
    runners: dict[str, object] = {}
    build_s: dict[str, float | None] = {}
    for name in s.rows or ROWS:
        reason = skip_reason(name, s, setup.device)
        if reason:
            rows.append(Row(name, "-", "-", skipped=reason))
            say(f"[{name}] skipped: {reason}")
            continue
        unet = {"compiled": "compiled", "deepcache_compiled": "compiled",
                "tensorrt": "tensorrt"}.get(name, "eager")
        if unet not in runners:
            runners[unet], build_s[unet] = make_runner(unet, setup, s)
        loops[name], unet, what = row_loop(name, setup, s, runners)
        rows.append(Row(name, unet, what, compile_s=build_s.get(unet)))
    cuda = setup.device.type == "cuda"
    for unet in runners:
        loops[f"floor:{unet}"] = floor_loop(setup, runners[unet], cuda)
        rows.append(Row(f"floor:{unet}", unet, "bare UNet, " + ("one CUDA graph" if cuda
                                                                 else "eager (no CUDA)")))
    measured = [r for r in rows if not r.skipped]
    outputs = {r.row: warm_up(r, loops[r.row], setup, say) for r in measured}
    times: dict[str, list[float]] = {r.row: [] for r in measured}
    for _ in range(s.iters):
        for r in measured:
            seconds, peak, _ = timed_call(loops[r.row], setup.device)
            times[r.row].append(seconds)
            r.peak_mib = max(r.peak_mib or 0.0, peak) if peak is not None else r.peak_mib
    for r in measured:
        median = statistics.median(times[r.row])
        r.loop_ms, r.it_per_s, r.ms_per_image = median * 1e3, s.steps / median, median * 1e3 / s.batch
        say(f"[{r.row}] {r.loop_ms:.1f} ms per request ({r.what})")
    return finish(rows, outputs)


def warm_up(row: Row, loop, setup: Setup, say) -> torch.Tensor:
    """The first call (captures and compiles happen here); returns its output."""
    row.warmup_s, row.peak_mib, out = timed_call(loop, setup.device)
    eng = getattr(loop, "engine", None)
    if eng is not None and eng.cuda_graph:
        row.capture_s = sum(e.capture_s for e in eng.graphs.entries.values())
    say(f"[{row.row}] warm-up {row.warmup_s:.2f} s")
    return out.float().clone()


def finish(rows: list[Row], outputs: dict) -> list[Row]:
    """Overheads against each UNet's floor and output differences against the eager row."""
    reference = outputs.get("eager")
    floors = {r.unet: r for r in rows if r.row.startswith("floor:")}
    for r in rows:
        if r.skipped:
            continue
        floor = floors.get(r.unet)
        r.overhead = r.loop_ms / floor.loop_ms if floor else None
        if reference is not None and not r.row.startswith("floor:"):
            r.max_diff = (outputs[r.row] - reference).abs().max().item()
    return rows


def describe(setup: Setup, s: Settings) -> dict:
    """The run's facts, written beside the rows."""
    device = (torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda"
              else f"cpu ({torch.get_num_threads()} threads)")
    r = setup.request
    return dict(model=setup.name, parameters=setup.params, device=device,
                torch=torch.__version__, dtype=str(setup.dtype).removeprefix("torch."),
                height=setup.height, width=setup.width, latent=list(r["x_T"].shape[1:]),
                batch=s.batch, steps=s.steps, unet_calls=len(r["dp"].timesteps),
                guidance=s.guidance, rescale=s.rescale, cfg=r["cfg"], iters=s.iters,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
