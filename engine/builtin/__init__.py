"""The embedded default models: tiny text-to-image models trained on procedural scenes."""
import contextlib
import pathlib

import torch

from ..errors import InvalidInputError

MODEL_NAMES = ("default", "flawed")
WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"


def model_dir(name: str) -> pathlib.Path:
    """Directory of built-in model `name` (diffusers layout: unet/, text_encoder/, ...)."""
    if name not in MODEL_NAMES:
        raise InvalidInputError(f"built-in model {name!r}; expected one of {MODEL_NAMES}")
    return WEIGHTS_DIR / name


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count is n inside (training, the studies), the caller's after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
