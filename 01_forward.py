"""Lesson 01: the forward process, or how to turn any image into pure noise.

What you will learn
-------------------
A diffusion model learns to undo a fixed, simple corruption: adding a little Gaussian noise, T times.
This lesson builds that corruption (the *forward process*) and checks every claim about it by numbers.

1. Gaussian noise and the reparameterisation trick. A sample of N(mu, sigma^2) is mu + sigma * eps
   with eps ~ N(0, 1). Writing noise this way keeps the randomness in eps, so x stays a plain,
   differentiable function of mu and sigma.
2. One step of noise (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 2):
       q(x_t | x_{t-1}) = N( sqrt(1 - beta_t) x_{t-1}, beta_t I )
   i.e. x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t. Shrinking x by sqrt(1 - beta_t) while adding
   variance beta_t keeps data of unit variance at unit variance.
3. The closed form (DDPM eq. 4): with alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s,
       q(x_t | x_0) = N( sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I )
       x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
   Why: a sum of independent Gaussians is Gaussian, with the variances added. Two steps give
   sqrt(a2 a1) x_0 + sqrt(a2 (1 - a1)) e1 + sqrt(1 - a2) e2, and the noise has variance
   a2 - a2 a1 + 1 - a2 = 1 - a2 a1. Induction does the rest. So training never runs the chain:
   it jumps to any t in one line (`q_sample`). We check this against the chain below.
4. Schedules. Linear (DDPM): beta from 1e-4 to 0.02 over T = 1000 steps. Cosine (Nichol & Dhariwal
   2021, "Improved DDPM", eq. 17): alpha_bar_t = f(t) / f(0), f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2),
   s = 0.008, betas clipped at 0.999.
5. Signal-to-noise ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t). The linear schedule's log SNR
   falls fast early and then spends its last few hundred steps on images that are already noise;
   the cosine schedule's log SNR falls almost linearly in t, so every step destroys a similar share
   of what is left. That is why it works better for small images.
6. Why x_T is pure noise: at T - 1 the linear alpha_bar is 4.04e-5, so x_T = 0.006 x_0 + 0.99998 eps.
   Whatever the image was, x_T is N(0, I) to within a fraction of a percent: sampling can start there.

Time steps are 0-based here, as in code: t = 0 is the first noising step, t = T-1 the last;
alpha_bar[t] is the paper's alpha_bar_{t+1}.

Run
---
    python 01_forward.py            # under a minute on a 2-core CPU; writes figures/01_*
    python 01_forward.py --quick    # a few seconds, smaller numbers (used by the tests)

It writes figures/01_noising.png, 01_schedules.png, 01_2d_diffusion.png, 01_xT_histogram.png,
01_noising.gif, and prints the closed-form-against-chain table.
"""

# %% Setup: imports, command line, device
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid


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
    p = Parser(description="Lesson 01: the forward process (noise, schedules, closed form).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--T", type=int, default=1000, help="number of diffusion steps")
    p.add_argument("--n-check", type=int, default=100_000,
                   help="samples per row of the closed-form-against-chain check")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="figures", help="folder for the figures")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    args = p.parse_args(argv)
    if args.T < 2:
        fail(f"--T must be at least 2 (got {args.T}); DDPM uses --T 1000")
    if args.n_check < 100:
        fail(f"--n-check must be at least 100 (got {args.n_check})")
    if args.quick:
        args.n_check = min(args.n_check, 20_000)
    return args


# %% Noise schedules: beta_t, alpha_bar_t and the signal-to-noise ratio
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


def snr(alpha_bar):
    # SNR(t) = alpha_bar_t / (1 - alpha_bar_t): signal power over noise power in x_t
    return alpha_bar / (1 - alpha_bar)


# %% The closed form q(x_t | x_0), and a check against the step-by-step chain
def q_sample(x0, t, alpha_bar, noise):
    """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise, for a batch of t (int64 [B])."""
    ab = alpha_bar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # [B, 1, 1, 1]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def run_chain(x0, betas, ts, generator):
    """Apply q(x_t | x_{t-1}) one step at a time from t = 0; return {t: x_t} for each t in ts."""
    x, out = x0.clone(), {}
    for t in range(max(ts) + 1):
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        beta = betas[t].item()
        x.mul_(math.sqrt(1 - beta)).add_(eps, alpha=math.sqrt(beta))  # x_t = sqrt(1-beta_t) x_{t-1} + sqrt(beta_t) eps
        if t in ts:
            out[t] = x.clone()
    return out


