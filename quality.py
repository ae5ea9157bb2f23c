"""A small offline sample-quality measure: for Fashion-MNIST, MNIST and any folder of images.

FID needs Inception-v3 weights, which need the internet and say little about small images. The idea
here is the same with a small network trained on the spot, which maps images to 128-d features; the
Fréchet distance between Gaussians fitted to the features of generated samples and of real images
says how far the samples are from the data.

Fashion-MNIST, MNIST: a CNN classifier trained on the held-out t10k split; the real images are the
whole training split (60,000). For class-conditional Fashion-MNIST samples (cfg.py's file names), it
also says how often a sample shows the class it was meant to show.

    python quality.py runs/ddpm/pngs --dataset fashion     # one line per folder of PNGs
    python quality.py --reference --dataset fashion        # real / blurred / noise, for scale

A folder of images, read as the training scripts read it (`--dataset path/to/folder`): a fifth of it
(at most 1,000 images) is held out; the network trains on the rest, as a classifier of the
first-level subfolders when there are at least two, otherwise to tell each image from all the others
under small random shifts (instance discrimination, which needs no labels): 12 s on one CPU core for
the 1,404 emoji of 32×32. The real images are the rest; the held-out ones are real images that the
network never saw, like samples; --reference measures at most as many images as are held out.

    python quality.py --reference --dataset data/emoji    # held-out real / blurred / noise; n 280
    python ddim.py --sample-only --out runs/emoji --n-samples 280 --save-pngs runs/emoji/pngs
    python quality.py runs/emoji/pngs --dataset data/emoji  # at the samples' image size

Networks and real-feature statistics are cached in ~/.cache/minimal-diffusion-quality/ (a folder's
are retrained when its file list changes). Distances are only comparable at the same number of
samples (the estimate is biased upwards, roughly as 1/n; --reference prints its n) and with the same
cached network, so a folder's numbers mean nothing next to another folder's. From Python:
`from quality import measure`.
"""
import argparse
import gzip
import hashlib
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ddpm import IMAGE_SUFFIXES, load_folder

CACHE_DIR = Path.home() / ".cache" / "minimal-diffusion-quality"
# Where to look without --data-dir: Debian's dataset-fashion-mnist package, and the repo's ./data
DEFAULT_DATA_DIRS = {"fashion": ["/usr/share/datasets/fashion-mnist", "./data"],
                     "mnist": ["./data"]}
TORCHVISION_NAMES = {"fashion": "FashionMNIST", "mnist": "MNIST"}  # <data-dir>/<name>/raw/
EPOCHS, BATCH, LR, SEED = 8, 64, 2e-3, 0  # LR is the peak of a one-cycle schedule
# On the emoji, 20 or 30 epochs memorized the images and told corruptions apart less.
FOLDER_EPOCHS = 10
# A folder's training images move by up to this many pixels: no one pixel tells them apart.
SHIFT = 2
# A folder's held-out part has at most MAX_HELD_OUT images; training uses at most MAX_TRAIN (time).
MAX_HELD_OUT, MAX_TRAIN = 1000, 5000
SIZE_MULTIPLE = 4  # the training scripts' default image size for a folder is a multiple of this
CACHE_VERSION = 1  # bump when the network or its training changes, so old caches are retrained

# ----------------------------------------------------------------------------- data


def read_idx(data_dir: str | None, dataset: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, 28, 28) and int64 labels of split 'train' or 't10k', from IDX files,
    plain or gzipped, in data_dir (default: DEFAULT_DATA_DIRS) or in its torchvision layout
    <Name>/raw."""
    name = TORCHVISION_NAMES[dataset]
    dirs = [data_dir] if data_dir else DEFAULT_DATA_DIRS[dataset]
    folders = [folder for d in dirs for folder in (Path(d), Path(d) / name / "raw")]

    def read(stem: str, header_bytes: int) -> np.ndarray:
        for path in [folder / file for folder in folders for file in (stem, stem + ".gz")]:
            if path.exists():
                data = (gzip.decompress(path.read_bytes()) if path.suffix == ".gz"
                        else path.read_bytes())
                return np.frombuffer(data, dtype=np.uint8, offset=header_bytes)
        raise SystemExit(f"error: no {stem}[.gz] in {' or '.join(map(str, folders))}")

    images = read(f"{split}-images-idx3-ubyte", 16).reshape(-1, 1, 28, 28)  # header: magic, n, h, w
    labels = read(f"{split}-labels-idx1-ubyte", 8)                          # header: magic, n
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [−1, 1], the classifier's input. Everything passes through here."""
    return images.float() / 127.5 - 1


