"""Lesson 02: DDPM, derived and run on 2D data, where every step can be seen and measured.

What you will learn
-------------------
Lesson 01 built the forward process q(x_t | x_0) that turns data into noise. Here we learn to run it
backwards, with a model p_theta(x_{t-1} | x_t), train it, sample from it and measure how good the samples
are. On 2D data the whole distribution fits in one scatter plot, so "good" is a number, not an adjective.
Time steps are 0-based as in lesson 01: alpha_bar[t] is the papers' alpha_bar_{t+1}, and alpha_bar[-1] := 1.

1. The posterior (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eqs. 6-7). Given x_0, the
   step back from x_t is Gaussian, q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I), with
       mu_tilde   = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                  + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
       beta_tilde = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
   Derivation: x_{t-1} and x_t given x_0 are jointly Gaussian (x_{t-1} ~ N(sqrt(ab_{t-1}) x_0, 1 - ab_{t-1}),
   x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps), with cov(x_{t-1}, x_t) = sqrt(alpha_t) (1 - ab_{t-1})
   and var(x_t) = 1 - ab_t. Conditioning a Gaussian: mean m_1 + C_12 / C_22 (x_t - m_2), variance
   C_11 - C_12^2 / C_22. Written out, that is the pair above. The tests redo it by brute force.
2. The reverse model p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I) copies that form with x_0
   replaced by a guess. Each KL term of the ELBO between two Gaussians is then a squared distance between
   means. Writing x_0 through the noise, x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), the mean becomes
       mu_theta = (x_t - beta_t / sqrt(1 - ab_t) eps_theta(x_t, t)) / sqrt(alpha_t)          (eq. 11)
   and the KL terms become weighted || eps - eps_theta ||^2. Dropping the weights gives the simple loss
       L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t) ||^2   (eq. 14)
   which is what we train: pick data, a random t and noise, ask the network for the noise.
3. Ancestral sampling (Algorithm 2): x_{T-1} ~ N(0, I); for t = T-1 .. 0:
       x_{t-1} = mu_theta(x_t, t) + sigma_t z,   z ~ N(0, I), and z = 0 at the last step (t = 0):
   the last step returns the mean, because any noise added there would stay in the sample.
   sigma_t^2 = beta_t or beta_tilde_t. Both are exact somewhere (Ho et al. section 3.2): beta_t when the
   data itself is N(0, I), beta_tilde_t when the data is a single point. Real data sits in between;
   with T = 1000 steps the two give nearly the same samples (the table below measures both).
4. The ideal denoiser of a finite training set {x_i}. The best possible eps_theta is E[eps | x_t], and
       E[x_0 | x_t] = sum_i w_i x_i,   w = softmax_i( -|| x_t - sqrt(ab_t) x_i ||^2 / (2 (1 - ab_t)) )
   a softmax over the training points. A network that learned this perfectly would only ever reproduce
   the training points: memorisation. We sample with it and count the samples that land on a training
   point, and compare with the trained network, which generalises (fills in the shape between them).
5. Measuring: the sliced Wasserstein-2 distance (SW2) between samples and fresh data, with two baselines:
   fresh data against fresh data (the floor: what even a perfect model gets with this many samples) and
   N(0, I) against data (the ceiling: a "model" that learned nothing).

Run
---
    python 02_ddpm.py               # four datasets, one MLP each: about 2 minutes on a 2-core CPU
    python 02_ddpm.py --quick       # a few seconds (used by the tests)
    python 02_ddpm.py --data spiral --schedule cosine --sigma beta --samples-out runs/spiral.pt

It writes figures/02_samples.png, 02_trajectory.png, 02_loss.png, 02_loss_by_t.png,
02_memorisation.png and 02_sampling.gif, and prints the distance table.
"""

# %% Setup: imports, command line, device
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont

