"""Lesson 05: sampling. One trained model, many ways to turn noise into images, and which way is best.

A trained model predicts the noise eps in x_t; a *sampler* decides at which timesteps to evaluate it and how
to step from x_T ~ N(0, I) to x_0. Five samplers, one signature: SAMPLERS[name](model, x_T, alpha_bar, steps,
**options) -> x_0, checked against an exact answer and measured on a lesson-04 checkpoint. ab_t = alpha_bar[t],
s is the next timestep visited (ab_s = 1 after the last), x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t).

1. DDPM, ancestral (Ho et al. 2020, Alg. 2): each step draws x_s ~ q(x_s | x_t, x0_hat); with fewer steps
   (respacing, Nichol & Dhariwal 2021, sec. 4) the same posterior runs over the kept timesteps.
2. DDIM (Song et al. 2021, eqs. 12, 16): x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma_eta^2) eps + sigma_eta z,
   sigma_eta = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s). eta = 1 is DDPM's step; eta = 0 is Euler's
   method on the probability-flow ODE dy/dsigma = eps, y = x / sqrt(ab), sigma = sqrt((1 - ab) / ab):
   first order, error ~ 1 / steps.
3. DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): the same ODE in lambda = log(sqrt(ab) / sqrt(1 - ab)), its part linear
   in x solved exactly, x0_hat moved along the line through its last two values: second order, one evaluation a step.
4. Heun on the sigma ODE (Karras et al. 2022, Alg. 1): Euler, a second evaluation, the mean slope.
5. SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5): the same extrapolation for the reverse SDE: fresh noise.

Which timesteps (off-by-one timesteps are the commonest sampler bug): n steps evaluate the model at n distinct
t from T-1 down; the step out of the last lands on x_0 (ab = 1) by returning x0_hat: n steps cost n model
evaluations (NFE; Heun 2n - 2). T = 1000, n = 5: "time" 999, 749, 500, 250, 0 (the papers' grid, DDPM's and Heun's
default); "trailing" 999, 799, 599, 399, 199, none at t = 0 where nothing is left (DDIM's); "logsnr" even in lambda.

Measuring. On 2D Gaussian-mixture data the exact eps is closed form, so the error against a fine solve of
the same ODE shows each sampler's order. On images: the Frechet distance on a small classifier's features
(lesson 04) against NFE. Then DDIM determinism, inversion (image -> noise -> image), slerp between noises.

    python 04_train.py && python 05_sample.py     # a checkpoint in runs/04/, then a few minutes on a CPU
    python 04_train.py --quick && python 05_sample.py --quick   # seconds: runs/quick/04/ckpt.pt -> runs/quick/
    python 05_sample.py --samplers ddpm,dpm++2m,dpm++2m-sde --nfe 10,20 --ddpm-full   # vs 1000-step DDPM
It writes 05_quality.png, 05_grid.png, 05_exactness.png, 05_determinism.png, 05_inversion.png and
05_interpolation.png to --out (figures/) and prints the tables.
"""
import argparse
import math
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
import torchvision

BATCH = 250  # images per model call
PRECISION = "auto"  # "auto": bf16 autocast on CUDA and on CPUs with bf16 units; or "fp32", "bf16"


# %% Which timesteps a sampler visits
def timesteps(alpha_bar, n, spacing="time"):
    """n distinct integer timesteps from T-1 down ("time", "trailing", "logsnr": see the top), as a list. The
    cosine schedule's clipped last beta puts lambda(T-1) far below lambda(T-2) (-9.9 against -6.5), so "logsnr"
    spaces from T-2 (both noise), starts at T-1, and nudges apart what rounding to integer t makes equal."""
    T = len(alpha_bar)
    if not 2 <= n <= T:
        raise ValueError(f"steps must be in [2, T={T}] (got {n}): the model only knows t = 0..T-1")
    if spacing == "trailing":  # t_i = round(T - i T / n) - 1: T-1, ..., T/n - 1; the last step lands on x_0
        return [int(v) - 1 for v in np.round(np.arange(T, 0, -T / n))[:n]]
    if spacing == "time":
        t = np.linspace(T - 1, 0, n)
    elif spacing == "logsnr":
        lam = (0.5 * (alpha_bar / (1 - alpha_bar)).log()).numpy()  # decreasing in t
        t = np.interp(np.linspace(lam[-2], lam[0], n), lam[::-1], np.arange(T - 1, -1, -1.0))  # lambda -> t
    else:
        raise ValueError(f"unknown spacing {spacing!r}")
    ts = [int(v) for v in np.rint(t)]
    ts[0], ts[-1] = T - 1, 0
    for i in range(n - 2, 0, -1):  # strictly decreasing: first push repeats at the low end up...
        ts[i] = max(ts[i], ts[i + 1] + 1)
    for i in range(1, n - 1):  # ...then any that went past the one before back down
        ts[i] = min(ts[i], ts[i - 1] - 1)
    return ts


def respaced_betas(alpha_bar, kept):
    """Betas of the shorter chain that visits only the timesteps `kept` (increasing), improved DDPM sec. 4:
    beta_i = 1 - ab[kept_i] / ab[kept_{i-1}] (ab = 1 before the first), so cumprod(1 - beta) = ab[kept]."""
    ab = alpha_bar[list(kept)]
    return 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])


def denoise(model, x, t, alpha_bar, clip=False):
    """(eps_hat, x0_hat) at integer timestep t. With clip, x0_hat is clamped to the data range [-1, 1] and eps
    recomputed from it, so the two stay consistent with x_t (x_t = sqrt(ab) x0 + sqrt(1 - ab) eps)."""
    ab = alpha_bar[t].item()
    eps = model(x, torch.full((len(x),), t, dtype=torch.long, device=x.device))
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    return eps, x0


def randn_like(x, generator):
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


