"""DDIM: Denoising Diffusion Implicit Models (Song, Meng & Ermon 2020), in one file.

The idea: DDPM's loss only involves the marginals q(x_t | x0), never the Markov chain that
produced them. So a network trained as in ddpm.py also fits a family of non-Markovian processes
with the same marginals, whose reverse steps may skip timesteps and whose noise σ is free
(eq. 16, scaled by η ∈ [0, 1]). η = 1 is DDPM-like noise (with all T steps, DDPM's ancestral
sampler); η = 0 is deterministic, a discretised ODE from x_T to x0: one x_T gives nearly the same
image at any number of steps, an image can be run back to its x_T (inversion), and latents can be
interpolated. Either way 50 steps instead of 1000 give good samples. Training is ddpm.py's,
unchanged, and so is the checkpoint.

    python ddim.py                                         # train as ddpm.py does, sample with DDIM
    python ddim.py --sample-only --ckpt runs/ddpm/ckpt.pt  # 50 steps (η = 1) from a ddpm.py model
    python ddim.py --sample-only --ckpt runs/ddpm/ckpt.pt --sample-steps 20 --eta 0 --skip quad
    python ddim.py --invert --interpolate --ckpt runs/ddpm/ckpt.pt   # inversion.png, interpolation.png

Equation numbers in the sampler are the DDIM paper's; the training code is ddpm.py's and keeps
the DDPM paper's. Code timesteps t = 0..T-1 are the paper's t = 1..T.
"""
import argparse
import contextlib
import copy
import gzip
import math
import os
import shutil
import signal
import time
from pathlib import Path

try:
    import fcntl  # POSIX file locks, for one training run per --out
except ImportError:  # Windows
    fcntl = None
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.nn.parallel import DistributedDataParallel
from torchvision import datasets
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from unet import PRESETS, UNet

# Training defaults per dataset (flags override): a CPU-friendly network for 28×28 images,
# the paper's CIFAR-10 setup (lr 2e-4, 5000 warmup steps, 800k steps at batch 128), and for a
# folder of your own images the small network for as many epochs as show it about 360,000 images
# (6 epochs of Fashion-MNIST; epochs=None). Flips: on where a mirrored image is as real as the
# original (CIFAR-10's photos; a folder, unless --no-flip), off for digits and clothes.
DATASET_DEFAULTS = {
    "mnist": dict(preset="small", epochs=6, lr=1e-3, warmup=200, flip=False),
    "fashion": dict(preset="small", epochs=6, lr=1e-3, warmup=200, flip=False),
    "cifar10": dict(preset="ddpm_cifar10", epochs=2000, lr=2e-4, warmup=5000, flip=True),
    "folder": dict(preset="small", epochs=None, lr=1e-3, warmup=200, flip=True),
}
IMAGES_PER_FOLDER_RUN = 360_000
EMA_DECAY = 0.9999  # the paper's; warmed up as min(0.9999, (1+step)/(10+step)) so short runs work
LOG_EVERY = 10      # steps between rows of log.csv (each one waits for the device)
LOSS_BANDS = 4      # the log shows the loss in 4 bands of t: where is the network still bad?
CKPT_EVERY = 500    # steps between checkpoints, besides one per epoch, at the end and on Ctrl-C;
                    # a sample grid after each epoch, or after every k-th if k epochs fit in 500 steps
MAX_BAD_STEPS = 20  # stop after this many steps in a row with a NaN/inf gradient (all skipped)


# ----------------------------------------------------------------------------- noise schedule

class Schedule:
    """β_t and the quantities derived from it, for t = 0..T-1.

    Computed in float64, stored in float32. Plain tensors, not parameters or buffers of the
    network, so the EMA never averages them.
    """

    def __init__(self, T: int = 1000, kind: str = "linear", device: torch.device | str = "cpu"):
        if kind == "linear":  # Sec. 4: β from 1e-4 to 0.02
            betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        elif kind == "cosine":  # Nichol & Dhariwal 2021, eq. 17: ᾱ follows a squared cosine
            s = 0.008
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown schedule {kind!r}")
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)                        # ᾱ_t = Π_{s≤t} α_s
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        posterior_var = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)  # β̃_t, eq. 7
        self.T = T
        self.betas, self.alphas, self.alpha_bar, self.alpha_bar_prev, self.posterior_var = (
            v.float().to(device) for v in (betas, alphas, alpha_bar, alpha_bar_prev, posterior_var))