def check_closed_form(betas, n, ts, x0_value=0.8, seed=0):
    """Mean and variance of x_t after the chain against the closed form, with z-scores.

    With n samples, the sample mean has standard error sqrt(var/n) and the sample variance
    sqrt(2/n) var (Gaussian data), so |z| below about 4 means agreement.
    """
    g = torch.Generator().manual_seed(seed)
    alpha_bar = alpha_bar_of(betas)
    x0 = torch.full((n,), x0_value, dtype=torch.float64)
    chain = run_chain(x0, betas, ts, g)
    rows = []
    for t in ts:
        mean_cf, var_cf = alpha_bar[t].sqrt().item() * x0_value, 1 - alpha_bar[t].item()
        mean_ch, var_ch = chain[t].mean().item(), chain[t].var().item()
        z_mean = (mean_ch - mean_cf) / math.sqrt(var_cf / n)
        z_var = (var_ch - var_cf) / (math.sqrt(2 / n) * var_cf)
        rows.append((t, mean_cf, mean_ch, var_cf, var_ch, z_mean, z_var))
    return rows


# %% The built-in dataset: shapes (drawn, not downloaded)
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


# %% Figures: image grids and PIL line plots (matplotlib is not a dependency)
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


# %% Figure helpers for 2D data
def two_moons(n, generator, noise=0.05):
    """The classic two interleaved half circles, scaled to roughly unit variance. float [n, 2]."""
    u = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(u), 1 - torch.cos(u))
    y = torch.where(upper, torch.sin(u), 0.5 - torch.sin(u))
    pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.6
    return pts + noise * torch.randn(n, 2, generator=generator)


def scatter_panel(d, box, pts, title, lim=3.0, color=(31, 119, 180)):
    to_px = plot_axes(d, box, (-lim, lim), (-lim, lim), "x1", "x2", title)
    for x, y in pts.tolist():
        if abs(x) < lim and abs(y) < lim:
            px, py = to_px(x, y)
            d.ellipse([px - 1, py - 1, px + 1, py + 1], fill=color)