# Fashion-MNIST's class names as cfg.py writes them into file names ("/" would make a folder)
FASHION_CLASSES = ["T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def read_pngs(folder: str) -> tuple[torch.Tensor, list[str | None]]:
    """The PNGs of a --save-pngs folder as uint8 (N, 3, H, W), and the class name of each when its
    file name is cfg.py's {class name}_{i:06d}.png (otherwise None)."""
    paths = sorted(Path(folder).glob("*.png"))
    if not paths:
        raise SystemExit(f"error: no PNG files in {folder}")
    # save_image writes gray as R = G = B.
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    if len({image.shape for image in images}) > 1:
        raise SystemExit(f"error: the PNGs in {folder} differ in size")
    matches = [re.fullmatch(r"(.+)_\d+\.png", p.name) for p in paths]
    names = [m.group(1) if m else None for m in matches]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), names


def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded indices of a folder's held-out part (a fifth, at most MAX_HELD_OUT) and the rest."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED))
    n_held_out = min(n // 5, MAX_HELD_OUT)
    return order[:n_held_out], order[n_held_out:]

# ----------------------------------------------------------------------------- classifier


class Classifier(nn.Module):
    """Three conv blocks (28 → 14 → 7 → 3 for Fashion-MNIST), a 128-d feature layer, a linear head
    (over classes, or for instance discrimination over the training images)."""

    def __init__(self, channels: int = 1, image_size: int = 28, num_outputs: int = 10):
        super().__init__()
        widths = [(channels, 32), (32, 64), (64, 64)]
        self.conv = nn.Sequential(*[layer for c_in, c_out in widths for layer in (
            nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.MaxPool2d(2))])
        self.fc = nn.Linear(64 * (image_size // 8) ** 2, 128)
        self.head = nn.Linear(128, num_outputs)

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


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """The batch moved by up to shift pixels each way (one draw a batch), edges repeated."""
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


def fit(model: Classifier, images: torch.Tensor, targets: torch.Tensor, epochs: int,
        shift: int = 0) -> float:
    """Cross-entropy with Adam and a one-cycle schedule, seeded; returns the seconds it took."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps = epochs * -(-len(images) // BATCH)
    # Warm up, then anneal.
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(images), generator=gen).split(BATCH):
            x = to_input(images[idx])
            loss = F.cross_entropy(model(random_shift(x, shift, gen) if shift else x), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return time.perf_counter() - start


def train_classifier(dataset: str, data_dir: str) -> dict:
    """Train on t10k (seeded), check on train (never seen), and keep train's feature statistics."""
    torch.manual_seed(SEED)
    images, labels = read_idx(data_dir, dataset, "t10k")
    model = Classifier()
    train_seconds = fit(model, images, labels, EPOCHS)
    real_images, real_labels = read_idx(data_dir, dataset, "train")
    feats, preds = run_classifier(model, real_images)
    accuracy = (preds == real_labels).double().mean().item()
    print(f"trained the {dataset} classifier on t10k ({len(images)} images, {EPOCHS} epochs) in "
          f"{train_seconds:.0f} s; accuracy on the unseen train split: {accuracy:.2%}")
    mu, sigma = gaussian(feats)
    return dict(version=CACHE_VERSION, dataset=dataset, state_dict=model.state_dict(), mu=mu,
                sigma=sigma, accuracy=accuracy, n_real=len(real_images))


def train_folder(root: Path, image_size: int) -> dict:
    """Train on the folder less its held-out part (seeded): a classifier of its subfolders when
    there are two or more, else instance discrimination (one output per image); keep the rest's
    feature statistics."""
    torch.manual_seed(SEED)
    images, labels, classes = load_folder(root, image_size, SIZE_MULTIPLE)
    held_out, rest = split(len(images))
    if len(classes) >= 2:
        # Files directly in root count in the statistics only.
        labelled = rest[labels[rest] >= 0][:MAX_TRAIN]
        train, targets, task = (images[labelled], labels[labelled],
                                f"a classifier of {len(classes)} classes")
    else:
        classes = []
        train, task = images[rest[:MAX_TRAIN]], "instance discrimination"
        targets = torch.arange(len(train))
    network = dict(channels=images.shape[1], image_size=image_size,
                   num_outputs=len(classes) or len(train))
    model = Classifier(**network)
    train_seconds = fit(model, train, targets, FOLDER_EPOCHS, SHIFT)
    line = (f"trained the feature network for {root}, {task}, on {len(train)} images of "
            f"{image_size}×{image_size} ({FOLDER_EPOCHS} epochs) in {train_seconds:.0f} s")
    if classes:
        preds = run_classifier(model, images[held_out])[1]
        line += ("; accuracy on the held-out images: "
                 f"{(preds == labels[held_out]).double().mean().item():.2%}")
    print(line)
    mu, sigma = gaussian(run_classifier(model, images[rest])[0])
    return dict(version=CACHE_VERSION, dataset=str(root.resolve()), network=network,
                classes=classes, state_dict=model.state_dict(), mu=mu, sigma=sigma,
                n_real=len(rest))


def folder_digest(root: Path, image_size: int) -> str:
    """A hash of the image size and the folder's file list (names, sizes, modification times)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    listing = [f"{p.relative_to(root)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha1("\n".join([str(image_size), *listing]).encode()).hexdigest()


def load(dataset: str = "fashion", data_dir: str | None = None, cache: str | None = None,
         image_size: int = 28) -> tuple[Classifier, dict]:
    """The network and the real statistics from the cache file; trained and cached on first use, and
    again when CACHE_VERSION or (for a folder) the folder's file list or the image size changed."""
    if dataset in TORCHVISION_NAMES:
        if image_size != 28:
            raise SystemExit(f"error: {dataset} images are 28×28, not {image_size}×{image_size}")
        name, digest, default = dataset, None, f"{dataset}_classifier.pt"
    else:
        name, digest = str(Path(dataset).resolve()), folder_digest(Path(dataset), image_size)
        default = (f"folder_{Path(name).name}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
                   f"_{image_size}px.pt")
    path = Path(cache) if cache else CACHE_DIR / default
    ckpt = torch.load(path, weights_only=True) if path.exists() else None
    if ckpt is not None and ckpt.get("dataset") != name:
        raise SystemExit(f"error: {path} holds a network for {ckpt.get('dataset')}, not {name}")
    if ckpt is None or ckpt["version"] != CACHE_VERSION or ckpt.get("files") != digest:
        if digest is None:
            ckpt = train_classifier(dataset, data_dir)
        else:
            ckpt = dict(train_folder(Path(dataset), image_size), files=digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path)
        print(f"cached it in {path}")
    model = Classifier(**ckpt.get("network", {}))
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt

# ----------------------------------------------------------------------------- the measure


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor,
                     s2: torch.Tensor) -> float:
    """‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½), in float64. tr((Σ1 Σ2)^½) is computed as
    tr((Σ1^½ Σ2 Σ1^½)^½), the same eigenvalues but of a symmetric PSD matrix, so eigh is exact
    enough (tiny negative eigenvalues from rounding are clipped to 0)."""
    evals, evecs = torch.linalg.eigh(s1)
    sqrt_s1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt_s1 @ s2 @ sqrt_s1).clamp(min=0).sqrt().sum()
    return max(((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross).item(), 0.0)


def measure(images: torch.Tensor | np.ndarray, labels: torch.Tensor | None = None, *,
            dataset: str = "fashion", data_dir: str | None = None,
            cache: str | None = None) -> dict:
    """Quality of samples (N, C, H, W) or gray (N, H, W): uint8 in [0, 255], or float in [0, 1]
    (what the samplers return; quantized like save_image, so a PNG folder and its tensor score the
    same). dataset: fashion or mnist (28×28), or a folder (measured at the samples' size). Returns
    n, the Fréchet distance to the real images, and with labels (the intended classes) the fraction
    classified as intended, overall and per class."""
    images = torch.as_tensor(images)
    if images.is_floating_point():
        if images.min() < -0.05:
            raise ValueError("float images must be in [0, 1]; from [-1, 1] pass (x + 1) / 2")
        images = images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    if images.ndim == 3:
        images = images[:, None]
    if len(images) < 2:
        raise ValueError("need at least 2 samples for a covariance "
                         "(and far more for a useful distance)")
    model, ref = load(dataset, data_dir, cache, images.shape[-1])
    # save_image writes gray as R = G = B.
    if images.shape[1] == 3 and model.conv[0].in_channels == 1:
        images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
    feats, preds = run_classifier(model, images)
    mu, sigma = gaussian(feats)
    result = dict(n=len(images), fd=frechet_distance(mu, sigma, ref["mu"], ref["sigma"]))
    if labels is not None:
        labels = torch.as_tensor(labels)
        hit = (preds == labels).double()
        result["label_acc"] = hit.mean().item()
        result["label_acc_per_class"] = {c: hit[labels == c].mean().item()
                                         for c in labels.unique().tolist()}
    return result


def describe(name: str, r: dict) -> str:
    """One line for a result of measure()."""
    line = f"{name}: n {r['n']}, Fréchet distance {r['fd']:.2f}"
    if "label_acc" in r:
        per_class = " ".join(f"{c}:{a:.2f}" for c, a in r["label_acc_per_class"].items())
        line += f", label accuracy {r['label_acc']:.1%} (per class {per_class})"
    return line


def reference_cases(
    dataset: str, data_dir: str | None, cache: str | None, n: int, image_size: int | None = None
) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(name, images, labels) of n real images, the same blurred by a 3×3 box filter, and uniform
    noise. Fashion-MNIST/MNIST: test images (which the classifier trained on) and unseen train
    images. A folder (at image_size, default as the training scripts choose it): images the network
    trained on and held-out images (unseen, like samples), at most as many as are held out."""
    gen = torch.Generator().manual_seed(SEED)
    if dataset in TORCHVISION_NAMES:
        # Train first: the timings of measure() are then of measuring alone.
        load(dataset, data_dir, cache)
        test, test_labels = read_idx(data_dir, dataset, "t10k")
        train, train_labels = read_idx(data_dir, dataset, "train")
        i, j = (torch.randperm(len(test), generator=gen)[:n],
                torch.randperm(len(train), generator=gen)[:n])
        cases = [("real test images (seen in training)", test[i], test_labels[i]),
                 ("real train images (unseen)", train[j], train_labels[j])]
    else:
        images, labels, _ = load_folder(Path(dataset), image_size, SIZE_MULTIPLE)
        classes = load(dataset, cache=cache, image_size=images.shape[-1])[1]["classes"]
        held_out, rest = split(len(images))
        n = min(n, len(held_out))
        cases = [(name, images[k], labels[k] if classes else None) for name, k in [
            ("real images the network trained on (and in the statistics)", rest[:n]),
            ("real images held out (unseen, like new samples)", held_out[:n])]]
    real, real_labels = cases[-1][1:]
    blurred = F.avg_pool2d(real.float(), 3, stride=1, padding=1, count_include_pad=False)
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=gen)
    return cases + [("same, 3×3 box blur", blurred.round().to(torch.uint8), real_labels),
                    ("uniform noise", noise, None)]


def reference(args) -> None:
    """The distances of reference_cases, args.n (default 1,000) images each."""
    cases = reference_cases(args.dataset, args.data_dir, args.cache, args.n or 1000,
                            args.image_size)
    n, size = len(cases[-1][1]), cases[-1][1].shape[-1]
    print(f"n = {n} images each, {size}×{size}: compare samples at the same n (--n-samples {n}, "
          f"or --n {n} here); the distance grows as n shrinks")
    for name, images, labels in cases:
        start = time.perf_counter()
        r = measure(images, labels, dataset=args.dataset, data_dir=args.data_dir, cache=args.cache)
        print(f"{describe(name, r)}  [{time.perf_counter() - start:.2f} s]")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", metavar="DIR", help="folders of PNGs written by --save-pngs")
    p.add_argument("--dataset", default="fashion",
                   help="fashion (default), mnist, or a folder of images")
    p.add_argument("--data-dir", help="IDX files, plain or in torchvision's <Name>/raw layout "
                   "(default: /usr/share/datasets/fashion-mnist or ./data for fashion, "
                   "./data for mnist)")
    p.add_argument("--cache", help=f"network file (default in {CACHE_DIR})")
    p.add_argument("--reference", action="store_true",
                   help="distances of real, blurred and noise images")
    p.add_argument("--n", type=int,
                   help="measure the first N PNGs of each DIR (default all); --reference: "
                   "N images each (default 1000; a folder: at most its held-out fifth)")
    p.add_argument("--image-size", type=int,
                   help="a folder's image size for --reference (default: as the "
                   "training scripts choose it); DIRs are measured at their own size")
    args = p.parse_args()
    if not args.dirs and not args.reference:
        p.error("give folders of PNGs, or --reference")
    if args.dataset not in TORCHVISION_NAMES and not Path(args.dataset).is_dir():
        p.error(f"--dataset {args.dataset}: neither fashion, mnist nor a folder")
    if args.reference:
        reference(args)
    for folder in args.dirs:
        start = time.perf_counter()
        images, names = read_pngs(folder)
        images, names = images[:args.n], names[:args.n]
        ref = load(args.dataset, args.data_dir, args.cache, images.shape[-1])[1]
        # cfg.py's file names give the intended classes.
        classes = ref.get("classes", FASHION_CLASSES)
        labels = (torch.tensor([classes.index(name) for name in names])
                  if set(names) <= set(classes) else None)
        r = measure(images, labels, dataset=args.dataset, data_dir=args.data_dir, cache=args.cache)
        print(f"{describe(folder, r)}  [{time.perf_counter() - start:.2f} s]")
