"""Training and serialisation of the built-in models (engine/builtin/train.py, text.py, models.py)."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from lumen.engine.builtin import MODEL_NAMES, model_dir, scenes
from lumen.engine.builtin.models import load_initial_step
from lumen.engine.builtin.text import LumenTextEncoder, WordTokenizer, load_text_encoder
from lumen.engine.builtin.train import (VARIANTS, ExactTargets, TrainConfig, build_models, diffusion_loss,
                                  posterior_mean, render_bank, save_model, scheduler_config, train)
from lumen.engine.builtin.train_initial_step import InitialStepConfig
from lumen.engine.builtin.train_initial_step import train as train_initial_step
from lumen.engine.config import PRESETS, SamplerConfig
from lumen.engine.errors import InvalidInputError
from lumen.engine.prediction import to_x0_eps

TINY = dict(steps=3, batch_size=4, warmup=1, tiny=True)


def _params(*modules) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for m in modules for p in m.parameters()])


def test_encoder_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    encoder = LumenTextEncoder(WordTokenizer(scenes.vocabulary(), 10), dim=16, num_layers=1)
    torch.nn.init.normal_(encoder.position_embedding)  # not the init values
    prompts = ["a red circle", "", "solid black background"]
    encoder.save_pretrained(tmp_path / "text_encoder")
    encoder.tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = json.loads((tmp_path / "text_encoder" / "config.json").read_text())
    assert config["_class_name"] == "LumenTextEncoder"
    assert (tmp_path / "text_encoder" / "model.safetensors").is_file()
    assert (tmp_path / "tokenizer" / "vocab.json").is_file()
    loaded = load_text_encoder(tmp_path)
    with torch.no_grad():
        h = encoder.eval().encode(prompts)
        assert h.shape == (3, 10, 16)
        assert torch.equal(loaded.encode(prompts), h)


def test_encoder_distinguishes_prompts():
    encoder, _ = build_models(TrainConfig(tiny=True))
    with torch.no_grad():
        h = encoder.encode(["a red circle", "a blue circle", ""])
    assert not torch.allclose(h[0], h[1]) and not torch.allclose(h[0], h[2])


@pytest.mark.parametrize("variant", ["default", "flawed"])
def test_few_training_steps_give_finite_loss_and_change_weights(variant):
    config = TrainConfig(variant=variant, **TINY)
    before = _params(*build_models(config))
    encoder, unet, stats = train(config, log=lambda m: None)
    after = _params(encoder, unet)
    assert torch.isfinite(torch.tensor(stats["final_loss"]))
    assert 0.05 < stats["avg_loss"] < 10.0
    assert (after - before).abs().max() > 1e-4
    assert torch.isfinite(after).all()


def test_variants_share_initialisation_and_differ_only_in_schedule():
    init_default = _params(*build_models(TrainConfig(variant="default", tiny=True)))
    init_flawed = _params(*build_models(TrainConfig(variant="flawed", tiny=True)))
    assert torch.equal(init_default, init_flawed)
    assert float(VARIANTS["default"].train_abar()[-1]) == 0.0
    assert float(VARIANTS["flawed"].train_abar()[-1]) == pytest.approx(0.068265**2, rel=1e-3)
    assert VARIANTS["default"].prediction_type == "v_prediction"
    assert VARIANTS["flawed"].prediction_type == "epsilon"


def test_v_loss_at_terminal_timestep_targets_minus_x0():
    """At abar = 0 the v target is -x0: a UNet that outputs -x0 there has zero loss."""
    config = TrainConfig(tiny=True)
    encoder, _ = build_models(config)
    x0, captions = scenes.sample_batch(4, torch.Generator().manual_seed(0), config.image_size)
    abar = torch.zeros(1)  # every t is the terminal, zero-SNR timestep

    class MinusX0:
        def __call__(self, x_t, t, encoder_hidden_states):
            return type("Out", (), {"sample": -x0})()

    loss = diffusion_loss(encoder, MinusX0(), x0, captions, abar, "v_prediction",
                          torch.Generator().manual_seed(1), 0.1)
    assert float(loss) == 0.0


@pytest.mark.parametrize("prediction_type,floor", [("v_prediction", 0.0), ("epsilon", 0.0),
                                                   ("v_prediction", 1.0), ("epsilon", 0.5)])
def test_min_snr_loss_counts_each_x0_error_min_snr_gamma_times(prediction_type, floor):
    """Min-SNR-gamma (Hang et al. 2023): the weighted loss equals mean(min(SNR, gamma) * |x0_hat - x0|^2),
    x0_hat read from the model output by the engine's own conversion; with a floor, each x0 error
    counts max(min(SNR, gamma), floor) times."""
    config = TrainConfig(tiny=True)
    encoder, _ = build_models(config)
    x0, captions = scenes.sample_batch(6, torch.Generator().manual_seed(0), config.image_size)
    abar = torch.tensor([0.999, 0.9, 0.5, 0.2, 0.05, 0.01])  # SNR from 999 to 0.01, one t each
    seen, gamma = {}, 5.0

    class Offset:  # any output: the true target plus a fixed error
        def __call__(self, x_t, t, encoder_hidden_states):
            seen.update(x_t=x_t, t=t)
            return type("Out", (), {"sample": torch.full_like(x_t, 0.3)})()

    loss = diffusion_loss(encoder, Offset(), x0, captions, abar, prediction_type,
                          torch.Generator().manual_seed(1), 0.0, min_snr_gamma=gamma, snr_floor=floor)
    a_t, s_t = (v.view(-1, 1, 1, 1) for v in (abar[seen["t"]].sqrt(), (1 - abar[seen["t"]]).sqrt()))
    x0_hat, _ = to_x0_eps(torch.full_like(x0, 0.3), seen["x_t"], a_t, s_t, prediction_type)
    snr = abar[seen["t"]] / (1 - abar[seen["t"]])
    counts = torch.tensor([max(min(float(v), gamma), floor) for v in snr])
    expected = (counts * (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    if floor > 0:  # the near-noise samples (SNR 0.01, 0.05) are what the floor raises
        assert float(counts.min()) == floor and float(snr.min()) < floor


@pytest.mark.parametrize("gamma,floor", [(None, 1.0), (5.0, -0.1), (5.0, 6.0)])
def test_snr_floor_is_checked(gamma, floor):
    with pytest.raises(InvalidInputError, match=f"snr_floor={floor}"):
        TrainConfig(min_snr_gamma=gamma, snr_floor=floor)


class Constant:  # a "UNet" whose output is c everywhere; records its inputs
    def __init__(self, c: float):
        self.c, self.seen = c, {}

    def __call__(self, x_t, t, encoder_hidden_states):
        self.seen.update(x_t=x_t, t=t)
        return type("Out", (), {"sample": torch.full_like(x_t, self.c)})()


@pytest.mark.parametrize("a", [0.0, 0.05, 0.5])
def test_posterior_mean_weights_the_bank_by_its_gaussian_likelihood(a):
    g = torch.Generator().manual_seed(0)
    bank = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    s = (1 - a * a) ** 0.5
    x_t = a * bank[2] + s * torch.randn(3, 4, 4, generator=g)
    log_lik = torch.stack([-(x_t.double() - a * b.double()).pow(2).sum() / (2 * s * s) for b in bank])
    expected = (log_lik.softmax(0).view(-1, 1, 1, 1) * bank.double()).sum(0).float()
    torch.testing.assert_close(posterior_mean(x_t, a, s, bank), expected, rtol=1e-5, atol=1e-6)
    if a == 0.0:  # pure noise says nothing: the plain mean of the bank
        torch.testing.assert_close(posterior_mean(x_t, a, s, bank), bank.mean(0))


def _replayed_means(captions, size, seed=3, draws=8):
    """Each caption's mean of `draws` renders [len(captions), 3, size, size], replayed from an
    ExactTargets generator seeded `seed` whose batch of 4 at abar = [0] drew two timesteps first."""
    replay = torch.Generator().manual_seed(seed)
    torch.randint(0, 1, (2,), generator=replay)  # the two timesteps drawn below the threshold
    return torch.stack([render_bank(c, draws, replay, size).mean(0) for c in captions])


def test_exact_targets_at_zero_snr_are_the_mean_of_fresh_renders_of_each_caption():
    """At abar = 0 every sample is below any SNR threshold, and its exact posterior mean is the
    mean of its caption's renders (of the whole data mix for ""): the loss is the x0 error
    against those means, counted once, replayed here from the renders' own generator."""
    config = TrainConfig(tiny=True)
    encoder, _ = build_models(config)
    x0, captions = scenes.sample_batch(4, torch.Generator().manual_seed(0), config.image_size)
    captions[1] = ""
    abar, unet = torch.zeros(1), Constant(0.3)
    exact = ExactTargets(below_snr=0.003, share=0.5, draws=8, generator=torch.Generator().manual_seed(3))
    loss = diffusion_loss(encoder, unet, x0, captions, abar, "v_prediction", torch.Generator().manual_seed(1),
                          0.0, min_snr_gamma=5.0, exact=exact)
    means = _replayed_means(captions, config.image_size)
    expected = torch.stack([(-0.3 - m).pow(2).mean() for m in means]).mean()  # x0_hat = -v at abar = 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert float(loss) > 0 and means[1].shape == (3, 8, 8)


