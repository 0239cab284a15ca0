"""export/: ONNX parity with torch, the artifact cache's guarantees, and clear errors."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from importlib import util
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from diffusers import UNet2DConditionModel  # noqa: E402

from lumen.engine.errors import BackendUnavailableError, InvalidInputError  # noqa: E402
from lumen.export import BACKENDS, build, load_runner  # noqa: E402
from lumen.export.cache import ArtifactCache, CacheWarning, key_of  # noqa: E402
from lumen.export.cli import add_build_parser  # noqa: E402
from lumen.export.onnx_export import ONNX_FILE, export_cached  # noqa: E402
from lumen.export.trt_backend import Profile, TrtRunner  # noqa: E402
from repo_layout import PACKAGES, REPO  # noqa: E402

# Three levels: two downsamplers, so latents must be multiples of 4 (the pitfall is testable).
TINY = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 32, 64), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SDXL_LIKE = dict(TINY, block_out_channels=(32, 32), addition_embed_type="text_time",
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 16)
FP32_ATOL = 1e-4
# fp16 ONNX vs the fp32 torch model: outputs are O(1) and fp16's spacing at 1 is ~1e-3; the
# measured max error is ~1e-3, so 1e-2 leaves room for accumulation order, not for bugs.
FP16_ATOL = 1e-2


def tiny_unet(config=TINY, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval().to(dtype)


def torch_unet_out(unet, x, t, e, **added):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=e, added_cond_kwargs=added or None).sample


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lumen-cache")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def runner(unet, cache_dir):
    return load_runner(unet, "onnxruntime", device="cpu", dtype=torch.float32,
                       cache_dir=cache_dir)


@pytest.mark.parametrize("batch,height,width,seq", [(1, 16, 16, 77), (2, 8, 24, 77),
                                                    (3, 32, 12, 7), (2, 4, 4, 1)])
def test_onnxruntime_matches_torch_fp32(unet, runner, batch, height, width, seq):
    x = torch.randn(batch, 4, height, width)
    e = torch.randn(batch, seq, 32)
    t = torch.tensor(321.0)
    out = runner(x, t, e)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, torch_unet_out(unet, x, t, e), atol=FP32_ATOL, rtol=0)


def test_onnxruntime_fp16_matches_torch_fp32(unet, cache_dir):
    unet16 = tiny_unet(dtype=torch.float16)
    runner16 = load_runner(unet16, "onnxruntime", device="cpu", dtype=torch.float16,
                           cache_dir=cache_dir)
    for batch, height, width in [(1, 16, 16), (2, 8, 20)]:
        x, e, t = torch.randn(batch, 4, height, width), torch.randn(batch, 77, 32), torch.tensor(9.0)
        out = runner16(x.half(), t, e.half())
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), torch_unet_out(unet, x, t, e),
                                   atol=FP16_ATOL, rtol=0)


def test_sdxl_text_time_inputs_are_exported(cache_dir):
    sdxl = tiny_unet(SDXL_LIKE)
    run = load_runner(sdxl, "onnxruntime", device="cpu", dtype=torch.float32, cache_dir=cache_dir)
    x, e, t = torch.randn(2, 4, 8, 12), torch.randn(2, 77, 32), torch.tensor(500.0)
    added = {"text_embeds": torch.randn(2, 16), "time_ids": torch.rand(2, 6) * 1024}
    torch.testing.assert_close(run(x, t, e, **added), torch_unet_out(sdxl, x, t, e, **added),
                               atol=FP32_ATOL, rtol=0)
    with pytest.raises(InvalidInputError, match="text_embeds"):
        run(x, t, e)


@pytest.mark.parametrize("sample,context,match", [
    ((1, 4, 18, 16), (1, 77, 32), r"latent size 18x16 is not a multiple of 4"),
    ((1, 3, 16, 16), (1, 77, 32), r"expected \[B, 4, H, W\]"),
    ((2, 4, 16, 16), (1, 77, 32), "encoder_hidden_states batch 1 != sample batch 2")])
def test_bad_input_shapes_are_rejected(runner, sample, context, match):
    with pytest.raises(InvalidInputError, match=match):
        runner(torch.randn(sample), torch.tensor(1.0), torch.randn(context))


def test_wrong_input_dtype_is_rejected(runner):
    with pytest.raises(InvalidInputError, match="sample dtype torch.float16; .* torch.float32"):
        runner(torch.randn(1, 4, 8, 8).half(), torch.tensor(1.0), torch.randn(1, 77, 32))


@pytest.mark.parametrize("shapes,match", [
    (((2, 16, 16), (1, 16, 16), (4, 16, 16)), "min <= opt <= max"),
    (((1, 16, 16), (2, 16, 16), (4, 16, 18)), "latent size 16x18"),
    (((1, 16, 16), (2, 0, 16), (4, 16, 16)), "positive ints")])
def test_bad_profile_shapes_are_rejected_before_export(unet, tmp_path, shapes, match):
    with pytest.raises(InvalidInputError, match=match):
        build(unet, "onnxruntime", device="cpu", dtype=torch.float32, cache_dir=tmp_path,
              min_shape=shapes[0], opt_shape=shapes[1], max_shape=shapes[2])
    assert not any(tmp_path.iterdir())


def test_shape_outside_trt_profile_names_the_profile():
    # The check runs before any TensorRT call, so it is testable without TensorRT.
    from lumen.export.onnx_export import UNetSignature

    runner = TrtRunner.__new__(TrtRunner)
    runner.profile = Profile((1, 8, 8), (2, 16, 16), (2, 16, 16))
    runner.signature, runner.dtype = UNetSignature.of(tiny_unet().config), torch.float32
    with pytest.raises(InvalidInputError, match=r"batch 1\.\.2, latent 8x8\.\.16x16"):
        runner(torch.randn(3, 4, 16, 16), torch.tensor(1.0), torch.randn(3, 77, 32))


def test_profile_gives_tensorrt_shapes_per_input():
    from lumen.export.onnx_export import UNetSignature

    profile = Profile((1, 8, 8), (2, 16, 16), (4, 32, 24), seq=(77, 77, 154))
    shapes = profile.input_shapes(UNetSignature.of(tiny_unet(SDXL_LIKE).config))
    assert shapes == {"sample": ((1, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 24)),
                      "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (4, 154, 32)),
                      "text_embeds": ((1, 16), (2, 16), (4, 16)),
                      "time_ids": ((1, 6), (2, 6), (4, 6))}
    assert profile.contains(3, 16, 24, 100) and not profile.contains(3, 16, 28, 100)


def test_second_load_in_new_process_reuses_the_file(runner, cache_dir, tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from diffusers import UNet2DConditionModel
        from lumen.export import build
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{TINY!r}).eval()
        art = build(unet, "onnxruntime", device="cpu", dtype=torch.float32, cache_dir={str(cache_dir)!r})
        print(art.cache_hit, art.path)
    """)
    onnx_files = list(cache_dir.glob(f"*/{ONNX_FILE}"))
    mtimes = {p: p.stat().st_mtime_ns for p in onnx_files}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=True)
    hit, path = done.stdout.split()[-2:]
    assert hit == "True" and Path(path) in mtimes
    assert Path(path).stat().st_mtime_ns == mtimes[Path(path)]


