"""Lesson 02: DDPM, derived and run on 2D data, where every step can be seen and measured.

Lesson 01 built the forward process q(x_t | x_0). Here we run it backwards with a model p_theta(x_{t-1} | x_t):
derive it, train it, sample from it, and measure the samples, which on 2D data fit in one scatter plot. t is
0-based as in lesson 01 (alpha_bar[t] is the papers' alpha_bar_{t+1}, alpha_bar[-1] := 1); ab = alpha_bar.

1. The posterior (Ho et al. 2020, eqs. 6-7) is Gaussian, q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I):
       mu_tilde   = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x_0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t
       beta_tilde = (1 - ab_{t-1}) / (1 - ab_t) beta_t                       (alpha_t = 1 - beta_t)
   Given x_0, x_{t-1} and x_t are jointly Gaussian (cov = sqrt(alpha_t) (1 - ab_{t-1}), var(x_t) = 1 - ab_t);
   conditioning on x_t gives mean m_1 + C_12 / C_22 (x_t - m_2), variance C_11 - C_12^2 / C_22.
2. The model p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I) puts a guess of x_0 into that mean, written
   through the noise, x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t):
       mu_theta = (x_t - beta_t / sqrt(1 - ab_t) eps_theta(x_t, t)) / sqrt(alpha_t)                (eq. 11)
   The ELBO's KL terms become weighted ||eps - eps_theta||^2; without the weights, the loss we train:
       L_simple = E_{t, x_0, eps} ||eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t)||^2   (eq. 14)
3. Ancestral sampling (Algorithm 2): x_{T-1} ~ N(0, I); for t = T-1 .. 0: x_{t-1} = mu_theta + sigma_t z, with
   z = 0 at t = 0 (noise added there would stay in the sample). sigma_t^2 = beta_t is exact for data N(0, I),
   beta_tilde_t for data that is one point (Ho et al. section 3.2); the table measures both.
4. The ideal denoiser of a finite training set {x_i} is the exact posterior mean, a softmax over the points,
       E[x_0 | x_t] = sum_i w_i x_i,   w = softmax_i(-||x_t - sqrt(ab_t) x_i||^2 / (2 (1 - ab_t)))
   and sampling with it only reproduces training points (memorisation); a trained network fills in the shape.
5. Measuring: MMD^2 (RBF kernels) of samples against fresh data, between a floor (fresh data against fresh
   data) and a ceiling (N(0, I) against data). The sliced Wasserstein-2 distance (SW2) is printed beside it to
   show why we do not rely on it: projections onto lines blur sharp edges that a small MMD kernel sees.

Run: `python 02_ddpm.py` (four datasets, under 3 minutes on a 2-core CPU), `--quick` (seconds, to runs/quick/),
`--data spiral --schedule cosine --sigma beta --samples-out runs/spiral.pt`. It writes figures/02_samples.png,
02_trajectory.png, 02_loss.png, 02_loss_by_t.png, 02_memorisation.png, 02_sampling.gif, and prints two tables.
"""

# %% Imports and the lesson's constants
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont

DATASETS = ("moons", "spiral", "8gaussians", "checkerboard")
BATCH, LR, WIDTH = 256, 2e-3, 128  # Adam batch size and learning rate (cosine-decayed to 0), MLP width
N_TRAIN, N_SAMPLES = 20_000, 1000  # training set per dataset; samples drawn to measure the distance


# %% The posterior q(x_{t-1} | x_t, x_0) and the eps <-> x_0 conversions
def posterior(betas, t):
    """q(x_{t-1} | x_t, x_0) at step t (an int): mean c0 x_0 + ct x_t, variance beta_tilde (Ho et al. eqs. 6-7).
    At t = 0, alpha_bar_{t-1} = 1: the mean is x_0 itself and the variance is 0."""
    alpha_bar = alpha_bar_of(betas)
    ab, ab_prev = alpha_bar[t], (alpha_bar[t - 1] if t > 0 else torch.ones((), dtype=betas.dtype))
    c0 = ab_prev.sqrt() * betas[t] / (1 - ab)
    ct = (1 - betas[t]).sqrt() * (1 - ab_prev) / (1 - ab)
    beta_tilde = (1 - ab_prev) / (1 - ab) * betas[t]
    return c0, ct, beta_tilde


