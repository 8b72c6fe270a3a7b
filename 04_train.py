"""Lesson 04, the main job: train a diffusion model on images, with everything a real run needs around it.

1. The objective (Ho et al. 2020, Algorithm 1): x_0 from the data, t uniform in [0, T-1], eps ~ N(0, I),
   x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps with ab = alpha_bar_t; regress the network's output on a target.
   Three targets carry the same information (Salimans & Ho 2022): eps, x_0, and v (the default):
       v = sqrt(ab) eps - sqrt(1 - ab) x_0,  x_0 = sqrt(ab) x_t - sqrt(1 - ab) v,  eps = sqrt(1 - ab) x_t + sqrt(ab) v
   With SNR = ab / (1 - ab): ||x_0 - x_0_hat||^2 = ||eps - eps_hat||^2 / SNR = ||v - v_hat||^2 / (1 + SNR).
2. Min-SNR weighting (Hang et al. 2023) makes the effective loss min(SNR, 5) ||x_0 - x_0_hat||^2, so the
   easy, almost clean t stop taking the gradient (the README compares it with unweighted eps).
3. Optimisation: AdamW, warmup then a cosine decay of the lr to 0, gradient norm clipped at 1. The model that
   samples is a power EMA of the weights (EDM2): ema = decay ema + (1 - decay) w, decay = (1 - 1/step)^(gamma+1),
   an average over a fixed share of the run. bf16 autocast (--precision auto) where the device has bf16 units.
4. Sampling during training from fixed noise, with deterministic DDIM (Song et al. 2021; lesson 05):
       x_0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t),   x_s = sqrt(ab_s) x_0_hat + sqrt(1 - ab_s) eps
5. Quality without Inception weights: the Frechet distance (Heusel et al. 2017) between Gaussians fitted to a small
   CNN's features on samples and on held-out images, FD = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_r^1/2 S_g S_r^1/2)^1/2),
   beside the floor (two held-out halves), the ceiling (noise) and the samples' class histogram.

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
import signal
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode

FORMAT = "dmfs-04-v1"  # checkpoint format tag: a file written by another script is refused
DATASETS = ("shapes", "mnist", "fashion-mnist", "cifar10", "folder")
# The training recipe beside the flags: parse_args copies these into args, and checkpoints record both in their config
T = 1000  # diffusion steps
BASE_CH, CH_MULT = 16, (1, 2, 4)  # UNet width and multipliers: 16, 32, 64 channels at 32, 16, 8 pixels
WARMUP, GRAD_CLIP, HFLIP = 200, 1.0, False  # warmup steps, gradient-norm clip; HFLIP: random flips (photos)
EMA_GAMMA = 6.94  # power-function EMA: the average's width is 10% of the run (Karras et al. 2024, EDM2)
SAMPLE_EVERY, SAVE_EVERY, SAMPLE_STEPS = 500, 500, 20  # steps between grids, between checkpoints; DDIM steps
EVAL_SAMPLES, CLF_STEPS, N_SHAPES = 250, 400, 10_000  # metric samples (0: skip; every lesson's N), judge steps; shapes
SLOW_CPU_FLOPS = 64e9  # the budgets' FLOP/s: a wider UNet's, 2 AVX2 cores, fp32 (this one runs slower: README)
QUICK = dict(steps=12, batch_size=16, base_ch=16, warmup=5, sample_every=6, save_every=8,  # --quick: at most
             sample_steps=5, eval_samples=32, clf_steps=8, n_shapes=2000)

# %% Data: every dataset becomes one uint8 tensor [N, C, S, S] in memory, plus labels
def load_dataset(name, data_dir, size, seed, n_shapes=10_000):
    """-> (images uint8 [N, C, size, size], labels int64 [N], class names), all in memory: a batch is one index."""
    if name == "shapes":
        return make_shapes(n_shapes, size=size, seed=seed)[:2] + (list(SHAPES),)
    if name == "folder" and not os.path.isdir(data_dir):
        fail(f"--dataset folder needs --data-dir to be a folder of class sub-folders; {data_dir!r} does not exist")
    cls = getattr(torchvision.datasets, {"folder": "ImageFolder", "mnist": "MNIST", "fashion-mnist": "FashionMNIST",
                                         "cifar10": "CIFAR10"}[name])
    try:
        ds = cls(data_dir) if name == "folder" else cls(data_dir, train=True, download=True)
    except Exception as e:  # an empty folder; no network, a proxy, a half-written file: say where the files go
        where = "cifar-10-batches-py" if name == "cifar10" else os.path.join(cls.__name__, "raw")
        fail(f"no images found under {data_dir!r} ({str(e).splitlines()[0]}); put them in one sub-folder per class, "
             "e.g. DIR/cats/1.png" if name == "folder" else f"could not load {name} ({type(e).__name__}); download "
             f"it by hand into {os.path.join(data_dir, where)} (torchvision's layout), or pass --data-dir")
    if name == "folder":  # resized and centre-cropped; one channel if every image is greyscale
        TF = torchvision.transforms.functional
        mode = "L" if all(Image.open(p).mode in ("1", "L") for p, _ in ds.samples) else "RGB"
        pics = [TF.center_crop(TF.resize(Image.open(p).convert(mode), size, antialias=True), size) for p, _ in
                ds.samples]
        return torch.stack([TF.pil_to_tensor(p) for p in pics]), torch.tensor(ds.targets), ds.classes  # [N, C, S, S]
    data = torch.as_tensor(np.asarray(ds.data))  # MNIST: [N, 28, 28]; CIFAR-10: [N, 32, 32, 3]
    data = data[:, None] if data.dim() == 3 else data.permute(0, 3, 1, 2)
    pad = (size - data.shape[-1]) // 2  # 28x28 digits are padded with background to 32 (or resized otherwise)
    if data.shape[-1] != size:
        data = F.pad(data, (pad,) * 4) if 0 < pad and 2 * pad + data.shape[-1] == size else \
            F.interpolate(data.float(), size=(size, size), mode="bilinear", antialias=True).round().byte()
    return data, torch.as_tensor(np.asarray(ds.targets)), list(ds.classes)

# %% The objective: eps, x_0 and v, and the loss weight per t
def target_of(pred, x0, eps, ab):
    """The regression target for --pred; ab = alpha_bar_t broadcast as [B, 1, 1, 1]."""
    return {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[pred]
def to_eps_x0(pred, out, x_t, ab):
    """Any target -> (eps_hat, x0_hat); from v: eps = sqrt(1-ab) x_t + sqrt(ab) v, x_0 = sqrt(ab) x_t - sqrt(1-ab) v."""
    if pred == "eps":
        return out, (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    if pred == "x0":
        return (x_t - ab.sqrt() * out) / (1 - ab).sqrt(), out
    return (1 - ab).sqrt() * x_t + ab.sqrt() * out, ab.sqrt() * x_t - (1 - ab).sqrt() * out
def loss_weight(kind, pred, ab, gamma=5.0):
    """Per-sample weight: 1, or min-SNR-gamma for the chosen target (Hang et al. 2023)."""
    snr = ab / (1 - ab)
    w = snr.clamp(max=gamma)  # min(SNR, gamma) on the x_0 error, whose eps and v errors are SNR and 1 + SNR times it
    return {"eps": w / snr, "x0": w, "v": w / (snr + 1)}[pred] if kind == "min-snr" else torch.ones_like(ab)

# %% One training step (Ho et al. 2020, Algorithm 1, with warmup, clipping and EMA)
def draw_batch(images, shard, batch_size, gen, hflip=False):
    """x_0 from this rank's shard in [-1, 1], t ~ U{0..T-1}, eps ~ N(0, I): one generator, which a resume restores."""
    x0 = to_unit(images[shard[torch.randint(len(shard), (batch_size,), generator=gen)]])  # [B, C, S, S]
    x0 = torch.where((torch.rand(batch_size, generator=gen) < 0.5).view(-1, 1, 1, 1), x0.flip(3), x0) if hflip else x0
    assert x0.min() >= -1 and x0.max() <= 1, "training data must lie in [-1, 1]"  # the contract that trips most
    return x0, torch.randint(T, (batch_size,), generator=gen), torch.randn(x0.shape, generator=gen)
