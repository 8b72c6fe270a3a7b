"""Lesson 04, the main job: train a diffusion model on images, with everything a real run needs around it.

1. The objective (Ho et al. 2020, Algorithm 1): x_0 from the data, t uniform in [0, T-1], eps ~ N(0, I),
   x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps with ab = alpha_bar_t; regress the network's output on a target.
   Three targets carry the same information (Salimans & Ho 2022): eps, x_0, and v (the default):
       v = sqrt(ab) eps - sqrt(1 - ab) x_0,  x_0 = sqrt(ab) x_t - sqrt(1 - ab) v,  eps = sqrt(1 - ab) x_t + sqrt(ab) v
   With SNR = ab / (1 - ab): ||x_0 - x_0_hat||^2 = ||eps - eps_hat||^2 / SNR = ||v - v_hat||^2 / (1 + SNR).
2. Min-SNR weighting (Hang et al. 2023) makes the effective loss min(SNR, 5) ||x_0 - x_0_hat||^2, so the
   easy, almost clean t stop taking the gradient (the README compares it with unweighted eps).
3. Optimisation: AdamW, a linear learning-rate warmup, the gradient norm clipped at 1; the model that
   samples is an EMA of the weights, ema = decay ema + (1 - decay) w, decay = min(0.999, (1+step) / (10+step)).
   bf16 autocast (--precision auto) runs on CUDA and CPUs with bf16 units; 03_unet.py --bench measures it.
4. Sampling during training from fixed noise, with deterministic DDIM (Song et al. 2021; lesson 05):
       x_0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t),   x_s = sqrt(ab_s) x_0_hat + sqrt(1 - ab_s) eps
5. Quality without Inception weights: the Frechet distance (Heusel et al. 2017) between Gaussians fitted
   to a small CNN's features (trained on the same data for seconds) on samples and on held-out images,
   FD = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_r^1/2 S_g S_r^1/2)^1/2), beside real against real (the
   floor), noise (the ceiling), and the samples' class histogram.

    python 04_train.py                       # shapes; it prints its FLOPs and minutes on a CPU without bf16
    python 04_train.py --quick               # seconds: a smoke test, written under runs/quick/
    python 04_train.py --resume              # continue runs/04/ckpt.pt (same weights as never stopping)
    python 04_train.py --dataset mnist       # or fashion-mnist, cifar10: downloaded into --data-dir
    python 04_train.py --dataset folder --data-dir PATH   # your images, one sub-folder per class
    torchrun --nproc_per_node 2 04_train.py  # DDP (gloo on CPU, NCCL on CUDA); --batch-size is per process

It writes runs/04/ckpt.pt, figures/04_samples.png, 04_progress.png, 04_loss.png (the loss curve and the
loss binned by t) and 04_x0_pred.png, and prints the quality table.
"""
import argparse
import copy
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from functools import partial

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
# The training recipe beside the flags: parse_args copies these into args (args.T, args.warmup, ...), and the
# checkpoint's config records both
T = 1000  # diffusion steps
BASE_CH, CH_MULT = 32, (1, 2, 2)  # UNet width, and its channel multiplier per level
WARMUP, GRAD_CLIP, EMA_DECAY, HFLIP = 200, 1.0, 0.999, False  # HFLIP: random flips (natural images)
# Sampling, checkpoints and the metric
SAMPLE_EVERY, SAVE_EVERY, SAMPLE_STEPS = 500, 500, 50  # steps between grids, between checkpoints; DDIM steps
EVAL_SAMPLES, CLF_STEPS, N_SHAPES = 500, 400, 10_000  # metric samples (0: skip), classifier steps; shapes
SLOW_CPU_FLOPS = 64e9  # FLOP/s this UNet trains at in fp32 on 2 cores with AVX2 and no bf16 units (measured)
QUICK = dict(steps=30, batch_size=16, base_ch=16, warmup=5, sample_every=15, save_every=20,  # --quick: at most
             sample_steps=5, eval_samples=64, clf_steps=50, n_shapes=2000)