# q_sample, x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, solved for x_0 and for eps (ab_t = alpha_bar[t])
x0_from_eps = lambda x_t, eps, ab: (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
eps_from_x0 = lambda x_t, x0, ab: (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


# %% Ancestral sampling (Algorithm 2)
@torch.no_grad()
def ddpm_sample(model, x_T, betas, sigma="beta_tilde", generator=None, keep=()):
    """Run p_theta(x_{t-1} | x_t) from t = T-1 down to 0, model(x, t) -> eps: returns x_0 [N, D] and {t: x_t before
    step t} for t in `keep`. Noise is drawn on the CPU from `generator`: samples do not depend on the device."""
    alpha_bar, x, snaps = alpha_bar_of(betas), x_T, {}
    for t in range(len(betas) - 1, -1, -1):
        if t in keep:
            snaps[t] = x.cpu()
        eps = model(x, torch.full((len(x),), t, dtype=torch.int64, device=x.device))
        c0, ct, beta_tilde = posterior(betas, t)
        x0_hat = x0_from_eps(x, eps, alpha_bar[t].to(x.dtype))
        mean = c0.to(x.dtype) * x0_hat + ct.to(x.dtype) * x  # = eq. 11's mu_theta, written through x0_hat
        # x_{t-1} = mean + sigma_t z, sigma_t^2 = beta_t or beta_tilde_t; no noise at the last step: x_0 is the mean
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) if t > 0 else 0
        x = mean + (betas[t] if sigma == "beta" else beta_tilde).sqrt().to(x.dtype) * z
    return x, snaps


# %% 2D datasets, each scaled to about [-2.5, 2.5]
def make_data(name, n, generator):
    """n points of a 2D dataset, float32 [n, 2]."""
    if name == "moons":  # lesson 01's two_moons: two interleaved half circles, scaled to about unit variance
        u = torch.rand(n, generator=generator) * math.pi
        upper = torch.rand(n, generator=generator) < 0.5
        x = torch.where(upper, torch.cos(u), 1 - torch.cos(u))
        y = torch.where(upper, torch.sin(u), 0.5 - torch.sin(u))
        return torch.stack([x - 0.5, y - 0.25], 1) * 1.6 + 0.05 * torch.randn(n, 2, generator=generator)
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
        self.t_dim, self.t_proj = t_dim, nn.Linear(t_dim, width)  # sinusoids -> a learned per-t shift of the features
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
def train(data, alpha_bar, steps, device, generator):
    """Fit a Denoiser to `data` [n, 2] for `steps` Adam steps; returns (model, per-step losses)."""
    model = Denoiser(WIDTH).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    data, T, losses = data.to(device), len(alpha_bar), []
    for _ in range(steps):
        x0 = data[torch.randint(0, len(data), (BATCH,), generator=generator).to(device)]
        t = torch.randint(0, T, (BATCH,), generator=generator).to(device)  # t ~ Uniform{0, ..., T-1}
        eps = torch.randn(BATCH, 2, generator=generator).to(device)
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
        t = torch.randint(b * T // bins, (b + 1) * T // bins, (per_bin,), generator=generator).to(device)
        x0 = data[torch.randint(0, len(data), (per_bin,), generator=generator)].to(device)
        eps = torch.randn(per_bin, 2, generator=generator).to(device)
        out.append((eps - model(q_sample(x0, t, alpha_bar, eps), t)).pow(2).mean().item())
    return out


# %% The ideal denoiser of a finite training set, and memorisation
def ideal_eps_model(train_pts, alpha_bar):
    """The exact E[eps | x_t] when the data is the empirical distribution of `train_pts` [M, 2]: E[x_0 | x_t] =
    sum_i w_i x_i with w = softmax_i(-|x_t - sqrt(ab) x_i|^2 / (2 (1 - ab))), then eps from x_0."""
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
    """Squared maximum mean discrepancy of point clouds a [N, 2], b [M, 2] (Gretton et al. 2012), 0 only for equal
    distributions: MMD^2 = E k(a, a') + E k(b, b') - 2 E k(a, b), k(u, v) = exp(-|u - v|^2 / (2 h^2)), summed over
    h. A small h sees fine detail (a square's sharp edge); pairs i = j count (biased), so fresh sets get > 0."""
    total = 0.0
    for h in bandwidths:
        k = lambda u, v: torch.exp(-torch.cdist(u.double(), v.double()).pow(2) / (2 * h * h)).mean()
        total += (k(a, a) + k(b, b) - 2 * k(a, b)).item()
    return total


def sliced_w2(a, b, n_dirs=256):
    """SW2 of equal-size point clouds [N, 2]: the 1D W2 distance (sorted points matched one to one) along evenly
    spaced directions, root mean square. Projections blur: it barely sees a checkerboard drawn as round blobs."""
    angles = torch.arange(n_dirs, dtype=torch.float64) * math.pi / n_dirs
    dirs = torch.stack([torch.cos(angles), torch.sin(angles)])  # [2, n_dirs]
    pa, pb = (a.double() @ dirs).sort(0).values, (b.double() @ dirs).sort(0).values  # [N, n_dirs]
    return (pa - pb).pow(2).mean().sqrt().item()


# %% Experiments: one function per table or figure
def run_dataset(name, betas, args, device, g):
    """Train an MLP on one dataset, sample it with both choices of sigma_t^2, measure both against fresh data."""
    t0, alpha_bar, train_pts = time.time(), alpha_bar_of(betas), make_data(name, args.n_train, g)
    model, losses = train(train_pts, alpha_bar, args.steps, device, g)
    k = max(1, min(100, len(losses) // 4))
    print(f"loss {name}: first {k} steps {sum(losses[:k]) / k:.4f}, last {k} steps {sum(losses[-k:]) / k:.4f}")
    x_T = torch.randn(args.n_samples, 2, generator=g).to(device)
    # the same x_T for both variances; x_t of every step kept for the figures (16 MB), the output x_0 as "t = -1"
    out = {s: ddpm_sample(model, x_T, betas, s, g, range(args.T) if s == args.sigma else ())
           for s in ("beta_tilde", "beta")}
    samples, snaps = {s: x.cpu() for s, (x, _) in out.items()}, out[args.sigma][1]
    snaps[-1] = samples[args.sigma]
    fresh = make_data(name, args.n_samples, g)
    refs = [make_data(name, args.n_samples, g) for _ in range(3)]  # the floor, over 3 draws (one is noisy)
    return dict(losses=losses, samples=samples, snaps=snaps, fresh=fresh, secs=time.time() - t0,
                by_t=loss_by_t(model, train_pts, alpha_bar, 20, g), floor=sum(mmd2(r, fresh) for r in refs) / 3,
                ceiling=mmd2(torch.randn(args.n_samples, 2, generator=g), fresh),
                mmd={s: mmd2(x, fresh) for s, x in samples.items()},
                sw_floor=sum(sliced_w2(r, fresh) for r in refs) / 3, sw=sliced_w2(samples[args.sigma], fresh))


def memorisation(name, betas, args, device, g):
    """The ideal denoiser of a small training set against a network trained on the same points: table and figure."""
    alpha_bar, small = alpha_bar_of(betas), make_data(name, args.n_memo, g)
    net, _ = train(small, alpha_bar, args.steps, device, g)
    x_T = torch.randn(args.n_samples, 2, generator=g).to(device)
    ideal_x0 = ddpm_sample(ideal_eps_model(small.to(device), alpha_bar), x_T, betas, args.sigma, g)[0].cpu()
    net_x0 = ddpm_sample(net, x_T, betas, args.sigma, g)[0].cpu()
    # "on a point": within a quarter of the median gap between training points, far closer than they are to each other
    thr = torch.cdist(small, small).fill_diagonal_(float("inf")).min(1).values.median().item() / 4
    named = {"fresh data": make_data(name, args.n_samples, g), "ideal denoiser": ideal_x0, "trained network": net_x0}
    share = {k: 100 * memorised_fraction(x, small, thr) for k, x in named.items()}  # in %
    print(f"\nmemorisation on {args.n_memo} {name} training points: share of {args.n_samples} samples within "
          f"{thr:.4f} (a quarter of the median gap between training points) of a training point")
    print("\n".join(f"{k:>16}: {v:5.1f}%" for k, v in share.items()))
    dots, size = (small, (175, 175, 175), 3), (340, 350)  # training points: big grey dots
    save_row(os.path.join(args.out, "02_memorisation.png"), [
        scatter([dots], f"{args.n_memo} training points; fresh data: {share['fresh data']:.0f}%", size),
        scatter([dots, (ideal_x0, PALETTE[1], 1)], f"ideal denoiser: {share['ideal denoiser']:.0f}% on a point", size),
        scatter([dots, (net_x0, PALETTE[0], 1)], f"trained network: {share['trained network']:.0f}% on a point", size)],
        f"{name}: the ideal denoiser copies its training points, a network trained on them does not "
        f"('on a point': within {thr:.3f})")


def scatter(layers, title, size, lim=3.0):
    """A square scatter plot of layers [(pts [N, 2], colour, dot radius)], drawn in order (later on top)."""
    img, d, to_px = axes((-lim, lim), (-lim, lim), title, "x1", "x2", size=size)
    for pts, color, r in layers:
        for px, py in (to_px(x, y) for x, y in pts.tolist() if abs(x) < lim and abs(y) < lim):
            d.ellipse([px - r, py - r, px + r, py + r], fill=color)
    return img


def stack(images, down=False):
    """Paste PIL images side by side, or top to bottom (down=True), into one image: rows and columns of panels."""
    w, h = [i.width for i in images], [i.height for i in images]
    canvas = Image.new("RGB", (max(w), sum(h)) if down else (sum(w), max(h)), "white")
    for k, im in enumerate(images):
        canvas.paste(im, (0, sum(h[:k])) if down else (sum(w[:k]), 0))
    return canvas


def panels(res, t, size, limit=None):
    """One scatter panel of x_t per dataset (t = -1: the output x_0), in the dataset's colour."""
    return [scatter([(r["snaps"][t][:limit], PALETTE[i % 6], 1)], f"{n}: x_t, t = {t}" if t >= 0 else
                    f"{n}: output x_0", size) for i, (n, r) in enumerate(res.items())]


def distances(res, args):
    """The table of MMD^2 (each model between its floor and its ceiling, SW2 beside it) and data against samples."""
    print(f"\nMMD^2 x 1000 (RBF, bandwidths 0.05 + 0.2) to {args.n_samples} fresh data points ({args.schedule} "
          f"schedule, T = {args.T}); lower is better")
    print(f"{'dataset':>12} {'floor':>7} {'beta_tilde':>10} {'beta':>7} {'ceiling':>8} {'model/floor':>11} "
          f"{'SW2 floor':>9} {'SW2 model':>9} {'secs':>5}")
    for name, r in res.items():
        print(f"{name:>12} {1e3 * r['floor']:7.3f} {1e3 * r['mmd']['beta_tilde']:10.3f} {1e3 * r['mmd']['beta']:7.3f} "
              f"{1e3 * r['ceiling']:8.3f} {r['mmd'][args.sigma] / r['floor']:11.2f} {r['sw_floor']:9.4f} "
              f"{r['sw']:9.4f} {r['secs']:5.1f}")
    print("floor: fresh data against fresh data; ceiling: N(0, I) against data; model/floor and SW2 use --sigma")
    size = (300, 310)
    save_row(os.path.join(args.out, "02_samples.png"), [stack([
        scatter([(r["fresh"], PALETTE[0], 1)], f"{n}: data", size),
        scatter([(r["samples"][args.sigma], PALETTE[1], 1)],
                f"samples: MMD^2 {1e3 * r['mmd'][args.sigma]:.2f} (floor {1e3 * r['floor']:.2f})", size)], down=True)
        for n, r in res.items()], f"data (top) against DDPM samples (bottom), sigma_t^2 = {args.sigma}, "
                                  f"{args.schedule} schedule; MMD^2 in units of 1e-3")


def figure_reverse(res, args):
    """The reverse process: a grid (one row per dataset, one column per step) and a GIF, frames dense at small t."""
    traj_ts = sorted({args.T - 1, 3 * args.T // 5, 3 * args.T // 10, 3 * args.T // 20, args.T // 20, 0}, reverse=True)
    gif_ts = sorted({round((args.T - 1) * (k / 50) ** 2) for k in range(51)} | set(traj_ts), reverse=True)
    save_row(os.path.join(args.out, "02_trajectory.png"), [stack(panels(res, t, (240, 250)), down=True)
             for t in traj_ts + [-1]], "the reverse process: x_t from t = T-1 (noise) down to the output x_0")
    frames = [stack(panels(res, t, (260, 270), 1500)).convert("P", palette=Image.Palette.ADAPTIVE)
              for t in gif_ts + [-1]]
    frames[0].save(os.path.join(args.out, "02_sampling.gif"), save_all=True, append_images=frames[1:],
                   duration=[600] + [70] * (len(frames) - 2) + [2000], loop=0)


def figure_losses(res, args):
    """The training loss (a moving average) and the trained model's loss in 20 bins of t."""
    w = max(1, min(100, args.steps // 10))  # moving average over w steps: single-batch losses are noisy
    starts = range(0, args.steps - w + 1, max(1, w // 4))
    series = [(n, [i + w for i in starts], [sum(r["losses"][i:i + w]) / w for i in starts]) for n, r in res.items()]
    line_plot(series, f"training loss ||eps - eps_theta||^2 (moving average of {w} steps)", "training step", "loss",
              size=(760, 460)).save(os.path.join(args.out, "02_loss.png"))
    centres, top = [(b + 0.5) * args.T / 20 for b in range(20)], max(max(r["by_t"]) for r in res.values())
    line_plot([(n, centres, r["by_t"]) for n, r in res.items()], "loss of the trained model in 20 bins of t "
              "(training points, fresh noise)", "t", "loss", ylim=(0, top * 1.1),
              size=(760, 460)).save(os.path.join(args.out, "02_loss_by_t.png"))


# %% Main: train on each dataset, sample, measure, draw
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output folder {args.out!r} ({e.strerror}); pass --out with a writable folder")
    start, names = time.time(), list(DATASETS) if args.data == "all" else [args.data]
    betas = linear_betas(args.T) if args.schedule == "linear" else cosine_betas(args.T)
    g = torch.Generator().manual_seed(args.seed)  # every random draw of the lesson, in a fixed order
    print(f"{device}, {args.schedule} schedule, T = {args.T}, {args.steps} steps per dataset, sigma_t^2 = {args.sigma}")
    res = {name: run_dataset(name, betas, args, device, g) for name in names}
    distances(res, args)
    if args.samples_out:
        try:
            torch.save(res[names[0]]["samples"][args.sigma].float(), args.samples_out)
        except OSError as e:
            fail(f"cannot write {args.samples_out!r} ({e.strerror}); pass --samples-out with a writable path")
        print(f"saved the {names[0]} samples [{args.n_samples}, 2] to {args.samples_out}")
    memorisation(names[0], betas, args, device, g)
    figure_reverse(res, args)
    figure_losses(res, args)
    print(f"\nwrote the six 02_* figures to {args.out}/ in {time.time() - start:.1f}s")


def parse_args(argv=None):
    if argv is None and "ipykernel" in sys.modules:  # in Jupyter, sys.argv holds the kernel's own flags
        argv = []
    p = Parser(description="Lesson 02: DDPM on 2D data.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="all", choices=["all", *DATASETS], help="2D dataset (all: each in turn)")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"], help="noise schedule (lesson 01)")
    p.add_argument("--sigma", default="beta_tilde", choices=["beta", "beta_tilde"], help="sigma_t^2 of the figures")
    p.add_argument("--T", type=int, default=1000, help="number of diffusion steps")
    p.add_argument("--steps", type=int, default=3000, help="training steps per dataset")
    p.add_argument("--n-memo", type=int, default=200, help="training set size of the memorisation experiment")
    p.add_argument("--samples-out", help="also save the first dataset's samples (float [N, 2]) to this .pt file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, cpu")
    p.add_argument("--seed", type=int, default=0, help="fixes every random draw")
    p.add_argument("--out", help="folder for the figures (unset: figures, or runs/quick with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    args = p.parse_args(argv)
    for name, least in (("T", 2), ("steps", 1), ("n_memo", 2)):
        if getattr(args, name) < least:
            fail(f"--{name.replace('_', '-')} must be at least {least} (got {getattr(args, name)}); the default works")
    args.n_train, args.n_samples = (2000, 100) if args.quick else (N_TRAIN, N_SAMPLES)
    if args.quick:  # and never over the default figures: runs/quick/ unless --out says otherwise
        args.steps, args.n_memo, args.T = min(args.steps, 100), min(args.n_memo, 100), min(args.T, 200)
    args.out = args.out or (os.path.join("runs", "quick") if args.quick else "figures")
    return args


# %% Appendix: pieces from earlier lessons
class Parser(argparse.ArgumentParser):
    """argparse that reports a user's mistake in one line and exits with status 2 (the course's CLI)."""
    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def fail(message):
    """One line naming the fix, exit status 2, no traceback (the course's CLI)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def pick_device(name):
    """auto: cuda, then mps, then cpu; a device that is not there exits 2 (the course's CLI)."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not mps):
        fail(f"--device {name} was asked for but {name.upper()} is not available; use --device cpu (or auto)")
    return torch.device(name)


def linear_betas(T):
    """DDPM's schedule, beta_t linear from 1e-4 to 0.02, float64 [T] (lesson 01)."""
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)


def cosine_betas(T, s=0.008):
    """Improved DDPM's schedule, alpha_bar_t = f(t)/f(0), f = cos^2(((t/T)+s)/(1+s) pi/2), float64 [T] (lesson 01)."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def alpha_bar_of(betas):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (lesson 01)."""
    return torch.cumprod(1 - betas, dim=0)


def q_sample(x0, t, alpha_bar, noise):
    """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise, for a batch of t (int64 [B]) (lesson 01)."""
    ab = alpha_bar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # [B, 1, 1, 1]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


# The course's drawing kit (PIL: matplotlib is not a dependency)
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207)]


def font(px):
    return ImageFont.load_default(size=px)


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
