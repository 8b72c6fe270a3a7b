"""Lesson 06: conditioning. Class labels, guidance, and text, trained from scratch on a CPU.

What you will learn
-------------------
How to ask a diffusion model for *something*: a class ("a star"), or a sentence ("a small red triangle
at the top left"), and how guidance trades diversity for fidelity. Builds on 04 (UNet, v objective with
min-SNR weighting, EMA) and 05 (DDIM); the pieces are re-derived here, and tests/test_consistency.py
pins them to 04.

1. A class-conditional UNet: a learned label embedding is added to the time embedding, so every
   residual block's scale and shift depend on (t, y). The embedding has one extra row, index
   num_classes, the null label "no condition".
2. Classifier-free guidance (Ho & Salimans 2022). During training each sample's label is replaced by
   the null label with probability p_uncond = 0.1, so one network learns both eps(x_t, t, y) and
   eps(x_t, t, null). At sampling time, with scale s,
       eps_hat = eps(x_t, t, null) + s (eps(x_t, t, y) - eps(x_t, t, null))
   s = 0 is the unconditional model, s = 1 the conditional one, s > 1 extrapolates away from
   "anything" towards "this class". Papers and repositories write it three more ways: (1 + w) eps_c -
   w eps_u (Ho & Salimans, w = s - 1), eps_c + (s - 1)(eps_c - eps_u), and torch.lerp(eps_u, eps_c, s);
   all four expand to (1 - s) eps_u + s eps_c (cfg_forms, and a test). Since eps = sqrt(1 - ab) x_t +
   sqrt(ab) v is affine in v at fixed (x_t, t), guiding the v output is the same as guiding eps.
   Conditional and unconditional outputs come from one forward pass over a doubled batch.
3. Classifier guidance (Dhariwal & Nichol 2021). A classifier trained on noisy images, p(y | x_t, t),
   steers an unconditional model along its gradient:
       eps_hat = eps(x_t, t, null) - s sqrt(1 - ab_t) grad_x log p(y | x_t, t)
   (the score of p(x_t) p(y | x_t)^s). Our unconditional model is the class model with the null label;
   the noisy classifier is 04's Classifier plus a time embedding, started from a clean classifier and
   fine-tuned on x_t. Its s is in other units than CFG's (it multiplies a classifier's gradient), so
   it is measured at its own scales (--cg-scales).
4. The trade-off, measured: for CFG at s = 0, 1, 2, 3, 5, 7.5 (and classifier guidance at its
   scales), the class accuracy of the samples (a clean classifier trained on real images judges them)
   and their Frechet distance on its features (as in 04, with the real-vs-real floor). Higher s: more
   samples of the asked-for class, less variety, and past a point less realistic images. For
   classifier guidance we also print how often the guiding classifier itself sees the class: where it
   says yes and the independent judge says no, the gradient has found an adversarial perturbation,
   not a better shape.
5. Text. The shapes' captions, a word-level tokenizer over their vocabulary (a START token begins every
   caption and is never padding; the empty caption, START alone, is the null condition), a small
   transformer encoder trained with the UNet by the diffusion loss alone, and two ways for words to
   reach the UNet: cross-attention from its 8x8 features (queries) to the token features (keys,
   values), padding masked out,  attention(Q, K, V) = softmax(Q K^T / sqrt(d) + mask) V,  and the
   mean of the token features added to the time embedding (where the class model adds its label).
   The text UNet starts as the trained class model's unconditional half (new layers zeroed).
   It trains with the plain v loss (--text-loss-weight none), not 04's min-SNR weighting. Colour is
   a property of the whole shape, readable from x_t down to very low SNR, so the caption only has to
   supply it at the noisiest steps, which decide it when sampling. In x_0 terms min-SNR weights those
   steps by SNR (0.025 at t = 900), the v loss by 1 + SNR, about 1. Measured on the same warm start
   and 900 steps, colour accuracy on seen prompts was 58% with min-SNR and 99% with the v loss, while
   shape accuracy stayed above 90%. The class model keeps min-SNR: trained with the plain v loss its
   shapes were blobs (70% class accuracy at s = 3, 100 per class, against 97% for min-SNR, both
   trained 1600 steps).
   Captions are shortened at random in training (size and place dropped half the time, colour or
   shape 15%), so "a green star" means what it says. Five colour-shape pairs are held out of the text
   model's training data (default: red star, green circle, blue cross, yellow triangle, magenta square:
   each shape and five of the six colours are still seen, just never together). Asking for them
   measures compositional generalisation: shape accuracy (the clean classifier) and colour accuracy
   (read from the pixels: the mean colour of the shape's pixels, matched to the palette by hue) on
   seen and unseen prompts.

Run
---
    python 06_condition.py                       # everything: 17 min alone on a 2-core CPU
    python 06_condition.py --prompt "a large green star"    # draw from a prompt (reuses runs/06/text.pt)
    python 06_condition.py --dataset mnist       # class guidance on digits (no captions: no text part)
    python 06_condition.py --quick               # seconds: a smoke test
    python 06_condition.py --device cuda         # a GPU

Models are saved in runs/06 (class.pt, text.pt, noisy_classifier.pt, classifier.pt) and reused by a
later run with the same settings (--retrain trains again). It writes figures/06_cfg_grid.png,
06_classifier_guidance.png, 06_tradeoff.png, 06_text_grid.png, 06_loss.png (and 06_prompt.png with
--prompt), and prints the guidance table and the text accuracy table.
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

FORMAT = "dmfs-06-v1"  # checkpoint format tag: a file written by another script is not reused
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


def bf16_supported(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return False



def parse_args(argv=None):
    p = Parser(description="Lesson 06: class labels, guidance and text, trained from scratch.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="shapes", help="shapes | mnist | fashion-mnist | cifar10 | folder (text: shapes only)")
    a("--data-dir", default="data", help="where torchvision data is downloaded, or the image folder")
    a("--image-size", type=int, default=32, help="images are resized (and centre-cropped, or padded) to this")
    a("--pred", default="v", choices=["eps", "v", "x0"], help="what the networks predict (as in 04)")
    a("--loss-weight", default="min-snr", choices=["none", "min-snr"], help="the class model's (as in 04)")
    a("--text-loss-weight", default="none", choices=["none", "min-snr"],
      help="the text model's: min-SNR starves the high-noise steps where colour is decided (see the docstring)")
    a("--base-ch", type=int, default=24, help="class-conditional UNet width")
    a("--steps", type=int, default=3200, help="training steps of the class-conditional UNet")
    a("--text-steps", type=int, default=900, help="training steps of the text-conditional UNet and its encoder")
    a("--text-init", default="class", choices=["class", "scratch"],
      help="class: the text UNet starts as the trained class model's unconditional half; scratch: random")
    a("--text-width", type=int, default=64, help="text encoder width (the cross-attention's ctx_dim)")
    a("--text-layers", type=int, default=2, help="transformer layers in the text encoder")
    a("--batch-size", type=int, default=32)
    a("--lr", type=float, default=1e-3)
    a("--warmup", type=int, default=100, help="linear learning-rate warmup steps")
    a("--ema-decay", type=float, default=0.999)
    a("--p-uncond", type=float, default=0.1, help="probability of training a sample with the null condition")
    a("--clf-steps", type=int, default=2000, help="training steps of the clean (judging) classifier")
    a("--noisy-clf-steps", type=int, default=400,
      help="steps of a clean classifier, then as many on noisy images: p(y | x_t, t)")
    a("--scales", default="0,1,2,3,5,7.5", help="guidance scales measured (0: unconditional, 1: conditional)")
    a("--cg-scales", default="0,1,3,10,30,100",
      help="classifier-guidance scales measured (its scale is in other units than classifier-free guidance's)")
    a("--eval-per-class", type=int, default=50, help="samples per class and scale for accuracy and FD")
    a("--text-scale", type=float, default=3.0, help="classifier-free guidance scale for text")
    a("--text-per-prompt", type=int, default=8, help="samples per colour-shape prompt when measuring text")
    a("--holdout", default="red star,green circle,blue cross,yellow triangle,magenta square",
      help="colour-shape pairs removed from the text model's training data (compositional test)")
    a("--sample-steps", type=int, default=20, help="DDIM steps for every sample")
    a("--prompt", default=None, help="only generate from this caption with the text model, e.g. 'a large green star'")
    a("--n", type=int, default=16, help="images drawn for --prompt")
    a("--retrain", action="store_true", help="train again even where RUN_DIR holds a model with the same settings")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto: bf16 autocast on CUDA and on CPUs with bf16 units, else fp32")
    a("--run-dir", default="runs/06", help="checkpoint folder (models are reused when their settings match)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    a("--seed", type=int, default=0, help="fixes the data and every random draw")
    a("--out", default="figures", help="folder for the figures")
    a("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    args = p.parse_args(argv)
    if args.dataset not in DATASETS:
        fail(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    for name in ("steps", "text_steps", "batch_size", "base_ch", "text_width", "text_layers",
                 "sample_steps", "eval_per_class", "text_per_prompt", "n", "clf_steps", "noisy_clf_steps"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.text_width % 4:
        fail(f"--text-width must be a multiple of 4, the attention heads (got {args.text_width})")
    if not args.lr > 0 or args.warmup < 0 or not 0 <= args.ema_decay < 1 or not 0 <= args.p_uncond < 1:
        fail("--lr must be positive, --warmup >= 0, --ema-decay and --p-uncond in [0, 1)")
    for name in ("scales", "cg_scales"):
        try:
            values = [float(s) for s in getattr(args, name).split(",")]
        except ValueError:
            fail(f"--{name.replace('_', '-')} must be numbers separated by commas, like 0,1,3 "
                 f"(got {getattr(args, name)!r})")
        if any(s < 0 or not math.isfinite(s) for s in values):
            fail(f"--{name.replace('_', '-')} must be finite and >= 0 (got {values})")
        setattr(args, name, values)
    args.holdout = [tuple(pair.split()) for pair in args.holdout.split(",") if pair.strip()]
    for pair in args.holdout:
        if len(pair) != 2 or pair[0] not in COLORS or pair[1] not in SHAPES:
            fail(f"--holdout takes 'colour shape' pairs separated by commas, colours from {', '.join(COLORS)} "
                 f"and shapes from {', '.join(SHAPES)} (got {' '.join(pair)!r})")
    if args.quick:
        args.steps, args.text_steps = min(args.steps, 12), min(args.text_steps, 12)
        args.batch_size, args.base_ch = min(args.batch_size, 8), 16
        args.text_width, args.text_layers, args.warmup = 16, 1, min(args.warmup, 4)
        args.clf_steps, args.noisy_clf_steps = min(args.clf_steps, 10), min(args.noisy_clf_steps, 10)
        args.eval_per_class, args.text_per_prompt = min(args.eval_per_class, 2), 1
        args.sample_steps, args.n = min(args.sample_steps, 3), min(args.n, 4)
    return args


# %% Noise schedules and the closed form q(x_t | x_0) (as in lesson 01)
def linear_betas(T):
    """DDPM's schedule: beta_t linear from 1e-4 to 0.02. float64 tensor [T]."""
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)


