"""A small offline sample-quality measure for 28×28 grayscale datasets (Fashion-MNIST, MNIST).

FID needs Inception-v3 weights, which need the internet and say little about 28×28 grayscale
images. The idea here is the same with a small network trained on the spot: a CNN classifier,
trained on the held-out t10k split, maps images to 128-d features; the Fréchet distance between
Gaussians fitted to the features of generated samples and of the real training split (all 60,000)
says how far the samples are from the data. For class-conditional samples, the classifier also
says how often a sample shows the class it was meant to show.

    python quality.py runs/ddpm/pngs --dataset fashion     # one line per folder of PNGs
    python quality.py --reference --dataset fashion        # real / blurred / noise, for scale

The classifier and the real-feature statistics are cached in ~/.cache/minimal-diffusion-quality/.
Distances are only comparable at the same number of samples (the estimate is biased upwards,
roughly as 1/n) and with the same cached classifier. From Python: `from quality import measure`.
"""
import argparse
import gzip
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

CACHE_DIR = Path.home() / ".cache" / "minimal-diffusion-quality"
# Where to look without --data-dir: Debian's dataset-fashion-mnist package, and the repo's ./data
DEFAULT_DATA_DIRS = {"fashion": ["/usr/share/datasets/fashion-mnist", "./data"], "mnist": ["./data"]}
TORCHVISION_NAMES = {"fashion": "FashionMNIST", "mnist": "MNIST"}  # <data-dir>/<name>/raw/
EPOCHS, BATCH, LR, SEED = 8, 64, 2e-3, 0  # LR is the peak of a one-cycle schedule
CACHE_VERSION = 1  # bump when the network or its training changes, so old caches are retrained

# ----------------------------------------------------------------------------- data


def read_idx(data_dir: str | None, dataset: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, 28, 28) and int64 labels of split 'train' or 't10k', from IDX files, plain
    or gzipped, in data_dir (default: DEFAULT_DATA_DIRS) or in its torchvision layout <Name>/raw."""
    name = TORCHVISION_NAMES[dataset]
    dirs = [data_dir] if data_dir else DEFAULT_DATA_DIRS[dataset]
    folders = [folder for d in dirs for folder in (Path(d), Path(d) / name / "raw")]

    def read(stem: str, header_bytes: int) -> np.ndarray:
        for path in [folder / file for folder in folders for file in (stem, stem + ".gz")]:
            if path.exists():
                data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
                return np.frombuffer(data, dtype=np.uint8, offset=header_bytes)
        raise SystemExit(f"error: no {stem}[.gz] in {' or '.join(map(str, folders))}")

    images = read(f"{split}-images-idx3-ubyte", 16).reshape(-1, 1, 28, 28)  # header: magic, n, h, w
    labels = read(f"{split}-labels-idx1-ubyte", 8)                          # header: magic, n
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [−1, 1], the classifier's input. Everything passes through here."""
    return images.float() / 127.5 - 1