@pytest.mark.parametrize("weight,pool", [(0.1, 1), (1.0, 4), (2.0, 8)])
def test_exact_error_is_weighted_and_averaged_over_blocks_before_squaring(weight, pool):
    """pool = the image size leaves only each channel's mean colour error; weight scales it all."""
    config = TrainConfig(tiny=True)
    encoder, _ = build_models(config)
    x0, captions = scenes.sample_batch(4, torch.Generator().manual_seed(0), config.image_size)
    abar = torch.zeros(1)
    g = torch.Generator().manual_seed(5)
    field = torch.randn(4, 3, 8, 8, generator=g)  # a model output that varies across pixels

    class Field(torch.nn.Module):
        def forward(self, x_t, t, encoder_hidden_states):
            return type("Out", (), {"sample": field})()

    exact = ExactTargets(below_snr=0.003, share=0.5, draws=8, generator=torch.Generator().manual_seed(3),
                         weight=weight, pool=pool)
    loss = diffusion_loss(encoder, Field(), x0, captions, abar, "v_prediction", torch.Generator().manual_seed(1),
                          0.0, exact=exact)
    means = _replayed_means(captions, config.image_size)
    diff = (-field - means).double()  # x0_hat = -v at abar = 0
    n = 8 // pool
    blocks = diff.reshape(4, 3, n, pool, n, pool).mean(dim=(3, 5))  # [4, 3, n, n] block means
    expected = weight * blocks.pow(2).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    if pool > 1:  # block means square to less than the pixels do (Jensen): detail no longer counts
        assert float(loss) < 0.9 * weight * float(diff.pow(2).mean())


