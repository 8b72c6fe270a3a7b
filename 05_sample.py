"""Lesson 05: sampling. One trained model, many ways to turn noise into images, and which way is best.

What you will learn
-------------------
A trained diffusion model predicts the noise eps in x_t; a *sampler* decides where to evaluate it and
how to step from x_T ~ N(0, I) to x_0. The same network gives bad or good images in 5 or in 1000
evaluations depending on the sampler. We write five, check them against an exact answer, and
measure them on a lesson-04 checkpoint. Notation as in the README: alpha_bar[t] for t = 0..T-1,
x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) is the model's guess of the clean image.

1. DDPM, ancestral sampling (Ho et al. 2020, Algorithm 2). Each step draws from the posterior
   q(x_s | x_t, x0_hat), s the next (smaller) timestep visited:
       x_s = sqrt(ab_s) beta / (1 - ab_t) x0_hat + sqrt(1 - beta) (1 - ab_s) / (1 - ab_t) x_t + sqrt(beta_tilde) z,
       beta = 1 - ab_t / ab_s,   beta_tilde = (1 - ab_s) / (1 - ab_t) beta.
   With all T steps, beta is the training beta_t. With fewer steps (respacing, Nichol & Dhariwal 2021,
   sec. 4) the same formula runs over the kept timesteps: the new betas keep alpha_bar exactly there.
2. DDIM (Song et al. 2021, eq. 12): a family of samplers with the same marginals,
       x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps + sigma z,
       sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s)      (eq. 16).
   eta = 1 is DDPM's posterior step (sigma^2 = beta_tilde); eta = 0 is deterministic: it is Euler's
   method on the probability-flow ODE written in sigma = sqrt((1 - ab) / ab) and y = x / sqrt(ab):
       dy / dsigma = eps(x, t),   so DDIM is first order: error ~ 1 / steps.
3. DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): solve the same ODE in lambda = log(sqrt(ab) /
   sqrt(1 - ab)) (half the log-SNR), where its linear part is exact, with the data prediction x0_hat
   extrapolated linearly from the last two steps (multistep: still one evaluation per step):
       h = lambda_s - lambda_t,  r = h_prev / h,  D = (1 + 1 / (2r)) x0_hat_t - 1 / (2r) x0_hat_prev
       x_s = sqrt(1 - ab_s) / sqrt(1 - ab_t) x_t - sqrt(ab_s) (exp(-h) - 1) D.
   Second order: error ~ 1 / steps^2. Its first step (D = x0_hat) is exactly DDIM.
4. Heun on the sigma ODE (Karras et al. 2022, Algorithm 1): an Euler step, a second evaluation at
   the end of it, and the average slope: second order, two evaluations per step. Its first step,
   out of sigma = 2e4 (the cosine schedule's T-1), stays a plain Euler step: a trapezoid across such
   a range overshoots. (Karras' steps, even in sigma^(1/7), are an option of `timesteps`.)
5. SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5): the same multistep data prediction for the reverse
   SDE, so every step adds fresh noise: e^-h on x_t and (1 - e^-2h) on D in place of the ODE's
   coefficients, plus sqrt(1 - ab_s) sqrt(1 - e^-2h) z. Its first step is DDPM's. On our trained
   model the fresh noise matters: it reaches 1000-step DDPM's quality in 20 NFE where the ODE solvers
   stop short of it (see the README's measurements).

Which timesteps are visited (off-by-one timesteps are the commonest sampler bug). With n steps,
t_i = round(i (T-1) / (n-1)) from t_0 = T-1 down to t_{n-1} = 0 ("time" spacing; "logsnr" and
"karras" space lambda or sigma^(1/7) evenly and round to integer t). The model is evaluated at each
t_i; the step from t_{n-1} = 0 lands on x_0 itself (alpha_bar = 1, sigma = 0), where every sampler
returns x0_hat. So n steps cost n model evaluations (NFE), 2n - 2 for Heun. For T = 1000, n = 5:
    time: 999, 749, 500, 250, 0 -> x_0     (DDPM over all T steps: 999, 998, ..., 1, 0 -> x_0)

Measuring. Exactness: on 2D Gaussian-mixture data the exact eps-model is closed form (each
component N(mu_k, s_k^2 I) becomes N(sqrt(ab) mu_k, (ab s_k^2 + 1 - ab) I) under q, and the score of
the mixture is the responsibility-weighted sum of the components' scores; eps = -sqrt(1 - ab) score),
so each sampler's error against a fine reference solve of the same ODE shows its order. Quality on
images: the Frechet distance on the features of a small classifier trained on the checkpoint's data
(as in lesson 04; real against real at the same sample count is the floor), against NFE.
Also: DDIM determinism, DDIM inversion (image -> x_T by running the ODE backwards -> image) and
spherical interpolation between two noises (slerp keeps |x_T| where a straight line would shrink it).

Run
---
    python 04_train.py                 # first: a checkpoint in runs/04/ckpt.pt
    python 05_sample.py                # all measurements and figures: 2-3 min on a 2-core CPU
    python 05_sample.py --quick        # seconds: a smoke test
    python 05_sample.py --samplers ddpm,dpm++2m,dpm++2m-sde --nfe 10,20 --ddpm-full  # vs 1000-step DDPM: ~9 min
    python 05_sample.py --full         # NFE 5..100 for all, 1000-step DDPM, 1000 samples: a GPU job (hours on a CPU)

The defaults (100 samples per row, NFE 5, 10, 20, 50) are what a CPU affords in 5 minutes: the
table costs 100 x 424 model evaluations, and one 1000-step DDPM row alone would cost 100 x 1000.

It writes figures/05_quality.png, 05_grid.png, 05_exactness.png, 05_determinism.png,
05_inversion.png, 05_interpolation.png and prints the tables.
"""

