"""Tests: the math checked exactly with closed-form denoisers (no training), then the scripts
end to end.

Run: python -m pytest -q test_all.py   (4 min on a 2-core AMD EPYC, Zen 4; SLOW=1 adds 7 min 20 s)
"""
import argparse
import copy
import importlib.util
import inspect
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw

import cfg
import ddim
import ddpm
import quality
import unet
from unet import PRESETS, UNet, timestep_embedding

ROOT = Path(__file__).resolve().parent
# train_step's loss scaler, off: float32 needs none.
FLOAT32 = torch.amp.GradScaler("cpu", enabled=False)


# ----------------------------------------------------------------------------- helpers

def gaussian_eps(sched, mu, s):
    """The optimal ε-predictor when x0 ~ N(mu, s² I): E[ε | x_t] in closed form, for x of any shape
    (B, …); mu and s are numbers, or tensors of one value per coordinate.

    x_t = √ᾱ x0 + √(1−ᾱ) ε  ⇒  E[ε | x_t] = √(1−ᾱ) (x_t − √ᾱ mu) / (ᾱ s² + 1 − ᾱ).
    """
    def model(x, t, y=None):
        alpha_bar = sched.alpha_bar[t].reshape(-1, *[1] * (x.ndim - 1))
        return ((1 - alpha_bar).sqrt() * (x - alpha_bar.sqrt() * mu)
                / (alpha_bar * s**2 + 1 - alpha_bar))
    return model


def guided(model, y: torch.Tensor, w: float, null_label: int | None = None):
    """The ε-function that cfg.sample takes: CFG eq. 6 for labels y, guided with w (∅: NULL)."""
    null_label = NULL if null_label is None else null_label
    return lambda x, t: cfg.guided_eps(model, x, t, y, w, null_label)


def as_v_model(sched, eps_model):
    """The same predictor, as a v-network would give it: v = (ε − √(1−ᾱ) x_t)/√ᾱ."""
    def model(x, t, y=None):
        alpha_bar = sched.alpha_bar[t][:, None, None, None]
        return (eps_model(x, t, y) - (1 - alpha_bar).sqrt() * x) / alpha_bar.sqrt()
    return model


def write_idx_dataset(root: Path, n: int = 64, folder: str = "MNIST", seed: int = 0) -> Path:
    """A tiny MNIST-format dataset (IDX files) that torchvision's own loader reads.

    Images are simple shapes (a bright square whose position depends on the label), so a
    few training steps have something learnable.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator, dtype=torch.uint8)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        row, col = 4 + 2 * (label // 5) * 5, 4 + 4 * (label % 5)
        images[i, row:row + 8, col:col + 8] = 255
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        with open(raw / f"{split}-images-idx3-ubyte", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes())
        with open(raw / f"{split}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.numpy().tobytes())
    return root


def run_script(*args: str, env_extra: dict | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_idx_dataset(tmp_path_factory.mktemp("data"))


# Flags that keep an end-to-end run to seconds: few steps, a short chain, small batches.
FAST = ["--dataset", "mnist", "--device", "cpu", "--batch-size", "8", "--timesteps", "20",
        "--n-samples", "4"]


def one_line_error(script, args: list[str], capsys) -> str:
    """script.main(args) in this process (a subprocess adds ~6 s of imports here) must end in a
    SystemExit: a one-line message "error: …", or argparse's usage and error on stderr. Any other
    exception, which would print a traceback, fails the test."""
    with pytest.raises(SystemExit) as exit_info:
        script.main(args)
    code = exit_info.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "error" in message and "\n" not in message, message
    return message


# ------------------------------------------------------------------------ schedule, forward process

def test_linear_schedule_matches_paper():
    sched = ddpm.Schedule(1000, "linear")
    assert sched.betas[0].item() == pytest.approx(1e-4)
    assert sched.betas[-1].item() == pytest.approx(0.02)
    # ᾱ_T = Π (1 − β_t) ≈ 4.04e-5 for the linear schedule: x_T is almost pure noise.
    expected = torch.prod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)).item()
    assert sched.alpha_bar[-1].item() == pytest.approx(expected, rel=1e-4)
    assert 3.9e-5 < sched.alpha_bar[-1].item() < 4.2e-5
    assert sched.alpha_bar.dtype == torch.float32


def test_cosine_schedule_is_monotone_and_ends_near_zero():
    sched = ddpm.Schedule(1000, "cosine")
    assert torch.all(sched.alpha_bar[1:] < sched.alpha_bar[:-1])
    assert sched.alpha_bar[0].item() > 0.999 and sched.alpha_bar[-1].item() < 1e-4
    assert sched.betas.max().item() <= 0.999 + 1e-6


def test_q_sample_has_the_right_moments():
    sched = ddpm.Schedule(1000, "linear")
    x0 = torch.full((20000, 1, 2, 2), 0.5)
    for t in (0, 250, 999):
        t_batch = torch.full((x0.shape[0],), t)
        xt = ddpm.q_sample(sched, x0, t_batch, torch.randn_like(x0))
        alpha_bar = sched.alpha_bar[t].item()
        assert xt.mean().item() == pytest.approx(0.5 * alpha_bar**0.5, abs=0.01)
        assert xt.std().item() == pytest.approx((1 - alpha_bar) ** 0.5, abs=0.01)


def test_loss_samples_every_timestep_including_zero(monkeypatch):
    sched = ddpm.Schedule(10, "linear")
    seen = []
    ddpm.diffusion_loss(lambda x, t: seen.append(t) or torch.zeros_like(x), sched,
                        torch.zeros(4000, 1, 1, 1))
    assert set(seen[0].tolist()) == set(range(10))


# ----------------------------------------------------------------------------- sampler, exactly

def test_ancestral_sampler_recovers_gaussian_data():
    """With the exact ε-predictor for N(mu, s²), Algorithm 2 must return samples of N(mu, s²)."""
    torch.manual_seed(0)
    sched = ddpm.Schedule(1000, "linear")
    mu, s = 0.3, 0.2
    x = ddpm.sample(gaussian_eps(sched, mu, s), sched, (4000, 1, 4, 4))
    # 64000 values: the standard error of the mean is 8e-4, of the std 6e-4.
    assert x.mean().item() == pytest.approx(mu, abs=0.005)
    assert x.std().item() == pytest.approx(s, abs=0.005)


def test_sampler_detects_a_wrong_model():
    """The check above can fail: a predictor for the wrong data gives the wrong moments."""
    sched = ddpm.Schedule(1000, "linear")
    x = ddpm.sample(gaussian_eps(sched, 0.3, 0.4), sched, (2000, 1, 4, 4))
    assert abs(x.std().item() - 0.2) > 0.1


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("script", ["ddpm", "ddim", "cfg"])
def test_a_v_prediction_network_samples_as_its_eps_network(script, schedule):
    """--prediction v: each sampler turns the network's v back into ε. Given the exact v of the
    exact ε (the closed-form predictor for N(mu, s²)), it must draw the same samples, noise for
    noise."""
    module = {"ddpm": ddpm, "ddim": ddim, "cfg": cfg}[script]
    sched = module.Schedule(1000, schedule)
    model = gaussian_eps(sched, 0.3, 0.2)
    v_as_eps = module.eps_from_v(as_v_model(sched, model), sched)
    shape, y = (256, 1, 4, 4), torch.zeros(256, dtype=torch.long)

    def draw(eps_theta):
        generator = torch.Generator().manual_seed(3)
        if script == "ddpm":
            return ddpm.sample(eps_theta, sched, shape, generator=generator)
        if script == "ddim":
            x = ddim.sample(eps_theta, sched, shape, 50, eta=1.0, generator=generator)
            return ddim.invert(eps_theta, sched, x, 50)
        return cfg.sample(guided(eps_theta, y, 3.0, 1), sched, shape, 50, eta=1.0,
                          generator=generator)

    torch.testing.assert_close(draw(v_as_eps), draw(model), atol=2e-4, rtol=0)


def test_the_v_loss_is_the_min_snr_weighted_mse_of_v():
    """v_loss: min(SNR, 5)/(SNR + 1)·‖v − v_θ‖², v = √ᾱ_t ε − √(1−ᾱ_t) x0, SNR = ᾱ_t/(1−ᾱ_t)
    (Hang et al. 2023's min-SNR-γ for v), on the same draws of t and ε."""
    sched_v = ddpm.Schedule(100, "linear")
    x0 = torch.rand(64, 1, 4, 4) * 2 - 1
    torch.manual_seed(5)
    loss = ddpm.v_loss(lambda x, t: torch.zeros_like(x), sched_v, x0)
    torch.manual_seed(5)
    t = torch.randint(0, 100, (64,))
    noise = torch.randn_like(x0)
    alpha_bar = sched_v.alpha_bar[t][:, None, None, None]
    v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    snr = alpha_bar / (1 - alpha_bar)
    weight = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)
    assert loss.item() == pytest.approx((weight * v.pow(2)).mean().item(), rel=1e-5)
    assert weight.max() < 0.84  # so the plain ‖v − v_θ‖² would fail the check above


def test_sampler_calls_back_each_step_and_adds_no_noise_at_the_end():
    """callback(t, x, x̂0) after each step, t = T-1..0; the last step returns its x̂0, with no
    noise. The plumbing's callback keeps 50 of the x as GIF frames, the last one the sample."""
    sched = ddpm.Schedule(100, "linear")
    model = gaussian_eps(sched, 0.0, 0.5)
    calls = []
    a = ddpm.sample(model, sched, (8, 1, 4, 4), generator=torch.Generator().manual_seed(1),
                    callback=lambda t, x, x0_hat: calls.append((t, x.clone(), x0_hat.clone())))
    assert [t for t, _, _ in calls] == list(range(99, -1, -1)) and torch.equal(calls[-1][1], a)
    torch.testing.assert_close(calls[-1][2], a, atol=1e-5, rtol=0)
    frames = []
    b = ddpm.sample(model, sched, (8, 1, 4, 4), generator=torch.Generator().manual_seed(1),
                    callback=ddpm.sampling_callback(sched.T, frames))
    assert len(frames) == 50 and torch.equal(frames[-1], a) and torch.equal(a, b)


# ----------------------------------------------------------------------------- U-Net

@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_unet_output_shape(channels, size):
    model = UNet(channels, size, **PRESETS["small"])
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_cifar_preset_has_the_papers_35_7m_parameters():
    model = UNet(3, 32, **PRESETS["ddpm_cifar10"])
    assert sum(p.numel() for p in model.parameters()) == 35_746_307  # as diffusion_tf builds it


def test_unet_output_depends_on_t_and_class():
    torch.manual_seed(0)
    model = UNet(1, 28, **PRESETS["small"], num_classes=10)
    for p in model.parameters():  # the zero-initialised output layers would hide any dependence
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 28, 28).repeat(2, 1, 1, 1)
    out_t = model(x, torch.tensor([10, 500]), torch.tensor([3, 3]))
    assert (out_t[0] - out_t[1]).abs().max() > 1e-3
    out_y = model(x, torch.tensor([10, 10]), torch.tensor([3, 10]))  # class 3 vs the null label
    assert (out_y[0] - out_y[1]).abs().max() > 1e-3
    with pytest.raises(ValueError):
        UNet(1, 28, **PRESETS["small"])(x, torch.tensor([1, 1]), torch.tensor([0, 0]))


def test_unet_rejects_an_image_size_it_cannot_halve():
    with pytest.raises(ValueError, match="divisible"):
        UNet(1, 30, **PRESETS["small"])


def test_short_training_lowers_the_loss():
    """40 steps of a narrow U-Net on 8 squares of 16×16 (28×28, small preset: 8× the time)."""
    torch.manual_seed(0)
    x0 = torch.zeros(8, 1, 16, 16) - 1
    for i in range(8):
        x0[i, :, 2 + i % 3 * 4:6 + i % 3 * 4, 2:6] = 1
    sched = ddpm.Schedule(1000, "linear")
    model = UNet(1, 16, channels=16, channel_mult=(1, 2), attn_levels=(1,))
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1)
    first = sum(ddpm.diffusion_loss(model, sched, x0).item() for _ in range(8)) / 8
    for step in range(40):
        loss_of = lambda: ddpm.diffusion_loss(model, sched, x0)  # noqa: E731
        assert ddpm.train_step(model, ema, optimizer, FLOAT32, loss_of, step, 1e-3, "float32")[1]
    last = sum(ddpm.diffusion_loss(model, sched, x0).item() for _ in range(8)) / 8
    assert last < 0.25 * first  # here: 0.99 → 0.09


