"""Lesson 03: the UNet, the network that predicts the noise, built up piece by piece.

What you will learn
-------------------
Lesson 02 denoised 2D points with a small MLP. An image needs a network that maps (x_t, t) to a
prediction of eps of the same shape, sees both fine detail (edges) and the whole picture (which
shape, where), and is told how noisy its input is. The UNet (Ronneberger et al. 2015, as used for
diffusion by Ho et al. 2020, appendix B) does this: an encoder halves the resolution level by level
so a 3x3 conv sees ever more of the image, a middle works on the coarsest map, and a decoder doubles
it back, taking the encoder's map of the same size through a skip connection, so detail lost at the
bottleneck comes straight across. The pieces, each in its own section and each run in `main`:

1. Sinusoidal timestep embedding (Vaswani et al. 2017, section 3.5): for k = 0..d/2-1,
       emb(t) = [sin(t w_k), cos(t w_k)],   w_k = 10000^(-k / (d/2))
   A d-dim vector, bounded in [-1, 1], distinct for each t, near for near t. An MLP
   (Linear, SiLU, Linear) turns it into the 4*base_ch-dim vector every block receives.
2. Residual block: h = conv3x3(SiLU(GroupNorm(x))), then the time embedding becomes a per-channel
   scale and shift (adaptive group norm, Dhariwal & Nichol 2021, section 3):
       h = GroupNorm(h) * (1 + scale(t)) + shift(t)
   then SiLU, dropout, conv3x3, plus the input (through a 1x1 conv when the channel count changes).
3. Multi-head self-attention over the H*W pixel positions (Vaswani et al. 2017), per head
       Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,   d = channels per head,
   with `F.scaled_dot_product_attention`. One layer lets every pixel see every other, but costs
   (H*W)^2, so it runs only at the coarse levels (8x8 and the middle for 32x32 images).
4. Downsampling: a stride-2 3x3 conv, (B, C, H, W) -> (B, C, H/2, W/2). Upsampling: nearest-neighbour
   x2, then a 3x3 conv (no checkerboard artefacts of transposed convs).
5. The UNet: encoder, middle, decoder with skips; the output conv is zero-initialised, so the
   untrained net predicts eps = 0 and the loss starts at E[eps^2] = 1, whatever the input.
Then we trace shapes through it, count its parameters block by block, look at how far each output
pixel sees (its receptive field, as the gradient of that pixel with respect to the input), and check
that it can learn at all: it must drive the loss to ~0 on one fixed batch (overfitting a batch is the
first test of any new network). `--bench` measures its speed.

Run
---
    python 03_unet.py            # under a minute on a 2-core CPU (38 s on one busy core); writes figures/03_*
    python 03_unet.py --quick    # a few seconds (used by the tests)
    python 03_unet.py --bench    # speed of the default UNet, fp32 and bf16, NCHW and channels_last

It writes figures/03_time_embedding.png, 03_receptive_field.png and 03_overfit.png, and prints the
shape trace and the parameter table.
"""

# %% Setup: imports, command line, device
import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

FIGURES = ("03_time_embedding.png", "03_receptive_field.png", "03_overfit.png")


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
    p = Parser(description="Lesson 03: the UNet, piece by piece (shape trace, receptive field, overfitting).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="training steps of the overfitting demonstration")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of the overfitting demonstration")
    p.add_argument("--batch", type=int, default=8, help="images in the fixed batch that the net overfits")
    p.add_argument("--image-size", type=int, default=32, help="side of the shapes images (a multiple of 4)")
    p.add_argument("--bench", action="store_true", help="only measure speed (batch 64, 32x32) and exit")
    p.add_argument("--bench-iters", type=int, default=5, help="timed iterations per --bench row (median)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="figures", help="folder for the figures")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "bench_iters"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if not 0 < args.lr < 1:
        fail(f"--lr must be between 0 and 1 (got {args.lr}); try 2e-3")
    if args.image_size < 8:
        fail(f"--image-size must be at least 8 (got {args.image_size})")
    if args.quick:
        args.steps, args.bench_iters = min(args.steps, 30), min(args.bench_iters, 2)
    return args


# %% Noise schedule and the closed form q(x_t | x_0), copied from lesson 01
def linear_betas(T):
    """DDPM's schedule: beta_t linear from 1e-4 to 0.02. float64 tensor [T]."""
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)