def expand(coef: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """coef[t] for a batch of timesteps, shaped (B, 1, 1, 1) to broadcast over images."""
    return coef[t][:, None, None, None]


# ----------------------------------------------------------------------------- forward process, loss

def q_sample(sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x0) = N(√ᾱ_t x0, (1−ᾱ_t) I), eq. 4, reparameterised with the given noise."""
    alpha_bar = expand(sched.alpha_bar, t)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def diffusion_loss(model, sched: Schedule, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_simple, eq. 14: ‖ε − ε_θ(x_t, t)‖² with t uniform over all T steps (0..T-1).

    Returns each sample's loss (their mean is L_simple) and its t, so the log can show the loss
    by noise level."""
    t = torch.randint(0, sched.T, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    eps_pred = model(q_sample(sched, x0, t, noise), t)
    return (eps_pred.float() - noise).square().mean(dim=(1, 2, 3)), t


# ----------------------------------------------------------------------------- sampler

SKIPS = ("uniform", "quad", "official-uniform", "official-quad")


def step_grid(T: int, steps: int, skip: str = "uniform") -> list[int]:
    """The timesteps the sampler visits (the paper's τ, Sec. 4.2), from the noisiest down to 0.

    "uniform" and "quad": S = steps timesteps from T−1 down to 0, t_i = i + round((T − S)·f(u_i)),
    u_i = i/(S−1), i = S−1, ..., 0. With f(u) = u this is round(linspace(T−1, 0, S)); f(u) = u²
    puts more steps at low noise, where the details are made. The "i +" keeps neighbours at least
    1 apart even where (T−S)·u² hardly moves, and makes S = T give T−1, ..., 0 exactly. They start
    at T−1 because x_T is drawn as pure noise, so the first network call should be at the noisiest
    step; S = 1 gives [T−1]: noise to x̂0 in one step.
    "official-uniform" and "official-quad" are the grids of the DDIM paper's code (its Table 1):
    range(0, T, T // S) (for T = 1000, S = 50: 980, 960, ..., 0; more than S steps where S does
    not divide T) and int(linspace(0, √(0.8·T), S)²) (800 down to 0; for large S it repeats small
    timesteps, steps from t to t that change nothing). Every grid ends at 0, from which the last
    update jumps to x0.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"need 1 <= steps <= T = {T}, got {steps}")
    if skip == "official-uniform":
        return list(range(0, T, T // steps))[::-1]
    if skip == "official-quad":
        return (torch.linspace(0, math.sqrt(0.8 * T), steps, dtype=torch.float64) ** 2).long().tolist()[::-1]
    i = torch.arange(steps - 1, -1, -1, dtype=torch.float64)
    u = torch.linspace(1, 0, steps, dtype=torch.float64)  # i / (S−1); [1] when S = 1
    f = {"uniform": u, "quad": u**2}[skip]
    return (i + torch.round((T - steps) * f)).long().tolist()


def checked_sample_steps(steps: int | None, T: int) -> int:
    """--sample-steps against the model's T (known only after loading a checkpoint): default 50."""
    if steps is None:
        return min(50, T)
    if steps > T:
        raise SystemExit(f"error: --sample-steps {steps} is more than the model's T = {T} timesteps")
    return steps


@torch.inference_mode()
def sample(model, sched: Schedule, shape: tuple[int, ...], steps: int, *, eta: float = 0.0,
           skip: str = "uniform", generator: torch.Generator | None = None,
           x_T: torch.Tensor | None = None, frames: list | None = None,
           progress: bool = False) -> torch.Tensor:
    """The generalized sampler of eq. 12 on step_grid(T, steps, skip): x_T ~ N(0, I) → x0.

    eta scales σ (eq. 16): η = 0 is DDIM, deterministic given x_T; η = 1 with steps = T is
    ddpm.py's ancestral sampler with σ² = β̃ (--variance posterior), drawing the same noise in
    the same order. x_T: start from this latent instead of drawing one (then shape = x_T.shape).
    x̂0 is clipped to [−1, 1] and ε re-derived from it, as in ddpm.py.
    frames: if a list is given, x_t is appended to it (on the CPU) about 50 times, for a GIF.
    """
    device = sched.betas.device
    x = torch.randn(shape, device=device, generator=generator) if x_T is None else x_T.to(device)
    grid = step_grid(sched.T, steps, skip)
    one = torch.ones((), device=device)
    for i, t in enumerate(tqdm(grid, desc="sampling", disable=not progress, leave=False)):
        t_prev = grid[i + 1] if i + 1 < len(grid) else -1  # -1: x0 itself, where ᾱ = 1
        alpha_bar = sched.alpha_bar[t]
        alpha_bar_prev = sched.alpha_bar[t_prev] if t_prev >= 0 else one
        eps = model(x, torch.full((x.shape[0],), t, device=device, dtype=torch.long)).float()
        x0_hat = ((x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()).clamp(-1, 1)  # eq. 12's x̂0
        eps = (x - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()  # the ε that fits the clipped x̂0
        # eq. 16: σ = η √((1 − ᾱ_prev) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_prev)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        # eq. 12: x_prev = √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z  (the clamp stops rounding below 0)
        x = alpha_bar_prev.sqrt() * x0_hat + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev >= 0:  # σ = 0 on the last step: no noise there, as in ddpm.py
            x = x + sigma * torch.randn(x.shape, device=device, generator=generator)
        if frames is not None and (len(grid) - 1 - i) % max(1, len(grid) // 50) == 0:
            frames.append(x.cpu())
    return x


@torch.inference_mode()
def invert(model, sched: Schedule, x0: torch.Tensor, steps: int, skip: str = "uniform") -> torch.Tensor:
    """DDIM inversion (Sec. 5.4): the η = 0 ODE (eq. 14) run the other way, x0 → x_T.

    Each step undoes one step of sample(..., eta=0) on the same grid: from level t_prev up to
    t, with the same update and the same network call ε_θ(·, t), but fed the x we have (x_{t_prev})
    instead of the x_t we are solving for. That is the only approximation; it shrinks with the
    step size. x̂0 is not clipped: we start from data, and at t_prev = -1 (ᾱ = 1) x̂0 = x0 exactly.
    """
    grid = step_grid(sched.T, steps, skip)[::-1]
    one = torch.ones((), device=x0.device)
    x = x0
    for t_prev, t in zip([-1] + grid[:-1], grid):
        alpha_bar_prev = sched.alpha_bar[t_prev] if t_prev >= 0 else one
        alpha_bar = sched.alpha_bar[t]
        eps = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).float()
        x0_hat = (x - (1 - alpha_bar_prev).sqrt() * eps) / alpha_bar_prev.sqrt()
        x = alpha_bar.sqrt() * x0_hat + (1 - alpha_bar).sqrt() * eps  # eq. 12 with σ = 0, upwards
    return x


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between batches of latents (Sec. 5.3). A Gaussian x_T lies near the
    sphere of radius √dim; the straight line between two cuts inside it, to latents of too little
    noise, and decodes to blurry images. Parallel latents fall back to the straight line."""
    cos = (a * b).flatten(1).sum(1) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))
    theta = cos.clamp(-1, 1).acos()[:, None, None, None]
    curved = (torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / torch.sin(theta)
    return torch.where(theta > 1e-4, curved, (1 - alpha) * a + alpha * b)


# ----------------------------------------------------------------------------- data

DATASETS = {"mnist": datasets.MNIST, "fashion": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_dataset(name: str, data_dir: str, image_size: int | None = None,
                 size_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The training images as uint8 (N, C, H, W), kept whole in memory, their int64 labels and the
    class names: a torchvision dataset by name, or every image under a folder (load_folder).
    image_size: resize to it (default: the data's own size), a multiple of size_multiple."""
    if image_size and image_size % size_multiple:
        raise SystemExit(f"error: --image-size {image_size}: the U-Net halves the image at each level, "
                         f"so the size must be a multiple of {size_multiple}")
    if name not in DATASETS:
        return load_folder(Path(name), image_size, size_multiple)
    dataset_class = DATASETS[name]
    raw = Path(data_dir) / dataset_class.__name__ / "raw"
    if name == "fashion" and not (raw / "train-images-idx3-ubyte").exists() and DEBIAN_FASHION.is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        for gz in DEBIAN_FASHION.glob("*-ubyte.gz"):  # torchvision wants the files unpacked
            with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
    try:
        dataset = dataset_class(data_dir, train=True, download=True)
    except (RuntimeError, OSError) as e:
        raise SystemExit(
            f"error: could not load or download {name} into {data_dir!r} ({e}).\n"
            f"Without internet, put the files in place yourself: for mnist and fashion the four IDX "
            f"files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            f"t10k-labels-idx1-ubyte, unpacked) in {raw}; for cifar10 the extracted "
            f"cifar-10-batches-py/ folder in {data_dir}. Fashion-MNIST is also packaged by "
            f"Debian/Ubuntu (apt-get install dataset-fashion-mnist), which this script uses when "
            f"present. Or point --data-dir at a folder that already holds the dataset.") from None
    images = torch.as_tensor(dataset.data)
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)  # NHWC → NCHW
    if image_size and image_size != images.shape[-1]:
        images = F.interpolate(images.float(), size=image_size, mode="bilinear", antialias=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.long), list(dataset.classes)


def load_folder(root: Path, image_size: int | None, size_multiple: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every image file under root (recursively), centre-cropped to a square and resized to
    image_size; by default the smallest short side of the files (their own size when they all
    agree), rounded down to a multiple of size_multiple so that the U-Net can halve it.
    Colour if any file has colour, else grayscale; transparent pixels become white. Labels: the
    first-level subfolder, as in torchvision's ImageFolder (-1 for files directly in root).
    Unreadable files are skipped and counted."""
    if not root.is_dir():
        raise SystemExit(f"error: --dataset {root}: neither {', '.join(DATASETS)} nor a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(f"error: no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    class_names = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    if image_size is None:
        short_sides = []
        for path in files:  # reads the headers only
            try:
                with Image.open(path) as picture:
                    short_sides.append(min(picture.size))
            except (OSError, ValueError):
                pass
        image_size = min(short_sides, default=0) // size_multiple * size_multiple
        if image_size == 0:
            raise SystemExit(f"error: none of the {len(files)} image files under {root} could be read")
    nbytes, free = len(files) * 3 * image_size**2, free_memory()
    if nbytes > free / 2:
        raise SystemExit(f"error: {len(files)} images of {image_size}×{image_size} need {nbytes / 2**30:.1f} GiB "
                         f"in memory, more than half of the {free / 2**30:.1f} GiB free: use a smaller "
                         f"--image-size, or fewer images")
    images = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    labels, kept = [], 0
    for path in tqdm(files, desc=f"loading {root}", dynamic_ncols=True, leave=False):
        try:
            with Image.open(path) as picture:
                picture = Image.alpha_composite(Image.new("RGBA", picture.size, "white"), picture.convert("RGBA"))
                picture = ImageOps.fit(picture.convert("RGB"), (image_size, image_size), Image.Resampling.BICUBIC)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        images[kept] = pil_to_tensor(picture)
        parts = path.relative_to(root).parts
        labels.append(class_names.index(parts[0]) if len(parts) > 1 else -1)
        kept += 1
    if kept == 0:
        raise SystemExit(f"error: none of the {len(files)} image files under {root} could be read")
    if kept < len(files):
        print(f"skipped {len(files) - kept} unreadable file(s) of {len(files)} under {root}")
    images = images[:kept]
    if torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2]):
        images = images[:, :1]  # no pixel has colour: grayscale
    return images.contiguous(), torch.tensor(labels, dtype=torch.long), class_names


def free_memory() -> float:
    """Bytes of RAM free now (Linux; elsewhere: no limit known)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return math.inf


def check_fits(images: torch.Tensor, device: torch.device) -> None:
    """The data stays on the device: stop with its size rather than run out of memory later."""
    if device.type == "cuda" and images.nbytes > torch.cuda.mem_get_info(device)[0] / 2:
        raise SystemExit(f"error: the images need {images.nbytes / 2**30:.1f} GiB, more than half of the "
                         f"free memory of {device}: use a smaller --image-size, or fewer images")


def to_model_range(images: torch.Tensor, flip: bool) -> torch.Tensor:
    """uint8 [0, 255] → float [−1, 1]; random horizontal flips when asked (--flip)."""
    x = images.float() / 127.5 - 1
    if flip:
        x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x


# ----------------------------------------------------------------------------- one training step

def update_ema(ema: UNet, model, step: int) -> None:
    """θ_ema ← d·θ_ema + (1 − d)·θ, d = min(0.9999, (1+step)/(10+step)): the network's weights only."""
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), model.parameters()):
            ema_param.lerp_(param, 1 - decay)


def train_step(model, ema: UNet, optimizer: torch.optim.Optimizer, sched: Schedule, x0: torch.Tensor,
               step: int, lr: float, amp: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Algorithm 1, once: L_simple on a batch, a clipped AdamW step, then the EMA.

    Returns the per-sample losses and their t (for the log), and whether the update was applied:
    a step whose gradient is not finite (NaN or inf: a diverging run) changes neither the weights
    nor the EMA. Checking costs one wait for the device per step, as in PyTorch's GradScaler.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(x0.device.type, torch.bfloat16, enabled=amp):
        losses, t = diffusion_loss(model, sched, x0)
    optimizer.zero_grad(set_to_none=True)
    losses.mean().backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if not torch.isfinite(grad_norm):  # DDP all-reduces gradients first: every rank agrees
        return losses.detach(), t, False
    optimizer.step()
    update_ema(ema, model, step)
    return losses.detach(), t, True


# ----------------------------------------------------------------------------- training run

def train(args, device: torch.device, rank: int, world_size: int) -> None:
    """Train with train_step over the data, --epochs times (or --max-steps). Rank 0 writes all files
    to --out: checkpoints, log.csv, loss.png, sample grids. Ctrl-C or SIGTERM saves and stops."""
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    ckpt = checkpoint_to_resume(ckpt_path, args)
    if rank != 0:
        dist.barrier()  # let rank 0 download the data first
    levels = len(PRESETS[args.preset]["channel_mult"])
    images, labels, class_names = load_dataset(args.dataset, args.data_dir, args.image_size, 2 ** (levels - 1))
    if world_size > 1 and rank == 0:
        dist.barrier()
    check_fits(images, device)
    images = images.to(device)
    config = dict(unet=dict(image_channels=images.shape[1], image_size=images.shape[2],
                            **PRESETS[args.preset]),
                  schedule=args.schedule, timesteps=args.timesteps, dataset=args.dataset)
    sched = Schedule(args.timesteps, args.schedule, device)
    # channels_last speeds up convolutions on GPUs (tensor cores); on CPUs it measured slower.
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = UNet(**config["unet"]).to(device, memory_format=memory_format)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0,
                                  fused=device.type == "cuda")
    run = dict(step=0, elapsed=0.0, skipped=0)  # what the checkpoint carries besides the weights
    if ckpt is not None:
        restore(ckpt, config, model, ema, optimizer, run, ckpt_path, device)
        if world_size > 1:  # each rank needs its own noise; exact replay holds for one process
            torch.manual_seed(args.seed + rank + run["step"])
    train_model = DistributedDataParallel(model) if world_size > 1 else model
    if args.compile:
        train_model = torch.compile(train_model)

    local_batch = args.batch_size // world_size
    steps_per_epoch = len(images) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: --batch-size {args.batch_size} is larger than the dataset ({len(images)} images)")
    epochs = args.epochs or max(1, round(IMAGES_PER_FOLDER_RUN / len(images)))
    total_steps = min(epochs * steps_per_epoch, args.max_steps or math.inf)
    sample_generator = torch.Generator(device)  # fixed noise: grids are comparable across epochs
    grid_every = max(1, CKPT_EVERY // steps_per_epoch)  # in epochs: short epochs get fewer grids

    def save() -> None:
        if rank == 0:
            save_checkpoint(ckpt_path, dict(model=model.state_dict(), ema=ema.state_dict(),
                                            optimizer=optimizer.state_dict(), config=config,
                                            args=vars(args), rng=rng_state(device), **run))

    stop_signals = catch_stop_signals(world_size)
    if rank == 0:
        log = open_log(out / "log.csv", run["step"], args.timesteps)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.dataset}: {len(images)} images {tuple(images.shape[1:])}, "
              f"{n_params / 1e6:.2f}M parameters, {total_steps} steps of batch {args.batch_size} "
              f"on {device} × {world_size}" + (f", resuming at step {run['step']}" if ckpt else ""))
    model.train()
    bar = tqdm(total=total_steps, initial=run["step"], disable=rank != 0, dynamic_ncols=True)
    totals = torch.zeros(2, LOSS_BANDS, device=device)  # per band of t: summed loss, count
    timer_start, timer_step, bad_in_a_row = time.perf_counter(), run["step"], 0
    order, order_epoch = None, None
    while run["step"] < total_steps:
        step = run["step"]
        epoch, index_in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # depends only on (seed, epoch): a resumed run sees the same batches
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed + epoch))
            order_epoch = epoch
        batch_index = order[index_in_epoch * args.batch_size:][:args.batch_size]
        local_index = batch_index[rank * local_batch:(rank + 1) * local_batch].to(device)
        x0 = to_model_range(images[local_index], flip=args.flip)

        lr = args.lr * min(1.0, (step + 1) / args.warmup)  # linear warmup
        losses, t, applied = train_step(train_model, ema, optimizer, sched, x0, step, lr, args.amp)
        run["step"] = step = step + 1
        if applied:
            bad_in_a_row = 0
            band = t * LOSS_BANDS // sched.T
            totals[0].index_add_(0, band, losses.float())
            totals[1].index_add_(0, band, torch.ones_like(losses, dtype=torch.float))
        else:
            run["skipped"] += 1
            bad_in_a_row += 1
            if bad_in_a_row == MAX_BAD_STEPS:
                raise SystemExit(f"error: the gradient was NaN or inf for {MAX_BAD_STEPS} steps in a row "
                                 f"(at step {step}): training diverged. {ckpt_path} holds the last good "
                                 f"state; try a lower --lr, or --no-amp, and --resume")
        bar.update(1)

        if step % LOG_EVERY == 0 or step == total_steps:
            if world_size > 1:
                dist.all_reduce(totals)
            elapsed = time.perf_counter() - timer_start
            run["elapsed"] += elapsed
            images_per_s = (step - timer_step) * args.batch_size / elapsed
            band_loss = (totals[0] / totals[1]).tolist()  # NaN for a band with no sample
            loss = (totals[0].sum() / totals[1].sum()).item()
            bar.set_postfix(loss=f"{loss:.4f}", img_per_s=f"{images_per_s:.0f}", skipped=run["skipped"])
            if rank == 0:
                log.write(",".join(map(str, [step, f"{step / steps_per_epoch:.3f}", f"{loss:.5f}",
                                             f"{lr:.3g}", f"{images_per_s:.1f}", f"{run['elapsed']:.1f}",
                                             run["skipped"]] + [f"{b:.5f}" for b in band_loss])) + "\n")
                log.flush()
            totals.zero_()
            timer_start, timer_step = time.perf_counter(), step
        if stop_requested(stop_signals, step, world_size, device):
            save()
            bar.close()
            if rank == 0:
                plot_log(out / "log.csv", out / "loss.png")
                print(f"stopped at step {step}; saved {ckpt_path}; continue with --resume")
            return
        if step % CKPT_EVERY == 0 or (step % steps_per_epoch == 0 and step < total_steps):
            save()  # once, also where an epoch ends on a multiple of CKPT_EVERY
        if step % (steps_per_epoch * grid_every) == 0 and step < total_steps:
            sampling_start = time.perf_counter()
            if rank == 0:
                grid = sample_in_batches(ema, sched, 16, args, sample_generator.manual_seed(args.seed))
                save_image(grid, out / f"samples_epoch{step // steps_per_epoch}.png", nrow=4)
            timer_start += time.perf_counter() - sampling_start  # sampling is not training time
    bar.close()
    save()
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C during sampling stops at once
        signal.signal(signum, signal.SIG_DFL)
    if rank == 0:
        plot_log(out / "log.csv", out / "loss.png")
        frames = []
        grid = sample_in_batches(ema, sched, args.n_samples, args,
                                 sample_generator.manual_seed(args.seed), frames)
        save_image(grid[:256], out / "samples.png", nrow=math.ceil(math.sqrt(min(256, len(grid)))))
        save_gif(frames, out / "reverse.gif")
        print(f"wrote {ckpt_path}, {out / 'samples.png'}, {out / 'reverse.gif'} and {out / 'log.csv'}")