def cosine_betas(T, s=0.008):
    """Improved DDPM's schedule: alpha_bar_t = f(t)/f(0), f(t) = cos^2(((t/T)+s)/(1+s) * pi/2); betas
    clipped at 0.999. float64 tensor [T]."""
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
    """n images of one coloured shape each on black, anti-aliased (as in 04) -> (images uint8 [n, 3, size,
    size], labels int64 [n] indexing SHAPES, captions list[str]); a pure function of (n, size, seed)."""
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
    """t int64 [B] -> float [B, dim]: sin and cos of t at frequencies from 1 to 1/10000 (as in 03)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, dim]


def group_norm(ch):
    return nn.GroupNorm(math.gcd(32, ch), ch)


# %% Residual block with time-conditioned scale and shift
class ResBlock(nn.Module):
    """skip(x) + conv(SiLU(GN(conv(SiLU(GN(x)))) * (1 + scale) + shift)), then optional self-attention
    and, when ctx_dim > 0, cross-attention to a sequence of tokens (text).

    (B, C_in, H, W) -> (B, C_out, H, W).
    """

    def __init__(self, c_in, c_out, emb_dim, dropout=0.0, attn_heads=0, ctx_dim=0):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # (time + label) embedding -> per-channel (scale, shift)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out, attn_heads) if attn_heads else nn.Identity()  # optional, after the block
        self.cross = CrossAttention(c_out, ctx_dim, attn_heads) if attn_heads and ctx_dim else None

    def forward(self, x, emb, ctx=None, ctx_mask=None):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x [B, C_out, 1, 1]
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        h = self.attn(self.skip(x) + h)
        return self.cross(h, ctx, ctx_mask) if self.cross is not None else h


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


class CrossAttention(nn.Module):
    """Pixels (queries) attend to text tokens (keys and values); padding tokens are masked out.

    x (B, C, H, W), ctx (B, L, ctx_dim), ctx_mask bool (B, L), True for a real token -> (B, C, H, W).
    Every caption keeps at least one real token (a start token), so no row of the softmax is empty.
    """

    def __init__(self, ch, ctx_dim, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.kv = nn.Linear(ctx_dim, 2 * ch)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x, ctx, ctx_mask):
        B, C, H, W = x.shape
        q = self.q(self.norm(x)).reshape(B, self.heads, C // self.heads, H * W).transpose(2, 3)  # [B, h, HW, d]
        k, v = self.kv(ctx).reshape(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 2 x [B, h, L, d]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx_mask[:, None, None, :])  # [B, h, HW, d]
        return x + self.proj(h.transpose(2, 3).reshape(B, C, H, W))


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


# %% The UNet, conditioned on a class label (added to the time embedding) and/or on text (cross-attention)
class UNet(nn.Module):
    """eps_theta(x_t, t, y, ctx): (B, in_ch, H, W), int64 [B] -> (B, out_ch, H, W).

    As in lesson 03, plus: num_classes > 0 adds a label embedding with num_classes + 1 rows (the
    last, index num_classes, is the null label "no condition") to the time embedding; ctx_dim > 0
    adds cross-attention to text tokens after each self-attention. With both 0 it is lesson 03's UNet,
    parameter for parameter.
    """

    def __init__(self, in_ch=3, out_ch=None, base_ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                 attn_levels=(2,), dropout=0.0, heads=4, num_classes=0, ctx_dim=0):
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
                self.down.append(ResBlock(ch, base_ch * mult, emb_dim, dropout, heads * (level in attn_levels),
                                          ctx_dim))
                ch = base_ch * mult
                chans.append(ch)
            if level < len(ch_mult) - 1:
                self.down.append(Downsample(ch))
                chans.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout, heads, ctx_dim),
                                  ResBlock(ch, ch, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + chans.pop(), base_ch * mult, emb_dim, dropout,
                                        heads * (level in attn_levels), ctx_dim))
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

    def forward(self, x, t, y=None, ctx=None, ctx_mask=None):
        """y int64 [B] (num_classes = null); ctx [B, L, ctx_dim] with ctx_mask bool [B, L]."""
        self.check_size(*x.shape[-2:])
        emb = self.time_mlp(timestep_embedding(t, self.base_ch))  # [B, 4 base_ch]
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb, ctx, ctx_mask) if isinstance(block, ResBlock) else block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, ctx, ctx_mask)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = block(torch.cat([h, skips.pop()], dim=1), emb, ctx, ctx_mask)
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
    """FD between Gaussians fitted to two feature sets [N, D] (float64), as in 04."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, V = torch.linalg.eigh(s1)
    s1_half = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross).item()