# %% Setup: imports, command line, device
import argparse
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

FORMAT = "dmfs-04-v1"  # the tag lesson 04 writes into its checkpoints


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
    p = Parser(description="Lesson 05: samplers over a lesson-04 checkpoint, measured.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--ckpt", default="runs/04/ckpt.pt", help="a checkpoint written by 04_train.py")
    a("--samplers", default="ddpm,ddim,dpm++2m,heun,dpm++2m-sde", help="which samplers the quality table compares")
    a("--nfe", default="5,10,20,50", help="model evaluations per image for the quality table")
    a("--ddpm-full", action=argparse.BooleanOptionalAction, default=False,
      help="also DDPM over all T steps (1000 NFE: the slow reference)")
    a("--samples", type=int, default=100, help="images per sampler and NFE for the Frechet distance")
    a("--full", action="store_true",
      help="the complete protocol: NFE 5,10,20,50,100, 1000-step DDPM, 1000 samples (a GPU job)")
    a("--eta", type=float, default=0.0, help="DDIM's eta in the quality table (0 deterministic, 1 DDPM-like)")
    a("--spacing", default="logsnr", choices=["logsnr", "time"], help="DPM-Solver++(2M)'s timesteps")
    a("--clip", action=argparse.BooleanOptionalAction, default=True,
      help="clip x0_hat to [-1, 1] at every step (images only; the data lies there)")
    a("--batch-size", type=int, default=250, help="images per model call")
    a("--data-dir", default="data", help="where the checkpoint's torchvision data or image folder is")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto: bf16 autocast on CUDA and on CPUs with bf16 units, else fp32")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    a("--seed", type=int, default=0, help="fixes every starting noise and every draw")
    a("--out", default="figures", help="folder for the figures")
    a("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    args = p.parse_args(argv)
    try:
        args.nfe = sorted({int(n) for n in args.nfe.split(",")})
    except ValueError:
        fail(f"--nfe must be integers separated by commas, like 5,10,20 (got {args.nfe!r})")
    args.samplers = args.samplers.split(",")
    unknown = [s for s in args.samplers if s not in SAMPLERS]
    if unknown:
        fail(f"unknown sampler {unknown[0]!r}; choose from {', '.join(SAMPLERS)}")
    if args.full:
        args.nfe, args.ddpm_full, args.samples = sorted(set(args.nfe) | {5, 10, 20, 50, 100}), True, 1000
    if args.quick:
        args.nfe, args.samples, args.ddpm_full = [2, 4], 16, False
    if min(args.nfe) < 2 or args.samples < 2 or args.batch_size < 1 or not 0 <= args.eta <= 1:
        fail("--nfe values must be >= 2, --samples >= 2, --batch-size >= 1 and --eta in [0, 1]")
    return args


# %% Noise schedules (as in lessons 01 and 04)
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


# %% The shapes dataset, and the other data sets a checkpoint may name (as in lesson 04)
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
        fail(f"could not load {name} ({type(e).__name__}); download it by hand into "
             f"{os.path.join(data_dir, cls.__name__)} (torchvision's layout) or pass --data-dir")
    data = torch.as_tensor(np.asarray(ds.data))  # MNIST: [N, 28, 28]; CIFAR-10: [N, 32, 32, 3]
    data = data[:, None] if data.dim() == 3 else data.permute(0, 3, 1, 2)
    if data.shape[-1] != size:  # 28x28 digits are padded with background to 32 (or resized otherwise)
        pad = (size - data.shape[-1]) // 2
        if 0 < pad and 2 * pad + data.shape[-1] == size:
            data = F.pad(data, (pad, pad, pad, pad))
        else:
            data = F.interpolate(data.float(), size=(size, size), mode="bilinear", antialias=True).round().byte()
    return data, torch.as_tensor(np.asarray(ds.targets)), list(ds.classes)


# %% The UNet (as in lessons 03 and 04), and the checkpoint it is loaded from
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


def to_eps_x0(pred, out, x_t, ab):
    """Turn the network's output into (eps_hat, x0_hat), whatever it predicts."""
    if pred == "eps":
        return out, (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    if pred == "x0":
        return (x_t - ab.sqrt() * out) / (1 - ab).sqrt(), out
    return (1 - ab).sqrt() * x_t + ab.sqrt() * out, ab.sqrt() * x_t - (1 - ab).sqrt() * out  # from v


def load_model(path, device, autocast):
    """A 04 checkpoint -> (model(x, t) -> eps with the EMA weights, alpha_bar float64 [T], config)."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train one first with python 04_train.py (or pass --ckpt PATH)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); pass a file written by 04_train.py")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        fail(f"{path} was not written by 04_train.py (format tag "
             f"{ckpt.get('format') if isinstance(ckpt, dict) else '?'!r}, expected {FORMAT!r}); pass a 04 checkpoint")
    cfg = ckpt["config"]
    net = UNet(in_ch=cfg["channels"], base_ch=cfg["base_ch"], ch_mult=tuple(cfg["ch_mult"]))
    net.load_state_dict(ckpt["ema"])  # the EMA weights: the raw weights give visibly worse samples
    net = net.to(device).eval().requires_grad_(False)
    betas = cosine_betas(cfg["T"]) if cfg["schedule"] == "cosine" else linear_betas(cfg["T"])
    alpha_bar = alpha_bar_of(betas)  # the sampler's T and schedule must be the training ones

    def model(x, t):
        with autocast():
            out = net(x, t).float()
        ab = alpha_bar.to(x.device)[t].float().view(-1, 1, 1, 1)
        return to_eps_x0(cfg["pred"], out, x, ab)[0]  # v or x0 networks are turned into eps
    return model, alpha_bar, cfg, ckpt["step"]


# %% Which timesteps a sampler visits
def timesteps(alpha_bar, n, spacing="time"):
    """n distinct integer timesteps from T-1 down to 0, as a list.

    "time": evenly spaced in t. "logsnr": evenly spaced in lambda = log(sqrt(ab) / sqrt(1 - ab)).
    "karras": evenly spaced in sigma^(1/7), sigma = sqrt((1 - ab) / ab) (Karras et al. 2022, eq. 5).
    Targets are mapped to (fractional) t through the schedule, rounded, and nudged apart where
    rounding makes two equal, so n steps always cost n evaluations. The cosine schedule clips its
    last beta at 0.999, which throws lambda(T-1) far below lambda(T-2) (-9.9 against -6.5): spacing
    from there would spend steps on pure noise, so the spaced range runs from T-2 (both are noise),
    and the first step still starts at T-1.
    """
    T = len(alpha_bar)
    if not 1 <= n <= T:
        raise ValueError(f"steps must be in [1, T={T}] (got {n}): the model only knows t = 0..T-1")
    if n == 1:
        return [T - 1]
    lam = (0.5 * (alpha_bar / (1 - alpha_bar)).log()).numpy()  # decreasing in t
    if spacing == "time":
        t = np.linspace(T - 1, 0, n)
    else:
        if spacing == "logsnr":
            targets = np.linspace(lam[-2], lam[0], n)
        elif spacing == "karras":  # sigma = exp(-lambda)
            s_max, s_min = math.exp(-lam[-2]) ** (1 / 7), math.exp(-lam[0]) ** (1 / 7)
            targets = -7 * np.log(np.linspace(s_max, s_min, n))
        else:
            raise ValueError(f"unknown spacing {spacing!r}")
        t = np.interp(targets, lam[::-1], np.arange(T - 1, -1, -1.0))  # lambda -> t (np.interp wants increasing)
    ts = [int(v) for v in np.rint(t)]
    ts[0], ts[-1] = T - 1, 0
    for i in range(n - 2, 0, -1):  # strictly decreasing: first push repeats at the low end up...
        ts[i] = max(ts[i], ts[i + 1] + 1)
    for i in range(1, n - 1):  # ...then any that went past the one before back down
        ts[i] = min(ts[i], ts[i - 1] - 1)
    return ts


def respaced_betas(alpha_bar, kept):
    """Betas of the shorter chain that visits only the timesteps `kept` (increasing), improved DDPM
    sec. 4: beta_i = 1 - ab[kept_i] / ab[kept_{i-1}] (ab = 1 before the first), so that
    cumprod(1 - beta) equals alpha_bar at every kept timestep. float64 [len(kept)]."""
    ab = alpha_bar[list(kept)]
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    return 1 - ab / ab_prev


def denoise(model, x, t, alpha_bar, clip=False):
    """(eps_hat, x0_hat) at integer timestep t. With clip, x0_hat is clamped to the data range [-1, 1]
    and eps recomputed from it, so the two stay consistent with x_t (x_t = sqrt(ab) x0 + sqrt(1-ab) eps)."""
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
def ddpm(model, x_T, alpha_bar, steps, clip=False, generator=None):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) over `steps` timesteps (all T: 999, ..., 0;
    fewer: respaced, as in improved DDPM). Each step draws x_s ~ q(x_s | x_t, x0_hat)."""
    ts = timesteps(alpha_bar, steps)  # T-1, ..., 0
    betas = respaced_betas(alpha_bar, ts[::-1]).flip(0).tolist()  # betas[i] noises t_{i+1} (x_0 for the last) up to t_i
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
def ddim(model, x_T, alpha_bar, steps, eta=0.0, clip=False, generator=None):
    """DDIM (Song et al. 2021, eq. 12 with sigma from eq. 16) over timesteps T-1, ..., 0, then x_0."""
    ts = timesteps(alpha_bar, steps)
    x = x_T
    for i, t in enumerate(ts):
        eps, x0 = denoise(model, x, t, alpha_bar, clip)
        if i + 1 == len(ts):
            return x0  # ab_s = 1: x_0 = x0_hat
        ab, ab_s = alpha_bar[t].item(), alpha_bar[ts[i + 1]].item()
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab) * (1 - ab / ab_s))
        x = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s - sigma ** 2) * eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)


