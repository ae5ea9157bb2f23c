"""Classifier-free guidance (Ho & Salimans 2022), in one file.

The idea: train one DDPM network ε_θ(x_t, t, c) on (image, class) pairs, but replace the class by
a "null" label ∅ for a random 10% of the samples (CFG Algorithm 1), so the same network learns both
the conditional ε(x_t, c) and the unconditional ε(x_t, ∅). Sampling then extrapolates from the
unconditional prediction past the conditional one, ε̃ = (1+w)·ε(x_t, c) − w·ε(x_t, ∅): the guidance
strength w trades diversity for samples that look more like their class, with no classifier.

    python cfg.py                                      # train on MNIST (downloads it), writes runs/cfg/
    python cfg.py --dataset fashion                    # Fashion-MNIST (uses Debian's copy when offline)
    python cfg.py --sample-only --class 3 --guidance 4 # 64 strongly guided samples of class 3
    python cfg.py --sample-only --sample-steps 1000    # the ancestral DDPM sampler instead of 50 DDIM steps
    torchrun --nproc_per_node=4 cfg.py --dataset cifar10   # several GPUs (DDP)

"CFG eq. N" and "CFG Algorithm N" are Ho & Salimans', "DDIM eq. N" is Song et al. 2020's; other
numbers are DDPM's (Ho et al. 2020), as in ddpm.py. Code timesteps t = 0..T-1 are DDPM's t = 1..T.
"""
import argparse
import copy
import gzip
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision import datasets
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from unet import PRESETS, UNet

# Training defaults per dataset (flags override): a CPU-friendly network for 28×28 images,
# and the paper's CIFAR-10 setup (lr 2e-4, 5000 warmup steps, 800k steps at batch 128).
DATASET_DEFAULTS = {
    "mnist": dict(preset="small", epochs=6, lr=1e-3, warmup=200),
    "fashion": dict(preset="small", epochs=6, lr=1e-3, warmup=200),
    "cifar10": dict(preset="ddpm_cifar10", epochs=2000, lr=2e-4, warmup=5000),
}
EMA_DECAY = 0.9999  # the paper's; warmed up as min(0.9999, (1+step)/(10+step)) so short runs work
LOG_EVERY = 10      # steps between loss read-outs (each one waits for the device)
CKPT_EVERY = 500    # steps between checkpoints, besides one per epoch, at the end and on Ctrl-C


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