# %% Captions as tokens: a word-level tokenizer and a small transformer text encoder
PAD, START = "<pad>", "<start>"  # ids 0 and 1


def caption_variant(caption, keep):
    """'a small red star at the top left' with parts left out; keep = 4 flags for (size, colour, shape,
    position). Training on such variants lets a short prompt ('a green star') mean what it says."""
    w = caption.split()
    parts = [["a"], w[1:2] if keep[0] else [], w[2:3] if keep[1] else [], w[3:4] if keep[2] else [],
             w[4:] if keep[3] else []]
    return " ".join(word for part in parts for word in part)


def text_training_set(captions, idx, holdout):
    """Indices in idx whose caption's (colour, shape) pair is not held out: the text model never sees
    'a ... red star ...' when ('red', 'star') is held out (captions read 'a SIZE COLOUR SHAPE ...')."""
    held = set(holdout)
    return torch.tensor([i for i in idx.tolist() if tuple(captions[i].split()[2:4]) not in held], dtype=torch.long)


class Tokenizer:
    """Words <-> ids, built from the captions' vocabulary. Every caption becomes [START, w_1, ..., w_k,
    PAD, ...] of one fixed length; START is never padding, so even the empty caption (the null condition
    of classifier-free guidance) has one real token for the cross-attention to look at."""

    def __init__(self, captions):
        self.words = sorted({w for c in captions for w in c.split()})
        self.vocab = [PAD, START] + self.words
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.length = 1 + max(len(c.split()) for c in captions)

    def encode(self, texts):
        """list of str -> int64 [B, length]; an unknown word or a too-long text raises ValueError."""
        out = torch.zeros(len(texts), self.length, dtype=torch.long)  # PAD = 0
        for b, text in enumerate(texts):
            words = text.lower().split()
            for w in words:
                if w not in self.ids or w in (PAD, START):
                    raise ValueError(f"unknown word {w!r}; the vocabulary is: {' '.join(self.words)}")
            if len(words) > self.length - 1:
                raise ValueError(f"{text!r} has {len(words)} words; captions have at most {self.length - 1}")
            out[b, :1 + len(words)] = torch.tensor([1] + [self.ids[w] for w in words])
        return out

    def decode(self, tokens):
        return [" ".join(self.vocab[i] for i in row.tolist() if i > 1) for row in tokens]


class TextEncoder(nn.Module):
    """tokens int64 [B, L] -> (token features [B, L, width], mask bool [B, L], True = real token).

    Token plus position embeddings, then pre-norm transformer layers in which padding is masked as a key,
    so a real token's features do not depend on how much padding follows it."""

    def __init__(self, vocab_size, length, width=64, layers=2, heads=4):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(length, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens):
        mask = tokens != 0
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))  # [B, L, width]
        return self.norm(self.blocks(h, src_key_padding_mask=~mask)), mask