# %% The samplers: fn(model, x_T, alpha_bar, steps, **options) -> x_0
@torch.no_grad()
def ddpm(model, x_T, alpha_bar, steps, spacing="time", clip=False, generator=None):
    """Ancestral sampling (Ho et al. 2020, Alg. 2) over `steps` timesteps, respaced (improved DDPM sec. 4):
        x_s = sqrt(ab_s) beta / (1 - ab_t) x0_hat + sqrt(1 - beta) (1 - ab_s) / (1 - ab_t) x_t + sqrt(beta_tilde) z,
        beta = 1 - ab_t / ab_s (the respaced beta), beta_tilde = (1 - ab_s) / (1 - ab_t) beta."""
    ts = timesteps(alpha_bar, steps, spacing)
    betas = respaced_betas(alpha_bar, ts[::-1]).flip(0).tolist()  # betas[i]: the step t_i -> t_{i+1} (-> x_0 last)
    x = x_T
    for i, t in enumerate(ts):
        eps, x0 = denoise(model, x, t, alpha_bar, clip)
        ab, beta = alpha_bar[t].item(), betas[i]
        ab_s = alpha_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0  # = ab / (1 - beta); 1 at x_0
        mean = (math.sqrt(ab_s) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab)) * x
        var = (1 - ab_s) / (1 - ab) * beta  # beta_tilde; 0 on the last step, which returns x0_hat
        x = mean + math.sqrt(var) * randn_like(x, generator) if i + 1 < len(ts) else mean
    return x


@torch.no_grad()
def ddim(model, x_T, alpha_bar, steps, eta=0.0, spacing="trailing", clip=False, generator=None):
    """DDIM (Song et al. 2021, eq. 12, sigma_eta from eq. 16), then x_0. Trailing timesteps by default: at the
    same NFE they leave a smaller error than "time", which spends its last evaluation at t = 0."""
    ts, x = timesteps(alpha_bar, steps, spacing), x_T
    for i, t in enumerate(ts):
        eps, x0 = denoise(model, x, t, alpha_bar, clip)
        if i + 1 == len(ts):
            return x0  # ab_s = 1: x_0 = x0_hat
        ab, ab_s = alpha_bar[t].item(), alpha_bar[ts[i + 1]].item()
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab) * (1 - ab / ab_s))  # sigma_eta: the fresh noise's std
        x = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s - sigma ** 2) * eps
        x = x + sigma * randn_like(x, generator) if sigma > 0 else x


@torch.no_grad()
def dpmpp_2m(model, x_T, alpha_bar, steps, spacing="logsnr", clip=False, sde=False, generator=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): h = lambda_s - lambda_t, r = h_prev / h,
        D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev, x_s = sqrt((1-ab_s) / (1-ab_t)) x_t - sqrt(ab_s) (e^-h - 1) D.
    The first step (D = x0_hat) is DDIM's; the last, to x_0, returns x0_hat. sde=True: SDE-DPM-Solver++(2M) (sec. 5),
    each step solving the reverse SDE, whose fresh noise corrects part of the model's error, as DDPM's does:
        x_s = sqrt(1-ab_s)/sqrt(1-ab_t) e^-h x_t + sqrt(ab_s) (1 - e^-2h) D + sqrt(1-ab_s) sqrt(1 - e^-2h) z;
    its first step (D = x0_hat) is DDPM's (DDIM, eta = 1)."""
    ts = timesteps(alpha_bar, steps, spacing)
    lam = lambda t: 0.5 * math.log(alpha_bar[t].item() / (1 - alpha_bar[t].item()))
    x, x0_prev, h_prev = x_T, None, None
    for i, t in enumerate(ts):
        _, x0 = denoise(model, x, t, alpha_bar, clip)
        if i + 1 == len(ts):
            return x0
        s = ts[i + 1]
        ab, ab_s = alpha_bar[t].item(), alpha_bar[s].item()
        h = lam(s) - lam(t)  # > 0: lambda grows as the noise goes
        if x0_prev is None:
            D = x0
        else:  # x0_hat on the line (in lambda) through its last two values, at the middle of this step
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        if sde:
            x = (math.sqrt((1 - ab_s) / (1 - ab)) * math.exp(-h) * x - math.sqrt(ab_s) * math.expm1(-2 * h) * D
                 + math.sqrt((1 - ab_s) * -math.expm1(-2 * h)) * randn_like(x, generator))
        else:
            x = math.sqrt((1 - ab_s) / (1 - ab)) * x - math.sqrt(ab_s) * math.expm1(-h) * D
        x0_prev, h_prev = x0, h


@torch.no_grad()
def heun(model, x_T, alpha_bar, steps, spacing="time", clip=False):
    """Heun's method on dy/dsigma = eps (Karras et al. 2022, Alg. 1), then x_0. The first step, out of sigma = 2e4
    (T-1), is Euler: a trapezoid would multiply any gap between its two slopes by 2e4. With few steps the last one,
    into t = 0, averages in the model's slope where almost no noise is left: speckle. 2 x steps - 2 evaluations."""
    ts = timesteps(alpha_bar, steps, spacing)
    sig = lambda t: math.sqrt((1 - alpha_bar[t].item()) / alpha_bar[t].item())
    y = x_T / math.sqrt(alpha_bar[ts[0]].item())  # y = x0 + sigma eps: the variance-exploding view
    for i, t in enumerate(ts):
        eps, x0 = denoise(model, y * math.sqrt(alpha_bar[t].item()), t, alpha_bar, clip)
        if i + 1 == len(ts):
            return x0  # y - sigma eps: Euler to sigma = 0
        s = ts[i + 1]
        y_next = y + (sig(s) - sig(t)) * eps  # Euler
        if i > 0:  # the first step stays Euler (see above)
            eps_s, _ = denoise(model, y_next * math.sqrt(alpha_bar[s].item()), s, alpha_bar, clip)
            y_next = y + (sig(s) - sig(t)) * (eps + eps_s) / 2  # Heun: the average of the slopes at both ends
        y = y_next


