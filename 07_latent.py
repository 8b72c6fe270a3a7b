"""Lesson 07: latent diffusion, guidance in latent space, and fine-tuning with LoRA.

What you will learn
-------------------
The ideas behind Stable Diffusion (Rombach et al. 2022), at a scale that trains on a laptop CPU.

1. An autoencoder compresses images: a small convolutional VAE maps x (3 x 32 x 32) to a latent z
   (4 x 8 x 8 with --factor 4: 12x fewer numbers) and back. Its encoder gives a Gaussian posterior
   q(z | x) = N(mu, sigma^2); the loss is reconstruction plus a small KL term (Kingma & Welling 2014):
       L = mean (x - D(z))^2 + kl_weight * mean KL,  z = mu + sigma * eps,
       KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)   (0 when mu = 0, sigma = 1)
   The KL weight is small on purpose: it keeps the latent space smooth (nearby z decode to similar
   images) without blurring the reconstructions. It does not fix the latents' scale. Half of the VAE's
   training images get random colours (--colour-jitter): like Stable Diffusion's VAE, which saw far
   broader data than any model built on it, it must encode things the diffusion model never sees, or
   no fine-tuning of the diffusion model can produce them (step 5).
2. The latent scale factor. Diffusion assumes data of roughly unit variance (x_T ~ N(0, I) must be
   "much noisier" than the data at every scale the schedule expects). So the latents are multiplied
   by scale = 1 / std(mu) over the training set (we use the posterior means, as the latents we train
   on). Stable Diffusion's 0.18215 is this number for its VAE.
3. Diffusion in latent space: the same class-conditional UNet as lesson 06 (label embedding added to
   the time embedding; label dropout p = 0.1 for classifier-free guidance, Ho & Salimans 2022)
       eps_guided = eps(z_t, t, null) + s * (eps(z_t, t, y) - eps(z_t, t, null))
   trained with lesson 04's objective (v prediction, min-SNR-5 weights, cosine schedule) on the
   scaled latents; sample with DDIM, then decode: x = D(z_0 / scale). We measure it against the same
   UNet trained in pixel space for the same wall-clock time: training and sampling images per second,
   Frechet distance on a shapes classifier's features and class accuracy of guided samples.
4. Editing with a trained model. SDEdit (Meng et al. 2022): noise an image's latent to t and denoise
   it under another label; small t keeps the image, large t follows the label. Inpainting: at every
   DDIM step the known part of the latent is replaced by the known latent noised to the current t,
       z_s <- m * (sqrt(ab_s) z_known + sqrt(1 - ab_s) eps) + (1 - m) * z_s,
   so the last step (ab = 1) returns the known part exactly.
5. Fine-tuning with LoRA (Hu et al. 2022): freeze the UNet and learn low-rank updates
       W' = W + (alpha / r) B A,   A: r x in (random), B: out x r (zeros, so W' = W at the start)
   on its attention projections, convolutions and embedding layers. A k x k conv gets a k x k conv
   down to r channels (A) and a 1 x 1 conv back up (B); their product is a k x k conv, so the update
   merges into the weight exactly. We teach the model a colour it never saw (orange) from a few
   hundred images, with under 5% of its parameters trainable, save the adapter as its own small file
   and merge it for sampling.

Run
---
    python 07_latent.py                 # 17 min on a 2-core CPU (OMP_NUM_THREADS=1, shared with 2 other jobs)
    python 07_latent.py --quick         # seconds: a smoke test
    python 07_latent.py --factor 8      # 4 x 4 x 4 latents (or --factor 2: 16 x 16 x 4)
    python 07_latent.py --fixed-steps 300,1500   # step budgets instead of seconds: same numbers every run

It writes runs/07/{vae,pixel,latent}.pt and runs/07/lora.pt (the adapter alone), and figures/07_recon.png,
07_latent_vs_pixel.png, 07_samples.png, 07_sdedit.png, 07_inpaint.png, 07_lora.png. The pixel and
latent UNets train for a wall-clock budget (--seconds), so their step counts, and the numbers after
them, depend on the machine's load; --fixed-steps makes a run repeat exactly.
"""

# %% Setup: imports, command line, device
import argparse
import copy
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

FORMAT = "dmfs-07-v1"  # checkpoint format tag
ORANGE = (255, 140, 0)  # the colour the base model never sees; LoRA teaches it


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