class TextToImage(nn.Module):
    """The text-conditional denoiser model(x_t, t, tokens); the encoder is trained together with the UNet,
    by the diffusion loss alone. Words reach the UNet two ways: each token through cross-attention, and
    the caption as a whole (the mean of its real tokens' features) through a linear map added to the time
    embedding, in the UNet's label_emb slot where the class model adds its label (Imagen and SDXL add such
    a pooled text embedding too). The pooled path reaches every residual block's scale and shift, where
    global attributes like colour are set: with cross-attention alone, our text model learned the shapes
    the words asked for but not their colours (18% colour accuracy after 900 steps). With the pooled path
    it was 58% under min-SNR weighting and 99% with the plain v loss (--text-loss-weight, the docstring)."""

    def __init__(self, unet, encoder):
        super().__init__()
        self.unet, self.encoder = unet, encoder
        unet.label_emb = nn.Linear(encoder.pos.embedding_dim, unet.time_mlp[2].out_features)  # pooled -> emb

    def forward(self, x, t, tokens):
        ctx, mask = self.encoder(tokens)  # [B, L, width], [B, L]
        pooled = (ctx * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean of the real tokens: [B, width]
        return self.unet(x, t, y=pooled, ctx=ctx, ctx_mask=mask)


@torch.no_grad()
def warm_start(text_unet, class_unet):
    """Start the text UNet as the trained class model's unconditional half: the same weights, the pooled
    text map's bias set to the null label's embedding and its weight to zero, and each cross-attention's
    output projection zeroed, so at step 0 the text model computes exactly eps(x_t, t, null) and only has
    to learn what the words add (zero-initialised new layers in a trained network: as in ControlNet)."""
    state = {k: v for k, v in class_unet.state_dict().items() if not k.startswith("label_emb")}
    missing, unexpected = text_unet.load_state_dict(state, strict=False)
    assert not unexpected and all(".cross." in k or k.startswith("label_emb") for k in missing), missing
    for module in text_unet.modules():
        if isinstance(module, CrossAttention):
            nn.init.zeros_(module.proj.weight)
            nn.init.zeros_(module.proj.bias)
    nn.init.zeros_(text_unet.label_emb.weight)
    text_unet.label_emb.bias.copy_(class_unet.label_emb.weight[class_unet.num_classes])


# %% Classifier-free guidance (Ho & Salimans 2022)
def drop_condition(y, y_null, p, gen):
    """Replace each sample's condition by the null one with probability p: labels [B] (y_null a scalar
    tensor) or tokens [B, L] (y_null [L], the empty caption). One network thus learns both
    eps(x_t, t, y) and eps(x_t, t, null)."""
    drop = (torch.rand(len(y), generator=gen) < p).to(y.device).view(-1, *([1] * (y.dim() - 1)))
    return torch.where(drop, y_null.to(y.device), y)


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


def cfg_forms(out_u, out_c, s):
    """One formula, written four ways in papers and repositories (w = s - 1):
        out_u + s (out_c - out_u)             GLIDE (Nichol et al. 2022), diffusers' guidance_scale = s
        (1 + w) out_c - w out_u               Ho & Salimans 2022, with w = s - 1 (w = 0: no guidance)
        out_c + (s - 1) (out_c - out_u)       'conditional plus a push away from unconditional'
        lerp(out_u, out_c, s)                 torch.lerp: start + weight (end - start), weight s > 1 extrapolates
    Expanding each gives (1 - s) out_u + s out_c. So 'scale 7.5' in one repository is 'w = 6.5' in the paper."""
    w = s - 1
    return [out_u + s * (out_c - out_u), (1 + w) * out_c - w * out_u, out_c + (s - 1) * (out_c - out_u),
            torch.lerp(out_u, out_c, s)]


# %% Classifier guidance (Dhariwal & Nichol 2021): a classifier of noisy images steers an unconditional model
class NoisyClassifier(nn.Module):
    """p(y | x_t, t): 04's Classifier with the timestep added, as a learned per-channel shift after each
    GroupNorm (the same x_t means different things at different t). The shifts start at zero, so a clean
    Classifier's weights are a good start: fine-tuning one on noisy images is far cheaper than training
    from scratch (measured: from scratch, 400 steps gave 35% accuracy even on clean images)."""

    def __init__(self, in_ch, n_classes):
        super().__init__()
        clf = Classifier(in_ch, n_classes)
        self.body, self.head = clf.body, clf.head
        self.chans = [m.num_channels for m in self.body if isinstance(m, nn.GroupNorm)]  # 32, 64, 128
        self.time = nn.Sequential(nn.Linear(32, 128), nn.SiLU(), nn.Linear(128, sum(self.chans)))
        nn.init.zeros_(self.time[2].weight)
        nn.init.zeros_(self.time[2].bias)

    def forward(self, x, t):
        shifts = iter(self.time(timestep_embedding(t, 32)).split(self.chans, dim=1))  # per GroupNorm [B, c]
        h = x
        for layer in self.body:
            h = layer(h)
            if isinstance(layer, nn.GroupNorm):
                h = h + next(shifts)[:, :, None, None]
        return self.head(h)  # [B, n_classes]


def train_noisy_classifier(images, labels, n_classes, alpha_bar, device, steps, seed):
    """A clean Classifier (as in 04, its own seed), then cross-entropy on x_t = q_sample(x_0, t) with t
    uniform, so the classifier learns every noise level. Returns the noisy classifier."""
    clf = NoisyClassifier(images.shape[1], n_classes).to(device)
    clean = train_classifier(images, labels, n_classes, device, steps, seed + 1)
    clf.load_state_dict(clean.state_dict(), strict=False)  # body and head; the time shifts stay zero
    g = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.Adam(clf.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(len(images), (128,), generator=g)
        x0 = (images[idx].float() / 127.5 - 1).to(device)
        t = torch.randint(len(alpha_bar), (128,), generator=g).to(device)
        x_t = q_sample(x0, t, alpha_bar, torch.randn(x0.shape, generator=g).to(device))
        loss = F.cross_entropy(clf(x_t, t), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()


def classifier_guided_eps(model, clf, x, t, y, scale, alpha_bar, pred):
    """eps_hat = eps(x_t, t, null) - scale sqrt(1 - ab_t) grad_x log p(y | x_t, t)   (Dhariwal & Nichol, eq. 14).

    Why: eps = -sqrt(1 - ab) grad log p(x_t), so subtracting sqrt(1 - ab) grad log p(y | x_t) is the score
    of p(x_t) p(y | x_t)^scale, proportional to p(x_t | y) at scale 1. The unconditional model is the class
    model with the null label (it learned that through label dropout). Returns eps (not v).
    """
    ab = alpha_bar[t].to(x.device, torch.float32).view(-1, 1, 1, 1)
    eps, _ = to_eps_x0(pred, model(x, t, torch.full_like(y, model.num_classes)).float(), x, ab)
    if scale == 0:
        return eps
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):  # the gradient in fp32
        x_in = x.detach().float().requires_grad_(True)
        log_p = F.log_softmax(clf(x_in, t), dim=1).gather(1, y[:, None]).sum()  # sum over the batch: [B] grads
        (grad,) = torch.autograd.grad(log_p, x_in)
    return eps - scale * (1 - ab).sqrt() * grad


# %% Training a conditional model: 04's step (v target, min-SNR, warmup, clipping, EMA) plus label dropout
def train_diffusion(model, batch_fn, y_null, steps, args, alpha_bar, autocast, gen, name):
    """batch_fn(gen) -> (x_0 [B, C, S, S] in [-1, 1], condition: labels [B] or tokens [B, L]).
    Returns the checkpoint dict; the EMA weights are the model that samples."""
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses, t0 = [], time.time()
    for step in range(steps):
        x0, y = batch_fn(gen)
        y = drop_condition(y, y_null, args.p_uncond, gen)  # classifier-free guidance needs the null condition
        t = torch.randint(len(alpha_bar), (len(x0),), generator=gen).to(x0.device)
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        ab = alpha_bar[t].float().view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # q_sample
        for group in opt.param_groups:
            # linear warmup, then cosine decay to 0: in a short run the last, small steps sharpen the samples
            decay = (1 + math.cos(math.pi * step / steps)) / 2
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup)) * decay
        with autocast():
            out = model(x_t, t, y)
        per_sample = (out.float() - target_of(args.pred, x0, eps, ab)).square().mean((1, 2, 3))  # [B]
        loss = (loss_weight(args.loss_weight, args.pred, ab.view(-1)) * per_sample).mean()
        if not torch.isfinite(loss):
            print(f"\n{name}: loss is {loss.item()} at step {step}; lower --lr (now {args.lr:g})", file=sys.stderr)
            sys.exit(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))  # EMA warmup, as in 04
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)  # ema = decay * ema + (1 - decay) * w
        losses.append(loss.item())
        if (step + 1) % 10 == 0 or step + 1 == steps:
            rate = (step + 1) * len(x0) / (time.time() - t0)
            print(f"\r{name}: step {step + 1}/{steps}  loss {sum(losses[-10:]) / len(losses[-10:]):.4f}  "
                  f"{rate:.0f} img/s  ETA {(steps - step - 1) * len(x0) / rate / 60:.1f} min ", end="", flush=True)
    print(f"\n{name}: trained {steps} steps in {(time.time() - t0) / 60:.1f} min")
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": steps,
            "rng": {"train": gen.get_state()}, "log": {"losses": losses, "seconds": time.time() - t0}}