def diffusion_loss(net, x0, t, eps, alpha_bar, pred, weighting, autocast):
    """-> (the weighted loss, per-sample losses [B]). `net` may be the model compiled or wrapped in DDP."""
    ab, x_t = alpha_bar[t].float().view(-1, 1, 1, 1), q_sample(x0, t, alpha_bar, eps)
    with autocast():  # bf16 inside the network; the loss is computed in fp32
        out = net(x_t, t)
    per_sample = (out.float() - target_of(pred, x0, eps, ab)).square().mean((1, 2, 3))  # [B]
    return (loss_weight(weighting, pred, ab.view(-1)) * per_sample).mean(), per_sample.detach()
def learning_rate(step, steps, lr, warmup):
    """Warmup (Adam's moment estimates start poor), then a cosine to 0: lr min(1, (s+1)/warmup) (1+cos(pi s/steps))/2"""
    return lr * min(1.0, (step + 1) / max(1, warmup)) * (1 + math.cos(math.pi * step / steps)) / 2

def train_step(model, ema, opt, loss, step, lr):
    """Backpropagate `loss` into `model` (which owns the weights), take an AdamW step at `lr`, update the EMA."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)  # one bad batch cannot throw the weights far
    opt.step()
    # ema_t = decay_t ema_(t-1) + (1 - decay_t) w_t with decay_t = (1 - 1/t)^(gamma+1) makes ema_t the average of
    # w_1..w_t weighted by s^gamma: it forgets the noisy start, and its width stays a fixed share of any run
    decay = (1 - 1 / (step + 1)) ** (EMA_GAMMA + 1)
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)  # ema = decay * ema + (1 - decay) * w

# %% Checkpoints: one dict, written atomically, loaded without running code; a NaN stops the run
def start_state(args, device):
    """A checkpoint's content (UNet, EMA, AdamW, step, log, the batches' generator): new, or from --resume (exits 2)."""
    torch.manual_seed(args.seed)  # same initial weights on every rank; channels_last: ~1.2x faster on a CPU
    model, path = UNet(args.channels, args.base_ch, args.ch_mult), args.resume
    model = model.to(device, memory_format=torch.channels_last)
    state = {"model": model, "ema": copy.deepcopy(model).requires_grad_(False), "step": 0,
             "optimizer": torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0),
             "log": {"losses": [], "t_sums": [0.0] * 20, "t_counts": [0] * 20},
             "gen": torch.Generator().manual_seed(args.seed * 1000 + args.rank)}  # every draw: batch, t, noise
    if path is None:
        return state
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data: runs no code
    except Exception as e:  # missing, or not a torch file
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it and retrain" if os.path.isfile(path)
             else f"no checkpoint at {path}; train first (python 04_train.py) or pass the right path to --resume")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        fail(f"{path} was not written by 04_train.py (no format tag {FORMAT!r}); pass a 04 checkpoint to --resume")
    diff = [f"{k}={ckpt['config'].get(k)!r} (now {vars(args)[k]!r})" for k in
            ("dataset", "image_size", "channels", "pred", "schedule", "T", "base_ch", "ch_mult")
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
        done = f"; it is already at --steps {args.steps}: pass a larger one (the lr then follows the longer cosine)"
        print(f"resumed {path} at step {state['step']}" + (done if state["step"] >= args.steps else ""))
    return state
def save_state(path, state, args):
    """The NaN guard, then {format, config, model, ema, optimizer, step, log, rng} written to a temporary file and
    renamed: a crash never leaves half a file. Each rank draws its own batches: every rank's generator is kept."""
    if not all(torch.isfinite(p).all() for p in state["model"].parameters()):
        stop(f"the weights are not finite at step {state['step']}", path, args)
    gens = [state["gen"].get_state()] * args.world
    if args.world > 1:
        dist.all_gather_object(gens, state["gen"].get_state())
    if args.rank == 0:
        torch.save({"format": FORMAT, "config": vars(args), "step": state["step"], "log": state["log"],
                    **{k: state[k].state_dict() for k in ("model", "ema", "optimizer")},
                    "rng": {"torch": torch.get_rng_state(), "train": gens}}, path + ".tmp")
        os.replace(path + ".tmp", path)
