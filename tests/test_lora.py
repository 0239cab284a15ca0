"""LoRA: files made here on the tiny models, fused by Lumen, equal diffusers' pipelines with the
same LoRAs fused; bad files fail at build with the file named."""
import copy
import json
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from safetensors.torch import load_file, save_file

from lumen import engine
from lumen.engine import InvalidInputError, InvalidTypeError
from lumen.cli import main
from lumen.engine.lora import lora_arg

from conftest import make_tiny_pipeline, make_tiny_sdxl_pipeline, make_tiny_unet

peft = pytest.importorskip("peft", reason="LoRA loading needs peft")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "v_proj"]
REQUEST = dict(prompt=["a red cat", "dog"], num_inference_steps=5, guidance_scale=6.0,
               guidance_rescale=0.7, height=16, width=16, output_type="np")
ATOL = 1e-4  # measured: <= 2e-6 in [0, 1] pixel values


def lora_layers(module, targets, rank: int, seed: int) -> dict:
    """A random LoRA (non-zero up and down) on a copy of module, as a diffusers state dict."""
    torch.manual_seed(seed)
    module = copy.deepcopy(module)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=targets)
    peft.inject_adapter_in_model(config, module)
    return convert_state_dict_to_diffusers(peft.get_peft_model_state_dict(module))


def save_lora(folder, pipe_cls=StableDiffusionPipeline, **layers) -> str:
    pipe_cls.save_lora_weights(folder, **layers)
    return str(folder / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def sd_loras(tmp_path_factory):
    """Two UNet + text-encoder LoRAs and one UNet-only LoRA for the tiny SD pipeline."""
    pipe = make_tiny_pipeline(make_tiny_unet())
    root = tmp_path_factory.mktemp("loras")
    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        files[name] = save_lora(root / name, unet_lora_layers=lora_layers(pipe.unet, UNET_TARGETS, 4, seed),
                                text_encoder_lora_layers=lora_layers(pipe.text_encoder, TEXT_TARGETS, 2, seed))
    files["unet"] = save_lora(root / "unet", unet_lora_layers=lora_layers(pipe.unet, UNET_TARGETS, 2, 3))
    return files


def diffusers_images(pipe, **changes):
    kw = {**REQUEST, **changes}
    images = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert images.std() > 0.05  # an image, not a collapsed output
    return images


def lumen_images(eng, **changes):
    return eng.run(**{**REQUEST, **changes}, generator=torch.Generator().manual_seed(0)).images


def test_unet_and_text_encoder_lora_matches_diffusers_fused(sd_loras):
    pipe = make_tiny_pipeline(make_tiny_unet())
    pipe.load_lora_weights(sd_loras["a"])
    pipe.fuse_lora(lora_scale=0.7)
    theirs = diffusers_images(pipe)
    ours = lumen_images(engine.build(make_tiny_pipeline(make_tiny_unet()), lora=(sd_loras["a"], 0.7), device="cpu"))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
    plain = lumen_images(engine.build(make_tiny_pipeline(make_tiny_unet()), device="cpu"))
    assert np.abs(plain - theirs).max() > 0.05  # the LoRA changes the image


# diffusers' pipeline warns when its second adapter joins the first; Lumen fuses one at a time
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_two_loras_with_scales_match_diffusers_set_adapters(sd_loras):
    pipe = make_tiny_pipeline(make_tiny_unet())
    pipe.load_lora_weights(sd_loras["a"], adapter_name="a")
    pipe.load_lora_weights(sd_loras["b"], adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.5])
    pipe.fuse_lora(adapter_names=["a", "b"])
    theirs = diffusers_images(pipe)
    eng = engine.build(make_tiny_pipeline(make_tiny_unet()),
                       lora=[(sd_loras["a"], 0.5), (sd_loras["b"], 1.5)], device="cpu")
    np.testing.assert_allclose(lumen_images(eng), theirs, rtol=0, atol=ATOL)


