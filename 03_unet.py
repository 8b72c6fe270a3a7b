"""Lesson 03: the UNet, the network that predicts the noise, built up piece by piece.

An image denoiser maps (x_t, t) to a prediction of eps of the same shape; it must see fine detail and
the whole picture, and be told how noisy its input is. The UNet (Ronneberger et al. 2015, as Ho et al.
2020 use it, appendix B) does this: an encoder halves the resolution level by level so 3x3 convs see
ever more of the image, a middle works on the coarsest map, and a decoder doubles it back, taking the
encoder's map of the same size through a skip connection. The pieces, one cell each:

1. Timestep embedding (Vaswani et al. 2017): emb(t) = [sin(t w_k), cos(t w_k)], w_k = 10000^(-k / (d/2)),
   k = 0..d/2-1; then Linear, SiLU, Linear make the 4*base_ch-dim vector every block receives.
2. Residual block, told t by a per-channel scale and shift (Dhariwal & Nichol 2021):
       h = conv3x3(SiLU(GN(x))),  h = GN(h) * (1 + scale(t)) + shift(t),  out = skip(x) + conv3x3(SiLU(h))
3. Self-attention over the H*W pixels, softmax(Q K^T / sqrt(d)) V per head: every pixel sees every
   other, at a cost of (H*W)^2, so only at the coarse levels (8x8 for 32x32 images).
4. Downsampling, a stride-2 3x3 conv; upsampling, nearest x2 then a 3x3 conv.
5. The UNet: level l works at H / 2^l with base_ch * ch_mult[l] channels, num_res_blocks blocks down and
   one more up (it takes the skip saved after downsampling), attention at attn_levels and in the middle.
   Its output conv starts at zero, so the untrained net predicts eps = 0 (loss E[eps^2] = 1).
Then a shape trace with every block's parameters, the receptive field (the gradient of one output pixel
with respect to the input), overfitting one fixed batch (the first test of any new network), and with
`--bench` the course's speed lesson: FLOPs, images/s and GFLOP/s, fp32 vs bf16, NCHW vs channels_last.

    python 03_unet.py          # < 1 min on a 2-core CPU: figures/03_{time_embedding,receptive_field,overfit}.png
    python 03_unet.py --quick  # seconds; the same under runs/quick/ (the tests use it)
    python 03_unet.py --bench  # speed of the default UNet (--bench --quick: a smoke test)
"""
import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

FIGURES = ("03_time_embedding.png", "03_receptive_field.png", "03_overfit.png")
T = 1000  # diffusion timesteps
BATCH = 8  # images in the fixed batch that the overfitting demo memorises
BENCH_BATCH, BENCH_ITERS = 64, 5  # --bench: images per step, timed steps per row (median)