# %% Checkpoints: one dict, written atomically, reused when the settings match
def save_checkpoint(path, ckpt):
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half checkpoint at `path`


def train_or_load(path, config, module, train_fn, retrain):
    """Load path's weights (its EMA where it has one) into module when it was written by this script with
    the same config; otherwise run train_fn() -> checkpoint dict, save it and load it. Returns the log."""
    if not retrain and os.path.isfile(path):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            ckpt = None
        if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and ckpt.get("config") == config:
            module.load_state_dict(ckpt.get("ema", ckpt["model"]))
            print(f"reusing {path} (trained with the same settings; --retrain to train again)")
            return ckpt.get("log", {})
    ckpt = dict(format=FORMAT, config=config, **train_fn())
    save_checkpoint(path, ckpt)
    module.load_state_dict(ckpt.get("ema", ckpt["model"]))
    return ckpt.get("log", {})


# %% Measuring: class accuracy, Frechet distance, and the colour of a shape read from its pixels
def colour_of(x):
    """float [-1, 1] [B, 3, H, W] -> index [B] into COLORS. The shape's pixels are those at least half as
    bright as the image's brightest; their mean RGB is matched to the palette by direction (cosine), so a
    dim or anti-aliased shape still gets its hue. Exact on the real images (printed)."""
    u = (x.clamp(-1, 1) + 1) / 2
    bright = u.amax(1)  # [B, H, W]
    mask = (bright >= 0.5 * bright.flatten(1).amax(1).view(-1, 1, 1)).float()
    mean = (u * mask[:, None]).sum((2, 3)) / mask.sum((1, 2))[:, None]  # [B, 3]
    rgb = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # [6, 3]
    return F.cosine_similarity(mean[:, None], rgb[None], dim=2).argmax(1)


def sample(fn, noise, cond, args, alpha_bar, pred, autocast, batch=100):
    """DDIM (as in 04) over noise [N, C, S, S] in batches; fn(x, t, cond_batch) -> model output."""
    device = alpha_bar.device
    out = []
    for i in range(0, len(noise), batch):
        c = cond[i:i + batch].to(device)
        out.append(ddim_sample(lambda x, t: fn(x, t, c), noise[i:i + batch].to(device), alpha_bar,
                               args.sample_steps, pred, autocast).clamp(-1, 1).cpu())
    return torch.cat(out)


def judge(clf, x, y, real_feats, device):
    """-> (accuracy, per-class accuracies, FD against real_feats) of samples x asked to be classes y."""
    feats, pred = features_and_classes(clf, x, device)
    per_class = [(pred[y == c] == c).float().mean().item() for c in y.unique().tolist()]
    return (pred == y).float().mean().item(), per_class, frechet_distance(feats, real_feats)


# %% Figures
def class_grid(blocks, n_classes, epc, m):
    """blocks: list of samples [n_classes * epc, C, S, S] (class-major); row k shows m samples of class k
    from each block in turn -> uint8 [n_classes * len(blocks) * m, C, S, S] for a grid of len(blocks) * m columns."""
    return to_uint8(torch.cat([b[k * epc:k * epc + m] for k in range(n_classes) for b in blocks]))