def test_a_passed_pipeline_keeps_its_weights(sd_loras):
    pipe = make_tiny_pipeline(make_tiny_unet())
    before = {k: v.clone() for k, v in {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}.items()}
    eng = engine.build(pipe, lora=sd_loras["a"], device="cpu")
    after = {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert eng.components.unet is not pipe.unet
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert (eng.components.unet.state_dict()[q] - before[q]).abs().max() > 1e-3
    assert not any("lora" in name for name, _ in eng.components.unet.named_parameters())


def test_only_the_modules_a_lora_adapts_are_copied(sd_loras):
    pipe = make_tiny_pipeline(make_tiny_unet())
    eng = engine.build(pipe, lora=(sd_loras["unet"], sd_loras["unet"]), device="cpu")  # two paths: two LoRAs
    assert eng.components.unet is not pipe.unet and eng.components.text_encoder.module is pipe.text_encoder
    once = engine.build(make_tiny_unet(), lora=(sd_loras["unet"], 2.0), device="cpu").components.unet
    torch.testing.assert_close(eng.components.unet.state_dict(), once.state_dict(), rtol=0, atol=1e-6)


def test_lora_on_a_folder_and_a_bare_unet(sd_loras, tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    pipe.load_lora_weights(sd_loras["unet"])
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay
    theirs = diffusers_images(pipe)
    ours = lumen_images(engine.build(str(tiny_pipeline_dir), lora=sd_loras["unet"], device="cpu"))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
    bare = engine.build(make_tiny_unet(), lora=[sd_loras["unet"]], device="cpu")
    for name, weight in pipe.unet.state_dict().items():
        torch.testing.assert_close(bare.components.unet.state_dict()[name], weight, rtol=0, atol=1e-6)


def kohya(layers: dict, prefix: str, alpha: float) -> dict:
    """diffusers LoRA keys (`<module>.lora.down.weight`, `<module>.lora_linear_layer.down.weight`)
    in kohya's naming (`<prefix>_<module with _>.lora_down.weight`), with alphas."""
    out = {}
    for key, value in layers.items():
        module, kind = key.replace(".lora_linear_layer.", ".lora.").rsplit(".lora.", 1)
        name = f"{prefix}_" + module.replace(".", "_")
        out[f"{name}.lora_{kind.split('.')[0]}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def test_kohya_format_matches_diffusers_and_scales_by_alpha_over_rank(tmp_path):
    base = make_tiny_pipeline(make_tiny_unet())
    layers = lora_layers(base.unet, UNET_TARGETS, 4, 5)
    # kohya LoRAs adapt every attention projection (diffusers infers the format from out_proj's)
    attention = ["q_proj", "k_proj", "v_proj", "out_proj"]
    text = {f"text_model.{k}": v for k, v in lora_layers(base.text_encoder, attention, 2, 6).items()}
    path = tmp_path / "kohya.safetensors"
    save_file({**kohya(layers, "lora_unet", alpha=2.0), **kohya(text, "lora_te", alpha=1.0)}, path)
    pipe = make_tiny_pipeline(make_tiny_unet())
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    theirs = diffusers_images(pipe)
    eng = engine.build(base, lora=(str(path), 0.8), device="cpu")
    np.testing.assert_allclose(lumen_images(eng), theirs, rtol=0, atol=ATOL)
    # W + scale * alpha / rank * up @ down, computed here from the file
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    up, down = layers[f"{q}.lora.up.weight"], layers[f"{q}.lora.down.weight"]
    expected = base.unet.state_dict()[f"{q}.weight"] + 0.8 * (2.0 / 4) * up @ down
    torch.testing.assert_close(eng.components.unet.state_dict()[f"{q}.weight"], expected, rtol=0, atol=1e-6)
    v = "encoder.layers.1.self_attn.v_proj"
    up, down = (text[f"text_model.{v}.lora_linear_layer.{k}.weight"] for k in ("up", "down"))
    expected = base.text_encoder.state_dict()[f"{v}.weight"] + 0.8 * (1.0 / 2) * up @ down
    torch.testing.assert_close(eng.components.text_encoder.module.state_dict()[f"{v}.weight"], expected,
                               rtol=0, atol=1e-6)


def test_sdxl_lora_on_both_text_encoders_matches_diffusers(tmp_path):
    base = make_tiny_sdxl_pipeline()
    path = save_lora(tmp_path, StableDiffusionXLPipeline,
                     unet_lora_layers=lora_layers(base.unet, UNET_TARGETS, 4, 6),
                     text_encoder_lora_layers=lora_layers(base.text_encoder, TEXT_TARGETS, 2, 7),
                     text_encoder_2_lora_layers=lora_layers(base.text_encoder_2, TEXT_TARGETS, 2, 8))
    assert {k.split(".")[0] for k in load_file(path)} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = make_tiny_sdxl_pipeline()
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=0.9)
    eng = engine.build(make_tiny_sdxl_pipeline(), lora=(path, 0.9), device="cpu")
    np.testing.assert_allclose(lumen_images(eng), diffusers_images(pipe), rtol=0, atol=ATOL)


def test_onnx_export_cache_key_holds_the_loras(sd_loras, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime")
    kw = dict(backend="onnxruntime", device="cpu", backend_options={"cache_dir": tmp_path})
    ours = lumen_images(engine.build(make_tiny_pipeline(make_tiny_unet()), lora=(sd_loras["unet"], 0.5), **kw))
    ref = lumen_images(engine.build(make_tiny_pipeline(make_tiny_unet()), lora=(sd_loras["unet"], 0.5), device="cpu"))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    engine.build(make_tiny_pipeline(make_tiny_unet()), lora=(sd_loras["unet"], 1.0), **kw)
    sidecars = [json.loads(path.read_text()) for path in tmp_path.glob("*.json")]
    keyed = sorted((m["fields"]["loras"] for m in sidecars if m["fields"].get("artifact") == "onnx"),
                   key=lambda loras: loras[0]["scale"])
    assert [[lora["scale"] for lora in loras] for loras in keyed] == [[0.5], [1.0]]
    assert len({loras[0]["sha256"] for loras in keyed}) == 1 and len(keyed[0][0]["sha256"]) == 64


def test_missing_and_misnamed_files_fail_before_loading(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        engine.build("default", lora=str(tmp_path / "missing.safetensors"))
    bin_file = tmp_path / "lora.bin"
    bin_file.write_bytes(b"\0" * 16)
    with pytest.raises(InvalidInputError, match=r"lora\.bin.*expected a \.safetensors"):
        engine.build("default", lora=bin_file)
    with pytest.raises(InvalidTypeError, match="expected a path"):
        engine.build("default", lora=[42])
    with pytest.raises(InvalidInputError, match="scale=nan"):
        engine.build("default", lora=(bin_file, float("nan")))


def test_corrupt_or_non_lora_files_are_named(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidInputError, match="cannot read LoRA .*corrupt.safetensors"):
        engine.build(make_tiny_unet(), lora=corrupt)
    weights = tmp_path / "weights.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, weights)
    with pytest.raises(InvalidInputError, match="weights.safetensors"):
        engine.build(make_tiny_unet(), lora=weights)


def test_lora_of_another_model_is_refused(tmp_path, sd_loras):
    sdxl_unet = make_tiny_sdxl_pipeline().unet  # cross_attention_dim 64: to_k/to_v shapes differ
    wrong_shapes = save_lora(tmp_path / "shapes", unet_lora_layers=lora_layers(sdxl_unet, ["to_k"], 2, 9))
    with pytest.raises(InvalidInputError, match="shapes.*does not fit this UNet"):
        engine.build(make_tiny_unet(), lora=wrong_shapes)
    layers = lora_layers(make_tiny_unet(), ["to_q"], 2, 9)  # 8 layers; 2 more in a block it lacks
    extra = {k.replace("down_blocks.0.", "down_blocks.7."): v.clone() for k, v in layers.items()
             if k.startswith("down_blocks.0.")}
    assert (len(layers) // 2, len(extra) // 2) == (8, 2)
    no_such_layers = save_lora(tmp_path / "layers", unet_lora_layers={**layers, **extra})
    with pytest.raises(InvalidInputError, match="adapts 10 unet layers but this model has only 8"):
        engine.build(make_tiny_unet(), lora=no_such_layers)


def test_text_encoder_lora_needs_a_clip_text_encoder(sd_loras):
    with pytest.raises(InvalidInputError, match="adapts text_encoder, which this model does not have"):
        engine.build(make_tiny_unet(), lora=sd_loras["a"])
    with pytest.raises(InvalidInputError, match="LumenTextEncoder"):
        engine.build("default", lora=sd_loras["a"])


@pytest.mark.parametrize("text, expected", [("a.safetensors", ("a.safetensors", 1.0)),
                                            ("dir/a.safetensors:0.5", ("dir/a.safetensors", 0.5)),
                                            ("C:/loras/a.safetensors", ("C:/loras/a.safetensors", 1.0))])
def test_lora_argument_reads_path_and_scale(text, expected):
    assert lora_arg(text) == expected


def test_generate_fuses_loras_given_on_the_command_line(sd_loras, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "cat.png"
    args = ["generate", "a cat", "--model", str(tiny_pipeline_dir), "--steps", "3", "-o", str(out)]
    assert main([*args, "--lora", f"{sd_loras['a']}:0.5", "--lora", sd_loras["unet"]]) == 0
    eng = engine.build(str(tiny_pipeline_dir), lora=[(sd_loras["a"], 0.5), sd_loras["unet"]], device="cpu")
    expected = eng.run(prompt="a cat", num_inference_steps=3, guidance_scale=7.5, guidance_rescale=0.7,
                       generator=[torch.Generator().manual_seed(0)]).images[0]
    with PIL.Image.open(out) as image:
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
    assert main([*args, "--lora", str(tmp_path / "missing.safetensors")]) == 2


def build_output(model: str, lora: list) -> tuple[str, set]:
    """(stdout, the progress bars as (name, total)) of a fresh interpreter building model."""
    code = f"from lumen import engine; engine.build({model!r}, device='cpu', lora={lora!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    bars = set(re.findall(r"(\w[\w ]*)\.*:\s+\d+%\|[^|]*\| \d+/(\d+)", done.stderr))
    rest = re.sub(r"[^\n\r]*\d+%\|[^\n\r]*", "", done.stderr).strip()
    assert rest == "", done.stderr  # nothing but progress bars
    return done.stdout, bars


def test_fusing_loras_prints_nothing_more_than_loading(sd_loras, tiny_pipeline_dir):
    """No diffusers notice and no adapter-loading bar: only the folder's own loading bars
    (see test_diffusers_habits) remain."""
    plain = build_output(str(tiny_pipeline_dir), None)
    assert build_output(str(tiny_pipeline_dir), [sd_loras["a"], sd_loras["unet"]]) == plain
    assert plain[0] == "" and plain[1]


def test_lumen_build_with_loras_fills_the_entry_the_engine_uses(sd_loras, tiny_pipeline_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime")
    args = ["build", str(tiny_pipeline_dir), "--backend", "onnxruntime", "--dtype", "float32",
            "--device", "cpu", "--cache-dir", str(tmp_path), "--lora", f"{sd_loras['unet']}:0.5"]
    assert main(args) == 0
    assert "onnxruntime artifact (built)" in capsys.readouterr().err
    (sidecar,) = tmp_path.glob("*.json")
    built = sidecar.stat().st_mtime_ns
    engine.build(str(tiny_pipeline_dir), backend="onnxruntime", device="cpu", lora=(sd_loras["unet"], 0.5),
                 backend_options={"cache_dir": tmp_path})
    assert [p.name for p in tmp_path.glob("*.json")] == [sidecar.name] and sidecar.stat().st_mtime_ns == built
    assert json.loads(sidecar.read_text())["fields"]["loras"][0]["scale"] == 0.5


def test_a_two_item_list_is_a_pair_as_json_and_yaml_give_it(sd_loras):
    from lumen.engine.lora import parse_loras

    path = sd_loras["unet"]
    assert parse_loras([[path, 0.5], path]) == parse_loras([(path, 0.5), path])
    assert [spec.scale for spec in parse_loras([path, path])] == [1.0, 1.0]  # two paths: two LoRAs