@torch.no_grad()
def dpmpp_2m(model, x_T, alpha_bar, steps, spacing="logsnr", clip=False, sde=False, generator=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) over timesteps T-1, ..., 0 (spaced by `spacing`),
    then x_0. The first step is first order (DDIM); the last one, to sigma = 0, returns x0_hat.
    With sde=True each step solves the reverse SDE instead (see dpmpp_2m_sde)."""
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
        else:  # linear extrapolation of x0_hat in lambda, from the last two steps
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
    """Heun's method on dy/dsigma = eps (Karras et al. 2022, Algorithm 1, deterministic), with
    y = x / sqrt(ab), sigma = sqrt((1 - ab) / ab), over timesteps T-1, ..., 0, then x_0 (an Euler
    step to sigma = 0). The first step, from sigma = 2e4 (cosine schedule), is an Euler step too:
    a trapezoid over such a range averages two very different slopes and overshoots by thousands.
    2 steps - 2 evaluations."""
    ts = timesteps(alpha_bar, steps, spacing)
    sig = lambda t: math.sqrt((1 - alpha_bar[t].item()) / alpha_bar[t].item())
    y = x_T / math.sqrt(alpha_bar[ts[0]].item())  # y = x0 + sigma eps: the variance-exploding view
    for i, t in enumerate(ts):
        eps, x0 = denoise(model, y * math.sqrt(alpha_bar[t].item()), t, alpha_bar, clip)
        if i + 1 == len(ts):
            return x0  # y - sigma eps: Euler to sigma = 0
        s = ts[i + 1]
        y_euler = y + (sig(s) - sig(t)) * eps
        if i == 0:  # from pure noise an Euler (DDIM) step is already exact: eps barely changes there
            y = y_euler
            continue
        eps_s, _ = denoise(model, y_euler * math.sqrt(alpha_bar[s].item()), s, alpha_bar, clip)
        y = y + (sig(s) - sig(t)) * (eps + eps_s) / 2  # the average of the slopes at both ends


def dpmpp_2m_sde(model, x_T, alpha_bar, steps, spacing="logsnr", clip=False, generator=None):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5 and appendix): the same multistep data prediction,
    but each step solves the reverse SDE instead of the ODE, so it adds fresh noise:
        x_s = sqrt(1-ab_s)/sqrt(1-ab_t) e^-h x_t + sqrt(ab_s) (1 - e^-2h) D + sqrt(1-ab_s) sqrt(1 - e^-2h) z.
    Its first step (D = x0_hat) is exactly DDPM's posterior step (DDIM with eta = 1). The noise
    corrects part of the model's error as it goes, as ancestral DDPM's does (Karras et al. 2022, sec. 4)."""
    return dpmpp_2m(model, x_T, alpha_bar, steps, spacing, clip, sde=True, generator=generator)


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpm++2m": dpmpp_2m, "heun": heun, "dpm++2m-sde": dpmpp_2m_sde}


