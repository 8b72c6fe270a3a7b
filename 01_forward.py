"""Lesson 01: the forward process, or how to turn any image into pure noise.

A diffusion model learns to undo a fixed, simple corruption: adding a little Gaussian noise, T times.
This lesson builds that corruption (the *forward process*) and checks every claim about it by numbers.

1. Gaussian noise, reparameterised: a sample of N(mu, sigma^2) is mu + sigma * eps with eps ~ N(0, 1).
   The randomness stays in eps, so x is a plain, differentiable function of mu and sigma.
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
5. Signal-to-noise ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t). The linear schedule's log SNR falls
   fast early and then spends its last few hundred steps on images that are already noise; the cosine
   schedule's log SNR falls almost linearly in t, so every step destroys a similar share of what is left.
6. Why x_T is pure noise: at T - 1 the linear alpha_bar is 4.04e-5, so x_T = 0.006 x_0 + 0.99998 eps.
   Whatever the image was, x_T is N(0, I) to within a fraction of a percent: sampling can start there.

Time steps are 0-based, as in code: t = 0 is the first noising step, t = T-1 the last; alpha_bar[t] is
the paper's alpha_bar_{t+1}.

Run:
    python 01_forward.py            # under a minute on a 2-core CPU; writes figures/01_*
    python 01_forward.py --quick    # a few seconds, smaller numbers; writes runs/quick/01_*
    main(["--quick"])               # the same from a notebook cell
It writes 01_chain.png, 01_noising.png, 01_schedules.png, 01_2d_diffusion.png, 01_xT_histogram.png and
01_noising.gif, and prints the closed-form-against-chain table.
"""

# %% Imports and the lesson's constants
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

SHOW_T = (0, .05, .1, .2, .3, .4, .5, .7, 1)  # 01_noising.png's columns, as fractions of T
N_2D, N_HIST, GIF_FRAMES = 3000, 512, 60  # points in the 2D figure, images in the histogram, GIF frames


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
    if kind == "cross":  # a plus sign: 12 vertices, arms of half-width w
        w, c, s = 0.32 * r, math.cos(angle), math.sin(angle)
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    radii = {"square": [r] * 4, "triangle": [r] * 3, "star": [r, 0.45 * r] * 5}[kind]  # star: two radii
    a = [angle + 2 * math.pi * i / len(radii) for i in range(len(radii))]
    return [(cx + rad * math.cos(a_i), cy + rad * math.sin(a_i)) for rad, a_i in zip(radii, a)]


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


# %% 2D data: two moons, which lesson 02 learns to sample
def two_moons(n, generator, noise=0.05):
    """The classic two interleaved half circles, scaled to roughly unit variance. float [n, 2]."""
    u = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(u), 1 - torch.cos(u))
    y = torch.where(upper, torch.sin(u), 0.5 - torch.sin(u))
    pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.6
    return pts + noise * torch.randn(n, 2, generator=generator)