def save_tradeoff(path, res, floor):
    """Accuracy and FD against the guidance scale for both methods, and accuracy against FD; one legend."""
    img = Image.new("RGB", (1500, 500), "white")
    d = ImageDraw.Draw(img)
    names = list(res)
    acc = {n: [100 * r[0] for r in res[n].values()] for n in names}
    fd = {n: [r[2] for r in res[n].values()] for n in names}
    lo_acc = max(0, min(min(a) for a in acc.values()) - 5)
    fds = [v for f in fd.values() for v in f] + [floor]
    xmax = max(max(res[n]) for n in names)
    logx = xmax / max(min(s for n in names for s in res[n] if s > 0), 1e-9) > 20  # scales spanning decades
    xlabel = "guidance scale" + (" (log; 0 drawn at the left edge)" if logx else "")
    panels = [((90, 60, 480, 380), "class accuracy of the samples", xlabel, "accuracy (%)", (lo_acc, 100), False),
              ((590, 60, 980, 380), "Frechet distance to real images", xlabel, "FD (log)",
               (min(fds) * 0.7, max(fds) * 1.5), True),
              ((1090, 60, 1480, 380), "the trade-off (labels: scale)", "FD (log)", "accuracy (%)", (lo_acc, 100),
               False)]
    for k, (box, title, xlabel, ylabel, ylim, logy) in enumerate(panels):
        px_lo = min(s for n in names for s in res[n] if s > 0) / 2 if logx else 0
        xlim = (min(fds) * 0.7, max(fds) * 1.5) if k == 2 else (px_lo, xmax)
        to_px = plot_axes(d, box, xlim, ylim, xlabel, ylabel, title,
                          logx=(k == 2) or (logx and k < 2), logy=logy)
        for c, n in enumerate(names):
            xs = fd[n] if k == 2 else [max(s, px_lo) for s in res[n]]
            ys = fd[n] if k == 1 else acc[n]
            pts = [to_px(x, min(max(v, ylim[0]), ylim[1])) for x, v in zip(xs, ys)]
            d.line(pts, fill=PALETTE[c], width=2)
            for (px, py), s in zip(pts, res[n]):
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=PALETTE[c])
                if k == 2:
                    d.text((px + 5, py - 3), f"{s:g}", fill=PALETTE[c], font=font(11), anchor="ld")
        if k == 1:
            d.line([to_px(xlim[0], floor), to_px(xlim[1], floor)], fill=PALETTE[2], width=2)
    for c, label in enumerate(names + ["real vs real (the FD floor)"]):
        x = 300 + 380 * c
        d.line([(x, 470), (x + 30, 470)], fill=PALETTE[c], width=3)
        d.text((x + 36, 470), label if c == 2 else f"{label} guidance", fill="black", font=font(14), anchor="lm")
    img.save(path)