def steps_for(name, nfe):
    """Steps that cost at most `nfe` model evaluations (Heun: two per step but the first and last)."""
    return nfe // 2 + 1 if name == "heun" else nfe


def nfe_of(name, steps):
    return 2 * steps - 2 if name == "heun" else steps


@torch.no_grad()
def ddim_invert(model, x0, alpha_bar, steps):
    """Deterministic DDIM run backwards: image -> x_T. Visits 0, ..., T-1 (the sampler's timesteps
    reversed); x at t = 0 is taken to be the image (ab[0] is 1 - 4e-5 for the cosine schedule), and each
    step uses eps at its start, where the sampler would use it at its end: the small mismatch is
    the reconstruction error."""
    ts = timesteps(alpha_bar, steps)[::-1]
    x = x0
    for t, s in zip(ts[:-1], ts[1:]):
        eps, x0_hat = denoise(model, x, t, alpha_bar)
        ab_s = alpha_bar[s].item()
        x = math.sqrt(ab_s) * x0_hat + math.sqrt(1 - ab_s) * eps
    return x


def slerp(z0, z1, a):
    """Spherical interpolation: along the great circle between z0 and z1 (angle theta), so |z| stays
    near sqrt(dim) as Gaussian noise needs; the straight line would shrink it by up to cos(theta/2)."""
    theta = torch.acos((z0 * z1).sum() / (z0.norm() * z1.norm()))
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)