def test_bit_flipped_onnx_entry_is_detected_and_rebuilt(unet, runner, cache_dir, tmp_path):
    shutil.copytree(cache_dir, tmp_path, dirs_exist_ok=True)  # keep the shared entry intact
    cache = ArtifactCache(tmp_path)
    path, hit = export_cached(unet, cache, dtype=torch.float32)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.warns(CacheWarning, match="sha256"):
        again, hit = export_cached(unet, cache, dtype=torch.float32)
    assert not hit and again == path and again.stat().st_size == len(good)
    assert export_cached(unet, cache, dtype=torch.float32)[1]


def test_truncated_entry_is_detected_and_rebuilt(tmp_path):
    cache = ArtifactCache(tmp_path)
    fields = {"artifact": "test"}
    entry, _ = cache.get_or_build(fields, lambda d: (d / "a.bin").write_bytes(b"x" * 1000))
    (entry / "a.bin").write_bytes(b"x" * 500)
    with pytest.warns(CacheWarning, match="has 500 bytes, sidecar says 1000"):
        entry, hit = cache.get_or_build(fields, lambda d: (d / "a.bin").write_bytes(b"z" * 1000))
    assert not hit and (entry / "a.bin").read_bytes() == b"z" * 1000


def test_scattered_external_data_is_consolidated_into_one_file(unet, runner, cache_dir,
                                                              tmp_path):
    # What the TorchScript exporter writes for UNets over 2 GB, emulated on the tiny one.
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import convert_model_to_external_data

    from lumen.export.onnx_export import _consolidate_external_data

    cached, hit = export_cached(unet, ArtifactCache(cache_dir), dtype=torch.float32)
    assert hit
    model = onnx.load(str(cached))
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=0)
    onnx.save_model(model, str(tmp_path / ONNX_FILE))
    assert len(list(tmp_path.iterdir())) > 10
    _consolidate_external_data(tmp_path / ONNX_FILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ONNX_FILE, ONNX_FILE + ".data"]
    onnx.checker.check_model(str(tmp_path / ONNX_FILE), full_check=True)
    session = ort.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    x, e = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    (out,) = session.run(None, {"sample": x.numpy(), "timestep": torch.tensor(3.0).numpy(),
                                "encoder_hidden_states": e.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), runner(x, torch.tensor(3.0), e))


