"""Benchmark: training and sampling speed of this repo's U-Net, and of diffusers' when installed.

    python bench.py                       # 28×28 preset, batch 128, auto device and precision
    python bench.py --precision float32   # or bfloat16, float16 (autocast, as in the scripts)
    python bench.py --preset ddpm_cifar10 --device cuda --compile
    python bench.py --check               # the prepared GPU check: runs/gpu_check.md

Prints, for one preset and device: training images/s (the full step of the scripts: loss,
backward, gradient clipping, AdamW, EMA), sampling images/s for DDPM-1000, DDIM-50 and guided
CFG-50, peak memory (on the CPU the process's peak so far, so shown for the first model only),
and the achieved model FLOP/s (FLOPs counted by PyTorch's FlopCounterMode) as a fraction of
the device's dense-matmul FLOP/s measured in the same run, so the ratio holds on a noisy machine.
Sampling is timed over a few steps and scaled to the full step count: every step of a sampler
costs the same. If `diffusers` is installed, its UNet2DModel, configured to the same
width, depth and attention, is measured the same way.

`--check`, for whoever has a CUDA GPU for a few minutes: test_all.py's CUDA tests, then the
training speed of every preset in bfloat16 and float16 at batch 128, as a table (images/s,
utilization, peak memory, and the hours the DDPM paper's 800k CIFAR-10 steps would take), each row
printed and appended to runs/gpu_check.md as it comes. Synthetic data, no download.
`--check --dry-run` runs the same code on the CPU at toy sizes, without the CUDA tests: the test
suite runs it, so the check cannot rot.
"""
import argparse
import importlib.util
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import cfg
import ddim
import ddpm
from unet import PRESETS, UNet

# The (channels, size) of the images each preset is for.
IMAGE_SHAPES = {"small": (1, 28), "small48": (3, 32), "ddpm_cifar10": (3, 32)}
PAPER_CIFAR10_STEPS, PAPER_BATCH = 800_000, 128  # Ho et al., appendix B


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds_per_call(fn, device: torch.device, min_seconds: float, warmup: int = 2) -> float:
    """Mean seconds per call of fn, over as many calls as fit in min_seconds (at least 3)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    synchronize(device)
    return (time.perf_counter() - start) / calls


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, min_seconds: float,
                            n: int = 0) -> float:
    """The device's dense-matmul throughput: the yardstick for the U-Net's utilization."""
    n = n or (4096 if device.type == "cuda" else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / seconds_per_call(lambda: a @ b, device, min_seconds)


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel behind this repo's call signature model(x, t[, y])."""

    def __init__(self, image_channels: int, image_size: int, preset: dict, num_classes: int | None):
        super().__init__()
        from diffusers import UNet2DModel
        attention = [level in preset["attn_levels"] for level in range(len(preset["channel_mult"]))]
        self.net = UNet2DModel(
            sample_size=image_size, in_channels=image_channels, out_channels=image_channels,
            block_out_channels=[preset["channels"] * m for m in preset["channel_mult"]],
            layers_per_block=preset["num_res_blocks"], dropout=preset["dropout"],
            down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            attention_head_dim=preset["channels"] * preset["channel_mult"][-1],
            norm_num_groups=min(32, preset["channels"]),
            resnet_time_scale_shift="scale_shift" if preset["scale_shift"] else "default",
            num_class_embeds=num_classes + 1 if num_classes else None)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, t, class_labels=y).sample