def test_data_is_loaded_through_torchvision_and_scaled_to_minus_one_one(tiny_data):
    images, labels, class_names = ddpm.load_dataset("mnist", str(tiny_data))
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.uint8 and labels.shape == (64,)
    x = ddpm.to_model_range(images, flip=False)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    flipped = ddpm.to_model_range(images.repeat(8, 1, 1, 1), flip=True)
    reference = x.repeat(8, 1, 1, 1)
    is_flipped = (flipped == reference.flip(3)).flatten(1).all(1)
    is_same = (flipped == reference).flatten(1).all(1)
    assert (is_flipped | is_same).all() and 0.3 < is_flipped.float().mean() < 0.7


# ------------------------------------------------------------------------- command line, end to end

def test_cli_train_resume_sample_only(tiny_data, tmp_path):
    """In this process: the command line itself is run as a subprocess by ddpm_ckpt and
    test_cli_train."""
    out = tmp_path / "run"
    common = [*FAST, "--data-dir", str(tiny_data), "--out", str(out)]
    ddpm.main([*common, "--max-steps", "3"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert (out / "samples.png").is_file() and (out / "reverse.gif").is_file()

    ddpm.main([*common, "--max-steps", "5", "--resume"])
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 5

    # Five steps in one go give the same weights:
    # step count, warmup, EMA, data order and noise resumed.
    straight = tmp_path / "straight"
    ddpm.main([*FAST, "--data-dir", str(tiny_data), "--out", str(straight), "--max-steps", "5"])
    reference = torch.load(straight / "ckpt.pt", weights_only=True)
    for key in ("model", "ema"):
        for name, value in reference[key].items():
            torch.testing.assert_close(resumed[key][name], value, msg=f"{key}.{name}")

    pngs = tmp_path / "pngs"
    ddpm.main([*common, "--sample-only", "--n-samples", "6", "--save-pngs", str(pngs)])
    assert len(list(pngs.glob("*.png"))) == 6
    assert (out / "samples.png").is_file()


class RunsCode:
    """Unpickling this would call os.system: a checkpoint must never get that far."""

    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


@pytest.mark.parametrize("case", ["unknown-dataset", "no-cuda", "missing", "truncated", "malicious",
                                  "bad-batch"])
def test_cli_bad_input_is_one_clear_error(case, tiny_data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    args = [*FAST, "--data-dir", str(tiny_data), "--out", str(tmp_path)]
    if case == "unknown-dataset":
        args += ["--dataset", "imagenet"]
    elif case == "no-cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        args += ["--device", "cuda"]
    elif case == "missing":
        args += ["--sample-only", "--ckpt", str(tmp_path / "nope.pt")]
    elif case == "truncated":
        model = UNet(1, 28, **PRESETS["small"])
        torch.save({"ema": model.state_dict(), "config": {}, "step": 0}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        args += ["--sample-only", "--ckpt", str(ckpt)]
    elif case == "malicious":
        with open(ckpt, "wb") as f:
            pickle.dump({"ema": RunsCode(), "config": {}, "step": 0}, f, protocol=2)  # torch.save's
        args += ["--sample-only", "--ckpt", str(ckpt)]
    elif case == "bad-batch":
        args += ["--batch-size", "0"]
    one_line_error(ddpm, args, capsys)
    assert not any((folder / "PWNED_BY_PICKLE").exists() for folder in (ROOT, tmp_path, Path.cwd()))


# ============================================================================= ddim.py

# ----------------------------------------------------------------------------- step grid

@pytest.mark.parametrize("skip", ["uniform", "quad"])
@pytest.mark.parametrize("T,steps", [(1000, 10), (1000, 50), (1000, 999), (20, 2), (20, 19)])
def test_step_grid_runs_from_T_minus_1_down_to_0(T, steps, skip):
    grid = ddim.step_grid(T, steps, skip)
    assert len(grid) == steps and grid[0] == T - 1 and grid[-1] == 0
    assert all(a > b for a, b in zip(grid, grid[1:]))


@pytest.mark.parametrize("skip", ["uniform", "quad"])
def test_step_grid_with_every_step_or_one(skip):
    assert ddim.step_grid(1000, 1000, skip) == list(range(999, -1, -1))
    assert ddim.step_grid(1000, 1, skip) == [999]  # one jump from pure noise to x̂0
    with pytest.raises(ValueError):
        ddim.step_grid(20, 21, skip)


def test_step_grid_spacings():
    assert ddim.step_grid(1000, 10, "uniform") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    quad = ddim.step_grid(1000, 10, "quad")
    assert quad == [999, 790, 606, 446, 311, 200, 113, 51, 13, 0]  # dense at low noise
    gaps = [a - b for a, b in zip(quad, quad[1:])]
    assert gaps == sorted(gaps, reverse=True)


# ----------------------------------------------------------------------------- sampler, exactly

# (steps, skip, eta, shrink): the sample std may fall short of s by up to `shrink`. That is DDIM's
# discretisation error, measured, not sampling noise (64000 values: standard error 8e-4 for the
# mean, 6e-4 for the std): a coarse step to low noise lands on the denoiser's x̂0 = E[x0 | x_t],
# which is less spread out than x0. It is one-sided, the same for every seed, and shrinks with more
# steps or with quad spacing. Measured: S=10 0.102 (quad 0.042), S=50 0.024 (quad 0.009), S=1000
# 0.0015, η=0.5 at S=1000 0.003. The mean is unaffected.
@pytest.mark.parametrize("steps,skip,eta,shrink", [
    (10, "uniform", 0.0, 0.12), (10, "quad", 0.0, 0.05), (50, "uniform", 0.0, 0.03),
    (50, "quad", 0.0, 0.012), (1000, "uniform", 0.0, 0.005), (1000, "uniform", 0.5, 0.005)])
def test_sampler_recovers_gaussian_data(steps, skip, eta, shrink):
    sched = ddpm.Schedule(1000, "linear")
    mu, s = 0.3, 0.2
    x = ddim.sample(gaussian_eps(sched, mu, s), sched, (4000, 1, 4, 4), steps, eta=eta, skip=skip,
                    generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(mu, abs=0.005)
    assert s - shrink < x.std().item() < s + 0.003


@pytest.mark.parametrize("sampler", ["ddpm", "ddim η=0", "ddim η=1", "cfg"])
def test_the_samplers_draw_a_2d_gaussian_outside_minus_one_one_with_the_clip_off(sampler):
    """Points of shape (B, 2), not images: given the exact ε of N((2, −1.5), diag(0.5², 1.5²)),
    each sampler with clip=False draws that Gaussian; with the clip on, it cannot."""
    sched = ddpm.Schedule(1000, "linear")
    mu, s = torch.tensor([2.0, -1.5]), torch.tensor([0.5, 1.5])
    eps_theta = gaussian_eps(sched, mu, s)

    def draw(clip: bool) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        if sampler == "ddpm":
            return ddpm.sample(eps_theta, sched, (20000, 2), generator=generator, clip=clip)
        if sampler == "cfg":  # the same ε for every label: guidance changes nothing
            y = torch.zeros(20000, dtype=torch.long)
            return cfg.sample(guided(eps_theta, y, 2.0, 1), sched, (20000, 2), 1000, eta=1.0,
                              generator=generator, clip=clip)
        eta = 0.0 if sampler == "ddim η=0" else 1.0
        return ddim.sample(eps_theta, sched, (20000, 2), 1000, eta=eta, generator=generator,
                           clip=clip)

    x = draw(clip=False)
    assert x.shape == (20000, 2)
    torch.testing.assert_close(x.mean(0), mu, atol=0.04, rtol=0)  # 4 standard errors of 1.5
    torch.testing.assert_close(x.std(0), s, atol=0.03, rtol=0)
    assert draw(clip=True).abs().max() < 1 + 1e-5  # the last step lands on a clipped x̂0


def test_slerp_works_on_any_shape():
    """Latents of shape (B, 2) and (B, 3, 4, 4) alike: the ends, and the norm kept between them."""
    for shape in ((64, 2), (64, 3, 4, 4)):
        a, b = torch.randn(shape), torch.randn(shape)
        mid = ddim.slerp(a, b, 0.5)
        assert mid.shape == a.shape and torch.allclose(ddim.slerp(a, b, 1.0), b, atol=1e-5)
        expected = (a.flatten(1).norm(dim=1) + b.flatten(1).norm(dim=1)) / 2
        # A straight line would dip lower.
        assert (mid.flatten(1).norm(dim=1) / expected).min() > 0.6


def test_ddim_sampler_detects_a_wrong_model():
    sched = ddpm.Schedule(1000, "linear")
    x = ddim.sample(gaussian_eps(sched, 0.3, 0.4), sched, (2000, 1, 4, 4), 50, eta=0.0)
    assert abs(x.std().item() - 0.2) > 0.1


def float64_linear_schedule(T: int) -> ddpm.Schedule:
    """ddpm.Schedule with its float64 values kept, for comparisons that float32 rounding would
    blur."""
    sched = ddpm.Schedule(T, "linear")
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    sched.betas, sched.alphas, sched.alpha_bar = betas, 1 - betas, torch.cumprod(1 - betas, 0)
    return sched


def alpha_bar_before(sched, t: int) -> torch.Tensor:
    """ᾱ_{t−1}, with ᾱ = 1 before the first step."""
    return sched.alpha_bar[t - 1] if t > 0 else torch.ones((), dtype=sched.alpha_bar.dtype)


def ancestral_with_posterior_variance(model, sched, shape, generator):
    """Algorithm 2 with σ_t² = β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t), written out here as a
    reference."""
    x = torch.randn(shape, generator=generator)
    for t in range(sched.T - 1, -1, -1):
        beta, alpha_bar, alpha_bar_prev = (sched.betas[t], sched.alpha_bar[t],
                                           alpha_bar_before(sched, t))
        eps = model(x, torch.full((shape[0],), t)).float()
        x0_hat = ((x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()).clamp(-1, 1)
        x = ((alpha_bar_prev.sqrt() * beta * x0_hat + (1 - beta).sqrt() * (1 - alpha_bar_prev) * x)
             / (1 - alpha_bar))
        if t > 0:
            x = x + ((beta * (1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt()
                     * torch.randn(shape, generator=generator))
    return x


def test_all_steps_with_eta_1_is_ddpm_with_posterior_variance():
    """S = T, η = 1: eq. 12 with σ of eq. 16 is DDPM's step with σ² = β̃, the same noise in the
    same order."""
    shape = (256, 1, 4, 4)

    def both(sched):
        model = gaussian_eps(sched, 0.3, 0.2)
        a = ancestral_with_posterior_variance(model, sched, shape, torch.Generator().manual_seed(3))
        b = ddim.sample(model, sched, shape, sched.T, eta=1.0,
                        generator=torch.Generator().manual_seed(3))
        return a, b

    # float32 as used: the two formulas round differently, most where 1 − ᾱ_t/ᾱ_{t-1} (ddim) stands
    # for β_t ≈ 1e-4 (ddpm), which float32 ᾱ knows to about 1e-3 relative: ~3e-5 after 1000 steps.
    torch.testing.assert_close(*both(ddpm.Schedule(1000, "linear")), atol=3e-4, rtol=0)
    # With the schedule in float64 the two agree to rounding (the model's output is still float32).
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        a, b = both(float64_linear_schedule(1000))
    finally:
        torch.set_default_dtype(default)
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, b, atol=1e-8, rtol=0)


def test_algorithm_2_is_the_posterior_mean_of_the_clipped_x0_hat():
    """With x̂0 clipped and ε̂ re-derived, Algorithm 2's step is eq. 7's μ̃_t(x_t, x̂0) + σ_t z, the
    official code's form: in float64, for random x_t and random ε̂ (large, so that the clip
    acts)."""
    shape = (64, 1, 2, 2)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        sched = float64_linear_schedule(1000)
        eps_draws = torch.Generator().manual_seed(1)
        noise = torch.Generator().manual_seed(0)  # replays the sampler's draws: x_T, then each z
        x_t, errors, clipped = [torch.randn(shape, generator=noise)], [], []

        def check(t, x, x0_hat):
            alpha_bar, alpha_bar_prev, beta = (sched.alpha_bar[t], alpha_bar_before(sched, t),
                                               sched.betas[t])
            # The posterior mean of eq. 7.
            mean = (alpha_bar_prev.sqrt() * beta * x0_hat
                    + sched.alphas[t].sqrt() * (1 - alpha_bar_prev) * x_t[-1]) / (1 - alpha_bar)
            z = torch.randn(shape, generator=noise) if t > 0 else 0
            errors.append((x - beta.sqrt() * z - mean).abs().max().item())
            clipped.append((x0_hat.abs() == 1).float().mean().item())
            x_t.append(x)
        ddpm.sample(lambda x, t: 3 * torch.randn(shape, generator=eps_draws), sched, shape,
                    generator=torch.Generator().manual_seed(0), callback=check)
    finally:
        torch.set_default_dtype(default)
    assert len(errors) == 1000 and max(errors) < 1e-12
    assert 0.2 < sum(clipped) / len(clipped) < 0.9  # the clip acts on many of the x̂0, not all


def test_eta_0_is_deterministic_given_x_T():
    sched = ddpm.Schedule(100, "linear")
    model = gaussian_eps(sched, 0.3, 0.2)
    x_T = torch.randn(8, 1, 4, 4)
    a = ddim.sample(model, sched, x_T.shape, 10, eta=0.0, x_T=x_T,
                    generator=torch.Generator().manual_seed(1))
    b = ddim.sample(model, sched, x_T.shape, 10, eta=0.0, x_T=x_T,
                    generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    frames = []
    ddim.sample(model, sched, x_T.shape, 10, eta=0.0, x_T=x_T,
                callback=ddim.sampling_callback(10, frames))
    assert len(frames) == 10 and torch.equal(frames[-1], a)


@pytest.mark.parametrize("steps,max_mse", [(100, 1e-3), (1000, 2e-5)])  # measured 4.2e-4, 4.5e-6
def test_invert_then_sample_reconstructs_the_input(steps, max_mse):
    sched = ddpm.Schedule(1000, "linear")
    model = gaussian_eps(sched, 0.3, 0.2)
    x0 = 0.3 + 0.2 * torch.randn(512, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    x_T = ddim.invert(model, sched, x0, steps)
    assert x_T.std().item() == pytest.approx(1.0, abs=0.05)  # data became noise (S=100: 0.97)
    recon = ddim.sample(model, sched, x0.shape, steps, eta=0.0, x_T=x_T)
    assert (recon - x0).pow(2).mean().item() < max_mse


def test_slerp_keeps_the_norm_of_gaussian_latents():
    a, b = torch.randn(2, 4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ddim.slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(ddim.slerp(a, b, 1.0), b, atol=1e-6)
    mid_norm = ddim.slerp(a, b, 0.5).flatten(1).norm(dim=1)
    torch.testing.assert_close(mid_norm, a.flatten(1).norm(dim=1), rtol=0.05, atol=0)  # lerp: ÷√2
    assert torch.allclose(ddim.slerp(a, a, 0.3), a, atol=1e-6)  # parallel latents: no 0/0


# ------------------------------------------------------------------------- command line, end to end

@pytest.fixture(scope="module")
def ddpm_ckpt(tiny_data, tmp_path_factory):
    """A checkpoint written by ddpm.py (T = 20), which ddim.py must be able to sample."""
    out = tmp_path_factory.mktemp("ddpm")
    r = run_script("ddpm.py", *FAST, "--data-dir", str(tiny_data), "--out", str(out),
                   "--max-steps", "1", "--n-samples", "1")
    assert r.returncode == 0, r.stderr
    return out / "ckpt.pt"


def test_cli_train(tiny_data, tmp_path):
    r = run_script("ddim.py", *FAST, "--data-dir", str(tiny_data), "--out", str(tmp_path),
                   "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "reverse.gif").is_file()


def test_cli_sample_only_a_ddpm_checkpoint(ddpm_ckpt, tmp_path):
    pngs = tmp_path / "pngs"
    ddim.main([*FAST, "--sample-only", "--ckpt", str(ddpm_ckpt), "--out", str(tmp_path),
               "--n-samples", "3", "--save-pngs", str(pngs), "--sample-steps", "5", "--eta", "0.5",
               "--skip", "quad"])
    assert len(list(pngs.glob("*.png"))) == 3 and (tmp_path / "samples.png").is_file()
    # No picture unasked for.
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["samples.png"]


def test_cli_invert_and_interpolate(ddpm_ckpt, tiny_data, tmp_path, capsys):
    ddim.main([*FAST, "--data-dir", str(tiny_data), "--invert", "--interpolate", "--consistency",
               "--ckpt", str(ddpm_ckpt), "--out", str(tmp_path), "--sample-steps", "10"])
    printed = capsys.readouterr().out
    assert "reconstruction MSE" in printed
    assert "rows of 10, 20 steps" in printed  # T = 20: only the step counts up to T
    assert Image.open(tmp_path / "consistency.png").size == (8 * 30 + 2, 2 * 30 + 2)
    assert Image.open(tmp_path / "inversion.png").size == (8 * 30 + 2, 3 * 30 + 2)  # 3 rows of 8
    assert Image.open(tmp_path / "interpolation.png").size == (10 * 30 + 2, 3 * 30 + 2)
    assert not (tmp_path / "samples.png").exists()  # these modes replace sampling


@pytest.mark.parametrize("case", ["eta", "zero-steps", "steps-above-T", "wrong-shape"])
def test_ddim_cli_bad_input_is_one_clear_error(case, ddpm_ckpt, tiny_data, tmp_path, capsys):
    args = [*FAST, "--data-dir", str(tiny_data), "--out", str(tmp_path), "--max-steps", "1"]
    if case == "eta":
        args += ["--eta", "1.5"]
    elif case == "zero-steps":
        args += ["--sample-steps", "0"]
    elif case == "steps-above-T":  # T = 20 is only known once the checkpoint is loaded
        args += ["--sample-only", "--ckpt", str(ddpm_ckpt), "--sample-steps", "21"]
    elif case == "wrong-shape":  # the config asks for a wider network than the weights are
        ckpt = torch.load(ddpm_ckpt, weights_only=True)
        ckpt["config"]["unet"]["channels"] *= 2
        torch.save(ckpt, tmp_path / "bad.pt")
        args += ["--sample-only", "--ckpt", str(tmp_path / "bad.pt")]
    one_line_error(ddim, args, capsys)
    assert not (tmp_path / "ckpt.pt").exists()  # nothing was trained


# ============================================================================= cfg.py

MEANS, S = (-0.5, 0.5), 0.15  # two classes, equal priors: x0 | c ~ N(MEANS[c], S²)
NULL = len(MEANS)             # the null label ∅, as in the U-Net


# ----------------------------------------------------------------------------- exact predictors

def mixture_eps(sched, means: tuple[float, ...], s: float):
    """The optimal ε-predictor for x0 ~ Σ_c N(m_c, s²)/C, as a model taking (x, t, y), y = C for ∅.

    Class c: the Gaussian closed form ε_c(x_t). ∅: E[ε | x_t] = Σ_c p(c | x_t) ε_c(x_t), where
    p(c | x_t) ∝ N(x_t; √ᾱ m_c, ᾱ s² + 1 − ᾱ), a softmax over classes (the variances are equal).
    """
    per_class = [gaussian_eps(sched, m, s) for m in means]

    def model(x, t, y):
        alpha_bar = sched.alpha_bar[t][:, None, None, None]
        eps = torch.stack([eps_c(x, t) for eps_c in per_class])  # (C, B, ...)
        var = alpha_bar * s**2 + 1 - alpha_bar
        log_lik = torch.stack([-(x - alpha_bar.sqrt() * m) ** 2 / (2 * var) for m in means])
        eps_null = (log_lik.softmax(0) * eps).sum(0)
        eps_cond = eps[y.clamp(max=len(means) - 1), torch.arange(len(y))]
        return torch.where((y == len(means)).view(-1, *[1] * (x.ndim - 1)), eps_null, eps_cond)
    return model


def tilted_eps(sched, c: int, w: float):
    """What guidance should give, from densities alone: ε̃ = −√(1−ᾱ_t) ∇_x log p̃_t(x), with
    p̃_t ∝ p_t(x | c)^{1+w} p_t(x)^{−w} (CFG Sec. 3.2), the gradient taken by autograd (float64)."""
    def eps(x, t):
        with torch.enable_grad():
            x = x.detach().double().requires_grad_(True)
            alpha_bar = sched.alpha_bar[t][:, None, None, None].double()
            var = alpha_bar * S**2 + 1 - alpha_bar
            log_p_class = torch.stack([-(x - alpha_bar.sqrt() * m) ** 2 / (2 * var) for m in MEANS])
            # p_t(x) up to constants: equal priors, equal variances.
            log_p = log_p_class.logsumexp(0)
            score, = torch.autograd.grad(((1 + w) * log_p_class[c] - w * log_p).sum(), x)
        return -(1 - alpha_bar).sqrt() * score
    return eps


@pytest.fixture(scope="module")
def sched():
    return cfg.Schedule(1000, "linear")


def test_guided_eps_is_the_tilted_score(sched):
    """CFG eq. 6 on exact ε(x, c) and ε(x, ∅) is the score of p(x|c)^{1+w} p(x)^{−w}: sign,
    factors, ∅."""
    model = mixture_eps(sched, MEANS, S)
    x = torch.linspace(-2, 2, 41).view(-1, 1, 1, 1)
    for t_value in (0, 100, 500, 999):
        t = torch.full((len(x),), t_value)
        # ε(x, ∅) is the whole mixture's score: the tilted family at w = −1.
        mixture = model(x, t, torch.full_like(t, NULL))
        close = dict(atol=1e-5, rtol=1e-4)  # float32 predictions against float64 autograd
        torch.testing.assert_close(mixture.double(), tilted_eps(sched, 0, -1.0)(x, t), **close)
        for c in (0, 1):
            for w in (0.0, 0.5, 2.0):
                eps_tilde = cfg.guided_eps(model, x, t, torch.full_like(t, c), w, NULL)
                torch.testing.assert_close(eps_tilde.double(), tilted_eps(sched, c, w)(x, t),
                                           **close)


# ----------------------------------------------------------------------------- samplers, exactly

def two_class_samples(sched, w: float, steps: int, eta: float) -> list[torch.Tensor]:
    """2000 × 16 values per class from cfg.sample with the exact mixture model, guided with w."""
    y = torch.arange(4000) % 2
    x = cfg.sample(guided(mixture_eps(sched, MEANS, S), y, w), sched, (4000, 1, 4, 4), steps,
                   eta=eta, generator=torch.Generator().manual_seed(0))
    return [x[y == c] for c in (0, 1)]


def ddim_gain(sched, steps: int) -> float:
    """For Gaussian data the η=0 step is linear: x_{t'} − √ᾱ' m = k (x_t − √ᾱ m), with
    k = (√(ᾱ'ᾱ) s² + √((1−ᾱ')(1−ᾱ))) / (ᾱ s² + 1 − ᾱ) ≤ √(v_{t'}/v_t) (Cauchy-Schwarz): each finite
    step shrinks the spread a little. The output std is Π k, below S for any finite step count."""
    grid = torch.linspace(sched.T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    # alpha_bar[-1] = 1.
    alpha_bar = torch.cat([sched.alpha_bar.double(), torch.ones(1, dtype=torch.float64)])
    gain = 1.0
    for t, t_prev in zip(grid, grid[1:] + [-1]):
        a, a_prev = alpha_bar[t], alpha_bar[t_prev]
        gain *= ((a_prev * a).sqrt() * S**2 + ((1 - a_prev) * (1 - a)).sqrt()) / (a * S**2 + 1 - a)
    return float(gain)


def test_unguided_samples_match_each_class(sched):
    """w = 0 is the plain conditional model: each class comes out as N(m_c, S²)."""
    # T steps with η = 1 (DDPM's ancestral sampler, σ² = β̃): exact up to Monte Carlo error
    # (32000 values: std error of mean 8e-4, of std 6e-4).
    for c, x in enumerate(two_class_samples(sched, 0.0, sched.T, eta=1.0)):
        assert x.mean().item() == pytest.approx(MEANS[c], abs=0.005)
        assert x.std().item() == pytest.approx(S, abs=0.005)
    # Strided η=0, 50 steps: the mean is right and the std is DDIM's exact Π k
    # (0.127 here, not 0.15).
    for c, x in enumerate(two_class_samples(sched, 0.0, 50, eta=0.0)):
        assert x.mean().item() == pytest.approx(MEANS[c], abs=0.005)
        assert x.std().item() == pytest.approx(ddim_gain(sched, 50), abs=0.003)


def strided_reference(sched, c: int, w: float, steps: int, n: int = 4001) -> tuple[float, float]:
    """Mean and std of the η=0 sampler's output, in float64 without Monte Carlo error.

    The sampler is a deterministic map of x_T ~ N(0, 1), so its moments are integrals over x_T:
    push n equal-probability quantiles of N(0, 1) through the map. The map is the same update as
    cfg.sample at η = 0 (clipped x̂0, ε re-derived), but ε̃ comes from tilted_eps, not from
    guided_eps.
    """
    quantiles = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    x = torch.distributions.Normal(0.0, 1.0).icdf(quantiles).view(-1, 1, 1, 1)
    grid = torch.linspace(sched.T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    # alpha_bar[-1] = 1.
    alpha_bar = torch.cat([sched.alpha_bar.double(), torch.ones(1, dtype=torch.float64)])
    eps_fn = tilted_eps(sched, c, w)
    for t, t_prev in zip(grid, grid[1:] + [-1]):
        a, a_prev = alpha_bar[t], alpha_bar[t_prev]
        eps = eps_fn(x, torch.full((n,), t))
        x0_hat = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0_hat) / (1 - a).sqrt()
        x = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps
    return x.mean().item(), x.std().item()


def test_guidance_pushes_samples_away_from_the_other_class(sched):
    """w = 2 moves each class's samples away from the other class, by what the tilted score
    predicts.

    Not towards p(x|c)^{1+w}/p(x)^w at t = 0: there the classes barely overlap, p(x) ≈ p(x|c)/2
    near m_c, and that density's mean is 0.5005, not the 0.61 the 50-step η = 0 sampler reaches.
    The push happens at high noise, where p(c | x_t) ≈ 1/2 and ε̃ extrapolates x̂0 towards
    (1+w) m_c. So the prediction is the sampler's own output distribution under the tilted score
    (strided_reference).
    """
    mean, std = strided_reference(sched, 1, 2.0, steps=50)
    assert mean > 0.6 and std < 0.1  # ≈ 0.609 and 0.089: away from the other class, less diverse
    classes = two_class_samples(sched, 2.0, 50, eta=0.0)
    for c, x in enumerate(classes):
        sign = 1 if MEANS[c] > 0 else -1  # the mixture is symmetric: class 0 mirrors class 1
        assert x.mean().item() == pytest.approx(sign * mean, abs=0.005)
        assert x.std().item() == pytest.approx(std, abs=0.003)
    # The ancestral sampler follows a different (stochastic) path, so its target differs; it must
    # still push each class outwards, well beyond Monte Carlo error (std error of the mean 8e-4).
    for c, x in enumerate(two_class_samples(sched, 2.0, sched.T, eta=1.0)):
        assert (x.mean().item() - MEANS[c]) * (1 if MEANS[c] > 0 else -1) > 0.02


# ----------------------------------------------------------------------------- training, batching

def test_label_dropout_is_per_sample():
    torch.manual_seed(0)
    y = torch.arange(64) % 10
    dropped = torch.stack([cfg.drop_labels(y, 0.25, 10) for _ in range(500)])
    is_null = dropped == 10
    # 32000 draws: the standard error of the fraction is 0.0024.
    assert is_null.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert torch.all(is_null.any(1) & ~is_null.all(1))  # every batch mixes ∅ and real labels
    assert torch.equal(dropped[~is_null], y.expand_as(dropped)[~is_null])  # the rest unchanged
    assert torch.equal(cfg.drop_labels(y, 0.0, 10), y)
    assert torch.all(cfg.drop_labels(y, 1.0, 10) == 10)


def test_loss_gives_the_model_the_labels(sched):
    seen = []
    y = torch.arange(8) % 3
    cfg.diffusion_loss(lambda x, t, labels: seen.append(labels) or torch.zeros_like(x), sched,
                       torch.zeros(8, 1, 2, 2), y)
    assert torch.equal(seen[0], y)


@pytest.mark.parametrize("steps,eta", [(20, 1.0), (7, 0.0)])
def test_guidance_is_one_forward_pass_of_2b_per_step(steps, eta):
    """Conditional and unconditional passes share one batch [x, x] with labels [y, ∅]."""
    sched = cfg.Schedule(20, "linear")
    calls = []
    exact = mixture_eps(sched, MEANS, S)

    def model(x, t, y):
        calls.append((len(x), t[0].item(), y.tolist()))
        return exact(x, t, y)

    y, frames = torch.tensor([0, 1, 1]), []
    x = cfg.sample(guided(model, y, 2.0), sched, (3, 1, 2, 2), steps, eta=eta,
                   callback=cfg.sampling_callback(steps, frames))
    timesteps = [t for _, t, _ in calls]
    assert len(calls) == steps  # exactly one model call per step
    assert len(frames) == len(calls) and torch.equal(frames[-1], x)  # under 50 steps: a frame each
    assert all(n == 6 and labels == [0, 1, 1, NULL, NULL, NULL] for n, _, labels in calls)
    # The grid starts at T−1, ends at t = 0 and never repeats a timestep.
    assert (timesteps[0] == sched.T - 1 and timesteps[-1] == 0
            and timesteps == sorted(set(timesteps))[::-1])
    calls.clear()  # w = 0 needs the conditional half only
    cfg.sample(guided(model, y, 0.0), sched, (3, 1, 2, 2), steps, eta=eta)
    assert all(n == 3 and labels == [0, 1, 1] for n, _, labels in calls)


# ------------------------------------------------------------------------- command line, end to end

@pytest.fixture(scope="module")
def cfg_run(tiny_data, tmp_path_factory):
    """Two training steps on the tiny dataset (10 classes): the checkpoint and pictures.

    T = 2 keeps the guidance sweep (5 × 30 guided samples) quick: 5 s here, 10 s at T = 4.
    """
    out = tmp_path_factory.mktemp("cfg_run")
    r = run_script("cfg.py", *FAST, "--timesteps", "2", "--data-dir", str(tiny_data),
                   "--out", str(out), "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    return out


def test_cli_train_then_sample_a_class(cfg_run, tiny_data, tmp_path):
    ckpt = torch.load(cfg_run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["unet"]["num_classes"] == 10
    assert (cfg_run / "samples.png").is_file() and (cfg_run / "reverse.gif").is_file()
    # Guidance sweep: 5 rows (w) × 10 columns (classes) of 28×28 images with 2-pixel padding.
    assert Image.open(cfg_run / "guidance_sweep.png").size == (3 * 10 * 30 + 2, 5 * 30 + 2)

    common = ["--device", "cpu", "--out", str(tmp_path), "--ckpt", str(cfg_run / "ckpt.pt"),
              "--sample-only"]
    cfg.main([*common, "--class", "3", "--n-samples", "5", "--sample-steps", "2",
              "--save-pngs", str(tmp_path / "three")])
    names = sorted(p.name for p in (tmp_path / "three").glob("*.png"))
    assert names == [f"3 - three_{i:06d}.png" for i in range(5)]  # --save-pngs names files by class
    assert (tmp_path / "samples.png").is_file() and not (tmp_path / "guidance_sweep.png").exists()

    # The samples take the classes in turn.
    cfg.main([*common, "--n-samples", "12", "--save-pngs", str(tmp_path / "all"), "--sweep"])
    assert Image.open(tmp_path / "guidance_sweep.png").size == (3 * 10 * 30 + 2, 5 * 30 + 2)
    names = {p.name for p in (tmp_path / "all").glob("*.png")}
    assert names == {f"{ckpt['config']['classes'][i % 10]}_{i:06d}.png" for i in range(12)}


@pytest.mark.parametrize("case", ["class-train", "class-sample", "ddpm-checkpoint",
                                  "steps-above-T"])
def test_cfg_cli_bad_input_is_one_clear_error(case, cfg_run, tiny_data, tmp_path, capsys):
    args = [*FAST, "--data-dir", str(tiny_data), "--out", str(tmp_path)]
    if case == "class-train":  # the tiny dataset has classes 0..9
        args += ["--class", "10", "--max-steps", "2"]
    elif case == "class-sample":
        args += ["--sample-only", "--ckpt", str(cfg_run / "ckpt.pt"), "--class", "10"]
    elif case == "steps-above-T":  # T = 2: more sampler steps than timesteps is no sampler at all
        args += ["--sample-only", "--ckpt", str(cfg_run / "ckpt.pt"), "--sample-steps", "5000"]
    elif case == "ddpm-checkpoint":  # unconditional: no num_classes, no label embedding
        ddpm.main([*args, "--max-steps", "1", "--n-samples", "1", "--timesteps", "2"])
        args += ["--sample-only"]
    one_line_error(cfg, args, capsys)


@pytest.mark.parametrize("p_uncond", ["1.5", "-0.1"])
def test_p_uncond_must_be_a_probability(p_uncond, capsys):
    """An argparse error, so checked in-process (a subprocess would only add 3 s of imports)."""
    with pytest.raises(SystemExit) as exit_info:
        cfg.parse_args(["--p-uncond", p_uncond])
    assert exit_info.value.code != 0 and "error: --p-uncond" in capsys.readouterr().err


# ========================================================================== one text, three scripts

# The scaffolding is repeated on purpose, so that `diff ddpm.py ddim.py` shows only what DDIM
# changes and `diff ddim.py cfg.py` only guidance. This keeps it so: it names the function that
# drifted.
SHARED = {
    (ddpm, ddim, cfg): ["Schedule", "at", "q_sample", "update_ema", "eps_from_v", "ema_warmup",
                        "load_dataset", "load_folder", "to_model_range", "train_step",
                        "catch_stop_signals", "TrainingLog", "lock_out_dir", "plan_run",
                        "network_eps", "sampling_callback", "save_checkpoint", "load_checkpoint",
                        "pick_device", "positive_int", "pick_precision", "main"],
    (ddpm, ddim): ["diffusion_loss", "v_loss", "train", "training_data", "build_run"],
    (ddim, cfg): ["step_grid", "sample", "checked_sample_steps"],
}


@pytest.mark.parametrize("modules,name", [(m, n) for m, names in SHARED.items() for n in names],
                         ids=lambda v: v if isinstance(v, str) else "+".join(m.__name__ for m in v))
def test_shared_code_is_the_same_text_in_each_script(modules, name):
    first, *others = modules
    for other in others:
        assert inspect.getsource(getattr(other, name)) == inspect.getsource(getattr(first, name)), (
            f"{name} differs between {first.__name__}.py and {other.__name__}.py")


# ===================================================================== fidelity to the papers' code

def test_timestep_embedding_is_the_official_formula():
    """diffusion_tf: frequencies 10000^(−i/(half−1)), i = 0..half−1; sin first, then cos."""
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 128).double()
    half = 64
    for row, t_value in enumerate(t.tolist()):
        for i in (0, 1, 31, 63):
            angle = t_value * 10000 ** (-i / (half - 1))
            assert emb[row, i].item() == pytest.approx(math.sin(angle), abs=2e-4)
            assert emb[row, half + i].item() == pytest.approx(math.cos(angle), abs=2e-4)


def test_init_is_the_official_variance_scaling():
    """Uniform with limit √(3·scale/fan_avg), so std √(scale/fan_avg); scale 1e-10 at the branch
    ends."""
    torch.manual_seed(0)
    model = UNet(3, 32, **PRESETS["ddpm_cifar10"])
    conv = model.down[0][0].conv1                  # 128 → 128, 3×3: fan_in = fan_out = 1152
    std = math.sqrt(1 / 1152)
    assert conv.weight.std().item() == pytest.approx(std, rel=0.02)
    assert conv.weight.abs().max().item() <= math.sqrt(3) * std
    assert torch.all(conv.bias == 0)
    dense = model.time_mlp[0]                       # 128 → 512: fan_avg = 320
    assert dense.weight.std().item() == pytest.approx(math.sqrt(1 / 320), rel=0.02)
    for q_k_or_v in model.mid[1].qkv.weight.chunk(3):  # three 256 → 256 layers: fan_avg = 256
        assert q_k_or_v.std().item() == pytest.approx(math.sqrt(1 / 256), rel=0.02)
    for near_zero in (model.down[0][0].conv2, model.mid[1].proj, model.conv_out):
        assert 0 < near_zero.weight.abs().max().item() < 1e-4


def test_every_groupnorm_of_the_cifar_preset_has_the_official_epsilon():
    """diffusion_tf calls tf.contrib's group_norm with its default ε, 1e-6: in all 51 GroupNorms
    (2 in each of the 22 residual blocks, 1 in each of the 6 attention blocks, the output's)."""
    def epsilons(model):
        return [m.eps for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert epsilons(UNet(3, 32, **PRESETS["ddpm_cifar10"])) == [1e-6] * 51
    for preset in ("small", "small48"):  # PyTorch's 1e-5, as trained: configs, --resume unchanged
        assert "norm_eps" not in PRESETS[preset]
        assert set(epsilons(UNet(3, 32, **PRESETS[preset]))) == {1e-5}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_layer_starts_as_the_official_codes_variance_scaling(preset):
    """diffusion_tf draws each conv and dense weight U(±√(3·scale/fan_avg)), so its std is
    √(scale/fan_avg), and each bias 0; scale is 1e-10 (its init_scale=0) for the last layer of
    every residual branch and of the network, 1 elsewhere. q, k and v are three C → C layers there
    (fan_avg = C), one qkv layer of 3C outputs here."""
    torch.manual_seed(0)
    model = UNet(3, 32, **PRESETS[preset])
    branch_ends = {model.conv_out}
    for module in model.modules():
        if isinstance(module, unet.ResBlock):
            branch_ends.add(module.conv2)
        if isinstance(module, unet.Attention):
            branch_ends.add(module.proj)
    if preset == "ddpm_cifar10":
        assert len(branch_ends) == 22 + 6 + 1
    for name, layer in model.named_modules():
        if not isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        scale = 1e-10 if layer in branch_ends else 1.0
        for weight in layer.weight.chunk(3 if name.endswith("qkv") else 1):
            fan_avg = (weight.shape[0] + weight.shape[1]) / 2 * weight[0, 0].numel()
            std = math.sqrt(scale / fan_avg)
            # The std of n uniform draws has a relative standard error of √(0.2 / n); allow 6 of it.
            tolerance = 6 * math.sqrt(0.2 / weight.numel())
            assert weight.std().item() == pytest.approx(std, rel=tolerance), name
            assert weight.abs().max().item() <= math.sqrt(3) * std * (1 + 1e-6), name
        assert torch.all(layer.bias == 0), name


def test_cifar_preset_places_attention_like_the_paper_and_small_keeps_its_own():
    def attention_blocks(model):
        return sum(isinstance(m, unet.Attention) for m in model.modules())
    # CIFAR-10: 2 down blocks + 3 up blocks at 16×16, and the middle.
    assert attention_blocks(UNet(3, 32, **PRESETS["ddpm_cifar10"])) == 6
    for size in (28, 32, 64):  # small: 1 down + 2 up blocks at level 2, and the middle, at any size
        assert attention_blocks(UNet(1, size, **PRESETS["small"])) == 4


def test_official_ddim_grids_pinned():
    assert ddim.step_grid(1000, 10, "official-uniform") == [
        900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert ddim.step_grid(1000, 10, "official-quad") == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]


@pytest.mark.parametrize("steps", [10, 50, 100])
def test_official_ddim_grids_are_the_ddim_codes_formulas(steps):
    T = 1000
    assert ddim.step_grid(T, steps, "official-uniform") == list(range(0, T, T // steps))[::-1]
    quad = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(int).tolist()
    assert ddim.step_grid(T, steps, "official-quad") == quad[::-1]


# ============================================================================= faults: nothing lost

def ddpm_main(tiny_data: Path, out: Path, *extra: str) -> None:
    """ddpm.py's main() in this process: faster than a subprocess, and monkeypatch reaches it."""
    ddpm.main([*FAST, "--data-dir", str(tiny_data), "--out", str(out), "--no-amp", *extra])


def test_a_fresh_run_never_overwrites_a_run(ddpm_ckpt, tiny_data, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(ddpm_ckpt.read_bytes())
    with pytest.raises(SystemExit, match="holds a run.*--resume.*--overwrite"):
        ddpm_main(tiny_data, tmp_path, "--max-steps", "2")
    assert (tmp_path / "ckpt.pt").read_bytes() == ddpm_ckpt.read_bytes()
    ddpm_main(tiny_data, tmp_path, "--max-steps", "2", "--overwrite", "--n-samples", "1")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


@pytest.mark.skipif(ddpm.fcntl is None, reason="file locks are POSIX")
def test_one_run_per_folder_and_a_dead_runs_lock_is_free(tiny_data, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
         str(tmp_path / "lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(SystemExit, match="another run is training"):
        ddpm_main(tiny_data, tmp_path, "--max-steps", "1")
    holder.kill()  # kill -9: the OS drops its lock
    holder.wait()
    # Half a checkpoint, as a kill during a save leaves it.
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")
    ddpm_main(tiny_data, tmp_path, "--max-steps", "1", "--n-samples", "1")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / "ckpt.pt.tmp").exists()


def test_a_non_finite_step_changes_nothing():
    sched = ddpm.Schedule(20)
    model = UNet(1, 8, channels=8, channel_mult=(1, 2), attn_levels=(), num_res_blocks=1)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0 = torch.randn(4, 1, 8, 8)
    loss_of = lambda: ddpm.diffusion_loss(model, sched, x0)  # noqa: E731
    assert ddpm.train_step(model, ema, optimizer, FLOAT32, loss_of, 0, 1e-3, "float32")[1]
    before = ([copy.deepcopy(m.state_dict()) for m in (model, ema)]
              + [copy.deepcopy(optimizer.state_dict())])
    x0[0, 0, 0, 0] = float("nan")
    loss, finite = ddpm.train_step(model, ema, optimizer, FLOAT32, loss_of, 1, 1e-3, "float32")
    assert not finite and torch.isnan(loss)
    after = [model.state_dict(), ema.state_dict(), optimizer.state_dict()]
    for a, b in zip(before[:2], after[:2]):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert torch.equal(before[2]["state"][0]["exp_avg"], after[2]["state"][0]["exp_avg"])


def test_a_diverging_run_stops_with_its_last_good_checkpoint(ddpm_ckpt, tiny_data, tmp_path,
                                                             monkeypatch):
    (tmp_path / "ckpt.pt").write_bytes(ddpm_ckpt.read_bytes())
    good = torch.load(ddpm_ckpt, weights_only=True)

    def diverged(model, sched, x0):
        return real_loss(model, sched, x0) * float("nan")
    real_loss = ddpm.diffusion_loss
    monkeypatch.setattr(ddpm, "diffusion_loss", diverged)
    with pytest.raises(SystemExit, match=f"NaN or inf for {ddpm.MAX_BAD_STEPS} steps in a row"):
        ddpm_main(tiny_data, tmp_path, "--resume", "--max-steps", "100")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # saved at epoch ends: same weights
    for key in ("model", "ema"):
        for name, value in good[key].items():
            assert torch.equal(saved[key][name], value), name
    last_row = (tmp_path / "log.csv").read_text().splitlines()[-1].split(",")
    # Skipped: every step since the resume.
    assert int(last_row[6]) == int(last_row[0]) - good["step"]


def test_a_float16_overflow_halves_the_loss_scale_and_is_not_a_nan_step():
    """float16 with loss scaling, on the CPU as on a T4: a scale so large that the gradients
    overflow float16 (largest 65504) makes the scaler skip the step and halve the scale, without
    counting it as a NaN step; a NaN loss still is one."""
    torch.manual_seed(0)
    sched = ddpm.Schedule(20)
    model = UNet(1, 8, channels=8, channel_mult=(1, 2), attn_levels=(), num_res_blocks=1)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    x0 = torch.randn(4, 1, 8, 8)
    loss_of = lambda: ddpm.diffusion_loss(model, sched, x0)  # noqa: E731
    before = copy.deepcopy(model.state_dict())
    loss, finite = ddpm.train_step(model, ema, optimizer, scaler, loss_of, 0, 1e-3, "float16")
    assert finite and torch.isfinite(loss) and scaler.get_scale() == 2.0**39
    # The step was skipped.
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    for step in range(1, 40):  # the scale halves until the gradients fit; then steps apply
        ddpm.train_step(model, ema, optimizer, scaler, loss_of, step, 1e-3, "float16")
    assert scaler.get_scale() < 2.0**20
    assert not all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    x0[0, 0, 0, 0] = float("nan")
    assert not ddpm.train_step(model, ema, optimizer, scaler, loss_of, 40, 1e-3, "float16")[1]


def test_float16_trains_and_resumes_with_its_loss_scale(tiny_data, tmp_path, capsys):
    """float16 on a CPU is slow: a convolution's backward has no fast kernel (an Intel Xeon with
    AMX: 10 s a step at 28×28, 1 s at 8×8). So 8×8 images, 8 steps, or 4 and 4 more."""
    float16 = ["--precision", "float16", "--image-size", "8"]
    ddpm_main(tiny_data, tmp_path / "straight", *float16, "--max-steps", "8")
    assert "on cpu × 1 (float16)" in capsys.readouterr().out
    ddpm_main(tiny_data, tmp_path / "resumed", *float16, "--max-steps", "4")
    ddpm_main(tiny_data, tmp_path / "resumed", *float16, "--max-steps", "8", "--resume")
    straight, resumed = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)
                         for d in ("straight", "resumed"))
    # The loss scaler's state is kept.
    assert (straight["scaler"] == resumed["scaler"]
            and straight["scaler"]["_growth_tracker"] == 8)
    for name, value in straight["ema"].items():
        torch.testing.assert_close(resumed["ema"][name], value, msg=name)
    assert (ddpm.parse_args(["--amp"]).precision == "bfloat16"
            and ddpm.parse_args(["--no-amp"]).precision == "float32")


# ----------------------------------------------------------------------------- on a CUDA GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA GPU here; on a GPU machine: python bench.py --check")


@cuda
@pytest.mark.parametrize("precision", ["auto", "float16"])
@pytest.mark.parametrize("script", [ddpm, ddim, cfg], ids=lambda m: m.__name__)
def test_cuda_compiled_training_samples_and_resumes(script, precision, tiny_data, tmp_path):
    """A GPU's defaults (channels_last, fused AdamW, TF32, bfloat16 where native) with --compile,
    and float16 forced: train, sample, and resume to the same weights as a straight run, within
    float rounding (rtol 1e-3, atol 1e-4: GPU kernels are not bit-deterministic)."""
    compiled = ["--compile"] if precision == "auto" else []  # compiling costs time: once per script
    common = [*FAST, "--device", "cuda", "--data-dir", str(tiny_data), *compiled,
              "--precision", precision]
    script.main([*common, "--out", str(tmp_path / "straight"), "--max-steps", "16"])
    script.main([*common, "--out", str(tmp_path / "resumed"), "--max-steps", "8"])
    script.main([*common, "--out", str(tmp_path / "resumed"), "--max-steps", "16", "--resume"])
    straight, resumed = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)
                         for d in ("straight", "resumed"))
    for name, value in straight["ema"].items():
        torch.testing.assert_close(resumed["ema"][name], value, rtol=1e-3, atol=1e-4, msg=name)
    assert (tmp_path / "straight" / "samples.png").is_file()


@cuda
def test_cuda_cifar10_preset_fits_a_t4_at_the_default_batch():
    """The paper's 35.7M network at 32×32, batch 128, in float16 as on a T4: peak memory under
    15 GiB."""
    device = torch.device("cuda")
    model = UNet(3, 32, **PRESETS["ddpm_cifar10"]).to(device, memory_format=torch.channels_last)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    sched = ddpm.Schedule(1000, "linear", device)
    x0 = torch.rand(128, 3, 32, 32, device=device) * 2 - 1
    loss_of = lambda: ddpm.diffusion_loss(model, sched, x0)  # noqa: E731
    torch.cuda.reset_peak_memory_stats(device)
    for step in range(3):
        ddpm.train_step(model, ema, optimizer, scaler, loss_of, step, 2e-4, "float16")
    assert torch.cuda.max_memory_allocated(device) < 15 * 2**30


@cuda
def test_cuda_sampling_makes_no_host_synchronisation_per_step():
    """Any call that waits for the GPU inside a sampler (.item(), a Python bool of a tensor)
    raises."""
    device = torch.device("cuda")
    sched = ddpm.Schedule(50, "linear", device)
    model = UNet(1, 16, channels=16, channel_mult=(1, 2), attn_levels=(1,),
                 num_classes=2).to(device).eval()
    generator = torch.Generator(device).manual_seed(0)
    shape = (4, 1, 16, 16)
    y = torch.tensor([0, 1, 0, 1], device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ddpm.sample(model, sched, shape, generator=generator,
                    callback=ddpm.sampling_callback(50, None))
        ddim.sample(model, sched, shape, 10, eta=1.0, generator=generator)
        cfg.sample(guided(model, y, 2.0, 2), sched, shape, 10, eta=1.0, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    state = dict(model={"w": torch.ones(3)}, ema={"w": torch.ones(3)}, step=1)
    ddpm.save_checkpoint(path, state)
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match="No space left on device.*intact"):
        ddpm.save_checkpoint(path, {**state, "step": 2})
    assert path.read_bytes() == before and not (tmp_path / "ckpt.pt.tmp").exists()
    monkeypatch.undo()
    # Never a checkpoint that training cannot go on from.
    with pytest.raises(SystemExit, match="NaN or inf"):
        ddpm.save_checkpoint(path, {**state, "ema": {"w": torch.tensor([1.0, float("nan"), 1.0])}})
    assert path.read_bytes() == before


def test_kill_9_at_random_moments_loses_no_completed_work(tiny_data, tmp_path):
    """Kill a real training run at random moments once it trains (it saves every 8 steps, 64
    images at batch 8: about every 2.3 s here), resume each time; it ends where an uninterrupted
    one does."""
    common = [*FAST, "--data-dir", str(tiny_data), "--max-steps", "24", "--n-samples", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out, rng, steps_seen = tmp_path / "killed", random.Random(0), []
    for _ in range(3):
        process = subprocess.Popen(
            [sys.executable, "ddpm.py", *common, "--out", str(out), "--auto-resume"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        process.stdout.readline()  # "64 images …": it starts training
        time.sleep(rng.uniform(0.5, 3.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if (out / "ckpt.pt").exists():
            # It loads: the checkpoint is whole.
            steps_seen.append(torch.load(out / "ckpt.pt", weights_only=True)["step"])
    assert steps_seen == sorted(steps_seen)  # never went back
    ddpm.main([*common, "--out", str(out), "--auto-resume"])
    ddpm.main([*common, "--out", str(tmp_path / "straight")])
    resumed, straight = (torch.load(d / "ckpt.pt", weights_only=True)
                         for d in (out, tmp_path / "straight"))
    assert resumed["step"] == 24
    for name, value in straight["ema"].items():
        torch.testing.assert_close(resumed["ema"][name], value, msg=name)
    steps = [int(row.split(",")[0]) for row in (out / "log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # one row per interval, no repeats


# Once, this hung now and then on a loaded machine: torchrun keeps one store across restarts, and
# the restarted gloo group read the dead workers' addresses; main() now prefixes the store per
# restart.
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker through /proc")
def test_torchrun_restarts_a_dead_worker_and_the_run_resumes(tiny_data, tmp_path):
    out = tmp_path / "elastic"
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc_per_node=2", "--max-restarts=3", "ddpm.py", *FAST,
                                "--data-dir", str(tiny_data), "--out", str(out),
                                "--max-steps", "16", "--n-samples", "1", "--auto-resume"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.time() + 120
        while not (out / "ckpt.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        workers = [int(pid) for pid in os.listdir("/proc")
                   if pid.isdigit() and is_child_of(int(pid), process.pid)]
        assert workers, "no torchrun worker found"
        os.kill(workers[-1], signal.SIGKILL)
        output, _ = process.communicate(timeout=240)
    finally:  # never leave a torchrun behind, whatever failed: its workers first, then itself
        for pid in [p for p in os.listdir("/proc")
                    if p.isdigit() and is_child_of(int(p), process.pid)]:
            os.kill(int(pid), signal.SIGKILL)
        process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "resuming at step" in output
    # A checkpoint every 8 steps.
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 16
    assert (out / "samples.png").is_file()


def is_child_of(pid: int, parent: int) -> bool:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == parent
    except (OSError, IndexError, ValueError):
        return False


# ============================================================================= the training record

def test_log_survives_resume_and_export_makes_a_sampling_only_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    ddpm_main(tiny_data, out, "--n-samples", "1", "--max-steps", "12")
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].split(",") == ["step", "epoch", "loss", "lr", "images_per_s", "elapsed_s",
                                  "skipped"]
    with open(out / "log.csv", "a") as f:  # a row written after the last checkpoint, then killed
        f.write("13,1.6,1,1,1,1,0\n")
    ddpm_main(tiny_data, out, "--n-samples", "1", "--max-steps", "20", "--resume")
    steps = [int(row.split(",")[0]) for row in (out / "log.csv").read_text().splitlines()[1:]]
    assert steps == [10, 12, 20]
    for row in (out / "log.csv").read_text().splitlines()[1:]:  # loss, lr, img/s, time; skipped
        values = [float(v) for v in row.split(",")]
        assert all(v > 0 for v in values[2:6]) and values[6] == 0

    small = tmp_path / "small.pt"
    ddpm.main(["--out", str(out), "--export", str(small)])
    exported = torch.load(small, weights_only=True)
    assert "optimizer" not in exported and "model" not in exported and exported["step"] == 20
    ddim.main(["--sample-only", "--device", "cpu", "--ckpt", str(small), "--out", str(tmp_path),
               "--n-samples", "2"])
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "ckpt.pt").write_bytes(small.read_bytes())
    with pytest.raises(SystemExit, match="^error: .*no optimizer"):
        ddpm_main(tiny_data, tmp_path / "again", "--resume")


def write_cifar10_pickles(root: Path, per_batch: int = 4) -> list[tuple[int, tuple[int, int, int]]]:
    """A tiny CIFAR-10 in its real format (cifar-10-batches-py: pickled dicts, rows of 3072 bytes,
    all red then all green then all blue). Image i is black with one pixel at (0, 1) of a colour
    that tells its channel; returns (label, colour) per training image, in file order."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    expected, index = [], 0
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = np.zeros((per_batch, 3, 32, 32), dtype=np.uint8)
        labels = []
        for i in range(per_batch):
            label, colour = index % 10, colours[index % 3]
            data[i, :, 0, 1] = colour
            labels.append(label)
            if name != "test_batch":
                expected.append((label, colour))
            index += 1
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data.reshape(per_batch, 3072), "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return expected


@pytest.fixture
def tiny_cifar10(tmp_path, monkeypatch):
    """A tiny CIFAR-10 that torchvision's own CIFAR10 class reads; only its md5 check is
    bypassed."""
    expected = write_cifar10_pickles(tmp_path / "data")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    return tmp_path / "data", expected


def test_cifar10_pickles_load_as_rgb_in_the_right_channel_order(tiny_cifar10):
    data_dir, expected = tiny_cifar10
    images, labels, class_names = ddpm.load_dataset("cifar10", str(data_dir))
    assert (images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
            and class_names[3] == "class3")
    assert labels.tolist() == [label for label, _ in expected]
    for image, (_, colour) in zip(images, expected):
        assert tuple(image[:, 0, 1].tolist()) == colour and image.sum() == sum(colour)


def test_the_papers_cifar10_network_trains_and_samples_rgb(tiny_cifar10, tmp_path):
    """The real ddpm_cifar10 preset (35.7M parameters) on 32×32 RGB: train, sample, PNGs (resuming
    is the same code for every preset: tested on the small one, each save here writes 570 MB)."""
    data_dir, _ = tiny_cifar10
    out = tmp_path / "run"
    common = ["--dataset", "cifar10", "--data-dir", str(data_dir), "--device", "cpu",
              "--batch-size", "2", "--timesteps", "4", "--n-samples", "2", "--out", str(out),
              "--no-amp"]
    ddpm.main([*common, "--max-steps", "2"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["unet"]["channels"] == 128
    assert ckpt["config"]["unet"]["image_channels"] == 3 and ckpt["args"]["flip"] is True
    assert Image.open(out / "samples.png").mode == "RGB"
    ddpm.main([*common, "--sample-only", "--save-pngs", str(tmp_path / "pngs")])
    pngs = sorted((tmp_path / "pngs").glob("*.png"))
    assert (len(pngs) == 2 and Image.open(pngs[0]).size == (32, 32)
            and Image.open(pngs[0]).mode == "RGB")


def write_image_folder(root: Path, colour: bool, classes: tuple[str, ...] = ("circles", "squares"),
                       n: int = 8, size: tuple[int, int] = (40, 36)) -> Path:
    """n images per class subfolder (non-square, so they must be cropped), shapes on white."""
    rng = random.Random(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(n):
            picture = Image.new("RGB", size, "white")
            fill = (rng.randrange(256), rng.randrange(256), 0) if colour else (90, 90, 90)
            x = rng.randrange(15)
            box = [x, 8, x + 16, 24]
            (ImageDraw.Draw(picture).ellipse if name == "circles"
             else ImageDraw.Draw(picture).rectangle)(box, fill=fill)
            picture.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_a_folder_of_images_is_cropped_resized_and_its_colour_detected(tmp_path, capsys):
    colour = write_image_folder(tmp_path / "colour", colour=True)
    (colour / "circles" / "broken.png").write_bytes(b"not a picture")
    (colour / "notes.txt").write_text("not an image: ignored")
    images, labels, class_names = ddpm.load_dataset(str(colour), "unused", size_multiple=8)
    assert images.shape == (16, 3, 32, 32) and class_names == ["circles", "squares"]  # 36 → 32
    assert labels.tolist() == [0] * 8 + [1] * 8
    assert "skipped 1 of the 17 files" in capsys.readouterr().out
    gray = write_image_folder(tmp_path / "gray", colour=False)
    images, _, _ = ddpm.load_dataset(str(gray), "unused", image_size=16)
    assert images.shape == (16, 1, 16, 16)


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_a_bad_folder_is_one_clear_error(case, tmp_path):
    folder = tmp_path / "images"
    if case != "missing":
        folder.mkdir()
    with pytest.raises(SystemExit, match="^error: .*" + {
            "missing": "neither", "empty": "no readable image"}[case]):
        ddpm.load_dataset(str(folder), "unused", size_multiple=4)


def test_an_image_size_the_unet_cannot_halve_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        ddpm.parse_args(["--dataset", "some/folder", "--image-size", "30"])
    assert "error: --image-size must be a multiple of 4" in capsys.readouterr().err


def test_phone_photos_train_at_a_laptop_size_and_a_tiny_icon_is_skipped(tmp_path, capsys):
    """8 phone-size JPEGs (2048×1536) and one 3×3 icon: the default size is FOLDER_SIZE, not 1536
    (whose attention layer would ask for hundreds of GB), and the icon is skipped, not the
    folder."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(8):
        Image.new("RGB", (2048, 1536), (30 * i, 100, 200)).save(photos / f"IMG_{i}.jpg")
    Image.new("RGB", (3, 3), "red").save(photos / "icon.png")
    images, _, _ = ddpm.load_dataset(str(photos), "unused", size_multiple=4)
    assert images.shape == (8, 3, ddpm.FOLDER_SIZE, ddpm.FOLDER_SIZE)
    out = capsys.readouterr().out
    assert f"training at {ddpm.FOLDER_SIZE}×{ddpm.FOLDER_SIZE}" in out and "--image-size" in out
    assert "skipped 1 of the 9 files" in out


def test_running_out_of_memory_is_one_line_naming_the_sizes(tiny_data, tmp_path, monkeypatch):
    # What the CPU allocator raises (a GPU raises torch.OutOfMemoryError).
    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 348 GB")
    monkeypatch.setattr(ddpm, "train_step", no_memory)
    with pytest.raises(SystemExit, match="^error: out of memory.*--batch-size.*--image-size"):
        ddpm_main(tiny_data, tmp_path, "--max-steps", "1")
    monkeypatch.setattr(ddpm, "train_step",
                        lambda *args: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA")))
    with pytest.raises(SystemExit, match="^error: out of memory"):
        ddpm_main(tiny_data, tmp_path, "--max-steps", "1", "--overwrite")


# ---------------------------------------------------------------- a folder run sized to the machine

class FakeClock:
    """time.perf_counter for a script: each call is `seconds` later. TrainingLog reads it twice a
    log row (10 steps), so a row lasts `seconds`. Once `stop_after` seconds have passed, it presses
    Ctrl-C."""

    def __init__(self, seconds: float, stop_after: float = math.inf):
        self.now, self.seconds, self.stop_after, self.stop_signals = 0.0, seconds, stop_after, []

    def perf_counter(self) -> float:
        self.now += self.seconds
        if self.now >= self.stop_after:
            self.stop_signals.append(signal.SIGINT)
        return self.now


def folder_run(folder: Path, out: Path, monkeypatch, *extra: str,
               stop_after: float = math.inf) -> dict:
    """ddpm.py on 16 images of 8×8 at batch 8 (2 steps an epoch), the `small` preset (a third of the
    folder default's time a step), by a fake clock of 225 s a log row: 22.5 s a step. Returns the
    checkpoint."""
    clock = FakeClock(225.0, stop_after)
    monkeypatch.setattr(ddpm, "time", clock)
    monkeypatch.setattr(ddpm, "catch_stop_signals", lambda world_size: clock.stop_signals)
    ddpm.main(["--dataset", str(folder), "--image-size", "8", "--preset", "small",
               "--device", "cpu", "--batch-size", "8", "--timesteps", "4", "--n-samples", "2",
               "--no-amp", "--out", str(out), *extra])
    return torch.load(out / "ckpt.pt", weights_only=True)


def test_a_folder_run_trains_for_the_half_hour_its_measured_speed_gives(
        tmp_path, monkeypatch, capsys):
    folder = write_image_folder(tmp_path / "shapes", colour=True)
    ckpt = folder_run(folder, tmp_path / "run", monkeypatch)
    # Measured from the first row (step 10, 225 s) to step 60 (1,350 s): 22.5 s a step, 1,800 s
    # at step 80.
    assert ckpt["step"] == 80 and ckpt["epochs"] == 40 and "epochs" not in ckpt["config"]
    assert ckpt["elapsed"] == pytest.approx(ddpm.FOLDER_MINUTES * 60)
    out = capsys.readouterr().out
    assert ("16 images (3, 8, 8), 80 steps of 8 on cpu × 1 (float32): about 30 min at 0 images/s "
            "(--epochs 40 repeats this length, --epochs N sets another)") in out
    repeated = folder_run(folder, tmp_path / "repeated", monkeypatch, "--epochs", "40")
    for name, value in ckpt["ema"].items():  # the printed --epochs is the same run
        torch.testing.assert_close(repeated["ema"][name], value, msg=name)


def test_resume_keeps_the_chosen_end_and_epochs_or_max_steps_set_the_length(
        tmp_path, monkeypatch, capsys):
    folder = write_image_folder(tmp_path / "shapes", colour=True)
    assert ddpm.parse_args(["--dataset", str(folder)]).preset == "small48"  # a folder's default
    out = tmp_path / "run"
    # Ctrl-C after sizing.
    assert folder_run(folder, out, monkeypatch, stop_after=2700)["step"] == 70
    assert "80 steps of 8" in capsys.readouterr().out
    ckpt = folder_run(folder, out, monkeypatch, "--resume")
    assert (ckpt["step"], ckpt["epochs"]) == (80, 40)  # the same end, not measured again
    assert "80 steps of 8 on cpu × 1 (float32), resuming at step 70" in capsys.readouterr().out
    ckpt = folder_run(folder, out, monkeypatch, "--resume", "--epochs", "45")
    assert (ckpt["step"], ckpt["epochs"]) == (90, 45)
    ckpt = folder_run(folder, tmp_path / "smoke", monkeypatch, "--max-steps", "3")
    assert (ckpt["step"], ckpt["epochs"]) == (3, None)  # no measuring phase
    assert "16 images (3, 8, 8), 3 steps of 8 on cpu × 1 (float32)\n" in capsys.readouterr().out


def test_grids_take_at_most_a_tenth_of_the_run(tmp_path, monkeypatch):
    """A grid is due every 4 steps here, and takes 225 s by the fake clock (and adds 450 s to its
    row): one is made only while the grids so far have taken at most a tenth of the time."""
    monkeypatch.setattr(ddpm, "CKPT_EVERY", 4)
    folder = write_image_folder(tmp_path / "shapes", colour=True)
    ckpt = folder_run(folder, tmp_path / "run", monkeypatch, "--epochs", "45")
    grids = sorted(int(p.stem.removeprefix("samples_epoch"))
                   for p in (tmp_path / "run").glob("samples_epoch*.png"))
    assert grids == [2, 40]  # steps 4 (nothing spent yet) and 80 (2,250 s in all), none after
    assert ckpt["grid_seconds"] == 2 * 225.0


def test_the_ranks_train_as_many_steps_as_rank_0_measured(tmp_path):
    """Two gloo processes measure different speeds; both take rank 0's length."""
    context = torch.multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=size_run_as_rank, args=(rank, tmp_path / "store", results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert sorted(results.get(timeout=1) for _ in processes) == [(0, 80), (1, 80)]


def size_run_as_rank(rank: int, store_path: Path, results) -> None:
    store = torch.distributed.FileStore(str(store_path), 2)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=2)
    run = dict(step=60, elapsed=1350.0 * (rank + 1), epochs=None)  # rank 1 measured half the speed
    args = argparse.Namespace(batch_size=8, epochs=None, max_steps=None, precision="float32")
    images = torch.zeros(16, 3, 16, 16)
    results.put((rank, ddpm.plan_run(images, args, run, "cpu", rank, 2, (10, 225.0 * (rank + 1)))))
    torch.distributed.destroy_process_group()


def test_cfg_trains_on_an_rgb_class_folder_and_samples_a_class_by_name(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "shapes", colour=True)
    out = tmp_path / "run"
    cfg.main(["--dataset", str(folder), "--device", "cpu", "--batch-size", "8", "--timesteps", "4",
              "--max-steps", "2", "--n-samples", "4", "--out", str(out)])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ckpt["config"]["classes"] == ["circles", "squares"]
            and ckpt["config"]["unet"]["image_channels"] == 3)
    # A folder's default, then a flag's.
    assert ckpt["config"]["prediction"] == "v" and ckpt["args"]["batch_size"] == 8
    assert ckpt["config"]["schedule"] == "cosine" and ckpt["config"]["unet"]["channels"] == 48
    assert "columns: 0 circles, 1 squares" in capsys.readouterr().out
    cfg.main(["--sample-only", "--device", "cpu", "--out", str(out), "--class", "squares",
              "--n-samples", "2", "--save-pngs", str(tmp_path / "pngs")])
    assert sorted(p.name for p in (tmp_path / "pngs").glob("*.png")) == [
        "squares_000000.png", "squares_000001.png"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (folder / "circles").glob("*"):
        p.rename(flat / p.name)
    with pytest.raises(SystemExit, match="^error: .*one subfolder per class"):
        cfg.main(["--dataset", str(flat), "--device", "cpu", "--out", str(tmp_path / "x")])


# ============================================================================= shipped checkpoints

def looks_like_fashion_mnist(x: torch.Tensor) -> bool:
    """Garments on a black background: at least a third of the pixels are background (real
    Fashion-MNIST: half), and neighbouring pixels agree (correlation of horizontal neighbours above
    0.8; real images 0.9, noise 0)."""
    background = (x < -0.9).float().mean().item()
    left, right = x[..., :-1].flatten(), x[..., 1:].flatten()
    neighbours = torch.corrcoef(torch.stack([left, right]))[0, 1].item()
    return background > 1 / 3 and neighbours > 0.8


def looks_like_emoji(x: torch.Tensor) -> bool:
    """Coloured things on white: at least half the samples have white corners (real emoji: 71% of
    the 1,404; the shipped model: 11 of 16), and neighbouring pixels agree (above 0.8; the shipped
    model 0.91)."""
    corners = torch.stack([x[..., :3, :3], x[..., :3, -3:], x[..., -3:, :3], x[..., -3:, -3:]], 1)
    on_white = ((corners > 0.7).flatten(1).float().mean(1) > 0.9).float().mean().item()
    left, right = x[..., :-1].flatten(), x[..., 1:].flatten()
    return on_white >= 0.5 and torch.corrcoef(torch.stack([left, right]))[0, 1].item() > 0.8


@pytest.mark.parametrize("name", ["ddpm_fashion.pt", "cfg_fashion.pt", "ddpm_emoji.pt"])
def test_shipped_checkpoints_sample_their_pictures_and_an_untrained_network_does_not(name):
    ema, ckpt = ddpm.load_checkpoint(ROOT / "pretrained" / name)
    assert "optimizer" not in ckpt and "model" not in ckpt  # sampling-only, a few MB
    config = ckpt["config"]
    sched = ddpm.Schedule(config["timesteps"], config["schedule"])
    untrained = UNet(**config["unet"]).eval()
    shape = (8 if "fashion" in name else 16, config["unet"]["image_channels"], ema.image_size,
             ema.image_size)
    looks_right = looks_like_fashion_mnist if "fashion" in name else looks_like_emoji
    for model, expected in ((ema, True), (untrained, False)):
        eps_theta = ddim.network_eps(model, sched, config.get("prediction", "eps"))
        x = ddim.sample(eps_theta, sched, shape, 20, eta=1.0,
                        generator=torch.Generator().manual_seed(0))
        assert looks_right(x) == expected


def test_quality_measures_frechet_distance_exactly():
    """For diagonal covariances the Fréchet distance is Σ (μ1 − μ2)² + (√v1 − √v2)²."""
    mu1, mu2 = (torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64),
                torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    v1, v2 = (torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64),
              torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64))
    # 1 + 0 + 4 from the means, 1 + 0 + 4 from the variances.
    expected = ((mu1 - mu2) ** 2 + (v1.sqrt() - v2.sqrt()) ** 2).sum().item()
    assert (quality.frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
            == pytest.approx(expected))
    assert (quality.frechet_distance(mu1, torch.diag(v1), mu1, torch.diag(v1))
            == pytest.approx(0, abs=1e-9))


def folder_reference_distances(folder: Path) -> dict[str, float]:
    """Fréchet distance of each of quality.py's --reference cases of a folder, by the case's name
    up to " (" or ","."""
    cases = quality.reference_cases(str(folder), data_dir=None, cache=None, n=1000)
    return {name.split(" (")[0].split(",")[0]:
            quality.measure(images, labels, dataset=str(folder))["fd"]
            for name, images, labels in cases}


@pytest.mark.parametrize("labelled", [True, False])
def test_quality_of_a_folder_ranks_real_below_blurred_below_noise(labelled, tmp_path, monkeypatch):
    # It trains in about a second: 96 small images.
    monkeypatch.setattr(quality, "CACHE_DIR", tmp_path / "cache")
    folder = write_image_folder(tmp_path / "shapes", colour=True, n=60, size=(32, 32))
    if not labelled:  # every file directly in the folder: no classes, so instance discrimination
        for path in list(folder.glob("*/*")):
            path.rename(folder / f"{path.parent.name}_{path.name}")
    fd = folder_reference_distances(folder)
    assert fd["real images held out"] < fd["same"] < fd["uniform noise"]
    assert fd["real images held out"] * 2 < fd["same"]  # measured: 11× with classes, 2.9× without
    assert quality.load(str(folder), image_size=32)[1]["classes"] == (
        ["circles", "squares"] if labelled else [])


def test_quality_of_a_gray_folder_reads_its_rgb_pngs_and_retrains_only_when_its_files_change(
        tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(quality, "FOLDER_EPOCHS", 1)  # any network will do here
    trainings = []
    train_folder = quality.train_folder
    monkeypatch.setattr(quality, "train_folder",
                        lambda *args: trainings.append(args) or train_folder(*args))
    folder = write_image_folder(tmp_path / "gray", colour=False, n=20, size=(16, 16))
    images = quality.reference_cases(str(folder), None, None, n=1000)[1][1]
    assert images.shape == (8, 1, 16, 16)  # the held-out fifth of 40, grayscale
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, image in enumerate(images):
        # Gray as RGB, as the scripts save it.
        torchvision.utils.save_image(image / 255, pngs / f"{i:06d}.png")
    read, names = quality.read_pngs(str(pngs))
    assert read.shape == (8, 3, 16, 16) and names == [None] * 8
    assert (quality.measure(read, dataset=str(folder))
            == quality.measure(images, dataset=str(folder)))
    assert len(trainings) == 1
    (folder / "circles" / "0.jpg").unlink()
    quality.measure(images, dataset=str(folder))
    assert len(trainings) == 2


def test_the_prepared_gpu_check_dry_run(tmp_path):
    """bench.py --check is what a session with a GPU runs (README); its dry run is the same code on
    the CPU at toy sizes, so that the check cannot rot unnoticed."""
    import bench
    out = tmp_path / "gpu_check.md"
    bench.main(["--check", "--dry-run", "--check-out", str(out)])
    rows = [line for line in out.read_text().splitlines()
            if line.startswith("| ") and "preset" not in line]
    assert [row.split(" | ")[:2] for row in rows] == [
        [f"| {preset}", precision] for preset in PRESETS
        for precision in ("bfloat16", "float16")]
    assert all(row.endswith(" h |") == ("ddpm_cifar10" in row) for row in rows)  # the paper's hours
    assert "CUDA tests: not run" in out.read_text()


# The README's "Copy the paper into your project": its first python block (the imports), then a
# script's text from "# --- noise schedule" up to "# --- beyond the papers", beside unet.py; after
# it, one of the section's three programs.
README = (ROOT / "README.md").read_text()
COPY_SECTION = README.split("## Copy the paper into your project\n")[1].split("\n## ")[0]
COPY_BLOCKS = re.findall(r"```python\n(.*?)```", COPY_SECTION, re.S)
COPY_IMPORTS = COPY_BLOCKS[0] + "\n\n"


def copy_the_paper_part(script: str, folder: Path, monkeypatch):
    """Exactly the section the README names, with its imports, in an empty folder beside unet.py:
    the copy as a module, and the copy's unet."""
    source = (ROOT / f"{script}.py").read_text()
    start, end = source.index("# --- noise schedule"), source.index("# --- beyond the papers")
    paper_part = source[start:end]
    (folder / "paper.py").write_text(COPY_IMPORTS + paper_part)
    (folder / "unet.py").write_bytes((ROOT / "unet.py").read_bytes())
    monkeypatch.delitem(sys.modules, "unet")  # the copy's own unet.py, not this repo's
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location(f"paper_of_{script}", folder / "paper.py")
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    return paper, importlib.import_module("unet")


@pytest.mark.parametrize("script", ["ddpm", "ddim", "cfg"])
def test_copy_the_paper_part_of_each_script_alone(script, tmp_path, monkeypatch):
    """The copy trains a few steps as the README says, and samples, with no other line of its
    script."""
    paper, copied_unet = copy_the_paper_part(script, tmp_path, monkeypatch)
    torch.manual_seed(0)
    sched = paper.Schedule(20)
    num_classes = 2 if script == "cfg" else None
    model = copied_unet.UNet(1, 8, channels=8, channel_mult=(1, 2), attn_levels=(1,),
                             num_classes=num_classes)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        labels = (paper.drop_labels(y, 0.1, 2),) if script == "cfg" else ()
        loss = paper.diffusion_loss(model, sched, x0, *labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        paper.update_ema(ema, model)
    if script == "ddpm":
        x = paper.sample(ema, sched, x0.shape)
    elif script == "ddim":
        x = paper.sample(ema, sched, x0.shape, 5, eta=0.0, x_T=paper.invert(ema, sched, x0, 5))
    else:
        guided = lambda x, t: paper.guided_eps(ema, x, t, y, 2.0, 2)  # noqa: E731
        x = paper.sample(guided, sched, x0.shape, 5, eta=1.0)
    assert x.shape == x0.shape and torch.isfinite(x).all()


def bars(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of 16×16 in [−1, 1], each a bar 4 pixels wide at a random place on black; label 0:
    a horizontal bar, 1: a vertical one."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    start = torch.randint(0, 13, (n, 1), generator=generator)
    rows = (torch.arange(16) >= start) & (torch.arange(16) < start + 4)  # (n, 16)
    images = torch.where(rows[:, :, None], 1.0, -1.0).expand(n, 16, 16).clone()
    images[labels == 1] = images[labels == 1].transpose(1, 2)
    return images[:, None], labels


def bar_orientation(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For images (N, 1, 16, 16): 0 for a horizontal bar, 1 for a vertical one, and how well the
    image matches the best bar of any place: the correlation, 1.0 for every image of bars()."""
    places = torch.arange(13)
    rows = (torch.arange(16) >= places[:, None]) & (torch.arange(16) < places[:, None] + 4)
    horizontal = torch.where(rows[:, :, None], 1.0, -1.0).expand(13, 16, 16)
    templates = torch.cat([horizontal, horizontal.transpose(1, 2)]).flatten(1)  # (26, 256)
    x = images.flatten(1)
    x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)
    t = (templates - templates.mean(1, keepdim=True)) / templates.std(1, keepdim=True)
    correlation = x @ t.T / (x.shape[1] - 1)
    best, index = correlation.max(1)
    return (index >= 13).long(), best


def run_copy_program(script: str, folder: Path, monkeypatch, steps: int, images: torch.Tensor,
                     labels: torch.Tensor) -> dict:
    """The README's program for script, run as its text says: after the copied paper part and its
    imports, in an empty folder beside unet.py, with only its data and steps lines replaced (by
    images, labels and steps). Returns the program's variables."""
    programs = [block for block in COPY_BLOCKS if block.startswith(f"# after {script}.py's paper")]
    assert len(programs) == 1, f"one program after {script}.py's paper part"
    copy_the_paper_part(script, folder, monkeypatch)
    data_line = "data, labels = " if script == "cfg" else "data = "
    lines = programs[0].splitlines()
    replaced = {data_line: f"{data_line}test_images, test_labels" if script == "cfg"
                else f"{data_line}test_images", "steps = ": f"steps = {steps}"}
    for start, replacement in replaced.items():
        found = [i for i, line in enumerate(lines) if line.startswith(start)]
        assert len(found) == 1, f"one line that begins with {start!r}"
        lines[found[0]] = replacement
    source = (folder / "paper.py").read_text() + "\n".join(lines) + "\n"
    variables = dict(__name__="__main__", test_images=images, test_labels=labels)
    monkeypatch.chdir(folder)
    torch.manual_seed(0)
    exec(compile(source, str(folder / f"{script}_program.py"), "exec"), variables)
    assert "samples = " in lines[-1] or lines[-1].startswith("samples = ")
    return variables


@pytest.mark.parametrize("script", ["ddpm", "ddim", "cfg"])
def test_the_readme_programs_run_after_the_copied_paper_part(script, tmp_path, monkeypatch):
    """Each program of the README's copy section, verbatim but for its data and steps: 2 steps on
    64 images of 4×4, then its samples, 16 images of that shape."""
    images, labels = torch.rand(64, 1, 4, 4) * 2 - 1, torch.arange(64) % 3
    samples = run_copy_program(script, tmp_path, monkeypatch, 2, images, labels)["samples"]
    assert samples.shape == (16, 1, 4, 4) and torch.isfinite(samples).all()


@pytest.mark.skipif(not os.environ.get("SLOW"), reason="300 steps of each program: SLOW=1")
@pytest.mark.parametrize("script", ["ddpm", "ddim", "cfg"])
def test_the_readme_programs_learn_simple_shapes_in_300_steps(script, tmp_path, monkeypatch):
    """300 steps on 2,000 images of bars: the samples are bars (noise is not), and cfg's are bars
    of the class asked for."""
    images, labels = bars(2000, torch.Generator().manual_seed(0))
    variables = run_copy_program(script, tmp_path, monkeypatch, 300, images, labels)
    orientation, match = bar_orientation(variables["samples"].cpu())
    assert match.median() > 0.95 and (match > 0.9).sum() >= 14, match
    if script == "cfg":
        assert (orientation == variables["y"].cpu()).float().mean() >= 0.9
    untrained = bar_orientation(torch.rand(16, 1, 16, 16) * 2 - 1)[1]
    assert untrained.median() < 0.5


# Every command of the README states its time on its line; each that needs only the repository
# (a shipped checkpoint: no download, no placeholder, no earlier run) and takes seconds runs here.
README_COMMANDS = [line for block in re.findall(r"```bash\n(.*?)```", README, re.S)
                   for line in block.splitlines() if line.strip() and not line.startswith("#")]
QUICK_COMMANDS = [line for line in README_COMMANDS if "--ckpt pretrained/" in line
                  and "--invert" not in line and re.search(r"# \d+ s\b", line)]


def test_every_readme_command_states_its_time_and_writes_its_own_files():
    untimed = [line for line in README_COMMANDS
               if not re.search(r"# .*\b\d+(\.\d+)? (s|min|h)\b|not timed", line)]
    assert not untimed, untimed
    assert len(QUICK_COMMANDS) == 4, QUICK_COMMANDS  # the Quick start's shipped-model commands
    outs = [line.split("--out ")[1].split()[0] for line in README_COMMANDS if "--out " in line]
    assert len(outs) == len(set(outs)), outs  # no two write into one folder


@pytest.mark.parametrize("command", QUICK_COMMANDS, ids=lambda c: c.split("--out ")[1].split()[0])
def test_the_readme_commands_that_need_only_the_repository_run_as_written(command, tmp_path):
    for name in ("ddpm.py", "ddim.py", "cfg.py", "unet.py", "pretrained"):
        (tmp_path / name).symlink_to(ROOT / name)
    words = command.split("#")[0].split()
    assert words[0] == "python"
    result = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    pictures = list((tmp_path / words[words.index("--out") + 1]).glob("*.png"))
    assert pictures and all(Image.open(picture).size[0] > 100 for picture in pictures)


def ring_of_gaussians(n: int, generator: torch.Generator) -> torch.Tensor:
    """2-D points: 8 Gaussians (std 0.15) on a circle of radius 2, far outside [−1, 1]."""
    angle = torch.randint(0, 8, (n,), generator=generator) * (math.pi / 4)
    return (2 * torch.stack([angle.cos(), angle.sin()], 1)
            + 0.15 * torch.randn(n, 2, generator=generator))


class PointMLP(torch.nn.Module):
    """ε_θ(x_t, t) for 2-D points: the timestep's sinusoidal embedding beside x_t, 3 hidden
    layers."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 32, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, timestep_embedding(t, 32)], 1))


def test_the_copied_paper_part_learns_a_2d_distribution_outside_minus_one_one(
        tmp_path, monkeypatch):
    """The copies of ddpm.py and ddim.py, on points instead of images: a small MLP trained for
    3000 steps (6 s on a 2-core Intel Xeon), sampled with the clip off by Algorithm 2 and by DDIM
    at η = 0 and 1 (50 steps), puts its points on the ring, in all 8 of its Gaussians."""
    (tmp_path / "ddpm").mkdir()
    (tmp_path / "ddim").mkdir()
    ddpm_copy, _ = copy_the_paper_part("ddpm", tmp_path / "ddpm", monkeypatch)
    ddim_copy, _ = copy_the_paper_part("ddim", tmp_path / "ddim", monkeypatch)
    torch.manual_seed(0)
    sched = ddpm_copy.Schedule(1000, "linear")
    model = PointMLP()
    ema = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    data = torch.Generator().manual_seed(0)
    for _ in range(3000):
        loss = ddpm_copy.diffusion_loss(model, sched, ring_of_gaussians(512, data))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ddpm_copy.update_ema(ema, model, decay=0.995)
    generator = torch.Generator().manual_seed(1)
    samples = {
        "ddpm": ddpm_copy.sample(ema, sched, (2000, 2), generator=generator, clip=False),
        "ddim η=0": ddim_copy.sample(ema, sched, (2000, 2), 50, eta=0.0, generator=generator,
                                     clip=False),
        "ddim η=1": ddim_copy.sample(ema, sched, (2000, 2), 50, eta=1.0, generator=generator,
                                     clip=False),
    }
    for name, x in samples.items():  # measured: radius 2.00 ± 0.01, 99% on the ring, 10-14% each
        radius = x.norm(dim=1)
        angle = torch.atan2(x[:, 1], x[:, 0]) + math.pi / 8
        share = torch.bincount((angle % (2 * math.pi) // (math.pi / 4)).long(),
                               minlength=8) / len(x)
        assert abs(radius.mean().item() - 2) < 0.1, name
        assert ((radius - 2).abs() < 0.45).float().mean().item() > 0.9, name
        assert 0.08 < share.min().item() and share.max().item() < 0.17, (name, share)


# Four samples per shipped checkpoint, float32, seed 0, made by the samplers as they were before the
# paper parts were rewritten (pretrained/reference_samples.pt): a rewrite must reproduce them.
REFERENCE_SAMPLES = torch.load(ROOT / "pretrained" / "reference_samples.pt", weights_only=True)


@pytest.mark.parametrize("key", REFERENCE_SAMPLES)
def test_shipped_checkpoints_reproduce_their_reference_samples(key):
    """DDPM's 1000 steps take about 40 s a checkpoint here: they run with SLOW=1."""
    if "ddpm_T" in key and not os.environ.get("SLOW"):
        pytest.skip("1000 sampling steps: run with SLOW=1")
    name, sampler = key.split("/")
    ema, ckpt = ddpm.load_checkpoint(ROOT / "pretrained" / f"{name}.pt")
    config = ckpt["config"]
    sched = ddpm.Schedule(config["timesteps"], config["schedule"])
    eps_theta = ddpm.network_eps(ema, sched, config.get("prediction", "eps"))
    shape = REFERENCE_SAMPLES[key].shape
    generator = torch.Generator().manual_seed(0)
    if sampler == "ddpm_T":
        x = ddpm.sample(eps_theta, sched, shape, generator=generator)
    elif sampler == "ddim_50_eta0":
        x = ddim.sample(eps_theta, sched, shape, 50, eta=0.0, generator=generator)
    else:
        y = torch.tensor([0, 3, 7, 9])
        x = cfg.sample(guided(eps_theta, y, 2.0, 10), sched, shape, 50, eta=1.0,
                       generator=generator)
    assert (x - REFERENCE_SAMPLES[key]).abs().max().item() < 1e-3


def test_practice_notebook_runs_end_to_end_in_a_kernel_of_this_interpreter(tmp_path, monkeypatch):
    """practice.ipynb, every cell, in a real Jupyter kernel (nbclient) of sys.executable, with
    PRACTICE_SMALL=1: small and offline, about a minute. A failing cell fails the test. It runs a
    copy in tmp_path, from the repository as working directory; no project file may change."""
    kernel = tmp_path / "jupyter" / "kernels" / "practice-test"
    kernel.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = dict(argv=argv, display_name="practice test", language="python")
    (kernel / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PRACTICE_SMALL", "1")
    # The project's own files (a clone without git too): what .gitignore leaves out may change.
    ignored = {".git", ".venv", "data", "runs", "__pycache__", ".pytest_cache"}
    paths = [path for path in ROOT.rglob("*")
             if path.is_file() and not ignored & set(path.relative_to(ROOT).parts)]
    before = {path: path.read_bytes() for path in paths}
    shutil.copy(ROOT / "practice.ipynb", tmp_path / "practice.ipynb")
    notebook = nbformat.read(tmp_path / "practice.ipynb", as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = nbclient.NotebookClient(notebook, kernel_name="practice-test", timeout=600,
                                     resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
    finally:
        nbformat.write(notebook, tmp_path / "practice.ipynb")  # the copy, executed: to look at
    assert notebook.cells[-1].outputs[0]["text"].strip() == sys.executable
    changed = [str(path) for path, content in before.items() if path.read_bytes() != content]
    assert not changed, changed