def test_mismatched_sidecar_is_rebuilt(tmp_path):
    cache = ArtifactCache(tmp_path)
    fields = {"artifact": "test", "n": 1}
    cache.get_or_build(fields, lambda d: (d / "a.bin").write_bytes(b"x" * 100))
    sidecar = cache.sidecar(key_of(fields))
    sidecar.write_text(sidecar.read_text().replace('"n": 1', '"n": 2'))
    with pytest.warns(CacheWarning, match="key fields do not match"):
        _, hit = cache.get_or_build(fields, lambda d: (d / "a.bin").write_bytes(b"y" * 100))
    assert not hit and (cache.entry_dir(key_of(fields)) / "a.bin").read_bytes() == b"y" * 100


def test_exception_mid_write_leaves_no_entry(tmp_path):
    cache = ArtifactCache(tmp_path)
    fields = {"artifact": "test"}

    def dies(staging):
        (staging / "a.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build(fields, dies)
    assert [p for p in tmp_path.iterdir() if p.suffix != ".lock"] == []  # a lock is no entry
    _, hit = cache.get_or_build(fields, lambda d: (d / "a.bin").write_bytes(b"whole"))
    assert not hit and cache.get_or_build(fields, dies)[1]


def test_killed_build_leaves_no_entry(tmp_path):
    script = textwrap.dedent(f"""
        import os
        from lumen.export.cache import ArtifactCache
        def dies(staging):
            with open(staging / "a.bin", "wb") as f:
                f.write(b"half")
                f.flush()
                os._exit(9)  # like SIGKILL: no cleanup, no finally
        ArtifactCache({str(tmp_path)!r}).get_or_build({{"artifact": "test"}}, dies)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, timeout=60)
    assert done.returncode == 9
    cache = ArtifactCache(tmp_path)
    assert not list(tmp_path.glob("*.json"))
    assert cache.lookup(key_of({"artifact": "test"}), {"artifact": "test"}) is None
    _, hit = cache.get_or_build({"artifact": "test"}, lambda d: (d / "a.bin").write_bytes(b"ok"))
    assert not hit and not list(tmp_path.glob(".tmp-*"))  # dead staging dir was swept


def test_cache_dir_comes_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LUMEN_CACHE_DIR", str(tmp_path / "from-env"))
    assert ArtifactCache().root == tmp_path / "from-env"
    assert ArtifactCache(tmp_path / "arg").root == tmp_path / "arg"


@pytest.mark.parametrize("module", [None, "stubs-only"])
def test_tensorrt_unavailable_raises_naming_fallbacks(unet, tmp_path, monkeypatch, module):
    if module is None:
        monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    elif util.find_spec("tensorrt") is None or hasattr(__import__("tensorrt"), "Builder"):
        pytest.skip("needs tensorrt-stubs without TensorRT (namespace-package import)")
    with pytest.raises(BackendUnavailableError, match="'onnxruntime' or 'torch'"):
        load_runner(unet, "tensorrt", device="cpu", dtype=torch.float32, cache_dir=tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # failed before exporting


def test_unknown_backend_lists_choices(unet, tmp_path):
    with pytest.raises(InvalidInputError, match=", ".join(BACKENDS)):
        load_runner(unet, "tvm", device="cpu", dtype=torch.float32, cache_dir=tmp_path)


def test_bfloat16_errors_are_clear(tmp_path):
    unet_bf16 = tiny_unet(dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        load_runner(unet_bf16, "onnxruntime", device="cpu", dtype=torch.bfloat16,
                    cache_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="exporter='dynamo'"):
        export_cached(unet_bf16, ArtifactCache(tmp_path), dtype=torch.bfloat16)
    with pytest.raises(InvalidInputError, match="weights are torch.bfloat16"):
        export_cached(unet_bf16, ArtifactCache(tmp_path), dtype=torch.float32)


def test_cli_build_reports_artifact_and_size(unet, runner, cache_dir, tmp_path, capsys):
    unet.save_pretrained(tmp_path / "model" / "unet")
    parser = argparse.ArgumentParser(prog="lumen")
    add_build_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["build", str(tmp_path / "model"), "--backend", "onnxruntime",
                              "--dtype", "float32", "--opt", "2x16x12",  # no VAE: factor 1
                              "--cache-dir", str(cache_dir)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "onnxruntime artifact (cache hit)" in err and ONNX_FILE in err
    assert "MiB" in err and "latent 16x12..16x12" in err
    with pytest.raises(SystemExit):
        parser.parse_args(["build", "m", "--backend", "onnxruntime", "--min", "2x512"])


def test_trt_backend_typechecks_against_tensorrt_stubs(tmp_path):
    if util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install mypy)")
    spec = util.spec_from_file_location("trt_stubs_overlay", REPO / "tests" / "trt_stubs_overlay.py")
    overlay = util.module_from_spec(spec)
    spec.loader.exec_module(overlay)
    if overlay.stubs_root() is None:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    stubs = overlay.build_overlay(tmp_path / "stubs")
    env = dict(os.environ, MYPYPATH=f"{stubs}{os.pathsep}{lumen_tree(tmp_path / 'site')}")
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                           str(REPO / "tests" / "mypy_trt.ini"), "--cache-dir",
                           str(tmp_path / "mypy-cache"), "-m", "lumen.export.trt_backend"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found in 1 source file" in done.stdout


def lumen_tree(site: Path) -> Path:
    """site/lumen laid out as the wheel lays it out, in links: mypy does not run the editable
    install's import hook, which maps lumen.export to export/ (setup.py's package_dir)."""
    (site / "lumen").mkdir(parents=True)
    for path in (REPO / "lumen").glob("*.py"):
        (site / "lumen" / path.name).symlink_to(path)
    for name in PACKAGES:
        (site / "lumen" / name).symlink_to(REPO / name, target_is_directory=True)
    return site


def test_sidecar_with_wrong_structure_is_rebuilt_not_a_crash(tmp_path):
    cache = ArtifactCache(tmp_path)
    fields = {"artifact": "test"}
    entry, _ = cache.get_or_build(fields, lambda d: (d / "a.bin").write_bytes(b"x" * 10))
    sidecar = cache.sidecar(key_of(fields))
    meta = json.loads(sidecar.read_text())
    meta["files"] = {name: {"sha": "?"} for name in meta["files"]}
    sidecar.write_text(json.dumps(meta))
    with pytest.warns(CacheWarning, match="malformed sidecar"):
        entry, hit = cache.get_or_build(fields, lambda d: (d / "a.bin").write_bytes(b"y" * 10))
    assert not hit and (entry / "a.bin").read_bytes() == b"y" * 10


def test_runner_output_has_the_unets_out_channels():
    from lumen.export.onnx_export import UNetSignature

    sig = UNetSignature.of(type("C", (), dict(in_channels=9, out_channels=4, cross_attention_dim=32,
                                              block_out_channels=(32, 64), addition_embed_type=None))())
    assert tuple(sig.output_like(torch.zeros(2, 9, 8, 6)).shape) == (2, 4, 8, 6)


def test_residual_inputs_have_the_shapes_a_controlnet_gives():
    """UNetSignature(residuals=True): one input per ControlNet output, shaped as a real
    ControlNetModel's outputs; the TensorRT profile gives each its min/opt/max."""
    from diffusers import ControlNetModel

    from lumen.export.onnx_export import UNetSignature

    unet = tiny_unet(SDXL_LIKE)
    sig = UNetSignature.of(unet.config, residuals=True)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8,)).eval()
    sample = torch.randn(2, 4, 16, 24)
    with torch.no_grad():
        down, mid = net(sample, torch.tensor(10.0), encoder_hidden_states=torch.randn(2, 7, 32),
                        controlnet_cond=torch.rand(2, 3, 16, 24), return_dict=False,
                        added_cond_kwargs={"text_embeds": torch.randn(2, 16),
                                           "time_ids": torch.randn(2, 6)})
    zeros = sig.residual_zeros(sample)
    assert list(zeros) == [f"down_{i}" for i in range(len(down))] + ["mid"]
    assert [tuple(t.shape) for t in zeros.values()] == [tuple(t.shape) for t in [*down, mid]]
    shapes = Profile((1, 8, 8), (2, 16, 16), (4, 32, 24)).input_shapes(sig)
    assert shapes["mid"] == ((1, 32, 4, 4), (2, 32, 8, 8), (4, 32, 16, 12))
    assert shapes["down_0"] == ((1, 32, 8, 8), (2, 32, 16, 16), (4, 32, 32, 24))
    with pytest.raises(InvalidInputError, match="exported without residual inputs"):
        UNetSignature.of(unet.config).residual_feeds(sample, list(down), mid)