# %% Data: every dataset becomes one uint8 tensor [N, C, S, S] in memory, plus labels
def load_dataset(name, data_dir, size, seed, n_shapes=10_000):
    """-> (images uint8 [N, C, size, size], labels int64 [N], class names), all in memory: a batch is one index."""
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
        mode = "L" if all(Image.open(p).mode in ("1", "L") for p, _ in ds.samples) else "RGB"  # greyscale: 1 channel
        pics = [TF.center_crop(TF.resize(Image.open(p).convert(mode), size, antialias=True), size)
                for p, _ in ds.samples]
        return torch.stack([TF.pil_to_tensor(p) for p in pics]), torch.tensor(ds.targets), ds.classes  # [N, C, S, S]
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
    pad = (size - data.shape[-1]) // 2  # 28x28 digits are padded with background to 32 (or resized otherwise)
    if 0 < pad and 2 * pad + data.shape[-1] == size:
        data = F.pad(data, (pad, pad, pad, pad))
    elif data.shape[-1] != size:
        data = F.interpolate(data.float(), size=(size, size), mode="bilinear", antialias=True).round().byte()
    return data, torch.as_tensor(np.asarray(ds.targets)), list(ds.classes)


# %% The objective: eps, x_0 and v, and the loss weight per t
def target_of(pred, x0, eps, ab):
    """The regression target for --pred; ab = alpha_bar_t broadcast as [B, 1, 1, 1]."""
    return {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[pred]


def to_eps_x0(pred, out, x_t, ab):
    """Turn the network's output into (eps_hat, x0_hat), whatever it predicts."""
    if pred == "eps":
        return out, (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    if pred == "x0":
        return (x_t - ab.sqrt() * out) / (1 - ab).sqrt(), out
    eps = (1 - ab).sqrt() * x_t + ab.sqrt() * out  # from v: eps = sqrt(1 - ab) x_t + sqrt(ab) v
    return eps, ab.sqrt() * x_t - (1 - ab).sqrt() * out  # x_0 = sqrt(ab) x_t - sqrt(1 - ab) v


def loss_weight(kind, pred, ab, gamma=5.0):
    """Per-sample weight: 1, or min-SNR-gamma for the chosen target (Hang et al. 2023)."""
    if kind == "none":
        return torch.ones_like(ab)
    snr = ab / (1 - ab)
    clipped = snr.clamp(max=gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[pred]


# %% One training step (Ho et al. 2020, Algorithm 1, with warmup, clipping and EMA)
def draw_batch(images, shard, batch_size, gen, hflip=False):
    """x_0 from this process's shard (uint8 -> [-1, 1]), t uniform in [0, T-1], eps ~ N(0, I): every draw
    from one generator, so a resumed run that restores it continues exactly."""
    x0 = to_unit(images[shard[torch.randint(len(shard), (batch_size,), generator=gen)]])  # [B, C, S, S]
    if hflip:
        x0 = torch.where((torch.rand(batch_size, generator=gen) < 0.5)[:, None, None, None], x0.flip(3), x0)
    assert x0.min() >= -1 and x0.max() <= 1, "training data must lie in [-1, 1]"  # the contract that trips most
    return x0, torch.randint(T, (batch_size,), generator=gen), torch.randn(x0.shape, generator=gen)


def diffusion_loss(net, x0, t, eps, alpha_bar, pred, weighting, autocast):
    """-> (the weighted loss, per-sample losses [B]). `net` may be the model compiled or wrapped in DDP."""
    ab = alpha_bar[t].float().view(-1, 1, 1, 1)
    x_t = q_sample(x0, t, alpha_bar, eps)
    with autocast():  # bf16 inside the network; the loss is computed in fp32
        out = net(x_t, t)
    per_sample = (out.float() - target_of(pred, x0, eps, ab)).square().mean((1, 2, 3))  # [B]
    return (loss_weight(weighting, pred, ab.view(-1)) * per_sample).mean(), per_sample.detach()


def train_step(model, ema, opt, loss, step, lr, warmup):
    """Backpropagate `loss` into `model` (which owns the weights), take an AdamW step, update the EMA."""
    for group in opt.param_groups:  # linear warmup: Adam's second-moment estimates are poor at first
        group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)  # one bad batch cannot throw the weights far
    opt.step()
    decay = min(EMA_DECAY, (1 + step) / (10 + step))  # EMA warmup: early on, average fewer steps
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)  # ema = decay * ema + (1 - decay) * w


# %% Checkpoints: one dict, written atomically, loaded without running code; a NaN stops the run
def new_state(args, device):
    """What a checkpoint saves: the UNet, its EMA, AdamW, the step, the log, the training generator."""
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = UNet(in_ch=args.channels, base_ch=args.base_ch, ch_mult=args.ch_mult).to(device)
    try:
        model.check_size(args.image_size, args.image_size)
    except ValueError as e:
        fail(f"--image-size {args.image_size}: {e}")
    return {"model": model, "ema": copy.deepcopy(model).requires_grad_(False), "step": 0,
            "optimizer": torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0),
            "log": {"losses": [], "t_sums": [0.0] * 20, "t_counts": [0] * 20},
            "gen": torch.Generator().manual_seed(args.seed * 1000 + args.rank)}  # every draw: batch, t, noise


