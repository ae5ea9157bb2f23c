"""Tests: the math checked exactly with closed-form denoisers (no training), then the scripts end to end.

Run: python -m pytest -q test_all.py        (under ~3 minutes on 2 CPU cores)
"""
import gzip
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddpm
from unet import PRESETS, UNet

ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- helpers

def gaussian_eps(sched, mu: float, s: float):
    """The optimal ε-predictor when x0 ~ N(mu, s² I): E[ε | x_t] in closed form (DESIGN.md).

    x_t = √ᾱ x0 + √(1−ᾱ) ε  ⇒  E[ε | x_t] = √(1−ᾱ) (x_t − √ᾱ mu) / (ᾱ s² + 1 − ᾱ).
    """
    def model(x, t, y=None):
        alpha_bar = ddpm.expand(sched.alpha_bar, t)
        return (1 - alpha_bar).sqrt() * (x - alpha_bar.sqrt() * mu) / (alpha_bar * s**2 + 1 - alpha_bar)
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


def run_script(*args: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_idx_dataset(tmp_path_factory.mktemp("data"))


# Flags that keep an end-to-end run to seconds: few steps, a short chain, small batches.
FAST = ["--dataset", "mnist", "--device", "cpu", "--batch-size", "8", "--timesteps", "20",
        "--n-samples", "4"]


# ----------------------------------------------------------------------------- schedule, forward process

def test_linear_schedule_matches_paper():
    sched = ddpm.Schedule(1000, "linear")
    assert sched.betas[0].item() == pytest.approx(1e-4)
    assert sched.betas[-1].item() == pytest.approx(0.02)
    # ᾱ_T = Π (1 − β_t) ≈ 4.04e-5 for the linear schedule: x_T is almost pure noise.
    expected = torch.prod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)).item()
    assert sched.alpha_bar[-1].item() == pytest.approx(expected, rel=1e-4)
    assert 3.9e-5 < sched.alpha_bar[-1].item() < 4.2e-5
    assert sched.alpha_bar.dtype == torch.float32
    assert sched.posterior_var[0].item() == 0.0  # β̃ at the first step: x0 is then known


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
    ddpm.diffusion_loss(lambda x, t: seen.append(t) or torch.zeros_like(x), sched, torch.zeros(4000, 1, 1, 1))
    assert set(seen[0].tolist()) == set(range(10))


# ----------------------------------------------------------------------------- sampler, exactly

@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ancestral_sampler_recovers_gaussian_data(variance):
    """With the exact ε-predictor for N(mu, s²), Algorithm 2 must return samples of N(mu, s²)."""
    torch.manual_seed(0)
    sched = ddpm.Schedule(1000, "linear")
    mu, s = 0.3, 0.2
    x = ddpm.sample(gaussian_eps(sched, mu, s), sched, (4000, 1, 4, 4), variance=variance)
    # 64000 values: the standard error of the mean is 8e-4, of the std 6e-4.
    assert x.mean().item() == pytest.approx(mu, abs=0.005)
    assert x.std().item() == pytest.approx(s, abs=0.005)


def test_sampler_detects_a_wrong_model():
    """The check above can fail: a predictor for the wrong data gives the wrong moments."""
    sched = ddpm.Schedule(1000, "linear")
    x = ddpm.sample(gaussian_eps(sched, 0.3, 0.4), sched, (2000, 1, 4, 4))
    assert abs(x.std().item() - 0.2) > 0.1


def test_sampler_records_frames_and_adds_no_noise_at_the_end():
    sched = ddpm.Schedule(100, "linear")
    model = gaussian_eps(sched, 0.0, 0.5)
    frames = []
    a = ddpm.sample(model, sched, (8, 1, 4, 4), generator=torch.Generator().manual_seed(1), frames=frames)
    assert len(frames) == 50 and torch.equal(frames[-1], a)
    b = ddpm.sample(model, sched, (8, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- U-Net

@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_unet_output_shape(channels, size):
    model = UNet(channels, size, **PRESETS["small"])
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_cifar_preset_has_the_papers_35_7m_parameters():
    model = UNet(3, 32, **PRESETS["ddpm_cifar10"])
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(35.7e6, abs=0.1e6)


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
    torch.manual_seed(0)
    x0 = torch.zeros(16, 1, 28, 28) - 1
    for i in range(16):
        x0[i, :, 4 + i % 3 * 6:12 + i % 3 * 6, 4:12] = 1
    sched = ddpm.Schedule(1000, "linear")
    model = UNet(1, 28, **PRESETS["small"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1)
    first = sum(ddpm.diffusion_loss(model, sched, x0).item() for _ in range(8)) / 8
    for _ in range(60):
        loss = ddpm.diffusion_loss(model, sched, x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = sum(ddpm.diffusion_loss(model, sched, x0).item() for _ in range(8)) / 8
    assert last < 0.5 * first


# ----------------------------------------------------------------------------- command line, end to end

def test_cli_train_resume_sample_only(tiny_data, tmp_path):
    out = tmp_path / "run"
    common = [*FAST, "--data-dir", str(tiny_data), "--out", str(out)]
    r = run_script("ddpm.py", *common, "--max-steps", "3")
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert (out / "samples.png").is_file() and (out / "reverse.gif").is_file()

    r = run_script("ddpm.py", *common, "--max-steps", "5", "--resume")
    assert r.returncode == 0, r.stderr
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 5

    # Five steps in one go give the same weights: step count, warmup, EMA, data order and RNG resumed.
    straight = tmp_path / "straight"
    r = run_script("ddpm.py", *FAST, "--data-dir", str(tiny_data), "--out", str(straight), "--max-steps", "5")
    assert r.returncode == 0, r.stderr
    reference = torch.load(straight / "ckpt.pt", weights_only=True)
    for key in ("model", "ema"):
        for name, value in reference[key].items():
            torch.testing.assert_close(resumed[key][name], value, msg=f"{key}.{name}")

    pngs = tmp_path / "pngs"
    r = run_script("ddpm.py", *common, "--sample-only", "--n-samples", "6", "--save-pngs", str(pngs))
    assert r.returncode == 0, r.stderr
    assert len(list(pngs.glob("*.png"))) == 6
    assert (out / "samples.png").is_file()


def test_cli_torchrun_two_processes_on_cpu(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port=29517", "ddpm.py", *FAST, "--data-dir", str(tiny_data),
                        "--out", str(out), "--max-steps", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    assert (out / "samples.png").is_file()


class RunsCode:
    """Unpickling this would call os.system: a checkpoint must never get that far."""

    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


@pytest.mark.parametrize("case", ["unknown-dataset", "no-cuda", "missing", "truncated", "malicious",
                                  "bad-batch"])
def test_cli_bad_input_is_one_clear_error(case, tiny_data, tmp_path):
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
            pickle.dump({"ema": RunsCode(), "config": {}, "step": 0}, f)
        args += ["--sample-only", "--ckpt", str(ckpt)]
    elif case == "bad-batch":
        args += ["--batch-size", "0"]
    r = run_script("ddpm.py", *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert "error" in r.stderr.lower()
    assert not (ROOT / "PWNED_BY_PICKLE").exists() and not (tmp_path / "PWNED_BY_PICKLE").exists()