DATASETS = ("moons", "spiral", "8gaussians", "checkerboard")


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
    p = Parser(description="Lesson 02: DDPM on 2D data (posterior, simple loss, ancestral sampling, memorisation).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="all", choices=["all", *DATASETS], help="2D dataset (all: each in turn)")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    p.add_argument("--sigma", default="beta_tilde", choices=["beta", "beta_tilde"],
                   help="reverse-step variance sigma_t^2 used for the figures and --samples-out")
    p.add_argument("--T", type=int, default=1000, help="number of diffusion steps")
    p.add_argument("--steps", type=int, default=5000, help="training steps per dataset")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine-decayed to 0)")
    p.add_argument("--width", type=int, default=128, help="hidden width of the MLP")
    p.add_argument("--n-train", type=int, default=20_000, help="training set size per dataset")
    p.add_argument("--n-samples", type=int, default=2000, help="samples drawn to measure the distance")
    p.add_argument("--n-memo", type=int, default=200, help="training set size of the memorisation experiment")
    p.add_argument("--samples-out", default=None, help="save the final samples (float tensor [N, 2]) to this .pt")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="figures", help="folder for the figures")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    args = p.parse_args(argv)
    for name in ("T", "steps", "batch", "width", "n_train", "n_samples", "n_memo"):
        if getattr(args, name) < (2 if name in ("T", "n_samples", "n_memo") else 1):
            fail(f"--{name.replace('_', '-')} must be a positive number (got {getattr(args, name)})"
                 + ("; DDPM uses --T 1000" if name == "T" else ""))
    if not args.lr > 0:
        fail(f"--lr must be positive (got {args.lr}); try 2e-3")
    if args.samples_out is not None and not args.samples_out.endswith(".pt"):
        fail(f"--samples-out must name a .pt file (got {args.samples_out!r})")
    if args.quick:
        args.steps, args.n_samples = min(args.steps, 300), min(args.n_samples, 500)
        args.n_train, args.n_memo = min(args.n_train, 2000), min(args.n_memo, 100)
    return args


# %% Noise schedules and q(x_t | x_0), copied from lesson 01 (tests/test_consistency.py pins them)
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


# %% The posterior q(x_{t-1} | x_t, x_0) and the eps <-> x_0 conversions
def posterior(betas, t):
    """Coefficients of q(x_{t-1} | x_t, x_0) at step t (an int): mean = c0 x_0 + ct x_t, variance beta_tilde.

    Ho et al. eqs. 6-7. At t = 0, alpha_bar_{t-1} = 1: the mean is x_0 itself and the variance is 0.
    """
    alpha_bar = alpha_bar_of(betas)
    ab, ab_prev = alpha_bar[t], (alpha_bar[t - 1] if t > 0 else torch.ones((), dtype=betas.dtype))
    c0 = ab_prev.sqrt() * betas[t] / (1 - ab)
    ct = (1 - betas[t]).sqrt() * (1 - ab_prev) / (1 - ab)
    beta_tilde = (1 - ab_prev) / (1 - ab) * betas[t]
    return c0, ct, beta_tilde


def x0_from_eps(x_t, eps, ab):
    # x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t): q_sample solved for x_0
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def eps_from_x0(x_t, x0, ab):
    # eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t): q_sample solved for eps
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


# %% Ancestral sampling (Algorithm 2)
@torch.no_grad()
def ddpm_sample(model, x_T, betas, sigma="beta_tilde", generator=None, keep=()):
    """Run p_theta(x_{t-1} | x_t) from t = T-1 down to 0. model(x, t) -> eps, t int64 [B].

    Returns x_0 [N, D] and {t: x_t} for every t in `keep` (x_t as it was *before* step t).
    Noise is drawn on the CPU from `generator`, so the samples do not depend on the device.
    """
    alpha_bar = alpha_bar_of(betas)
    x, snaps = x_T, {}
    for t in range(len(betas) - 1, -1, -1):
        if t in keep:
            snaps[t] = x.cpu()
        eps = model(x, torch.full((len(x),), t, dtype=torch.int64, device=x.device))
        c0, ct, beta_tilde = posterior(betas, t)
        x0_hat = x0_from_eps(x, eps, alpha_bar[t].to(x.dtype))
        mean = c0.to(x.dtype) * x0_hat + ct.to(x.dtype) * x  # = eq. 11's mu_theta, written through x0_hat
        if t > 0:  # the last step adds no noise: x_0 is the mean
            var = betas[t] if sigma == "beta" else beta_tilde
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = mean + var.sqrt().to(x.dtype) * z
        else:
            x = mean
    return x, snaps


# %% 2D datasets, each scaled to about [-2.5, 2.5]
def two_moons(n, generator, noise=0.05):
    """The classic two interleaved half circles, scaled to roughly unit variance. float [n, 2]."""
    u = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(u), 1 - torch.cos(u))
    y = torch.where(upper, torch.sin(u), 0.5 - torch.sin(u))
    pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.6
    return pts + noise * torch.randn(n, 2, generator=generator)