def save_state(path, state, args):
    """The NaN guard, then {format, config, model, ema, optimizer, step, log, rng} written to a temporary
    file and renamed: a crash never leaves half a file."""
    if not all(torch.isfinite(p).all() for p in state["model"].parameters()):
        stop(f"the weights are not finite at step {state['step']}", path, args)
    gens = [state["gen"].get_state()] * args.world
    if args.world > 1:  # each rank draws its own batches: keep every rank's generator
        dist.all_gather_object(gens, state["gen"].get_state())
    if args.rank == 0:
        torch.save({"format": FORMAT, "config": vars(args), "step": state["step"], "log": state["log"],
                    **{k: state[k].state_dict() for k in ("model", "ema", "optimizer")},
                    "rng": {"torch": torch.get_rng_state(), "train": gens}}, path + ".tmp")
        os.replace(path + ".tmp", path)


def load_state(path, state, args):
    """Restore `state` from a checkpoint; a missing, corrupt, foreign or incompatible file exits 2."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train first (python 04_train.py) or pass the right path to --resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data: runs no code
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it and train again")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        fail(f"{path} was not written by 04_train.py (format {ckpt.get('format') if isinstance(ckpt, dict) else '?'}); "
             "pass a 04 checkpoint to --resume")
    diff = [f"{k}={ckpt['config'].get(k)!r} (now {vars(args)[k]!r})"
            for k in ("dataset", "image_size", "channels", "pred", "schedule", "T", "base_ch", "ch_mult")
            if ckpt["config"].get(k) != vars(args)[k]]
    if diff:
        fail(f"{path} was trained with {', '.join(diff)}; use the same settings or a new --run-dir")
    for k in ("model", "ema", "optimizer"):
        state[k].load_state_dict(ckpt[k])
    state["step"], state["log"] = ckpt["step"], ckpt["log"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    if len(ckpt["rng"]["train"]) == args.world:  # the same number of processes: continue bit for bit
        state["gen"].set_state(ckpt["rng"]["train"][args.rank])
    if args.rank == 0:
        print(f"resumed {path} at step {state['step']}" + (f"; it is already at --steps {args.steps}: "
              "pass a larger --steps" if state["step"] >= args.steps else ""))


def stop(what, path, args):
    """A diverged run stops without saving, so the last good checkpoint survives."""
    if args.rank == 0:
        print(f"\n{what}: stopping without saving; the last good checkpoint is {path}. "
              f"Lower --lr (now {args.lr:g}) and --resume", file=sys.stderr)
    sys.exit(1)


# %% Several processes (DistributedDataParallel through torchrun) and mixed precision
def setup_device(name):
    """-> (rank, world size, device); torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. TF32 matmuls on CUDA."""
    rank, world, device = 0, 1, None
    if "RANK" in os.environ:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        cuda = name in ("auto", "cuda") and torch.cuda.is_available()
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    device = device or pick_device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


def cpu_has_bf16():
    """bf16 units (AVX512-BF16 or AMX). oneDNN's own check also says yes on AVX-512 CPUs without them, where bf16
    is emulated and slower than fp32 (03_unet.py --bench measures it)."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def use_bf16(device, precision):
    """auto: bf16 autocast on CUDA and on CPUs with bf16 units (AVX512-BF16, AMX), else fp32."""
    has = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_has_bf16()
    if precision == "bf16" and not has:
        fail(f"--precision bf16 is not supported on this {device.type}; use --precision fp32")
    return precision != "fp32" and has