# Fashion-MNIST's class names as cfg.py writes them into file names ("/" would make a folder)
FASHION_CLASSES = ["T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def read_pngs(folder: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PNGs of a --save-pngs folder as uint8 (N, 1, 28, 28), and their intended labels when
    every name is cfg.py's {class name}_{i:06d}.png of a Fashion-MNIST class (otherwise None)."""
    paths = sorted(Path(folder).glob("*.png"))
    if not paths:
        raise SystemExit(f"error: no PNG files in {folder}")
    # save_image writes gray as RGB with R = G = B; Pillow's "L" conversion gives that value back exactly
    images = np.stack([np.asarray(Image.open(p).convert("L")) for p in paths])
    if images.shape[1:] != (28, 28):
        raise SystemExit(f"error: {folder}: images are {images.shape[1]}×{images.shape[2]}, not 28×28")
    matches = [re.fullmatch(r"(.+)_\d+\.png", p.name) for p in paths]
    names = [m.group(1) if m else None for m in matches]
    if not set(names) <= set(FASHION_CLASSES):
        return torch.from_numpy(images)[:, None], None
    labels = torch.tensor([FASHION_CLASSES.index(name) for name in names])
    return torch.from_numpy(images)[:, None], labels

# ----------------------------------------------------------------------------- classifier


class Classifier(nn.Module):
    """Three conv blocks (28 → 14 → 7 → 3), a 128-d feature layer, a linear head over 10 classes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(*[layer for c_in, c_out in [(1, 32), (32, 64), (64, 64)] for layer in (
            nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))])
        self.fc = nn.Linear(64 * 3 * 3, 128)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))  # the 128-d features the distance uses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.inference_mode()
def run_classifier(model: Classifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 features (N, 128) and predicted classes (N,) of uint8 images, in batches."""
    model.eval()
    feats, preds = [], []
    for batch in images.split(1000):
        f = model.features(to_input(batch))
        feats.append(f.double())
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def gaussian(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (unbiased) of features (N, D), in float64."""
    return feats.mean(0), torch.cov(feats.T)


def train_classifier(dataset: str, data_dir: str) -> dict:
    """Train on t10k (seeded), check on train (never seen), and keep train's feature statistics."""
    torch.manual_seed(SEED)
    images, labels = read_idx(data_dir, dataset, "t10k")
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps = EPOCHS * -(-len(images) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)  # warm up, anneal
    gen = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(images), generator=gen).split(BATCH):
            loss = F.cross_entropy(model(to_input(images[idx])), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    train_seconds = time.perf_counter() - start
    real_images, real_labels = read_idx(data_dir, dataset, "train")
    feats, preds = run_classifier(model, real_images)
    accuracy = (preds == real_labels).double().mean().item()
    print(f"trained the {dataset} classifier on t10k ({len(images)} images, {EPOCHS} epochs) in "
          f"{train_seconds:.0f} s; accuracy on the unseen train split: {accuracy:.2%}")
    mu, sigma = gaussian(feats)
    return dict(version=CACHE_VERSION, dataset=dataset, state_dict=model.state_dict(), mu=mu, sigma=sigma,
                accuracy=accuracy, n_real=len(real_images))


def load(dataset: str = "fashion", data_dir: str | None = None, cache: str | None = None) -> tuple[Classifier, dict]:
    """The classifier and the real statistics from the cache file; trained and cached on first use."""
    path = Path(cache) if cache else CACHE_DIR / f"{dataset}_classifier.pt"
    ckpt = torch.load(path, weights_only=True) if path.exists() else None
    if ckpt is not None and ckpt.get("dataset") != dataset:
        raise SystemExit(f"error: {path} holds a classifier for {ckpt.get('dataset')}, not {dataset}")
    if ckpt is None or ckpt["version"] != CACHE_VERSION:
        ckpt = train_classifier(dataset, data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path)
        print(f"cached it in {path}")
    model = Classifier()
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt

# ----------------------------------------------------------------------------- the measure


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½), in float64. tr((Σ1 Σ2)^½) is computed as
    tr((Σ1^½ Σ2 Σ1^½)^½), the same eigenvalues but of a symmetric PSD matrix, so eigh is exact enough
    (tiny negative eigenvalues from rounding are clipped to 0)."""
    evals, evecs = torch.linalg.eigh(s1)
    sqrt_s1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt_s1 @ s2 @ sqrt_s1).clamp(min=0).sqrt().sum()
    return max(((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross).item(), 0.0)


def measure(images: torch.Tensor | np.ndarray, labels: torch.Tensor | None = None, *, dataset: str = "fashion",
            data_dir: str | None = None, cache: str | None = None) -> dict:
    """Quality of samples (N, 28, 28) or (N, 1, 28, 28): uint8 in [0, 255], or float in [0, 1] (what
    the samplers return; quantized like save_image, so a PNG folder and its tensor score the same).
    Returns n, the Fréchet distance to the real train split, and with labels (the intended classes)
    the fraction classified as intended, overall and per class."""
    images = torch.as_tensor(images)
    if images.is_floating_point():
        if images.min() < -0.05:
            raise ValueError("float images must be in [0, 1]; from [-1, 1] pass (x + 1) / 2")
        images = images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    images = images.reshape(-1, 1, 28, 28)
    if len(images) < 2:
        raise ValueError("need at least 2 samples for a covariance (and far more for a useful distance)")
    model, ref = load(dataset, data_dir, cache)
    feats, preds = run_classifier(model, images)
    mu, sigma = gaussian(feats)
    result = dict(n=len(images), fd=frechet_distance(mu, sigma, ref["mu"], ref["sigma"]))
    if labels is not None:
        labels = torch.as_tensor(labels)
        hit = (preds == labels).double()
        result["label_acc"] = hit.mean().item()
        result["label_acc_per_class"] = {c: hit[labels == c].mean().item() for c in labels.unique().tolist()}
    return result


def describe(name: str, r: dict) -> str:
    """One line for a result of measure()."""
    line = f"{name}: n {r['n']}, Fréchet distance {r['fd']:.2f}"
    if "label_acc" in r:
        per_class = " ".join(f"{c}:{a:.2f}" for c, a in r["label_acc_per_class"].items())
        line += f", label accuracy {r['label_acc']:.1%} (per class {per_class})"
    return line


def reference(args) -> None:
    """Distances of 1,000 real test images (which the classifier trained on), 1,000 unseen real
    train images, the latter blurred by a 3×3 box filter, and 1,000 images of uniform noise."""
    common = dict(dataset=args.dataset, data_dir=args.data_dir, cache=args.cache)
    load(**common)  # train first, so the timings below are of measuring alone
    gen = torch.Generator().manual_seed(SEED)
    test, test_labels = read_idx(args.data_dir, args.dataset, "t10k")
    train, train_labels = read_idx(args.data_dir, args.dataset, "train")
    i, j = torch.randperm(len(test), generator=gen)[:1000], torch.randperm(len(train), generator=gen)[:1000]
    blurred = F.avg_pool2d(train[j].float(), 3, stride=1, padding=1, count_include_pad=False)
    cases = [("real test images (seen in training)", test[i], test_labels[i]),
             ("real train images (unseen)", train[j], train_labels[j]),
             ("same, 3×3 box blur", blurred.round().to(torch.uint8), train_labels[j]),
             ("uniform noise", torch.randint(0, 256, (1000, 1, 28, 28), dtype=torch.uint8, generator=gen), None)]
    for name, images, labels in cases:
        start = time.perf_counter()
        r = measure(images, labels, **common)
        print(f"{describe(name, r)}  [{time.perf_counter() - start:.2f} s]")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", metavar="DIR", help="folders of PNGs written by --save-pngs")
    p.add_argument("--dataset", default="fashion", choices=sorted(TORCHVISION_NAMES))
    p.add_argument("--data-dir", help="IDX files, plain or in torchvision's <Name>/raw layout "
                   "(default: /usr/share/datasets/fashion-mnist or ./data for fashion, ./data for mnist)")
    p.add_argument("--cache", help=f"classifier file (default {CACHE_DIR}/<dataset>_classifier.pt)")
    p.add_argument("--reference", action="store_true", help="distances of real, blurred and noise images")
    args = p.parse_args()
    if not args.dirs and not args.reference:
        p.error("give folders of PNGs, or --reference")
    if args.reference:
        reference(args)
    for folder in args.dirs:
        start = time.perf_counter()
        images, labels = read_pngs(folder)
        r = measure(images, labels, dataset=args.dataset, data_dir=args.data_dir, cache=args.cache)
        print(f"{describe(folder, r)}  [{time.perf_counter() - start:.2f} s]")