# %% The exact answer: 2D Gaussian-mixture data, whose eps-model is closed form
def mixture(k=3, radius=0.8, std=0.4):
    """Means on a circle, equal weights, one std: (means [k, 2], stds [k], weights [k]), float64."""
    ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return torch.stack([radius * ang.cos(), radius * ang.sin()], 1), torch.full((k,), std, dtype=torch.float64), \
        torch.full((k,), 1 / k, dtype=torch.float64)


def mixture_eps_model(means, stds, weights, alpha_bar):
    """model(x [B, D], t [B]) -> the exact eps = -sqrt(1 - ab) * score of q(x_t).

    Under q, component k becomes N(sqrt(ab) mu_k, v_k I) with v_k = ab s_k^2 + 1 - ab; the mixture's
    score is sum_k r_k(x) * -(x - sqrt(ab) mu_k) / v_k, with r_k the posterior weight of component k.
    """
    def model(x, t):
        ab = alpha_bar.to(x.device, x.dtype)[t][:, None]  # [B, 1]
        diff = x[:, None, :] - ab.sqrt()[:, :, None] * means[None]  # [B, K, D]
        var = ab * stds[None] ** 2 + 1 - ab  # [B, K]
        logp = weights.log()[None] - 0.5 * x.shape[1] * var.log() - 0.5 * diff.square().sum(2) / var
        r = torch.softmax(logp, dim=1)  # [B, K]
        score = -(r[:, :, None] * diff / var[:, :, None]).sum(1)  # [B, D]
        return -(1 - ab).sqrt() * score
    return model


def sample_mixture(means, stds, weights, n, generator):
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    return means[k] + stds[k, None] * torch.randn(n, means.shape[1], generator=generator, dtype=means.dtype)


# %% The quality metric (as in lesson 04): a small classifier's features and the Frechet distance
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


# %% Figure helpers (as in lesson 04)
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


def plot_lines(d, box, series, title, xlabel, ylabel, xlim, ylim, logx=False, logy=False, legend="tr"):
    """series: (label, xs, ys, colour, dashed). Lines with dot markers (dashed: no markers, a floor
    or a guide); on log axes extra ticks at 2 and 5 times each power of ten; legend top-right ("tr")
    or bottom-left ("bl") or right of the box ("out")."""
    to_px = plot_axes(d, box, xlim, ylim, xlabel, ylabel, title, logx, logy)
    f = font(13)
    for axis, on, (lo, hi) in ((0, logx, xlim), (1, logy, ylim)):
        for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) if on else []:
            for v in (2 * 10 ** e, 5 * 10 ** e):
                if lo <= v <= hi:
                    px, py = to_px(v if axis == 0 else xlim[0], v if axis == 1 else ylim[0])
                    if axis == 0:
                        d.line([(px, box[3]), (px, box[3] + 4)], fill="black")
                        d.text((px, box[3] + 6), fmt(v), fill="black", font=f, anchor="ma")
                    else:
                        d.line([(box[0] - 4, py), (box[0], py)], fill="black")
                        d.text((box[0] - 6, py), fmt(v), fill="black", font=f, anchor="rm")
    for k, (label, xs, ys, color, dashed) in enumerate(series):
        pts = [to_px(x, min(max(y, ylim[0]), ylim[1])) for x, y in zip(xs, ys)]
        for (xa, ya), (xb, yb) in zip(pts[:-1], pts[1:]):
            if dashed:  # 12 dashes per segment
                for j in range(0, 12, 2):
                    d.line([(xa + (xb - xa) * j / 12, ya + (yb - ya) * j / 12),
                            (xa + (xb - xa) * (j + 1) / 12, ya + (yb - ya) * (j + 1) / 12)], fill=color, width=2)
            else:
                d.line([(xa, ya), (xb, yb)], fill=color, width=2)
        for px, py in ([] if dashed else pts):
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        x0 = {"tr": box[2] - 215, "bl": box[0] + 12, "out": box[2] + 15}[legend]
        y = box[3] - 12 - 18 * (len(series) - 1 - k) if legend == "bl" else box[1] + 12 + 18 * k
        d.line([(x0, y), (x0 + 25, y)], fill=color, width=3)
        d.text((x0 + 30, y), label, fill="black", font=f, anchor="lm")