def make_data(name, n, generator):
    """n points of a 2D dataset, float32 [n, 2]."""
    if name == "moons":
        return two_moons(n, generator)
    if name == "spiral":  # one arm, 1.5 turns, radius growing linearly
        s = torch.rand(n, generator=generator)
        r, a = 0.3 + 2.0 * s, 3 * math.pi * s
        return torch.stack([r * torch.cos(a), r * torch.sin(a)], 1) + 0.06 * torch.randn(n, 2, generator=generator)
    if name == "8gaussians":  # eight small blobs on a circle of radius 2
        k = torch.randint(0, 8, (n,), generator=generator).float() * (2 * math.pi / 8)
        return 2 * torch.stack([torch.cos(k), torch.sin(k)], 1) + 0.1 * torch.randn(n, 2, generator=generator)
    if name == "checkerboard":  # 8 of the 16 unit squares of [-2, 2]^2, uniform inside each
        x = torch.rand(n, generator=generator) * 4 - 2
        y = torch.rand(n, generator=generator) + torch.randint(0, 2, (n,), generator=generator) * 2 - 2
        y = y + (torch.floor(x) % 2)  # shift every other column up by one: the black squares
        return torch.stack([x, y], 1)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


# %% The denoiser: a small MLP with a sinusoidal time embedding
def time_embedding(t, dim):
    """Sinusoidal embedding of integer steps (Vaswani et al. 2017; Ho et al. 2020): [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)  # 1 .. 1e-4
    angles = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.sin(angles), torch.cos(angles)], 1)


class Denoiser(nn.Module):
    """eps_theta(x_t, t): [B, 2], int64 [B] -> [B, 2]. Residual MLP; the time embedding enters every block."""

    def __init__(self, width=128, depth=2, t_dim=32, n_freq=5):
        super().__init__()
        self.t_dim = t_dim
        self.t_proj = nn.Linear(t_dim, width)  # sinusoids -> a learned per-t shift of the features
        # Fourier features of x (sin, cos at periods 4, 2, 1, 0.5, 0.25): without them a small MLP draws the
        # checkerboard's sharp squares as round blobs (it is biased towards smooth functions)
        self.register_buffer("freqs", 2.0 ** torch.arange(n_freq) * math.pi / 2, persistent=False)
        self.inp = nn.Linear(2 + 4 * n_freq, width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                                   nn.Linear(width, width)) for _ in range(depth)])
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t):
        temb = self.t_proj(time_embedding(t, self.t_dim))  # [B, t_dim] -> [B, width]
        xf = x[:, :, None] * self.freqs  # [B, 2, n_freq]
        h = self.inp(torch.cat([x, xf.sin().flatten(1), xf.cos().flatten(1)], 1))  # [B, 2 + 4 n_freq] -> [B, width]
        for block in self.blocks:
            h = h + block(h + temb)  # residual: each block adds a correction that depends on t
        return self.out(h)  # [B, width] -> [B, 2]


# %% Training with the simple loss (eq. 14)
def train(data, alpha_bar, args, device, generator):
    """Fit a Denoiser to `data` [n, 2]; returns (model, per-step losses)."""
    model = Denoiser(args.width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    data, T, losses = data.to(device), len(alpha_bar), []
    for _ in range(args.steps):
        idx = torch.randint(0, len(data), (args.batch,), generator=generator)
        t = torch.randint(0, T, (args.batch,), generator=generator)  # t ~ Uniform{0, ..., T-1}
        eps = torch.randn(args.batch, 2, generator=generator)
        x0, t, eps = data[idx.to(device)], t.to(device), eps.to(device)
        loss = (eps - model(q_sample(x0, t, alpha_bar, eps), t)).pow(2).mean()  # || eps - eps_theta ||^2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.eval(), losses


@torch.no_grad()
def loss_by_t(model, data, alpha_bar, bins, generator, per_bin=2000):
    """Mean simple loss in each of `bins` equal ranges of t: a loss that is flat in t would be a surprise."""
    T, device, out = len(alpha_bar), next(model.parameters()).device, []
    for b in range(bins):
        t = torch.randint(b * T // bins, (b + 1) * T // bins, (per_bin,), generator=generator)
        x0 = data[torch.randint(0, len(data), (per_bin,), generator=generator)]
        eps = torch.randn(per_bin, 2, generator=generator)
        x0, t, eps = x0.to(device), t.to(device), eps.to(device)
        out.append((eps - model(q_sample(x0, t, alpha_bar, eps), t)).pow(2).mean().item())
    return out


# %% The ideal denoiser of a finite training set, and memorisation
def ideal_eps_model(train_pts, alpha_bar):
    """The exact E[eps | x_t] when the data is the empirical distribution of `train_pts` [M, 2].

    E[x_0 | x_t] = sum_i w_i x_i with w = softmax_i(-|x_t - sqrt(ab) x_i|^2 / (2 (1 - ab))), then eps from x_0.
    """
    def model(x, t):
        ab = alpha_bar.to(x.device)[t].to(x.dtype)[:, None]  # [B, 1]
        d2 = (x[:, None, :] - ab.sqrt()[:, :, None] * train_pts.to(x)[None]).pow(2).sum(-1)  # [B, M]
        w = torch.softmax(-d2 / (2 * (1 - ab)), dim=1)  # [B, M]
        return eps_from_x0(x, w @ train_pts.to(x), ab)  # [B, 2]
    return model


def memorised_fraction(samples, train_pts, threshold):
    """Share of samples closer than `threshold` to some training point."""
    return (torch.cdist(samples, train_pts).min(1).values < threshold).float().mean().item()


# %% Measuring: MMD with RBF kernels, and the sliced Wasserstein-2 distance
def mmd2(a, b, bandwidths=(0.05, 0.2)):
    """Squared maximum mean discrepancy between point clouds a [N, 2] and b [M, 2] (Gretton et al. 2012):
    MMD^2 = E k(a, a') + E k(b, b') - 2 E k(a, b), k(u, v) = exp(-|u - v|^2 / (2 h^2)), summed over bandwidths h.

    Zero only when the distributions are equal. Small bandwidths see fine detail (a square's sharp edge);
    we average over all pairs including i = j (the biased estimate), so even two fresh data sets get > 0.
    """
    total = 0.0
    for h in bandwidths:
        k = lambda u, v: torch.exp(-torch.cdist(u.double(), v.double()).pow(2) / (2 * h * h)).mean()
        total += (k(a, a) + k(b, b) - 2 * k(a, b)).item()
    return total


def sliced_w2(a, b, n_dirs=256):
    """SW2 between two equal-size point clouds [N, 2]: the 1D Wasserstein-2 distance along evenly spaced
    directions, averaged (in squares) and square-rooted. In 1D, W2 matches sorted points, one to one.
    Projections blur: SW2 barely notices a checkerboard drawn as round blobs. MMD with a small kernel does."""
    angles = torch.arange(n_dirs, dtype=torch.float64) * math.pi / n_dirs
    dirs = torch.stack([torch.cos(angles), torch.sin(angles)])  # [2, n_dirs]
    pa, pb = (a.double() @ dirs).sort(0).values, (b.double() @ dirs).sort(0).values  # [N, n_dirs]
    return (pa - pb).pow(2).mean().sqrt().item()


# %% Figures: PIL line and scatter plots (matplotlib is not a dependency), trimmed from lesson 01
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207)]
GREY = (175, 175, 175)


def font(px):
    return ImageFont.load_default(size=px)


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


def plot_axes(d, box, xlim, ylim, xlabel, ylabel, title):
    """Draw axes, ticks, labels and title in box (x0, y0, x1, y1); return a data->pixel mapping."""
    x0, y0, x1, y1 = box
    f = font(13)

    def to_px(x, y):
        return (x0 + (x - xlim[0]) / ((xlim[1] - xlim[0]) or 1) * (x1 - x0),
                y1 - (y - ylim[0]) / ((ylim[1] - ylim[0]) or 1) * (y1 - y0))

    for v in nice_ticks(*xlim):
        px = to_px(v, ylim[0])[0]
        d.line([(px, y1), (px, y1 + 4)], fill="black")
        d.line([(px, y0), (px, y1)], fill=(230, 230, 230))
        d.text((px, y1 + 6), fmt(round(v, 10)), fill="black", font=f, anchor="ma")
    for v in nice_ticks(*ylim):
        py = to_px(xlim[0], v)[1]
        d.line([(x0 - 4, py), (x0, py)], fill="black")
        d.line([(x0 + 1, py), (x1 - 1, py)], fill=(230, 230, 230))
        d.text((x0 - 6, py), fmt(round(v, 10)), fill="black", font=f, anchor="rm")
    d.rectangle(box, outline="black")
    d.text(((x0 + x1) / 2, y1 + 24), xlabel, fill="black", font=f, anchor="ma")
    d.text((x0 - 4, y0 - 8), ylabel, fill="black", font=f, anchor="ld")
    d.text(((x0 + x1) / 2, y0 - 26), title, fill="black", font=font(15), anchor="md")
    return to_px


def line_panel(d, box, series, title, xlabel, ylabel, ylim=None):
    """One panel of lines. series: list of (label, xs, ys). Legend in the top-right corner."""
    xs_all = [x for _, xs, _ in series for x in xs]
    ys_all = [y for _, _, ys in series for y in ys]
    if ylim is None:
        lo, hi = min(ys_all), max(ys_all)
        ylim = (lo - 0.05 * ((hi - lo) or 1), hi + 0.05 * ((hi - lo) or 1))
    to_px = plot_axes(d, box, (min(xs_all), max(xs_all)), ylim, xlabel, ylabel, title)
    for k, (label, xs, ys) in enumerate(series):
        pts = [to_px(x, min(max(y, ylim[0]), ylim[1])) for x, y in zip(xs, ys)]
        d.line(pts, fill=PALETTE[k % len(PALETTE)], width=2)
    d.rectangle([box[2] - 160, box[1] + 2, box[2] - 2, box[1] + 8 + 18 * len(series)], fill="white",
                outline=(200, 200, 200))
    for k, (label, _, _) in enumerate(series):
        y = box[1] + 14 + 18 * k
        d.line([(box[2] - 150, y), (box[2] - 125, y)], fill=PALETTE[k % len(PALETTE)], width=3)
        d.text((box[2] - 120, y), label, fill="black", font=font(13), anchor="lm")


def scatter_panel(d, box, layers, title, lim=3.0, xlabel="x1", ylabel="x2"):
    """Scatter plot of layers [(pts [N, 2], colour, dot radius)], drawn in order (later on top)."""
    to_px = plot_axes(d, box, (-lim, lim), (-lim, lim), xlabel, ylabel, title)
    for pts, color, r in layers:
        for x, y in pts.tolist():
            if abs(x) < lim and abs(y) < lim:
                px, py = to_px(x, y)
                d.ellipse([px - r, py - r, px + r, py + r], fill=color)


def panel_grid(rows, cols, title, cell=250, plot=190, foot=0):
    """A white canvas for rows x cols square plots (and `foot` pixels below); returns (image, draw, box(i, j))."""
    img = Image.new("RGB", (cols * cell + 40, rows * (cell + 20) + 50 + foot), "white")
    d = ImageDraw.Draw(img)
    d.text((img.width // 2, 8), title, fill="black", font=font(17), anchor="ma")
    box = lambda i, j: (60 + j * cell, 80 + i * (cell + 20), 60 + j * cell + plot, 80 + i * (cell + 20) + plot)
    return img, d, box


# %% Main: train on each dataset, sample, measure, draw
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # matrices this small gain nothing from more threads, and lose a lot when shared
    torch.manual_seed(args.seed)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output folder {args.out!r} ({e.strerror}); pass --out with a writable folder")
    start, T = time.time(), args.T
    betas = linear_betas(T) if args.schedule == "linear" else cosine_betas(T)
    alpha_bar = alpha_bar_of(betas)
    names = list(DATASETS) if args.data == "all" else [args.data]
    g = torch.Generator().manual_seed(args.seed)
    print(f"device {device}, {args.schedule} schedule, T = {T}, {args.steps} steps per dataset, "
          f"figures use sigma_t^2 = {args.sigma}")
    # x_t is kept before these steps: a few for the trajectory figure, about 50 for the GIF, denser at small t
    # (where the shape forms: t_k = (T-1) (k/50)^2)
    traj_ts = sorted({T - 1, (3 * T) // 5, (3 * T) // 10, (3 * T) // 20, T // 20, 0}, reverse=True)
    gif_ts = sorted({round((T - 1) * (k / 50) ** 2) for k in range(51)} | set(traj_ts), reverse=True)
    res = {}
    for name in names:
        t0 = time.time()
        train_pts = make_data(name, args.n_train, g)
        model, losses = train(train_pts, alpha_bar, args, device, g)
        k = max(1, min(100, len(losses) // 4))
        print(f"loss {name}: first {k} steps {sum(losses[:k]) / k:.4f}, last {k} steps {sum(losses[-k:]) / k:.4f}")
        x_T = torch.randn(args.n_samples, 2, generator=g).to(device)
        samples, snaps = {}, {}
        for sigma in ("beta_tilde", "beta"):
            keep = set(gif_ts) if sigma == args.sigma else ()
            x0, kept = ddpm_sample(model, x_T, betas, sigma, g, keep)
            samples[sigma] = x0.cpu()
            snaps.update(kept)
        fresh = make_data(name, args.n_samples, g)
        # the floor: fresh data against fresh data, averaged over 3 draws (one draw is itself noisy)
        refs = [make_data(name, args.n_samples, g) for _ in range(3)]
        res[name] = dict(losses=losses, samples=samples, snaps=snaps, fresh=fresh, secs=time.time() - t0,
                         by_t=loss_by_t(model, train_pts, alpha_bar, 20, g),
                         floor=sum(mmd2(r, fresh) for r in refs) / 3,
                         ceiling=mmd2(torch.randn(args.n_samples, 2, generator=g), fresh),
                         mmd={s: mmd2(x, fresh) for s, x in samples.items()},
                         sw_floor=sum(sliced_w2(r, fresh) for r in refs) / 3,
                         sw=sliced_w2(samples[args.sigma], fresh))

    print(f"\nMMD^2 x 1000 (RBF, bandwidths 0.05 + 0.2) to {args.n_samples} fresh data points ({args.schedule} "
          f"schedule, T = {T}); lower is better")
    print(f"{'dataset':>12} {'floor':>7} {'beta_tilde':>10} {'beta':>7} {'ceiling':>8} {'model/floor':>11} "
          f"{'SW2 floor':>9} {'SW2 model':>9} {'secs':>5}")
    for name, r in res.items():
        print(f"{name:>12} {1e3 * r['floor']:7.3f} {1e3 * r['mmd']['beta_tilde']:10.3f} {1e3 * r['mmd']['beta']:7.3f} "
              f"{1e3 * r['ceiling']:8.3f} {r['mmd'][args.sigma] / r['floor']:11.2f} {r['sw_floor']:9.4f} "
              f"{r['sw']:9.4f} {r['secs']:5.1f}")
    print("floor: fresh data against fresh data; ceiling: N(0, I) against data; model/floor and SW2 use --sigma")
    if args.samples_out:
        try:
            torch.save(res[names[0]]["samples"][args.sigma].float(), args.samples_out)
        except OSError as e:
            fail(f"cannot write {args.samples_out!r} ({e.strerror}); pass --samples-out with a writable path")
        print(f"saved the {names[0]} samples [{args.n_samples}, 2] to {args.samples_out}")

    # -- the ideal denoiser of a small training set against a network trained on the same points
    name = names[0]
    small = make_data(name, args.n_memo, g)
    net, _ = train(small, alpha_bar, args, device, g)
    x_T = torch.randn(args.n_samples, 2, generator=g).to(device)
    ideal_x0, _ = ddpm_sample(ideal_eps_model(small.to(device), alpha_bar), x_T, betas, args.sigma, g)
    net_x0, _ = ddpm_sample(net, x_T, betas, args.sigma, g)
    nn_dist = torch.cdist(small, small).fill_diagonal_(float("inf")).min(1).values
    threshold = nn_dist.median().item() / 4  # far closer to one training point than they are to each other
    memo = {"fresh data": memorised_fraction(make_data(name, args.n_samples, g), small, threshold),
            "ideal denoiser": memorised_fraction(ideal_x0.cpu(), small, threshold),
            "trained network": memorised_fraction(net_x0.cpu(), small, threshold)}
    print(f"\nmemorisation on {args.n_memo} {name} training points: share of {args.n_samples} samples within "
          f"{threshold:.4f} (a quarter of the median gap between training points) of a training point")
    for k, v in memo.items():
        print(f"{k:>16}: {100 * v:5.1f}%")

    # -- figures
    out = lambda f: os.path.join(args.out, f)
    img, d, box = panel_grid(2, len(names), f"data (top) against DDPM samples (bottom), sigma_t^2 = {args.sigma}, "
                                            f"{args.schedule} schedule; MMD^2 in units of 1e-3")
    for j, n in enumerate(names):
        r = res[n]
        scatter_panel(d, box(0, j), [(r["fresh"], PALETTE[0], 1)], f"{n}: data")
        scatter_panel(d, box(1, j), [(r["samples"][args.sigma], PALETTE[1], 1)],
                      f"samples: MMD^2 {1e3 * r['mmd'][args.sigma]:.2f} (floor {1e3 * r['floor']:.2f})")
    img.save(out("02_samples.png"))

    img, d, box = panel_grid(len(names), len(traj_ts) + 1, "the reverse process: x_t from t = T-1 (noise) down "
                             "to the output x_0", cell=215, plot=150)
    for i, n in enumerate(names):
        for j, t in enumerate(traj_ts):
            scatter_panel(d, box(i, j), [(res[n]["snaps"][t], PALETTE[i % 6], 1)], f"{n}: x_t, t = {t}")
        scatter_panel(d, box(i, len(traj_ts)), [(res[n]["samples"][args.sigma], PALETTE[i % 6], 1)],
                      f"{n}: output x_0")
    img.save(out("02_trajectory.png"))

    img = Image.new("RGB", (760, 460), "white")
    d = ImageDraw.Draw(img)
    w = max(1, min(100, args.steps // 10))  # moving average over w steps: single-batch losses are noisy
    series = []
    for n in names:
        ls = res[n]["losses"]
        avg = [sum(ls[i:i + w]) / w for i in range(0, len(ls) - w + 1, max(1, w // 4))]
        series.append((n, [i + w for i in range(0, len(ls) - w + 1, max(1, w // 4))], avg))
    line_panel(d, (90, 70, 730, 390), series, f"training loss ||eps - eps_theta||^2 (moving average of {w} steps)",
               "training step", "loss")
    img.save(out("02_loss.png"))

    img = Image.new("RGB", (760, 460), "white")
    d = ImageDraw.Draw(img)
    centres = [(b + 0.5) * T / 20 for b in range(20)]
    line_panel(d, (90, 70, 730, 390), [(n, centres, res[n]["by_t"]) for n in names],
               "loss of the trained model in 20 bins of t (training points, fresh noise)", "t", "loss",
               ylim=(0, max(max(res[n]["by_t"]) for n in names) * 1.1))
    img.save(out("02_loss_by_t.png"))

    img, d, box = panel_grid(1, 3, f"{args.n_memo} {name} training points: the ideal denoiser copies them, the "
                             "network trained on them does not", cell=300, plot=240, foot=20)
    dots = (small, GREY, 3)
    scatter_panel(d, box(0, 0), [dots], f"the {args.n_memo} training points")
    scatter_panel(d, box(0, 1), [dots, (ideal_x0.cpu(), PALETTE[1], 1)],
                  f"ideal denoiser: {100 * memo['ideal denoiser']:.0f}% on a point")
    scatter_panel(d, box(0, 2), [dots, (net_x0.cpu(), PALETTE[0], 1)],
                  f"trained network: {100 * memo['trained network']:.0f}% on a point")
    d.text((img.width // 2, img.height - 22), f"'on a point': within {threshold:.3f} of a training point "
           f"(fresh data: {100 * memo['fresh data']:.0f}%)", fill="black", font=font(14), anchor="ma")
    img.save(out("02_memorisation.png"))

    frames = []
    for t in gif_ts + [-1]:
        img, d, box = panel_grid(1, len(names), f"ancestral sampling, t = {t}" if t >= 0 else "output x_0",
                                 cell=230, plot=180)
        for j, n in enumerate(names):
            pts = res[n]["snaps"][t] if t >= 0 else res[n]["samples"][args.sigma]
            scatter_panel(d, box(0, j), [(pts[:1500], PALETTE[j % 6], 1)], n)
        frames.append(img.convert("P", palette=Image.Palette.ADAPTIVE))
    frames[0].save(out("02_sampling.gif"), save_all=True, append_images=frames[1:],
                   duration=[600] + [70] * (len(frames) - 2) + [2000], loop=0)
    print(f"\nwrote 02_samples.png, 02_trajectory.png, 02_loss.png, 02_loss_by_t.png, 02_memorisation.png, "
          f"02_sampling.gif to {args.out}/ in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
