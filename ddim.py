"""DDIM: Denoising Diffusion Implicit Models (Song, Meng & Ermon 2020), in one file.

DDPM's loss involves only the marginals q(x_t | x0). DDIM's objectives equal it up to per-t weights
and a constant (DDIM Theorem 1), and weights do not move its optimum when ε_θ is not shared across t
(DDIM Sec. 3.2). So a network trained as in ddpm.py also fits non-Markovian forward processes with
the same marginals. Their generative processes may skip timesteps, and their noise σ is free (DDIM
eq. 16, scaled by η ∈ [0, 1]): η = 1 is DDPM-like; η = 0 is deterministic, an ODE from x_T to x0
that can be run backwards (inversion) and between latents (interpolation). 50 steps instead of
1000 give good samples. Training and checkpoints are ddpm.py's. "DDIM eq. N" is the DDIM paper's
equation N, a bare "eq. N" the DDPM paper's; the code's t = 0..T-1 is the papers' t = 1..T.

    python ddim.py                                         # train as ddpm.py; sample at η = 1
    python ddim.py --sample-only --ckpt runs/ddpm/ckpt.pt  # 50 steps (η = 1) of a ddpm.py model
    python ddim.py --sample-only --ckpt runs/ddpm/ckpt.pt --sample-steps 20 --eta 0 --skip quad
    python ddim.py --invert --interpolate --ckpt runs/ddpm/ckpt.pt  # inversion, interpolation
"""
import argparse
import contextlib
import copy
import gzip
import math
import os
import signal
import time
from pathlib import Path

try:
    import fcntl  # file locks: one training run per --out
except ImportError:  # Windows
    fcntl = None
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.nn.parallel import DistributedDataParallel
from torchvision import datasets
from torchvision.transforms.functional import pil_to_tensor, resize, to_pil_image
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from unet import PRESETS, UNet