def save_losses(path, logs):
    img = Image.new("RGB", (620, 430), "white")
    d = ImageDraw.Draw(img)
    series = []
    for name, losses in logs:
        k = max(1, len(losses) // 100)
        series.append((name, [i * k + k for i in range(len(losses) // k)],
                       [sum(losses[i * k:(i + 1) * k]) / k for i in range(len(losses) // k)]))
    ys = [y for _, _, s in series for y in s]
    line_panel(d, (90, 60, 590, 370), series, "training loss (mean over steps)", "step",
               "loss (log)", logy=True, ylim=(min(ys) * 0.8, max(ys) * 1.25))
    img.save(path)


# %% Main: class model, noisy classifier, judge, guidance measured; then the text model
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

    t_start = time.time()
    # -- data: held-out real images for the metrics, the rest for training
    n_shapes = 1000 if args.quick else 10_000
    if args.dataset == "shapes":
        images, labels, captions = make_shapes(n_shapes, size=args.image_size, seed=args.seed)
        classes = list(SHAPES)
    else:
        images, labels, classes = load_dataset(args.dataset, args.data_dir, args.image_size, args.seed)
        captions = None
    if len(images) < 10:
        fail(f"{args.dataset} has {len(images)} images; this lesson needs at least 10")
    tokenizer = Tokenizer(captions) if captions else None
    if args.prompt is not None:
        if tokenizer is None:
            fail("--prompt needs captions, which only the shapes data has: use --dataset shapes")
        try:
            prompt_tokens = tokenizer.encode([args.prompt] * args.n)
        except ValueError as e:
            fail(f"--prompt: {e}")
    C, S, K = images.shape[1], images.shape[-1], len(classes)
    try:
        UNet(in_ch=C, base_ch=16).check_size(S, S)
    except ValueError as e:
        fail(f"--image-size {args.image_size}: {e}")
    n_hold = min(len(images) // 5, 2000)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    held, train_idx = perm[:n_hold], perm[n_hold:]
    alpha_bar = alpha_bar_of(cosine_betas(1000)).to(device)
    os.makedirs(args.run_dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    base = dict(dataset=args.dataset, data_dir=os.path.abspath(args.data_dir) if args.dataset != "shapes" else "",
                image_size=S, n_images=len(images), seed=args.seed, pred=args.pred, loss_weight=args.loss_weight,
                batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
                p_uncond=args.p_uncond, bf16=use_bf16)
    print(f"{args.dataset}: {len(train_idx)} training images {tuple(images.shape[1:])}, {K} classes, {n_hold} held "
          f"out | {device}, {'bf16 autocast' if use_bf16 else 'fp32'} | pred {args.pred}, cosine schedule")

    def text_model(class_unet, class_config):
        """Build (and train, or load) the text-conditional model; returns (model, log, null tokens)."""
        text_idx = text_training_set(captions, train_idx, args.holdout)
        torch.manual_seed(args.seed + 2)
        model = TextToImage(UNet(in_ch=C, base_ch=args.base_ch, ctx_dim=args.text_width),
                            TextEncoder(len(tokenizer.vocab), tokenizer.length, args.text_width,
                                        args.text_layers)).to(device)
        y_null = tokenizer.encode([""])[0]  # [L]: START, then padding

        def batch(gen):
            idx = text_idx[torch.randint(len(text_idx), (args.batch_size,), generator=gen)]
            keep = (torch.rand(len(idx), 4, generator=gen) < torch.tensor([0.5, 0.85, 0.85, 0.5])).tolist()
            caps = [caption_variant(captions[i], k) for i, k in zip(idx.tolist(), keep)]
            return to_unit(images[idx]).to(device), tokenizer.encode(caps).to(device)

        if args.text_init == "class":
            warm_start(model.unet, class_unet)
        config = dict(base, what="text", loss_weight=args.text_loss_weight, steps=args.text_steps,
                      width=args.text_width, layers=args.text_layers,
                      holdout=[" ".join(p) for p in args.holdout], vocab=tokenizer.vocab,
                      init=class_config if args.text_init == "class" else dict(base_ch=args.base_ch))
        text_args = argparse.Namespace(**{**vars(args), "loss_weight": args.text_loss_weight})
        n_params = sum(p.numel() for p in model.parameters())
        print(f"text model: UNet + encoder {n_params / 1e6:.2f}M params, {len(text_idx)} training captions "
              f"(held-out pairs removed: {', '.join(' '.join(p) for p in args.holdout) or 'none'})")
        log = train_or_load(os.path.join(args.run_dir, "text.pt"), config, model,
                            lambda: train_diffusion(model, batch, y_null, args.text_steps, text_args, alpha_bar,
                                                    autocast, torch.Generator().manual_seed(args.seed + 20),
                                                    "text model"),
                            args.retrain)
        return model.eval().requires_grad_(False), log, y_null

    def text_sample(model, y_null, tokens, scale, seed):
        noise = torch.randn(len(tokens), C, S, S, generator=torch.Generator().manual_seed(seed))
        return sample(lambda x, t, c: guided_eps(model, x, t, c, scale, y_null.to(device).expand(len(c), -1)),
                      noise, tokens, args, alpha_bar, args.pred, autocast)

    # -- the class-conditional model: the label embedding is added to the time embedding
    torch.manual_seed(args.seed)
    unet = UNet(in_ch=C, base_ch=args.base_ch, num_classes=K).to(device)
    print(f"class model: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, label embedding "
          f"{K} classes + null")

    def class_batch(gen):
        idx = train_idx[torch.randint(len(train_idx), (args.batch_size,), generator=gen)]
        return to_unit(images[idx]).to(device), labels[idx].to(device)

    config = dict(base, what="class", base_ch=args.base_ch, steps=args.steps, classes=classes)
    class_log = train_or_load(os.path.join(args.run_dir, "class.pt"), config, unet,
                              lambda: train_diffusion(unet, class_batch, torch.tensor(K), args.steps, args, alpha_bar,
                                                      autocast, torch.Generator().manual_seed(args.seed + 10),
                                                      "class model"), args.retrain)
    unet.eval().requires_grad_(False)

    if args.prompt is not None:  # -- only draw from one prompt
        model, _, y_null = text_model(unet, config)
        x = text_sample(model, y_null, prompt_tokens, args.text_scale, args.seed + 999)
        path = os.path.join(args.out, "06_prompt.png")
        labelled(grid_image(to_uint8(x), nrow=min(8, args.n), scale=3),
                 f"'{args.prompt}' (guidance scale {args.text_scale:g})").save(path)
        print(f"wrote {path}")
        return

    # -- two classifiers: p(y | x_t, t) for classifier guidance, and a clean judge for accuracy and FD
    t1 = time.time()
    noisy = NoisyClassifier(C, K).to(device)
    train_or_load(os.path.join(args.run_dir, "noisy_classifier.pt"),
                  dict(base, what="noisy", steps=args.noisy_clf_steps), noisy,
                  lambda: {"model": train_noisy_classifier(images[train_idx], labels[train_idx], K, alpha_bar, device,
                                                           args.noisy_clf_steps, args.seed).state_dict()}, args.retrain)
    noisy.eval().requires_grad_(False)
    clf = Classifier(C, K).to(device)
    train_or_load(os.path.join(args.run_dir, "classifier.pt"), dict(base, what="judge", steps=args.clf_steps), clf,
                  lambda: {"model": train_classifier(images[train_idx], labels[train_idx], K, device, args.clf_steps,
                                                     args.seed).state_dict()}, args.retrain)
    clf.eval()
    n_eval = args.eval_per_class * K
    real = to_unit(images[held[:n_eval]])
    real_feats, real_pred = features_and_classes(clf, real, device)
    g = torch.Generator().manual_seed(args.seed + 5)
    with torch.no_grad():
        x0 = real[:500].to(device)
        noisy_acc = {t: (noisy(q_sample(x0, torch.full((len(x0),), t, device=device), alpha_bar,
                                        torch.randn(x0.shape, generator=g).to(device)),
                               torch.full((len(x0),), t, device=device)).argmax(1).cpu()
                         == labels[held[:len(x0)]]).float().mean().item() for t in (0, 250, 500, 750, 900)}
    floor = frechet_distance(features_and_classes(clf, to_unit(images[train_idx[:n_eval]]), device)[0], real_feats)
    ceiling = frechet_distance(features_and_classes(clf, torch.randn(real.shape, generator=g).clamp(-1, 1),
                                                    device)[0], real_feats)
    print(f"judge: accuracy on held-out real {(real_pred == labels[held[:n_eval]]).float().mean():.1%} | noisy "
          f"classifier accuracy by t: " + ", ".join(f"t={t} {a:.0%}" for t, a in noisy_acc.items()) +
          f" | {time.time() - t1:.0f} s")

    # -- guidance measured: the same noise for every scale and both methods
    t1 = time.time()
    y = torch.arange(K).repeat_interleave(args.eval_per_class)  # class-major: [K * eval_per_class]
    noise = torch.randn(n_eval, C, S, S, generator=torch.Generator().manual_seed(args.seed + 777))
    scales = {"classifier-free": args.scales, "classifier": args.cg_scales}
    fns = {"classifier-free": lambda s: (lambda x, t, c: guided_eps(unet, x, t, c, s), args.pred),
           "classifier": lambda s: (lambda x, t, c: classifier_guided_eps(unet, noisy, x, t, c, s, alpha_bar,
                                                                          args.pred), "eps")}
    samples, res = {n: {} for n in fns}, {n: {} for n in fns}
    for name, fn_of in fns.items():
        for s in scales[name]:
            if s == 0 and 0 in samples["classifier-free"]:
                samples[name][s] = samples["classifier-free"][s]  # scale 0 is the unconditional model for both
            else:
                fn, pred = fn_of(s)
                samples[name][s] = sample(fn, noise, y, args, alpha_bar, pred, autocast)
            res[name][s] = judge(clf, samples[name][s], y, real_feats, device)
    print(f"\nguidance measured ({args.eval_per_class} samples per class and scale, DDIM {args.sample_steps} steps; "
          f"{time.time() - t1:.0f} s). FD floor (real vs real) {floor:.2f}, ceiling (noise) {ceiling:.1f}")
    print(f"{'method':>15} {'scale':>6} {'accuracy':>9} {'worst class':>12} {'FD':>7} {'guide says':>11}")
    for name in fns:
        for s in scales[name]:
            acc, per, fd = res[name][s]
            guide = ""
            if name == "classifier":  # how often the guiding classifier itself sees the class it pushed towards
                with torch.no_grad():
                    x = samples[name][s].to(device)
                    said = noisy(x, torch.zeros(len(x), dtype=torch.long, device=device)).argmax(1).cpu()
                guide = f"{(said == y).float().mean():11.1%}"
            print(f"{name:>15} {s:6g} {acc:9.1%} {min(per):12.1%} {fd:7.2f} {guide}")
    if 3.0 in res["classifier-free"]:
        per = res["classifier-free"][3.0][1]
        print(f"target (CFG scale 3, every class >= 95%): {'met' if min(per) >= 0.95 - 1e-6 else 'NOT met'}: "
              + ", ".join(f"{c} {a:.0%}" for c, a in zip(classes, per)))
    m = min(3, args.eval_per_class)
    for name, file in (("classifier-free", "06_cfg_grid.png"), ("classifier", "06_classifier_guidance.png")):
        labelled(grid_image(class_grid([samples[name][s] for s in scales[name]], K, args.eval_per_class, m),
                            nrow=m * len(scales[name]), scale=2),
                 f"{name} guidance: a row per class, {m} samples per scale (the same {m} noises at every scale"
                 + (" and in 06_cfg_grid.png)" if name == "classifier" else ")"),
                 row_labels=classes, col_labels=[f"s = {s:g}" for s in scales[name]]).save(os.path.join(args.out, file))
    save_tradeoff(os.path.join(args.out, "06_tradeoff.png"), res, floor)
    weighted = {"min-snr": "min-SNR v", "none": "plain v"}
    logs = [(f"class: {weighted[args.loss_weight]}", class_log.get("losses", []))]

    # -- text: captions -> tokens -> encoder -> cross-attention, with held-out colour-shape pairs
    if tokenizer is not None:
        model, text_log, y_null = text_model(unet, config)
        logs.append((f"text: {weighted[args.text_loss_weight]}", text_log.get("losses", [])))
        t1 = time.time()
        real_colour = torch.tensor([list(COLORS).index(captions[i].split()[2]) for i in held[:n_eval].tolist()])
        pairs = [(c, s) for s in SHAPES for c in COLORS]
        tokens = tokenizer.encode([f"a {c} {s}" for c, s in pairs for _ in range(args.text_per_prompt)])
        x = text_sample(model, y_null, tokens, args.text_scale, args.seed + 555)
        shape_pred = features_and_classes(clf, x, device)[1]
        colour_pred = colour_of(x)
        want_shape = torch.tensor([SHAPES.index(s) for _, s in pairs]).repeat_interleave(args.text_per_prompt)
        want_colour = torch.tensor([list(COLORS).index(c) for c, _ in pairs]).repeat_interleave(args.text_per_prompt)
        unseen = torch.tensor([p in args.holdout for p in pairs]).repeat_interleave(args.text_per_prompt)
        print(f"\ntext model, 'a COLOUR SHAPE' prompts, {args.text_per_prompt} samples each, guidance scale "
              f"{args.text_scale:g} ({time.time() - t1:.0f} s); colour read from pixels (exact on real images: "
              f"{(colour_of(real) == real_colour).float().mean():.1%}), shape by the judge")
        print(f"{'prompts':>16} {'n':>5} {'shape acc':>10} {'colour acc':>11} {'both':>6}")
        for name, sel in (("seen", ~unseen), ("unseen (held out)", unseen)):
            if sel.any():
                ok_s, ok_c = shape_pred[sel] == want_shape[sel], colour_pred[sel] == want_colour[sel]
                print(f"{name:>16} {int(sel.sum()):5d} {ok_s.float().mean():10.1%} {ok_c.float().mean():11.1%} "
                      f"{(ok_s & ok_c).float().mean():6.1%}")
        for c, s in args.holdout:
            sel = torch.tensor([p == (c, s) for p in pairs]).repeat_interleave(args.text_per_prompt)
            got = [f"{SHAPES[a]}/{list(COLORS)[b]}"
                   for a, b in zip(shape_pred[sel].tolist(), colour_pred[sel].tolist())]
            print(f"  'a {c} {s}' (unseen) drew (shape/colour): {', '.join(got)}")
        shows = ["a large blue star", "a small yellow circle at the top left", "a red square in the centre",
                 "a cyan triangle at the bottom", "a green cross at the right"]
        shows += [f"a {c} {s}" for c, s in args.holdout]
        ncol = 6 if not args.quick else 2
        x = text_sample(model, y_null, tokenizer.encode([p for p in shows for _ in range(ncol)]), args.text_scale,
                        args.seed + 556)
        rows = [p + (" (unseen pair)" if any(f" {c} {s}" in p for c, s in args.holdout) else "") for p in shows]
        labelled(grid_image(to_uint8(x), nrow=ncol, scale=3),
                 f"text-conditional samples, guidance scale {args.text_scale:g}", row_labels=rows).save(
            os.path.join(args.out, "06_text_grid.png"))
    if all(losses for _, losses in logs):
        save_losses(os.path.join(args.out, "06_loss.png"), logs)
    print(f"total {(time.time() - t_start) / 60:.1f} min; wrote 06_cfg_grid.png, 06_classifier_guidance.png, "
          f"06_tradeoff.png{', 06_text_grid.png' if tokenizer else ''}, 06_loss.png to {args.out}/")


if __name__ == "__main__":
    main()