def alpha_bar_of(betas):
    # alpha_bar_t = prod_{s<=t} (1 - beta_s)
    return torch.cumprod(1 - betas, dim=0)


def q_sample(x0, t, alpha_bar, noise):
    """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise, for a batch of t (int64 [B])."""
    ab = alpha_bar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # [B, 1, 1, 1]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

# %% The built-in dataset: shapes, copied from lesson 01
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

# %% Figures: image grids, PIL line plots (copied from lesson 01) and heatmaps
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
    xt = [10 ** e for e in range(math.ceil(xa), math.floor(xb) + 1)] if logx else nice_ticks(*xlim)
    yt = [10 ** e for e in range(math.ceil(ya), math.floor(yb) + 1)] if logy else nice_ticks(*ylim)
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


def colorize(v, lo, hi, stops):
    """float array [H, W] -> uint8 RGB [H, W, 3]: [lo, hi] mapped linearly through the colour stops."""
    u = np.clip((np.asarray(v, dtype=np.float64) - lo) / (hi - lo), 0, 1) * (len(stops) - 1)
    i, s = np.minimum(u.astype(int), len(stops) - 2), np.asarray(stops, dtype=np.float64)
    return Image.fromarray((s[i] + (u - i)[..., None] * (s[i + 1] - s[i])).round().astype(np.uint8))


DIVERGING = [(59, 76, 192), (245, 245, 245), (180, 4, 38)]  # blue, white, red
HOT = [(0, 0, 0), (120, 20, 90), (230, 80, 30), (250, 200, 50), (255, 255, 230)]  # black to white


def colour_key(canvas, centre, y, stops, lo, hi, label):
    """A horizontal strip of the colour map, labelled lo at its left end and hi at its right, under a label."""
    d, x = ImageDraw.Draw(canvas), centre - 100
    canvas.paste(colorize(np.linspace(0, 1, 200)[None].repeat(12, 0), 0, 1, stops), (x, y))
    d.text((x - 6, y + 6), lo, fill="black", font=font(13), anchor="rm")
    d.text((x + 206, y + 6), hi, fill="black", font=font(13), anchor="lm")
    d.text((centre, y - 4), label, fill="black", font=font(13), anchor="md")

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


# %% Looking inside: a shape trace and the parameters of every block
def shape_trace(model, x, t):
    """One forward with a hook on every top-level block (named as in the state_dict), in the order forward
    runs them. Returns rows (name, kind, input shape, output shape, parameters)."""
    rows, handles = [], []
    for name, part in model.named_children():
        for i, b in enumerate(part) if isinstance(part, nn.ModuleList) else [(None, part)]:
            row = (name if i is None else f"{name}.{i}",
                   type(b).__name__ + ("+attention" if isinstance(getattr(b, "attn", None), Attention) else ""))
            handles.append(b.register_forward_hook(lambda m, inp, out, row=row: rows.append(
                (*row, tuple(inp[0].shape), tuple(out.shape), sum(p.numel() for p in m.parameters())))))
    with torch.no_grad():
        model(x, t)
    for h in handles:
        h.remove()
    return rows