dpmpp_2m_sde = partial(dpmpp_2m, sde=True)  # SDE-DPM-Solver++(2M): see dpmpp_2m
SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpm++2m": dpmpp_2m, "heun": heun, "dpm++2m-sde": dpmpp_2m_sde}


def steps_for(name, nfe):
    """Steps costing at most `nfe` model evaluations (Heun: 2 x steps - 2: two a step, one for the first and last)."""
    return nfe // 2 + 1 if name == "heun" else nfe


# %% DDIM inversion and spherical interpolation
@torch.no_grad()
def ddim_invert(model, x0, alpha_bar, steps, spacing="trailing"):
    """Deterministic DDIM run backwards, image -> x_T, through ddim's timesteps reversed. The image stands at
    t = 0 (ab[0] is 1 - 4e-5 for the cosine schedule), and each step uses eps at its start where the sampler
    uses it at its end: that small mismatch is the reconstruction error."""
    ts = timesteps(alpha_bar, steps, spacing)[::-1]
    ts = ts if ts[0] == 0 else [0] + ts  # trailing: the sampler's last jump to x_0, reversed, starts at t = 0
    x = x0
    for t, s in zip(ts[:-1], ts[1:]):
        eps, x0_hat = denoise(model, x, t, alpha_bar)
        x = math.sqrt(alpha_bar[s].item()) * x0_hat + math.sqrt(1 - alpha_bar[s].item()) * eps
    return x


def slerp(z0, z1, a):
    """Spherical interpolation: along the great circle between z0 and z1 (angle theta), so |z| stays near sqrt(dim)
    as Gaussian noise needs; the straight line's midpoint has cos(theta/2) of it (0.71 for two independent noises)."""
    theta = torch.acos((z0 * z1).sum() / (z0.norm() * z1.norm()))
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)


# %% The exact answer: 2D Gaussian-mixture data, whose eps-model is closed form
def mixture(k=3, radius=0.8, std=0.4):
    """Means on a circle, equal weights, one std: (means [k, 2], stds [k], weights [k]), float64."""
    ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return torch.stack([radius * ang.cos(), radius * ang.sin()], 1), torch.full((k,), std, dtype=torch.float64), \
        torch.full((k,), 1 / k, dtype=torch.float64)


def mixture_eps_model(means, stds, weights, alpha_bar):
    """model(x [B, D], t [B]) -> the exact eps = -sqrt(1 - ab) * score of q(x_t). Under q, component k becomes
    N(sqrt(ab) mu_k, v_k I), v_k = ab s_k^2 + 1 - ab; the mixture's score is sum_k r_k(x) * -(x - sqrt(ab) mu_k) / v_k,
    with r_k the posterior weight of component k."""
    def model(x, t):
        ab = alpha_bar.to(x.device, x.dtype)[t][:, None]  # [B, 1]
        diff = x[:, None, :] - ab.sqrt()[:, :, None] * means[None]  # [B, K, D]
        var = ab * stds[None] ** 2 + 1 - ab  # [B, K]
        logp = weights.log()[None] - 0.5 * x.shape[1] * var.log() - 0.5 * diff.square().sum(2) / var
        r = torch.softmax(logp, dim=1)  # [B, K]
        score = -(r[:, :, None] * diff / var[:, :, None]).sum(1)  # [B, D]
        return -(1 - ab).sqrt() * score
    return model


# %% The trained model: a lesson-04 checkpoint as model(x, t) -> eps
def load_model(path, device):
    """A 04 checkpoint -> (model(x, t) -> eps with the EMA weights, alpha_bar float64 [T], config)."""
    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    cfg["shape"] = (cfg["channels"], cfg["image_size"], cfg["image_size"])  # one image: (C, H, W)
    net = UNet(in_ch=cfg["channels"], base_ch=cfg["base_ch"], ch_mult=tuple(cfg["ch_mult"])).eval().to(device)
    net.requires_grad_(False).load_state_dict(ckpt["ema"])  # the EMA weights: the raw weights give worse samples
    alpha_bar = alpha_bar_of(cosine_betas(cfg["T"]) if cfg["schedule"] == "cosine" else linear_betas(cfg["T"]))
    bf16 = bf16_supported(device) if PRECISION == "auto" else PRECISION == "bf16"

    def model(x, t):  # the sampler's T and schedule are the training ones; v or x0 networks give eps
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            out = net(x, t).float()
        return to_eps_x0(cfg["pred"], out, x, alpha_bar.to(x.device)[t].float().view(-1, 1, 1, 1))[0]
    print(f"loaded {path}: step {ckpt['step']}, {cfg['dataset']} {cfg['image_size']}px, pred {cfg['pred']}, "
          f"{cfg['schedule']} schedule, T={cfg['T']} | {device}, {'bf16 autocast' if bf16 else 'fp32'}")
    if cfg.get("quick"):
        print(f"warning: {path} is from a --quick run ({ckpt['step']} steps): a smoke test", file=sys.stderr)
    return model, alpha_bar, cfg