# %% Experiment 1: exactness on the Gaussian mixture (order of convergence)
def exactness(out, quick, seed):
    alpha_bar = alpha_bar_of(cosine_betas(1000))
    model = mixture_eps_model(*mixture(), alpha_bar)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(200 if quick else 2000, 2, generator=g, dtype=torch.float64)
    t0 = time.time()
    ref = dpmpp_2m(model, x_T, alpha_bar, 1000, spacing="time")  # the finest grid the model's t allows
    ref_heun = heun(model, x_T, alpha_bar, 1000, spacing="time")
    steps = [5, 10, 20, 50] if quick else [5, 10, 20, 50, 100, 200]
    runs = {"DDIM (eta=0)": lambda n: ddim(model, x_T, alpha_bar, n),
            "DPM-Solver++(2M), logSNR": lambda n: dpmpp_2m(model, x_T, alpha_bar, n),
            "DPM-Solver++(2M), time": lambda n: dpmpp_2m(model, x_T, alpha_bar, n, spacing="time"),
            "Heun (time)": lambda n: heun(model, x_T, alpha_bar, steps_for("heun", n))}
    errors = {name: [(fn(n) - ref).norm(dim=1).mean().item() for n in steps] for name, fn in runs.items()}
    nfes = {name: [nfe_of("heun", steps_for("heun", n)) if "Heun" in name else n for n in steps] for name in runs}
    print(f"\nexactness on 2D mixture data ({len(x_T)} paths; mean distance to the reference solve, "
          f"DPM-Solver++(2M) on all 1000 timesteps; Heun on all 1000 is {(ref_heun - ref).norm(dim=1).mean():.1e} "
          f"from it; {time.time() - t0:.0f} s)")
    print(f"  {'sampler (NFE ->)':26s}" + "".join(f"{n:9d}" for n in steps) + "   order (fit from NFE 10)")
    for name, errs in errors.items():
        order = -np.polyfit(np.log(nfes[name][1:]), np.log(errs[1:]), 1)[0]  # slope of log error vs log NFE
        print(f"  {name:26s}" + "".join(f"{e:9.1e}" for e in errs) + f"   {order:5.2f}")
    img = Image.new("RGB", (760, 520), "white")
    d = ImageDraw.Draw(img)
    c1, c2 = 0.4 * errors["DDIM (eta=0)"][0] * steps[0], 0.4 * errors["DPM-Solver++(2M), logSNR"][1] * steps[1] ** 2
    series = [(name, nfes[name], errs, PALETTE[k], False) for k, (name, errs) in enumerate(errors.items())]
    series += [("slope -1 (first order)", steps, [c1 / n for n in steps], (150, 150, 150), True),
               ("slope -2 (second order)", steps, [c2 / n ** 2 for n in steps], (90, 90, 90), True)]
    ys, xs = [y for s in series for y in s[2]], [x for s in series for x in s[1]]
    plot_lines(d, (90, 70, 730, 450), series, "error against a reference ODE solve (exact eps, 2D mixture)",
               "model evaluations (NFE)", "mean |x_0 - x_0_ref| (log)", (min(xs) * 0.9, max(xs) * 1.1),
               (min(ys) / 1.5, max(ys) * 2), logx=True, logy=True)
    img.save(os.path.join(out, "05_exactness.png"))
    return errors


