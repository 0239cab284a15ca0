"""The public API: `engine.build(model, ...)` returns an Engine; `Engine.run(...)` makes images."""
import dataclasses
import math
import threading

import torch

from lumen import kernels

from . import controlnet, deepcache, images, samplers
from .config import SamplerConfig
from .errors import BackendUnavailableError, InvalidInputError, InvalidTypeError
from .graphs import GraphCache, GraphKey, graph_runner, graph_runners, inpaint_kind, resolve_mode
from .models import Components, load_components
from .output import OUTPUT_TYPES, decode, set_vae_options
from .prompts import added_conditioning, embed_prompts, time_ids
from .validation import check_choice, check_int, check_latents, check_real

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def build(model, scheduler=None, backend: str = "torch", device=None, dtype=None,
          initial_step=None, backend_options: dict | None = None, cuda_graph="auto",
          graph_cache_size: int = 8, vae_slicing: bool = False, vae_tiling: bool = False,
          lora=None, controlnet=None) -> "Engine":
    """An Engine for `model` (UNet, pipeline, local folder or built-in name), ready to run.

    scheduler=None reads how the model was trained (betas, T, prediction type, zero terminal
    SNR) from its own scheduler config and samples with Lumen's defaults (trailing DDIM); a
    diffusers scheduler, its config dict or a SamplerConfig is taken as given.
    initial_step: a SingDiffusion x0-predictor (module(x_T, embeddings) -> x0, or its folder)
    that replaces the model at the pure-noise end (docs/math.md#singdiffusions-initial-step).
    backend_options: for torch, {"compile": True or a torch.compile mode}; for onnxruntime and
    tensorrt, keyword arguments of export.load_runner (cache_dir, min_shape/opt_shape/max_shape
    as latent (batch, h, w), exporter, provider, optimization_level); ControlNets are exported
    beside the UNet (TensorRT: an engine each, for the UNet's profile with batches from 1).
    cuda_graph: "auto" (on with CUDA and the torch or tensorrt backend), True or False; each
    request shape is captured once and replayed (engine.graphs), up to graph_cache_size shapes.
    vae_slicing / vae_tiling: decode a batch one image at a time / a large image in tiles,
    through the VAE's enable_slicing / enable_tiling (set on the model's VAE, which a passed-in
    pipeline shares).
    lora: LoRA safetensors (diffusers or kohya format) fused into the UNet and text encoders
    before export or capture: a path, (path, scale), or a list of them (engine.lora); a UNet or
    pipeline passed in keeps its own weights.
    controlnet: a diffusers ControlNetModel, a local folder holding one, a MultiControlNetModel,
    or a list of them (engine.controlnet); a pipeline with a `controlnet` component brings its own.
    """
    check_choice("backend", backend, BACKENDS)
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidTypeError(f"dtype={dtype}; expected one of {', '.join(map(str, DTYPES))}")
    use_graphs = resolve_mode(cuda_graph, device, backend)
    cache = GraphCache(graph_cache_size)
    if backend == "tensorrt":
        from lumen.export.trt_backend import check_available

        check_available(device)  # before loading any weights
    options = dict(backend_options or {})
    compile_mode = torch_compile_mode(options.pop("compile", False)) if backend == "torch" else None
    components = load_components(model, initial_step, lora, controlnet).to(device, dtype)
    set_vae_options(components.vae, vae_slicing, vae_tiling)
    config = sampler_config(scheduler, components.scheduler_config)
    control = bool(components.controlnets) and backend != "torch"
    if control:
        from lumen.export.controlnet_export import check_dtype, load_controlnet_runner

        check_dtype(dtype)  # before minutes of UNet export
    runner = unet_runner(components.unet, backend, device, dtype,
                         {**options, "residuals": True} if control else options, compile_mode,
                         components.loras)
    control_runners = None  # torch: the ControlNet modules themselves
    if control:  # exported ControlNets (TensorRT: engines for the UNet's profile) beside the UNet
        keep = {k: v for k, v in options.items()
                if k in ("cache_dir", "provider", "optimization_level")}
        control_runners = tuple(
            load_controlnet_runner(net, backend, device=device, dtype=dtype,
                                   profile=getattr(runner, "profile", None), **keep)
            for net in components.controlnets)
    return Engine(components, config, runner, device, dtype, backend, use_graphs, cache,
                  control_runners)


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def torch_compile_mode(value) -> str | None:
    """backend_options["compile"]: False/None (eager), True (= "default") or a mode name."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if value in ("reduce-overhead", "max-autotune"):
        raise InvalidInputError(f"compile={value!r} makes torch.compile capture CUDA graphs of "
                                "its own, which cannot nest inside Lumen's whole-loop graph; "
                                f"expected one of {', '.join(COMPILE_MODES)} (with cuda_graph "
                                "for the graph)")
    if value not in COMPILE_MODES:
        raise InvalidInputError(f"compile={value!r}; expected True, False or one of "
                                f"{', '.join(COMPILE_MODES)}")
    return value


def sampler_config(scheduler, model_config: dict | None) -> SamplerConfig:
    """SamplerConfig from the user's scheduler argument, else from the model's own config."""
    if isinstance(scheduler, SamplerConfig):
        return scheduler
    if scheduler is not None:
        return SamplerConfig.from_diffusers(scheduler)
    if model_config is not None:
        return SamplerConfig.from_diffusers(model_config, training_only=True)
    return SamplerConfig()  # a bare UNet: assume Lin et al.'s setup (zero SNR, v-prediction)


def unet_runner(unet, backend: str, device, dtype, options: dict, compile_mode: str | None = None,
                loras: tuple = ()):
    """runner(sample, timestep, encoder_hidden_states, **added) -> UNet output on the backend.

    loras: the fused LoRAs' provenance (file hash, scale), recorded in the export cache key.
    """
    if backend == "torch":
        if options:
            raise InvalidInputError(f"backend_options={options!r} with backend='torch'; expected "
                                    "none but 'compile'")
        return TorchRunner(unet, compile_mode)
    try:
        from lumen.export import load_runner
    except ImportError as err:
        raise BackendUnavailableError(f"backend={backend!r} cannot load ({err}); "
                                      "use backend='torch'") from err
    return load_runner(unet, backend, device=device, dtype=dtype, loras=loras, **options)


class TorchRunner:
    """The UNet module in PyTorch, optionally through torch.compile (compiled on first call)."""

    per_row_timesteps = True  # takes a [rows] timestep vector (engine.slots), not only one value

    def __init__(self, unet: torch.nn.Module, compile_mode: str | None = None):
        self.unet, self.compile_mode = unet, compile_mode
        self.module = unet
        self._cached, self._cloning = None, threading.Lock()
        if compile_mode is not None:
            mode = None if compile_mode == "default" else compile_mode
            # dynamic=None: a second shape recompiles once with dynamic shapes instead of once
            # per shape, which with fullgraph=True would fail hard at dynamo's recompile limit.
            self.module = torch.compile(unet, mode=mode, fullgraph=True, dynamic=None)

    def cached(self) -> tuple["TorchRunner", "deepcache.Switch"]:
        """DeepCache's runner (a clone of the UNet sharing its weights, compiled as this one is)
        and the switch its blocks follow; the caller holds switch.lock while it sets the switch."""
        with self._cloning:
            if self._cached is None:
                twin, switch = deepcache.clone(self.unet)
                self._cached = TorchRunner(twin, self.compile_mode), switch
            return self._cached

    def __call__(self, x, t, emb, down=None, mid=None, **added):
        # added: SDXL's text_embeds and time_ids; None keeps plain UNets' call unchanged.
        # down, mid: ControlNet residuals (engine.controlnet), None without.
        return self.module(x, t, encoder_hidden_states=emb, added_cond_kwargs=added or None,
                           down_block_additional_residuals=down, mid_block_additional_residual=mid,
                           return_dict=False)[0]


class Engine:
    """A loaded model plus its sampler configuration; `run` is safe to call repeatedly.

    With cuda_graph on, `graphs` holds the captured loops (keys, capture/replay counts, LRU).
    """

    def __init__(self, components: Components, config: SamplerConfig, runner, device, dtype,
                 backend: str = "torch", cuda_graph: bool = False, graphs: GraphCache | None = None,
                 control_runners: tuple | None = None):
        self.components, self.config, self.runner = components, config, runner
        self.device, self.dtype, self.backend = device, dtype, backend
        self.cuda_graph = cuda_graph
        self.graphs = graphs if graphs is not None else GraphCache()
        # what runs each ControlNet: the module itself, or its exported graph's runner
        self.control_runners = control_runners if control_runners is not None else \
            components.controlnets

    def with_config(self, config: SamplerConfig) -> "Engine":
        """A sibling engine sampling with `config`: it shares the model, runner and graph cache.

        Use it to serve requests with different samplers from one loaded model without
        changing this engine's `config` under other threads.
        """
        if not isinstance(config, SamplerConfig):
            raise InvalidTypeError(f"config of type {type(config).__name__}; expected SamplerConfig")
        return Engine(self.components, config, self.runner, self.device, self.dtype, self.backend,
                      self.cuda_graph, self.graphs, self.control_runners)

    def run(self, prompt=None, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
            num_inference_steps: int = 25, guidance_scale: float = 7.5, guidance_rescale: float = 0.7,
            eta: float = 0.0, generator=None, latents=None, height=None, width=None,
            num_images_per_prompt: int = 1, output_type: str = "pil", callback=None,
            pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, clip_skip=None,
            original_size=None, crops_coords_top_left=None, target_size=None, image=None,
            strength: float = 0.8, mask_image=None, masked_content: str = "original",
            cache_interval: int = 1, cache_branch_id: int = 0, control_image=None,
            controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
            control_guidance_end=1.0, guess_mode: bool = False):
        """Generate images; the result has `.images` as in diffusers pipelines.

        image (image-to-image, diffusers' img2img conventions): PIL image(s), numpy HWC arrays or
        [N, 3, H, W] tensors in [0, 1], one per image or one for all; the run is the last
        int(num_inference_steps * strength) steps of the plan, started from the image's latents
        noised to the first of them (strength 1: pure noise at zero terminal SNR). Image i
        draws its VAE posterior sample, then its noise, from generator i.
        mask_image (inpainting, with image; white repaints, black keeps), as diffusers'
        inpaint pipeline: a 9-channel inpainting UNet sees [latents, mask, masked-image
        latents]; any other model's kept region follows the image, noised to each step's level.
        masked_content "noise" starts the masked region from Gaussian noise instead of the image
        (AUTOMATIC1111's "latent noise" fill), drawn right after the image's posterior sample.
        cache_interval, cache_branch_id: DeepCache (engine.deepcache): the full UNet every
        cache_interval-th step, the shallow branch cache_branch_id between; 1 is off.
        control_image (an engine built with ControlNets): each ControlNet's control image(s),
        pixels in [0, 1] at the output size, as image takes them (a list, one per ControlNet,
        when there are several); controlnet_conditioning_scale, control_guidance_start and
        control_guidance_end: one value or one per ControlNet; guess_mode: the ControlNets see the
        conditional rows only. diffusers' ControlNet pipelines' semantics (engine.controlnet).

        callback(i), if given, is called on the host after step i (it must not sync the device);
        with a CUDA graph the loop is one replay, so the calls come after it, in order.
        pooled_prompt_embeds [P, D] (and the negative, default zeros), original_size,
        crops_coords_top_left and target_size (SDXL's time ids, diffusers' defaults): SDXL-style
        UNets only. clip_skip: skip that many last CLIP layers, as diffusers' pipelines.
        """
        check_choice("output_type", output_type, OUTPUT_TYPES)
        request = self.prepare(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                               num_inference_steps, guidance_scale, guidance_rescale, eta,
                               generator, latents, height, width, num_images_per_prompt,
                               pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip,
                               original_size, crops_coords_top_left, target_size, image, strength,
                               mask_image, masked_content, cache_interval, cache_branch_id,
                               control_image, controlnet_conditioning_scale,
                               control_guidance_start, control_guidance_end, guess_mode)
        x0 = self.sample(**request, callback=callback)
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        return ImagePipelineOutput(images=decode(x0, self.components, output_type, self.dtype))

    def prepare(self, prompt=None, negative_prompt=None, prompt_embeds=None,
                negative_prompt_embeds=None, num_inference_steps: int = 25,
                guidance_scale: float = 7.5, guidance_rescale: float = 0.7, eta: float = 0.0,
                generator=None, latents=None, height=None, width=None,
                num_images_per_prompt: int = 1, pooled_prompt_embeds=None,
                negative_pooled_prompt_embeds=None, clip_skip=None, original_size=None,
                crops_coords_top_left=None, target_size=None, image=None,
                strength: float = 0.8, mask_image=None, masked_content: str = "original",
                cache_interval: int = 1, cache_branch_id: int = 0, control_image=None,
                controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
                control_guidance_end=1.0, guess_mode: bool = False) -> dict:
        """`sample`'s inputs for a request (run's arguments), checked and on the device."""
        self._check_scalars(num_inference_steps, guidance_scale, guidance_rescale, eta,
                            num_images_per_prompt)
        if self.components.unet.config.in_channels == 9 and mask_image is None:
            raise InvalidInputError("an inpainting UNet (in_channels=9) takes image and mask_image "
                                    "(white repaints, black keeps); expected both")
        start, pixels = images.check(self, image, strength, num_inference_steps, latents)
        if pixels is not None:  # the image sets the size
            height, width = images.size(pixels, height, width)
        plan = samplers.make_plan(self.config, num_inference_steps, eta, start)
        cache = self._check_cache(cache_interval, cache_branch_id, plan.num_steps)
        scales = self._control_scales(control_image, controlnet_conditioning_scale,
                                      control_guidance_start, control_guidance_end, guess_mode,
                                      plan, cache)  # checked before the text and VAE work
        cfg = guidance_scale != 1  # w = 1 is the conditional output alone: skip the negative batch
        text = embed_prompts(self.components, prompt, negative_prompt, prompt_embeds,
                             negative_prompt_embeds, num_images_per_prompt, cfg,
                             pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip)
        shape = self._latent_shape(text.pos.shape[0], height, width, latents)
        f = self.components.vae_scale_factor
        sizes = (original_size, crops_coords_top_left, target_size)
        added = added_conditioning(self.components.unet.config, text,
                                   text.pos.shape[0] // num_images_per_prompt, num_images_per_prompt,
                                   cfg, time_ids(shape[2] * f, shape[3] * f, *sizes),
                                   sizes_given=any(v is not None for v in sizes))
        dp = plan.to(self.device)
        if pixels is None:
            if mask_image is not None:
                raise InvalidInputError("mask_image without image; expected the image to inpaint")
            x_T, noise = draw_noise(generator, shape, plan, self.device, latents)
            inpaint = {}
        else:
            x_T, noise, inpaint = images.start(self, pixels, mask_image, strength, shape,
                                               generator, plan, dp, cfg, masked_content)
        pos = text.pos.to(self.device, self.dtype)
        emb = torch.cat([text.neg.to(self.device, self.dtype), pos]) if cfg else pos  # [negative, positive]
        scalars = torch.tensor([guidance_scale, guidance_rescale], dtype=torch.float32).to(self.device)
        control = self._control(control_image, scales, guess_mode, shape, cfg)
        return dict(emb=emb, x_T=x_T, noise=noise, dp=dp, w=scalars[0],
                    phi=scalars[1], cfg=cfg,
                    added={k: v.to(self.device, self.dtype) for k, v in added.items()},
                    inpaint=inpaint, cache=cache, control=control, guess_mode=bool(guess_mode))

    def _control_scales(self, control_image, scale, start, end, guess_mode, plan: samplers.Plan,
                        cache) -> torch.Tensor | None:
        """ControlNet's per-evaluation scales [evaluations, n] of a request, its arguments
        checked; None without control_image (the engine's ControlNets sit this request out)."""
        nets = self.components.controlnets
        if control_image is None:
            return None
        if not nets:
            raise InvalidInputError("control_image on an engine without a ControlNet; expected "
                                    "engine.build(..., controlnet=...) first")
        if not isinstance(guess_mode, bool):
            raise InvalidTypeError(f"guess_mode of type {type(guess_mode).__name__}; expected bool")
        if cache is not None:
            raise InvalidInputError(f"cache_interval={cache[0]} with ControlNet; DeepCache does not "
                                    "reuse features that control residuals change; expected "
                                    "cache_interval=1")
        evaluations = len(samplers.evaluation_steps(plan))
        return controlnet.scales(len(nets), scale, start, end, evaluations)

    def _control(self, control_image, scales, guess_mode: bool, shape: tuple, cfg: bool) -> dict:
        """The ControlNet inputs of a request: "image{j}" (ControlNet j's images, rows as the
        ControlNet sees them, for each ControlNet the request uses) and "scales"; {} without."""
        if scales is None:
            return {}
        f = self.components.vae_scale_factor
        pictures = controlnet.images(control_image, len(self.components.controlnets), shape[0],
                                     shape[2] * f, shape[3] * f)
        control = {}
        for j, picture in enumerate(pictures):
            if picture is None:
                continue
            picture = picture.to(self.device, self.dtype)
            control[f"image{j}"] = torch.cat([picture, picture]) if cfg and not guess_mode else picture
        control["scales"] = scales.to(self.device)
        return control

    def sample(self, emb, x_T, noise, dp: samplers.DevicePlan, w: torch.Tensor, phi: torch.Tensor,
               cfg: bool, callback=None, added: dict | None = None,
               inpaint: dict | None = None, cache: tuple | None = None,
               control: dict | None = None, guess_mode: bool = False) -> torch.Tensor:
        """x0 [N, C, h, w] fp32 from `loop`, replayed from a captured graph when cuda_graph is on.

        cache: DeepCache's (interval, branch id), or None. control, guess_mode: ControlNet's
        inputs (Engine._control), {} without."""
        added, inpaint, control = added or {}, inpaint or {}, control or {}
        guess_mode = guess_mode and bool(control)
        if not self.cuda_graph:
            return self.loop(emb, x_T, noise, dp, w, phi, added, cfg, callback, inpaint=inpaint,
                             cache=cache, control=control, guess_mode=guess_mode)
        key = dataclasses.replace(self.graph_key(emb, x_T, dp, cfg), inpaint=inpaint_kind(inpaint),
                                  deepcache=cache or (), controlnets=controlnet.used(control),
                                  guess_mode=guess_mode)
        x0 = self.graphs.run(key, lambda: self._graph_loop(cfg, cache, guess_mode), emb, x_T,
                             noise, dp, w, phi, added, inpaint, control)
        for i in range(dp.plan.num_steps):
            samplers.notify(callback, i)
        return x0

    def graph_key(self, emb, x_T, dp: samplers.DevicePlan, cfg: bool) -> GraphKey:
        """The capture key of a request: shapes and loop structure, never values.

        It also holds what the engine may change between requests and a graph bakes in: the
        prediction type (config), the step kernels (LUMEN_KERNELS) and the initial-step model.
        """
        n, _, h, w = x_T.shape
        return GraphKey(n, h, w, emb.shape[1], dp.plan.num_steps, dp.plan.sampler,
                        str(self.dtype).removeprefix("torch."), self.backend, cfg, dp.plan.corrector,
                        noise=dp.plan.needs_noise, prediction_type=self.config.prediction_type,
                        kernels="triton" if kernels.use_triton(x_T) else "reference",
                        initial_step=self.components.initial_step is not None)

    def _graph_loop(self, cfg: bool, cache: tuple | None = None, guess_mode: bool = False):
        """The loop to capture for one key; a runner that needs per-graph state gets its own."""
        runner, nets = graph_runner(self.runner), graph_runners(self.control_runners)

        def loop(emb, x_T, noise, dp, w, phi, added, inpaint, control):
            return self.loop(emb, x_T, noise, dp, w, phi, added, cfg, runner=runner, inpaint=inpaint,
                             cache=cache, control=control, guess_mode=guess_mode, nets=nets)
        return loop

    @torch.inference_mode()
    def loop(self, emb, x_T, noise, dp: samplers.DevicePlan, w: torch.Tensor, phi: torch.Tensor,
             added: dict, cfg: bool, callback=None, runner=None,
             inpaint: dict | None = None, cache: tuple | None = None, control: dict | None = None,
             guess_mode: bool = False, nets: tuple | None = None) -> torch.Tensor:
        """The sampling loop from x_T to x0 (fp32); every input is already on the device.

        emb: [2N or N, L, D] ([negative, positive] when cfg); x_T: [N, C, h, w];
        noise: [N, S, C, h, w], or None when the plan draws none; w, phi: 0-dim fp32; added: SDXL's text_embeds and time_ids,
        [2N or N, ...]. With the torch and TensorRT backends no host sync and no host-to-device
        copy happen inside, so a CUDA graph captures the call whole (onnxruntime runs on its
        own stream and syncs once per UNet call). runner: the UNet runner to use (default the
        engine's; a captured graph may hold its own). inpaint: {"cond": [2N or N, 5, h, w]} (mask
        and masked-image latents a 9-channel UNet sees beside x), or {"mask", "x0", "eps"}
        [N, ., h, w] (the kept region of any other model follows x0 noised with eps), or {}.
        control: ControlNet's control images and per-evaluation scales (Engine._control), or {}.
        nets: the ControlNet runners (default the engine's; a captured graph may hold its own).
        """
        prediction_type, dtype = self.config.prediction_type, self.dtype
        runner = runner if runner is not None else self.runner
        inpaint = inpaint or {}
        cond = inpaint.get("cond")
        control, nets = control or {}, nets if nets is not None else self.control_runners
        switch = None  # DeepCache's, when the run uses it (set below)
        full = None if cache is None else deepcache.schedule(dp.plan, cache[0])  # per evaluation

        def model_output(x, k):  # x: [N, C, h, w] fp32 -> m: [2N or N, C, h, w], model dtype
            if switch is not None:  # full or shallow: decided by the step index, on the host
                switch.set("full" if full[k] else "shallow", cache[1])
            x_in = x.to(dtype)
            rows = torch.cat([x_in, x_in]) if cfg else x_in
            residuals = controlnet.residuals(nets, rows, dp.timesteps[k], emb, added, control, k,
                                             cfg, guess_mode) if control else {}
            if cond is not None:  # a 9-channel inpainting UNet: [latents, mask, masked image]
                rows = torch.cat([rows, cond], dim=1)
            return runner(rows, dp.timesteps[k], emb, **residuals, **added)

        def denoise(x, k):  # -> (x0, eps) fp32: CFG + rescale + conversion, fused on CUDA
            return kernels.guided_x0_eps(model_output(x, k), x, dp.a[k], dp.s[k], w, phi,
                                         prediction_type, cfg)

        def ddim_step(x, i, z):  # -> x_p fp32: the whole step between two UNet calls, fused
            return kernels.guided_step(model_output(x, i), x, z, dp.a[i], dp.s[i], dp.coef[i], w, phi,
                                       prediction_type, cfg)

        keep = None
        if "mask" in inpaint:
            def keep(x, i):  # the kept region: the image noised to where step i landed
                return samplers.keep_region(x, i, dp, inpaint["mask"], inpaint["x0"], inpaint["eps"])
        if self.components.initial_step is not None:
            x_T = self.hand_over(x_T, emb, w, cfg, dp)
        if cache is None:
            return samplers.sample(denoise, x_T, dp, noise, callback, ddim_step, keep)
        runner, switch = runner.cached()
        with switch.lock:  # the clone's switch and kept features are this run's
            try:
                return samplers.sample(denoise, x_T, dp, noise, callback, ddim_step, keep)
            finally:
                switch.set(None)
                switch.kept.clear()

    def _check_cache(self, interval, branch_id, steps: int) -> tuple | None:
        """DeepCache's (interval, branch id) of a request, checked; None when off (interval 1)."""
        check_int("cache_interval", interval, 1, steps)
        check_int("cache_branch_id", branch_id, 0)
        if interval == 1:  # off: any UNet, any branch
            return None
        deepcache.check(self.components.unet, branch_id)
        if not isinstance(self.runner, TorchRunner):
            raise InvalidInputError(f"cache_interval={interval} with backend={self.backend!r}; "
                                    "DeepCache runs on the torch backend, eager or compiled (its "
                                    "shallow branch is not exported to ONNX); expected "
                                    "cache_interval=1 here, or backend='torch'")
        return interval, branch_id

    def hand_over(self, x_T, emb, w, cfg: bool, dp: samplers.DevicePlan) -> torch.Tensor:
        """SingDiffusion: x at the first listed timestep = a*x0_hat + s*x_T.

        x0_hat comes from the initial-step predictor, guided as (u + w*(c - u)) / w
        (docs/math.md#singdiffusions-initial-step).
        """
        x_in = x_T.to(self.dtype)
        x0 = self.components.initial_step(torch.cat([x_in, x_in]) if cfg else x_in, emb).float()
        if cfg:
            u, c = x0.chunk(2)
            x0 = (u + w * (c - u)) / w
        return dp.a_start * x0 + dp.s_start * x_T

    def _check_scalars(self, steps, guidance_scale, guidance_rescale, eta, num_images):
        check_int("num_inference_steps", steps, 1, self.config.num_train_timesteps)
        check_real("guidance_scale", guidance_scale, 1.0, math.inf)
        if math.isinf(guidance_scale):
            raise InvalidInputError("guidance_scale=inf; expected a finite number >= 1")
        check_real("guidance_rescale", guidance_rescale, 0.0, 1.0)
        check_real("eta", eta, 0.0, 1.0)
        if eta != 0 and self.config.sampler not in samplers.DDIM_FORM:
            raise InvalidInputError(f"eta={eta} with sampler={self.config.sampler!r}; eta is DDIM's "
                                    "and Euler ancestral's (expected 0 here); use "
                                    "SamplerConfig.s_churn for EDM samplers")
        check_int("num_images_per_prompt", num_images, 1)

    def _latent_shape(self, batch: int, height, width, latents=None) -> tuple:
        """[N, C, h, w] of the request; without height/width, given latents set the size (as in
        diffusers, where they are the start noise), else the UNet's sample_size."""
        config, f = self.components.unet.config, self.components.vae_scale_factor
        sizes = []
        for axis, (name, value) in enumerate((("height", height), ("width", width))):
            if value is None and isinstance(latents, torch.Tensor) and latents.ndim == 4:
                value = latents.shape[2 + axis] * f
            value = config.sample_size * f if value is None else value
            check_int(name, value, f)
            if value % f:
                raise InvalidInputError(f"{name}={value}; expected a multiple of the VAE factor {f}")
            sizes.append(value // f)
        return (batch, config.in_channels, *sizes)


def generator_list(generator, n: int) -> list:
    """One generator (or None) per image: a list as given, or one generator shared in turn."""
    generators = generator if isinstance(generator, (list, tuple)) else [generator] * n
    if len(generators) != n:
        raise InvalidInputError(f"{len(generators)} generators for {n} images; expected one per image")
    return list(generators)


def draw_noise(generator, shape: tuple, plan: samplers.Plan, device, latents=None, between=None):
    """(x_T [N, C, h, w], step noise [N, S, C, h, w] or None) in fp32, drawn sample by sample.

    Sample i's draws come only from its generator (or from its turn in the one generator), so a
    seed gives the same image whatever the batch size; with one CPU generator and no step noise
    x_T equals diffusers' `randn_tensor`. Step noise is drawn only when the plan uses it;
    otherwise it is None, and the loop and kernels leave the noise term out. between(i, g), if
    given, draws what comes between image i's start noise and its step noise (inpainting's
    masked-image posterior, in diffusers' order).
    """
    n, S = shape[0], plan.num_steps
    generators = generator_list(generator, n)
    if latents is not None:
        check_latents(latents, shape)
    x_T, noise = [], []
    for i, g in enumerate(generators):
        if g is not None and not isinstance(g, torch.Generator):
            raise InvalidTypeError(f"generator of type {type(g).__name__}; expected torch.Generator")
        where = g.device if g is not None else "cpu"  # draw where the generator lives
        x_T.append(torch.randn(shape[1:], generator=g, device=where) if latents is None else latents[i])
        if between is not None:
            between(i, g)
        if plan.needs_noise:
            noise.append(torch.randn((S, *shape[1:]), generator=g, device=where))
    x_T = torch.stack([x.to(device, torch.float32) for x in x_T])
    if not plan.needs_noise:
        return x_T, None
    return x_T, torch.stack([z.to(device) for z in noise])