@pytest.mark.parametrize("weight,pool", [(0.0, 1), (-1.0, 1), (1.0, 0), (1.0, 3)])
def test_exact_weight_and_pool_are_checked(weight, pool):
    with pytest.raises(InvalidInputError, match=f"exact_weight={weight}, exact_pool={pool}; .*dividing the image "
                                                f"size 32"):
        TrainConfig(exact_below_snr=0.003, exact_share=0.25, exact_weight=weight, exact_pool=pool)


@pytest.mark.parametrize("option", [dict(exact_weight=0.1), dict(exact_pool=32)])
def test_exact_weight_and_pool_need_exact_targets(option):
    """Without exact_below_snr they would change nothing: refused, like a share without it."""
    with pytest.raises(InvalidInputError, match="only with exact_below_snr > 0"):
        TrainConfig(**option)


def test_exact_share_of_the_batch_is_drawn_below_the_snr():
    config = TrainConfig(tiny=True)
    encoder, _ = build_models(config)
    x0, captions = scenes.sample_batch(8, torch.Generator().manual_seed(0), config.image_size)
    abar = VARIANTS["default"].train_abar().float()
    unet = Constant(0.0)
    exact = ExactTargets(below_snr=0.003, share=0.5, draws=4, generator=torch.Generator().manual_seed(3))
    diffusion_loss(encoder, unet, x0, captions, abar, "v_prediction", torch.Generator().manual_seed(1), 0.1,
                   exact=exact)
    snr = abar[unet.seen["t"]] / (1 - abar[unet.seen["t"]])
    assert bool((snr[4:] < 0.003).all()) and int(unet.seen["t"][4:].min()) >= 900