# %% Experiment 1: exactness on the Gaussian mixture (order of convergence)
def exactness(out, quick, seed):
    alpha_bar = alpha_bar_of(cosine_betas(1000))
    model, t0 = mixture_eps_model(*mixture(), alpha_bar), time.time()
    x_T = torch.randn(200 if quick else 2000, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = dpmpp_2m(model, x_T, alpha_bar, 1000, spacing="time")  # the finest grid the model's t allows
    ref_heun = heun(model, x_T, alpha_bar, 1000, spacing="time")
    steps = [5, 10, 20, 50] if quick else [5, 10, 20, 50, 100, 200]  # NFE asked; Heun's 5: 3 steps, 4 NFE
    runs = {"DDIM, trailing": ("ddim", "trailing"), "DDIM, time": ("ddim", "time"), "DPM++(2M), logSNR":
            ("dpm++2m", "logsnr"), "DPM++(2M), time": ("dpm++2m", "time"), "Heun, time": ("heun", "time")}
    series = [(label, [2 * steps_for(name, n) - 2 if name == "heun" else n for n in steps],  # (label, NFEs, errors)
               [(SAMPLERS[name](model, x_T, alpha_bar, steps_for(name, n), spacing=spacing) - ref).norm(dim=1).mean()
                .item() for n in steps]) for label, (name, spacing) in runs.items()]
    print(f"\nexactness on 2D mixture data ({len(x_T)} paths; mean distance to the reference solve, "
          f"DPM-Solver++(2M) on all 1000 timesteps; Heun on all 1000 is {(ref_heun - ref).norm(dim=1).mean():.1e} "
          f"from it; {time.time() - t0:.0f} s)\n  {'sampler (NFE ->)':20s}" + "".join(f"{n:9d}" for n in steps)
          + "   order (fit from NFE 10)")
    for label, nfes, errs in series:
        order = -np.polyfit(np.log(nfes[1:]), np.log(errs[1:]), 1)[0]  # slope of log error vs log NFE
        print(f"  {label:20s}" + "".join(f"{e:9.1e}" for e in errs) + f"   {order:5.2f}")
    c1, c2 = 0.4 * series[1][2][0] * steps[0], 0.4 * series[2][2][1] * steps[1] ** 2  # guides near DDIM and DPM++
    series += [("slope -1", steps, [c1 / n for n in steps]), ("slope -2", steps, [c2 / n ** 2 for n in steps])]
    ys = [y for s in series for y in s[2]]
    loglog_plot(os.path.join(out, "05_exactness.png"), series, "error against a reference ODE solve (exact eps, "
                "2D mixture)", "model evaluations (NFE)", "mean |x_0 - x_0_ref| (log)", (min(ys) / 1.5, max(ys) * 2))


# %% Experiment 2: quality against NFE on images, with the Frechet distance
def run_sampler(name, model, x_T, alpha_bar, nfe, args, device):
    """Sample in batches of BATCH; returns (x_0 on the CPU, model evaluations per image, seconds)."""
    calls = []
    counted = lambda x, t: calls.append(1) or model(x, t)  # counts the model evaluations (NFE)
    opts = dict(clip=args.clip, **({"spacing": args.spacing} if args.spacing else {}))
    if name in ("ddpm", "ddim", "dpm++2m-sde"):
        opts["generator"] = torch.Generator().manual_seed(args.seed + 1)  # the same noise draws for every run
    if name == "ddim":
        opts["eta"] = args.eta
    t0, outs = time.time(), []
    for i in range(0, len(x_T), BATCH):
        outs.append(SAMPLERS[name](counted, x_T[i:i + BATCH].to(device), alpha_bar, steps_for(name, nfe), **opts))
    return torch.cat(outs).cpu(), len(calls) // len(outs), time.time() - t0


def quality(out, args, model, alpha_bar, cfg, data, device):
    train, labels, held, labels_held, n_classes = data
    n, t0 = min(args.samples, len(held) // 2), time.time()
    clf = train_classifier(train, labels, n_classes, device, 8 if args.quick else 400, cfg["seed"])
    f_real, c_real = features_and_classes(clf, to_unit(held[:n]), device)
    floor = frechet_distance(features_and_classes(clf, to_unit(held[n:2 * n]), device)[0], f_real)  # 2 held-out halves
    print(f"\nquality: Frechet distance to {n} held-out real images on a {n_classes}-class classifier's features "
          f"(classifier: {(c_real == labels_held[:n]).float().mean().item():.0%} accurate on them, trained in "
          f"{time.time() - t0:.0f} s); floor FD(real, real) at {n} = {floor:.2f}")
    x_T = torch.randn(n, *cfg["shape"], generator=torch.Generator().manual_seed(args.seed))  # same for every run
    rows = []
    print(f"  {'sampler':11s} {'NFE':>5s} {'FD':>8s} {'images/s':>9s}")
    for name in args.samplers:
        for nfe in args.nfe + ([len(alpha_bar)] if name == "ddpm" and args.ddpm_full else []):
            x0, used, secs = run_sampler(name, model, x_T, alpha_bar, nfe, args, device)
            x0 = x0.clamp(-1, 1)  # what a saved image holds, clipped or not while sampling
            fd = frechet_distance(features_and_classes(clf, x0, device)[0], f_real)
            rows.append((name, used, fd, x0[:8]))
            print(f"  {name:11s} {used:5d} {fd:8.2f} {n / secs:9.1f}", flush=True)
    xs, ys = [r[1] for r in rows], [r[2] for r in rows] + [floor]  # series: [(label, NFEs, FDs)]
    series = [(name + (f" (eta={args.eta:g})" if name == "ddim" else ""), *zip(*[r[1:3] for r in rows if r[0] == name]))
              for name in args.samplers] + [("floor: real vs real", [min(xs), max(xs)], [floor, floor])]
    loglog_plot(os.path.join(out, "05_quality.png"), series, f"sample quality against model evaluations ({n} "
                "samples each)", "model evaluations per image (NFE, log scale)", "Frechet distance (lower is better, "
                "log)", (max(min(ys) * 0.7, 1e-3), max(ys) * 4))  # ylim: room for the legend
    grid(os.path.join(out, "05_grid.png"), torch.cat([r[3] for r in rows]), 8,
         "the same 8 starting noises through every sampler and NFE", [f"{r[0]}, NFE {r[1]}" for r in rows])


# %% Experiment 3: DDIM determinism, inversion and interpolation
def determinism(out, model, alpha_bar, cfg, args, device):
    x_T = torch.randn(6, *cfg["shape"], generator=torch.Generator().manual_seed(args.seed + 2)).to(device)
    ns, n_ddpm = ([2, 4], 4) if args.quick else ([10, 20, 50, 100], 50)
    rows = [ddim(model, x_T, alpha_bar, n, clip=args.clip).cpu() for n in ns]
    rows += [ddpm(model, x_T, alpha_bar, n_ddpm, clip=args.clip, generator=torch.Generator().manual_seed(s)).cpu()
             for s in (1, 2)]
    grid(os.path.join(out, "05_determinism.png"), torch.cat(rows), 6, "one x_T per column: DDIM keeps its image, "
         "DDPM draws a new one", [f"DDIM {n} steps" for n in ns] + [f"DDPM {n_ddpm}, draws #{s}" for s in (1, 2)])


def inversion(out, model, alpha_bar, held, args, device):
    """Round trips to three depths, no clipping. The cosine schedule keeps sqrt(ab) = 5e-5 of the image at T-1, yet
    deeper need not be worse: the printed PSNR says which trips come back. Row 2 of the figure is x_t / 3 (display)."""
    x = to_unit(held[:6]).to(device)
    print("\nDDIM inversion: image -> x_t_end (ODE backwards) -> image (ODE forwards), no clipping\n"
          f"  {'t_end':>5s} {'sqrt(ab)':>9s} {'steps':>5s} {'RMSE':>10s} {'PSNR dB':>8s} {'std of x_t_end':>15s}")
    shown, T = {}, len(alpha_bar)
    for t_end in (T - 1, T - 11, T - 51):
        for n in ([2, 4] if args.quick else [20, 50]):
            x_T = ddim_invert(model, x, alpha_bar[:t_end + 1], n)  # a schedule cut at t_end: "x_T" is x_t_end
            rec = ddim(model, x_T, alpha_bar[:t_end + 1], n)
            rmse = (rec - x).square().mean().sqrt().item()
            print(f"  {t_end:5d} {alpha_bar[t_end].sqrt().item():9.1e} {n:5d} {rmse:10.4f} "
                  f"{20 * math.log10(2 / max(rmse, 1e-12)):8.1f} {x_T.std().item():15.3f}")
            shown[t_end, n] = (x_T.cpu(), rec.cpu())
    n = 4 if args.quick else 50
    rows = torch.cat([x.cpu(), shown[T - 51, n][0] / 3, shown[T - 51, n][1], shown[T - 11, n][1], shown[T - 1, n][1]])
    grid(os.path.join(out, "05_inversion.png"), rows, 6, f"DDIM inversion, {n} steps each way: image -> noise -> "
         "image", ["real image", f"x_t at t={T - 51} (/3)"] + [f"back from t={T - k}" for k in (51, 11, 1)])


def interpolation(out, model, alpha_bar, cfg, args, device):
    print("\nslerp against lerp between two noises:")
    g, a, rows = torch.Generator().manual_seed(args.seed + 3), torch.linspace(0, 1, 9), []
    for pair in range(2):
        z0, z1 = torch.randn(cfg["shape"], generator=g), torch.randn(cfg["shape"], generator=g)
        for kind in ("slerp", "lerp"):
            zs = torch.stack([slerp(z0, z1, w) if kind == "slerp" else (1 - w) * z0 + w * z1 for w in a])
            rows.append(dpmpp_2m(model, zs.to(device), alpha_bar, 4 if args.quick else 20, clip=args.clip).cpu())
            if pair == 0:
                print(f"  {kind}: |z| / sqrt(dim) at the midpoint = {zs[4].norm() / math.sqrt(z0.numel()):.3f}")
    grid(os.path.join(out, "05_interpolation.png"), torch.cat(rows), 9, "from x_T(a) = slerp or lerp between two "
         "noises, a = 0 ... 1 (DPM-Solver++(2M))", [f"pair {p}, {kind}" for p in (1, 2) for kind in ("slerp", "lerp")],
         [f"a={w:.3g}" for w in a.tolist()])


# %% Main
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    model, alpha_bar, cfg = load_model(args.ckpt, device)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    print(f"timesteps visited with 5 steps, T = {len(alpha_bar)}:" + "".join(
        f"\n  {spacing:8s} {timesteps(alpha_bar, 5, spacing)} -> x_0" for spacing in ("time", "trailing", "logsnr")))
    exactness(args.out, args.quick, args.seed)
    data = real_images(cfg)
    quality(args.out, args, model, alpha_bar, cfg, data, device)
    determinism(args.out, model, alpha_bar, cfg, args, device)
    inversion(args.out, model, alpha_bar, data[2], args, device)
    interpolation(args.out, model, alpha_bar, cfg, args, device)
    print(f"\nwrote 05_quality.png, 05_grid.png, 05_exactness.png, 05_determinism.png, 05_inversion.png, "
          f"05_interpolation.png to {args.out}/ in {time.time() - t_start:.0f} s")


def parse_args(argv=None):
    argv = [] if argv is None and "ipykernel" in sys.modules else argv  # in Jupyter, sys.argv holds the kernel's flags
    p = argparse.ArgumentParser(description="Lesson 05: samplers over a lesson-04 checkpoint, measured.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda message: fail(f"{message} (see --help)")  # one line and exit status 2, not argparse's usage block
    a = p.add_argument
    a("--ckpt", default="runs/04/ckpt.pt", help="a checkpoint from 04_train.py (with --quick: runs/quick/04/ckpt.pt)")
    a("--samplers", default="ddpm,ddim,dpm++2m,heun,dpm++2m-sde", help="which samplers the quality table compares")
    a("--nfe", default="5,10,20", help="model evaluations per image for the quality table")
    a("--ddpm-full", action="store_true", help="also DDPM over all T steps (1000 NFE: the slow reference)")
    a("--samples", type=int, default=250, help="images per sampler and NFE for the Frechet distance")
    a("--eta", type=float, default=0.0, help="DDIM's eta in the quality table (0 deterministic, 1 DDPM-like)")
    a("--spacing", choices=["time", "trailing", "logsnr"], help="timesteps for every sampler in the quality table "
      "(default: each its own: DDIM trailing, DPM-Solver++ logsnr, DDPM and Heun time)")
    a("--clip", action=argparse.BooleanOptionalAction, default=True, help="clip x0_hat to [-1, 1], the data range")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    a("--seed", type=int, default=0, help="fixes every starting noise and every draw")
    a("--out", default="figures", help="folder for the figures (with --quick: runs/quick)")
    a("--quick", action="store_true", help="tiny settings for a smoke test (seconds), never over the defaults")
    args = p.parse_args(argv)
    if not all(n.strip().isdigit() for n in args.nfe.split(",")):
        fail(f"--nfe must be integers separated by commas, like 5,10,20 (got {args.nfe!r})")
    args.nfe, args.samplers = sorted({int(n) for n in args.nfe.split(",")}), args.samplers.split(",")
    if not set(args.samplers) <= set(SAMPLERS):
        fail(f"unknown sampler in --samplers {','.join(args.samplers)}; choose from {', '.join(SAMPLERS)}")
    if args.quick:  # never over the defaults: a quick run reads and writes under runs/quick/
        args.nfe, args.samples, args.ddpm_full = [2, 4], 8, False
        args.ckpt = "runs/quick/04/ckpt.pt" if args.ckpt == "runs/04/ckpt.pt" else args.ckpt
        args.out = "runs/quick" if args.out == "figures" else args.out
    if min(args.nfe) < 2 or args.samples < 2 or not 0 <= args.eta <= 1:
        fail("--nfe values must be >= 2, --samples >= 2 and --eta in [0, 1]")
    return args


# %% Appendix: pieces from earlier lessons
FORMAT = "dmfs-04-v1"  # the tag lesson 04 writes into its checkpoints
def read_checkpoint(path):  # a lesson-04 checkpoint dict, or one line that names the fix and exit status 2 (lesson 04)
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train one with python 04_train.py (--quick for a test) or pass --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); pass a file written by 04_train.py")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        fail(f"{path} was not written by 04_train.py (no format tag {FORMAT!r}); pass a 04 checkpoint")
    return ckpt

def bf16_supported(device):  # CUDA with bf16, or a CPU with bf16 units; plain AVX-512 only emulates it (lesson 04)
    units = [getattr(torch.cpu, f, lambda: False) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and any(u() for u in units)

def fail(message):  # one line naming the fix, exit status 2, no traceback (every lesson)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

def pick_device(name):  # auto: cuda, then mps, then cpu; a device that is not there exits 2 (every lesson)
    there = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d in there if there[d]) if name == "auto" else name
    if not there[name]:
        fail(f"--device {name} was asked for but {name.upper()} is not available; use --device cpu (or auto)")
    return torch.device(name)

def linear_betas(T):  # DDPM's schedule: beta_t linear from 1e-4 to 0.02, float64 [T] (lesson 01)
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
def cosine_betas(T, s=0.008):  # improved DDPM's: alpha_bar_t = f(t) / f(0), betas clipped at 0.999 (lesson 01)
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)
def alpha_bar_of(betas):  # alpha_bar_t = prod_{s<=t} (1 - beta_s) (lesson 01)
    return torch.cumprod(1 - betas, dim=0)

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
          "yellow": (240, 220, 40), "magenta": (220, 50, 220), "cyan": (40, 220, 230)}
