"""Lesson 04, the main job: train a diffusion model on images.

What you will learn
-------------------
Everything between "I have a UNet" and "I have a model that draws": the data pipeline, the training
objective, the tricks that make training stable (EMA, warmup, gradient clipping), mixed precision,
checkpoints that resume exactly, several GPUs, and an honest number for how good the samples are.

1. The objective (Ho et al. 2020, Algorithm 1). Draw x_0 from the data, t uniform in [0, T-1] and
   eps ~ N(0, I); form x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps; regress the network's
   output on a target. Three targets carry the same information (Salimans & Ho 2022, "v"):
       eps  (--pred eps):               x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)
       x_0  (--pred x0):                eps = (x_t - sqrt(alpha_bar) x_0) / sqrt(1 - alpha_bar)
       v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0  (--pred v, the default):
                                        x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v
                                        eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v
   With SNR = alpha_bar / (1 - alpha_bar), the three mean-squared errors differ only by a weight per
   t: ||x_0 - x_0_hat||^2 = ||eps - eps_hat||^2 / SNR, and ||v - v_hat||^2 = (1 + SNR) ||x_0 - x_0_hat||^2.
2. Loss weighting (--loss-weight min-snr, Hang et al. 2023): weight each t so the effective x_0 loss
   is min(SNR, gamma) ||x_0 - x_0_hat||^2 with gamma = 5: very clean t (huge SNR), which are easy and
   would dominate the x_0 view, stop stealing the gradient. For eps the weight is min(SNR, 5) / SNR,
   for v min(SNR, 5) / (SNR + 1), for x_0 min(SNR, 5).
   Our defaults, v with min-SNR, were chosen by measurement: after the same 800 steps on shapes, eps
   prediction without weighting drew blobs on tinted, grainy backgrounds, while v with min-SNR drew
   shapes on black (the README has both grids and their Frechet distances).
3. Optimisation: AdamW; the learning rate ramps up linearly over --warmup steps (Adam's second-moment
   estimates are poor at first); the gradient norm is clipped at 1; an exponential moving average of
   the weights, ema = decay * ema + (1 - decay) * w, is the model that samples. Its decay ramps up as
   min(decay, (1 + step) / (10 + step)) so a short run is not dominated by the random initial weights.
4. Sampling while training, from fixed noise so successive grids show progress. The sampler is
   deterministic DDIM (Song et al. 2021, taught in lesson 05):
       x_0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t),  x_s = sqrt(ab_s) x_0_hat + sqrt(1 - ab_s) eps
   over --sample-steps evenly spaced timesteps, from t = T-1 down to a last step that lands on x_0.
5. Measuring quality without downloading Inception: a small CNN classifier is trained on the same
   data for a few seconds; the Frechet distance (Heusel et al. 2017) between the Gaussians fitted to
   its penultimate features on generated and on held-out real images,
       FD = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_r^1/2 S_g S_r^1/2)^1/2),
   with real-against-real (two disjoint real sets of the same size) as the floor, is printed with the
   class histogram of the samples (a model that draws only circles has a bad histogram).

Mixed precision: on CUDA, bf16 autocast (and TF32 matmuls). On a CPU with bf16 units (AVX512-BF16 or
AMX) bf16 autocast pays too: on our 2-core test machine it trained this UNet 1.58x faster than
fp32 with the same loss curve, so `--precision auto` picks it wherever the CPU supports it. On an
H100 the same bench ran bf16 at 0.82x fp32's speed: a model this small waits on kernel launches there,
and autocast adds casts. Measure yours with --bench before choosing.

Run
---
    python 04_train.py                       # shapes, about 15 min on a 2-core CPU
    python 04_train.py --device cuda         # a GPU
    python 04_train.py --quick               # seconds: a smoke test
    python 04_train.py --bench 300           # fp32 against bf16 autocast: images/s and loss, no training run
    python 04_train.py --resume              # continue runs/04/ckpt.pt (same weights as never stopping)
    python 04_train.py --dataset mnist       # torchvision data, downloaded into --data-dir
    python 04_train.py --dataset folder --data-dir PATH   # your images, one sub-folder per class
    torchrun --nproc_per_node 2 04_train.py  # DistributedDataParallel: gloo on CPU, NCCL on CUDA

With torchrun, --batch-size is per process: the effective batch is batch-size x nproc_per_node, and
each process draws its batches from its own shard of the data (every nproc-th image). Only rank 0
prints and writes files.

It writes runs/04/ckpt.pt and figures/04_samples.png, 04_progress.png, 04_loss.png (the loss curve
and the loss binned by t), 04_x0_pred.png, and prints the quality table at the end.
"""

# %% Setup: imports, command line, device
import argparse
import copy
import math
import os
import resource
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

FORMAT = "dmfs-04-v1"  # checkpoint format tag: a file written by another script is refused
DATASETS = ("shapes", "mnist", "fashion-mnist", "cifar10", "folder")