def test_exact_targets_change_nothing_on_a_schedule_without_such_snr():
    """The flawed schedule's lowest SNR is 0.0047: the same recipe leaves its loss as it was."""
    config = TrainConfig(variant="flawed", tiny=True)
    encoder, unet = build_models(config)
    x0, captions = scenes.sample_batch(4, torch.Generator().manual_seed(0), config.image_size)
    abar = VARIANTS["flawed"].train_abar().float()
    losses = [diffusion_loss(encoder, unet, x0, captions, abar, "epsilon", torch.Generator().manual_seed(1),
                             0.1, min_snr_gamma=5.0, exact=exact)
              for exact in (None, ExactTargets(0.003, 0.5, 4, torch.Generator().manual_seed(3)))]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


@pytest.mark.parametrize("below,share,draws", [(-0.1, 0.0, 256), (0.003, 1.5, 256), (0.0, 0.25, 256),
                                               (0.003, 0.25, 0)])
def test_exact_target_options_are_checked(below, share, draws):
    with pytest.raises(InvalidInputError, match=f"exact_below_snr={below}, exact_share={share}"):
        TrainConfig(exact_below_snr=below, exact_share=share, exact_draws=draws)


def test_scene_of_names_an_unknown_caption():
    assert scenes.scene_of("a red circle") == scenes.Scene("circle", "red", None)
    with pytest.raises(InvalidInputError, match="'a red hexagon' is no caption"):
        scenes.scene_of("a red hexagon")


@pytest.mark.parametrize("variant", ["default", "flawed"])
def test_scheduler_config_describes_the_training_schedule(variant):
    config = scheduler_config(variant)
    assert config["_class_name"] == "DDIMScheduler"
    assert SamplerConfig.from_diffusers(config) == (SamplerConfig() if variant == "default"
                                                    else PRESETS["sd"])
    assert config["timestep_spacing"] == ("trailing" if variant == "default" else "leading")


def test_save_model_writes_diffusers_layout(tmp_path):
    config = TrainConfig(variant="flawed", steps=1, batch_size=2, tiny=True)
    encoder, unet, stats = train(config, log=lambda m: None)
    save_model(tmp_path, encoder, unet, config, stats)
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["config"]["steps"] == 1 and record["config"]["batch_size"] == 2
    assert record["data_seed"] == 0 and "wall_time_s" in record and "command" in record
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert torch.equal(_params(loaded), _params(unet))
    scheduler = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon" and scheduler["steps_offset"] == 1


def test_train_config_rejects_unknown_variant():
    with pytest.raises(InvalidInputError, match="'sd'"):
        TrainConfig(variant="sd")


def test_initial_step_predictor_trains_and_round_trips(tmp_path):
    encoder, _ = build_models(TrainConfig(tiny=True))
    predictor, stats = train_initial_step(InitialStepConfig(steps=2, batch_size=4, tiny=True),
                                          encoder, log=lambda m: None)
    assert torch.isfinite(torch.tensor(stats["final_loss"]))
    predictor.save_pretrained(tmp_path, text_encoder_of="flawed")
    loaded = load_initial_step(tmp_path)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = encoder.encode(["a red circle", ""])
        assert torch.equal(loaded(x_T, text), predictor(x_T, text))
    assert all(p.grad is None for p in encoder.parameters())  # the encoder stays frozen


def test_model_dir_names_the_shipped_models():
    assert MODEL_NAMES == ("default", "flawed")
    assert model_dir("default").name == "default"
    with pytest.raises(InvalidInputError, match="'sd'"):
        model_dir("sd")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shipped_weights_load_and_are_small(name):
    directory = model_dir(name)
    if not (directory / "unet").is_dir():
        pytest.skip(f"{directory} not trained yet")
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert size < 10 * 2**20
    encoder = load_text_encoder(directory)
    unet = UNet2DConditionModel.from_pretrained(directory / "unet")
    assert unet.config.cross_attention_dim == encoder.dim
    assert unet.config.sample_size == scenes.IMAGE_SIZE and unet.config.in_channels == 3
    scheduler = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    assert SamplerConfig.from_diffusers(scheduler) == VARIANTS[name]
