"""Model loading: a UNet, a pipeline, a local folder or a built-in name -> Components (no hub)."""
import contextlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import controlnet as controlnets
from .clip import ClipPromptEncoder, SdxlPromptEncoder
from .errors import InvalidInputError, InvalidTypeError
from .lora import fuse_loras, parse_loras


@dataclass
class Components:
    """What the engine runs: the UNet plus the optional text encoder and VAE."""

    unet: torch.nn.Module
    scheduler_config: dict | None = None  # the model's own, as saved by diffusers
    # ClipPromptEncoder, SdxlPromptEncoder (encode(prompts, clip_skip) -> Encoding), or the
    # built-in models' LumenTextEncoder (encode(prompts) -> [B, L, D])
    text_encoder: object = None
    vae: torch.nn.Module | None = None
    initial_step: torch.nn.Module | None = None  # SingDiffusion x0-predictor(x_T, embeddings)
    loras: tuple = ()  # the fused LoRAs' {sha256, scale} (engine.lora), for export cache keys
    controlnets: tuple = ()  # diffusers ControlNetModels (engine.controlnet)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2^(VAE depth - 1), or 1 for a pixel-space model."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device, dtype):
        """Move every module to device/dtype, in place; a VAE that overflows in fp16 stays fp32."""
        text_modules = getattr(self.text_encoder, "parts", (self.text_encoder,))
        for module in (self.unet, self.vae, *text_modules, self.initial_step, *self.controlnets):
            if isinstance(module, torch.nn.Module):
                want = self.vae_dtype(dtype) if module is self.vae else dtype
                module.eval().requires_grad_(False).to(device=device)
                if any(p.dtype != want for p in module.parameters()):
                    module.to(dtype=want)
        return self

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """fp32 for an fp16 run when the VAE's config says force_upcast (SDXL's VAE overflows in
        fp16), as diffusers pipelines decode; else the run's dtype."""
        upcast = bool(getattr(getattr(self.vae, "config", None), "force_upcast", False))
        return torch.float32 if dtype == torch.float16 and upcast else dtype