# ----------------------------------------------------------------------------- training plumbing

def lock_out_dir(out: Path):
    """One training run per --out: an exclusive lock on <out>/lock, held until the returned file
    is closed. The OS releases it when the process dies, even by kill -9, so a dead run never
    blocks the next. (fcntl is POSIX; on Windows there is no lock.) Also removes the ckpt.pt.tmp
    that a kill during a save leaves: ckpt.pt itself is always whole."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / "lock", "w")
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: another run is training in {out} right now (it holds {out / 'lock'}); "
                             f"wait for it to end, or choose another --out") from None
    (out / "ckpt.pt.tmp").unlink(missing_ok=True)
    return handle


def checkpoint_to_resume(ckpt_path: Path, args) -> dict | None:
    """The checkpoint to continue from, or None to start fresh. Never overwrites a run by accident:
    a fresh start where a checkpoint exists needs --overwrite."""
    if args.resume or (args.auto_resume and ckpt_path.is_file()):
        ckpt = load_checkpoint(ckpt_path)
        if "optimizer" not in ckpt:
            raise SystemExit(f"error: cannot resume from {ckpt_path}: it holds no optimizer state (a "
                             f"sampling-only checkpoint, made by --export); use it with --sample-only")
        return ckpt
    if ckpt_path.is_file() and not args.overwrite:
        raise SystemExit(f"error: {ckpt_path.parent} already holds a training run ({ckpt_path}). "
                         f"Continue it with --resume, start over with --overwrite, or choose another --out")
    return None


def restore(ckpt: dict, config: dict, model: UNet, ema: UNet, optimizer, run: dict, ckpt_path: Path,
            device: torch.device) -> None:
    """Load a checkpoint's weights, optimizer, step counters and RNG states into this run."""
    if ckpt["config"] != config:
        raise SystemExit(f"error: cannot resume: {ckpt_path} holds {ckpt['config']}, "
                         f"but these flags give {config}")
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    run.update({key: ckpt.get(key, 0) for key in run})
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)