# %% Experiment 2: quality against NFE on images, with the Frechet distance
def real_images(cfg, args):
    """The checkpoint's data, split as lesson 04 splits it: (train images, labels, held-out images, labels,
    class names)."""
    images, labels, classes = load_dataset(cfg["dataset"], args.data_dir, cfg["image_size"], cfg["seed"],
                                           n_shapes=2000 if cfg.get("quick") else 10_000)
    n_hold = min(len(images) // 5, 2000)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg["seed"]))
    return images[perm[n_hold:]], labels[perm[n_hold:]], images[perm[:n_hold]], labels[perm[:n_hold]], classes


def run_sampler(name, model, x_T, alpha_bar, steps, args, seed, device):
    """Sample in batches; returns (x_0 on the CPU, model evaluations per image, seconds)."""
    calls = [0]

    def counted(x, t):
        calls[0] += 1
        return model(x, t)
    opts = {"clip": args.clip}
    if name in ("ddpm", "ddim", "dpm++2m-sde"):
        opts["generator"] = torch.Generator().manual_seed(seed)  # the same noise draws for every run
    if name == "ddim":
        opts["eta"] = args.eta
    if name.startswith("dpm++2m"):
        opts["spacing"] = args.spacing
    t0, outs, batches = time.time(), [], 0
    for i in range(0, len(x_T), args.batch_size):
        outs.append(SAMPLERS[name](counted, x_T[i:i + args.batch_size].to(device), alpha_bar, steps, **opts).cpu())
        batches += 1
    return torch.cat(outs), calls[0] // batches, time.time() - t0


def quality(args, model, alpha_bar, cfg, device):
    train, labels, held, labels_held, classes = real_images(cfg, args)
    n = min(args.samples, len(held), len(train))
    t0 = time.time()
    clf = train_classifier(train, labels, len(classes), device, 20 if args.quick else 400, cfg["seed"])  # as in 04
    f_real, c_real = features_and_classes(clf, to_unit(held[:n]), device)
    f_real_b, _ = features_and_classes(clf, to_unit(train[:n]), device)
    floor = frechet_distance(f_real_b, f_real)
    acc = (c_real == labels_held[:n]).float().mean().item()
    print(f"\nquality: Frechet distance to {n} held-out real images on a {len(classes)}-class classifier's "
          f"features (classifier: {acc:.0%} accurate on them, trained in {time.time() - t0:.0f} s); "
          f"floor FD(real, real) at {n} = {floor:.2f}")
    x_T = torch.randn(n, cfg["channels"], cfg["image_size"], cfg["image_size"],
                      generator=torch.Generator().manual_seed(args.seed))  # the same noise for every run
    rows = []
    print(f"  {'sampler':11s} {'NFE':>5s} {'FD':>8s} {'images/s':>9s}")
    for name in args.samplers:
        nfes = args.nfe + ([len(alpha_bar)] if name == "ddpm" and args.ddpm_full else [])
        for nfe in nfes:
            x0, used, secs = run_sampler(name, model, x_T, alpha_bar, steps_for(name, nfe), args, args.seed + 1, device)
            x0 = x0.clamp(-1, 1)  # what a saved image holds, clipped or not while sampling
            fd = frechet_distance(features_and_classes(clf, x0, device)[0], f_real)
            rows.append((name, used, fd, n / secs, x0[:8]))
            print(f"  {name:11s} {used:5d} {fd:8.2f} {n / secs:9.1f}", flush=True)
    return rows, floor, n


def save_quality_figures(out, rows, floor, n, args):
    img = Image.new("RGB", (900, 520), "white")
    d = ImageDraw.Draw(img)
    names = list(dict.fromkeys(r[0] for r in rows))
    series = [(f"{name}" + (f" (eta={args.eta:g})" if name == "ddim" else ""),
               [r[1] for r in rows if r[0] == name], [r[2] for r in rows if r[0] == name],
               PALETTE[list(SAMPLERS).index(name)], False) for name in names]
    xs = [r[1] for r in rows]
    series.append(("floor: real vs real", [min(xs), max(xs)], [floor, floor], (120, 120, 120), True))
    ys = [r[2] for r in rows] + [floor]
    plot_lines(d, (90, 70, 680, 450), series, f"sample quality against model evaluations ({n} samples each)",
               "model evaluations per image (NFE, log scale)", "Frechet distance (lower is better, log)",
               (min(xs) * 0.9, max(xs) * 1.1), (max(min(ys) * 0.7, 1e-3), max(ys) * 1.4), logx=True, logy=True,
               legend="out")
    img.save(os.path.join(out, "05_quality.png"))
    grid = grid_image(to_uint8(torch.cat([r[4] for r in rows])), nrow=8, scale=2)
    labelled(grid, "the same 8 starting noises through every sampler and NFE",
             row_labels=[f"{r[0]}, NFE {r[1]}" for r in rows]).save(os.path.join(out, "05_grid.png"))


# %% Experiment 3: DDIM determinism, inversion and interpolation
def determinism(out, model, alpha_bar, cfg, args, device):
    shape = (6, cfg["channels"], cfg["image_size"], cfg["image_size"])
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 2)).to(device)
    rows, labels = [], []
    for n in ([2, 4] if args.quick else [10, 20, 50, 100]):
        rows.append(ddim(model, x_T, alpha_bar, n, clip=args.clip).cpu())
        labels.append(f"DDIM {n} steps")
    for s in (1, 2):
        n = 4 if args.quick else 50
        rows.append(ddpm(model, x_T, alpha_bar, n, clip=args.clip, generator=torch.Generator().manual_seed(s)).cpu())
        labels.append(f"DDPM {n}, draws #{s}")
    labelled(grid_image(to_uint8(torch.cat(rows)), nrow=6, scale=2),
             "one x_T per column: DDIM keeps its image, DDPM draws a new one",
             row_labels=labels).save(os.path.join(out, "05_determinism.png"))


