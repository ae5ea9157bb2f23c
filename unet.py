"""The one network shared by ddpm.py, ddim.py and cfg.py: the U-Net of DDPM.

Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", appendix B) built it from PixelCNN++:
a U-Net of residual blocks with GroupNorm, the timestep fed to every residual block through a
sinusoidal embedding and an MLP, self-attention at chosen resolutions, and skip connections between
the down and up paths. Initialisation follows the paper's official code (diffusion_tf): variance
scaling (fan_avg, uniform) with scale 1 for every conv and linear layer, q, k and v each as a layer
of its own, and scale 1e-10 for the last layer of each residual branch and of the network. So every
residual branch starts at (practically) zero: each block starts as its skip path (the identity, or
a 1×1 convolution where the width changes), and the network at an output of zero. Optionally, as in
improved-diffusion (Nichol & Dhariwal 2021), the time embedding scales and shifts the normalised
activations instead of being added to them. For cfg.py the network can be class-conditional: a
label embedding, with one extra row for the "null" label, is added to the time embedding.

The network maps (x_t, t[, y]) to a tensor of x_t's shape: the predicted noise ε (for a folder, by
default v = √ᾱ_t ε − √(1−ᾱ_t) x0: the scripts' --prediction). Images are square, of any size
divisible by 2^(levels−1); attention is placed by level, not by pixel size.
"""
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# Three presets. Level l works at image_size / 2^l; the middle of the U-Net always has attention.
# "ddpm_cifar10" is the paper's CIFAR-10 network (35.7M parameters) as its official code builds it:
# additive time embedding, attention at level 1 (16×16 for 32×32 images), dropout 0.1, and the ε of
# that code's GroupNorm (tf.contrib's group_norm), 1e-6, where UNet's default is PyTorch's 1e-5.
# "small" (ours, for a laptop CPU at 28×28) keeps the paper's blocks, sinusoidal time embedding and
# initialisation, and changes width (32), depth (3 levels, 1 block each), dropout (none), attention
# (level 2: 7×7 at 28×28) and how the embedding enters a block (a scale and shift, not a sum).
# "small48" (ours, a folder's default) is "small" at width 48. Both keep ε = 1e-5, as they trained.
PRESETS: dict[str, dict] = {
    "small": dict(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(2,),
                  dropout=0.0, scale_shift=True),
    "ddpm_cifar10": dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                         attn_levels=(1,), dropout=0.1, scale_shift=False, norm_eps=1e-6),
}
PRESETS["small48"] = dict(PRESETS["small"], channels=48)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, shape (B, dim), as in the official DDPM code:
    [sin(t·f_i), cos(t·f_i)] with f_i = max_period^(−i/(half−1)), i = 0..half−1, so the
    frequencies run from 1 down to exactly 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / (half - 1))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """The paper's 32 groups; 8 where the width is not a multiple of 32 (small48's 48 and 144)."""
    return nn.GroupNorm(32 if channels % 32 == 0 else 8, channels)


def variance_scaling_(module: nn.Module, scale: float = 1.0, layers: int = 1) -> None:
    """The official code's init: weights ~ U(±√(3·scale / fan_avg)), fan_avg = (fan_in + fan_out)/2,
    biases zero. layers = 3 (qkv): each third of the output rows is drawn as a layer of its own."""
    for weight in module.weight.chunk(layers):
        nn.init.xavier_uniform_(weight, gain=math.sqrt(scale))
    nn.init.zeros_(module.bias)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, GroupNorm with time embedding → SiLU → dropout → conv; plus skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # One linear layer gives (scale, shift) or, as in the paper, a per-channel bias.
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        emb = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over all H·W positions, softmax(q·kᵀ/√C)·v, plus skip."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)  # q, k and v: three 1×1 layers in the official code
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        attended = F.scaled_dot_product_attention(q, k, v)  # scales the logits by 1/√C itself
        return x + self.proj(rearrange(attended, "b 1 (h w) c -> b c h w", h=x.shape[2]))


class Downsample(nn.Module):
    """3×3 conv with stride 2, padded as TensorFlow's "SAME" (one row/column, bottom and right)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, image_channels: int = 1, image_size: int = 28, channels: int = 32,
                 channel_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                 attn_levels: tuple[int, ...] = (2,), dropout: float = 0.0,
                 scale_shift: bool = True, norm_eps: float = 1e-5, num_classes: int | None = None):
        super().__init__()
        levels = len(channel_mult)
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image size {image_size} is not divisible by 2^{levels - 1}")
        self.image_size, self.num_classes = image_size, num_classes
        emb_dim = 4 * channels
        self.channels = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        # Row num_classes is the null label ∅ used by classifier-free guidance.
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        self.conv_in = nn.Conv2d(image_channels, channels, 3, padding=1)
        # Down path: stages, each ending in an activation for the up path (widths: skip_chs).
        self.down = nn.ModuleList()
        ch, skip_chs = channels, [channels]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                stage = [ResBlock(ch, channels * mult, emb_dim, dropout, scale_shift)]
                ch = channels * mult
                if level in attn_levels:
                    stage.append(Attention(ch))
                self.down.append(nn.ModuleList(stage))
                skip_chs.append(ch)
            if level != levels - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_chs.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout, scale_shift), Attention(ch),
                                  ResBlock(ch, ch, emb_dim, dropout, scale_shift)])
        # Up path: one more block per level than the down path, each starting from a concatenated
        # skip activation; the last block of each level but level 0 also upsamples.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for block in range(num_res_blocks + 1):
                in_ch = ch + skip_chs.pop()
                stage = [ResBlock(in_ch, channels * mult, emb_dim, dropout, scale_shift)]
                ch = channels * mult
                if level in attn_levels:
                    stage.append(Attention(ch))
                if level != 0 and block == num_res_blocks:
                    stage.append(Upsample(ch))
                self.up.append(nn.ModuleList(stage))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, image_channels, 3, padding=1)

        for module in self.modules():
            if isinstance(module, nn.GroupNorm):
                module.eps = norm_eps
        # The official init (the module's docstring); the label embedding keeps PyTorch's N(0, 1).
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                variance_scaling_(module)
        for module in self.modules():
            if isinstance(module, ResBlock):
                variance_scaling_(module.conv2, 1e-10)
            if isinstance(module, Attention):
                variance_scaling_(module.qkv, layers=3)
                variance_scaling_(module.proj, 1e-10)
        variance_scaling_(self.conv_out, 1e-10)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) x_t; t: (B,) integer timesteps; y: (B,) labels, num_classes = ∅."""
        emb = self.time_mlp(timestep_embedding(t, self.channels))
        if self.label_emb is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes)
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError("this U-Net is unconditional (num_classes=None) but got labels")

        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = run_stage(stage, h, emb)
            skips.append(h)
        h = run_stage(self.mid, h, emb)
        for stage in self.up:
            h = run_stage(stage, torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def run_stage(stage: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Apply a stage's layers in order; only residual blocks take the embedding."""
    for layer in stage:
        h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h