def rng_state(device: torch.device) -> dict:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def catch_stop_signals(world_size: int) -> list:
    """Ctrl-C (or SIGTERM, in one process): note it, and the loop saves and exits; a second one
    stops at once. Under torchrun a SIGTERM comes from its agent tearing the group down, often
    because a worker died: waiting for a dead peer would hang, so it stops at once, and
    --auto-resume continues from the last checkpoint when torchrun restarts the workers."""
    stop_signals = []

    def request_stop(signum, _frame):
        stop_signals.append(signum)
        signal.signal(signum, signal.SIG_DFL)

    for signum in (signal.SIGINT, signal.SIGTERM) if world_size == 1 else (signal.SIGINT,):
        signal.signal(signum, request_stop)
    return stop_signals


def stop_requested(stop_signals: list, step: int, world_size: int, device: torch.device) -> bool:
    """One process stops after the step in which the signal came. DDP ranks must stop together,
    so they compare flags every LOG_EVERY steps (one all_reduce)."""
    if world_size == 1:
        return bool(stop_signals)
    if step % LOG_EVERY:
        return False
    flag = torch.tensor(float(bool(stop_signals)), device=device)
    dist.all_reduce(flag)
    return bool(flag.item())


def open_log(path: Path, step: int, T: int):
    """log.csv, one row per LOG_EVERY steps. A fresh run starts it anew; a resumed one keeps the
    rows up to its checkpoint's step (later ones were lost with the process) and appends."""
    bands = [f"loss_t{T * b // LOSS_BANDS}-{T * (b + 1) // LOSS_BANDS - 1}" for b in range(LOSS_BANDS)]
    header = ",".join(["step", "epoch", "loss", "lr", "images_per_s", "elapsed_s", "skipped"] + bands)
    rows = path.read_text().splitlines()[1:] if step > 0 and path.is_file() else []
    rows = [row for row in rows if int(row.split(",")[0]) <= step]
    path.write_text("\n".join([header] + rows) + "\n")
    return open(path, "a")