def load_components(model, initial_step=None, lora=None, controlnet=None) -> Components:
    """Components from a UNet2DConditionModel, a DiffusionPipeline, a folder, or a built-in name,
    with the LoRAs of `lora` (engine.lora.parse_loras) fused in; a model passed in as an object
    keeps its own weights."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    loras = parse_loras(lora)  # before loading any weights: a missing file fails fast
    if isinstance(model, UNet2DConditionModel):
        components = Components(model)
    elif isinstance(model, DiffusionPipeline):
        components = _from_pipeline(model)
    elif isinstance(model, (str, Path)):
        components = _from_folder(_resolve(model))
    else:
        raise InvalidTypeError(f"model of type {type(model).__name__}; expected a UNet2DConditionModel, "
                               "a DiffusionPipeline, a local folder path, or a built-in model name")
    components.initial_step = _initial_step(initial_step)
    if controlnet is not None:  # given: replaces a pipeline's own
        components.controlnets = controlnets.load(controlnet)
    controlnets.check(components.unet, components.controlnets)
    return fuse_loras(_checked(components), loras, copy_modules=not isinstance(model, (str, Path)))


def _initial_step(predictor):
    if predictor is None or isinstance(predictor, torch.nn.Module):
        return predictor
    if isinstance(predictor, (str, Path)) and Path(predictor).is_dir():
        from .builtin.models import load_initial_step

        return load_initial_step(predictor)
    raise InvalidTypeError(f"initial_step={predictor!r}; expected an nn.Module(x_T, embeddings) -> x0 "
                           "or the folder of a saved initial-step predictor")


def _resolve(model) -> Path:
    from . import builtin

    if isinstance(model, str) and model in builtin.MODEL_NAMES:
        return builtin.model_dir(model)
    path = Path(model)
    if not path.is_dir():
        raise InvalidInputError(f"model={str(model)!r} is neither a built-in model "
                                f"({', '.join(builtin.MODEL_NAMES)}) nor an existing local folder; "
                                "Lumen never downloads weights")
    return path


def _from_folder(path: Path) -> Components:
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    if (path / "model_index.json").is_file():
        with _quiet_pipeline_load():
            return _from_pipeline(_load(DiffusionPipeline, path))
    if (path / "unet").is_dir():
        scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
        return Components(_load(UNet2DConditionModel, path / "unet"), scheduler_config,
                          _folder_text_encoder(path), _folder_vae(path))
    if _read_json(path / "config.json", {}).get("_class_name") == "UNet2DConditionModel":
        return Components(_load(UNet2DConditionModel, path))
    raise InvalidInputError(f"folder {str(path)!r} holds no diffusers model: expected "
                            "model_index.json, a unet/ subfolder, or a UNet config.json")


def _folder_text_encoder(path: Path):
    config = _read_json(path / "text_encoder" / "config.json")
    if config is None:
        return None
    if config.get("_class_name") == "LumenTextEncoder":
        from .builtin.text import load_text_encoder

        return load_text_encoder(path)
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    if (path / "text_encoder_2").is_dir():  # SDXL's layout; force_zeros as its pipeline defaults
        return SdxlPromptEncoder([_load(AutoTokenizer, path / "tokenizer"), _load(AutoTokenizer, path / "tokenizer_2")],
                                 [_load(CLIPTextModel, path / "text_encoder"),
                                  _load(CLIPTextModelWithProjection, path / "text_encoder_2")])
    return ClipPromptEncoder(_load(AutoTokenizer, path / "tokenizer"), _load(CLIPTextModel, path / "text_encoder"))


def _folder_vae(path: Path):
    if not (path / "vae").is_dir():
        return None
    from diffusers import AutoencoderKL

    return _load(AutoencoderKL, path / "vae")


def _from_pipeline(pipe) -> Components:
    scheduler = getattr(pipe, "scheduler", None)
    config = dict(scheduler.config, _class_name=type(scheduler).__name__) if scheduler else None
    return Components(pipe.unet, config, _pipeline_text_encoder(pipe), getattr(pipe, "vae", None),
                      controlnets=controlnets.load(getattr(pipe, "controlnet", None)))


def _pipeline_text_encoder(pipe):
    """SdxlPromptEncoder for a pipeline with text_encoder_2, ClipPromptEncoder for one encoder."""
    pairs = [(getattr(pipe, f"tokenizer{k}", None), getattr(pipe, f"text_encoder{k}", None))
             for k in ("", "_2")]
    pairs = [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]
    if getattr(pipe, "text_encoder_2", None) is not None:
        force_zeros = getattr(pipe.config, "force_zeros_for_empty_prompt", True)
        return SdxlPromptEncoder(*zip(*pairs), force_zeros_for_empty_prompt=force_zeros)
    return ClipPromptEncoder(*pairs[0]) if pairs else None


TIME_IDS = 6  # SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)


def pooled_width(unet_config) -> int:
    """The pooled text embedding width an SDXL-style UNet takes beside its time ids."""
    return unet_config.projection_class_embeddings_input_dim - TIME_IDS * unet_config.addition_time_embed_dim


def _checked(components: Components) -> Components:
    config = components.unet.config
    if getattr(config, "addition_embed_type", None) not in (None, "text_time"):
        raise InvalidInputError(f"UNet addition_embed_type={config.addition_embed_type!r} is not "
                                "supported; expected None or 'text_time' (SDXL)")
    encoder = components.text_encoder
    if isinstance(encoder, SdxlPromptEncoder) and config.addition_embed_type == "text_time":
        width = pooled_width(config)
        if encoder.pooled_dim != width:
            raise InvalidInputError(f"text encoder projection_dim={encoder.pooled_dim}, but the UNet "
                                    f"expects pooled embeddings of {width} (projection_class_"
                                    "embeddings_input_dim - 6 * addition_time_embed_dim)")
    return components


class _DropMessages(logging.Filter):
    def __init__(self, *fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


@contextlib.contextmanager
def _quiet_pipeline_load():
    """Loading a pipeline folder without two notices Lumen makes moot: diffusers' "steps_offset
    should be 1" (Lumen reads only the training schedule from the model's scheduler config) and
    transformers' note that the safety checker's image processor falls back to PIL without
    torchvision (Lumen never runs the safety checker)."""
    quiet = _DropMessages("requires torchvision (not installed)")
    logger = logging.getLogger("transformers.utils.import_utils")
    logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"The configuration file of this scheduler", FutureWarning)
            yield
    finally:
        logger.removeFilter(quiet)


def _load(cls, path: Path):
    """cls.from_pretrained(path) offline; a missing or corrupt file becomes an error naming it."""
    try:
        return cls.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise InvalidInputError(f"cannot load {cls.__name__} from {str(path)!r}: {err}") from err


def _read_json(path: Path, default=None):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidInputError(f"{str(path)!r} is not valid JSON ({err}); expected a config file")