# %% Experiments: the chain check, then one function per figure
def closed_form_table(schedules, n, seed):
    """Print the closed form against n runs of the chain for both schedules, with z-scores."""
    T = len(schedules["linear"])
    ts = sorted({0, T // 100, T // 10, T // 4, T // 2, T - 1})
    print(f"\nclosed form q(x_t | x_0) against {n} runs of the chain, x_0 = 0.8 (|z| < 4 means they agree):")
    print(f"{'schedule':>8} {'t':>5} {'mean cf':>9} {'mean chain':>10} {'var cf':>8} {'var chain':>9} "
          f"{'z mean':>7} {'z var':>7}")
    worst = 0.0
    for k, betas in schedules.items():
        for t, m_cf, m_ch, v_cf, v_ch, zm, zv in check_closed_form(betas, n, ts, seed=seed):
            worst = max(worst, abs(zm), abs(zv))
            print(f"{k:>8} {t:>5} {m_cf:9.5f} {m_ch:10.5f} {v_cf:8.5f} {v_ch:9.5f} {zm:7.2f} {zv:7.2f}")
    print(f"largest |z| = {worst:.2f}")


def figure_noising(path, alpha_bars, image, caption, g, device):
    """One image [1, 3, H, W] noised across t by both schedules, with the same noise in both rows."""
    T = len(alpha_bars["linear"])
    show_t = sorted({min(T - 1, round(f * T)) for f in SHOW_T})
    x0 = to_unit(image).to(device).expand(len(show_t), -1, -1, -1)  # [len(show_t), 3, H, W]
    noise = torch.randn(image.shape, generator=g).to(device).expand_as(x0)
    t = torch.tensor(show_t, device=device)
    rows = torch.cat([q_sample(x0, t, ab, noise) for ab in alpha_bars.values()])
    grid(to_uint8(rows).cpu(), len(show_t), f"q(x_t | x_0) for \"{caption}\": same noise, two schedules",
         row_labels=list(alpha_bars), col_labels=[f"t={t}" for t in show_t]).save(path)


def figure_schedules(path, schedules, alpha_bars):
    """beta_t, alpha_bar_t and log SNR(t) of both schedules, side by side."""
    tt, size = list(range(len(alpha_bars["linear"]))), (500, 400)
    save_row(path, [
        line_plot([(k, tt, b.tolist()) for k, b in schedules.items()],
                  "beta_t (log scale)", "t", "beta_t", logy=True, ylim=(1e-5, 1.0), size=size),
        line_plot([(k, tt, ab.tolist()) for k, ab in alpha_bars.items()],
                  "alpha_bar_t: share of signal variance left", "t", "alpha_bar_t", ylim=(0, 1.02), size=size),
        line_plot([(k, tt, snr(ab).log().tolist()) for k, ab in alpha_bars.items()],
                  "log SNR(t) = log(alpha_bar / (1 - alpha_bar))", "t", "log SNR", size=size)])


def figure_2d(path, alpha_bar, n, g, lim=3.0):
    """Two moons diffusing into N(0, I): one scatter panel per t, the same noise in each panel."""
    T = len(alpha_bar)
    pts = two_moons(n, g).double()  # [n, 2]
    eps = torch.randn(pts.shape, generator=g, dtype=torch.float64)
    panels = []
    for t in [0, T // 10, T // 4, T // 2, (3 * T) // 4, T - 1]:
        img, d, to_px = axes((-lim, lim), (-lim, lim), f"t = {t}", "x1", "x2", size=(290, 300))
        for x, y in q_sample(pts, torch.full((n,), t), alpha_bar, eps).tolist():
            if abs(x) < lim and abs(y) < lim:
                px, py = to_px(x, y)
                d.ellipse([px - 1, py - 1, px + 1, py + 1], fill=PALETTE[0])
        panels.append(img)
    save_row(path, panels, "two moons diffusing into N(0, I) (cosine schedule, same noise in each panel)")


def figure_histogram(path, alpha_bar, n, seed, g, device):
    """The pixels of x_T for n shape images, as a density histogram, against the N(0, 1) density."""
    x0 = to_unit(make_shapes(n, seed=seed + 1)[0]).to(device)
    t = torch.full((n,), len(alpha_bar) - 1, device=device)
    xT = q_sample(x0, t, alpha_bar, torch.randn(x0.shape, generator=g).to(device)).flatten().cpu().double()
    print(f"\nx_T pixels (linear schedule, {len(xT)} values): mean {xT.mean():.4f}, std {xT.std():.4f} "
          "(N(0, 1): 0, 1)")
    w = 0.2  # 40 bins on [-4, 4]; a density is count / (number of values * bin width)
    hist = (torch.histc(xT, bins=40, min=-4, max=4) / (len(xT) * w)).tolist()
    centres = [-4 + w * (i + 0.5) for i in range(40)]
    img, d, to_px = axes((-4, 4), (0, max(max(hist), 0.4) * 1.1), f"x_T at t = T-1 (linear): mean "
                         f"{xT.mean():.3f}, std {xT.std():.3f}", "pixel value of x_T", "density", size=(620, 430))
    for c, h in zip(centres, hist):
        (ax, ay), (bx, by) = to_px(c - w / 2, h), to_px(c + w / 2, 0)
        d.rectangle([ax + 1, ay, bx - 1, by], fill=(158, 202, 225), outline=PALETTE[0])
    d.line([to_px(c, math.exp(-c * c / 2) / math.sqrt(2 * math.pi)) for c in centres], fill=PALETTE[1], width=3)
    d.rectangle([420, 60, 590, 102], fill="white", outline=(200, 200, 200))  # the legend
    d.rectangle([430, 68, 450, 78], fill=(158, 202, 225), outline=PALETTE[0])
    d.text((456, 73), "x_T histogram", fill="black", font=font(13), anchor="lm")
    d.line([(430, 92), (450, 92)], fill=PALETTE[1], width=3)
    d.text((456, 92), "N(0, 1) density", fill="black", font=font(13), anchor="lm")
    img.save(path)


def gif_noising(path, alpha_bars, images, frames, g, device):
    """A GIF of a few images noised step by step: linear schedule on top, cosine below."""
    T = len(alpha_bars["linear"])
    x0 = to_unit(images).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    pics = []
    for t in list(range(0, T, max(1, T // frames))) + [T - 1]:
        tb = torch.full((len(x0),), t, device=device)
        both = torch.cat([q_sample(x0, tb, ab, noise) for ab in alpha_bars.values()])
        pic = grid(to_uint8(both).cpu(), len(x0), f"t = {t:4d}   top: linear, bottom: cosine")
        pics.append(pic.convert("P", palette=Image.Palette.ADAPTIVE))
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=[600] + [60] * (len(pics) - 2) + [1500],
                 loop=0)


def figure_chain(path, alpha_bar, image, caption, g, device, scale=3, gap=52):
    """One image [1, 3, H, W] through the forward chain q (top row) and the reverse chain p_theta (bottom)."""
    T, cell = len(alpha_bar), image.shape[-1] * scale
    ts = [T // 10, T // 4, T // 2, (3 * T) // 4, T - 1]
    x0, noise = to_unit(image).to(device), torch.randn(image.shape, generator=g).to(device)  # one fixed noise
    xs = torch.cat([x0, q_sample(x0, torch.tensor(ts, device=device), alpha_bar, noise)])  # [len(ts) + 1, 3, H, W]
    pics = [Image.fromarray(a).resize((cell, cell), Image.Resampling.NEAREST)
            for a in to_uint8(xs).permute(0, 2, 3, 1).cpu().numpy()]
    caps, n = ["x_0 (data)\nalpha_bar = 1"] + [f"t = {t}\nalpha_bar = {alpha_bar[t]:.2g}" for t in ts], len(xs)
    canvas = Image.new("RGB", (n * cell + (n - 1) * gap + 40, 2 * cell + 216), "white")
    d, f = ImageDraw.Draw(canvas), font(13)
    d.text((canvas.width // 2, 8), f"Forward (top) and reverse (bottom) chains for \"{caption}\" (cosine schedule)",
           fill="black", font=font(16), anchor="ma")
    for r, (order, color, label) in enumerate([(range(n), PALETTE[1], "q(x_t | x_{t-1}): add noise (fixed)"), (
            range(n - 1, -1, -1), PALETTE[0], "p_theta(x_{t-1} | x_t): remove noise (learned, lessons 02-04)")]):
        y = 64 + r * (cell + 96)  # the top of this row's images, under its label
        d.text((canvas.width // 2, y - 24), label, fill=color, font=font(15), anchor="ma")
        for k, i in enumerate(order):
            x = 20 + k * (cell + gap)
            canvas.paste(pics[i], (x, y))
            d.multiline_text((x + cell / 2, y + cell + 6), caps[i], fill="black", font=f, anchor="ma", align="center")
            if k:  # an arrow from the image before to this one
                ym = y + cell / 2
                d.line([(x - gap + 6, ym), (x - 10, ym)], fill=color, width=3)
                d.polygon([(x - 4, ym), (x - 16, ym - 7), (x - 16, ym + 7)], fill=color)
    canvas.save(path)


# %% Main: the table of contents
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output folder {args.out!r} ({e.strerror}); pass --out with a writable folder")
    start, T = time.time(), args.T
    schedules = {"linear": linear_betas(T), "cosine": cosine_betas(T)}
    alpha_bars = {k: alpha_bar_of(b) for k, b in schedules.items()}
    print(f"device {device}, T = {T}")
    for k, ab in alpha_bars.items():
        print(f"{k:>6}: alpha_bar[0] = {ab[0]:.6f}, alpha_bar[T-1] = {ab[-1]:.3e}, "
              f"x_T = {ab[-1].sqrt():.4f} x0 + {(1 - ab[-1]).sqrt():.5f} eps")
    closed_form_table(schedules, args.n_check, args.seed)

    n_2d, n_hist, frames = (1000, 64, 20) if args.quick else (N_2D, N_HIST, GIF_FRAMES)
    images, _, captions = make_shapes(8, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)  # one stream for every figure's noise, drawn in this order
    out = args.out
    figure_noising(os.path.join(out, "01_noising.png"), alpha_bars, images[:1], captions[0], g, device)
    figure_schedules(os.path.join(out, "01_schedules.png"), schedules, alpha_bars)
    figure_2d(os.path.join(out, "01_2d_diffusion.png"), alpha_bars["cosine"], n_2d, g)
    figure_histogram(os.path.join(out, "01_xT_histogram.png"), alpha_bars["linear"], n_hist, args.seed, g, device)
    gif_noising(os.path.join(out, "01_noising.gif"), alpha_bars, images[:4], frames, g, device)
    figure_chain(os.path.join(out, "01_chain.png"), alpha_bars["cosine"], images[:1], captions[0], g, device)
    print(f"\nwrote 01_noising.png, 01_schedules.png, 01_2d_diffusion.png, 01_xT_histogram.png, "
          f"01_noising.gif, 01_chain.png to {out}/ in {time.time() - start:.1f}s")


def parse_args(argv=None):
    if argv is None and "ipykernel" in sys.modules:  # in Jupyter, sys.argv holds the kernel's own flags
        argv = []
    p = Parser(description="Lesson 01: the forward process (noise, schedules, closed form).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--T", type=int, default=1000, help="number of diffusion steps")
    p.add_argument("--n-check", type=int, default=100_000,
                   help="samples per row of the closed-form-against-chain check")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--out", help="folder for the figures; None means figures/, or runs/quick/ with --quick")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    args = p.parse_args(argv)
    if args.T < 2:
        fail(f"--T must be at least 2 (got {args.T}); DDPM uses --T 1000")
    if args.n_check < 100:
        fail(f"--n-check must be at least 100 (got {args.n_check})")
    if args.quick:
        args.n_check = min(args.n_check, 20_000)
    args.out = args.out or (os.path.join("runs", "quick") if args.quick else "figures")  # never overwrite figures/
    return args


# %% Appendix: command line and drawing
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
    """auto: cuda, then mps, then cpu; a device that is not there exits 2."""
    have = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(k for k, ok in have.items() if ok) if name == "auto" else name
    if not have[name]:
        fail(f"--device {name} was asked for but {name.upper()} is not available; use --device cpu (or auto)")
    return torch.device(name)


# The drawing kit, with PIL (matplotlib is not a dependency); later lessons copy it from here.
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207)]


def font(px):
    return ImageFont.load_default(size=px)


def grid(x_uint8, nrow, title, row_labels=(), col_labels=(), scale=3):
    """uint8 [N, C, H, W] -> a titled PIL image of the grid, upscaled (nearest) so pixels stay crisp."""
    g = make_grid(x_uint8, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()  # [H', W', 3]
    img = Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.Resampling.NEAREST)
    f = font(14)
    left = max((int(f.getlength(s)) for s in row_labels), default=0) + 12 if row_labels else 8
    top = 50 if col_labels else 32
    canvas = Image.new("RGB", (img.width + left + 8, img.height + top + 8), "white")
    canvas.paste(img, (left, top))
    d = ImageDraw.Draw(canvas)
    d.text((canvas.width // 2, 6), title, fill="black", font=font(16), anchor="ma")
    for i, s in enumerate(col_labels):  # labels centred over evenly spaced columns and rows
        d.text((left + (i + 0.5) * img.width / len(col_labels), top - 4), s, fill="black", font=f, anchor="md")
    for i, s in enumerate(row_labels):
        d.text((left - 6, top + (i + 0.5) * img.height / len(row_labels)), s, fill="black", font=f, anchor="rm")
    return canvas


def ticks(lo, hi, log=False):
    """Round tick values in [lo, hi]: powers of ten on a log axis, else 1, 2 or 5 times a power of ten apart."""
    if log:
        return [10.0 ** e for e in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]
    raw = ((hi - lo) or 1.0) / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = min(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step + 1e-9) + 1)]


def axes(xlim, ylim, title, xlabel, ylabel, logx=False, logy=False, size=(480, 360)):
    """A blank plot with ticks, grid, labels and title: returns (image, draw, to_px: data -> pixel)."""
    img = Image.new("RGB", size, "white")
    d, f = ImageDraw.Draw(img), font(13)
    x0, y0, x1, y1 = 70, 50, size[0] - 20, size[1] - 50
    tx, ty = (math.log10 if logx else float), (math.log10 if logy else float)

    def to_px(x, y):
        return (x0 + (tx(x) - tx(xlim[0])) / ((tx(xlim[1]) - tx(xlim[0])) or 1) * (x1 - x0),
                y1 - (ty(y) - ty(ylim[0])) / ((ty(ylim[1]) - ty(ylim[0])) or 1) * (y1 - y0))

    label = lambda v: f"{v:.0e}" if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3) else f"{v:g}"
    for v in ticks(*xlim, logx):
        px = to_px(v, ylim[0])[0]
        d.line([(px, y0), (px, y1 + 4)], fill=(230, 230, 230))
        d.text((px, y1 + 6), label(v), fill="black", font=f, anchor="ma")
    for v in ticks(*ylim, logy):
        py = to_px(xlim[0], v)[1]
        d.line([(x0 - 4, py), (x1, py)], fill=(230, 230, 230))
        d.text((x0 - 6, py), label(v), fill="black", font=f, anchor="rm")
    d.rectangle((x0, y0, x1, y1), outline="black")
    d.text(((x0 + x1) / 2, y1 + 24), xlabel, fill="black", font=f, anchor="ma")
    d.text((x0 - 4, y0 - 8), ylabel, fill="black", font=f, anchor="ld")
    d.text((size[0] / 2, 8), title, fill="black", font=font(15), anchor="ma")
    return img, d, to_px


def line_plot(series, title, xlabel, ylabel, logx=False, logy=False, ylim=None, size=(480, 360)):
    """series: [(label, xs, ys)] -> a PIL image of the lines with a legend in the top-right corner."""
    xs = [x for _, xs_, _ in series for x in xs_]
    ys = [y for _, _, ys_ in series for y in ys_]
    pad = 0 if logy else 0.05 * ((max(ys) - min(ys)) or 1)
    ylim = ylim or (min(ys) - pad, max(ys) + pad)
    img, d, to_px = axes((min(xs), max(xs)), ylim, title, xlabel, ylabel, logx, logy, size)
    for k, (name, xs_, ys_) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        pts = [to_px(x, min(max(y, ylim[0]), ylim[1])) for x, y in zip(xs_, ys_)]
        d.line(pts, fill=color, width=2)
        for px, py in pts if len(pts) <= 30 else ():  # few points: mark each measurement
            d.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
        d.line([(size[0] - 170, 62 + 18 * k), (size[0] - 145, 62 + 18 * k)], fill=color, width=3)
        d.text((size[0] - 140, 62 + 18 * k), name, fill="black", font=font(13), anchor="lm")
    return img


def save_row(path, images, title=""):
    """Paste PIL images side by side under an optional title and save the PNG."""
    top = 30 if title else 0
    canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images) + top), "white")
    for k, im in enumerate(images):
        canvas.paste(im, (sum(i.width for i in images[:k]), top))
    ImageDraw.Draw(canvas).text((canvas.width // 2, 6), title, fill="black", font=font(16), anchor="ma")
    canvas.save(path)


if __name__ == "__main__":
    main()