# %% Sinusoidal timestep embedding
def timestep_embedding(t, dim):
    """t int64 [B] -> float [B, dim] in [-1, 1]: nearby t get nearby vectors, every t a distinct one."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, dim]


def group_norm(ch):
    return nn.GroupNorm(math.gcd(32, ch), ch)  # 32 groups where the channels allow


# %% Residual block with time-conditioned scale and shift
class ResBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H, W): the block of item 2, then optional self-attention."""
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
    """eps_theta(x_t, t): (B, in_ch, H, W), int64 [B] -> (B, out_ch, H, W), with the levels of item 5."""
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
        for block in self.up:  # a ResBlock takes the skip of the same resolution, concatenated on channels
            h = block(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(block, ResBlock) else block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# %% Looking inside: a shape trace and the parameters of every block
def shape_trace(model, x, t):
    """Rows (name as in the state_dict, kind, input shape, output shape, parameters), one per top-level block."""
    rows, handles = [], []
    for name, part in model.named_children():
        for i, b in enumerate(part) if isinstance(part, nn.ModuleList) else [(None, part)]:
            row = (name if i is None else f"{name}.{i}",
                   type(b).__name__ + ("+attention" if isinstance(getattr(b, "attn", None), Attention) else ""))
            handles.append(b.register_forward_hook(lambda m, inp, out, row=row: rows.append(
                (*row, tuple(inp[0].shape), tuple(out.shape), sum(p.numel() for p in m.parameters())))))
    with torch.no_grad():
        model(x, t)
    for h in handles:
        h.remove()
    return rows


# %% Receptive field: which input pixels can change one output pixel
def receptive_fields(model, x, t):
    """|d feature[:, centre] / d x| summed over channels, for the net cut after each encoder level and the
    middle (caught by forward hooks), and for the whole net. Returns [(name, resolution, |grad| [H, W])]."""
    ends = [i - 1 for i, b in enumerate(model.down) if isinstance(b, Downsample)] + [len(model.down) - 1]
    cuts = [(f"encoder level {lv}", model.down[i]) for lv, i in enumerate(ends)] + [("middle", model.mid[-1])]
    acts = {}
    handles = [b.register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n, b in cuts]
    x = x.clone().requires_grad_(True)
    acts["whole UNet"] = model(x, t)
    for h in handles:
        h.remove()
    fields = []
    for name, a in acts.items():
        (g,) = torch.autograd.grad(a[0, :, a.shape[2] // 2, a.shape[3] // 2].sum(), x, retain_graph=True)
        fields.append((name, a.shape[2], g[0].abs().sum(0)))
    return fields


# %% Can it learn? Overfit one fixed batch
def overfit(model, x0, x_t, eps, t, alpha_bar, steps, lr, generator):
    """Train on one fixed (x_t, t, eps) batch with the simple loss ||eps - eps_theta(x_t, t)||^2 (DDPM eq. 14).
    Every steps/20 steps also measure the loss on the same x_0 and t with fresh noise: the gap between the
    two is noise memorised. Returns (training losses, [(step, fresh-noise loss)])."""
    opt, losses, fresh = torch.optim.AdamW(model.parameters(), lr=lr), [], []
    for step in range(steps + 1):
        if step % max(1, steps // 20) == 0 or step == steps:
            with torch.no_grad():
                e2 = torch.randn(x0.shape, generator=generator).to(x0.device)
                fresh.append((step, F.mse_loss(model(q_sample(x0, t, alpha_bar, e2), t), e2).item()))
        if step < steps:
            opt.param_groups[0]["lr"] = lr * (1 - step / steps)  # decay to 0: at a fixed rate Adam jumps about near 0
            loss = F.mse_loss(model(x_t, t), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, fresh


# %% Speed: FLOPs, images per second and GFLOP/s, fp32 against bf16 autocast, NCHW against channels_last
def bench(device, iters, batch, size=32):
    """Training (forward, backward, AdamW: 3x the forward FLOPs) and sampling (forward) speed of UNet()."""
    torch.manual_seed(0)
    model = UNet().to(device)
    x, t = torch.randn(batch, 3, size, size, device=device), torch.randint(0, T, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        model(x[:1], t[:1])
    flops = counter.get_total_flops()  # a multiply-add counts as 2
    print(f"bench on {device} ({torch.get_num_threads()} CPU threads): UNet(), "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {flops / 1e9:.3f} GFLOP per {size}x{size} "
          f"forward; batch {batch}, median of {iters} steps\n"
          f"{'precision':>9} {'layout':>13} {'train img/s':>11} {'GFLOP/s':>7} {'sample img/s':>12} {'GFLOP/s':>7}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)  # foreach: one op for all tensors
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # time the GPU's work, not launches
    rate = {}
    for amp, layout in [(amp, layout) for amp in (False, True) for layout in ("NCHW", "channels_last")]:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model, xl = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
        for train in (True, False):
            times = []
            for _ in range(iters + 2):
                sync()
                tic = time.perf_counter()
                with torch.autocast(device.type, torch.bfloat16, enabled=amp), torch.set_grad_enabled(train):
                    loss = F.mse_loss(model(xl, t).float(), xl)
                if train:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sync()
                times.append(time.perf_counter() - tic)
            rate[amp, layout, train] = batch / statistics.median(times[2:])  # after 2 warm-up steps
        r, s = rate[amp, layout, True], rate[amp, layout, False]
        print(f"{'bf16' if amp else 'fp32':>9} {layout:>13} {r:11.1f} {3 * flops * r / 1e9:7.0f} "
              f"{s:12.1f} {flops * s / 1e9:7.0f}")
    print("training with bf16 autocast runs at " + " and ".join(
        f"{rate[True, n, True] / rate[False, n, True]:.2f}x fp32's speed in {n}" for n in ("NCHW", "channels_last")))


# %% The experiments: one function per figure or table
def time_embedding_figure(path):
    """1. emb(t) for every t as a heatmap, and the cosine similarity of the embeddings of every two timesteps."""
    emb = timestep_embedding(torch.arange(T), 32)  # [T, 32]
    cos = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T  # [T, T]
    print(f"1. timestep_embedding(t, 32): {tuple(emb.shape)}, values in [{emb.min():.2f}, {emb.max():.2f}]; cosine "
          f"similarity of t=500 with 501: {cos[500, 501]:.3f}, 520: {cos[500, 520]:.3f}, 900: {cos[500, 900]:.3f}")
    ts = torch.linspace(0, T - 1, 128).long()  # 128 of the timesteps, so that a panel is 128 pixels wide
    panels = [heatmap(emb[ts].T.repeat_interleave(4, 0), -1, 1, DIVERGING), heatmap(cos[ts][:, ts], -1, 1, DIVERGING)]
    grid(torch.stack(panels), 2, "emb(t) for t = 0 to 999 (left to right); colour: -1 blue, 0 white, +1 red",
         row_labels=[""], col_labels=["emb(t): sin in dims 0-15 (top), cos in 16-31", "cosine similarity of "
                                      "emb(t) and emb(t') (t' down)"]).save(path)


def show_pieces():
    """2 to 4. A residual block, attention, down- and upsampling, each on a small random input."""
    h, e, block = torch.randn(2, 32, 16, 16), torch.randn(2, 128), ResBlock(32, 64, 128)
    print(f"2. ResBlock(32 -> 64 channels): {tuple(h.shape)} -> {tuple(block(h, e).shape)}; changing only the "
          f"time embedding changes the output by {(block(h, e) - block(h, -e)).abs().mean():.3f} on average")
    attn, a, perm = Attention(64, 4), torch.randn(2, 64, 8, 8), torch.randperm(64)
    err = (attn(a.flatten(2)[:, :, perm].view_as(a)).flatten(2) - attn(a).flatten(2)[:, :, perm]).abs().max()
    print(f"3. Attention(64 channels, 4 heads): {tuple(a.shape)} -> {tuple(attn(a).shape)}; shuffling the 64 pixels "
          f"shuffles the output the same way (max difference {err:.1e}): attention alone knows no positions\n"
          f"4. Downsample: {tuple(a.shape)} -> {tuple(Downsample(64)(a).shape)}, "
          f"Upsample: {tuple(a.shape)} -> {tuple(Upsample(64)(a).shape)}")


def trace_table(model, x0, t):
    """5. The shape trace and parameters of every block, and the output at initialisation."""
    print(f"\n5. UNet() shape trace for one {x0.shape[-1]}x{x0.shape[-1]} image:\n"
          f"{'block':>9} {'kind':>18} {'input':>17} {'output':>17} {'parameters':>10}")
    for row in shape_trace(model, x0[:1], t[:1]):
        print("{:>9} {:>18} {!s:>17} {!s:>17} {:10,d}".format(*row))
    print(f"total parameters: {sum(p.numel() for p in model.parameters())}\noutput at initialisation: "
          f"max |eps_theta| = {model(x0, t).abs().max().item():.1f} (the output conv starts at zero)")


def receptive_field_figure(path, S, t, device):
    """6. Receptive fields, on a fresh net whose output conv is random (a zero conv passes no gradient back)."""
    probe = UNet().to(device)
    probe.conv_out.reset_parameters()
    print("\n6. receptive field of the centre pixel: input pixels where |gradient| > 1% of its maximum")
    panels, labels, k = [], [], max(1, round(96 / S))  # each panel upscaled k times, to about 96 pixels
    for name, res, g in receptive_fields(probe, torch.randn(1, 3, S, S, device=device), t):
        g, c, f = (g / g.max()).cpu(), (res // 2) * (S // res), S // res  # the probed pixel: c to c + f
        n = int((g > 0.01).sum())
        print(f"  {name:>16} ({res}x{res}): {n} of {S * S} pixels > 1%")
        img = heatmap(g.clamp(min=1e-4).log10(), -4, 0, HOT).repeat_interleave(k, 1).repeat_interleave(k, 2)
        a, b = k * c - 1, min(k * (c + f), k * S - 1)  # a cyan square just outside the probed pixel
        img[:, a:b + 1, [a, b]] = img[:, [a, b], a:b + 1] = torch.tensor([0, 200, 255]).byte()[:, None, None]
        panels.append(img)
        labels.append(f"{name} ({res}x{res}): {n} > 1%")
    grid(torch.stack(panels), len(panels), "receptive field: |d output[centre] / d input| for the UNet cut at each "
         "depth; colour: log10 |gradient| / max, -4 black to 0 white; cyan: the probed pixel", [""], labels).save(path)


def overfit_figure(path, model, x0, t, steps, lr, seed):
    """7. Overfit one fixed batch of shapes at a few noise levels: a table of the loss, x_0 predicted before/after."""
    alpha_bar = alpha_bar_of(linear_betas(T))
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g).to(x0.device)
    x_t = q_sample(x0, t, alpha_bar, eps)
    ab = alpha_bar.to(x0.device)[t].float().view(-1, 1, 1, 1)
    with torch.no_grad():  # x_0 = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t): q_sample solved for x_0
        before = (x_t - (1 - ab).sqrt() * model(x_t, t)) / ab.sqrt()  # eps_theta = 0 here: x_t / sqrt(alpha_bar_t)
    losses, fresh = overfit(model, x0, x_t, eps, t, alpha_bar, steps, lr, g)
    with torch.no_grad():
        pred = model(x_t, t)
    after = (x_t - (1 - ab).sqrt() * pred) / ab.sqrt()
    fixed = losses + [F.mse_loss(pred, eps).item()]  # the fixed batch's loss before each step, and after the last
    print(f"\n7. overfitting {len(x0)} images at t = {t.tolist()}: loss {losses[0]:.3f} -> {losses[-1]:.4f} "
          f"in {steps} steps; same images, fresh noise: {fresh[0][1]:.3f} -> {fresh[-1][1]:.3f}\n"
          f"{'step':>6} {'fixed batch':>11} {'fresh noise':>11}")
    for step, loss in sorted({fresh[round(k * (len(fresh) - 1) / 7)] for k in range(8)}):  # 8 steps, 0 to the end
        print(f"{step:6d} {fixed[step]:#11.3g} {loss:#11.3g}")
    grid(to_uint8(torch.cat([x0, x_t, before, after])).cpu(), len(x0),
         "one fixed batch: x_0 predicted from x_t, before and after training",
         row_labels=["clean x_0", "noisy x_t", "predicted, step 0", f"predicted, step {steps}"],
         col_labels=[f"t={v}" for v in t.tolist()]).save(path)


# %% Main: each piece shown working, then the whole net: trace, receptive field, overfitting
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.set_flush_denormal(True)  # near a loss of 0 gradients get tiny; denormal floats are slow on CPUs
    if args.bench:
        return bench(device, 2 if args.quick else BENCH_ITERS, 8 if args.quick else BENCH_BATCH)
    start, S = time.time(), args.image_size
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output folder {args.out!r} ({e.strerror}); pass --out with a writable folder")
    torch.manual_seed(args.seed)
    time_embedding_figure(os.path.join(args.out, FIGURES[0]))
    show_pieces()
    model = UNet().to(device)
    x0 = to_unit(make_shapes(BATCH, size=S, seed=args.seed)[0]).to(device)  # [B, 3, S, S] in [-1, 1]
    t = torch.linspace(50, 600, BATCH).long().to(device)  # a few noise levels, low to high
    trace_table(model, x0, t)
    receptive_field_figure(os.path.join(args.out, FIGURES[1]), S, t[:1], device)
    overfit_figure(os.path.join(args.out, FIGURES[2]), model, x0, t, args.steps, args.lr, args.seed)
    print(f"\nwrote {', '.join(FIGURES)} to {args.out}/ in {time.time() - start:.1f}s")


def parse_args(argv=None):
    if argv is None and "ipykernel" in sys.modules:  # in Jupyter, sys.argv holds the kernel's own flags
        argv = []
    p = Parser(description="Lesson 03: the UNet, piece by piece (shape trace, receptive field, overfitting).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="training steps of the overfitting demonstration")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of the overfitting demonstration")
    p.add_argument("--image-size", type=int, default=32, help="side of the shapes images (a multiple of 4)")
    p.add_argument("--bench", action="store_true", help="only measure speed (batch 64, 32x32) and exit")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for the figures (default: figures, or runs/quick with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    args = p.parse_args(argv)
    if args.steps < 1:
        fail(f"--steps must be at least 1 (got {args.steps})")
    if not 0 < args.lr < 1:
        fail(f"--lr must be between 0 and 1 (got {args.lr}); try 2e-3")
    if args.image_size < 8 or args.image_size % 4:
        fail(f"--image-size {args.image_size}: UNet() halves it twice, so pass one of the multiples of 4 from 8 up")
    if args.quick:
        args.steps = min(args.steps, 10)
    args.out = args.out or (os.path.join("runs", "quick") if args.quick else "figures")  # never over figures/
    return args


# %% Appendix: pieces from earlier lessons
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

def linear_betas(T):  # DDPM's schedule: beta_t linear from 1e-4 to 0.02, float64 [T] (lesson 01)
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
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

# The course's drawing kit (PIL: matplotlib is not a dependency), and heatmap, this lesson's addition to it
DIVERGING = [(59, 76, 192), (245, 245, 245), (180, 4, 38)]  # heatmap colour stops: blue, white, red
HOT = [(0, 0, 0), (120, 20, 90), (230, 80, 30), (250, 200, 50), (255, 255, 230)]  # black to white

def grid(x_uint8, nrow, title, row_labels, col_labels):  # uint8 [N, C, H, W] -> a titled grid, upscaled 3x
    g = make_grid(x_uint8, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()  # [H', W', 3]
    img = Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.Resampling.NEAREST)
    f, top = ImageFont.load_default(14), 50
    left = max(int(f.getlength(s)) for s in row_labels) + 12
    canvas = Image.new("RGB", (img.width + left + 8, img.height + top + 8), "white")
    canvas.paste(img, (left, top))
    d = ImageDraw.Draw(canvas)
    d.text((canvas.width // 2, 6), title, fill="black", font=ImageFont.load_default(16), anchor="ma")
    for i, s in enumerate(col_labels):  # labels centred over evenly spaced columns and rows
        d.text((left + (i + 0.5) * img.width / len(col_labels), top - 4), s, fill="black", font=f, anchor="md")
    for i, s in enumerate(row_labels):
        d.text((left - 6, top + (i + 0.5) * img.height / len(row_labels)), s, fill="black", font=f, anchor="rm")
    return canvas

def heatmap(v, lo, hi, stops):  # v [H, W] -> uint8 [3, H, W], [lo, hi] mapped linearly through the colour stops
    u = ((v.double() - lo) / (hi - lo)).clamp(0, 1) * (len(stops) - 1)
    i, s = u.long().clamp(max=len(stops) - 2), torch.tensor(stops, dtype=torch.float64)
    return (s[i] + (u - i)[..., None] * (s[i + 1] - s[i])).round().to(torch.uint8).permute(2, 0, 1)

if __name__ == "__main__":
    main()