def measure(name: str, make_model, args, device: torch.device, matmul_flops: float, first: bool,
            sampling_too: bool = True, image_shape: tuple[int, int] | None = None) -> dict:
    channels, size = image_shape or IMAGE_SHAPES[args.preset]
    batch = args.batch_size
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = make_model(None).to(device, memory_format=memory_format)
    ema = make_model(None).to(device, memory_format=memory_format).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "float16")
    train_model = torch.compile(model) if args.compile else model
    sched = ddpm.Schedule(1000, "linear", device)
    x0 = torch.randn(batch, channels, size, size, device=device).clamp(-1, 1)
    x0 = x0.contiguous(memory_format=memory_format)

    def train_step():  # the scripts' training step: loss, backward, clipping, AdamW, EMA
        loss_of = lambda: ddpm.diffusion_loss(train_model, sched, x0)  # noqa: E731
        ddpm.train_step(train_model, ema, optimizer, scaler, loss_of, 10**6, 1e-4, args.precision)

    with FlopCounterMode(display=False) as counter:
        ddpm.diffusion_loss(model, sched, x0).backward()
    train_flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_seconds = seconds_per_call(train_step, device, args.seconds)
    result = {"name": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
              "train_img_s": batch / train_seconds,
              "train_util": train_flops / train_seconds / matmul_flops}
    if device.type == "cuda":
        result["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    elif first:
        # The process's peak resident memory so far (Linux: KiB): valid for the first model only.
        result["peak_mem_GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if not sampling_too:
        return result

    def sampling(sampler, steps_timed: int, steps_full: int) -> float:
        """Images/s of a full sampling run, from timing steps_timed of its steps."""
        def run():
            dtype = getattr(torch, args.precision)
            with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                sampler()
        return batch / (seconds_per_call(run, device, args.seconds, warmup=1)
                        / steps_timed * steps_full)

    shape = (batch, channels, size, size)
    timed = args.timed_steps
    result["ddpm1000_img_s"] = sampling(
        lambda: ddpm.sample(ema, ddpm.Schedule(timed, "linear", device), shape), timed, 1000)
    result["ddim50_img_s"] = sampling(
        lambda: ddim.sample(ema, sched, shape, timed, eta=1.0), timed, 50)
    if name.startswith("this repo"):  # guided sampling needs this repo's class-conditional U-Net
        cond = make_model(10).to(device, memory_format=memory_format).eval()
        labels = torch.arange(batch, device=device) % 10
        guided = lambda x, t: cfg.guided_eps(cond, x, t, labels, 2.0, 10)  # noqa: E731
        result["cfg50_img_s"] = sampling(
            lambda: cfg.sample(guided, sched, shape, timed, eta=1.0), timed, 50)
        forward_2b = seconds_per_call(
            lambda: forward_only(cond, 2 * batch, shape, device, args.precision),
            device, args.seconds)
        result["cfg_step_over_2b_forward"] = batch / result["cfg50_img_s"] / 50 / forward_2b
    if device.type == "cuda":  # sampling's peak too
        result["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


@torch.inference_mode()
def forward_only(model, n: int, shape: tuple, device: torch.device, precision: str) -> None:
    x = torch.randn(n, *shape[1:], device=device)
    with torch.autocast(device.type, getattr(torch, precision), enabled=precision != "float32"):
        model(x, torch.randint(0, 1000, (n,), device=device))


def check(args) -> None:
    """--check: the CUDA tests, then a row per preset and low precision, printed and appended as
    it comes."""
    device = torch.device("cpu") if args.dry_run else ddpm.pick_device("cuda")
    out = Path(args.check_out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(line: str) -> None:
        print(line, flush=True)
        with open(out, "a") as f:
            f.write(line + "\n")
    machine = "the CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    write(f"\n## {machine}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}\n")
    if args.dry_run:
        write("CUDA tests: not run (a dry run)")
    else:
        # In their own process, so that a failure or hang there still leaves the speed rows below.
        try:
            tests = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "test_all.py"],
                capture_output=True, text=True, cwd=Path(__file__).parent, timeout=240)
            write(f"CUDA tests: {(tests.stdout.strip().splitlines() or ['no output'])[-1]}")
        except subprocess.TimeoutExpired:
            write("CUDA tests: not finished after 240 s")
    write(f"\n| preset | precision | batch | images/s | utilization | peak memory "
          f"| {PAPER_CIFAR10_STEPS:,} CIFAR-10 steps at batch {PAPER_BATCH} |\n"
          "|---|---|---|---|---|---|---|")
    for preset, settings in PRESETS.items():
        channels, size = IMAGE_SHAPES[preset]
        if args.dry_run:  # the same network at a toy width and size: seconds on a CPU, not minutes
            settings, size = {**settings, "channels": 8}, 8
        for precision in ("bfloat16", "float16"):
            row_args = argparse.Namespace(
                **{**vars(args), "preset": preset, "precision": precision})
            matmul = matmul_flops_per_second(device, getattr(torch, precision), args.seconds,
                                             64 * args.dry_run)
            r = measure("this repo", lambda k: UNet(channels, size, **settings, num_classes=k),
                        row_args, device, matmul, first=True, sampling_too=False,
                        image_shape=(channels, size))
            hours = PAPER_CIFAR10_STEPS * PAPER_BATCH / r["train_img_s"] / 3600
            paper_hours = f"{hours:.1f} h" if preset == "ddpm_cifar10" else "—"
            write(f"| {preset} | {precision} | {args.batch_size} | {r['train_img_s']:.0f} "
                  f"| {r['train_util']:.0%} | {r['peak_mem_GiB']:.2f} GiB | {paper_hours} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=5.0, help="minimum time per measurement")
    p.add_argument("--timed-steps", type=int, default=5, help="sampler steps timed per measurement")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"],
                   default="auto",
                   help="autocast as in the scripts; auto: bfloat16 where native, "
                        "float16 on other GPUs")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--check", action="store_true",
                   help="the prepared GPU check (CUDA tests, every preset)")
    p.add_argument("--dry-run", action="store_true", help="with --check: on the CPU, at toy sizes")
    p.add_argument("--check-out", default="runs/gpu_check.md",
                   help="where --check appends its rows")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    if args.check:
        if args.dry_run:  # the same code at toy sizes: a few seconds on a CPU
            args.batch_size, args.seconds = 2, 0.0
        args.channels_last = not args.dry_run
        return check(args)
    device = ddpm.pick_device(args.device)
    args.precision = ddpm.pick_precision(args.precision, device)
    matmul = matmul_flops_per_second(device, getattr(torch, args.precision), args.seconds)
    channels, size = IMAGE_SHAPES[args.preset]
    preset = PRESETS[args.preset]
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"preset {args.preset} ({channels}×{size}×{size}), batch {args.batch_size}, "
          f"{args.precision}, compile {args.compile}, channels_last {args.channels_last}")
    print(f"dense matmul: {matmul / 1e9:.1f} GFLOP/s")
    models = {"this repo (unet.py)": lambda k: UNet(channels, size, **preset, num_classes=k)}
    if importlib.util.find_spec("diffusers"):  # optional: only for the comparison
        models["diffusers UNet2DModel"] = lambda k: DiffusersUNet(channels, size, preset, k)
    else:
        print("diffusers is not installed: pip install diffusers to compare against UNet2DModel")
    rows = [measure(name, make, args, device, matmul, first=i == 0)
            for i, (name, make) in enumerate(models.items())]
    columns = ["params_M", "train_img_s", "train_util", "ddpm1000_img_s", "ddim50_img_s",
               "cfg50_img_s", "cfg_step_over_2b_forward", "peak_mem_GiB"]
    print(f"{'':24s}" + "".join(f"{c:>26s}" for c in columns))
    for row in rows:
        print(f"{row['name']:24s}" + "".join(
            f"{row[c]:26.3g}" if c in row else f"{'—':>26s}" for c in columns))


if __name__ == "__main__":
    main()