def plot_log(csv_path: Path, png_path: Path) -> None:
    """loss.png: the loss, and the loss in each band of t, against the step (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"the training record is in {csv_path}; pip install matplotlib to get {png_path.name}")
        return
    header, *rows = [line.split(",") for line in csv_path.read_text().splitlines()]
    if not rows:
        return
    columns = {name: [float(row[i]) for row in rows] for i, name in enumerate(header)}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(columns["step"], columns["loss"], color="black", label="loss")
    for name in header[7:]:
        ax.plot(columns["step"], columns[name], linewidth=0.8, label=name.replace("loss_", ""))
    ax.set(xlabel="step", ylabel="L_simple (MSE of ε)", yscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def sample_images(ema: UNet, sched: Schedule, n: int, args, generator: torch.Generator,
                  frames: list | None = None, progress: bool = False) -> torch.Tensor:
    """n samples from the EMA network, as images in [0, 1]."""
    shape = (n, ema.conv_in.in_channels, ema.image_size, ema.image_size)
    with torch.autocast(sched.betas.device.type, torch.bfloat16, enabled=args.amp):
        x = sample(ema, sched, shape, args.sample_steps, eta=args.eta, skip=args.skip,
                   generator=generator, frames=frames, progress=progress)
    return (x.float() + 1) / 2


def sample_in_batches(ema: UNet, sched: Schedule, n: int, args, generator: torch.Generator,
                      frames: list | None = None) -> torch.Tensor:
    """n samples in batches of --batch-size (memory stays bounded), as [0, 1] images on the CPU.
    frames: filled from the first batch, for a GIF."""
    images = []
    for start in tqdm(range(0, n, args.batch_size), desc="batches", disable=n <= args.batch_size,
                      dynamic_ncols=True):
        images.append(sample_images(ema, sched, min(args.batch_size, n - start), args, generator,
                                    frames if start == 0 else None, progress=True).cpu())
    return torch.cat(images)


# ----------------------------------------------------------------------------- checkpoints and outputs

def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, flush it to disk, then rename it over the old checkpoint: a kill
    or a full disk at any moment leaves the previous checkpoint whole. Non-finite weights are
    refused: a checkpoint is always one that training can continue from."""
    weights = [v for key in ("model", "ema") if key in state for v in state[key].values()]
    if not all(torch.isfinite(v).all() for v in weights if v.is_floating_point()):
        raise SystemExit(f"error: the weights are NaN or inf: not overwriting {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # full disk, no permission, ...
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: could not write {path} ({e}); the previous checkpoint, if any, "
                         f"is intact") from None