class Parser(argparse.ArgumentParser):
    """argparse that reports a user's mistake in one line and exits with status 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def fail(message):
    """One line naming the fix, exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but CUDA is not available; use --device cpu (or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        fail("--device mps was asked for but MPS is not available; use --device cpu (or auto)")
    return torch.device(name)


def parse_args(argv=None):
    p = Parser(description="Lesson 04: train a diffusion model on images.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="shapes", help="shapes | mnist | fashion-mnist | cifar10 | folder")
    a("--data-dir", default="data", help="where torchvision data is downloaded, or the image folder")
    a("--image-size", type=int, default=32, help="images are resized (and centre-cropped, or padded) to this")
    a("--hflip", action="store_true", help="random horizontal flips (natural images)")
    a("--pred", default="v", choices=["eps", "v", "x0"], help="what the network predicts")
    a("--schedule", default="cosine", choices=["linear", "cosine"])
    a("--loss-weight", default="min-snr", choices=["none", "min-snr"])
    a("--T", type=int, default=1000, help="diffusion steps")
    a("--base-ch", type=int, default=32, help="UNet width")
    a("--ch-mult", default="1,2,2", help="UNet channel multipliers per level")
    a("--steps", type=int, default=2000, help="total training steps (a resumed run continues up to this number)")
    a("--batch-size", type=int, default=64, help="per process")
    a("--lr", type=float, default=1e-3)
    a("--warmup", type=int, default=200, help="linear learning-rate warmup steps")
    a("--grad-clip", type=float, default=1.0)
    a("--ema-decay", type=float, default=0.999)
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto: bf16 autocast on CUDA and on CPUs with bf16 units, else fp32")
    a("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    a("--sample-every", type=int, default=500, help="steps between progress grids")
    a("--sample-steps", type=int, default=50, help="DDIM steps for the grids and the metric")
    a("--eval-samples", type=int, default=500, help="samples for the quality metric (0: skip)")
    a("--save-every", type=int, default=500, help="steps between checkpoints")
    a("--run-dir", default="runs/04", help="checkpoint folder")
    a("--resume", nargs="?", const="", default=None,
      help="continue from a checkpoint (default: RUN_DIR/ckpt.pt)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    a("--seed", type=int, default=0)
    a("--out", default="figures", help="folder for the figures")
    a("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    a("--bench", type=int, default=0, metavar="STEPS",
      help="instead of training: STEPS steps in fp32 and in bf16 autocast, speed and loss compared")
    args = p.parse_args(argv)
    if args.dataset not in DATASETS:
        fail(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    for name in ("steps", "batch_size", "T", "base_ch", "sample_every", "save_every", "sample_steps"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if not args.lr > 0:
        fail(f"--lr must be positive (got {args.lr})")
    if args.warmup < 0 or args.eval_samples < 0 or not 0 <= args.ema_decay < 1:
        fail("--warmup and --eval-samples must be >= 0, and --ema-decay in [0, 1)")
    try:
        args.ch_mult = tuple(int(c) for c in args.ch_mult.split(","))
    except ValueError:
        fail(f"--ch-mult must be integers separated by commas, like 1,2,2 (got {args.ch_mult!r})")
    if args.quick:
        args.steps, args.batch_size, args.base_ch = min(args.steps, 30), min(args.batch_size, 16), 16
        args.sample_every, args.save_every = min(args.sample_every, 15), min(args.save_every, 20)
        args.sample_steps, args.eval_samples = min(args.sample_steps, 5), min(args.eval_samples, 64)
        args.warmup = min(args.warmup, 5)
    if args.resume == "":
        args.resume = os.path.join(args.run_dir, "ckpt.pt")
    return args


# %% Noise schedules and the closed form q(x_t | x_0) (as in lesson 01)
def linear_betas(T):
    """DDPM's schedule: beta_t linear from 1e-4 to 0.02. float64 tensor [T]."""
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)


def cosine_betas(T, s=0.008):
    """Improved DDPM's schedule: alpha_bar_t = f(t)/f(0), f(t) = cos^2(((t/T)+s)/(1+s) * pi/2).

    beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999 so the last step is not singular.
    With 0-based t, step t takes f(t/T) to f((t+1)/T). float64 tensor [T].
    """
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def alpha_bar_of(betas):
    # alpha_bar_t = prod_{s<=t} (1 - beta_s)
    return torch.cumprod(1 - betas, dim=0)


def q_sample(x0, t, alpha_bar, noise):
    """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise, for a batch of t (int64 [B])."""
    ab = alpha_bar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # [B, 1, 1, 1]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


# %% The built-in shapes dataset (as in lesson 01)
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
          "yellow": (240, 220, 40), "magenta": (220, 50, 220), "cyan": (40, 220, 230)}
SIZES = {"small": 0.20, "medium": 0.28, "large": 0.36}  # radius as a fraction of the image side
POSITIONS = ("top left", "top", "top right", "left", "centre", "right",
             "bottom left", "bottom", "bottom right")


def shape_polygon(kind, cx, cy, r, angle):
    """Vertices of a shape centred at (cx, cy) with circumradius r, rotated by angle (radians)."""
    if kind == "square":
        radii, k = [r] * 4, 4
    elif kind == "triangle":
        radii, k = [r] * 3, 3
    elif kind == "star":
        radii, k = [r, 0.45 * r] * 5, 10
    else:  # cross: a plus sign, 12 vertices on two radii
        w = 0.32 * r  # half the width of an arm
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    return [(cx + rad * math.cos(angle + 2 * math.pi * i / k), cy + rad * math.sin(angle + 2 * math.pi * i / k))
            for i, rad in enumerate(radii)]


def make_shapes(n, size=32, seed=0):
    """n images of one coloured shape each on a black background, anti-aliased.

    Returns (images uint8 [n, 3, size, size], labels int64 [n] indexing SHAPES, captions list[str]).
    Every random draw comes from one numpy Generator seeded with `seed`, so the data is a pure
    function of (n, size, seed). Each shape is drawn as a mask at 4x the size and box-filtered
    down (anti-aliasing); the image is mask * colour.
    """
    rng = np.random.default_rng(seed)
    shape_i = rng.integers(0, len(SHAPES), n)
    color_i = rng.integers(0, len(COLORS), n)
    size_i = rng.integers(0, len(SIZES), n)
    pos_i = rng.integers(0, len(POSITIONS), n)
    jitter = rng.uniform(-0.3, 0.3, (n, 2))
    scale = rng.uniform(0.9, 1.1, n)
    angle = rng.uniform(0, 2 * math.pi, n)
    big = 4 * size
    color_names, size_names = list(COLORS), list(SIZES)
    rgb = np.array([COLORS[c] for c in color_names], dtype=np.float32)  # [6, 3]
    masks = np.empty((n, size, size), dtype=np.float32)
    captions = []
    for i in range(n):
        r = SIZES[size_names[size_i[i]]] * scale[i] * big
        col, row = pos_i[i] % 3, pos_i[i] // 3
        # centre: one of a 3x3 grid of cells inside [r, big - r], so the shape stays in the picture
        cx = r + (col + 0.5 + jitter[i, 0]) / 3 * (big - 2 * r)
        cy = r + (row + 0.5 + jitter[i, 1]) / 3 * (big - 2 * r)
        img = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(img)
        kind = SHAPES[shape_i[i]]
        if kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon(shape_polygon(kind, cx, cy, r, angle[i]), fill=255)
        masks[i] = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255
        captions.append(f"a {size_names[size_i[i]]} {color_names[color_i[i]]} {kind} "
                        f"{'in the' if pos_i[i] == 4 else 'at the'} {POSITIONS[pos_i[i]]}")
    images = masks[:, None] * rgb[color_i][:, :, None, None]  # [n, 1, H, W] * [n, 3, 1, 1] -> [n, 3, H, W]
    images = torch.from_numpy(np.rint(images).astype(np.uint8))
    return images, torch.from_numpy(shape_i.astype(np.int64)), captions


def to_unit(images):
    """uint8 [0, 255] -> float [-1, 1], the range diffusion models are trained in."""
    return images.float() / 127.5 - 1


def to_uint8(x):
    """float [-1, 1] -> uint8 [0, 255] (values outside are clipped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# %% Figure helpers (as in lesson 01)
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207)]


def font(px):
    return ImageFont.load_default(size=px)


def grid_image(x_uint8, nrow, scale=3, pad=2):
    """uint8 [N, 3, H, W] -> PIL image of a grid, upscaled by `scale` (nearest) so pixels stay crisp."""
    g = make_grid(x_uint8, nrow=nrow, padding=pad, pad_value=255)  # [3, H', W']
    img = Image.fromarray(g.permute(1, 2, 0).numpy())
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def labelled(img, title, row_labels=(), col_labels=(), left=0, top=0):
    """Add a title, and row/column labels placed over the cells of an evenly divided image."""
    f, ft = font(14), font(16)
    left = left or (max((int(f.getlength(s)) for s in row_labels), default=0) + 12 if row_labels else 8)
    top = top or (50 if col_labels else 32)
    canvas = Image.new("RGB", (img.width + left + 8, img.height + top + 8), "white")
    canvas.paste(img, (left, top))
    d = ImageDraw.Draw(canvas)
    d.text((canvas.width // 2, 6), title, fill="black", font=ft, anchor="ma")
    for i, s in enumerate(col_labels):
        d.text((left + (i + 0.5) * img.width / len(col_labels), top - 4), s, fill="black", font=f, anchor="md")
    for i, s in enumerate(row_labels):
        d.text((left - 6, top + (i + 0.5) * img.height / len(row_labels)), s, fill="black", font=f, anchor="rm")
    return canvas


def nice_ticks(lo, hi, n=5):
    """About n round numbers spanning [lo, hi] (1, 2, 5 times a power of ten apart)."""
    span = (hi - lo) or 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def log_ticks(lo, hi):
    """Powers of ten in [lo, hi]; with fewer than three of them, also 2x and 5x."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [10.0 ** e for e in decades if lo <= 10.0 ** e <= hi]
    if len(ticks) < 3:
        ticks = [m * 10.0 ** e for e in decades for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
    return ticks


def fmt(v):
    return f"{v:.0e}" if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3) else f"{v:g}"


def plot_axes(d, box, xlim, ylim, xlabel, ylabel, title, logx=False, logy=False):
    """Draw axes, ticks, labels and title in box (x0, y0, x1, y1); return a data->pixel mapping."""
    x0, y0, x1, y1 = box
    f = font(13)
    tx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    ty = (lambda v: math.log10(v)) if logy else (lambda v: v)
    (xa, xb), (ya, yb) = (tx(xlim[0]), tx(xlim[1])), (ty(ylim[0]), ty(ylim[1]))

    def to_px(x, y):
        return (x0 + (tx(x) - xa) / ((xb - xa) or 1) * (x1 - x0),
                y1 - (ty(y) - ya) / ((yb - ya) or 1) * (y1 - y0))

    d.rectangle(box, outline="black")
    xt = log_ticks(*xlim) if logx else nice_ticks(*xlim)
    yt = log_ticks(*ylim) if logy else nice_ticks(*ylim)
    for v in xt:
        px = to_px(v, ylim[0])[0]
        d.line([(px, y1), (px, y1 + 4)], fill="black")
        d.line([(px, y0), (px, y1)], fill=(230, 230, 230))
        d.text((px, y1 + 6), fmt(v), fill="black", font=f, anchor="ma")
    for v in yt:
        py = to_px(xlim[0], v)[1]
        d.line([(x0 - 4, py), (x0, py)], fill="black")
        d.line([(x0 + 1, py), (x1 - 1, py)], fill=(230, 230, 230))
        d.text((x0 - 6, py), fmt(v), fill="black", font=f, anchor="rm")
    d.rectangle(box, outline="black")
    d.text(((x0 + x1) / 2, y1 + 24), xlabel, fill="black", font=f, anchor="ma")
    d.text((x0 - 4, y0 - 8), ylabel, fill="black", font=f, anchor="ld")
    d.text(((x0 + x1) / 2, y0 - 26), title, fill="black", font=font(15), anchor="md")
    return to_px


def line_panel(d, box, series, title, xlabel, ylabel, logx=False, logy=False, ylim=None):
    """One panel of lines. series: list of (label, xs, ys). Legend in the top-right corner."""
    xs_all = [x for _, xs, _ in series for x in xs]
    ys_all = [y for _, _, ys in series for y in ys]
    if ylim is None:
        lo, hi = min(ys_all), max(ys_all)
        pad = 0 if logy else 0.05 * ((hi - lo) or 1)
        ylim = (lo - pad, hi + pad)
    to_px = plot_axes(d, box, (min(xs_all), max(xs_all)), ylim, xlabel, ylabel, title, logx, logy)
    for k, (label, xs, ys) in enumerate(series):
        pts = [to_px(x, min(max(y, ylim[0]), ylim[1])) for x, y in zip(xs, ys)]
        d.line(pts, fill=PALETTE[k % len(PALETTE)], width=2)
    f = font(13)
    for k, (label, _, _) in enumerate(series):
        y = box[1] + 10 + 18 * k
        d.line([(box[2] - 150, y), (box[2] - 125, y)], fill=PALETTE[k % len(PALETTE)], width=3)
        d.text((box[2] - 120, y), label, fill="black", font=f, anchor="lm")


# %% Sinusoidal timestep embedding
def timestep_embedding(t, dim):
    """t int64 [B] -> float [B, dim]: sin and cos of t at geometrically spaced frequencies.

    Frequencies run from 1 to 1/10000 (Vaswani et al. 2017), so nearby t get nearby vectors and
    every t in [0, T-1] gets a distinct one. Values are bounded in [-1, 1].
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, dim]


def group_norm(ch):
    return nn.GroupNorm(math.gcd(32, ch), ch)


# %% Residual block with time-conditioned scale and shift
class ResBlock(nn.Module):
    """skip(x) + conv(SiLU(GN(conv(SiLU(GN(x)))) * (1 + scale) + shift)), then optional self-attention.

    (B, C_in, H, W) -> (B, C_out, H, W).
    """

    def __init__(self, c_in, c_out, emb_dim, dropout=0.0, attn_heads=0):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # time embedding -> per-channel (scale, shift)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out, attn_heads) if attn_heads else nn.Identity()  # optional, after the block

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x [B, C_out, 1, 1]
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.attn(self.skip(x) + h)


# %% Self-attention over pixels
class Attention(nn.Module):
    """Multi-head self-attention among the H*W positions of a feature map, with a residual."""

    def __init__(self, ch, heads=4):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention channels ({ch}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(3, 4).unbind(1)  # 3 x [B, heads, HW, C/heads]
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v: [B, heads, HW, C/heads]
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj(h)


# %% Down- and upsampling
class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2) with a stride-2 3x3 conv (learned, unlike pooling)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour, then a 3x3 conv (no checkerboard artefacts)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


# %% The UNet
class UNet(nn.Module):
    """eps_theta(x_t, t): (B, in_ch, H, W), int64 [B] -> (B, out_ch, H, W).

    Levels l = 0..L-1 work at resolution H / 2^l with base_ch * ch_mult[l] channels; each has
    num_res_blocks residual blocks on the way down and num_res_blocks + 1 on the way up (the extra
    one takes the skip saved after downsampling). Levels listed in attn_levels add self-attention
    after each residual block; the middle is a ResBlock with attention and a plain ResBlock.
    """

    def __init__(self, in_ch=3, out_ch=None, base_ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                 attn_levels=(2,), dropout=0.0, heads=4):
        super().__init__()
        out_ch = out_ch or in_ch
        self.base_ch, self.levels = base_ch, len(ch_mult)
        emb_dim = 4 * base_ch
        self.time_mlp = nn.Sequential(nn.Linear(base_ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_ch, base_ch, 3, padding=1)

        self.down = nn.ModuleList()
        chans, ch = [base_ch], base_ch  # channels of every skip, in the order they are saved
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base_ch * mult, emb_dim, dropout, heads * (level in attn_levels)))
                ch = base_ch * mult
                chans.append(ch)
            if level < len(ch_mult) - 1:
                self.down.append(Downsample(ch))
                chans.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout, heads), ResBlock(ch, ch, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + chans.pop(), base_ch * mult, emb_dim, dropout,
                                        heads * (level in attn_levels)))
                ch = base_ch * mult
            if level > 0:
                self.up.append(Upsample(ch))

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the untrained net predicts eps = 0: loss starts at E[eps^2] = 1
        nn.init.zeros_(self.conv_out.bias)

    def check_size(self, h, w):
        k = 2 ** (self.levels - 1)
        if h % k or w % k:
            raise ValueError(f"this UNet halves the image {self.levels - 1} times, so height and width must be "
                             f"multiples of {k} (e.g. {', '.join(str(k * m) for m in (7, 8, 16) if k * m >= 8)}); "
                             f"got {h}x{w}")

    def forward(self, x, t):
        self.check_size(*x.shape[-2:])
        emb = self.time_mlp(timestep_embedding(t, self.base_ch))  # [B, 4 base_ch]
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# %% Data: every dataset becomes one uint8 tensor [N, C, S, S] in memory, plus labels
def load_dataset(name, data_dir, size, seed, n_shapes=10_000):
    """-> (images uint8 [N, C, size, size], labels int64 [N], class names). Small data sets fit in
    memory, which makes batches a single indexing op and lets CUDA copy them from pinned memory."""
    if name == "shapes":
        images, labels, _ = make_shapes(n_shapes, size=size, seed=seed)
        return images, labels, list(SHAPES)
    import torchvision
    import torchvision.transforms.functional as TF
    if name == "folder":
        if not os.path.isdir(data_dir):
            fail(f"--dataset folder needs --data-dir to be a folder of class sub-folders; {data_dir!r} does not exist")
        try:
            ds = torchvision.datasets.ImageFolder(data_dir)
        except (FileNotFoundError, RuntimeError) as e:
            fail(f"no images found under {data_dir!r} ({str(e).splitlines()[0]}); put them in sub-folders, "
                 "one per class, e.g. DIR/cats/1.png")
        grey = all(Image.open(path).mode in ("1", "L") for path, _ in ds.samples)  # keep 1 channel for greyscale
        pics = []
        for path, _ in ds.samples:
            img = Image.open(path).convert("L" if grey else "RGB")
            img = TF.center_crop(TF.resize(img, size, antialias=True), size)
            pics.append(TF.pil_to_tensor(img))  # uint8 [C, size, size]
        return torch.stack(pics), torch.tensor(ds.targets), ds.classes
    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        ds = cls(data_dir, train=True, download=True)
    except Exception as e:  # no network, a proxy, a half-written file: the fix is the same
        where = "cifar-10-batches-py" if name == "cifar10" else os.path.join(cls.__name__, "raw")
        fail(f"could not load {name} ({type(e).__name__}); download it by hand and put the files in "
             f"{os.path.join(data_dir, where)} (torchvision's layout), or pass --data-dir")
    data = torch.as_tensor(np.asarray(ds.data))  # MNIST: [N, 28, 28]; CIFAR-10: [N, 32, 32, 3]
    data = data[:, None] if data.dim() == 3 else data.permute(0, 3, 1, 2)
    if data.shape[-1] != size:  # 28x28 digits are padded with background to 32 (or resized otherwise)
        pad = (size - data.shape[-1]) // 2
        if 0 < pad and 2 * pad + data.shape[-1] == size:
            data = F.pad(data, (pad, pad, pad, pad))
        else:
            data = F.interpolate(data.float(), size=(size, size), mode="bilinear", antialias=True).round().byte()
    return data, torch.as_tensor(np.asarray(ds.targets)), list(ds.classes)


def get_batch(images, shard, batch_size, gen, hflip):
    """A random batch from this process's shard, scaled to [-1, 1]: uint8 [B, C, S, S] -> float."""
    idx = shard[torch.randint(len(shard), (batch_size,), generator=gen)]
    x = images[idx].float() / 127.5 - 1
    if hflip:
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


# %% The objective: eps, x_0 and v, and the loss weight per t
def target_of(pred, x0, eps, ab):
    """The regression target for --pred; ab = alpha_bar_t broadcast as [B, 1, 1, 1]."""
    if pred == "eps":
        return eps
    if pred == "x0":
        return x0
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0  # v


def to_eps_x0(pred, out, x_t, ab):
    """Turn the network's output into (eps_hat, x0_hat), whatever it predicts."""
    if pred == "eps":
        return out, (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    if pred == "x0":
        return (x_t - ab.sqrt() * out) / (1 - ab).sqrt(), out
    return (1 - ab).sqrt() * x_t + ab.sqrt() * out, ab.sqrt() * x_t - (1 - ab).sqrt() * out  # from v


def loss_weight(kind, pred, ab, gamma=5.0):
    """Per-sample weight: 1, or min-SNR-gamma for the chosen target (Hang et al. 2023)."""
    if kind == "none":
        return torch.ones_like(ab)
    snr = ab / (1 - ab)
    clipped = snr.clamp(max=gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[pred]


# %% Sampling: deterministic DDIM from fixed noise (lesson 05 has the full set of samplers)
@torch.no_grad()
def ddim_sample(model, x_T, alpha_bar, steps, pred, autocast=nullcontext):
    """x_T [B, C, S, S] -> x_0. Visits t_i = round(i (T-1) / (steps-1)) from T-1 down to 0, then one
    last step from t = 0 to the clean image (alpha_bar = 1)."""
    T = len(alpha_bar)
    ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
    x = x_T
    for i, t in enumerate(ts):
        ab = alpha_bar[t].to(x.device, torch.float32).view(1, 1, 1, 1)
        with autocast():
            out = model(x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
        eps, x0 = to_eps_x0(pred, out.float(), x, ab)
        x0 = x0.clamp(-1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # keep eps consistent with the clipped x0
        ab_next = alpha_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0  # the last step lands on x_0
        x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps
    return x


# %% Measuring quality: a small classifier's features and the Frechet distance
class Classifier(nn.Module):
    """A small CNN; its 128-d penultimate features are what the Frechet distance compares."""

    def __init__(self, in_ch, n_classes):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.GroupNorm(8, 128), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten())  # [B, 128]
        self.head = nn.Linear(128, n_classes)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(images, labels, n_classes, device, steps, seed):
    """A few hundred steps of Adam on real images in [-1, 1]: enough to judge shapes or digits."""
    g = torch.Generator().manual_seed(seed)
    clf = Classifier(images.shape[1], n_classes).to(device)
    opt = torch.optim.Adam(clf.parameters(), 2e-3)
    for _ in range(steps):
        idx = torch.randint(len(images), (128,), generator=g)
        x = (images[idx].float() / 127.5 - 1).to(device)
        loss = F.cross_entropy(clf(x), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()


@torch.no_grad()
def features_and_classes(clf, x, device, batch=256):
    feats, classes = [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(device)
        f = clf.body(xb)
        feats.append(f.double().cpu())
        classes.append(clf.head(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(classes)


def frechet_distance(f1, f2):
    """FD between Gaussians fitted to two feature sets [N, D] (float64).

    tr((S1^1/2 S2 S1^1/2)^1/2) is computed from the eigenvalues of the symmetric S1^1/2 S2 S1^1/2.
    """
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, V = torch.linalg.eigh(s1)
    s1_half = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross).item()



# %% One training step (Ho et al. 2020, Algorithm 1, with warmup, clipping and EMA)
def draw_batch(images, shard, args, gen, device):
    """x_0 from the data, t uniform in [0, T-1], eps ~ N(0, I): every draw from one generator,
    so a resumed run that restores it continues exactly."""
    x0 = get_batch(images, shard, args.batch_size, gen, args.hflip).to(device, non_blocking=True)
    t = torch.randint(args.T, (args.batch_size,), generator=gen).to(device)
    eps = torch.randn(x0.shape, generator=gen).to(device)
    return x0, t, eps


def train_step(net, model, ema, opt, x0, t, eps, alpha_bar, step, args, autocast):
    """Returns (loss, per-sample losses [B]); skips the update when the loss is not finite.
    `net` is what runs forward (the model, compiled or wrapped in DDP); `model` owns the weights."""
    ab = alpha_bar[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # q_sample
    for group in opt.param_groups:
        group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))  # linear warmup
    with autocast():
        out = net(x_t, t)
    per_sample = (out.float() - target_of(args.pred, x0, eps, ab)).square().mean((1, 2, 3))  # [B]
    loss = (loss_weight(args.loss_weight, args.pred, ab.view(-1)) * per_sample).mean()
    if not torch.isfinite(loss):
        return loss, per_sample
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    decay = min(args.ema_decay, (1 + step) / (10 + step))  # EMA warmup: early on, average fewer steps
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)  # ema = decay * ema + (1 - decay) * w
    return loss, per_sample.detach()


def bench_precision(args, images, shard, device, steps):
    """fp32 against bf16 autocast: the same initial weights and batches, `steps` steps each;
    prints images/s and the loss in four windows, so speed and the loss curve can be compared."""
    precisions = ["fp32"] + (["bf16"] if bf16_supported(device) else [])
    print(f"{'precision':>9} {'images/s':>9} {'GFLOP/s':>8}   mean loss in 4 windows of {steps // 4} steps")
    rates = {}
    for name in precisions:
        torch.manual_seed(args.seed)
        model = UNet(in_ch=images.shape[1], base_ch=args.base_ch, ch_mult=args.ch_mult).to(device)
        ema, opt = copy.deepcopy(model), torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        alpha_bar = alpha_bar_of(cosine_betas(args.T) if args.schedule == "cosine" else linear_betas(args.T)).to(device)
        gen = torch.Generator().manual_seed(args.seed)
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if name == "bf16" else nullcontext
        losses, times = [], []
        for step in range(steps):
            x0, t, eps = draw_batch(images, shard, args, gen, device)
            tic = time.perf_counter()
            loss, _ = train_step(model, model, ema, opt, x0, t, eps, alpha_bar, step, args, autocast)
            losses.append(loss.item())  # .item() waits for the device
            times.append(time.perf_counter() - tic)
        with FlopCounterMode(display=False) as counter:
            model(x0[:1], t[:1])
        rates[name] = args.batch_size / sorted(times[5:])[len(times[5:]) // 2]  # median after warm-up
        q = steps // 4
        windows = "  ".join(f"{sum(losses[i * q:(i + 1) * q]) / q:.4f}" for i in range(4))
        print(f"{name:>9} {rates[name]:9.1f} {3 * counter.get_total_flops() * rates[name] / 1e9:8.0f}   {windows}")
    if len(rates) == 2:
        print(f"bf16 autocast is {rates['bf16'] / rates['fp32']:.2f}x the speed of fp32 here")


# %% Checkpoints: one dict, written atomically, loaded without running code
MODEL_KEYS = ("dataset", "image_size", "channels", "pred", "schedule", "T", "base_ch", "ch_mult")


def save_checkpoint(path, ckpt):
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half checkpoint at `path`


def load_checkpoint(path, config):
    """Load and validate a checkpoint: missing, corrupt, foreign or incompatible files exit 2."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train first (python 04_train.py) or pass the right path to --resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it and train again")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        fail(f"{path} was not written by 04_train.py (format {ckpt.get('format') if isinstance(ckpt, dict) else '?'}); "
             "pass a 04 checkpoint to --resume")
    diff = [f"{k}={ckpt['config'].get(k)!r} (now {config[k]!r})"
            for k in MODEL_KEYS if ckpt["config"].get(k) != config[k]]
    if diff:
        fail(f"{path} was trained with {', '.join(diff)}; use the same settings or a new --run-dir")
    return ckpt


# %% Distributed training: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
def setup_distributed(device_name):
    if "RANK" not in os.environ:
        return 0, 1, None
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, torch.device("cuda", local) if use_cuda else torch.device("cpu")


def bf16_supported(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return False


# %% Figures written during and after training
def save_loss_plots(out, losses, t_bins, T):
    k = max(1, len(losses) // 200)  # average into at most 200 points
    xs = [i * k + k for i in range(len(losses) // k)]
    ys = [sum(losses[i * k:(i + 1) * k]) / k for i in range(len(losses) // k)]
    img = Image.new("RGB", (1100, 430), "white")
    d = ImageDraw.Draw(img)
    line_panel(d, (80, 60, 500, 370), [("training loss", xs, ys)], f"loss (mean of every {k} steps)",
               "step", "loss", logy=True, ylim=(min(ys) * 0.8, max(ys) * 1.25))
    sums, counts = t_bins
    centres = [(i + 0.5) * T / len(sums) for i in range(len(sums)) if counts[i] > 0]
    means = [sums[i] / counts[i] for i in range(len(sums)) if counts[i] > 0]
    line_panel(d, (600, 60, 1050, 370), [("loss at t", centres, means)],
               "loss binned by t (last half of training)", "t", "loss", logy=True,
               ylim=(min(means) * 0.8, max(means) * 1.25))
    img.save(os.path.join(out, "04_loss.png"))
    return img


@torch.no_grad()
def save_x0_predictions(path, model, x0, alpha_bar, pred, gen, autocast):
    """Rows: t. Columns: x_0, x_t, the model's x_0 estimate. The first thing to look at when
    samples are noise: if these are wrong, the network (or the data range) is wrong."""
    T = len(alpha_bar)
    ts = [int(f * (T - 1)) for f in (0.02, 0.1, 0.25, 0.5, 0.75, 0.9)]
    rows = []
    for t in ts:
        tt = torch.full((len(x0),), t, device=x0.device, dtype=torch.long)
        ab = alpha_bar[t].to(x0.device, torch.float32).view(1, 1, 1, 1)
        x_t = q_sample(x0, tt, alpha_bar, torch.randn(x0.shape, generator=gen).to(x0.device))
        with autocast():
            out = model(x_t, tt)
        _, x0_hat = to_eps_x0(pred, out.float(), x_t, ab)
        rows.append(torch.cat([x0, x_t, x0_hat]))
    n = len(x0)
    grid = grid_image(to_uint8(torch.cat(rows)).cpu(), nrow=3 * n, scale=2)
    labelled(grid, "x_0 predictions (EMA model): for each t, clean x_0 | noisy x_t | predicted x_0",
             row_labels=[f"t={t}" for t in ts],
             col_labels=["clean x_0", "noisy x_t", "predicted x_0"]).save(path)


# %% Training
def main(argv=None):
    args = parse_args(argv)
    rank, world, ddp_device = setup_distributed(args.device)
    device = ddp_device or pick_device(args.device)
    is_main = rank == 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_supported(device))
    if use_bf16 and not bf16_supported(device):
        fail(f"--precision bf16 is not supported on this {device.type}; use --precision fp32")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # -- data
    images, labels, classes = load_dataset(args.dataset, args.data_dir, args.image_size, args.seed,
                                           n_shapes=2000 if args.quick else 10_000)
    if len(images) < 2:
        fail(f"{args.dataset} has {len(images)} image(s); training needs at least 2")
    n_hold = min(len(images) // 5, 2000)  # held out: the real images the quality metric compares against
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    held, train_idx = perm[:n_hold], perm[n_hold:] if n_hold else perm
    shard = train_idx[rank::world]  # each process trains on its own shard
    if device.type == "cuda":
        images = images.pin_memory()  # host-to-device copies can then overlap compute
    channels = images.shape[1]
    config = dict(vars(args), channels=channels, world=world)
    if args.bench:
        return bench_precision(args, images, shard, device, max(args.bench, 20))

    # -- model, EMA, optimiser
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = UNet(in_ch=channels, base_ch=args.base_ch, ch_mult=args.ch_mult).to(device)
    try:
        model.check_size(args.image_size, args.image_size)
    except ValueError as e:
        fail(f"--image-size {args.image_size}: {e}")
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    betas = cosine_betas(args.T) if args.schedule == "cosine" else linear_betas(args.T)
    alpha_bar = alpha_bar_of(betas).to(device)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # every training draw: batch, t, noise
    sample_gen = torch.Generator().manual_seed(args.seed + 12345)
    x_fixed = torch.randn(64, channels, args.image_size, args.image_size, generator=sample_gen).to(device)
    step, losses, progress = 0, [], []
    t_sums, t_counts = [0.0] * 20, [0] * 20

    ckpt_path = os.path.join(args.run_dir, "ckpt.pt")
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume, config)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step, losses = ckpt["step"], list(ckpt["log"]["losses"])
        t_sums, t_counts = list(ckpt["log"]["t_sums"]), list(ckpt["log"]["t_counts"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        gen.set_state(rng["train"][rank] if len(rng["train"]) == world else gen.get_state())
        if is_main:
            print(f"resumed {args.resume} at step {step}")
        if step >= args.steps and is_main:
            print(f"the checkpoint is already at step {step} >= --steps {args.steps}; pass a larger --steps")
    if is_main:
        os.makedirs(args.run_dir, exist_ok=True)
        os.makedirs(args.out, exist_ok=True)

    train_model = model
    if args.compile:
        train_model = torch.compile(model)
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint():
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            if is_main:
                print(f"\nthe weights are not finite at step {step}: stopping without saving; the last good "
                      f"checkpoint is {ckpt_path}. Lower --lr (now {args.lr:g}) and --resume", file=sys.stderr)
            sys.exit(1)
        states = [gen.get_state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, gen.get_state())
        if is_main:
            save_checkpoint(ckpt_path, {
                "format": FORMAT, "config": config, "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "step": step,
                "rng": {"torch": torch.get_rng_state(), "train": states},
                "log": {"losses": losses, "t_sums": t_sums, "t_counts": t_counts}})

    n_params = sum(p.numel() for p in model.parameters())
    if is_main:
        print(f"{args.dataset}: {len(train_idx)} training images {tuple(images.shape[1:])}, {len(classes)} classes | "
              f"UNet {n_params / 1e6:.2f}M params | {device}, {'bf16 autocast' if use_bf16 else 'fp32'}, "
              f"{world} process(es), effective batch {args.batch_size * world} | pred {args.pred}, "
              f"{args.schedule} schedule, loss weight {args.loss_weight}")
    first = True
    t0, step0, smooth = time.time(), step, None
    try:
        while step < args.steps:
            x0, t, eps = draw_batch(images, shard, args, gen, device)
            if first:  # the contract that trips people up most: data in [-1, 1]
                assert x0.min() >= -1 and x0.max() <= 1, "training data must lie in [-1, 1]"
                first = False
            loss, per_sample = train_step(train_model, model, ema, opt, x0, t, eps, alpha_bar, step, args, autocast)
            if not torch.isfinite(loss):
                if is_main:
                    print(f"\nloss is {loss.item()} at step {step}: stopping; the last good checkpoint is "
                          f"{ckpt_path}. Lower --lr (now {args.lr:g}) and --resume", file=sys.stderr)
                sys.exit(1)
            step += 1
            losses.append(loss.item())
            smooth = losses[-1] if smooth is None else 0.98 * smooth + 0.02 * losses[-1]
            if step > args.steps // 2:  # loss by t, once the model has settled
                for ti, li in zip(t.tolist(), per_sample.detach().tolist()):
                    t_sums[ti * 20 // args.T] += li
                    t_counts[ti * 20 // args.T] += 1
            if is_main and (step % 10 == 0 or step == args.steps):
                rate = (step - step0) * args.batch_size * world / (time.time() - t0)
                eta = (args.steps - step) * args.batch_size * world / max(rate, 1e-9)
                print(f"\rstep {step}/{args.steps}  loss {smooth:.4f}  {rate:.0f} img/s  "
                      f"ETA {eta / 60:.1f} min ", end="", flush=True)
            if step % args.sample_every == 0 or step == args.steps:
                if is_main:
                    progress.append((step, ddim_sample(ema, x_fixed[:8], alpha_bar, args.sample_steps,
                                                       args.pred, autocast).cpu()))
            if step % args.save_every == 0 or step == args.steps:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        if is_main:
            print(f"\ninterrupted at step {step}: saved {ckpt_path}; continue with --resume")
        sys.exit(130)
    elapsed = time.time() - t0
    if is_main and step > step0:
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        with FlopCounterMode(display=False) as counter:
            model(x0[:1], t[:1])
        rate = (step - step0) * args.batch_size * world / elapsed
        print(f"\ntrained {step - step0} steps in {elapsed / 60:.1f} min: {rate:.0f} images/s "
              f"({3 * counter.get_total_flops() * rate / 1e9:.0f} GFLOP/s, counting training as 3x the forward), "
              f"peak memory {peak:.0f} MiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
    if world > 1:  # DDP keeps the replicas identical: check it, bit for bit
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        replicas = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(replicas, flat)
        if is_main:
            print(f"ranks agree on the weights: {all(torch.equal(r, replicas[0]) for r in replicas)}")
        dist.destroy_process_group()
    if not is_main:
        return

    # -- figures: final grid, progress, loss curves, x_0 predictions
    ema.eval()
    final = ddim_sample(ema, x_fixed, alpha_bar, args.sample_steps, args.pred, autocast).cpu()
    labelled(grid_image(to_uint8(final), nrow=8, scale=3),
             f"04: 64 samples after {step} steps (EMA, DDIM {args.sample_steps} steps)").save(
        os.path.join(args.out, "04_samples.png"))
    if progress:
        rows = torch.cat([p for _, p in progress])
        labelled(grid_image(to_uint8(rows), nrow=8, scale=2), "samples from the same noise during training (EMA)",
                 row_labels=[f"step {s}" for s, _ in progress]).save(os.path.join(args.out, "04_progress.png"))
    if losses and sum(t_counts):
        save_loss_plots(args.out, losses, (t_sums, t_counts), args.T)
    x_show = (images[held[:4] if n_hold else train_idx[:4]].float() / 127.5 - 1).to(device)
    save_x0_predictions(os.path.join(args.out, "04_x0_pred.png"), ema, x_show, alpha_bar, args.pred,
                        torch.Generator().manual_seed(args.seed), autocast)

    # -- quality: Frechet distance on a small classifier's features, with the real-vs-real floor
    if args.eval_samples and len(classes) > 1 and n_hold >= 2:
        t1 = time.time()
        n = min(args.eval_samples, n_hold)
        clf = train_classifier(images[train_idx], labels[train_idx], len(classes), device,
                               50 if args.quick else 400, args.seed)
        real_a = images[held[:n]].float() / 127.5 - 1
        real_b = images[train_idx[:n]].float() / 127.5 - 1
        eg = torch.Generator().manual_seed(args.seed + 777)
        fake = torch.cat([ddim_sample(ema, torch.randn(min(256, n - i), *x_fixed.shape[1:], generator=eg).to(device),
                                      alpha_bar, args.sample_steps, args.pred, autocast).cpu()
                          for i in range(0, n, 256)])
        f_a, c_a = features_and_classes(clf, real_a, device)
        f_b, _ = features_and_classes(clf, real_b, device)
        f_g, c_g = features_and_classes(clf, fake, device)
        noise_img = torch.randn(n, *x_fixed.shape[1:], generator=eg).clamp(-1, 1)
        f_n, _ = features_and_classes(clf, noise_img, device)
        acc = (c_a == labels[held[:n]]).float().mean().item()
        print(f"\nquality ({n} samples, DDIM {args.sample_steps} steps; classifier accuracy on held-out real "
              f"{acc:.1%}; {time.time() - t1:.0f} s):")
        print(f"  FD(samples, real)      {frechet_distance(f_g, f_a):8.2f}")
        print(f"  FD(real, real) floor   {frechet_distance(f_b, f_a):8.2f}")
        print(f"  FD(noise, real) ceiling{frechet_distance(f_n, f_a):8.2f}")
        hist_g = torch.bincount(c_g, minlength=len(classes)).tolist()
        hist_r = torch.bincount(c_a, minlength=len(classes)).tolist()
        print("  classes of samples: " + ", ".join(f"{c} {h}" for c, h in zip(classes, hist_g)))
        print("  classes of real:    " + ", ".join(f"{c} {h}" for c, h in zip(classes, hist_r)))
    print(f"wrote {ckpt_path} and 04_samples.png, 04_progress.png, 04_loss.png, 04_x0_pred.png to {args.out}/")


if __name__ == "__main__":
    main()