def replicas_agree(model, world):
    """DDP keeps the replicas identical: check it, bit for bit."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    replicas = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(replicas, flat)
    return all(torch.equal(r, replicas[0]) for r in replicas)


# %% Sampling: deterministic DDIM from fixed noise (lesson 05 has the full set of samplers)
@torch.no_grad()
def ddim_sample(model, x_T, alpha_bar, steps, pred, autocast=nullcontext):
    """x_T [B, C, S, S] -> x_0. Visits t_i = round(i (T-1) / (steps-1)) from T-1 down to 0, then one
    last step from t = 0 to the clean image (alpha_bar = 1). Deterministic, so grids drawn from the same
    fixed noise during training show the model changing, not the noise. x0_hat is clipped to the data
    range [-1, 1] at every step, and eps recomputed from it so the two stay consistent."""
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
        loss = F.cross_entropy(clf(to_unit(images[idx]).to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()


@torch.no_grad()
def features_and_classes(clf, x, device, batch=256):
    """-> (penultimate features float64 [N, 128], predicted classes [N]), in batches."""
    feats, classes = [], []
    for i in range(0, len(x), batch):
        f = clf.body(x[i:i + batch].to(device))
        feats.append(f.double().cpu())
        classes.append(clf.head(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(classes)


def frechet_distance(f1, f2):
    """FD between Gaussians fitted to two feature sets [N, D] (float64); the trace of the matrix
    square root comes from the eigenvalues of the symmetric S1^1/2 S2 S1^1/2."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, V = torch.linalg.eigh(s1)
    s1_half = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross).item()