def load_checkpoint(path: Path) -> dict:
    """Load tensors and plain data only (weights_only=True): a checkpoint can never run code.

    Everything lands on the CPU (RNG states must be CPU tensors); load_state_dict moves weights."""
    if not path.is_file():
        raise SystemExit(f"error: no checkpoint at {path} (train first, or pass --ckpt PATH)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(ckpt, dict) and {"ema", "config", "step"} <= ckpt.keys()
                and {"unet", "schedule", "timesteps", "dataset"} <= ckpt["config"].keys()):
            raise ValueError("missing its model weights or config")
        return ckpt
    except Exception as e:  # truncated zip, foreign pickle, ...: one line, no traceback
        reason = str(e).strip().splitlines()[0]
        raise SystemExit(f"error: cannot load checkpoint {path}: not a valid checkpoint of these "
                         f"scripts, or refused as unsafe ({type(e).__name__}: {reason})") from None


def load_ema(ckpt_path: Path, device: torch.device) -> tuple[UNet, dict]:
    """A checkpoint's EMA network, ready to sample, and its config."""
    ckpt = load_checkpoint(ckpt_path)
    try:
        ema = UNet(**ckpt["config"]["unet"]).to(device).eval()
        ema.load_state_dict({k: v.float() for k, v in ckpt["ema"].items()})
    except (TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: checkpoint {ckpt_path} does not fit its own config: "
                         f"{str(e).splitlines()[0]}") from None
    return ema, ckpt