SIZES = {"small": 0.20, "medium": 0.28, "large": 0.36}  # radius as a fraction of the image side
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
def make_shapes(n, size=32, seed=0):  # (uint8 [n, 3, size, size], int64 labels [n], captions) (lesson 01)
    rng = np.random.default_rng(seed)
    shape_i, color_i, size_i, pos_i = (rng.integers(0, len(v), n) for v in (SHAPES, COLORS, SIZES, POSITIONS))
    jitter, scale, angle = rng.uniform(-0.3, 0.3, (n, 2)), rng.uniform(0.9, 1.1, n), rng.uniform(0, 2 * math.pi, n)
    big, color_names, size_names = 4 * size, list(COLORS), list(SIZES)  # drawn 4x large, then box-downsampled
    masks, captions = np.empty((n, size, size), dtype=np.float32), []
    for i in range(n):
        r, kind, a = SIZES[size_names[size_i[i]]] * scale[i] * big, SHAPES[shape_i[i]], angle[i]
        col, row = pos_i[i] % 3, pos_i[i] // 3  # centre in one of a 3x3 grid of cells inside [r, big - r]
        cx, cy = r + (col + 0.5 + jitter[i, 0]) / 3 * (big - 2 * r), r + (row + 0.5 + jitter[i, 1]) / 3 * (big - 2 * r)
        img = Image.new("L", (big, big), 0)
        if kind == "circle":
            ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        elif kind == "cross":  # a plus sign: 12 vertices, arms of half-width w, rotated by a
            w, c, s = 0.32 * r, math.cos(a), math.sin(a)
            pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
                   (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
            ImageDraw.Draw(img).polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=255)
        else:  # vertices at even angles from a, circumradius r (a star's inner ones at 0.45 r)
            radii = {"square": [r] * 4, "triangle": [r] * 3, "star": [r, 0.45 * r] * 5}[kind]
            ang = [a + 2 * math.pi * j / len(radii) for j in range(len(radii))]
            ImageDraw.Draw(img).polygon([(cx + q * math.cos(b), cy + q * math.sin(b)) for q, b in zip(radii, ang)],
                                        fill=255)
        masks[i] = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255
        captions.append(f"a {size_names[size_i[i]]} {color_names[color_i[i]]} {kind} "
                        f"{'in the' if pos_i[i] == 4 else 'at the'} {POSITIONS[pos_i[i]]}")
    rgb = np.array([COLORS[c] for c in color_names], dtype=np.float32)  # [6, 3]
    images = masks[:, None] * rgb[color_i][:, :, None, None]  # [n, 1, H, W] * [n, 3, 1, 1] -> [n, 3, H, W]
    return torch.from_numpy(np.rint(images).astype(np.uint8)), torch.from_numpy(shape_i.astype(np.int64)), captions