def bf16_supported(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return False


def parse_args(argv=None):
    p = Parser(description="Lesson 07: latent diffusion, editing and LoRA fine-tuning.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--n-images", type=int, default=10_000, help="shapes images (a fifth held out for the metrics)")
    a("--factor", type=int, default=4, choices=[2, 4, 8], help="VAE downsampling: 32x32 -> (32/factor)^2 latents")
    a("--z-ch", type=int, default=4, help="latent channels")
    a("--vae-ch", type=int, default=16, help="VAE width")
    a("--vae-steps", type=int, default=1600, help="VAE training steps")
    a("--vae-lr", type=float, default=3e-3)
    a("--kl-weight", type=float, default=1e-4, help="weight of the KL term (per latent element)")
    a("--colour-jitter", type=float, default=0.5, help="fraction of VAE training images given random colours")
    a("--base-ch", type=int, default=32, help="UNet width (the same for pixel and latent models)")
    a("--ch-mult", default="1,2,2", help="UNet channel multipliers per level")
    a("--batch-size", type=int, default=64)
    a("--lr", type=float, default=1e-3)
    a("--warmup", type=int, default=100, help="linear learning-rate warmup steps")
    a("--ema-decay", type=float, default=0.999)
    a("--p-uncond", type=float, default=0.1, help="label dropout for classifier-free guidance")
    a("--seconds", type=float, default=240, help="training budget of each UNet (wall clock)")
    a("--fixed-steps", default="", metavar="PIXEL,LATENT",
      help="step budgets instead of --seconds (reproducible), e.g. 300,1500")
    a("--guidance", type=float, default=2.0, help="classifier-free guidance scale s")
    a("--sample-steps", type=int, default=20, help="DDIM steps")
    a("--eval-samples", type=int, default=250, help="samples per Frechet distance")
    a("--clf-steps", type=int, default=300, help="training steps of the metric's classifier")
    a("--lora-rank", type=int, default=2)
    a("--lora-alpha", type=float, default=2.0)
    a("--lora-images", type=int, default=300, help="orange images to fine-tune on")
    a("--lora-steps", type=int, default=600)
    a("--lora-lr", type=float, default=3e-3)
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto: bf16 autocast on CUDA and on CPUs with bf16 units, else fp32")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    a("--seed", type=int, default=0)
    a("--out", default="figures", help="folder for the figures")
    a("--run-dir", default="runs/07", help="checkpoint folder")
    a("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    args = p.parse_args(argv)
    for name in ("n_images", "z_ch", "vae_ch", "vae_steps", "base_ch", "batch_size", "sample_steps",
                 "eval_samples", "clf_steps", "lora_rank", "lora_images", "lora_steps"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    for name in ("vae_lr", "lr", "lora_lr", "seconds", "lora_alpha"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.kl_weight < 0 or args.warmup < 0 or not 0 <= args.ema_decay < 1 or not 0 <= args.p_uncond < 1 \
            or not 0 <= args.colour_jitter <= 1:
        fail("--kl-weight and --warmup must be >= 0, --ema-decay and --p-uncond in [0, 1), --colour-jitter in [0, 1]")
    if args.n_images < 100:
        fail(f"--n-images must be at least 100 (got {args.n_images})")
    try:
        args.ch_mult = tuple(int(c) for c in args.ch_mult.split(","))
    except ValueError:
        fail(f"--ch-mult must be integers separated by commas, like 1,2,2 (got {args.ch_mult!r})")
    if args.fixed_steps:
        try:
            args.fixed_steps = tuple(int(s) for s in args.fixed_steps.split(","))
            assert len(args.fixed_steps) == 2 and min(args.fixed_steps) > 0
        except (ValueError, AssertionError):
            fail(f"--fixed-steps takes two positive step counts, PIXEL,LATENT, like 300,1500 "
                 f"(got {args.fixed_steps!r})")
    latent = 32 // args.factor
    k = 2 ** (len(args.ch_mult) - 1)
    if latent % k:
        fail(f"--factor {args.factor} gives {latent}x{latent} latents, which a UNet with --ch-mult "
             f"{','.join(map(str, args.ch_mult))} cannot halve {len(args.ch_mult) - 1} times; use fewer levels")
    if args.quick:
        args.n_images, args.vae_steps, args.base_ch, args.vae_ch = 600, 40, 16, 16
        args.batch_size, args.warmup, args.seconds = 16, 5, 2.0
        args.fixed_steps = (6, 12) if args.fixed_steps else ()
        args.sample_steps, args.eval_samples, args.clf_steps = 4, 40, 30
        args.lora_images, args.lora_steps = 32, 10
    return args


# %% Noise schedule and the closed form q(x_t | x_0) (as in lesson 01)
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


def recolour(images, captions, rgb):
    """The same shapes in another colour: a shapes image is mask * colour, so mask = max channel /
    the colour's max channel (the colour is the caption's third word). uint8 [N, 3, S, S] -> same."""
    peak = torch.tensor([max(COLORS[c.split()[2]]) for c in captions], dtype=torch.float32).view(-1, 1, 1, 1)
    mask = images.float().amax(1, keepdim=True) / peak  # [N, 1, S, S] in [0, 1]
    return (mask * torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)).round().clamp(0, 255).to(torch.uint8)


def nearest_colour(x_uint8):
    """Index into list(COLORS) + ["orange"] of the nearest colour to an image's foreground: the mean
    chromaticity (rgb / max channel) of its pixels brighter than half its brightest. [N] int64."""
    x = x_uint8.float()
    bright = x.amax(1)  # [N, S, S]
    fg = (bright > 0.5 * bright.amax((1, 2), keepdim=True)).float().unsqueeze(1)  # [N, 1, S, S]
    chroma = ((x / bright.clamp(min=1).unsqueeze(1)) * fg).sum((2, 3)) / fg.sum((2, 3)).clamp(min=1)  # [N, 3]
    palette = torch.tensor([*COLORS.values(), ORANGE], dtype=torch.float32)
    palette = palette / palette.amax(1, keepdim=True)  # [7, 3]
    return torch.cdist(chroma, palette).argmin(1)


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


# %% The class-conditional UNet (lesson 06's, without the text cross-attention)
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


class ResBlock(nn.Module):
    """skip(x) + conv(SiLU(GN(conv(SiLU(GN(x)))) * (1 + scale) + shift)), then optional self-attention.

    (B, C_in, H, W) -> (B, C_out, H, W).
    """

    def __init__(self, c_in, c_out, emb_dim, dropout=0.0, attn_heads=0):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # (time + label) embedding -> per-channel (scale, shift)
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


class UNet(nn.Module):
    """eps_theta(x_t, t, y): (B, in_ch, H, W), int64 [B] -> (B, out_ch, H, W).

    As in lesson 03, plus: num_classes > 0 adds a label embedding with num_classes + 1 rows (the
    last, index num_classes, is the null label "no condition") to the time embedding. Parameter names
    are lesson 06's, so a 06 state dict with ctx_dim=0 loads here.
    """

    def __init__(self, in_ch=3, out_ch=None, base_ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                 attn_levels=(2,), dropout=0.0, heads=4, num_classes=0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.base_ch, self.levels, self.num_classes = base_ch, len(ch_mult), num_classes
        emb_dim = 4 * base_ch
        self.time_mlp = nn.Sequential(nn.Linear(base_ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
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

    def forward(self, x, t, y=None):
        """y int64 [B] (num_classes = null)."""
        self.check_size(*x.shape[-2:])
        emb = self.time_mlp(timestep_embedding(t, self.base_ch))  # [B, 4 base_ch]
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
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


# %% The objective (lesson 04): v prediction, min-SNR weights
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


# %% Classifier-free guidance (lesson 06) and DDIM (lesson 04's sampler, plus a start time and inpainting)
def guided_eps(model, x, t, y, scale, y_null=None):
    """Classifier-free guidance: out = out_uncond + scale (out_cond - out_uncond).

    Returns the guided output in the model's own parametrisation: v for our default --pred v (eps for an
    eps model); to_eps_x0 turns it into eps. This is allowed because eps = sqrt(1 - ab) x_t + sqrt(ab) v is
    affine in v with coefficients fixed by (x_t, t), and an affine map commutes with the combination
    above (its weights 1 - s and s sum to one): guiding v and guiding eps give the same eps.
    Conditional and unconditional outputs come from one forward pass over the doubled batch; scales 0 and
    1 need only one half, and return exactly the unconditional or the conditional output.
    y: labels int64 [B] (y_null defaults to the null label model.num_classes) or tokens [B, L].
    """
    if y_null is None:
        y_null = torch.full_like(y, model.num_classes)
    if scale == 0:
        return model(x, t, y_null)
    if scale == 1:
        return model(x, t, y)
    out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).float().chunk(2)
    return torch.lerp(out_u, out_c, scale)  # out_u + scale (out_c - out_u)


@torch.no_grad()
def ddim_sample(model, x_T, alpha_bar, steps, pred, autocast=nullcontext, clip=True, t_start=None,
                known=None, mask=None, generator=None):
    """x_T [B, C, S, S] -> x_0. Visits t_i = round(i (T-1) / (steps-1)) from T-1 (or t_start, for SDEdit)
    down to 0, then one last step from t = 0 to the clean image (alpha_bar = 1).

    clip clamps x0_hat to the data range [-1, 1] (pixels; not latents, whose range is not bounded).
    Inpainting: where mask = 1, x is replaced after every step by `known` noised to the new t, so the
    last step returns `known` there exactly.
    """
    T = len(alpha_bar)
    ts = torch.linspace(T - 1 if t_start is None else t_start, 0, steps).round().long().tolist()
    x = x_T
    for i, t in enumerate(ts):
        ab = alpha_bar[t].to(x.device, torch.float32).view(1, 1, 1, 1)
        with autocast():
            out = model(x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
        eps, x0 = to_eps_x0(pred, out.float(), x, ab)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # keep eps consistent with the clipped x0
        ab_next = alpha_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0  # the last step lands on x_0
        x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps
        if known is not None:  # z_s <- m * q(known at s) + (1 - m) * z_s
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x = mask * (math.sqrt(ab_next) * known + math.sqrt(1 - ab_next) * noise) + (1 - mask) * x
    return x


# %% Measuring quality (lesson 04): a small classifier's features and the Frechet distance
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


# %% The autoencoder: a small KL-regularised convolutional VAE
class VAEBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))): a residual block without time embedding. Shape kept."""

    def __init__(self, ch):
        super().__init__()
        self.net = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                 group_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.net(x)


class VAE(nn.Module):
    """Encoder (B, 3, S, S) -> mu, logvar (B, z_ch, S/f, S/f); decoder back. f = factor (2, 4 or 8):
    log2(f) stride-2 convs down, as many nearest-upsample + conv steps up; width ch, 2ch, 4ch, ..."""

    def __init__(self, in_ch=3, z_ch=4, factor=4, ch=32):
        super().__init__()
        n = int(math.log2(factor))
        widths = [ch * min(2 ** i, 4) for i in range(n + 1)]
        enc = [nn.Conv2d(in_ch, widths[0], 3, padding=1)]
        for i in range(n):  # (B, w_i, S, S) -> (B, w_i+1, S/2, S/2)
            enc += [VAEBlock(widths[i]), nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)]
        enc += [VAEBlock(widths[n]), group_norm(widths[n]), nn.SiLU(), nn.Conv2d(widths[n], 2 * z_ch, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(z_ch, widths[n], 3, padding=1), VAEBlock(widths[n])]
        for i in reversed(range(n)):  # (B, w_i+1, s, s) -> (B, w_i, 2s, 2s)
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(widths[i + 1], widths[i], 3, padding=1),
                    VAEBlock(widths[i])]
        dec += [group_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], in_ch, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)
        noise = torch.randn(mu.shape, generator=generator).to(mu.device)
        z = mu + (0.5 * logvar).exp() * noise  # the reparameterisation trick: z ~ N(mu, sigma^2), differentiable
        return self.decode(z), mu, logvar


def kl_divergence(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) per element, averaged: 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)."""
    return 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean()


def latent_scale(z):
    """1 / std of a batch of latents: multiplying by it gives unit variance (SD's 0.18215)."""
    return 1.0 / z.float().std().item()


def psnr(a, b):
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2), per image [N]."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-10))


def train_vae(vae, images, args, device, autocast, gen):
    """Adam on reconstruction + kl_weight * KL, with a cosine-decayed learning rate."""
    opt = torch.optim.Adam(vae.parameters(), args.vae_lr)
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        x = to_unit(images[torch.randint(len(images), (args.batch_size,), generator=gen)])
        # colour jitter on part of the batch: random per-channel gains, so the autoencoder learns colours
        # in general, not only the dataset's six (as SD's VAE is trained on broader data than any fine-tune)
        gain = torch.rand(len(x), 3, 1, 1, generator=gen) * 1.1
        jitter = (torch.rand(len(x), 1, 1, 1, generator=gen) < args.colour_jitter).float()
        x = (jitter * ((x + 1) * gain - 1).clamp(-1, 1) + (1 - jitter) * x).to(device)
        with autocast():
            x_hat, mu, logvar = vae(x, gen)
        rec, kl = (x_hat.float() - x).square().mean(), kl_divergence(mu.float(), logvar.float())
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == args.vae_steps:
            print(f"\r  VAE step {step + 1}/{args.vae_steps}  reconstruction {rec.item():.4f}  KL {kl.item():.2f}",
                  end="", flush=True)
    print()
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images, device, batch=500):
    """uint8 images [N, 3, S, S] -> posterior means [N, z_ch, S/f, S/f] and mean sigma."""
    mus, sig = [], 0.0
    for i in range(0, len(images), batch):
        mu, logvar = vae.encode(to_unit(images[i:i + batch]).to(device))
        mus.append(mu.float().cpu())
        sig += (0.5 * logvar.float()).exp().sum().item()
    mu = torch.cat(mus)
    return mu, sig / mu.numel()


@torch.no_grad()
def decode_all(vae, z, device, batch=500):
    return torch.cat([vae.decode(z[i:i + batch].to(device)).float().cpu() for i in range(0, len(z), batch)])


# %% Training a class-conditional denoiser for a budget (seconds or steps)
def train_diffusion(data, labels, model, args, device, autocast, alpha_bar, gen, budget, marks, name):
    """Lesson 04's training step (v target, min-SNR weights, warmup, clipping at 1, EMA) with labels
    dropped to the null label with probability p_uncond. budget = ("seconds", s) or ("steps", n); an
    EMA copy is kept whenever the budget passes one of `marks`. Returns (snapshots, images/s), where
    snapshots are (elapsed seconds, step, EMA state dict)."""
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    kind, total = budget
    marks, snaps, step, busy = sorted(marks), [], 0, 0.0
    B = args.batch_size
    while True:
        used = busy if kind == "seconds" else step
        while marks and used >= marks[0]:
            marks.pop(0)
            if not snaps or snaps[-1][1] != step:  # one slow step can pass several marks: keep one copy
                snaps.append((busy, step, copy.deepcopy(ema.state_dict())))
        if used >= total:
            break
        idx = torch.randint(len(data), (B,), generator=gen)
        x0, y = data[idx].to(device), labels[idx].to(device)
        y = torch.where(torch.rand(B, generator=gen).to(device) < args.p_uncond, model.num_classes, y)  # CFG dropout
        t = torch.randint(len(alpha_bar), (B,), generator=gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        tic = time.perf_counter()
        ab = alpha_bar[t].float().view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # q_sample
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))  # linear warmup
        with autocast():
            out = model(x_t, t, y)
        per_sample = (out.float() - target_of("v", x0, eps, ab)).square().mean((1, 2, 3))
        loss = (loss_weight("min-snr", "v", ab.view(-1)) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))  # EMA warmup
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)  # ema = decay * ema + (1 - decay) * w
        if device.type == "cuda":
            torch.cuda.synchronize()
        busy += time.perf_counter() - tic
        step += 1
        if step % 20 == 0:
            print(f"\r  {name}: step {step}  {busy:.0f} s  loss {loss.item():.4f}  {step * B / busy:.0f} img/s ",
                  end="", flush=True)
    print()
    return snaps, step * B / max(busy, 1e-9)