# %% Receptive field: which input pixels can change one output pixel
def receptive_fields(model, x, t):
    """|d feature[:, centre] / d x| summed over channels, for the net cut after each encoder level and the
    middle (caught by forward hooks), and for the whole net. Returns [(name, resolution, |grad| [H, W])]."""
    ends = [i - 1 for i, b in enumerate(model.down) if isinstance(b, Downsample)] + [len(model.down) - 1]
    cuts = [(f"encoder level {lv}", model.down[i]) for lv, i in enumerate(ends)] + [("middle", model.mid[-1])]
    acts = {}
    handles = [b.register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n, b in cuts]
    x = x.clone().requires_grad_(True)
    acts["whole UNet"] = model(x, t)
    for h in handles:
        h.remove()
    fields = []
    for name, a in acts.items():
        (g,) = torch.autograd.grad(a[0, :, a.shape[2] // 2, a.shape[3] // 2].sum(), x, retain_graph=True)
        fields.append((name, a.shape[2], g[0].abs().sum(0)))
    return fields


# %% Can it learn? Overfit one fixed batch
def overfit(model, x0, x_t, eps, t, alpha_bar, steps, lr, generator):
    """Train on one fixed (x_t, t, eps) batch with the simple loss ||eps - eps_theta(x_t, t)||^2 (DDPM eq. 14).
    Every steps/20 steps also measure the loss on the same x_0 and t with fresh noise: the gap between the
    two is noise memorised. Returns (training losses, [(step, fresh-noise loss)])."""
    opt, losses, fresh = torch.optim.AdamW(model.parameters(), lr=lr), [], []
    for step in range(steps + 1):
        if step % max(1, steps // 20) == 0 or step == steps:
            with torch.no_grad():
                e2 = torch.randn(x0.shape, generator=generator).to(x0.device)
                fresh.append((step, F.mse_loss(model(q_sample(x0, t, alpha_bar, e2), t), e2).item()))
        if step < steps:
            opt.param_groups[0]["lr"] = lr * (1 - step / steps)  # decay to 0: at a fixed rate Adam jumps about near 0
            loss = F.mse_loss(model(x_t, t), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, fresh


# %% Speed: FLOPs, images per second and GFLOP/s of the default UNet
def bench(device, iters, batch=64, size=32):
    """Training (forward, backward, AdamW: 3x the forward FLOPs) and sampling (forward without gradients)
    throughput of UNet(), fp32 and bf16 autocast, NCHW and channels_last; medians after 2 warm-ups."""
    torch.manual_seed(0)
    model = UNet().to(device)
    x, t = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        model(x[:1], t[:1])
    flops = counter.get_total_flops()  # a multiply-add counts as 2
    print(f"bench on {device} ({torch.get_num_threads()} CPU threads): UNet(), "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {flops / 1e9:.3f} GFLOP per {size}x{size} "
          f"forward; batch {batch}, median of {iters} steps\n"
          f"{'precision':>9} {'layout':>13} {'train img/s':>11} {'GFLOP/s':>7} {'sample img/s':>12} {'GFLOP/s':>7}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)  # foreach: one op for all tensors
    for amp in (False, True):
        for layout in (torch.contiguous_format, torch.channels_last):
            model, xl = model.to(memory_format=layout), x.contiguous(memory_format=layout)

            def train():
                with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                    loss = F.mse_loss(model(xl, t).float(), xl)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def sample():
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                    model(xl, t)

            rates = []
            for fn in (train, sample):
                times = []
                for _ in range(iters + 2):
                    sync()
                    tic = time.perf_counter()
                    fn()
                    sync()
                    times.append(time.perf_counter() - tic)
                rates.append(batch / statistics.median(times[2:]))
            name = "NCHW" if layout == torch.contiguous_format else "channels_last"
            print(f"{'bf16' if amp else 'fp32':>9} {name:>13} {rates[0]:11.1f} {3 * flops * rates[0] / 1e9:7.0f} "
                  f"{rates[1]:12.1f} {flops * rates[1] / 1e9:7.0f}")


# %% Main: each piece shown working, then the whole net: trace, receptive field, overfitting
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.set_flush_denormal(True)  # near a loss of 0 gradients get tiny; denormal floats are slow on CPUs
    if args.bench:
        return bench(device, args.bench_iters, batch=8 if args.quick else 64)
    start, T, S = time.time(), 1000, args.image_size
    try:
        UNet().check_size(S, S)
        os.makedirs(args.out, exist_ok=True)
    except ValueError as e:
        fail(f"--image-size {S}: {e}")
    except OSError as e:
        fail(f"cannot create the output folder {args.out!r} ({e.strerror}); pass --out with a writable folder")
    torch.manual_seed(args.seed)

    # -- 1. the time embedding, as a heatmap, and how similar the vectors of two timesteps are
    emb = timestep_embedding(torch.arange(T), 32)  # [T, 32]
    cos = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T  # [T, T]
    print(f"1. timestep_embedding(t, 32): {tuple(emb.shape)}, values in [{emb.min():.2f}, {emb.max():.2f}]; cosine "
          f"similarity of t=500 with 501: {cos[500, 501]:.3f}, 520: {cos[500, 520]:.3f}, 900: {cos[500, 900]:.3f}")
    canvas = Image.new("RGB", (1180, 450), "white")
    d = ImageDraw.Draw(canvas)
    for box, v, xl, yl, title in [((70, 60, 690, 360), emb.T, "timestep t", "dimension",
                                   "emb(t): sin in dims 0-15, cos in 16-31; frequency falls with the dimension"),
                                  ((820, 60, 1120, 360), cos, "t", "t'", "cosine similarity of emb(t) and emb(t')")]:
        plot_axes(d, box, (0, T), (0, v.shape[0]), xl, yl, title)  # row 0 of v at the bottom of the box
        canvas.paste(colorize(v.flip(0).numpy(), -1, 1, DIVERGING).resize((box[2] - box[0] - 1, box[3] - box[1] - 1)),
                     (box[0] + 1, box[1] + 1))
    colour_key(canvas, 590, 425, DIVERGING, "-1", "+1", "colour scale (both panels)")
    canvas.save(os.path.join(args.out, FIGURES[0]))

    # -- 2 to 4. a residual block, attention, down- and upsampling, each on a small random input
    h, e, block = torch.randn(2, 32, 16, 16), torch.randn(2, 128), ResBlock(32, 64, 128)
    print(f"2. ResBlock(32 -> 64 channels): {tuple(h.shape)} -> {tuple(block(h, e).shape)}; changing only the "
          f"time embedding changes the output by {(block(h, e) - block(h, -e)).abs().mean():.3f} on average")
    attn, a, perm = Attention(64, 4), torch.randn(2, 64, 8, 8), torch.randperm(64)
    err = (attn(a.flatten(2)[:, :, perm].view_as(a)).flatten(2) - attn(a).flatten(2)[:, :, perm]).abs().max()
    print(f"3. Attention(64 channels, 4 heads): {tuple(a.shape)} -> {tuple(attn(a).shape)}; shuffling the 64 pixels "
          f"shuffles the output the same way (max difference {err:.1e}): attention alone knows no positions\n"
          f"4. Downsample: {tuple(a.shape)} -> {tuple(Downsample(64)(a).shape)}, "
          f"Upsample: {tuple(a.shape)} -> {tuple(Upsample(64)(a).shape)}")

    # -- 5. the whole UNet: shape trace, parameters, zero output at initialisation
    model = UNet().to(device)
    x0 = to_unit(make_shapes(args.batch, size=S, seed=args.seed)[0]).to(device)  # [B, 3, S, S] in [-1, 1]
    t = torch.linspace(50, 600, args.batch).long().to(device)  # a few noise levels, low to high
    print(f"\n5. UNet() shape trace for one {S}x{S} image:\n{'block':>9} {'kind':>18} {'input':>17} "
          f"{'output':>17} {'parameters':>10}")
    for name, kind, shape_in, shape_out, n in shape_trace(model, x0[:1], t[:1]):
        print(f"{name:>9} {kind:>18} {str(shape_in):>17} {str(shape_out):>17} {n:10,d}")
    print(f"total parameters: {sum(p.numel() for p in model.parameters())}\noutput at initialisation: "
          f"max |eps_theta| = {model(x0, t).abs().max().item():.1f} (the output conv starts at zero)")

    # -- 6. receptive fields, on a second net whose output conv is random (a zero conv passes no gradient back)
    probe = UNet().to(device)
    probe.conv_out.reset_parameters()
    fields, px = receptive_fields(probe, torch.randn(1, 3, S, S, device=device), t[:1]), max(1, 192 // S)
    canvas = Image.new("RGB", (len(fields) * (S * px + 30) + 10, S * px + 150), "white")
    d = ImageDraw.Draw(canvas)
    print("\n6. receptive field of the centre pixel: input pixels where |gradient| > 1% of its maximum")
    for k, (name, res, g) in enumerate(fields):
        g, left, c, f = g / g.max(), 20 + k * (S * px + 30), (res // 2) * (S // res) * px, (S // res) * px
        canvas.paste(colorize(g.clamp(min=1e-4).log10().cpu().numpy(), -4, 0, HOT).resize((S * px,) * 2), (left, 70))
        d.rectangle([left + c, 70 + c, left + c + f - 1, 70 + c + f - 1], outline=(0, 200, 255))  # probed pixel
        share = f"{int((g > 0.01).sum())} of {S * S} pixels > 1%"
        d.text((left + S * px / 2, 62), f"{name} ({res}x{res})", fill="black", font=font(13), anchor="md")
        d.text((left + S * px / 2, 76 + S * px), share, fill="black", font=font(13), anchor="ma")
        print(f"  {name:>16} ({res}x{res}): {share}")
    d.text((canvas.width // 2, 8), "receptive field: |d output[centre] / d input| for the UNet cut at each depth "
           "(cyan: the probed pixel)", fill="black", font=font(16), anchor="ma")
    colour_key(canvas, canvas.width // 2, canvas.height - 24, HOT, "1e-4 of the maximum or less", "the maximum",
               "|gradient|, log colour scale")
    canvas.save(os.path.join(args.out, FIGURES[1]))

    # -- 7. overfit one fixed batch of shapes at a few noise levels
    alpha_bar = alpha_bar_of(linear_betas(T))
    g = torch.Generator().manual_seed(args.seed)
    eps = torch.randn(x0.shape, generator=g).to(device)
    x_t = q_sample(x0, t, alpha_bar, eps)
    ab = alpha_bar.to(device)[t].float().view(-1, 1, 1, 1)
    with torch.no_grad():  # x_0 = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t): q_sample solved for x_0
        before = (x_t - (1 - ab).sqrt() * model(x_t, t)) / ab.sqrt()  # eps_theta = 0 here: x_t / sqrt(alpha_bar_t)
    losses, fresh = overfit(model, x0, x_t, eps, t, alpha_bar, args.steps, args.lr, g)
    with torch.no_grad():
        after = (x_t - (1 - ab).sqrt() * model(x_t, t)) / ab.sqrt()
    print(f"\n7. overfitting {args.batch} images at t = {t.tolist()}: loss {losses[0]:.3f} -> {losses[-1]:.4f} "
          f"in {args.steps} steps; same images, fresh noise: {fresh[0][1]:.3f} -> {fresh[-1][1]:.3f}")
    grid = labelled(grid_image(to_uint8(torch.cat([x0, x_t, before, after])).cpu(), nrow=args.batch, scale=3),
                    "one fixed batch: x_0 predicted from x_t, before and after training",
                    row_labels=["clean x_0", "noisy x_t", "predicted, step 0", f"predicted, step {args.steps}"],
                    col_labels=[f"t={v}" for v in t.tolist()])
    canvas = Image.new("RGB", (600 + grid.width, max(440, grid.height + 20)), "white")
    line_panel(ImageDraw.Draw(canvas), (80, 60, 560, 380),
               [("fixed batch (trained on)", list(range(len(losses))), losses),
                ("same x_0, fresh noise", [s for s, _ in fresh], [v for _, v in fresh])],
               "eps-prediction loss (MSE)", "training step", "loss", logy=True,
               ylim=(10 ** math.floor(math.log10(min(losses))), 10))
    canvas.paste(grid, (600, 10))
    canvas.save(os.path.join(args.out, FIGURES[2]))
    print(f"\nwrote {', '.join(FIGURES)} to {args.out}/ in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
