"""Word-level tokenizer and tiny transformer text encoder of the built-in models.

Layout on disk (next to a diffusers UNet): `tokenizer/vocab.json` ({word: id}, plus the max
length) and `text_encoder/config.json` + `text_encoder/model.safetensors`.
"""
import json
import pathlib

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import InvalidInputError

PAD, BOS = "<pad>", "<bos>"


class WordTokenizer:
    """Lowercase whitespace split over a fixed vocabulary; "" (unconditional) is just BOS."""

    def __init__(self, words, max_length: int):
        words = [w for w in words if w not in (PAD, BOS)]
        self.vocab = {PAD: 0, BOS: 1, **{w: i + 2 for i, w in enumerate(words)}}
        self.max_length = max_length

    def words(self) -> list[str]:
        return [w for w in self.vocab if w not in (PAD, BOS)]

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, max_length]: BOS, the words, then PAD."""
        if isinstance(prompts, str):
            raise InvalidInputError(f"prompts={prompts!r} is a str; expected a list of str")
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.vocab or w in (PAD, BOS)]
            if unknown:
                raise InvalidInputError(f"unknown word {unknown[0]!r} in prompt {prompt!r}; the "
                                        f"built-in model knows only: {', '.join(self.words())}")
            if len(words) + 1 > self.max_length:
                raise InvalidInputError(f"prompt {prompt!r} has {len(words)} words; expected at "
                                        f"most {self.max_length - 1}")
            ids[i, : len(words) + 1] = torch.tensor([self.vocab[BOS]] + [self.vocab[w] for w in words])
        return ids

    def save_pretrained(self, directory) -> None:
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {"max_length": self.max_length, "vocab": self.vocab}
        (directory / "vocab.json").write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, directory) -> "WordTokenizer":
        data = json.loads((pathlib.Path(directory) / "vocab.json").read_text())
        words = sorted(data["vocab"], key=data["vocab"].get)
        tokenizer = cls(words, data["max_length"])
        if tokenizer.vocab != data["vocab"]:
            raise InvalidInputError(f"{directory}/vocab.json: ids must be 0 = {PAD}, 1 = {BOS}, "
                                    "then consecutive")
        return tokenizer


class LumenTextEncoder(nn.Module):
    """Token + position embeddings, pre-norm transformer layers, final LayerNorm: [B, L, dim]."""

    def __init__(self, tokenizer: WordTokenizer, dim: int = 64, num_layers: int = 2,
                 num_heads: int = 4):
        super().__init__()
        self.tokenizer = tokenizer
        self.config = {"_class_name": "LumenTextEncoder", "vocab_size": len(tokenizer.vocab),
                       "max_length": tokenizer.max_length, "dim": dim,
                       "num_layers": num_layers, "num_heads": num_heads}
        self.token_embedding = nn.Embedding(len(tokenizer.vocab), dim)
        self.position_embedding = nn.Parameter(torch.zeros(tokenizer.max_length, dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, num_heads, 2 * dim, 0.0, batch_first=True, norm_first=True)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    @property
    def dim(self) -> int:
        return self.config["dim"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, L] -> hidden states [B, L, dim]. PAD is attended to: it is a learned token."""
        h = self.token_embedding(ids) + self.position_embedding
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> encoder_hidden_states [B, max_length, dim] on the module's device."""
        return self(self.tokenizer(prompts).to(self.token_embedding.weight.device))

    def save_pretrained(self, directory) -> None:
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=1) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory, tokenizer: WordTokenizer) -> "LumenTextEncoder":
        directory = pathlib.Path(directory)
        config = json.loads((directory / "config.json").read_text())
        if config.get("_class_name") != "LumenTextEncoder":
            raise InvalidInputError(f"{directory}/config.json has _class_name="
                                    f"{config.get('_class_name')!r}; expected 'LumenTextEncoder'")
        for key in ("vocab_size", "max_length"):
            expected = len(tokenizer.vocab) if key == "vocab_size" else tokenizer.max_length
            if config[key] != expected:
                raise InvalidInputError(f"text encoder {key}={config[key]} but tokenizer has "
                                        f"{expected}")
        model = cls(tokenizer, config["dim"], config["num_layers"], config["num_heads"])
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()


def save_text_model(model_dir, encoder: LumenTextEncoder) -> None:
    """Write model_dir/text_encoder and model_dir/tokenizer."""
    model_dir = pathlib.Path(model_dir)
    encoder.save_pretrained(model_dir / "text_encoder")
    encoder.tokenizer.save_pretrained(model_dir / "tokenizer")


def load_text_encoder(model_dir) -> LumenTextEncoder:
    """The text encoder of a built-in model directory (reads text_encoder/ and tokenizer/)."""
    model_dir = pathlib.Path(model_dir)
    tokenizer = WordTokenizer.from_pretrained(model_dir / "tokenizer")
    return LumenTextEncoder.from_pretrained(model_dir / "text_encoder", tokenizer)