def export(args) -> None:
    """A sampling-only copy of a checkpoint: EMA weights and config, no optimizer (a third the size)."""
    ckpt_path = Path(args.ckpt) if args.ckpt else Path(args.out) / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path)
    save_checkpoint(Path(args.export), {key: ckpt[key] for key in ("ema", "config", "step", "args")
                                        if key in ckpt})
    print(f"wrote {args.export}: the EMA weights of {ckpt_path} at step {ckpt['step']}")


def save_gif(frames: list[torch.Tensor], path: Path, n: int = 16) -> None:
    """The reverse process as an animation: one grid of the first n samples per recorded step."""
    pictures = []
    for x in frames:
        grid = make_grid((x[:n].float().clamp(-1, 1) + 1) / 2, nrow=math.ceil(math.sqrt(n)))
        pictures.append(to_pil_image(grid))
    durations = [60] * (len(pictures) - 1) + [2000]  # hold the final samples
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)


def sample_only(args, device: torch.device) -> None:
    """Load a checkpoint's EMA network and write args.n_samples samples (a grid, and PNGs if asked);
    or, with --invert / --interpolate / --consistency, their pictures instead."""
    ckpt_path = Path(args.ckpt) if args.ckpt else Path(args.out) / "ckpt.pt"
    ema, ckpt = load_ema(ckpt_path, device)
    config = ckpt["config"]
    sched = Schedule(config["timesteps"], config["schedule"], device)
    args.sample_steps = checked_sample_steps(args.sample_steps, sched.T)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.invert or args.interpolate or args.consistency:
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):  # as all sampling
            if args.invert:
                save_inversion(ema, sched, args, config["dataset"], out)
            if args.interpolate:
                save_interpolation(ema, sched, args, out)
            if args.consistency:
                save_consistency(ema, sched, args, out)
        return
    generator = torch.Generator(device).manual_seed(args.seed)
    start_time = time.perf_counter()
    images = sample_in_batches(ema, sched, args.n_samples, args, generator)
    seconds = time.perf_counter() - start_time
    print(f"sampled {len(images)} images in {seconds:.1f} s ({1000 * seconds / len(images):.0f} ms per image)")
    grid = images[:256]  # a grid bigger than 16×16 is too small to look at
    save_image(grid, out / "samples.png", nrow=math.ceil(math.sqrt(len(grid))))
    print(f"wrote {out / 'samples.png'}")
    if args.save_pngs:
        png_dir = Path(args.save_pngs)
        png_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            save_image(image, png_dir / f"{i:06d}.png")
        print(f"wrote {len(images)} PNGs to {png_dir}")


def random_latents(ema: UNet, n: int, seed: int) -> torch.Tensor:
    """n latents x_T ~ N(0, I) of the network's image shape, the same for the same seed."""
    device = ema.conv_in.weight.device
    shape = (n, ema.conv_in.in_channels, ema.image_size, ema.image_size)
    return torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(seed))


def save_consistency(ema: UNet, sched: Schedule, args, out: Path, n: int = 8) -> None:
    """One set of latents decoded with η = 0 in 10, 20, 50, 100 and 1000 steps (those ≤ T), a row
    each (Sec. 5.3): the latent, not the number of steps, decides what the image shows."""
    x_T = random_latents(ema, n, args.seed)
    steps = [s for s in (10, 20, 50, 100, 1000) if s <= sched.T]
    rows = [sample(ema, sched, x_T.shape, s, skip=args.skip, x_T=x_T, progress=True) for s in steps]
    save_image((torch.cat(rows) + 1) / 2, out / "consistency.png", nrow=n)
    print(f"wrote {out / 'consistency.png'}: rows of {', '.join(map(str, steps))} steps")


def save_inversion(ema: UNet, sched: Schedule, args, dataset: str, out: Path, n: int = 8) -> None:
    """n training images → x_T (invert) → images (η = 0): rows of originals, latents, reconstructions."""
    images, _, _ = load_dataset(dataset, args.data_dir, ema.image_size)
    x0 = to_model_range(images[:n].to(sched.betas.device), flip=False)
    latents = invert(ema, sched, x0, args.sample_steps, args.skip)
    recon = sample(ema, sched, x0.shape, args.sample_steps, skip=args.skip, x_T=latents)
    rows = torch.cat([(x0 + 1) / 2, latents / 4 + 0.5, (recon + 1) / 2])  # latents: ±2σ → [0, 1]
    save_image(rows, out / "inversion.png", nrow=n)
    mse = F.mse_loss(recon, x0).item()
    print(f"wrote {out / 'inversion.png'}; reconstruction MSE {mse:.5f} "
          f"(pixels in [-1, 1], {args.sample_steps} steps each way)")