def diffusion_loss(model, sched: Schedule, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_simple, eq. 14: ‖ε − ε_θ(x_t, t, y)‖² with t uniform over all T steps (0..T-1)."""
    t = torch.randint(0, sched.T, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    eps_pred = model(q_sample(sched, x0, t, noise), t, y)
    return F.mse_loss(eps_pred.float(), noise)


def drop_labels(y: torch.Tensor, p_uncond: float, null_label: int) -> torch.Tensor:
    """CFG Algorithm 1: each label independently becomes ∅ with probability p_uncond.

    Per sample, not per batch: every batch then trains the conditional and the unconditional model.
    """
    return torch.where(torch.rand(y.shape, device=y.device) < p_uncond, null_label, y)


# ----------------------------------------------------------------------------- guidance, samplers

def guided_eps(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: float,
               null_label: int) -> torch.Tensor:
    """CFG eq. 6: ε̃ = (1+w)·ε(x_t, c) − w·ε(x_t, ∅), w = guidance (0: the plain conditional model).

    Libraries such as diffusers use guidance_scale s = 1+w, ε̃ = ε(x_t, ∅) + s·(ε(x_t, c) − ε(x_t, ∅)).
    Both predictions come from one forward pass of a batch of 2B: [x, x] with labels [y, ∅].
    """
    if guidance == 0:  # ε̃ = ε(x_t, c): the unconditional half would be multiplied by 0
        return model(x, t, y).float()
    eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]),
                                 torch.cat([y, torch.full_like(y, null_label)])).float().chunk(2)
    return (1 + guidance) * eps_cond - guidance * eps_uncond


@torch.inference_mode()
def sample(model, sched: Schedule, shape: tuple[int, ...], y: torch.Tensor, *, guidance: float,
           null_label: int, variance: str = "beta", generator: torch.Generator | None = None,
           frames: list | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2, with the guided ε̃ of classes y in place of ε_θ.

    variance: σ_t² = β_t ("beta", the paper's CIFAR-10 choice) or β̃_t ("posterior"); the paper
    found both give similar samples. x̂0 is clipped to [−1, 1] and the step uses the posterior
    mean μ̃_t(x_t, x̂0) of eq. 7, which is Algorithm 2's mean with ε re-derived from the clipped x̂0.
    frames: if a list is given, x_t is appended to it (on the CPU) every T/50 steps, for a GIF.
    """
    device = sched.betas.device
    x = torch.randn(shape, device=device, generator=generator)
    sigma2 = {"beta": sched.betas, "posterior": sched.posterior_var}[variance]
    for t in tqdm(range(sched.T - 1, -1, -1), desc="sampling", disable=not progress, leave=False):
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = guided_eps(model, x, t_batch, y, guidance, null_label)
        alpha_bar, alpha_bar_prev = sched.alpha_bar[t], sched.alpha_bar_prev[t]
        x0_hat = ((x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()).clamp(-1, 1)  # eq. 15
        mean = (alpha_bar_prev.sqrt() * sched.betas[t] / (1 - alpha_bar) * x0_hat        # eq. 7
                + sched.alphas[t].sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar) * x)
        if t > 0:  # no noise is added at the last step
            mean = mean + sigma2[t].sqrt() * torch.randn(shape, device=device, generator=generator)
        x = mean
        if frames is not None and (t % max(1, sched.T // 50) == 0):
            frames.append(x.cpu())
    return x


@torch.inference_mode()
def sample_strided(model, sched: Schedule, shape: tuple[int, ...], y: torch.Tensor, *, guidance: float,
                   null_label: int, steps: int, generator: torch.Generator | None = None,
                   frames: list | None = None, progress: bool = False) -> torch.Tensor:
    """Deterministic sampling in `steps` < T steps: DDIM eq. 12 with σ = 0, on the guided ε̃.

    The grid is `steps` timesteps evenly spread from T−1 down to 0; the step after t = 0 goes to
    ᾱ = 1, i.e. returns x̂0. frames: as for sample(), about 50 of them.
    """
    device = sched.betas.device
    x = torch.randn(shape, device=device, generator=generator)
    grid = torch.linspace(sched.T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    for i, (t, t_prev) in enumerate(tqdm(list(zip(grid, grid[1:] + [-1])), desc="sampling",
                                         disable=not progress, leave=False)):
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = guided_eps(model, x, t_batch, y, guidance, null_label)
        alpha_bar = sched.alpha_bar[t]
        alpha_bar_prev = sched.alpha_bar[t_prev] if t_prev >= 0 else torch.ones_like(alpha_bar)
        x0_hat = ((x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()).clamp(-1, 1)  # eq. 15
        eps = (x - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()  # consistent with clipped x̂0
        x = alpha_bar_prev.sqrt() * x0_hat + (1 - alpha_bar_prev).sqrt() * eps  # DDIM eq. 12, σ = 0
        if frames is not None and (steps - 1 - i) % max(1, steps // 50) == 0:
            frames.append(x.cpu())
    return x


# ----------------------------------------------------------------------------- data

DATASETS = {"mnist": datasets.MNIST, "fashion": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


def load_dataset(name: str, data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split as uint8 images (N, C, H, W) and int64 labels, kept whole in memory."""
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
    return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.long)


def to_model_range(images: torch.Tensor, flip: bool) -> torch.Tensor:
    """uint8 [0, 255] → float [−1, 1]; random horizontal flips when asked (CIFAR-10)."""
    x = images.float() / 127.5 - 1
    if flip:
        x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x


# ----------------------------------------------------------------------------- training

def sample_images(ema: UNet, sched: Schedule, y: torch.Tensor, guidance: float, args,
                  generator: torch.Generator, frames: list | None = None,
                  progress: bool = False) -> torch.Tensor:
    """Samples of classes y from the EMA network, guided with strength w, as images in [0, 1].

    --sample-steps T runs the ancestral sampler, fewer steps the strided deterministic one.
    """
    shape = (len(y), ema.conv_in.in_channels, ema.image_size, ema.image_size)
    y = y.to(sched.betas.device)
    common = dict(guidance=guidance, null_label=ema.num_classes, generator=generator, frames=frames,
                  progress=progress)
    with torch.autocast(sched.betas.device.type, torch.bfloat16, enabled=args.amp):
        if args.sample_steps >= sched.T:
            x = sample(ema, sched, shape, y, variance=args.variance, **common)
        else:
            x = sample_strided(ema, sched, shape, y, steps=args.sample_steps, **common)
    return (x.float() + 1) / 2


def check_class(class_label: int | None, num_classes: int) -> None:
    """--class must name one of the classes the data (or the checkpoint) has."""
    if class_label is not None and not 0 <= class_label < num_classes:
        raise SystemExit(f"error: --class {class_label}: the model knows classes 0..{num_classes - 1}")


def grid_labels(n: int, num_classes: int, class_label: int | None) -> torch.Tensor:
    """Labels for n samples: all --class K, or by default the classes 0, 1, ... in turn."""
    return torch.full((n,), class_label) if class_label is not None else torch.arange(n) % num_classes


def grid_width(n: int, num_classes: int, class_label: int | None) -> int:
    """Images per grid row: one column per class, or a square grid of --class K."""
    return math.ceil(math.sqrt(n)) if class_label is not None else num_classes


def train(args, device: torch.device, rank: int, world_size: int) -> None:
    if rank != 0:
        dist.barrier()  # let rank 0 download the data first
    images, labels = load_dataset(args.dataset, args.data_dir)
    if world_size > 1 and rank == 0:
        dist.barrier()
    num_classes = int(labels.max()) + 1  # from the data; the U-Net adds ∅ as label num_classes
    check_class(args.class_label, num_classes)
    images, labels = images.to(device), labels.to(device)
    config = dict(unet=dict(image_channels=images.shape[1], image_size=images.shape[2],
                            **PRESETS[args.preset], num_classes=num_classes),
                  schedule=args.schedule, timesteps=args.timesteps, dataset=args.dataset)
    sched = Schedule(args.timesteps, args.schedule, device)
    # channels_last speeds up convolutions on GPUs (tensor cores); on CPUs it measured slower.
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = UNet(**config["unet"]).to(device, memory_format=memory_format)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0,
                                  fused=device.type == "cuda")
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    step = 0
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["config"] != config:
            raise SystemExit(f"error: cannot resume: {ckpt_path} holds {ckpt['config']}, "
                             f"but these flags give {config}")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        if world_size > 1:  # each rank needs its own noise; exact replay holds for one process
            torch.manual_seed(args.seed + rank + step)
    train_model = DistributedDataParallel(model) if world_size > 1 else model
    if args.compile:
        train_model = torch.compile(train_model)

    local_batch = args.batch_size // world_size
    steps_per_epoch = len(images) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: --batch-size {args.batch_size} is larger than the dataset ({len(images)} images)")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    sample_generator = torch.Generator(device)  # fixed noise: grids are comparable across epochs

    def save() -> None:
        if rank == 0:
            rng = {"cpu": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            save_checkpoint(ckpt_path, dict(model=model.state_dict(), ema=ema.state_dict(),
                                            optimizer=optimizer.state_dict(), step=step,
                                            config=config, args=vars(args), rng=rng))

    def save_grid(name: str, n: int, frames: list | None = None) -> None:
        if rank == 0:
            grid = sample_images(ema, sched, grid_labels(n, num_classes, args.class_label), args.guidance,
                                 args, sample_generator.manual_seed(args.seed), frames, progress=True)
            save_image(grid, out / name, nrow=grid_width(n, num_classes, args.class_label))

    stop_signals = []  # Ctrl-C or SIGTERM: finish the step, save, and exit

    def request_stop(signum, _frame):
        stop_signals.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second one stops at once

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.dataset}: {len(images)} images {tuple(images.shape[1:])}, "
              f"{n_params / 1e6:.2f}M parameters, {total_steps} steps of batch {args.batch_size} "
              f"on {device} × {world_size}")
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    loss_sum, timer_start, timer_step = torch.zeros((), device=device), time.perf_counter(), step
    order_epoch = None
    while step < total_steps:
        epoch, index_in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # depends only on (seed, epoch): a resumed run sees the same batches
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed + epoch))
            order_epoch = epoch
        batch_index = order[index_in_epoch * args.batch_size:][:args.batch_size]
        local_index = batch_index[rank * local_batch:(rank + 1) * local_batch].to(device)
        x0 = to_model_range(images[local_index], flip=args.dataset == "cifar10")
        y = drop_labels(labels[local_index], args.p_uncond, num_classes)

        for group in optimizer.param_groups:  # linear warmup
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            loss = diffusion_loss(train_model, sched, x0, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        step += 1
        loss_sum += loss.detach()
        bar.update(1)

        if step % LOG_EVERY == 0 or step == total_steps:
            stopping = torch.tensor(float(bool(stop_signals)), device=device)
            if world_size > 1:
                dist.all_reduce(stopping)
                dist.all_reduce(loss_sum)
            elapsed = time.perf_counter() - timer_start
            images_per_s = (step - timer_step) * args.batch_size / elapsed
            bar.set_postfix(loss=f"{loss_sum.item() / world_size / (step - timer_step):.4f}",
                            img_per_s=f"{images_per_s:.0f}")
            loss_sum.zero_()
            timer_start, timer_step = time.perf_counter(), step
            if stopping.item():
                save()
                bar.close()
                print(f"stopped at step {step}; saved {ckpt_path}; continue with --resume")
                return
        if step % CKPT_EVERY == 0:
            save()
        if step % steps_per_epoch == 0 and step < total_steps:
            save()
            sampling_start = time.perf_counter()
            save_grid(f"samples_epoch{step // steps_per_epoch}.png", 16)
            timer_start += time.perf_counter() - sampling_start  # sampling is not training time
    bar.close()
    save()
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C during sampling stops at once
        signal.signal(signum, signal.SIG_DFL)
    frames = []
    save_grid("samples.png", args.n_samples, frames)
    if rank == 0:
        save_gif(frames, out / "reverse.gif")
        save_guidance_sweep(ema, sched, args, out / "guidance_sweep.png")
        print(f"wrote {ckpt_path}, {out / 'samples.png'}, {out / 'reverse.gif'} and "
              f"{out / 'guidance_sweep.png'}")


# ----------------------------------------------------------------------------- checkpoints and outputs

def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename: a kill during the save leaves the old checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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


def save_gif(frames: list[torch.Tensor], path: Path, n: int = 16) -> None:
    """The reverse process as an animation: one grid of the first n samples per recorded step."""
    pictures = []
    for x in frames:
        grid = make_grid((x[:n].float().clamp(-1, 1) + 1) / 2, nrow=math.ceil(math.sqrt(n)))
        pictures.append(to_pil_image(grid))
    durations = [60] * (len(pictures) - 1) + [2000]  # hold the final samples
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)


GUIDANCE_SWEEP = (0.0, 0.5, 1.0, 2.0, 4.0)


def save_guidance_sweep(ema: UNet, sched: Schedule, args, path: Path, per_class: int = 3) -> None:
    """One row per w of GUIDANCE_SWEEP: per_class samples of each class side by side (or
    per_class · num_classes samples of --class K), so diversity within a class can be seen.

    The generator is reseeded for every row, so all rows start from the same noise (and the
    ancestral sampler draws the same noise at every step): the rows differ only in w.
    """
    n = per_class * ema.num_classes
    y = (torch.arange(ema.num_classes).repeat_interleave(per_class) if args.class_label is None
         else torch.full((n,), args.class_label))
    generator = torch.Generator(sched.betas.device)
    rows = [sample_images(ema, sched, y, w, args, generator.manual_seed(args.seed)) for w in GUIDANCE_SWEEP]
    save_image(torch.cat(rows), path, nrow=len(y))


def sample_only(args, device: torch.device) -> None:
    """Load a checkpoint's EMA network and write args.n_samples samples: a grid, and PNGs if asked."""
    ckpt_path = Path(args.ckpt) if args.ckpt else Path(args.out) / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt["config"]
    num_classes = config["unet"].get("num_classes")
    if not num_classes:
        raise SystemExit(f"error: {ckpt_path} holds an unconditional model (its config has no "
                         f"num_classes; ddpm.py and ddim.py write such checkpoints): guided sampling "
                         f"needs one trained by cfg.py")
    check_class(args.class_label, num_classes)
    try:
        ema = UNet(**config["unet"]).to(device).eval()
        ema.load_state_dict(ckpt["ema"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: checkpoint {ckpt_path} does not fit its own config: "
                         f"{str(e).splitlines()[0]}") from None
    sched = Schedule(config["timesteps"], config["schedule"], device)
    generator = torch.Generator(device).manual_seed(args.seed)
    labels = grid_labels(args.n_samples, num_classes, args.class_label)
    images, start_time = [], time.perf_counter()
    for start in tqdm(range(0, args.n_samples, args.batch_size), desc="batches", dynamic_ncols=True):
        y = labels[start:start + args.batch_size]
        images.append(sample_images(ema, sched, y, args.guidance, args, generator, progress=True).cpu())
    images = torch.cat(images)
    seconds = time.perf_counter() - start_time
    print(f"sampled {len(images)} images in {seconds:.1f} s ({1000 * seconds / len(images):.0f} ms per image)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = images[:256]  # a grid bigger than 16×16 is too small to look at
    save_image(grid, out / "samples.png", nrow=grid_width(len(grid), num_classes, args.class_label))
    save_guidance_sweep(ema, sched, args, out / "guidance_sweep.png")
    print(f"wrote {out / 'samples.png'} and {out / 'guidance_sweep.png'}")
    if args.save_pngs:
        png_dir = Path(args.save_pngs)
        png_dir.mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            save_image(image, png_dir / f"class{label}_{i:06d}.png")
        print(f"wrote {len(images)} PNGs to {png_dir}")


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

    On an AVX-512 BF16 CPU it trains the 28×28 network about 1.7× faster than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    p.add_argument("--data-dir", default="./data", help="torchvision layout; downloads go here")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--epochs", type=int, help="default: 6 for 28×28 data, 2000 for cifar10")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help="global, split over DDP processes")
    p.add_argument("--lr", type=float, help="peak learning rate; default 1e-3 (28×28), 2e-4 (cifar10)")
    p.add_argument("--warmup", type=int, help="linear warmup steps; default 200 (28×28), 5000 (cifar10)")
    p.add_argument("--preset", choices=PRESETS, help="U-Net size; default small (28×28), ddpm_cifar10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder; default runs/cfg")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    p.add_argument("--sample-only", action="store_true", help="no training: sample a checkpoint")
    p.add_argument("--ckpt", help="checkpoint for --sample-only; default <out>/ckpt.pt")
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--save-pngs", metavar="DIR", help="with --sample-only: one PNG per sample")
    p.add_argument("--sample-steps", type=int, default=50,
                   help="T (or more): the ancestral DDPM sampler; fewer: deterministic DDIM steps")
    p.add_argument("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    p.add_argument("--variance", choices=["beta", "posterior"], default="beta",
                   help="sampler's σ_t²: β_t or the posterior's β̃_t")
    # Label dropout: the paper found p_uncond 0.1 or 0.2 best, 0.5 clearly worse.
    p.add_argument("--p-uncond", type=float, default=0.1, help="probability of training a label as ∅")
    # Guidance w = 2 makes the class of every sample unmistakable, which is what a grid is for; it
    # costs diversity. On ImageNet the paper's FID was best at small w (about 0.3) and its Inception
    # score highest at the largest w it tried (4): for FID, sample with --guidance 0.3.
    p.add_argument("--guidance", type=float, default=2.0,
                   help="guidance strength w of CFG eq. 6 (0: conditional model; diffusers' scale is 1+w)")
    p.add_argument("--class", dest="class_label", type=int, metavar="K",
                   help="sample class K only; default: one column of the grid per class")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="bfloat16 autocast; default: on where bf16 is native (recent GPUs, AVX-512 BF16 CPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    args = p.parse_args(argv)
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or "runs/cfg"
    for name in ("epochs", "batch_size", "n_samples", "timesteps", "warmup", "max_steps", "sample_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        p.error("--lr must be positive")
    if not 0 <= args.p_uncond <= 1:
        p.error("--p-uncond must be a probability, between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = pick_device(args.device)
    if world_size > 1:  # started by torchrun: one process per GPU, or gloo on the CPU
        if args.sample_only:
            raise SystemExit("error: --sample-only runs in one process; start it without torchrun")
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
    if args.sample_only:
        sample_only(args, device)
    else:
        train(args, device, rank, world_size)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
