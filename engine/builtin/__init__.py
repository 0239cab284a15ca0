"""The embedded default models: tiny text-to-image models trained on procedural scenes."""
import pathlib

from ..errors import InvalidInputError

MODEL_NAMES = ("default", "flawed")
WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"


def model_dir(name: str) -> pathlib.Path:
    """Directory of built-in model `name` (diffusers layout: unet/, text_encoder/, ...)."""
    if name not in MODEL_NAMES:
        raise InvalidInputError(f"built-in model {name!r}; expected one of {MODEL_NAMES}")
    return WEIGHTS_DIR / name