# %% Main: the table and the figures
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output folder {args.out!r} ({e.strerror}); pass --out with a writable folder")
    start = time.time()
    T = args.T
    schedules = {"linear": linear_betas(T), "cosine": cosine_betas(T)}
    alpha_bars = {k: alpha_bar_of(b) for k, b in schedules.items()}
    print(f"device {device}, T = {T}")
    for k, ab in alpha_bars.items():
        print(f"{k:>6}: alpha_bar[0] = {ab[0]:.6f}, alpha_bar[T-1] = {ab[-1]:.3e}, "
              f"x_T = {ab[-1].sqrt():.4f} x0 + {(1 - ab[-1]).sqrt():.5f} eps")

    # -- the closed form against the chain, both schedules
    ts = sorted({0, T // 100, T // 10, T // 4, T // 2, T - 1})
    print(f"\nclosed form q(x_t | x_0) against {args.n_check} runs of the chain, x_0 = 0.8 "
          "(|z| < 4 means they agree):")
    print(f"{'schedule':>8} {'t':>5} {'mean cf':>9} {'mean chain':>10} {'var cf':>8} {'var chain':>9} "
          f"{'z mean':>7} {'z var':>7}")
    worst = 0.0
    for k, betas in schedules.items():
        for t, m_cf, m_ch, v_cf, v_ch, zm, zv in check_closed_form(betas, args.n_check, ts, seed=args.seed):
            worst = max(worst, abs(zm), abs(zv))
            print(f"{k:>8} {t:>5} {m_cf:9.5f} {m_ch:10.5f} {v_cf:8.5f} {v_ch:9.5f} {zm:7.2f} {zv:7.2f}")
    print(f"largest |z| = {worst:.2f}")

    # -- shapes noised across t, both schedules (same noise for both rows)
    images, labels, captions = make_shapes(8, seed=args.seed)
    x0 = to_unit(images[:1]).to(device)  # [1, 3, 32, 32]
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(x0.shape, generator=g).to(device)
    show_t = [0, 50, 100, 200, 300, 400, 500, 700, 999] if T == 1000 else \
        sorted({int(round(f * (T - 1))) for f in (0, .05, .1, .2, .3, .4, .5, .7, 1)})
    rows = []
    for k, ab in alpha_bars.items():
        t = torch.tensor(show_t, device=device)
        rows.append(q_sample(x0.expand(len(show_t), -1, -1, -1), t, ab, noise.expand(len(show_t), -1, -1, -1)))
    grid = grid_image(to_uint8(torch.cat(rows)).cpu(), nrow=len(show_t), scale=3)
    labelled(grid, f"q(x_t | x_0) for \"{captions[0]}\": same noise, two schedules",
             row_labels=["linear", "cosine"], col_labels=[f"t={t}" for t in show_t]
             ).save(os.path.join(args.out, "01_noising.png"))

    # -- schedule curves: beta_t, alpha_bar_t, log SNR(t)
    tt = list(range(T))
    img = Image.new("RGB", (1500, 430), "white")
    d = ImageDraw.Draw(img)
    line_panel(d, (80, 60, 480, 370), [(k, tt, b.tolist()) for k, b in schedules.items()],
               "beta_t (log scale)", "t", "beta_t", logy=True, ylim=(1e-5, 1.0))
    line_panel(d, (580, 60, 980, 370), [(k, tt, ab.tolist()) for k, ab in alpha_bars.items()],
               "alpha_bar_t: share of signal variance left", "t", "alpha_bar_t", ylim=(0, 1.02))
    line_panel(d, (1080, 60, 1480, 370), [(k, tt, snr(ab).log().tolist()) for k, ab in alpha_bars.items()],
               "log SNR(t) = log(alpha_bar / (1 - alpha_bar))", "t", "log SNR")
    img.save(os.path.join(args.out, "01_schedules.png"))

    # -- 2D data diffusing into N(0, I) (cosine schedule)
    n2d = 1000 if args.quick else 3000
    pts = two_moons(n2d, g).double()
    eps2d = torch.randn(pts.shape, generator=g, dtype=torch.float64)
    t2d = [0, T // 10, T // 4, T // 2, (3 * T) // 4, T - 1]
    img = Image.new("RGB", (6 * 260 + 40, 350), "white")
    d = ImageDraw.Draw(img)
    for i, t in enumerate(t2d):
        xt = q_sample(pts, torch.full((n2d,), t), alpha_bars["cosine"], eps2d)
        scatter_panel(d, (50 + 260 * i, 80, 50 + 260 * i + 200, 280), xt, f"t = {t}")
    d.text((img.width // 2, 8), "two moons diffusing into N(0, I) (cosine schedule, same noise in each panel)",
           fill="black", font=font(16), anchor="ma")
    img.save(os.path.join(args.out, "01_2d_diffusion.png"))

    # -- histogram of x_T pixels against the N(0, 1) density
    many, _, _ = make_shapes(64 if args.quick else 512, seed=args.seed + 1)
    x0s = to_unit(many).to(device)
    xT = q_sample(x0s, torch.full((len(x0s),), T - 1, device=device), alpha_bars["linear"],
                  torch.randn(x0s.shape, generator=g).to(device)).flatten().cpu().double()
    edges = torch.linspace(-4, 4, 41, dtype=torch.float64)
    hist = torch.histc(xT, bins=40, min=-4, max=4) / (len(xT) * (edges[1] - edges[0]))
    centres = ((edges[1:] + edges[:-1]) / 2).tolist()
    dens = [math.exp(-c * c / 2) / math.sqrt(2 * math.pi) for c in centres]
    print(f"\nx_T pixels (linear schedule, {len(xT)} values): mean {xT.mean():.4f}, std {xT.std():.4f} "
          "(N(0, 1): 0, 1)")
    img = Image.new("RGB", (620, 430), "white")
    d = ImageDraw.Draw(img)
    to_px = plot_axes(d, (80, 60, 580, 370), (-4, 4), (0, max(max(hist.tolist()), 0.4) * 1.1), "pixel value of x_T",
                      "density", f"x_T at t = T-1 (linear): mean {xT.mean():.3f}, std {xT.std():.3f}")
    w = (edges[1] - edges[0]).item()
    for c, h in zip(centres, hist.tolist()):
        (ax, ay), (bx, by) = to_px(c - w / 2, h), to_px(c + w / 2, 0)
        d.rectangle([ax + 1, ay, bx - 1, by], fill=(158, 202, 225), outline=(31, 119, 180))
    d.line([to_px(c, p) for c, p in zip(centres, dens)], fill=PALETTE[1], width=3)
    d.rectangle([400, 70, 570, 112], fill="white", outline=(200, 200, 200))
    d.rectangle([410, 78, 430, 88], fill=(158, 202, 225), outline=(31, 119, 180))
    d.text((436, 83), "x_T histogram", fill="black", font=font(13), anchor="lm")
    d.line([(410, 102), (430, 102)], fill=PALETTE[1], width=3)
    d.text((436, 102), "N(0, 1) density", fill="black", font=font(13), anchor="lm")
    img.save(os.path.join(args.out, "01_xT_histogram.png"))

    # -- GIF: four shapes noised step by step, linear (top) and cosine (bottom)
    x4 = to_unit(images[:4]).to(device)
    n4 = torch.randn(x4.shape, generator=g).to(device)
    frames = []
    frame_ts = list(range(0, T, max(1, T // (20 if args.quick else 60)))) + [T - 1]
    for t in frame_ts:
        tb = torch.full((4,), t, device=device)
        both = torch.cat([q_sample(x4, tb, alpha_bars[k], n4) for k in ("linear", "cosine")])
        frame = labelled(grid_image(to_uint8(both).cpu(), nrow=4, scale=3),
                         f"t = {t:4d}   top: linear, bottom: cosine")
        frames.append(frame.convert("P", palette=Image.Palette.ADAPTIVE))
    frames[0].save(os.path.join(args.out, "01_noising.gif"), save_all=True, append_images=frames[1:],
                   duration=[600] + [60] * (len(frames) - 2) + [1500], loop=0)

    print(f"\nwrote 01_noising.png, 01_schedules.png, 01_2d_diffusion.png, 01_xT_histogram.png, "
          f"01_noising.gif to {args.out}/ in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