def to_unit(images):  # uint8 [0, 255] -> float [-1, 1], the range diffusion models are trained in (lesson 01)
    return images.float() / 127.5 - 1

def real_images(cfg):  # the checkpoint's data, as 04 splits it: (train, labels, held-out, labels, number of classes)
    n_shapes, size = cfg.get("n_shapes", 2000 if cfg.get("quick") else 10_000), cfg["image_size"]  # older 04s lack it
    if cfg["dataset"] == "shapes":
        (images, labels, _), n_classes = make_shapes(n_shapes, size, cfg["seed"]), len(SHAPES)
    else:
        images, labels, n_classes = load_torchvision(cfg["dataset"], cfg["data_dir"], size)
    n_hold = min(len(images) // 5, 2000)  # 04's held-out images: the real side of the metric
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg["seed"]))
    return images[perm[n_hold:]], labels[perm[n_hold:]], images[perm[:n_hold]], labels[perm[:n_hold]], n_classes

def load_torchvision(name, data_dir, size):  # mnist, fashion-mnist, cifar10, folder -> (uint8, labels, classes)
    try:
        if name == "folder":  # resized and centre-cropped; one channel if every image is greyscale
            ds, TF = torchvision.datasets.ImageFolder(data_dir), torchvision.transforms.functional
            mode = "L" if all(Image.open(p).mode in ("1", "L") for p, _ in ds.samples) else "RGB"
            pics = [TF.center_crop(TF.resize(Image.open(p).convert(mode), size, antialias=True), size)
                    for p, _ in ds.samples]
            return torch.stack([TF.pil_to_tensor(x) for x in pics]), torch.tensor(ds.targets), len(ds.classes)
        ds = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
              "cifar10": torchvision.datasets.CIFAR10}[name](data_dir, train=True, download=True)
    except Exception as e:  # moved, never downloaded, no network: the fix is the same
        fail(f"could not load the checkpoint's {name} data from {data_dir!r} ({type(e).__name__}); run 05 where 04 ran")
    data = torch.as_tensor(np.asarray(ds.data))  # MNIST: [N, 28, 28]; CIFAR-10: [N, 32, 32, 3]
    data = data[:, None] if data.dim() == 3 else data.permute(0, 3, 1, 2)
    pad = (size - data.shape[-1]) // 2  # 28x28 digits are padded with background to 32 (or resized otherwise)
    if data.shape[-1] != size:
        data = F.pad(data, (pad,) * 4) if 0 < pad and 2 * pad + data.shape[-1] == size else \
            F.interpolate(data.float(), size=(size, size), mode="bilinear", antialias=True).round().byte()
    return data, torch.as_tensor(np.asarray(ds.targets)), len(ds.classes)