def save_interpolation(ema: UNet, sched: Schedule, args, out: Path, pairs: int = 3, n: int = 10) -> None:
    """For each pair of random latents a, b: slerp(a, b, α) at n values of α from 0 to 1, decoded
    with η = 0, one row per pair (Sec. 5.3)."""
    a, b = random_latents(ema, 2 * pairs, args.seed).chunk(2)
    x_T = torch.stack([slerp(a, b, alpha) for alpha in torch.linspace(0, 1, n).tolist()], dim=1)
    x = sample(ema, sched, x_T.flatten(0, 1).shape, args.sample_steps, skip=args.skip,
               x_T=x_T.flatten(0, 1))
    save_image((x + 1) / 2, out / "interpolation.png", nrow=n)
    print(f"wrote {out / 'interpolation.png'}")


# ----------------------------------------------------------------------------- command line

def pick_device(name: str) -> torch.device:
    """auto: cuda, then mps, then cpu. A named device that is not there is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r} is not a device name (auto, cpu, cuda, cuda:N, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but this PyTorch sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {name} asked for, but MPS is not available here")
    return device


def bf16_is_native(device: torch.device) -> bool:
    """Whether bfloat16 autocast speeds this device up (rather than emulating bf16 slowly).

    On an AVX-512 BF16 CPU it trains the 28×28 network about 1.7× faster than float32. The CPU
    checks are private PyTorch helpers: where a version lacks them, the answer is no (float32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8  # Ampere and newer
    if device.type == "cpu":
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(check() for check in checks if check is not None)
    return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="mnist",
                   help="mnist, fashion, cifar10, or a folder of images (png, jpg, webp, bmp; searched recursively)")
    p.add_argument("--data-dir", default="./data", help="torchvision layout; downloads go here")
    p.add_argument("--image-size", type=int,
                   help="resize (and centre-crop to a square) to this size; default: the data's own")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flips; default: on for cifar10 and folders, off for mnist, fashion")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--epochs", type=int, help="default: 6 for mnist/fashion, 2000 for cifar10, ~360k images for a folder")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help="global, split over DDP processes")
    p.add_argument("--lr", type=float, help="peak learning rate; default 1e-3 (28×28), 2e-4 (cifar10)")
    p.add_argument("--warmup", type=int, help="linear warmup steps; default 200 (28×28), 5000 (cifar10)")
    p.add_argument("--preset", choices=PRESETS, help="U-Net size; default small (28×28), ddpm_cifar10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder; default runs/ddim")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    p.add_argument("--auto-resume", action="store_true",
                   help="continue from <out>/ckpt.pt if there is one, else start fresh (torchrun --max-restarts)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run even if <out> holds one (its checkpoint is replaced)")
    p.add_argument("--sample-only", action="store_true", help="no training: sample a checkpoint")
    p.add_argument("--ckpt", help="checkpoint for --sample-only; default <out>/ckpt.pt")
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--save-pngs", metavar="DIR", help="with --sample-only: one PNG per sample")
    p.add_argument("--export", metavar="PATH",
                   help="no training: write the EMA weights and config of --ckpt (default <out>/ckpt.pt) to PATH")
    p.add_argument("--sample-steps", type=int, help="sampler steps S, 1..T; default 50 (T if smaller)")
    p.add_argument("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    # η = 1 by default: on Fashion-MNIST, η = 0 left about one sample in five speckled after 2 epochs
    # of training (and a few after 6), η = 1 none; at 20 steps or fewer, η = 0 measured better.
    p.add_argument("--eta", type=float, default=1.0,
                   help="η in [0, 1]: 0 the paper's deterministic DDIM, 1 DDPM-like noise (eq. 16)")
    p.add_argument("--skip", choices=SKIPS, default="uniform",
                   help="the sampler's timesteps: from T-1 evenly (uniform) or denser at low noise "
                        "(quad); official-*: the DDIM code's grids")
    p.add_argument("--invert", action="store_true",
                   help="no training: invert 8 training images to x_T and back, write inversion.png")
    p.add_argument("--interpolate", action="store_true",
                   help="no training: decode slerps between latents, write interpolation.png")
    p.add_argument("--consistency", action="store_true",
                   help="no training: decode the same latents in 10..1000 steps, write consistency.png")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="bfloat16 autocast; default: on where bf16 is native (recent GPUs, AVX-512 BF16 CPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    args = p.parse_args(argv)
    for key, value in DATASET_DEFAULTS.get(args.dataset, DATASET_DEFAULTS["folder"]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or "runs/ddim"
    args.sample_only = args.sample_only or args.invert or args.interpolate or args.consistency
    for name in ("epochs", "batch_size", "n_samples", "timesteps", "warmup", "max_steps", "image_size", "sample_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        p.error("--lr must be positive")
    if not 0 <= args.eta <= 1:
        p.error("--eta must be in [0, 1]")
    if not args.sample_only:  # with --sample-only, T comes from the checkpoint: checked after loading
        args.sample_steps = checked_sample_steps(args.sample_steps, args.timesteps)
    if args.resume + args.auto_resume + args.overwrite > 1:
        p.error("choose one of --resume, --auto-resume and --overwrite")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = pick_device(args.device)
    if world_size > 1:  # started by torchrun: one process per GPU, or gloo on the CPU
        if args.sample_only or args.export:
            raise SystemExit("error: --sample-only and --export run in one process; start them without torchrun")
        if args.batch_size % world_size:
            raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by {world_size} processes")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(args.seed + rank)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer GPUs
    if args.amp is None:
        args.amp = bf16_is_native(device)
    if args.export:
        export(args)
    elif args.sample_only:
        sample_only(args, device)
    else:
        with lock_out_dir(Path(args.out)) if rank == 0 else contextlib.nullcontext():
            train(args, device, rank, world_size)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
