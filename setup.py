from setuptools import find_packages, setup

# The repository keeps its packages as top-level folders; they install as lumen.engine,
# lumen.kernels, ... beside the front door lumen/ (public API and command line), so the wheel's
# only top-level name is `lumen` (a bare `kernels` would collide with Hugging Face's).
FOLDERS = ("engine", "kernels", "export", "serve", "benchmarks")
PACKAGES = ["lumen", *(f"lumen.{name}" for name in
                       find_packages(include=[n for f in FOLDERS for n in (f, f"{f}.*")]))]

SERVE = ["fastapi>=0.165", "uvicorn>=0.30", "pydantic>=2.5", "prometheus-client>=0.20",
         "python-multipart>=0.0.9"]
# 2.56 added late-bound ingress (__serve_build_asgi_app__): each replica builds its own app.
RAY = [*SERVE, "ray[serve]>=2.56"]

setup(
    name="lumen-diffusion",
    version="0.1.0",
    description="Zero-terminal-SNR diffusion inference engine (Lin et al. 2023 fixes, fused kernels).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"lumen": "lumen", **{f"lumen.{name}": name for name in FOLDERS}},
    package_data={"lumen.engine": ["builtin/weights/*/*.json", "builtin/weights/*/*/*.json",
                                   "builtin/weights/*/*/*.safetensors"],
                  "lumen.serve": ["serve_config.yaml"]},
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.30",
        # without it diffusers prints an "accelerate was not found" notice on every model load
        "accelerate>=0.30",
        "transformers>=4.40",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=9.0",
        "tqdm>=4.60",
        "filelock>=3.12",  # the artifact cache's build lock
        "peft>=0.13",  # diffusers loads LoRAs (lumen.build(lora=...)) through PEFT
    ],
    extras_require={
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"],
        "onnx-gpu": ["onnx>=1.16", "onnxruntime-gpu>=1.18", "onnxscript>=0.2"],
        "tensorrt": ["tensorrt>=10.0"],
        "kernels": ["triton>=3.0"],
        "bench": ["pytest-benchmark>=4.0", "matplotlib>=3.7"],
        # FastAPI's own max_body_size (413 for large bodies) is recent, hence its bound.
        "serve": SERVE,
        "ray": RAY,
        "controlnet": ["opencv-python-headless>=4.8"],  # the server's "canny" preprocessor
        # tensorrt-stubs (type checking of export/trt_backend.py) must be installed with
        # --no-deps: its dependencies are TensorRT's CUDA wheels. .ci/run does that.
        "test": ["pytest>=7.4", "pytest-benchmark>=4.0", "triton>=3.0", "matplotlib>=3.7",
                 "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2", "mypy>=1.10",
                 *RAY, "httpx>=0.27", "openai>=1.0", "webuiapi>=0.9.17",  # real API clients
                 "DeepCache>=0.1.1",  # the DeepCache parity oracle (DeepCacheSDHelper)
                 "opencv-python-headless>=4.8",  # the server's "canny" ControlNet preprocessor
                 # tests/test_namespace.py builds the wheel offline with this environment's
                 # setuptools (70.1 has bdist_wheel built in)
                 "setuptools>=70.1"],
    },
    entry_points={"console_scripts": ["lumen=lumen.cli:main"]},
)