def timestep_embedding(t, dim):  # t int64 [B] -> [B, dim]: sin, cos of t at frequencies 1 ... 1/10000 (lesson 03)
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2))
    args = t.float()[:, None] * freqs[None]  # [B, dim / 2]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, dim]
def group_norm(ch):  # GroupNorm with 32 groups where the channels allow (lesson 03)
    return nn.GroupNorm(math.gcd(32, ch), ch)

class ResBlock(nn.Module):  # skip(x) + conv(SiLU(GN(conv(SiLU(GN(x)))) (1 + scale) + shift)), attention (lesson 03)
    def __init__(self, c_in, c_out, emb_dim, attn=False):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # time embedding -> per-channel (scale, shift)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out) if attn else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x [B, C_out, 1, 1]
        return self.attn(self.skip(x) + self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift)))

class Attention(nn.Module):  # four-head self-attention among the H*W positions, with a residual (lesson 03)
    def __init__(self, ch, heads=4):
        super().__init__()
        self.heads, self.norm = heads, group_norm(ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(3, 4).unbind(1)
        return x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(B, C, H, W))

class UNet(nn.Module):  # eps_theta(x_t, t) as 04 builds it (lesson 03): 2 ResBlocks a level down, 3 up, attention at 2
    def __init__(self, in_ch=3, base_ch=32, ch_mult=(1, 2, 2)):
        super().__init__()
        self.base_ch, emb_dim = base_ch, 4 * base_ch
        self.time_mlp = nn.Sequential(nn.Linear(base_ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_ch, base_ch, 3, padding=1)
        self.down, chans, ch = nn.ModuleList(), [base_ch], base_ch  # chans: every skip's channels, in order
        for level, mult in enumerate(ch_mult):
            for _ in range(2):
                self.down.append(ResBlock(ch, base_ch * mult, emb_dim, attn=level == 2))
                ch = base_ch * mult
                chans.append(ch)
            if level < len(ch_mult) - 1:  # Downsample, named as lesson 03's: a stride-2 3x3 conv
                self.down.append(nn.Sequential(OrderedDict(conv=nn.Conv2d(ch, ch, 3, stride=2, padding=1))))
                chans.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, attn=True), ResBlock(ch, ch, emb_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(3):
                self.up.append(ResBlock(ch + chans.pop(), base_ch * mult, emb_dim, attn=level == 2))
                ch = base_ch * mult
            if level > 0:  # Upsample: nearest x2, then a 3x3 conv
                self.up.append(nn.Sequential(OrderedDict(up=nn.Upsample(scale_factor=2),
                                                         conv=nn.Conv2d(ch, ch, 3, padding=1))))
        self.norm_out, self.conv_out = group_norm(ch), nn.Conv2d(ch, in_ch, 3, padding=1)

    def forward(self, x, t):
        emb = self.time_mlp(timestep_embedding(t, self.base_ch))  # [B, 4 base_ch]
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(block, ResBlock) else block(h)
        return self.conv_out(F.silu(self.norm_out(h)))

def to_eps_x0(pred, out, x_t, ab):  # the network's output -> (eps_hat, x0_hat), whatever it predicts (lesson 04)
    if pred == "eps":
        return out, (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    if pred == "x0":
        return (x_t - ab.sqrt() * out) / (1 - ab).sqrt(), out
    return (1 - ab).sqrt() * x_t + ab.sqrt() * out, ab.sqrt() * x_t - (1 - ab).sqrt() * out  # from v

def Classifier(in_ch, n_classes):  # the metric's CNN (lesson 04): body -> 128-d features (what FD compares) -> head
    return nn.Sequential(OrderedDict(body=nn.Sequential(
        nn.Conv2d(in_ch, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.GroupNorm(8, 128), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten()), head=nn.Linear(128, n_classes)))

def train_classifier(images, labels, n_classes, device, steps, seed):  # Adam on real images in [-1, 1] (lesson 04)
    clf, g = Classifier(images.shape[1], n_classes).to(device), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(clf.parameters(), 2e-3)
    for _ in range(steps):
        idx = torch.randint(len(images), (128,), generator=g)
        loss = F.cross_entropy(clf(to_unit(images[idx]).to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()

@torch.no_grad()
def features_and_classes(clf, x, device):  # features (float64, CPU) and predicted classes of x in [-1, 1] (lesson 04)
    feats = [clf.body(x[i:i + 256].to(device)) for i in range(0, len(x), 256)]
    return torch.cat([f.double().cpu() for f in feats]), torch.cat([clf.head(f).argmax(1).cpu() for f in feats])

def frechet_distance(f1, f2):  # |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) of features [N, D] (lesson 04)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, V = torch.linalg.eigh(s1)
    s1_half = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((f1.mean(0) - f2.mean(0)).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross).item()

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207),
           (120, 120, 120)]  # the drawing kit's colours; a grey joins them, as the exactness plot has seven lines

def grid(path, x, nrow, title, row_labels, col_labels=(), scale=2):  # x in [-1, 1] -> a titled grid, upscaled
    g = torchvision.utils.make_grid(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), nrow=nrow, pad_value=255)
    img = Image.fromarray(g.permute(1, 2, 0).numpy())  # [H', W', 3]
    img, f = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST), ImageFont.load_default(14)
    left, top = max(int(f.getlength(s)) for s in row_labels) + 12, 50 if col_labels else 32
    canvas = Image.new("RGB", (img.width + left + 8, img.height + top + 8), "white")
    canvas.paste(img, (left, top))
    d = ImageDraw.Draw(canvas)
    d.text((canvas.width // 2, 6), title, fill="black", font=ImageFont.load_default(16), anchor="ma")
    for i, s in enumerate(col_labels):  # labels centred over evenly spaced columns and rows
        d.text((left + (i + 0.5) * img.width / len(col_labels), top - 4), s, fill="black", font=f, anchor="md")
    for i, s in enumerate(row_labels):
        d.text((left - 6, top + (i + 0.5) * img.height / len(row_labels)), s, fill="black", font=f, anchor="rm")
    canvas.save(path)

def loglog_plot(path, series, title, xlabel, ylabel, ylim, W=760, H=520):  # series: [(label, xs, ys)], log-log axes
    img = Image.new("RGB", (W, H), "white")
    d, f = ImageDraw.Draw(img), ImageFont.load_default(13)
    x0, y0, x1, y1 = 70, 50, W - 20, H - 50
    xlim = (min(x for s in series for x in s[1]), max(x for s in series for x in s[1]))
    lx, ly = [math.log10(v) for v in xlim], [math.log10(v) for v in ylim]
    to_px = lambda x, y: (x0 + (math.log10(x) - lx[0]) / ((lx[1] - lx[0]) or 1) * (x1 - x0),
                          y1 - (math.log10(y) - ly[0]) / ((ly[1] - ly[0]) or 1) * (y1 - y0))
    ticks = lambda lo, hi: [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                            for m in ((1, 2, 5) if hi / lo > 10 else range(1, 10)) if lo <= m * 10.0 ** e <= hi]
    for v in ticks(*xlim):  # grid lines and labels at 1, 2, 5 x 10^k (at every digit when the span is one decade)
        px = to_px(v, ylim[0])[0]
        d.line([(px, y0), (px, y1 + 4)], fill=(230, 230, 230))
        d.text((px, y1 + 6), f"{v:g}", fill="black", font=f, anchor="ma")
    for v in ticks(*ylim):
        py = to_px(xlim[0], v)[1]
        d.line([(x0 - 4, py), (x1, py)], fill=(230, 230, 230))
        d.text((x0 - 6, py), f"{v:g}", fill="black", font=f, anchor="rm")
    d.rectangle((x0, y0, x1, y1), outline="black")
    d.text(((x0 + x1) / 2, y1 + 24), xlabel, fill="black", font=f, anchor="ma")
    d.text((x0 - 4, y0 - 8), ylabel, fill="black", font=f, anchor="ld")
    d.text((W / 2, 8), title, fill="black", font=ImageFont.load_default(15), anchor="ma")
    for k, (name, xs, ys) in enumerate(series):  # each line, a dot on each measurement, a legend entry top right
        color = PALETTE[k % len(PALETTE)]
        pts = [to_px(x, min(max(y, ylim[0]), ylim[1])) for x, y in zip(xs, ys)]
        d.line(pts, fill=color, width=2)
        for px, py in pts:
            d.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
        d.line([(W - 170, 62 + 18 * k), (W - 145, 62 + 18 * k)], fill=color, width=3)
        d.text((W - 140, 62 + 18 * k), name, fill="black", font=f, anchor="lm")
    img.save(path)

if __name__ == "__main__":
    main()