# --- noise schedule
class Schedule:
    """The noise schedule: β_t, α_t = 1 − β_t and ᾱ_t = α_1·…·α_t, for the code's t = 0..T-1,
    computed in float64 and stored as float32. No network holds them, so no EMA averages them."""

    def __init__(self, T: int = 1000, kind: str = "linear", device="cpu"):
        if kind == "linear":  # DDPM Sec. 4: β rises linearly from 1e-4 to 0.02
            betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        elif kind == "cosine":  # Nichol & Dhariwal 2021, eq. 17: ᾱ_t = f(t) / f(0)
            s = 0.008  # their offset: it keeps β_1 from being too small (4.1e-5; 2.5e-6 without)
            t_over_T = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((t_over_T + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # their clip, so that β < 1 near t = T
        else:
            raise ValueError(f"unknown schedule {kind!r}")
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        self.T = T
        self.betas = betas.float().to(device)
        self.alphas = alphas.float().to(device)
        self.alpha_bar = alpha_bar.float().to(device)


def at(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """values[t] for a batch of timesteps t, shaped (B, 1, …, 1) to scale a (B, …) tensor like x."""
    return values[t].reshape(-1, *[1] * (x.ndim - 1))


# --- forward process and loss
def q_sample(sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    """q(x_t | x0) = N(√ᾱ_t x0, (1 − ᾱ_t) I), eq. 4, drawn as x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε."""
    alpha_bar = at(sched.alpha_bar, t, x0)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def diffusion_loss(model, sched: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """L_simple, eq. 14: ‖ε − ε_θ(√ᾱ_t x0 + √(1 − ᾱ_t) ε, t)‖² with t uniform and ε ~ N(0, I).
    Algorithm 1 repeats a gradient step on this loss (train_step, in the plumbing below)."""
    t = torch.randint(0, sched.T, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    return F.mse_loss(model(q_sample(sched, x0, t, noise), t), noise)


def update_ema(ema, model, *, decay: float = 0.9999) -> None:
    """EMA of the weights (DDPM Appendix B): θ_ema ← decay·θ_ema + (1 − decay)·θ; θ_ema samples."""
    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), model.parameters()):
            ema_param.lerp_(param, 1 - decay)


# --- DDIM: the generalized sampler, inversion, interpolation
SKIPS = ("uniform", "quad", "official-uniform", "official-quad")


def step_grid(T: int, steps: int, skip: str = "uniform") -> list[int]:
    """The timesteps that the sampler visits, high to low (the sub-sequence τ of DDIM Sec. 4.2).
    "uniform", "quad": S = steps of them from T−1 down to 0, t_i = i + round((T − S)·f(i/(S−1)))
    for i = S−1..0, f(u) = u or u² (more steps at low noise, where details are made); the "i +"
    keeps neighbours apart. "official-*": the DDIM code's range(0, T, T // S) and int(linspace(0,
    √(0.8·T), S)²), which start lower (980, 800 at T = 1000, S = 50) and may give more than S steps
    (67 at S = 64) or repeat one (at S = 100)."""
    if not 1 <= steps <= T:
        raise ValueError(f"need 1 <= steps <= T = {T}, got {steps}")
    if skip == "official-uniform":
        return list(range(0, T, T // steps))[::-1]
    if skip == "official-quad":
        grid = torch.linspace(0, math.sqrt(0.8 * T), steps, dtype=torch.float64) ** 2
        return grid.long().tolist()[::-1]
    i = torch.arange(steps - 1, -1, -1, dtype=torch.float64)
    u = torch.linspace(1, 0, steps, dtype=torch.float64)  # i / (S−1); [1] when S = 1
    f = {"uniform": u, "quad": u**2}[skip]
    return (i + torch.round((T - steps) * f)).long().tolist()


@torch.inference_mode()
def sample(eps_theta, sched: Schedule, shape: tuple[int, ...], steps: int, *, eta: float,
           skip: str = "uniform", generator: torch.Generator | None = None,
           x_T: torch.Tensor | None = None, clip: bool = True, callback=None) -> torch.Tensor:
    """The generalized sampler of DDIM eq. 12, on the timesteps step_grid(T, steps, skip), from x_T
    (drawn when not given). eps_theta(x, t) predicts ε. η scales the noise σ of DDIM eq. 16: η = 0
    is DDIM, deterministic; η = 1 with steps = T is Algorithm 2 of DDPM with σ² = β̃. clip: x̂0
    clipped to [−1, 1] and ε̂ re-derived, as in ddpm.py (the DDIM code's generalized_steps does
    not clip, its ddpm_steps does); turn it off for data outside [−1, 1]. callback(t, x, x̂0) is
    called after each step with its result x and the x̂0 it came from."""
    device = sched.betas.device
    x = torch.randn(shape, device=device, generator=generator) if x_T is None else x_T.to(device)
    grid = step_grid(sched.T, steps, skip)
    one = torch.ones((), device=device)
    for i, t in enumerate(grid):
        t_prev = grid[i + 1] if i + 1 < len(grid) else -1  # -1: x0 itself, where ᾱ = 1
        alpha_bar = sched.alpha_bar[t]
        alpha_bar_prev = sched.alpha_bar[t_prev] if t_prev >= 0 else one
        eps = eps_theta(x, torch.full((x.shape[0],), t, device=device, dtype=torch.long))
        x0_hat = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()  # DDIM eq. 12's x̂0
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
            eps = (x - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()
        # DDIM eq. 16: σ = η √((1 − ᾱ_prev) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_prev)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
        sigma = eta * variance.sqrt()
        # DDIM eq. 12: x_prev = √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z; the clamp stops rounding
        # from taking the square root of a number just below 0.
        direction = (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
        x = alpha_bar_prev.sqrt() * x0_hat + direction
        if eta > 0 and t_prev >= 0:  # σ = 0 at the last step: no noise there, as in DDPM
            x = x + sigma * torch.randn(x.shape, device=device, generator=generator)
        if callback is not None:
            callback(t, x, x0_hat)
    return x


@torch.inference_mode()
def invert(eps_theta, sched: Schedule, x0: torch.Tensor, steps: int, skip: str = "uniform", *,
           clip: bool = True) -> torch.Tensor:
    """Inversion (DDIM Sec. 5.4): the η = 0 sampler run backwards, x0 → x_T. Each step solves DDIM
    eq. 12 (σ = 0) for x_t, with ε_θ(x_{t_prev}, t) for the ε_θ(x_t, t) of the unknown x_t. clip as
    in sample, whose steps it undoes: in float32, 50 steps each way gave the shipped Fashion-MNIST
    model's first 8 training images back to an MSE of 0.0021 (0.0079 with the clip off in both)."""
    grid = step_grid(sched.T, steps, skip)[::-1]
    one = torch.ones((), device=x0.device)
    x = x0
    for t_prev, t in zip([-1] + grid[:-1], grid):
        alpha_bar_prev = sched.alpha_bar[t_prev] if t_prev >= 0 else one
        alpha_bar = sched.alpha_bar[t]
        eps = eps_theta(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0_hat = (x - (1 - alpha_bar_prev).sqrt() * eps) / alpha_bar_prev.sqrt()
        if clip and t_prev >= 0:  # at t_prev = -1, x is x0 itself, and x̂0 = x0
            x0_hat = x0_hat.clamp(-1, 1)
            eps = (x - alpha_bar_prev.sqrt() * x0_hat) / (1 - alpha_bar_prev).sqrt()
        x = alpha_bar.sqrt() * x0_hat + (1 - alpha_bar).sqrt() * eps  # DDIM eq. 12, σ = 0, upwards
    return x


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between latents of any shape (B, …), as DDIM Sec. 5.3 interpolates:
    a Gaussian x_T lies near the sphere of radius √dim, and a straight line cuts inside it, to
    latents with too little noise (blurry images)."""
    a_flat, b_flat = a.flatten(1), b.flatten(1)
    theta = F.cosine_similarity(a_flat, b_flat)[:, None].clamp(-1, 1).acos()  # the angle a to b
    curved = (torch.sin((1 - alpha) * theta) * a_flat + torch.sin(alpha * theta) * b_flat)
    curved = curved / torch.sin(theta)
    straight = (1 - alpha) * a_flat + alpha * b_flat  # where sin θ ≈ 0
    return torch.where(theta > 1e-4, curved, straight).reshape(a.shape)


# --- beyond the papers: what we add, each with its source
def v_loss(model, sched: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """v-prediction (Salimans & Ho 2022), a folder's default: the network learns v = √ᾱ_t ε −
    √(1 − ᾱ_t) x0, its error weighted by Hang et al. 2023's min-SNR-5, min(SNR, 5) / (SNR + 1)."""
    t = torch.randint(0, sched.T, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    alpha_bar = at(sched.alpha_bar, t, x0)
    v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    snr = alpha_bar / (1 - alpha_bar)
    weight = snr.clamp(max=5) / (snr + 1)
    return (weight * (model(q_sample(sched, x0, t, noise), t) - v) ** 2).mean()


def eps_from_v(v_theta, sched: Schedule):
    """A v-network as the samplers' ε-function: ε = √(1 − ᾱ_t) x_t + √ᾱ_t v (Salimans & Ho 2022)."""
    def eps_theta(x: torch.Tensor, t: torch.Tensor, *labels) -> torch.Tensor:
        alpha_bar = at(sched.alpha_bar, t, x)
        return (1 - alpha_bar).sqrt() * x + alpha_bar.sqrt() * v_theta(x, t, *labels)
    return eps_theta


def ema_warmup(step: int) -> float:
    """update_ema's decay at a step, min(0.9999, (1 + step) / (10 + step)): the num_updates rule of
    TensorFlow's ExponentialMovingAverage. Early weights fade fast, so short runs sample well."""
    return min(0.9999, (1 + step) / (10 + step))


# --- the plumbing: what runs the paper. A first read needs load_dataset, save_samples, train_step
# and train (Algorithm 1's loop: batch, gradient step, log row, checkpoint, grid), then main. Skip
# at first what makes them robust or convenient: folders and Debian's copy of Fashion-MNIST, atomic
# checkpoints, the log's resume, a folder's time plan, Ctrl-C, the output-folder lock,
# --precision auto, torchrun's restarts and out-of-memory errors.

# --- data
DATASETS = {"mnist": datasets.MNIST, "fashion": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FOLDER_SIZE = 64  # a folder's largest default --image-size, which a laptop trains in a half hour


def load_folder(root: Path, image_size: int | None, size_multiple: int):
    """Every image under root, a centre square of image_size on white; its label: its subfolder."""
    if not root.is_dir():
        raise SystemExit(f"error: --dataset {root}: neither {', '.join(DATASETS)} nor a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    class_names = sorted({p.relative_to(root).parts[0] for p in files if p.parent != root})
    short_sides = {}
    for path in files:  # reads the headers only; a file Pillow cannot read is skipped
        with contextlib.suppress(Exception), Image.open(path) as picture:
            short_sides[path] = min(picture.size)
    if image_size is None:  # the median short side, at most FOLDER_SIZE
        median_side = sorted(short_sides.values() or [0])[len(short_sides) // 2]
        largest = min(median_side, FOLDER_SIZE)
        image_size = max(size_multiple, largest // size_multiple * size_multiple)
        if median_side > FOLDER_SIZE:
            print(f"training at {image_size}×{image_size}, smaller than the images (--image-size)")
    images, labels = [], []
    for path in tqdm([p for p, side in short_sides.items() if side >= image_size], desc="loading"):
        with contextlib.suppress(Exception), Image.open(path) as picture:
            white = Image.new("RGBA", picture.size, "white")
            picture = Image.alpha_composite(white, picture.convert("RGBA")).convert("RGB")
            images.append(pil_to_tensor(ImageOps.fit(picture, (image_size, image_size))))  # bicubic
            folder = path.relative_to(root).parts[0]
            labels.append(class_names.index(folder) if path.parent != root else -1)
    if len(images) < len(files):
        skipped = len(files) - len(images)
        print(f"skipped {skipped} of the {len(files)} files: unreadable, or too small")
    if not images:
        raise SystemExit(f"error: no readable image of {image_size}×{image_size} or more in {root}")
    images = torch.stack(images)
    if torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2]):
        images = images[:, :1]  # no pixel has colour: grayscale
    return images.contiguous(), torch.tensor(labels, dtype=torch.long), class_names


def load_dataset(name: str, data_dir: str, image_size: int | None = None, size_multiple: int = 1):
    """uint8 images (N, C, H, W), labels and class names of a torchvision dataset or a folder."""
    if name not in DATASETS:
        return load_folder(Path(name), image_size, size_multiple)
    dataset_class = DATASETS[name]
    raw = Path(data_dir) / dataset_class.__name__ / "raw"
    debian_copy = name == "fashion" and DEBIAN_FASHION.is_dir()
    if debian_copy and not (raw / "train-images-idx3-ubyte").exists():
        raw.mkdir(parents=True, exist_ok=True)
        for gz in DEBIAN_FASHION.glob("*-ubyte.gz"):  # torchvision wants the files unpacked
            (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    try:
        dataset = dataset_class(data_dir, train=True, download=True)
    except (RuntimeError, OSError) as e:
        raise SystemExit(f"error: cannot load or download {name} ({e}); offline, put its unpacked "
                         f"files in {raw} (cifar10: {data_dir}/cifar-10-batches-py)")
    images = torch.as_tensor(dataset.data)
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)  # NHWC → NCHW
    if image_size and image_size != images.shape[-1]:
        images = resize(images, [image_size, image_size], antialias=True)
    return images.contiguous(), torch.as_tensor(dataset.targets), list(dataset.classes)


def to_model_range(images: torch.Tensor, flip: bool) -> torch.Tensor:
    x = images.float() / 127.5 - 1  # uint8 [0, 255] → [−1, 1]
    if flip:
        x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x


# --- the network: its checkpoint and its samples
def save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file, flushed, renamed: a kill or full disk keeps the old file."""
    if not all(v.isfinite().all() for key in ("model", "ema") for v in state.get(key, {}).values()):
        raise SystemExit(f"error: the weights are NaN or inf: not overwriting {path}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk, no permission, ...
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: cannot write {path} ({e}); the previous checkpoint is intact")


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[UNet, dict]:
    """Its EMA network on the device, and the checkpoint (weights_only: data, never code)."""
    if not Path(path).is_file():
        raise SystemExit(f"error: no checkpoint at {path} (train first, or pass --ckpt PATH)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ema = UNet(**ckpt["config"]["unet"]).eval()
        ema.load_state_dict(ckpt["ema"])
    except Exception as e:  # truncated, foreign, unsafe: one line, no traceback
        raise SystemExit(f"error: cannot load {path} ({str(e).strip().splitlines()[0]})")
    return ema.to(device), ckpt


def network_eps(network, sched: Schedule, prediction: str):
    """The network as the samplers' ε_θ(x, t[, y]), in float32 (autocast computes bfloat16)."""
    if prediction == "v":
        return eps_from_v(network, sched)
    return lambda x, t, *labels: network(x, t, *labels).float()


def sampling_callback(steps: int, frames: list | None):
    """A sampler's callback: a progress bar over its steps, and x_t 50 times into frames (a GIF)."""
    bar = tqdm(total=steps, desc="sampling", leave=False)

    def callback(t: int, x: torch.Tensor, x0_hat: torch.Tensor) -> None:
        bar.update(1)
        if frames is not None and (steps - bar.n) % max(1, steps // 50) == 0:
            frames.append(x[:16].cpu())
    return callback


def save_samples(ema: UNet, sched: Schedule, n: int, args, path: Path,
                 gif_path: Path | None = None) -> torch.Tensor:
    """n samples, the same noise each call, in [0, 1] on the CPU; writes their grid (and a GIF)."""
    device = sched.betas.device
    eps_theta = network_eps(ema, sched, args.prediction)
    generator = torch.Generator(device).manual_seed(args.seed)
    images = []
    frames = [] if gif_path else None
    for start in tqdm(range(0, n, args.batch_size), desc="batches", disable=n <= args.batch_size):
        shape = (min(args.batch_size, n - start), ema.conv_in.in_channels, *[ema.image_size] * 2)
        with torch.autocast(device.type, getattr(torch, args.precision),
                            enabled=args.precision != "float32"):
            callback = sampling_callback(args.sample_steps, frames if start == 0 else None)
            x = sample(eps_theta, sched, shape, args.sample_steps, eta=args.eta, skip=args.skip,
                       generator=generator, callback=callback)
        images.append((x.float().cpu() + 1) / 2)
    images = torch.cat(images)
    save_image(images[:256], path, nrow=math.ceil(math.sqrt(min(256, n))))
    if gif_path:  # 50 frames of 16 samples, the last one held
        pictures = [to_pil_image(make_grid(x.clamp(-1, 1) / 2 + 0.5, nrow=4)) for x in frames]
        pictures[0].save(gif_path, save_all=True, append_images=pictures[1:], loop=0,
                         duration=[60] * (len(pictures) - 1) + [2000])
    return images


def random_latents(ema: UNet, n: int, seed: int) -> torch.Tensor:
    """n latents x_T ~ N(0, I), the same for the same seed."""
    device = ema.conv_in.weight.device
    shape = (n, ema.conv_in.in_channels, ema.image_size, ema.image_size)
    return torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(seed))


def save_consistency(ema: UNet, sched: Schedule, args, out: Path, n: int = 8) -> None:
    """Latents decoded with η = 0 in 10 to 1000 steps, a row each (sample consistency, DDIM
    Sec. 5.2): the latent decides what the image shows, not the number of steps."""
    eps_theta = network_eps(ema, sched, args.prediction)
    x_T = random_latents(ema, n, args.seed)
    steps = [s for s in (10, 20, 50, 100, 1000) if s <= sched.T]
    rows = [sample(eps_theta, sched, x_T.shape, s, eta=0.0, skip=args.skip, x_T=x_T,
                   callback=sampling_callback(s, None)) for s in steps]
    save_image((torch.cat(rows) + 1) / 2, out / "consistency.png", nrow=n)
    print(f"wrote {out / 'consistency.png'}: rows of {', '.join(map(str, steps))} steps")


def save_inversion(ema: UNet, sched: Schedule, args, dataset: str, out: Path, n: int = 8) -> None:
    """n training images → x_T (invert) → images (η = 0): rows of originals, latents and
    reconstructions, and the reconstruction's mean squared error."""
    eps_theta = network_eps(ema, sched, args.prediction)
    images, _, _ = load_dataset(dataset, args.data_dir, ema.image_size)
    x0 = to_model_range(images[:n].to(sched.betas.device), flip=False)
    latents = invert(eps_theta, sched, x0, args.sample_steps, args.skip)
    recon = sample(eps_theta, sched, x0.shape, args.sample_steps, eta=0.0, skip=args.skip,
                   x_T=latents)
    rows = torch.cat([(x0 + 1) / 2, latents / 4 + 0.5, (recon + 1) / 2])  # latents: ±2σ in [0, 1]
    save_image(rows, out / "inversion.png", nrow=n)
    mse = F.mse_loss(recon, x0).item()
    print(f"wrote {out / 'inversion.png'}; reconstruction MSE {mse:.5f} "
          f"(pixels in [-1, 1], {args.sample_steps} steps each way)")


def save_interpolation(ema: UNet, sched: Schedule, args, out: Path, pairs: int = 3,
                       n: int = 10) -> None:
    """A row per pair of random latents a, b: slerp(a, b, α) for n values of α in [0, 1]; η = 0."""
    eps_theta = network_eps(ema, sched, args.prediction)
    a, b = random_latents(ema, 2 * pairs, args.seed).chunk(2)
    x_T = torch.stack([slerp(a, b, alpha) for alpha in torch.linspace(0, 1, n).tolist()], dim=1)
    x_T = x_T.flatten(0, 1)
    x = sample(eps_theta, sched, x_T.shape, args.sample_steps, eta=0.0, skip=args.skip, x_T=x_T)
    save_image((x + 1) / 2, out / "interpolation.png", nrow=n)
    print(f"wrote {out / 'interpolation.png'}")


def checked_sample_steps(steps: int | None, T: int) -> int:
    """--sample-steps, default 50, against the model's T."""
    if steps is not None and steps > T:
        raise SystemExit(f"error: --sample-steps {steps} is more than the model's T = {T}")
    return steps or min(50, T)


def sample_only(args, device: torch.device) -> None:
    """Samples of --ckpt's EMA network (a grid, PNGs), or --invert, --interpolate, --consistency."""
    ema, ckpt = load_checkpoint(args.ckpt, device)
    sched = Schedule(ckpt["config"]["timesteps"], ckpt["config"]["schedule"], device)
    args.prediction = ckpt["config"].get("prediction", "eps")  # older checkpoints: ε
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.sample_steps = checked_sample_steps(args.sample_steps, sched.T)
    if args.invert or args.interpolate or args.consistency:
        with torch.autocast(device.type, getattr(torch, args.precision),
                            enabled=args.precision != "float32"):
            if args.invert:
                save_inversion(ema, sched, args, ckpt["config"]["dataset"], out)
            if args.interpolate:
                save_interpolation(ema, sched, args, out)
            if args.consistency:
                save_consistency(ema, sched, args, out)
        return
    images = save_samples(ema, sched, args.n_samples, args, out / "samples.png")
    if args.save_pngs:
        Path(args.save_pngs).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            save_image(image, Path(args.save_pngs) / f"{i:06d}.png")
    print(f"wrote {out / 'samples.png'}" + (f" and {len(images)} PNGs" if args.save_pngs else ""))


# --- the training run
FOLDER_MINUTES = 30  # a folder trains as many epochs as fill half an hour of this machine,
MEASURE_STEPS = 50  # at the speed of these steps after the first log row (start-up, compiling)
LOG_EVERY = 10  # steps between the rows of log.csv; each row waits for the device
CKPT_EVERY = 500  # the most steps between checkpoints (and one each epoch)
GRID_SHARE = 0.1  # the largest share of the run's time that the sample grids may take
MAX_BAD_STEPS = 20  # a run stops after this many NaN or inf steps in a row


def train_step(model, ema: UNet, optimizer, scaler, loss_of, step: int, lr: float,
               precision: str) -> tuple[torch.Tensor, bool]:
    """Algorithm 1's gradient step on loss_of(), with the official gradient clip (norm 1), autocast,
    float16's loss scaling and the EMA. Returns the loss, and False for a NaN or inf step, which
    changes no weight (a float16 overflow is not one: the scaler skips it and halves its scale)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, getattr(torch, precision), enabled=precision != "float32"):
        loss = loss_of()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # float16: the loss scaled up, so small gradients stay above 0
    scaler.unscale_(optimizer)  # the true gradients again, for the clip (nothing to do in bfloat16)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if not torch.isfinite(grad_norm):  # DDP all-reduces gradients first: every rank agrees
        scaler.update()  # float16: the scale was too large and halves
        return loss.detach(), scaler.is_enabled() and bool(torch.isfinite(loss))
    scaler.step(optimizer)
    scaler.update()
    update_ema(ema, model, decay=ema_warmup(step))
    return loss.detach(), True


def training_data(args, device: torch.device, rank: int, world_size: int):
    if rank != 0:
        dist.barrier()  # rank 0 downloads first
    images, labels, classes = load_dataset(args.dataset, args.data_dir, args.image_size,
                                           args.size_multiple)
    if world_size > 1 and rank == 0:
        dist.barrier()
    if len(images) < args.batch_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} is more than {len(images)} images")
    return images.to(device), labels, classes


def build_run(args, images: torch.Tensor, ckpt_path: Path, device: torch.device):
    """New or resumed: the network, its EMA, AdamW, the loss scaler, the config and the counters."""
    if ckpt_path.is_file() and not (args.resume or args.auto_resume or args.overwrite):
        raise SystemExit(f"error: {ckpt_path.parent} holds a run: --resume it, --overwrite it, "
                         f"or use another --out")
    resuming = args.resume or (args.auto_resume and ckpt_path.is_file())
    ckpt = load_checkpoint(ckpt_path)[1] if resuming else None
    unet = dict(image_channels=images.shape[1], image_size=images.shape[2], **PRESETS[args.preset])
    config = dict(unet=unet, schedule=args.schedule, timesteps=args.timesteps,
                  prediction=args.prediction, dataset=args.dataset)
    # channels_last speeds up convolutions on GPUs (tensor cores); on CPUs it measured slower.
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = UNet(**config["unet"]).to(device, memory_format=memory_format)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=0.0,
                                  fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "float16")
    run = dict(config=config, step=0, elapsed=0.0, skipped=0, epochs=None, grid_seconds=0.0)
    if ckpt:
        if "optimizer" not in ckpt:
            raise SystemExit(f"error: cannot resume from {ckpt_path}: no optimizer (an --export)")
        if ckpt["config"] != config:
            raise SystemExit(f"error: cannot resume {ckpt['config']} with flags that give {config}")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):  # a float16 run's loss scale (empty where the scaler was off)
            scaler.load_state_dict(ckpt["scaler"])
        run.update({key: ckpt[key] for key in run if key in ckpt})  # older checkpoints: no epochs
    return model, ema, optimizer, scaler, run


def plan_run(images: torch.Tensor, args, run: dict, device: torch.device, rank: int,
             world_size: int, measured_from: tuple[int, float] | None = None) -> float:
    """The run's length in steps, and rank 0's start line: --epochs, the resumed run's, or for a
    folder the epochs that fill FOLDER_MINUTES at rank 0's speed over MEASURE_STEPS steps from
    measured_from, the first log row (math.inf until they are timed)."""
    steps_per_epoch = len(images) // args.batch_size
    run["epochs"] = args.epochs or run["epochs"]
    note = f", resuming at step {run['step']}" if run["step"] else ""
    if not run["epochs"] and measured_from and run["step"] - measured_from[0] >= MEASURE_STEPS:
        seconds_per_step = (run["elapsed"] - measured_from[1]) / (run["step"] - measured_from[0])
        planned_steps = run["step"] + (FOLDER_MINUTES * 60 - run["elapsed"]) / seconds_per_step
        epochs_begun = math.ceil(run["step"] / steps_per_epoch)
        decision = [max(1, epochs_begun, round(planned_steps / steps_per_epoch)), seconds_per_step]
        if world_size > 1:
            dist.broadcast_object_list(decision, src=0)  # rank 0's: every rank trains as many steps
        run["epochs"], seconds_per_step = decision
        minutes = run["epochs"] * steps_per_epoch * seconds_per_step / 60
        note = (f": about {minutes:.0f} min at {args.batch_size / seconds_per_step:.0f} images/s "
                f"(--epochs {run['epochs']} repeats this length, --epochs N sets another)")
    total_steps = min(steps_per_epoch * (run["epochs"] or math.inf), args.max_steps or math.inf)
    if rank == 0 and total_steps < math.inf:
        tqdm.write(f"{len(images)} images {tuple(images.shape[1:])}, {total_steps} steps of "
                   f"{args.batch_size} on {device} × {world_size} ({args.precision})" + note)
    return total_steps


def catch_stop_signals(world_size: int) -> list:
    """Ctrl-C, or a SIGTERM not from torchrun, makes train save and stop; a second: stop at once."""
    stop_signals = []

    def request_stop(signum, _frame):
        stop_signals.append(signum)
        signal.signal(signum, signal.SIG_DFL)
    for signum in (signal.SIGINT, signal.SIGTERM) if world_size == 1 else (signal.SIGINT,):
        signal.signal(signum, request_stop)
    return stop_signals


def lock_out_dir(out: Path):
    """One training run per --out: a lock the OS releases when the process dies, even by kill -9."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / "lock", "w")
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: another run is training in {out}: wait, or use another --out")
    return handle


class TrainingLog:
    """The progress bar, and log.csv: a row every LOG_EVERY steps, where the ranks also agree on
    whether to stop (Ctrl-C). A resumed run keeps the rows up to its step."""

    def __init__(self, args, run: dict, total_steps: float, device, rank: int, world_size: int):
        self.args = args
        self.run = run
        self.world_size = world_size
        self.bar = tqdm(total=total_steps, initial=run["step"], disable=rank != 0)
        self.stop_signals = catch_stop_signals(world_size)
        self.totals = torch.zeros(3, device=device)  # since the last row: loss sum, steps, stops
        self.bad_in_a_row = 0
        self.first_row = None  # (step, elapsed) after start-up, where a folder's speed is timed
        self.last_row = (run["step"], time.perf_counter())  # (step, time), to time the next row
        path = Path(args.out) / "log.csv"
        old = path.read_text().splitlines()[1:] if run["step"] and path.is_file() else []
        self.file = open(path, "w", buffering=1) if rank == 0 else None  # a line at a time
        if self.file:
            print("step,epoch,loss,lr,images_per_s,elapsed_s,skipped", file=self.file)
            self.file.writelines(row + "\n" for row in old if int(row.split(",")[0]) <= run["step"])

    def add(self, loss: torch.Tensor, finite: bool) -> None:
        """A step's loss; MAX_BAD_STEPS NaN or inf steps in a row stop the run."""
        self.bar.update(1)
        self.run["skipped"] += not finite
        self.bad_in_a_row = 0 if finite else self.bad_in_a_row + 1
        if self.bad_in_a_row == MAX_BAD_STEPS:
            raise SystemExit(f"error: NaN or inf for {MAX_BAD_STEPS} steps in a row: --resume "
                             f"{self.args.out}/ckpt.pt, the last good state, with a lower --lr")
        self.totals[0] += loss if finite else 0.0
        self.totals[1] += finite

    def write_row(self, step: int, epoch: float, lr: float) -> bool:
        """A row (it waits for the device); True if a rank was asked to stop: all stop here."""
        self.totals[2] = len(self.stop_signals)
        if self.world_size > 1:
            dist.all_reduce(self.totals)  # the ranks agree on the loss, and on whether to stop
        seconds = time.perf_counter() - self.last_row[1]
        self.run["elapsed"] += seconds
        loss = (self.totals[0] / self.totals[1]).item()
        self.bar.set_postfix(loss=f"{loss:.4f}", skipped=self.run["skipped"])
        images_per_s = (step - self.last_row[0]) * self.args.batch_size / seconds
        if self.file:
            print(f"{step},{epoch:.3f},{loss:.5f},{lr:.3g},{images_per_s:.1f},"
                  f"{self.run['elapsed']:.1f},{self.run['skipped']}", file=self.file)
        stop = self.totals[2].item() > 0
        self.totals.zero_()
        self.last_row = (step, time.perf_counter())
        self.first_row = self.first_row or (step, self.run["elapsed"])
        return stop

    def close(self, stopped: bool) -> None:
        """After the last step: where the run was saved; Ctrl-C stops at once again (sampling)."""
        self.bar.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        if self.file:
            self.file.close()
            print(f"saved {self.args.out}/ckpt.pt at step {self.run['step']}"
                  + ("; continue with --resume" if stopped else ""))


def train(args, device: torch.device, rank: int, world_size: int) -> None:
    """Algorithm 1 to the planned end: batch, gradient step, log row, checkpoint, grid."""
    out, ckpt_path = Path(args.out), Path(args.out) / "ckpt.pt"
    images, labels, class_names = training_data(args, device, rank, world_size)
    sched = Schedule(args.timesteps, args.schedule, device)
    loss_fn = v_loss if args.prediction == "v" else diffusion_loss
    model, ema, optimizer, scaler, run = build_run(args, images, ckpt_path, device)
    train_model = DistributedDataParallel(model) if world_size > 1 else model
    train_model = torch.compile(train_model) if args.compile else train_model
    steps_per_epoch = len(images) // args.batch_size
    checkpoint_every = min(CKPT_EVERY, steps_per_epoch)  # and at each epoch's end
    grid_every = steps_per_epoch * max(1, CKPT_EVERY // steps_per_epoch)  # fewer for short epochs
    total_steps = plan_run(images, args, run, device, rank, world_size)  # inf until measured
    log = TrainingLog(args, run, total_steps, device, rank, world_size)  # it catches Ctrl-C
    step = run["step"]
    stop = False
    while step < total_steps and not stop:
        torch.manual_seed(hash((args.seed, rank, step)))  # the step's draws, again on resume
        batch = torch.randint(len(images), (args.batch_size // world_size,), device=device)
        x0 = to_model_range(images[batch], args.flip)  # x0 ~ q(x0): random training images
        lr = args.lr * min(1.0, (step + 1) / args.warmup)  # linear warmup
        loss, finite = train_step(train_model, ema, optimizer, scaler,
                                  lambda: loss_fn(train_model, sched, x0), step, lr, args.precision)
        step = run["step"] = step + 1
        log.add(loss, finite)
        if step % LOG_EVERY == 0 or step == total_steps:
            stop = log.write_row(step, step / steps_per_epoch, lr)  # the ranks agree on stopping
            if total_steps == math.inf:  # a folder's run, sized once its speed is measured
                total_steps = plan_run(images, args, run, device, rank, world_size, log.first_row)
                log.bar.total = total_steps
        if rank == 0 and (stop or step == total_steps or step % checkpoint_every == 0):
            state = dict(model=model.state_dict(), ema=ema.state_dict(),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
            save_checkpoint(ckpt_path, dict(state, args=vars(args), **run))
        grid_due = step % grid_every == 0 and run["grid_seconds"] <= GRID_SHARE * run["elapsed"]
        if rank == 0 and grid_due and step < total_steps and not stop:
            grid_start = time.perf_counter()
            save_samples(ema, sched, 16, args, out / f"samples_epoch{step // steps_per_epoch}.png")
            run["grid_seconds"] += time.perf_counter() - grid_start
    log.close(stop)
    if rank == 0 and not stop:  # the final samples, and the reverse process as a GIF
        save_samples(ema, sched, args.n_samples, args, out / "samples.png", out / "reverse.gif")


# --- the command line
# Per dataset (flags override): a CPU-sized net for 28×28, the paper's CIFAR-10, ours for folders.
DATASET_DEFAULTS = {
    "mnist": dict(preset="small", epochs=6, lr=1e-3, warmup=200, flip=False),
    "fashion": dict(preset="small", epochs=6, lr=1e-3, warmup=200, flip=False),
    "cifar10": dict(preset="ddpm_cifar10", epochs=2000, lr=2e-4, warmup=5000, flip=True),
    "folder": dict(preset="small48", lr=1e-3, flip=True, batch_size=32, prediction="v",
                   schedule="cosine"),
}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        name = "mps" if name == "cpu" and torch.backends.mps.is_available() else name
    try:
        return torch.empty(0, device=name).device  # fails if it is not there
    except (RuntimeError, AssertionError) as e:
        raise SystemExit(f"error: --device {name}: {str(e).strip().splitlines()[0]}")


def positive_int(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return int(text)


def pick_precision(precision: str, device: torch.device) -> str:
    """--precision auto: bfloat16 where it is native (Ampere or newer GPUs; CPUs with AVX-512 BF16
    or AMX: docs/results.md#cpu-and-gpu-settings measures it), float16 with loss scaling on older
    CUDA GPUs (a T4, a V100), else float32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"
    names = ("avx512_bf16", "amx_tile")
    checks = [getattr(torch.cpu, f"_is_{name}_supported", None) for name in names]
    native = device.type == "cpu" and any(check() for check in checks if check)  # None in torch 2.4
    return "bfloat16" if native else "float32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist", help="mnist, fashion, cifar10 or a folder")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--image-size", type=positive_int, help="default: the data's own")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--max-steps", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=128, help="over all DDP processes")
    p.add_argument("--lr", type=float, help="after a linear warmup")
    p.add_argument("--warmup", type=positive_int, default=200, help="steps")
    p.add_argument("--preset", choices=PRESETS, help="U-Net size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ddim")
    fresh_or_not = p.add_mutually_exclusive_group()
    fresh_or_not.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    fresh_or_not.add_argument("--auto-resume", action="store_true", help="--resume if there is one")
    fresh_or_not.add_argument("--overwrite", action="store_true", help="start afresh")
    p.add_argument("--sample-only", action="store_true", help="no training: sample --ckpt")
    p.add_argument("--ckpt", help="default <out>/ckpt.pt")
    p.add_argument("--n-samples", type=positive_int, default=64)
    p.add_argument("--save-pngs", metavar="DIR", help="one PNG per sample")
    p.add_argument("--export", metavar="PATH", help="no training: copy --ckpt's EMA weights")
    p.add_argument("--timesteps", type=positive_int, default=1000, help="T")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    p.add_argument("--prediction", choices=["eps", "v"], default="eps", help="the network's output")
    p.add_argument("--sample-steps", type=positive_int, help="S ≤ T; default 50")
    # η = 1 by default: η = 0 speckles some samples of briefly trained models (docs/speckle.md).
    p.add_argument("--eta", type=float, default=1.0, help="0: deterministic DDIM, 1: DDPM-like")
    p.add_argument("--skip", choices=SKIPS, default="uniform", help="the sampler's timesteps")
    p.add_argument("--invert", action="store_true", help="no training: write inversion.png")
    p.add_argument("--interpolate", action="store_true", help="no training: interpolation.png")
    p.add_argument("--consistency", action="store_true", help="no training: write consistency.png")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"],
                   default="auto", help="autocast; auto: bfloat16 where native, else see README")
    p.add_argument("--amp", dest="precision", action="store_const", const="bfloat16", help="bf16")
    p.add_argument("--no-amp", dest="precision", action="store_const", const="float32", help="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    dataset = p.parse_known_args(argv)[0].dataset
    p.set_defaults(**DATASET_DEFAULTS.get(dataset, DATASET_DEFAULTS["folder"]))
    args = p.parse_args(argv)
    args.ckpt = args.ckpt or str(Path(args.out) / "ckpt.pt")
    args.sample_only = args.sample_only or args.invert or args.interpolate or args.consistency
    args.size_multiple = 2 ** (len(PRESETS[args.preset]["channel_mult"]) - 1)  # the U-Net halves it
    if args.image_size and args.image_size % args.size_multiple:
        p.error(f"--image-size must be a multiple of {args.size_multiple}: the U-Net halves it")
    if args.lr <= 0:
        p.error("--lr must be positive")
    if not 0 <= args.eta <= 1:
        p.error("--eta must be in [0, 1]")
    if not args.sample_only:  # else T comes from the checkpoint
        args.sample_steps = checked_sample_steps(args.sample_steps, args.timesteps)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = pick_device(args.device)
    if world_size > 1:  # started by torchrun: one process per GPU, or gloo on the CPU
        if args.sample_only or args.export or args.batch_size % world_size:
            raise SystemExit("error: torchrun only trains, with a --batch-size the ranks divide")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        # A prefix per restart, or a restarted group reads dead workers' addresses (pytorch#135712).
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"restart{restart}", next(dist.rendezvous("env://"))[0])
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    torch.manual_seed(args.seed + rank)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer GPUs
    args.precision = pick_precision(args.precision, device)  # auto depends on the device
    try:  # the expected failures end in one line
        if args.export:  # for sampling only: EMA weights and config, a quarter the size
            ckpt = load_checkpoint(args.ckpt)[1]
            kept = ("ema", "config", "step", "args")
            save_checkpoint(Path(args.export), {key: ckpt[key] for key in kept})
            print(f"wrote {args.export}: the EMA weights of {args.ckpt} at step {ckpt['step']}")
        elif args.sample_only:
            sample_only(args, device)
        else:
            with lock_out_dir(Path(args.out)) if rank == 0 else contextlib.nullcontext():
                train(args, device, rank, world_size)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError, or a CPU's RuntimeError
        out_of_memory = isinstance(e, (torch.OutOfMemoryError, MemoryError))
        if not out_of_memory and "allocate memory" not in str(e):
            raise
        raise SystemExit(f"error: out of memory on {device}: lower --batch-size or --image-size")
    except OSError as e:  # a full disk, no write permission, ...
        raise SystemExit(f"error: {e}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