@torch.no_grad()
def generate(model, y, shape, alpha_bar, args, autocast, gen, device, vae=None, scale=1.0, batch=250):
    """Guided DDIM samples for labels y [N]: pixels in [-1, 1] (decoded when vae is given), and the
    sampling speed in images/s (decoding included)."""
    x_T = torch.randn(len(y), *shape, generator=gen)
    tic, out = time.perf_counter(), []
    for i in range(0, len(y), batch):
        yb = y[i:i + batch].to(device)
        fn = lambda x, t: guided_eps(model, x, t, yb, args.guidance)  # noqa: E731
        x = ddim_sample(fn, x_T[i:i + batch].to(device), alpha_bar, args.sample_steps, "v", autocast,
                        clip=vae is None)
        if vae is not None:
            x = vae.decode(x / scale)
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out), len(y) / (time.perf_counter() - tic)


# %% LoRA: low-rank adapters on a frozen model
class LoRA(nn.Module):
    """base(x) + (alpha / r) B(A(x)) with base frozen. Linear: A in -> r, B r -> out. Conv2d: A is a
    k x k conv (same stride, padding) to r channels, B a 1 x 1 conv back; B starts at zero."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / rank
        if isinstance(base, nn.Linear):
            self.A = nn.Linear(base.in_features, rank, bias=False)
            self.B = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))  # as nn.Linear's default
        nn.init.zeros_(self.B.weight)  # so the adapted model starts as the base model
        self.to(base.weight.device, base.weight.dtype)  # on the base's device: a CUDA model gets CUDA adapters

    def forward(self, x):
        return self.base(x) + self.scale * self.B(self.A(x))

    def merged(self):
        """A plain layer with W + (alpha / r) B A: Linear [out, r] @ [r, in]; conv: for each tap of
        the k x k kernel, [out, r] @ [r, in] (the 1 x 1 conv after the k x k one)."""
        layer = copy.deepcopy(self.base)
        delta = torch.einsum("or,ri...->oi...", self.B.weight.flatten(1), self.A.weight)
        layer.weight.data += self.scale * delta
        return layer.requires_grad_(False)


def add_lora(model, rank, alpha):
    """Freeze the model and wrap attention qkv/proj and ResBlock conv1/conv2/emb in LoRA, in place."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        names = ("qkv", "proj") if isinstance(module, Attention) else \
            ("conv1", "conv2", "emb") if isinstance(module, ResBlock) else ()
        for n in names:
            setattr(module, n, LoRA(getattr(module, n), rank, alpha))
    return model