# %% The experiment: the training loop, then its figures and the quality table
def train(args, state, net, images, shard, alpha_bar, x_fixed, autocast):
    """Train up to args.steps: progress, grids from fixed noise, checkpoints (Ctrl-C saves one). -> [(step, grid)]"""
    path, log, progress, first = os.path.join(args.run_dir, "ckpt.pt"), state["log"], [], state["step"]
    t0, smooth, batch = time.time(), None, args.batch_size * args.world  # images per step, all ranks together
    try:
        while state["step"] < args.steps:
            x0, t, eps = (d.to(x_fixed.device, non_blocking=True)
                          for d in draw_batch(images, shard, args.batch_size, state["gen"], args.hflip))
            loss, per_sample = diffusion_loss(net, x0, t, eps, alpha_bar, args.pred, args.loss_weight, autocast)
            if not torch.isfinite(loss):  # never step on a non-finite loss
                stop(f"loss is {loss.item()} at step {state['step']}", path, args)
            train_step(state["model"], state["ema"], state["optimizer"], loss, state["step"], args.lr, args.warmup)
            state["step"] = step = state["step"] + 1
            log["losses"].append(loss.item())
            smooth = log["losses"][-1] if smooth is None else 0.98 * smooth + 0.02 * log["losses"][-1]
            if step > args.steps // 2:  # loss by t, in 20 bins, once the model has settled
                for ti, li in zip(t.tolist(), per_sample.tolist()):
                    log["t_sums"][ti * 20 // args.T] += li
                    log["t_counts"][ti * 20 // args.T] += 1
            last, rate = step == args.steps, (step - first) * batch / (time.time() - t0)
            if args.rank == 0 and (step % 10 == 0 or last):
                print(f"\rstep {step}/{args.steps}  loss {smooth:.4f}  {rate:.0f} img/s  "
                      f"ETA {(args.steps - step) * batch / max(rate, 1e-9) / 60:.1f} min ", end="", flush=True)
            if args.rank == 0 and (step % args.sample_every == 0 or last):
                progress.append((step, ddim_sample(state["ema"], x_fixed[:8], alpha_bar, args.sample_steps,
                                                   args.pred, autocast).cpu()))
            if step % args.save_every == 0 or last:
                save_state(path, state, args)
    except KeyboardInterrupt:
        save_state(path, state, args)
        if args.rank == 0:
            print(f"\ninterrupted at step {state['step']}: saved {path}; continue with --resume")
        sys.exit(130)
    if args.rank == 0 and state["step"] > first:  # speed (training costs ~3 forwards) and peak memory
        rate = (state["step"] - first) * batch / (time.time() - t0)
        with FlopCounterMode(display=False) as counter:
            state["model"](x0[:1], t[:1])
        cuda = x_fixed.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"\ntrained {state['step'] - first} steps in {(time.time() - t0) / 60:.1f} min: {rate:.0f} images/s "
              f"({3 * counter.get_total_flops() * rate / 1e9:.0f} GFLOP/s, counting training as 3x the forward), "
              f"peak memory {peak / 2**20:.0f} MiB ({'GPU allocated' if cuda else 'process RSS'})")
    return progress


def save_loss_plots(path, log, T):
    """Left: the loss, averaged into at most 200 points. Right: the loss binned by t (second half)."""
    losses, sums, counts = log["losses"], log["t_sums"], log["t_counts"]
    k = max(1, len(losses) // 200)
    steps = [(i + 1) * k for i in range(len(losses) // k)]
    centres = [(i + 0.5) * T / len(sums) for i in range(len(sums)) if counts[i]]
    means, by_t = [sum(losses[s - k:s]) / k for s in steps], [s / c for s, c in zip(sums, counts) if c]
    panels = [("weighted loss", steps, means, f"training loss, as weighted (mean of every {k} steps)", "step"),
              ("unweighted MSE", centres, by_t, "unweighted target MSE binned by t (last half)", "t")]
    save_row(path, [line_plot([(label, xs, ys)], title, xlabel, "loss", logy=True, ylim=(min(ys) * 0.8, max(ys) * 1.25),
                              size=(550, 430)) for label, xs, ys, title, xlabel in panels])


@torch.no_grad()
def save_x0_predictions(path, model, x0, alpha_bar, pred, gen, autocast):
    """Rows: t; columns: x_0, x_t, the x_0 estimate. When samples are noise, look here first (net or data range)."""
    ts = [int(f * (len(alpha_bar) - 1)) for f in (0.02, 0.1, 0.25, 0.5, 0.75, 0.9)]
    rows = []
    for t in ts:
        tt = torch.full((len(x0),), t, device=x0.device, dtype=torch.long)
        x_t = q_sample(x0, tt, alpha_bar, torch.randn(x0.shape, generator=gen).to(x0.device))
        with autocast():
            out = model(x_t, tt)
        rows.append(torch.cat([x0, x_t, to_eps_x0(pred, out.float(), x_t, alpha_bar[t].float().view(1, 1, 1, 1))[1]]))
    grid(to_uint8(torch.cat(rows)).cpu(), 3 * len(x0), "x_0 predictions (EMA model): for each t, clean x_0 | "
         "noisy x_t | predicted x_0", [f"t={t}" for t in ts], ["clean x_0", "noisy x_t", "predicted x_0"], 2).save(path)


def quality(args, ema, images, labels, classes, held, train_idx, alpha_bar, autocast):
    """FD(samples, real) on a small classifier's features, beside real-vs-real and noise; class histograms."""
    t1, n, device = time.time(), min(args.eval_samples, len(held)), alpha_bar.device
    clf = train_classifier(images[train_idx], labels[train_idx], len(classes), device, args.clf_steps, args.seed)
    eg = torch.Generator().manual_seed(args.seed + 777)
    fake = torch.cat([ddim_sample(ema, torch.randn(min(256, n - i), *images.shape[1:], generator=eg).to(device),
                                  alpha_bar, args.sample_steps, args.pred, autocast).cpu() for i in range(0, n, 256)])
    noise = torch.randn(n, *images.shape[1:], generator=eg).clamp(-1, 1)
    (f_a, c_a), (f_b, _), (f_g, c_g), (f_n, _) = (features_and_classes(clf, x, device) for x in (
        to_unit(images[held[:n]]), to_unit(images[train_idx[:n]]), fake, noise))
    print(f"\nquality ({n} samples, DDIM {args.sample_steps} steps; classifier accuracy on held-out real "
          f"{(c_a == labels[held[:n]]).float().mean().item():.1%}; {time.time() - t1:.0f} s):")
    for name, f in (("FD(samples, real)", f_g), ("FD(real, real) floor", f_b), ("FD(noise, real) ceiling", f_n)):
        print(f"  {name:23}{frechet_distance(f, f_a):8.2f}")
    for name, c in (("samples:", c_g), ("real:   ", c_a)):
        hist = torch.bincount(c, minlength=len(classes)).tolist()
        print(f"  classes of {name} " + ", ".join(f"{k} {h}" for k, h in zip(classes, hist)))


def run_cost(args, model, n_classes, first_step):
    """FLOPs this run will compute (a multiply-add counts 2): training, the grids, the metric. Counting
    works on any machine; dividing by a machine's speed gives its time. -> (total, {part: FLOPs})."""
    def flops(net, x, *rest):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x, *rest)
        return counter.get_total_flops()
    x = torch.zeros(1, args.channels, args.image_size, args.image_size, device=next(model.parameters()).device)
    fwd = flops(model, x, torch.zeros(1, dtype=torch.long, device=x.device))  # one image, one forward
    steps = max(0, args.steps - first_step)
    grids = -(-steps // args.sample_every) * 8 + 64  # progress rows of 8, then the final 64
    parts = {"training": 3 * fwd * args.batch_size * args.world * steps,  # backward ~ 2 forwards
             "grids": fwd * args.sample_steps * grids + fwd * 24}  # + 04_x0_pred's 6 t x 4 images
    if args.eval_samples and n_classes > 1:
        clf = flops(Classifier(args.channels, n_classes).to(x.device), x)
        parts["metric"] = fwd * args.sample_steps * args.eval_samples + clf * (3 * 128 * args.clf_steps
                                                                               + 4 * args.eval_samples)
    return sum(parts.values()), parts


def save_figures(args, state, progress, x_show, x_fixed, alpha_bar, autocast):
    """04_samples.png, 04_progress.png, 04_loss.png and 04_x0_pred.png, all from the EMA model."""
    ema, out, steps = state["ema"].eval(), args.out, args.sample_steps
    final = ddim_sample(ema, x_fixed, alpha_bar, steps, args.pred, autocast).cpu()
    grid(to_uint8(final), 8, f"04: 64 samples after {state['step']} steps (EMA, DDIM {steps} steps)").save(
        os.path.join(out, "04_samples.png"))
    if progress:
        grid(to_uint8(torch.cat([p for _, p in progress])), 8, "samples from the same noise during training (EMA)",
             [f"step {s}" for s, _ in progress], scale=2).save(os.path.join(out, "04_progress.png"))
    if sum(state["log"]["t_counts"]):
        save_loss_plots(os.path.join(out, "04_loss.png"), state["log"], args.T)
    save_x0_predictions(os.path.join(out, "04_x0_pred.png"), ema, x_show, alpha_bar, args.pred,
                        torch.Generator().manual_seed(args.seed), autocast)


def main(argv=None):
    args = parse_args(argv)
    args.rank, args.world, device = setup_device(args.device)
    bf16 = use_bf16(device, args.precision)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16 else nullcontext
    images, labels, classes = load_dataset(args.dataset, args.data_dir, args.image_size, args.seed, args.n_shapes)
    if len(images) < 2:
        fail(f"{args.dataset} has {len(images)} image(s); training needs at least 2")
    n_hold = min(len(images) // 5, 2000)  # held out: the real images the quality metric compares against
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    held, train_idx = perm[:n_hold], perm[n_hold:] if n_hold else perm
    if device.type == "cuda":
        images = images.pin_memory()  # host-to-device copies can then overlap compute
    args.channels = images.shape[1]
    state = new_state(args, device)
    if args.resume is not None:
        load_state(args.resume, state, args)
    alpha_bar = alpha_bar_of(cosine_betas(args.T) if args.schedule == "cosine" else linear_betas(args.T)).to(device)
    net = torch.compile(state["model"]) if args.compile else state["model"]
    if args.world > 1:  # each process trains on its own shard; DDP averages the gradients
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    x_fixed = torch.randn(64, *images.shape[1:], generator=torch.Generator().manual_seed(args.seed + 12345)).to(device)
    if args.rank == 0:
        os.makedirs(args.run_dir, exist_ok=True)
        os.makedirs(args.out, exist_ok=True)
        total, parts = run_cost(args, state["model"], len(classes), state["step"])
        print(f"this run computes {total / 1e12:.1f} TFLOP (" + ", ".join(f"{k} {v / 1e12:.1f}" for k, v in
              parts.items()) + f"): about {total / SLOW_CPU_FLOPS / 60:.0f} min on a 2-core CPU without bf16 units")
        print(f"{args.dataset}: {len(train_idx)} training images {tuple(images.shape[1:])}, {len(classes)} classes | "
              f"UNet {sum(p.numel() for p in state['model'].parameters()) / 1e6:.2f}M params | {device}, "
              f"{'bf16 autocast' if bf16 else 'fp32'}, {args.world} process(es), effective batch "
              f"{args.batch_size * args.world} | pred {args.pred}, {args.schedule} schedule, loss weight "
              f"{args.loss_weight}")
    progress = train(args, state, net, images, train_idx[args.rank::args.world], alpha_bar, x_fixed, autocast)
    if args.world > 1:
        agree = replicas_agree(state["model"], args.world)
        dist.destroy_process_group()
        if args.rank > 0:
            return
        print(f"ranks agree on the weights: {agree}")
    x_show = to_unit(images[(held if n_hold else train_idx)[:4]]).to(device)
    save_figures(args, state, progress, x_show, x_fixed, alpha_bar, autocast)
    if args.eval_samples and len(classes) > 1 and n_hold >= 2:
        quality(args, state["ema"], images, labels, classes, held, train_idx, alpha_bar, autocast)
    print(f"wrote {args.run_dir}/ckpt.pt and 04_samples.png, 04_progress.png, 04_loss.png, 04_x0_pred.png "
          f"to {args.out}/")


def parse_args(argv=None):
    if argv is None and "ipykernel" in sys.modules:  # in Jupyter, sys.argv holds the kernel's own flags
        argv = []
    p = Parser(description="Lesson 04: train a diffusion model on images.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="shapes", choices=DATASETS, help="folder: --data-dir holds one sub-folder per class")
    a("--data-dir", default="data", help="where torchvision data is downloaded, or the image folder")
    a("--image-size", type=int, default=32, help="images are resized (and centre-cropped, or padded) to this")
    a("--pred", default="v", choices=["eps", "v", "x0"], help="what the network predicts")
    a("--schedule", default="cosine", choices=["linear", "cosine"], help="noise schedule (lesson 01)")
    a("--loss-weight", default="min-snr", choices=["none", "min-snr"], help="per-t weight of the loss")
    a("--steps", type=int, default=2000, help="total training steps (a resumed run continues up to this number)")
    a("--batch-size", type=int, default=64, help="per process")
    a("--lr", type=float, default=1e-3, help="AdamW learning rate after the warmup")
    a("--resume", nargs="?", const="", default=None, help="continue from this checkpoint (alone: RUN_DIR/ckpt.pt)")
    a("--run-dir", default="runs/04", help="checkpoint folder (with --quick: runs/quick/04)")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 where the device has it")
    a("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    a("--seed", type=int, default=0, help="fixes the data, the weights and every draw")
    a("--out", default="figures", help="folder for the figures (with --quick: runs/quick)")
    a("--quick", action="store_true", help="tiny settings for a smoke test (seconds), written under runs/quick/")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "lr"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    # the rest are the module's constants; the checkpoint's config records them with the flags
    vars(args).update(T=T, base_ch=BASE_CH, ch_mult=CH_MULT, warmup=WARMUP, hflip=HFLIP, sample_every=SAMPLE_EVERY,
                      save_every=SAVE_EVERY, sample_steps=SAMPLE_STEPS, eval_samples=EVAL_SAMPLES,
                      clf_steps=CLF_STEPS, n_shapes=N_SHAPES, grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY)
    if args.quick:  # tiny settings, and never written over the defaults
        vars(args).update({k: min(getattr(args, k), v) for k, v in QUICK.items()})
        args.out = "runs/quick" if args.out == "figures" else args.out
        args.run_dir = "runs/quick/04" if args.run_dir == "runs/04" else args.run_dir
    if args.resume == "":
        args.resume = os.path.join(args.run_dir, "ckpt.pt")
    return args


# %% Appendix: pieces from earlier lessons
def linear_betas(T):
    """DDPM's schedule: beta_t linear from 1e-4 to 0.02, float64 [T] (lesson 01)."""
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)


def cosine_betas(T, s=0.008):
    """Improved DDPM's schedule: alpha_bar_t = f(t) / f(0), betas clipped at 0.999, float64 [T] (lesson 01)."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def alpha_bar_of(betas):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (lesson 01)."""
    return torch.cumprod(1 - betas, dim=0)


def q_sample(x0, t, alpha_bar, noise):
    """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise, for int64 t [B] (lesson 01)."""
    ab = alpha_bar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # [B, 1, 1, 1]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
          "yellow": (240, 220, 40), "magenta": (220, 50, 220), "cyan": (40, 220, 230)}
SIZES = {"small": 0.20, "medium": 0.28, "large": 0.36}  # radius as a fraction of the image side
POSITIONS = ("top left", "top", "top right", "left", "centre", "right",
             "bottom left", "bottom", "bottom right")


def shape_polygon(kind, cx, cy, r, angle):
    """Vertices of a square, triangle, star or cross centred at (cx, cy), circumradius r, rotated (lesson 01)."""
    if kind == "cross":  # a plus sign: 12 vertices, arms of half-width w
        w = 0.32 * r
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    radii = {"square": [r] * 4, "triangle": [r] * 3, "star": [r, 0.45 * r] * 5}[kind]
    k = len(radii)
    return [(cx + rad * math.cos(angle + 2 * math.pi * i / k), cy + rad * math.sin(angle + 2 * math.pi * i / k))
            for i, rad in enumerate(radii)]


def make_shapes(n, size=32, seed=0):
    """(uint8 images [n, 3, size, size], labels int64 [n], captions): one anti-aliased shape each (lesson 01)."""
    rng = np.random.default_rng(seed)
    shape_i, color_i, size_i, pos_i = (rng.integers(0, len(v), n) for v in (SHAPES, COLORS, SIZES, POSITIONS))
    jitter, scale, angle = rng.uniform(-0.3, 0.3, (n, 2)), rng.uniform(0.9, 1.1, n), rng.uniform(0, 2 * math.pi, n)
    big, color_names, size_names = 4 * size, list(COLORS), list(SIZES)
    rgb = np.array([COLORS[c] for c in color_names], dtype=np.float32)  # [6, 3]
    masks, captions = np.empty((n, size, size), dtype=np.float32), []
    for i in range(n):
        r = SIZES[size_names[size_i[i]]] * scale[i] * big
        col, row = pos_i[i] % 3, pos_i[i] // 3  # centre in one of a 3x3 grid of cells inside [r, big - r]
        cx = r + (col + 0.5 + jitter[i, 0]) / 3 * (big - 2 * r)
        cy = r + (row + 0.5 + jitter[i, 1]) / 3 * (big - 2 * r)
        img = Image.new("L", (big, big), 0)
        kind = SHAPES[shape_i[i]]
        if kind == "circle":
            ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            ImageDraw.Draw(img).polygon(shape_polygon(kind, cx, cy, r, angle[i]), fill=255)
        masks[i] = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255
        captions.append(f"a {size_names[size_i[i]]} {color_names[color_i[i]]} {kind} "
                        f"{'in the' if pos_i[i] == 4 else 'at the'} {POSITIONS[pos_i[i]]}")
    images = masks[:, None] * rgb[color_i][:, :, None, None]  # [n, 1, H, W] * [n, 3, 1, 1] -> [n, 3, H, W]
    return torch.from_numpy(np.rint(images).astype(np.uint8)), torch.from_numpy(shape_i.astype(np.int64)), captions


def to_unit(images):
    """uint8 [0, 255] -> float [-1, 1], the range diffusion models are trained in (lesson 01)."""
    return images.float() / 127.5 - 1


def to_uint8(x):
    """float [-1, 1] -> uint8 [0, 255], values outside clipped (lesson 01)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def timestep_embedding(t, dim):
    """t int64 [B] -> float [B, dim]: sin and cos of t at frequencies from 1 to 1/10000 (lesson 03)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, dim]


def group_norm(ch):
    return nn.GroupNorm(math.gcd(32, ch), ch)  # 32 groups where the channels allow (lesson 03)


class ResBlock(nn.Module):
    """skip(x) + conv(SiLU(GN(conv(SiLU(GN(x)))) * (1 + scale) + shift)), then optional attention (lesson 03)."""
    def __init__(self, c_in, c_out, emb_dim, dropout=0.0, attn_heads=0):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # time embedding -> per-channel (scale, shift)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out, attn_heads) if attn_heads else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x [B, C_out, 1, 1]
        h = self.norm2(h) * (1 + scale) + shift
        return self.attn(self.skip(x) + self.conv2(self.dropout(F.silu(h))))


class Attention(nn.Module):
    """Multi-head self-attention among the H*W positions of a feature map, with a residual (lesson 03)."""
    def __init__(self, ch, heads=4):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention channels ({ch}) must be divisible by heads ({heads})")
        self.heads, self.norm = heads, group_norm(ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(3, 4).unbind(1)  # 3 x [B, heads, HW, C/heads]
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v: [B, heads, HW, C/heads]
        return x + self.proj(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2) with a stride-2 3x3 conv (lesson 03)."""
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour, then a 3x3 conv (lesson 03)."""
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """The denoiser (x_t, t): (B, in_ch, H, W), int64 [B] -> (B, out_ch, H, W), eps, v or x_0 (lesson 03)."""
    def __init__(self, in_ch=3, out_ch=None, base_ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                 attn_levels=(2,), dropout=0.0, heads=4):
        super().__init__()
        self.base_ch, self.levels, emb_dim = base_ch, len(ch_mult), 4 * base_ch
        self.time_mlp = nn.Sequential(nn.Linear(base_ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_ch, base_ch, 3, padding=1)
        self.down, chans, ch = nn.ModuleList(), [base_ch], base_ch  # chans: every skip's channels, in order
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
        self.conv_out = nn.Conv2d(ch, out_ch or in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the untrained net outputs 0 (for an eps target: eps_hat = 0)
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
            h = block(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(block, ResBlock) else block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


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


# The course's drawing kit (PIL: matplotlib is not a dependency); ticks on a log axis is 04's addition to it
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
    if log:  # with fewer than three powers of ten in range, also 2x and 5x (04's addition to the kit)
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        powers = [10.0 ** e for e in decades if lo <= 10.0 ** e <= hi]
        if len(powers) >= 3:
            return powers
        return [m * 10.0 ** e for e in decades for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
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