def inversion(out, model, alpha_bar, cfg, args, device):
    """Round trips to three depths. The cosine schedule keeps sqrt(ab) = 5e-5 of the image at T-1:
    decoding from there divides the network's eps error by that, so only shallower trips come back."""
    held = real_images(cfg, args)[2]
    x = to_unit(held[:6]).to(device)
    print("\nDDIM inversion: image -> x_t_end (ODE backwards) -> image (ODE forwards), no clipping")
    print(f"  {'t_end':>5s} {'sqrt(ab)':>9s} {'steps':>5s} {'RMSE':>10s} {'PSNR dB':>8s} {'std of x_t_end':>15s}")
    shown = {}
    T = len(alpha_bar)
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
    title = f"DDIM inversion, {n} steps each way: image -> noise -> image"
    labelled(grid_image(to_uint8(rows), nrow=6, scale=2), title,
             row_labels=["real image", f"x_t at t={T - 51} (/3)", f"back from t={T - 51}", f"back from t={T - 11}",
                         f"back from t={T - 1}"]).save(os.path.join(out, "05_inversion.png"))


def interpolation(out, model, alpha_bar, cfg, args, device):
    shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])
    g = torch.Generator().manual_seed(args.seed + 3)
    a = torch.linspace(0, 1, 9)
    rows, labels = [], []
    for pair in range(2):
        z0, z1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        for kind in ("slerp", "lerp"):
            zs = torch.stack([slerp(z0, z1, w) if kind == "slerp" else (1 - w) * z0 + w * z1 for w in a])
            rows.append(dpmpp_2m(model, zs.to(device), alpha_bar, 4 if args.quick else 20, clip=args.clip).cpu())
            labels.append(f"pair {pair + 1}, {kind}")
            if pair == 0:
                print(f"  {kind}: |z| / sqrt(dim) at the midpoint = {zs[4].norm() / math.sqrt(z0.numel()):.3f}")
    labelled(grid_image(to_uint8(torch.cat(rows)), nrow=9, scale=2),
             "from x_T(a) = slerp or lerp between two noises, a = 0 ... 1 (DPM-Solver++(2M))", row_labels=labels,
             col_labels=[f"a={w:.3g}" for w in a.tolist()]).save(os.path.join(out, "05_interpolation.png"))


# %% Main
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_supported(device))
    if use_bf16 and not bf16_supported(device):
        fail(f"--precision bf16 is not supported on this {device.type}; use --precision fp32")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    model, alpha_bar, cfg, step = load_model(args.ckpt, device, autocast)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    print(f"{args.ckpt}: step {step}, {cfg['dataset']} {cfg['image_size']}px, pred {cfg['pred']}, "
          f"{cfg['schedule']} schedule, T={len(alpha_bar)} | {device}, {'bf16 autocast' if use_bf16 else 'fp32'}")
    print(f"timesteps visited with 5 steps, T = {len(alpha_bar)}:")
    for spacing in ("time", "logsnr", "karras"):
        print(f"  {spacing:7s} {timesteps(alpha_bar, 5, spacing)} -> x_0")
    exactness(args.out, args.quick, args.seed)
    rows, floor, n = quality(args, model, alpha_bar, cfg, device)
    save_quality_figures(args.out, rows, floor, n, args)
    determinism(args.out, model, alpha_bar, cfg, args, device)
    inversion(args.out, model, alpha_bar, cfg, args, device)
    print("\nslerp against lerp between two noises:")
    interpolation(args.out, model, alpha_bar, cfg, args, device)
    print(f"\nwrote 05_quality.png, 05_grid.png, 05_exactness.png, 05_determinism.png, 05_inversion.png, "
          f"05_interpolation.png to {args.out}/ in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