def merge_lora(model):
    """Replace every LoRA by its merged layer, in place: the state dict is the base model's again."""
    for module in list(model.modules()):
        for n, child in list(module.named_children()):
            if isinstance(child, LoRA):
                setattr(module, n, child.merged())
    return model


def lora_state(model):
    """Only the adapters' weights (names ending in .A.weight / .B.weight)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith((".A.weight", ".B.weight"))}


# %% Figures
def bar_panel(d, box, groups, series, title, ylabel):
    """Grouped bars on a log y axis. groups: list of (label, [one value per series]); series: names."""
    x0, y0, x1, y1 = box
    f = font(13)
    vals = [v for _, vs in groups for v in vs]
    lo, hi = 10 ** math.floor(math.log10(min(vals))), 10 ** math.ceil(math.log10(max(vals)) + 0.3)
    to_y = lambda v: y1 - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (y1 - y0)  # noqa
    for v in log_ticks(lo, hi):
        d.line([(x0 + 1, to_y(v)), (x1 - 1, to_y(v))], fill=(230, 230, 230))
        d.line([(x0 - 4, to_y(v)), (x0, to_y(v))], fill="black")
        d.text((x0 - 6, to_y(v)), fmt(v), fill="black", font=f, anchor="rm")
    d.rectangle(box, outline="black")
    gw = (x1 - x0) / len(groups)
    for g, (label, vs) in enumerate(groups):
        bw = 0.7 * gw / len(vs)
        for k, v in enumerate(vs):
            bx = x0 + g * gw + 0.15 * gw + k * bw
            d.rectangle([bx, to_y(v), bx + bw - 3, y1 - 1], fill=PALETTE[k])
            d.text((bx + bw / 2, to_y(v) - 2), f"{v:.0f}" if v >= 10 else f"{v:.1f}", fill="black", font=f,
                   anchor="md")
        d.text((x0 + (g + 0.5) * gw, y1 + 6), label, fill="black", font=f, anchor="ma")
    lx = x1 - 12 - max(int(f.getlength(name)) for name in series) - 24  # legend in the top-right corner
    for k, name in enumerate(series):
        d.rectangle([lx, y0 + 10 + 18 * k, lx + 18, y0 + 22 + 18 * k], fill=PALETTE[k])
        d.text((lx + 24, y0 + 16 + 18 * k), name, fill="black", font=f, anchor="lm")
    d.text((x0 - 4, y0 - 8), ylabel, fill="black", font=f, anchor="ld")
    d.text(((x0 + x1) / 2, y0 - 26), title, fill="black", font=font(15), anchor="md")


def save_comparison_plot(path, curves, rates, floor):
    """Left: FD against training seconds; right: training and sampling speed."""
    img = Image.new("RGB", (1150, 470), "white")
    d = ImageDraw.Draw(img)
    xs = [x for _, pts in curves for x, _ in pts]
    ys = [y for _, pts in curves for _, y in pts] + [floor]
    ylim = (max(min(ys) * 0.7, 1e-3), max(ys) * 1.4)
    to_px = plot_axes(d, (80, 60, 560, 380), (0, max(xs) * 1.05), ylim, "training seconds (wall clock, this CPU)",
                      "FD (log)", "Frechet distance of guided samples", logy=True)
    f = font(13)
    for k, (label, pts) in enumerate(curves):
        px = [to_px(x, y) for x, y in pts]
        d.line(px, fill=PALETTE[k], width=2)
        for x, y in px:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=PALETTE[k])
        d.line([(330, 80 + 18 * k), (355, 80 + 18 * k)], fill=PALETTE[k], width=3)
        d.text((360, 80 + 18 * k), label, fill="black", font=f, anchor="lm")
    fy = to_px(0, floor)[1]
    d.line([(81, fy), (559, fy)], fill=(120, 120, 120), width=1)
    d.text((90, fy - 3), f"real vs real floor {floor:.2f}", fill=(90, 90, 90), font=f, anchor="ld")
    bar_panel(d, (680, 60, 1120, 380), [("training", rates[0]), ("sampling (guided, DDIM)", rates[1])],
              ["pixel UNet", "latent UNet (sampling: + decoding)"], "speed on this CPU (log scale)", "images/s")
    img.save(path)


def save_checkpoint(path, ckpt):
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half checkpoint at `path`


# %% The lesson, start to finish
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_supported(device))
    if use_bf16 and not bf16_supported(device):
        fail(f"--precision bf16 is not supported on this {device.type}; use --precision fp32")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.run_dir, exist_ok=True)
    start = time.time()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = {k: v for k, v in vars(args).items()}

    # -- data: shapes, a fifth held out; the metric's classifier and its floor and ceiling
    images, labels, captions = make_shapes(args.n_images, 32, args.seed)
    n_hold = args.n_images // 5
    held, train = torch.arange(n_hold), torch.arange(n_hold, args.n_images)
    n_eval = min(args.eval_samples, n_hold // 2)
    clf = train_classifier(images[train], labels[train], len(SHAPES), device, args.clf_steps, args.seed)
    f_real, c_real = features_and_classes(clf, to_unit(images[held[:n_eval]]), device)
    f_real2, _ = features_and_classes(clf, to_unit(images[held[n_eval:2 * n_eval]]), device)
    f_noise, _ = features_and_classes(clf, torch.randn(n_eval, 3, 32, 32, generator=gen).clamp(-1, 1), device)
    floor, ceiling = frechet_distance(f_real2, f_real), frechet_distance(f_noise, f_real)
    print(f"shapes: {len(train)} training, {n_hold} held-out images | {device}, "
          f"{'bf16 autocast' if use_bf16 else 'fp32'} | classifier accuracy on held-out "
          f"{(c_real == labels[held[:n_eval]]).float().mean():.1%}; FD floor {floor:.2f}, ceiling {ceiling:.2f}")

    # %% 1. The autoencoder
    t_vae = time.time()
    vae = VAE(3, args.z_ch, args.factor, args.vae_ch).to(device)
    n_vae = sum(p.numel() for p in vae.parameters())
    print(f"1. VAE {n_vae / 1e6:.2f}M params: 3x32x32 -> {args.z_ch}x{32 // args.factor}x{32 // args.factor} "
          f"({3 * 32 * 32 / (args.z_ch * (32 // args.factor) ** 2):.0f}x fewer numbers), kl weight {args.kl_weight:g}")
    vae = train_vae(vae, images[train], args, device, autocast, gen)
    vae_seconds = time.time() - t_vae
    x_held = to_unit(images[held[:n_eval]])
    with torch.no_grad():
        rec = decode_all(vae, encode_all(vae, images[held[:n_eval]], device)[0], device)
    p = psnr(rec, x_held)
    f_rec, c_rec = features_and_classes(clf, rec, device)
    rec_acc, rec_fd = (c_rec == labels[held[:n_eval]]).float().mean().item(), frechet_distance(f_rec, f_real)
    print(f"   trained in {vae_seconds:.0f} s; held-out PSNR {p.mean():.2f} dB (min {p.min():.2f}); on reconstructions "
          f"classifier accuracy {rec_acc:.1%}, FD {rec_fd:.2f}")
    save_checkpoint(os.path.join(args.run_dir, "vae.pt"), {"format": FORMAT, "config": config,
                                                           "model": vae.state_dict(), "step": args.vae_steps})

    # -- encode the training set once; the scale factor that gives the latents unit variance
    t_enc = time.time()
    z_mu, sigma = encode_all(vae, images[train], device)
    scale = latent_scale(z_mu)
    z_train = z_mu * scale  # [N, z_ch, S/f, S/f], unit variance: what the latent UNet learns
    enc_seconds = time.time() - t_enc
    overhead = vae_seconds + enc_seconds
    print(f"   encoded {len(train)} images in {enc_seconds:.1f} s: posterior means have std {1 / scale:.4f} "
          f"(mean {z_mu.mean():.3f}), mean sigma {sigma:.4f}; scale factor = 1/std = {scale:.4f}; scaled std "
          f"{z_train.std():.3f}")
    show = held[:8]
    with torch.no_grad():
        mu_show = vae.encode(to_unit(images[show]).to(device))[0].float()
        rec_show = vae.decode(mu_show).float().cpu()
    lat = (mu_show * scale).cpu()  # each latent channel as a grey image, upscaled to 32x32
    lat_img = F.interpolate(lat.clamp(-2.5, 2.5).flatten(0, 1)[:, None] / 2.5, size=32, mode="nearest")
    rows = [to_uint8(to_unit(images[show])), to_uint8(rec_show)] + \
           [to_uint8(lat_img.view(8, args.z_ch, 32, 32)[:, c:c + 1].expand(-1, 3, -1, -1)) for c in range(args.z_ch)]
    labelled(grid_image(torch.cat(rows), nrow=8, scale=3),
             f"VAE (f={args.factor}): held-out images, reconstructions ({p.mean():.1f} dB), latent channels",
             row_labels=["original", "reconstruction"] + [f"z channel {c}" for c in range(args.z_ch)]).save(
        os.path.join(args.out, "07_recon.png"))

    # %% 2. Pixel against latent diffusion: the same UNet width, the same wall-clock budget
    alpha_bar = alpha_bar_of(cosine_betas(1000)).to(device)
    unet_kw = dict(base_ch=args.base_ch, ch_mult=args.ch_mult, num_classes=len(SHAPES))
    x_train = to_unit(images[train])
    if args.fixed_steps:
        (sp, sl), kind = args.fixed_steps, "steps"
        marks_p, marks_l = [sp / 2, sp], [sl / 4, sl / 2, sl]
    else:  # the same seconds each; the latent model is also judged at (budget - VAE and encoding time)
        sp = sl = args.seconds
        kind, e2e = "seconds", args.seconds - overhead
        marks_p, marks_l = [sp / 2, sp], [sl / 4, sl / 2, sl] + ([e2e] if e2e > 0 else [])
    print(f"2. training both UNets (base_ch {args.base_ch}, ch_mult {args.ch_mult}, batch {args.batch_size}): "
          f"pixel for {sp:g} {kind}, latent for {sl:g} {kind}")
    results = {}
    for name, data, budget, marks in [("pixel", x_train, sp, marks_p), ("latent", z_train, sl, marks_l)]:
        torch.manual_seed(args.seed)
        net = UNet(in_ch=data.shape[1], **unet_kw).to(device)
        snaps, rate = train_diffusion(data, labels[train], net, args, device, autocast, alpha_bar, gen,
                                      (kind, budget), marks, name)
        results[name] = dict(net=net, snaps=snaps, train_rate=rate, params=sum(p.numel() for p in net.parameters()))
    print(f"   quality of each snapshot: {n_eval} guided samples (scale {args.guidance:g}, DDIM {args.sample_steps} "
          f"steps), FD on the classifier's features (the latent model's floor is the VAE's {rec_fd:.2f})")
    y_eval = torch.arange(n_eval) % len(SHAPES)
    for name in ("pixel", "latent"):
        r = results[name]
        r["curve"] = []
        for secs, step, state in r["snaps"]:
            r["net"].load_state_dict(state)
            r["net"].eval()
            shape = z_train.shape[1:] if name == "latent" else (3, 32, 32)
            x, srate = generate(r["net"], y_eval, shape, alpha_bar, args, autocast,
                                torch.Generator().manual_seed(args.seed + 7), device,
                                vae if name == "latent" else None, scale)
            f_g, c_g = features_and_classes(clf, x, device)
            fd, acc = frechet_distance(f_g, f_real), (c_g == y_eval).float().mean().item()
            r["curve"].append((secs, step, fd, acc))
            r.update(samples=x, sample_rate=srate, fd=fd, acc=acc, secs=secs, steps=step)
            print(f"   {name:6} step {step:5d}  {secs:6.0f} s  FD {fd:7.2f}  class accuracy {acc:6.1%}  "
                  f"sampling {srate:6.1f} img/s")
        save_checkpoint(os.path.join(args.run_dir, f"{name}.pt"), {
            "format": FORMAT, "config": config, "model": r["net"].state_dict(), "ema": r["snaps"][-1][2],
            "step": r["steps"], "scale": scale if name == "latent" else 1.0})
    rp, rl = results["pixel"], results["latent"]
    print("\n| model | UNet params | train img/s | sample img/s | steps | UNet s | total s | FD | class acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [("pixel", rp, rp["curve"][-1], 0.0), ("latent", rl, rl["curve"][-1], overhead)]
    if kind == "seconds" and e2e > 0:  # the snapshot at which UNet + VAE + encoding seconds = the pixel budget
        rows.append(("latent, VAE counted", rl, min(rl["curve"], key=lambda c: abs(c[0] - e2e)), overhead))
    for name, r, (secs, step, fd, acc), extra in rows:
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['train_rate']:.0f} | {r['sample_rate']:.1f} | {step} | "
              f"{secs:.0f} | {secs + extra:.0f} | {fd:.2f} | {acc:.1%} |")
    print(f"floor (real vs real) {floor:.2f}, VAE reconstructions {rec_fd:.2f}, ceiling (noise vs real) {ceiling:.2f}; "
          f"VAE training + encoding {overhead:.0f} s")
    print(f"latent/pixel: training {rl['train_rate'] / rp['train_rate']:.1f}x, sampling "
          f"{rl['sample_rate'] / rp['sample_rate']:.1f}x the images/s")
    curves = [("pixel", [(c[0], c[2]) for c in rp["curve"]]),
              ("latent (UNet time)", [(c[0], c[2]) for c in rl["curve"]])]
    if kind == "seconds":
        curves.append(("latent (+VAE, encoding)", [(c[0] + overhead, c[2]) for c in rl["curve"]]))
    save_comparison_plot(os.path.join(args.out, "07_latent_vs_pixel.png"), curves,
                         ([rp["train_rate"], rl["train_rate"]], [rp["sample_rate"], rl["sample_rate"]]), floor)
    order = torch.cat([torch.nonzero(y_eval == c).flatten()[:8] for c in range(len(SHAPES))])
    both = torch.cat([to_uint8(rp["samples"][order].view(len(SHAPES), -1, 3, 32, 32)),
                      to_uint8(rl["samples"][order].view(len(SHAPES), -1, 3, 32, 32))], dim=1).flatten(0, 1)
    labelled(grid_image(both, nrow=2 * (len(order) // len(SHAPES)), scale=3),
             f"guided samples (s={args.guidance:g}): pixel UNet, FD {rp['fd']:.2f} (left) | latent UNet, FD "
             f"{rl['fd']:.2f} (right)", row_labels=list(SHAPES)).save(os.path.join(args.out, "07_samples.png"))

    # %% 3. Editing with the latent model: SDEdit and inpainting
    net = rl["net"].eval()
    target = SHAPES.index("star")
    src_pool = held[labels[held] != target]
    src = src_pool[:64]
    z_src = vae.encode(to_unit(images[src]).to(device))[0].float() * scale
    fracs = (0.3, 0.5, 0.7, 0.9)
    cols, show_n = [to_uint8(to_unit(images[src[:6]]))], 6
    print(f"3. SDEdit: {len(src)} held-out non-star images, noised to t and denoised as 'star' "
          f"(scale {args.guidance:g})")
    for frac in fracs:
        t0 = int(frac * 999)
        g = torch.Generator().manual_seed(args.seed + 11)
        z_t = q_sample(z_src, torch.full((len(src),), t0, device=device), alpha_bar,
                       torch.randn(z_src.shape, generator=g).to(device))
        yb = torch.full((len(src),), target, device=device)
        fn = lambda x, t: guided_eps(net, x, t, yb, args.guidance)  # noqa: E731
        z0 = ddim_sample(fn, z_t, alpha_bar, max(2, round(args.sample_steps * frac)), "v", autocast, clip=False,
                         t_start=t0)
        x = vae.decode(z0 / scale).float().clamp(-1, 1).cpu()
        cls = features_and_classes(clf, x, device)[1]
        kept = (nearest_colour(to_uint8(x)) == nearest_colour(images[src])).float().mean().item()
        print(f"   t = {t0:3d}: classified as star {(cls == target).float().mean():6.1%}, colour kept {kept:6.1%}, "
              f"PSNR to the source {psnr(x, to_unit(images[src])).mean():5.2f} dB")
        cols.append(to_uint8(x[:show_n]))
    grid = torch.stack(cols, 1).flatten(0, 1)
    labelled(grid_image(grid, nrow=len(cols), scale=3), "SDEdit: noise the latent to t, denoise as 'star'",
             col_labels=["source"] + [f"t={int(f * 999)}" for f in fracs]).save(os.path.join(args.out, "07_sdedit.png"))

    centre = held[[("centre" in captions[i]) for i in held.tolist()]][:4]  # shapes the cut goes through
    centre = centre if len(centre) == 4 else held[:4]
    zs = z_train.shape[-1]
    mask = torch.zeros(1, 1, zs, zs, device=device)
    mask[..., :zs // 2] = 1  # known: the left half; the right half is generated
    z_known = vae.encode(to_unit(images[centre]).to(device))[0].float() * scale
    rows, accs, err, pk, kept = [], [], 0.0, [], []
    for i in range(len(centre)):
        zk = z_known[i:i + 1].expand(len(SHAPES), -1, -1, -1)
        yb = torch.arange(len(SHAPES), device=device)
        fn = lambda x, t: guided_eps(net, x, t, yb, args.guidance)  # noqa: E731
        g = torch.Generator().manual_seed(args.seed + 13)
        z0 = ddim_sample(fn, torch.randn(zk.shape, generator=g).to(device), alpha_bar, args.sample_steps, "v",
                         autocast, clip=False, known=zk, mask=mask, generator=g)
        err = max(err, ((z0 - zk) * mask).abs().max().item())
        x = vae.decode(z0 / scale).float().clamp(-1, 1).cpu()
        accs.append((features_and_classes(clf, x, device)[1] == yb.cpu()).float().mean().item())
        kept.append((nearest_colour(to_uint8(x)) == nearest_colour(images[centre[i:i + 1]])).float().mean().item())
        pix_mask = F.interpolate(mask, size=32, mode="nearest").cpu()
        orig = to_unit(images[centre[i:i + 1]])
        mse = ((x - orig).square() * pix_mask).sum((1, 2, 3)) / (3 * pix_mask.sum())  # known pixels only
        pk.append(10 * torch.log10(4 / mse).mean())
        holed = orig * pix_mask + (1 - pix_mask) * 0.3
        rows.append(torch.cat([to_uint8(orig), to_uint8(holed), to_uint8(x)]))
    print(f"   inpainting (latent space, right half of {zs}x{zs} unknown): known latent kept to "
          f"{err:.1e}; known pixels {torch.stack(pk).mean():.2f} dB PSNR to the source (the VAE's reconstruction "
          f"error); class accuracy of the filled images {np.mean(accs):.1%}, colour kept {np.mean(kept):.1%}")
    labelled(grid_image(torch.cat(rows), nrow=2 + len(SHAPES), scale=3),
             "latent inpainting: left half kept (re-noised to t every step), right half generated under each label",
             col_labels=["source", "known"] + list(SHAPES)).save(os.path.join(args.out, "07_inpaint.png"))

    # %% 4. LoRA: teach the frozen latent UNet a colour it never saw (orange)
    lo_imgs, lo_labels, lo_caps = make_shapes(args.lora_images, 32, args.seed + 99)
    lo_imgs = recolour(lo_imgs, lo_caps, ORANGE)
    with torch.no_grad():
        z_mu_o, _ = encode_all(vae, lo_imgs, device)
        rec_o = decode_all(vae, z_mu_o, device)
    z_lora = z_mu_o * scale
    still = (nearest_colour(to_uint8(rec_o)) == len(COLORS)).float().mean()
    print(f"4. LoRA: {args.lora_images} orange shapes; the frozen VAE reconstructs them at "
          f"{psnr(rec_o, to_unit(lo_imgs)).mean():.2f} dB, {still:.0%} still orange "
          "(the UNet can only learn what the autoencoder can represent)")
    base = copy.deepcopy(net).requires_grad_(False)
    lora_net = add_lora(copy.deepcopy(net), args.lora_rank, args.lora_alpha)
    n_train = sum(p.numel() for p in lora_net.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in base.parameters())
    print(f"   rank {args.lora_rank}, alpha {args.lora_alpha:g}: {n_train:,} trainable parameters, "
          f"{100 * n_train / n_all:.2f}% of the UNet's {n_all:,}")
    opt = torch.optim.AdamW([p for p in lora_net.parameters() if p.requires_grad], lr=args.lora_lr, weight_decay=0)
    lora_net.train()
    t_l = time.time()
    for step in range(args.lora_steps):
        idx = torch.randint(len(z_lora), (args.batch_size,), generator=gen)
        x0, y = z_lora[idx].to(device), lo_labels[idx].to(device)
        y = torch.where(torch.rand(len(idx), generator=gen).to(device) < args.p_uncond, len(SHAPES), y)
        t = torch.randint(1000, (len(idx),), generator=gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        ab = alpha_bar[t].float().view(-1, 1, 1, 1)
        with autocast():
            out = lora_net(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, y)
        per = (out.float() - target_of("v", x0, eps, ab)).square().mean((1, 2, 3))
        loss = (loss_weight("min-snr", "v", ab.view(-1)) * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"   fine-tuned {args.lora_steps} steps in {time.time() - t_l:.0f} s (last loss {loss.item():.4f})")
    lora_net.eval()
    lora_path = os.path.join(args.run_dir, "lora.pt")
    save_checkpoint(lora_path, {"format": FORMAT + "-lora", "rank": args.lora_rank, "alpha": args.lora_alpha,
                                "adapter": lora_state(lora_net)})
    full_path = os.path.join(args.run_dir, "latent.pt")
    torch.save(base.state_dict(), full_path + ".weights.tmp")
    full_size = os.path.getsize(full_path + ".weights.tmp")
    os.remove(full_path + ".weights.tmp")
    print(f"   adapter saved to {lora_path}: {os.path.getsize(lora_path) / 1024:.0f} KiB, against "
          f"{full_size / 1024:.0f} KiB for the UNet's weights")
    probe = (torch.randn(4, *z_train.shape[1:], generator=gen).to(device), torch.tensor([0, 250, 500, 999]).to(device),
             torch.arange(4).to(device))
    with torch.no_grad():
        before_merge = lora_net(*probe)
        merged = merge_lora(lora_net)
        after_merge = merged(*probe)
    print(f"   merged into the weights (a plain UNet state dict again); max |adapters - merged| output "
          f"{(before_merge - after_merge).abs().max():.1e}")
    y_l = torch.arange(5 * 8 if args.quick else 200) % len(SHAPES)
    stats = {}
    for name, model in (("before", base), ("after", merged)):
        x, _ = generate(model, y_l, z_train.shape[1:], alpha_bar, args, autocast,
                        torch.Generator().manual_seed(args.seed + 21), device, vae, scale)
        colour = nearest_colour(to_uint8(x))
        acc = (features_and_classes(clf, x, device)[1] == y_l).float().mean().item()
        stats[name] = (x, (colour == len(COLORS)).float().mean().item(), acc)
        print(f"   {name:6}: {stats[name][1]:6.1%} of {len(y_l)} samples orange, class accuracy {acc:6.1%}")
    n_show = 10
    rows = [to_uint8(to_unit(lo_imgs[:n_show])), to_uint8(stats["before"][0][:n_show]),
            to_uint8(stats["after"][0][:n_show])]
    labelled(grid_image(torch.cat(rows), nrow=n_show, scale=3),
             f"LoRA (rank {args.lora_rank}, {100 * n_train / n_all:.1f}% of the parameters): orange, "
             f"{stats['before'][1]:.0%} -> {stats['after'][1]:.0%} of samples",
             row_labels=["fine-tuning data", "before (base)", "after (merged)"]).save(
        os.path.join(args.out, "07_lora.png"))
    names = ("recon", "latent_vs_pixel", "samples", "sdedit", "inpaint", "lora")
    print(f"wrote {', '.join(f'07_{n}.png' for n in names)} to {args.out}/ and checkpoints to {args.run_dir}/; "
          f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