def stop(what, path, args):  # a diverged run stops without saving, so the last good checkpoint survives
    if args.rank == 0:
        print(f"\n{what}: stopping without saving; the last good checkpoint is {path}. "
              f"Lower --lr (now {args.lr:g}) and --resume", file=sys.stderr)
    sys.exit(1)

# %% Several processes (DistributedDataParallel through torchrun) and mixed precision
def setup_device(name, precision):
    """-> (rank, world size, device, bf16); torchrun sets RANK, WORLD_SIZE, LOCAL_RANK. bf16 autocast (auto): CUDA, or a
    CPU with bf16 units (AVX512-BF16, AMX); oneDNN also says yes on plain AVX-512, where bf16 is emulated and slower."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = pick_device(name)
    if "RANK" in os.environ:  # one process per GPU (NCCL), or per share of the CPU (gloo)
        device = torch.device("cuda", local) if device.type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 matmuls
    cpu_has_bf16 = any(getattr(torch.cpu, f"_is_{u}_supported", lambda: False)() for u in ("avx512_bf16", "amx_tile"))
    has = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_has_bf16
    if precision == "bf16" and not has:
        fail(f"--precision bf16 is not supported on this {device.type}; use --precision fp32")
    return rank, world, device, precision != "fp32" and has

# %% Sampling with deterministic DDIM from fixed noise (lesson 05 has them all), and measuring its quality
@torch.no_grad()
def ddim_sample(model, x_T, alpha_bar, steps, pred, autocast=nullcontext):
    """x_T -> x_0 through t_i = round(i (T-1) / (steps-1)), then to alpha_bar = 1; x0_hat clipped to [-1, 1]."""
    ts, x = torch.linspace(len(alpha_bar) - 1, 0, steps).round().long().tolist(), x_T
    for i, t in enumerate(ts):
        ab = alpha_bar[t].to(x.device, torch.float32).view(1, 1, 1, 1)
        with autocast():
            out = model(x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
        x0 = to_eps_x0(pred, out.float(), x, ab)[1].clamp(-1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # eps recomputed, so it stays consistent with the clipped x0
        ab_next = alpha_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0  # the last step lands on x_0
        x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps
    return x

def Classifier(in_ch, n_classes):
    """A small CNN: body -> 128-d penultimate features (what the Frechet distance compares) -> head."""
    return nn.Sequential(OrderedDict(body=nn.Sequential(
        nn.Conv2d(in_ch, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.GroupNorm(8, 128), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten()), head=nn.Linear(128, n_classes)))  # [B, 128] -> [B, n_classes]
def train_classifier(images, labels, n_classes, device, steps, seed):
    """A few hundred steps of Adam on real images in [-1, 1]: enough to judge shapes or digits."""
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
def features_and_classes(clf, x, device):
    """-> (penultimate features float64 [N, 128], predicted classes [N]), in batches of 256."""
    feats = [clf.body(x[i:i + 256].to(device)) for i in range(0, len(x), 256)]
    return torch.cat([f.double().cpu() for f in feats]), torch.cat([clf.head(f).argmax(1).cpu() for f in feats])
def frechet_distance(f1, f2):
    """FD of Gaussians fitted to features [N, D] (float64); tr sqrt from the eigvals of symmetric S1^1/2 S2 S1^1/2."""
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, V = torch.linalg.eigh(s1)
    s1_half = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((f1.mean(0) - f2.mean(0)).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross).item()

# %% The experiment: what the run costs, the training loop, then its figures and the quality table
def run_cost(args, model, n_classes, first_step):
    """Print the run's FLOPs (counted, so true on any machine) and its minutes on a slow CPU. A training image costs 3
    forwards; grids: rows of 8, the final 64, 04_x0_pred's 24; metric: samples, classifier trained and run on 4 sets."""
    x = torch.zeros(1, args.channels, args.image_size, args.image_size, device=next(model.parameters()).device)
    fwd, steps = flops(model, x, torch.zeros(1, dtype=torch.long, device=x.device)), max(0, args.steps - first_step)
    parts = {"training": 3 * fwd * args.batch_size * args.world * steps,
             "grids": fwd * args.sample_steps * (-(-steps // args.sample_every) * 8 + 64) + fwd * 24}
    if args.eval_samples and n_classes > 1:
        clf = flops(Classifier(args.channels, n_classes).to(x.device), x)
        parts["metric"] = fwd * args.sample_steps * args.eval_samples + clf * (3 * 128 * args.clf_steps
                                                                               + 4 * args.eval_samples)
    total = sum(parts.values())
    print(f"this run computes {total / 1e12:.1f} TFLOP (" + ", ".join(f"{k} {v / 1e12:.1f}" for k, v in parts.items())
          + f"): {total / SLOW_CPU_FLOPS / 60:.0f} min at the budgets' 64 GFLOP/s (2 CPU cores without bf16 units)")

def train(args, state, net, images, shard, alpha_bar, x_fixed, autocast):
    """Train up to args.steps: progress, grids from fixed noise, checkpoints (Ctrl-C saves one). -> [(step, grid)]"""
    path, log, progress, first = os.path.join(args.run_dir, "ckpt.pt"), state["log"], [], state["step"]
    t0, smooth, batch = time.time(), None, args.batch_size * args.world  # images per step, all ranks together
    interrupted, before = [], signal.getsignal(signal.SIGINT)  # Ctrl-C: the step it lands in ends, is saved, and
    def ctrl_c(*_):  # the run stops (a checkpoint taken mid-step would not resume exactly); a second one: at once
        interrupted.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if before is signal.default_int_handler:  # not where SIGINT is ignored (nohup) or handled (a notebook)
        signal.signal(signal.SIGINT, ctrl_c)
    try:
        while state["step"] < args.steps and not interrupted:
            x0, t, eps = (d.to(x_fixed.device, non_blocking=True)
                          for d in draw_batch(images, shard, args.batch_size, state["gen"], args.hflip))
            x0, eps = (d.contiguous(memory_format=torch.channels_last) for d in (x0, eps))  # as the UNet's weights
            loss, per_sample = diffusion_loss(net, x0, t, eps, alpha_bar, args.pred, args.loss_weight, autocast)
            if not torch.isfinite(loss):  # never step on a non-finite loss
                stop(f"loss is {loss.item()} at step {state['step']}", path, args)
            lr = learning_rate(state["step"], args.steps, args.lr, args.warmup)
            train_step(state["model"], state["ema"], state["optimizer"], loss, state["step"], lr)
            state["step"] = step = state["step"] + 1
            log["losses"].append(loss.item())
            smooth = log["losses"][-1] if smooth is None else 0.98 * smooth + 0.02 * log["losses"][-1]
            if step > args.steps // 2:  # the loss by t, in 20 bins, once the model has settled
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
            if step % args.save_every == 0 or last or interrupted:
                save_state(path, state, args)
    except KeyboardInterrupt:  # a second Ctrl-C, mid-step: the last checkpoint stays
        sys.exit(130)
    signal.signal(signal.SIGINT, before)
    if interrupted:
        if args.rank == 0:
            print(f"\ninterrupted at step {state['step']}: saved {path}; continue with --resume")
        sys.exit(130)
    if args.rank == 0 and state["step"] > first:  # speed (training costs ~3 forwards) and peak memory
        rate, cuda = (state["step"] - first) * batch / (time.time() - t0), x_fixed.is_cuda
        peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"\ntrained {state['step'] - first} steps in {(time.time() - t0) / 60:.1f} min: {rate:.0f} images/s ("
              f"{3 * flops(state['model'], x0[:1], t[:1]) * rate / 1e9:.0f} GFLOP/s), peak memory {peak / 2**20:.0f} "
              f"MiB ({'GPU allocated' if cuda else 'process RSS'})")
    return progress

@torch.no_grad()
def save_figures(args, state, progress, x_show, x_fixed, alpha_bar, autocast):
    """04_samples.png, 04_progress.png, 04_loss.png and 04_x0_pred.png, all from the EMA model."""
    ema, n, path = state["ema"].eval(), args.sample_steps, lambda name: os.path.join(args.out, name)
    grid(path("04_samples.png"), ddim_sample(ema, x_fixed, alpha_bar, n, args.pred, autocast), 8,
         f"04: 64 samples after {state['step']} steps (EMA, DDIM {n} steps)", scale=3)
    if progress:
        grid(path("04_progress.png"), torch.cat([p for _, p in progress]), 8,
             "samples from the same noise during training (EMA)", [f"step {s}" for s, _ in progress])
    losses, sums, counts = (state["log"][k] for k in ("losses", "t_sums", "t_counts"))
    k = max(1, len(losses) // 200)  # left: the loss averaged into at most 200 points; right: binned by t
    steps, bins = [(i + 1) * k for i in range(len(losses) // k)], [i for i in range(20) if counts[i]]
    if bins:
        log_plots(path("04_loss.png"), "loss", [
            (steps, [sum(losses[s - k:s]) / k for s in steps], f"training loss, as weighted (mean of every {k} steps)",
             "step"), ([(i + 0.5) * args.T / 20 for i in bins], [sums[i] / counts[i] for i in bins],
                       "unweighted target MSE binned by t (last half)", "t")])
    # Rows: t; columns: x_0, x_t, the x_0 estimate. When samples are noise, look here first (net or data range)
    ts, rows = [int(f * (args.T - 1)) for f in (0.02, 0.1, 0.25, 0.5, 0.75, 0.9)], []
    gen = torch.Generator().manual_seed(args.seed)
    for t in ts:
        tt = torch.full((len(x_show),), t, device=x_show.device, dtype=torch.long)
        x_t = q_sample(x_show, tt, alpha_bar, torch.randn(x_show.shape, generator=gen).to(x_show.device))
        with autocast():
            out = ema(x_t, tt).float()
        rows.append(torch.cat([x_show, x_t, to_eps_x0(args.pred, out, x_t, alpha_bar[t].float().view(1, 1, 1, 1))[1]]))
    grid(path("04_x0_pred.png"), torch.cat(rows), 3 * len(x_show), "x_0 predictions (EMA model): for each t, clean "
         "x_0 | noisy x_t | predicted x_0", [f"t={t}" for t in ts], ["clean x_0", "noisy x_t", "predicted x_0"])

def quality(args, ema, images, labels, classes, held, train_idx, alpha_bar, autocast):
    """FD(samples, real) on a small classifier's features, beside real-vs-real and noise; class histograms."""
    t1, n, device = time.time(), min(args.eval_samples, len(held) // 2), alpha_bar.device
    clf = train_classifier(images[train_idx], labels[train_idx], len(classes), device, args.clf_steps, args.seed)
    eg = torch.Generator().manual_seed(args.seed + 777)
    fake = torch.cat([ddim_sample(ema, torch.randn(min(256, n - i), *images.shape[1:], generator=eg).to(device),
                                  alpha_bar, args.sample_steps, args.pred, autocast).cpu() for i in range(0, n, 256)])
    noise = torch.randn(n, *images.shape[1:], generator=eg).clamp(-1, 1)
    (f_a, c_a), (f_b, _), (f_g, c_g), (f_n, _) = (features_and_classes(clf, x, device) for x in (  # the floor: two
        to_unit(images[held[:n]]), to_unit(images[held[n:2 * n]]), fake, noise))  # held-out halves, n each
    print(f"\nquality ({n} samples, DDIM {args.sample_steps} steps; classifier accuracy on held-out real "
          f"{(c_a == labels[held[:n]]).float().mean().item():.1%}; {time.time() - t1:.0f} s):")
    for name, f in (("FD(samples, real)", f_g), ("FD(real, real) floor", f_b), ("FD(noise, real) ceiling", f_n)):
        print(f"  {name:23}{frechet_distance(f, f_a):8.2f}")
    for name, c in (("samples:", c_g), ("real:   ", c_a)):
        print(f"  classes of {name} " + ", ".join(
            f"{k} {h}" for k, h in zip(classes, torch.bincount(c, minlength=len(classes)).tolist())))

def main(argv=None):
    args = parse_args(argv)
    args.rank, args.world, device, bf16 = setup_device(args.device, args.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    images, labels, classes = load_dataset(args.dataset, args.data_dir, args.image_size, args.seed, args.n_shapes)
    if len(images) < 2:
        fail(f"{args.dataset} has {len(images)} image(s); training needs at least 2")
    n_hold = min(len(images) // 5, 2000)  # held out: the real images the quality metric compares against
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    held, train_idx, args.channels = perm[:n_hold], perm[n_hold:], images.shape[1]
    images = images.pin_memory() if device.type == "cuda" else images  # host-to-device copies then overlap compute
    state = start_state(args, device)
    alpha_bar = alpha_bar_of(cosine_betas(args.T) if args.schedule == "cosine" else linear_betas(args.T)).to(device)
    net = torch.compile(state["model"]) if args.compile else state["model"]
    if args.world > 1:  # each process trains on its own shard; DDP averages the gradients
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    x_fixed = torch.randn(64, *images.shape[1:], generator=torch.Generator().manual_seed(args.seed + 12345)).to(device)
    if args.rank == 0:
        os.makedirs(args.run_dir, exist_ok=True)
        os.makedirs(args.out, exist_ok=True)
        run_cost(args, state["model"], len(classes), state["step"])
        n_params, precision = sum(p.numel() for p in state["model"].parameters()), "bf16 autocast" if bf16 else "fp32"
        print(f"{args.dataset}: {len(train_idx)} training images {tuple(images.shape[1:])}, {len(classes)} classes | "
              f"UNet {n_params / 1e6:.2f}M params | {device}, {precision}, {args.world} process(es), effective batch "
              f"{args.batch_size * args.world} | pred {args.pred}, {args.schedule} schedule, loss {args.loss_weight}")
    progress = train(args, state, net, images, train_idx[args.rank::args.world], alpha_bar, x_fixed, autocast)
    if args.world > 1:  # DDP keeps the replicas identical: check it, bit for bit
        flat = torch.cat([p.detach().flatten() for p in state["model"].parameters()])
        replicas = [torch.empty_like(flat) for _ in range(args.world)]
        dist.all_gather(replicas, flat)
        dist.destroy_process_group()
        if args.rank > 0:
            return
        print(f"ranks agree on the weights: {all(torch.equal(r, flat) for r in replicas)}")
    save_figures(args, state, progress, to_unit(images[perm[:4]]).to(device), x_fixed, alpha_bar, autocast)
    if args.eval_samples and len(classes) > 1 and n_hold >= 4:  # the floor needs two halves
        quality(args, state["ema"], images, labels, classes, held, train_idx, alpha_bar, autocast)
    print(f"wrote {args.run_dir}/ckpt.pt and 04_samples, 04_progress, 04_loss, 04_x0_pred (.png) to {args.out}/")

def parse_args(argv=None):
    argv = [] if argv is None and "ipykernel" in sys.modules else argv  # Jupyter's sys.argv holds the kernel's flags
    p = Parser(description="Lesson 04: training on images.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="shapes", choices=DATASETS, help="folder: --data-dir holds one sub-folder per class")
    a("--data-dir", default="data", help="where torchvision data is downloaded, or the image folder")
    a("--image-size", type=int, default=32, help="images are resized (and centre-cropped, or padded) to this")
    a("--pred", default="v", choices=["eps", "v", "x0"], help="what the network predicts")
    a("--schedule", default="cosine", choices=["linear", "cosine"], help="noise schedule (lesson 01)")
    a("--loss-weight", default="min-snr", choices=["none", "min-snr"], help="per-t weight of the loss")
    a("--steps", type=int, default=4000, help="total training steps (a resumed run continues up to this number)")
    a("--batch-size", type=int, default=16, help="per process")
    a("--lr", type=float, default=2e-3, help="AdamW learning rate after the warmup")
    a("--resume", nargs="?", const="", default=None, help="continue from this checkpoint (alone: RUN_DIR/ckpt.pt)")
    a("--run-dir", default="runs/04", help="checkpoint folder (with --quick: runs/quick/04)")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 where the device has it")
    a("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    a("--seed", type=int, default=0, help="fixes the data, the weights and every draw")
    a("--out", default="figures", help="folder for the figures (with --quick: runs/quick)")
    a("--quick", action="store_true", help="tiny settings for a smoke test (seconds), written under runs/quick/")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "lr", "image_size"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.image_size % 2 ** (len(CH_MULT) - 1):  # the contract: the UNet halves the image len(CH_MULT) - 1 times
        fail(f"--image-size {args.image_size}: the UNet halves it, so use a multiple of {2 ** (len(CH_MULT) - 1)}")
    vars(args).update(T=T, base_ch=BASE_CH, ch_mult=CH_MULT, warmup=WARMUP, hflip=HFLIP, sample_every=SAMPLE_EVERY,
                      save_every=SAVE_EVERY, sample_steps=SAMPLE_STEPS, eval_samples=EVAL_SAMPLES, clf_steps=CLF_STEPS,
                      n_shapes=N_SHAPES, grad_clip=GRAD_CLIP, ema_gamma=EMA_GAMMA)  # constants: the config records them
    if args.quick:  # tiny settings, and never written over the defaults
        vars(args).update({k: min(getattr(args, k), v) for k, v in QUICK.items()})
        args.out = "runs/quick" if args.out == "figures" else args.out
        args.run_dir = "runs/quick/04" if args.run_dir == "runs/04" else args.run_dir
    args.resume = os.path.join(args.run_dir, "ckpt.pt") if args.resume == "" else args.resume
    return args

# %% Appendix: pieces from earlier lessons
def linear_betas(T):  # DDPM's schedule: beta_t linear from 1e-4 to 0.02, float64 [T] (lesson 01)
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
def cosine_betas(T, s=0.008):  # improved DDPM's: alpha_bar_t = f(t) / f(0), betas clipped at 0.999 (lesson 01)
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)
def alpha_bar_of(betas):  # alpha_bar_t = prod_{s<=t} (1 - beta_s) (lesson 01)
    return torch.cumprod(1 - betas, dim=0)
def q_sample(x0, t, alpha_bar, noise):  # x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (lesson 01)
    ab = alpha_bar.to(x0.device)[t].to(x0.dtype).view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

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
    rgb = np.array([COLORS[c] for c in color_names], dtype=np.float32)  # [6, 3]
    masks, captions = np.empty((n, size, size), dtype=np.float32), []
    for i in range(n):
        kind, r, a = SHAPES[shape_i[i]], SIZES[size_names[size_i[i]]] * scale[i] * big, angle[i]
        col, row = pos_i[i] % 3, pos_i[i] // 3  # centre in one of a 3x3 grid of cells inside [r, big - r]
        cx, cy = (r + (c + 0.5 + jitter[i, k]) / 3 * (big - 2 * r) for k, c in enumerate((col, row)))
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
            pts = [(q, a + 2 * math.pi * j / len(radii)) for j, q in enumerate(radii)]
            ImageDraw.Draw(img).polygon([(cx + q * math.cos(b), cy + q * math.sin(b)) for q, b in pts], fill=255)
        masks[i] = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255
        captions.append(f"a {size_names[size_i[i]]} {color_names[color_i[i]]} {kind} "
                        f"{'in the' if pos_i[i] == 4 else 'at the'} {POSITIONS[pos_i[i]]}")
    images = masks[:, None] * rgb[color_i][:, :, None, None]  # [n, 1, H, W] * [n, 3, 1, 1] -> [n, 3, H, W]
    return torch.from_numpy(np.rint(images).astype(np.uint8)), torch.from_numpy(shape_i.astype(np.int64)), captions

def to_unit(images):  # uint8 [0, 255] -> float [-1, 1], the range diffusion models are trained in (lesson 01)
    return images.float() / 127.5 - 1
def to_uint8(x):  # float [-1, 1] -> uint8 [0, 255], values outside clipped (lesson 01)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

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

class UNet(nn.Module):  # the denoiser (x_t, t) -> eps, v or x_0, shaped like x_t (lesson 03)
    def __init__(self, in_ch=3, base_ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(2,)):
        super().__init__()
        self.base_ch, emb_dim = base_ch, 4 * base_ch
        self.time_mlp = nn.Sequential(nn.Linear(base_ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_ch, base_ch, 3, padding=1)
        self.down, chans, ch = nn.ModuleList(), [base_ch], base_ch  # chans: every skip's channels, in order
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base_ch * mult, emb_dim, attn=level in attn_levels))
                ch = base_ch * mult
                chans.append(ch)
            if level < len(ch_mult) - 1:  # Downsample, named as lesson 03's: a stride-2 3x3 conv
                self.down.append(nn.Sequential(OrderedDict(conv=nn.Conv2d(ch, ch, 3, stride=2, padding=1))))
                chans.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, attn=True), ResBlock(ch, ch, emb_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + chans.pop(), base_ch * mult, emb_dim, attn=level in attn_levels))
                ch = base_ch * mult
            if level > 0:  # Upsample: nearest x2, then a 3x3 conv
                self.up.append(nn.Sequential(OrderedDict(up=nn.Upsample(scale_factor=2),
                                                         conv=nn.Conv2d(ch, ch, 3, padding=1))))
        self.norm_out, self.conv_out = group_norm(ch), nn.Conv2d(ch, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the untrained net outputs 0 (for an eps target: eps_hat = 0)
        nn.init.zeros_(self.conv_out.bias)

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

def flops(net, *inputs):  # FLOPs of one call, counted by PyTorch: a multiply-add counts 2 (lesson 03)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(*inputs)
    return counter.get_total_flops()

class Parser(argparse.ArgumentParser):  # a user's mistake: one line and exit status 2 (every lesson)
    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

def fail(message):  # one line naming the fix, exit status 2, no traceback (every lesson)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

def pick_device(name):  # auto: cuda, then mps, then cpu; a device that is not there exits 2 (every lesson)
    have = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(k for k, ok in have.items() if ok) if name == "auto" else name
    if not have[name]:
        fail(f"--device {name} was asked for but {name.upper()} is not available; use --device cpu (or auto)")
    return torch.device(name)

def grid(path, x, nrow, title, row_labels=(), col_labels=(), scale=2):  # x in [-1, 1] -> a titled grid, upscaled
    g = torchvision.utils.make_grid(to_uint8(x).cpu(), nrow=nrow, pad_value=255)
    img = Image.fromarray(g.permute(1, 2, 0).numpy())  # [H', W', 3]
    img, f = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST), ImageFont.load_default(14)
    left, top = max((int(f.getlength(s)) + 12 for s in row_labels), default=8), 50 if col_labels else 32
    canvas = Image.new("RGB", (img.width + left + 8, img.height + top + 8), "white")
    canvas.paste(img, (left, top))
    d = ImageDraw.Draw(canvas)
    d.text((canvas.width // 2, 6), title, fill="black", font=ImageFont.load_default(16), anchor="ma")
    for i, s in enumerate(col_labels):  # labels centred over evenly spaced columns and rows
        d.text((left + (i + 0.5) * img.width / len(col_labels), top - 4), s, fill="black", font=f, anchor="md")
    for i, s in enumerate(row_labels):
        d.text((left - 6, top + (i + 0.5) * img.height / len(row_labels)), s, fill="black", font=f, anchor="rm")
    canvas.save(path)

def log_plots(path, ylabel, panels, W=550, H=430):  # panels [(xs, ys, title, xlabel)] side by side, y on a log axis
    img, f = Image.new("RGB", (W * len(panels), H), "white"), ImageFont.load_default(13)
    d = ImageDraw.Draw(img)
    for k, (xs, ys, title, xlabel) in enumerate(panels):
        x0, y0, x1, y1 = k * W + 70, 50, k * W + W - 20, H - 50  # the axes box; y from 0.8 min to 1.25 max
        (xa, xb), (ya, yb) = (min(xs), max(xs)), (min(ys) * 0.8, max(ys) * 1.25)
        px = lambda x: x0 + (x - xa) / ((xb - xa) or 1) * (x1 - x0)
        py = lambda y: y1 - math.log(y / ya) / math.log(yb / ya) * (y1 - y0)
        mag = 10 ** math.floor(math.log10(((xb - xa) or 1) / 5))  # x ticks 1, 2 or 5 times a power of ten apart
        step = min(m * mag for m in (1, 2, 5, 10) if m * mag >= ((xb - xa) or 1) / 5)
        for v in (i * step for i in range(math.ceil(xa / step), math.floor(xb / step + 1e-9) + 1)):
            d.line([(px(v), y0), (px(v), y1 + 4)], fill=(230, 230, 230))
            d.text((px(v), y1 + 6), f"{v:g}", fill="black", font=f, anchor="ma")
        for v in (m * 10.0 ** e for e in range(math.floor(math.log10(ya)), math.ceil(math.log10(yb)) + 1)
                  for m in ((1, 2, 5) if yb / ya > 10 else range(1, 10)) if ya <= m * 10.0 ** e <= yb):
            d.line([(x0 - 4, py(v)), (x1, py(v))], fill=(230, 230, 230))
            d.text((x0 - 6, py(v)), f"{v:g}", fill="black", font=f, anchor="rm")
        d.rectangle((x0, y0, x1, y1), outline="black")
        d.text(((x0 + x1) / 2, y1 + 24), xlabel, fill="black", font=f, anchor="ma")
        d.text((x0 - 4, y0 - 8), ylabel, fill="black", font=f, anchor="ld")
        d.text((k * W + W / 2, 8), title, fill="black", font=ImageFont.load_default(15), anchor="ma")
        pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
        d.line(pts, fill=(31, 119, 180), width=2)
        for u, v in pts if len(pts) <= 30 else ():  # few points: mark each measurement
            d.ellipse((u - 3, v - 3, u + 3, v + 3), fill=(31, 119, 180))
    img.save(path)

if __name__ == "__main__":
    main()
