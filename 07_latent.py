"""Lesson 07: latent diffusion, guidance in latent space, editing, and fine-tuning with LoRA.

The ideas behind Stable Diffusion (Rombach et al. 2022), at a scale that trains on a laptop CPU.
1. An autoencoder: a small convolutional VAE maps x (3 x 32 x 32) to a latent z (4 x 8 x 8 with --factor 4: 12x
   fewer numbers) and back. Its encoder gives q(z | x) = N(mu, sigma^2); the loss is reconstruction plus a small KL
   term (Kingma & Welling 2014) that keeps the latent space smooth without blurring:
       L = mean (x - D(z))^2 + KL_WEIGHT * mean KL,  z = mu + sigma * eps,
       KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)   (0 when mu = 0, sigma = 1)
   Part of its images get random colours (--colour-jitter): LoRA (5) cannot teach a colour the VAE cannot represent.
2. The latent scale factor: diffusion assumes data of unit variance, which the KL term does not give, so latents are
   multiplied by scale = 1 / std(mu) over the training set (SD's 0.18215).
3. Diffusion in latent space: lesson 06's class-conditional UNet with classifier-free guidance,
       eps_guided = eps(z_t, t, null) + s * (eps(z_t, t, y) - eps(z_t, t, null)),
   trained with lesson 04's objective and recipe on the scaled latents; DDIM gives z_0, the decoder x = D(z_0 / scale).
   Against lesson 04's UNet on pixels trained for the same FLOPs (a latent costs 6x less: 8x the batch): images per
   second, lesson 04's Frechet distance, the class accuracy of guided samples.
4. Editing. SDEdit (Meng et al. 2022): noise an image's latent to t, denoise it under another label.
   Inpainting: after every DDIM step the known part is the known latent noised to that step,
       z_s <- m * (sqrt(ab_s) z_known + sqrt(1 - ab_s) eps) + (1 - m) * z_s   (the last step keeps it exactly)
5. LoRA (Hu et al. 2022): freeze the UNet, learn low-rank updates of its attention projections, convolutions and
   embedding layers: W' = W + (alpha / r) B A, A: r x in (random), B: out x r (zeros: W' = W at the start). It
   teaches the model a colour it never saw (orange); the adapter is saved alone, then merged.

    python 07_latent.py                  # prints its FLOPs and minutes on a 2-core CPU without bf16 units
    python 07_latent.py --quick          # seconds: a smoke test (figures in runs/quick/, models in runs/quick/07/)
    python 07_latent.py --factor 8       # 4 x 4 x 4 latents (or --factor 2: 16 x 16 x 4)
    python 07_latent.py --seconds 240    # the same wall-clock seconds for each UNet instead of the same FLOPs
    python 07_latent.py --fixed-steps 1000,4000  # your own step budgets (pixel, latent)
It writes runs/07/{vae,pixel,latent,lora}.pt and figures/07_{recon,samples,sdedit,inpaint,lora}.png.
"""
# %% Setup: imports and the lesson's settings
import argparse
import copy
import math
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

FORMAT = "dmfs-07-v1"  # checkpoint format tag
ORANGE = (255, 140, 0)  # the colour the base model never sees; LoRA teaches it
Z_CH, VAE_CH, VAE_LR, KL_WEIGHT = 4, 16, 3e-3, 1e-4  # latent channels, VAE width, its learning rate, KL weight
UNETS = dict(pixel=(16, (1, 2, 4)), latent=(32, (1, 2, 2)))  # base channels, ch_mult: 04's on pixels, wider on latents
LR, EMA_GAMMA, P_UNCOND = 2e-3, 6.94, 0.1  # lesson 04's peak lr (cosine to 0) and power EMA; 06's label dropout
LORA_RANK, LORA_ALPHA = 2, 2.0
SLOW_CPU_FLOPS = 64e9  # the budgets' FLOP/s for 2 CPU cores without bf16 units (lesson 04)
FULL = dict(n_images=10_000, vae_steps=1600, vae_batch=32, batch=16, latent_batch=128, unet_tflop=25, warmup=100,
            sample_steps=20, eval_samples=250, clf_steps=400, lora_images=300, lora_steps=600, lora_batch=32,
            lora_samples=200)  # a fifth of the images held out; unet_tflop: the training FLOPs of each UNet
QUICK = dict(n_images=600, vae_steps=15, vae_batch=16, batch=8, latent_batch=64, unet_tflop=0.03, warmup=5,
             sample_steps=4, eval_samples=20, clf_steps=8, lora_images=32, lora_steps=10, lora_batch=16,
             lora_samples=20)  # --quick: a smoke test

# %% 1. The autoencoder: a small KL-regularised convolutional VAE
class VAEBlock(nn.Sequential):  # x + conv(SiLU(GN(conv(SiLU(GN(x)))))): a residual block without time embedding
    def __init__(self, ch):
        super().__init__(*(m for _ in range(2) for m in (group_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))))

    def forward(self, x):
        return x + super().forward(x)

class VAE(nn.Module):
    """Encoder (B, 3, S, S) -> mu, logvar (B, z_ch, S/f, S/f); decoder back. log2(f) stride-2 convs down, as many up."""
    def __init__(self, in_ch=3, z_ch=4, factor=4, ch=32):
        super().__init__()
        n = int(math.log2(factor))
        widths = [ch * min(2 ** i, 4) for i in range(n + 1)]
        enc = [nn.Conv2d(in_ch, widths[0], 3, padding=1)]
        for i in range(n):  # (B, w_i, S, S) -> (B, w_i+1, S/2, S/2)
            enc += [VAEBlock(widths[i]), nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)]
        enc += [VAEBlock(widths[n]), group_norm(widths[n]), nn.SiLU(), nn.Conv2d(widths[n], 2 * z_ch, 3, padding=1)]
        dec = [nn.Conv2d(z_ch, widths[n], 3, padding=1), VAEBlock(widths[n])]
        for i in reversed(range(n)):  # (B, w_i+1, s, s) -> (B, w_i, 2s, 2s)
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(widths[i + 1], widths[i], 3, padding=1),
                    VAEBlock(widths[i])]
        dec += [group_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], in_ch, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.scale = 1.0  # the latent scale factor, set after training (diffusers: vae.config.scaling_factor)

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)  # the reparameterisation trick: z = mu + sigma eps ~ N(mu, sigma^2), differentiable
        z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator).to(mu.device)
        return self.decode(z), mu, logvar

def kl_divergence(mu, logvar):  # KL(N(mu, sigma^2) || N(0, 1)) per element, averaged
    return 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean()
def latent_scale(z):  # 1 / std of a batch of latents: multiplying by it gives unit variance (SD's 0.18215)
    return 1.0 / z.float().std().item()

@torch.no_grad()
def encode_all(vae, images, device, batch=500):  # uint8 images -> posterior means (unscaled, CPU), mean sigma
    out = [vae.encode(to_unit(images[i:i + batch]).to(device)) for i in range(0, len(images), batch)]  # (mu, logvar)
    mu = torch.cat([m.float().cpu() for m, _ in out])
    return mu, sum((0.5 * logvar.float()).exp().sum().item() for _, logvar in out) / mu.numel()

# %% 2. Sampling in latent space: guided DDIM, then the decoder
@torch.no_grad()
def generate(model, y, x_T, alpha_bar, args, autocast, vae=None, steps=None, t_start=None):
    """Guided DDIM from x_T (at t_start: SDEdit) for labels y, decoded x = D(z_0 / scale) if vae -> (x, img/s)."""
    tic, y = time.perf_counter(), y.to(alpha_bar.device)
    x = ddim_sample(lambda x, t: guided_eps(model, x, t, y, args.guidance), x_T.to(alpha_bar.device), alpha_bar,
                    steps or args.sample_steps, autocast, clip=vae is None, t_start=t_start)  # pixels only
    x = (x if vae is None else vae.decode(x / vae.scale)).float().clamp(-1, 1).cpu()
    return x, len(y) / (time.perf_counter() - tic)

# %% 3. LoRA: low-rank adapters on a frozen model, and a colour to teach
class LoRA(nn.Module):  # base(x) + (alpha / r) B(A(x)) with base frozen; B starts at zero
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / rank
        if isinstance(base, nn.Linear):  # A: in -> r, B: r -> out
            self.A = nn.Linear(base.in_features, rank, bias=False)
            self.B = nn.Linear(rank, base.out_features, bias=False)
        else:  # A: a k x k conv (same stride, padding) to r channels, B: a 1 x 1 conv back
            self.A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))  # as nn.Linear's default
        nn.init.zeros_(self.B.weight)  # so the adapted model starts as the base model
        self.to(base.weight.device, base.weight.dtype)  # on the base's device: a CUDA model gets CUDA adapters

    def forward(self, x):
        return self.base(x) + self.scale * self.B(self.A(x))

    def merged(self):
        """A plain layer with W + (alpha / r) B A: [out, r] @ [r, in], for each tap of a k x k kernel."""
        layer = copy.deepcopy(self.base)
        layer.weight.data += self.scale * torch.einsum("or,ri...->oi...", self.B.weight.flatten(1), self.A.weight)
        return layer.requires_grad_(False)

def add_lora(model, rank, alpha):  # freeze the model, wrap attention qkv/proj and ResBlock conv1/conv2/emb in LoRA
    model.requires_grad_(False)
    for module in list(model.modules()):
        for n in {Attention: ("qkv", "proj"), ResBlock: ("conv1", "conv2", "emb")}.get(type(module), ()):
            setattr(module, n, LoRA(getattr(module, n), rank, alpha))
    return model

def merge_lora(model):  # every LoRA replaced by its merged layer, in place: the state dict is the base model's again
    for module in list(model.modules()):
        for n in [n for n, child in module.named_children() if isinstance(child, LoRA)]:
            setattr(module, n, getattr(module, n).merged())
    return model

def lora_state(model):  # only the adapters' weights (names ending in .A.weight / .B.weight)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith((".A.weight", ".B.weight"))}

def recolour(images, captions, rgb):  # the same shapes in colour rgb: mask * rgb, mask = max channel / the caption's
    peak = torch.tensor([max(COLORS[c.split()[2]]) for c in captions], dtype=torch.float32).view(-1, 1, 1, 1)
    mask = images.float().amax(1, keepdim=True) / peak  # [N, 1, S, S] in [0, 1]
    return (mask * torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)).round().clamp(0, 255).to(torch.uint8)

# %% Measuring: lesson 04's classifier judges samples (class accuracy, Frechet distance); PSNR and colour, the edits
def judge(images, labels, held, train, args, device, gen):  # lesson 04's metric: classifier, FD floor and ceiling
    n = min(args.eval_samples, len(held) // 2)
    clf = train_classifier(images[train], labels[train], len(SHAPES), device, args.clf_steps, args.seed)
    f_real, c_real = features_and_classes(clf, to_unit(images[held[:n]]), device)
    f_real2, _ = features_and_classes(clf, to_unit(images[held[n:2 * n]]), device)
    f_noise, _ = features_and_classes(clf, torch.randn(n, 3, 32, 32, generator=gen).clamp(-1, 1), device)
    print(f"classifier accuracy on held-out {(c_real == labels[held[:n]]).float().mean():.1%}; FD floor (real vs real) "
          f"{frechet_distance(f_real2, f_real):.2f}, ceiling (noise vs real) {frechet_distance(f_noise, f_real):.2f}")
    return clf, f_real

def score(clf, x, y, f_real=None):  # class accuracy of images x in [-1, 1] for labels y; FD to f_real if given
    f, c = features_and_classes(clf, x, next(clf.parameters()).device)
    return (c == y).float().mean().item(), None if f_real is None else frechet_distance(f, f_real)

def psnr(a, b):  # peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), per image [N]
    return 10 * torch.log10(4 / (a.clamp(-1, 1) - b.clamp(-1, 1)).square().flatten(1).mean(1).clamp(min=1e-10))
def nearest_colour(x_uint8):  # index into list(COLORS) + [orange] of the colour nearest each image's foreground
    x, palette = x_uint8.float(), torch.tensor([*COLORS.values(), ORANGE], dtype=torch.float32)
    bright = x.amax(1)  # [N, S, S]
    fg = (bright > 0.5 * bright.amax((1, 2), keepdim=True)).float().unsqueeze(1)  # [N, 1, S, S]: over half the max
    chroma = ((x / bright.clamp(min=1).unsqueeze(1)) * fg).sum((2, 3)) / fg.sum((2, 3)).clamp(min=1)  # rgb / max
    return torch.cdist(chroma, palette / palette.amax(1, keepdim=True)).argmin(1)

def colour_kept(x, ref):  # the fraction of images x in [-1, 1] of colour ref (an index, or that of uint8 images ref)
    return (nearest_colour(to_uint8(x)) == (nearest_colour(ref) if torch.is_tensor(ref) else ref)).float().mean().item()
def n_params(model, trainable=False):  # all parameters, or (trainable=True) those that get gradients
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)

# %% Experiments: one function per figure or table
def autoencoder(images, labels, held, train, clf, f_real, args, device, autocast, gen):
    """Train the VAE, judge it, set vae.scale; 07_recon.png. -> (vae, scaled training latents, seconds spent)."""
    tic, n, x, y = time.time(), 32 // args.factor, images[held[:len(f_real)]], labels[held[:len(f_real)]]
    vae = VAE(3, Z_CH, args.factor, VAE_CH).to(device)
    print(f"1. VAE {n_params(vae) / 1e6:.2f}M params: 3x32x32 -> {Z_CH}x{n}x{n} ({3 * 32 * 32 / (Z_CH * n * n):.0f}x "
          f"fewer numbers), kl weight {KL_WEIGHT:g}")
    opt = torch.optim.Adam(vae.parameters(), VAE_LR)  # on reconstruction + KL_WEIGHT * KL, lr decayed as a cosine
    for step in range(args.vae_steps):
        opt.param_groups[0]["lr"] = VAE_LR * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        x_b = to_unit(images[train[torch.randint(len(train), (args.vae_batch,), generator=gen)]])
        # random channel gains on part of the batch: the VAE learns colours beyond the data's six (as SD's VAE)
        gain = torch.rand(len(x_b), 3, 1, 1, generator=gen) * 1.1
        jitter = (torch.rand(len(x_b), 1, 1, 1, generator=gen) < args.colour_jitter).float()
        x_b = (jitter * ((x_b + 1) * gain - 1).clamp(-1, 1) + (1 - jitter) * x_b).to(device)
        with autocast():
            x_hat, mu, logvar = vae(x_b, gen)
        rec, kl = (x_hat.float() - x_b).square().mean(), kl_divergence(mu.float(), logvar.float())
        opt.zero_grad(set_to_none=True)
        (rec + KL_WEIGHT * kl).backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == args.vae_steps:
            print(f"\r  VAE step {step + 1}  reconstruction {rec.item():.4f}  KL {kl.item():.2f}", end="", flush=True)
    print()
    vae.eval().requires_grad_(False)
    seconds, mu = time.time() - tic, encode_all(vae, x, device)[0]
    rec = vae.decode(mu.to(device)).float().cpu()
    p, (acc, fd) = psnr(rec, to_unit(x)), score(clf, rec, y, f_real)
    print(f"   trained in {seconds:.0f} s; held-out PSNR {p.mean():.2f} dB (min {p.min():.2f}); on reconstructions "
          f"class accuracy {acc:.1%}, FD {fd:.2f}")
    save_checkpoint(f"{args.run_dir}/vae.pt", dict(format=FORMAT, config=vars(args), model=vae.state_dict()))
    tic, (z_mu, sigma) = time.time(), encode_all(vae, images[train], device)  # the training set, encoded once
    vae.scale, seconds = latent_scale(z_mu), seconds + time.time() - tic
    print(f"   encoded {len(train)} images in {time.time() - tic:.1f} s: posterior means have std {1 / vae.scale:.4f} "
          f"(mean {z_mu.mean():.3f}), mean sigma {sigma:.4f}; scale factor {vae.scale:.4f}")
    lat = F.interpolate((mu[:8] * vae.scale).clamp(-2.5, 2.5).flatten(0, 1)[:, None] / 2.5, size=32)  # grey: 0
    channels = [to_uint8(lat.view(8, Z_CH, 32, 32)[:, c:c + 1].expand(-1, 3, -1, -1)) for c in range(Z_CH)]
    grid(f"{args.out}/07_recon.png", torch.cat([x[:8], to_uint8(rec[:8])] + channels), 8, f"VAE (f={args.factor}): "
         f"held-out images, reconstructions ({p.mean():.1f} dB), latent channels",
         ["original", "reconstruction"] + [f"z channel {c}" for c in range(Z_CH)])
    return vae, z_mu * vae.scale, seconds

def latent_vs_pixel(x_train, z_train, y_train, vae, clf, f_real, overhead, cost, alpha_bar, args, autocast, gen):
    """Both UNets (pixels, latents) for one budget, the same FLOPs by default; judge EMA snapshots; table, figure."""
    kind, (sp, sl) = ("seconds", (args.seconds,) * 2) if args.seconds else ("steps", args.fixed_steps or cost["steps"])
    tf = dict(pixel=3e-12 * cost["pixel"] * args.batch, latent=3e-12 * cost["latent"] * args.latent_batch)  # TFLOP/step
    # e2e: the latent step where its UNet plus the VAE have cost what the pixel UNet did (a step: 3 forwards an image)
    e2e = sl - overhead if args.seconds else (sp * tf["pixel"] - cost["vae"] / 1e12) / tf["latent"]
    print(f"2. both UNets: pixel for {sp:g} {kind} of batch {args.batch}, latent for {sl:g} of {args.latent_batch}; "
          f"snapshots judged on {len(f_real)} guided samples (s = {args.guidance:g}, DDIM {args.sample_steps} steps)")
    y, final_fd, samples, rates, table = torch.arange(len(f_real)) % len(SHAPES), {}, {}, {}, []
    for name, data, budget, marks in [("pixel", x_train, (kind, sp, args.batch), [sp / 2, sp]), ("latent", z_train,
                                      (kind, sl, args.latent_batch), [sl / 4, e2e if 0 < e2e < sl else sl / 2, sl])]:
        torch.manual_seed(args.seed)
        net = UNet(data.shape[1], *UNETS[name], num_classes=len(SHAPES)).to(alpha_bar.device)
        snaps, rate = train_diffusion(net, data, y_train, alpha_bar, args, autocast, gen, budget, marks, name)
        x_T = torch.randn(len(y), *data.shape[1:], generator=torch.Generator().manual_seed(args.seed + 7))
        latent, curve = name == "latent", []
        for secs, step, state in snaps:  # the same noise for every snapshot
            net.load_state_dict(state)
            samples[name], srate = generate(net.eval(), y, x_T, alpha_bar, args, autocast, vae if latent else None)
            acc, fd = score(clf, samples[name], y, f_real)
            curve.append((secs, step, acc, fd))
            print(f"   {name:6} step {step:5d} {secs:6.0f} s  FD {fd:6.2f}  class acc. {acc:6.1%} {srate:6.1f} img/s")
        final_fd[name], rates[name], rows = fd, (rate, srate), [(name, curve[-1])]
        if latent and 0 < e2e < sl:  # and the snapshot at which UNet + VAE cost what the pixel UNet did
            rows.append(("latent, VAE counted", min(curve, key=lambda c: abs(c[0 if args.seconds else 1] - e2e))))
        table += [f"| {label} | {n_params(net) / 1e6:.2f}M | {budget[2]} | {rate:.0f} | {srate:.1f} | {step} | "
                  f"{secs:.0f} | {step * tf[name]:.1f} | {step * tf[name] + latent * cost['vae'] / 1e12:.1f} | "
                  f"{fd:.2f} | {acc:.1%} |" for label, (secs, step, acc, fd) in rows]
        save_checkpoint(f"{args.run_dir}/{name}.pt", dict(format=FORMAT, config=vars(args), ema=state,
                        model=net.state_dict(), step=step, scale=vae.scale if latent else 1.0))
    print("\n| model | UNet params | batch | train img/s | sample img/s | steps | UNet s | UNet TFLOP | with VAE | FD "
          "| class acc |", "|---|---|---|---|---|---|---|---|---|---|---|", *table, sep="\n")
    print(f"VAE training + encoding {overhead:.0f} s, {cost['vae'] / 1e12:.1f} TFLOP; latent/pixel images/s, train "
          f"{rates['latent'][0] / rates['pixel'][0]:.1f}x, sample {rates['latent'][1] / rates['pixel'][1]:.1f}x")
    order = torch.cat([torch.nonzero(y == c).flatten()[:8] for c in range(len(SHAPES))])  # 8 per label
    both = torch.cat([to_uint8(samples[n][order].view(len(SHAPES), -1, 3, 32, 32)) for n in ("pixel", "latent")], 1)
    grid(f"{args.out}/07_samples.png", both.flatten(0, 1), 16, f"guided samples (s={args.guidance:g}): pixel UNet, FD "
         f"{final_fd['pixel']:.2f} (left) | latent UNet, FD {final_fd['latent']:.2f} (right)", list(SHAPES))
    return net

def sdedit(net, vae, images, labels, held, clf, alpha_bar, args, autocast):
    """Noise held-out non-star latents to t and denoise them as 'star'; 07_sdedit.png."""
    device, target, fracs = alpha_bar.device, SHAPES.index("star"), (0.3, 0.5, 0.7, 0.9)
    src = held[labels[held] != target][:64]
    z_src, cols = encode_all(vae, images[src], device)[0].to(device) * vae.scale, [images[src[:6]]]
    noise = torch.randn(z_src.shape, generator=torch.Generator().manual_seed(args.seed + 11)).to(device)  # every t
    print(f"3. SDEdit: {len(src)} held-out non-star images, noised to t and denoised as 'star' (s = {args.guidance:g})")
    for frac in fracs:
        t0 = int(frac * 999)
        z_t = q_sample(z_src, torch.full((len(src),), t0, device=device), alpha_bar, noise)  # sqrt(ab) E(x) + ...
        x, _ = generate(net, torch.full((len(src),), target), z_t, alpha_bar, args, autocast, vae,
                        max(2, round(args.sample_steps * frac)), t_start=t0)  # DDIM from t0 under "star"
        print(f"   t = {t0:3d}: classified as star {score(clf, x, target)[0]:6.1%}, colour kept "
              f"{colour_kept(x, images[src]):6.1%}, PSNR to the source {psnr(x, to_unit(images[src])).mean():5.2f} dB")
        cols.append(to_uint8(x[:6]))
    grid(f"{args.out}/07_sdedit.png", torch.stack(cols, 1).flatten(0, 1), len(cols), "SDEdit: noise the latent to t, "
         "denoise as 'star'", col_labels=["source"] + [f"t={int(f * 999)}" for f in fracs])

def inpaint(net, vae, images, captions, held, clf, alpha_bar, args, autocast):
    """Keep the left half of a latent, generate the right half under each label; 07_inpaint.png."""
    device, y, n = alpha_bar.device, torch.arange(len(SHAPES)), 32 // args.factor
    src = held[[("centre" in captions[i]) for i in held.tolist()]][:4]  # shapes the cut goes through
    src = src if len(src) == 4 else held[:4]
    x_src, z_src = to_unit(images[src]), encode_all(vae, images[src], device)[0].to(device) * vae.scale
    mask = F.pad(torch.ones(1, 1, n, n // 2, device=device), (0, n - n // 2))  # known (1): the left half
    pix = F.interpolate(mask, size=32).cpu()  # the mask in pixels; the figure draws the unknown half grey
    rows, stats, known_db, err = [], [], [], 0.0
    for i in range(len(src)):
        zk, g = z_src[i:i + 1].expand(len(SHAPES), -1, -1, -1), torch.Generator().manual_seed(args.seed + 13)
        z0 = ddim_sample(lambda x, t: guided_eps(net, x, t, y.to(device), args.guidance), torch.randn(
            zk.shape, generator=g).to(device), alpha_bar, args.sample_steps, autocast, clip=False, known=zk,
            mask=mask, generator=g)  # a known region: ddim_sample's inpainting step
        err = max(err, ((z0 - zk) * mask).abs().max().item())
        x = vae.decode(z0 / vae.scale).float().clamp(-1, 1).cpu()
        stats.append((score(clf, x, y)[0], colour_kept(x, images[src[i:i + 1]])))  # class accuracy, colour kept
        mse = ((x - x_src[i:i + 1]).square() * pix).sum((1, 2, 3)) / (3 * pix.sum())  # on the known pixels
        known_db.append(10 * torch.log10(4 / mse).mean())
        rows += [to_uint8(x_src[i:i + 1]), to_uint8(x_src[i:i + 1] * pix + (1 - pix) * 0.3), to_uint8(x)]
    acc, kept = np.mean(stats, 0)
    print(f"   inpainting (latent space, right half of {n}x{n} unknown): known latent kept to {err:.1e}; known pixels "
          f"{torch.stack(known_db).mean():.2f} dB PSNR to the source (the VAE's error); class accuracy of the filled "
          f"images {acc:.1%}, colour kept {kept:.1%}")
    grid(f"{args.out}/07_inpaint.png", torch.cat(rows), 2 + len(SHAPES), "latent inpainting: left half kept (re-noised "
         "to t every step), right half generated under each label", col_labels=["source", "known"] + list(SHAPES))

def lora(net, vae, clf, alpha_bar, args, autocast, gen):
    """Teach the frozen latent UNet a colour it never saw (orange); save the adapter, merge it; 07_lora.png."""
    images, labels, captions = make_shapes(args.lora_images, 32, args.seed + 99)
    images, device = recolour(images, captions, ORANGE), alpha_bar.device
    z_mu = encode_all(vae, images, device)[0]
    rec = vae.decode(z_mu.to(device)).float().cpu()
    print(f"4. LoRA: {len(images)} orange shapes; the frozen VAE reconstructs them at "
          f"{psnr(rec, to_unit(images)).mean():.2f} dB, {colour_kept(rec, len(COLORS)):.0%} still orange (the UNet "
          "can only learn what the autoencoder can represent)")
    base, lora_net = copy.deepcopy(net).requires_grad_(False), add_lora(copy.deepcopy(net), LORA_RANK, LORA_ALPHA)
    n_train, n_all = n_params(lora_net, trainable=True), n_params(base)
    print(f"   rank {LORA_RANK}, alpha {LORA_ALPHA:g}: {n_train:,} trainable parameters, "
          f"{100 * n_train / n_all:.2f}% of the UNet's {n_all:,}; the base model's loss and 04's recipe on them")
    snaps, _ = train_diffusion(lora_net.train(), z_mu * vae.scale, labels, alpha_bar, args, autocast, gen,
                               ("steps", args.lora_steps, args.lora_batch), [args.lora_steps], "LoRA")
    lora_net.load_state_dict(snaps[-1][2])  # the adapters' EMA (the frozen weights are their own average)
    path = f"{args.run_dir}/lora.pt"
    save_checkpoint(path, dict(format=FORMAT + "-lora", rank=LORA_RANK, alpha=LORA_ALPHA, adapter=lora_state(lora_net)))
    print(f"   adapter saved to {path}: {os.path.getsize(path) / 1024:.0f} KiB, against {4 * n_all / 1024:.0f} KiB for "
          "the UNet's weights (fp32)")
    probe = [a.to(device) for a in (torch.randn(4, *z_mu.shape[1:], generator=gen), torch.tensor([0, 250, 500, 999]),
                                    torch.arange(4))]  # (z_t, t, y)
    with torch.no_grad():
        before, merged = lora_net(*probe), merge_lora(lora_net)  # merged: W + (alpha / r) B A, a plain UNet again
        print(f"   merged into the weights; max |adapters - merged| output {(before - merged(*probe)).abs().max():.1e}")
    y, rows, orange = torch.arange(args.lora_samples) % len(SHAPES), [images[:10]], []
    x_T = torch.randn(len(y), *z_mu.shape[1:], generator=torch.Generator().manual_seed(args.seed + 21))
    for name, model in (("before", base), ("after", merged)):  # the same noise and labels for both
        x, _ = generate(model, y, x_T, alpha_bar, args, autocast, vae)
        orange.append(colour_kept(x, len(COLORS)))
        print(f"   {name:6}: {orange[-1]:6.1%} of {len(y)} samples orange, class accuracy {score(clf, x, y)[0]:6.1%}")
        rows.append(to_uint8(x[:10]))
    grid(f"{args.out}/07_lora.png", torch.cat(rows), 10, f"LoRA (rank {LORA_RANK}, {100 * n_train / n_all:.1f}% of "
         f"the parameters): orange, {orange[0]:.0%} -> {orange[1]:.0%} of samples",
         ["fine-tuning data", "before (base)", "after (merged)"])

# %% What the run computes: lesson 04's FLOP count, and the step budgets that give both UNets the same compute
def run_cost(args):
    """The run's FLOPs from one forward of each network, counted on the meta device (nothing runs, no seed moves): an
    image costs 3 forwards in training, 2 UNet forwards a guided DDIM step. -> the counts, the UNets' step budgets."""
    n, s, e, K = 32 // args.factor, args.sample_steps, min(args.eval_samples, args.n_images // 10), len(SHAPES)
    with torch.device("meta"):  # 2 images x, 2 latents z (GroupNorm refuses 1 value a group), then halved
        vae, unet = VAE(3, Z_CH, args.factor, VAE_CH), lambda k: UNet(3 if k == "pixel" else Z_CH, *UNETS[k], K)
        x, z, t = torch.zeros(2, 3, 32, 32), torch.zeros(2, Z_CH, n, n), torch.zeros(2).long()
        f = {k: flops(*a) / 2 for k, a in dict(pixel=(unet("pixel"), x, t, t), latent=(unet("latent"), z, t, t), enc=(
            vae.encoder, x), dec=(vae.decoder, z), clf=(train_classifier(x, t, K, "meta", 0, 0), x)).items()}
    batch = dict(pixel=args.batch, latent=args.latent_batch)
    f["steps"] = [round(args.unet_tflop * 1e12 / (3 * f[k] * batch[k])) for k in batch]  # the same FLOPs each
    f["vae"] = 3 * (f["enc"] + f["dec"]) * args.vae_batch * args.vae_steps + f["enc"] * args.n_images  # + encoding
    sample = 2 * s * f["latent"] + f["dec"]  # a guided DDIM sample in latent space, decoded
    parts = {"judge": f["clf"] * (3 * 128 * args.clf_steps + 12 * e), "VAE": f["vae"]}  # trained; ~12 sets of e read
    for k, steps in zip(batch, () if args.seconds else args.fixed_steps or f["steps"]):  # by the clock: not known
        parts[f"{k} UNet"] = 3 * f[k] * batch[k] * steps
    # snapshots: the pixel UNet's 2, the latent's 3; SDEdit: 64 images, 4 t (2.4x the steps); inpainting: 20
    parts["sampling"] = e * (4 * s * f["pixel"] + 3 * sample) + (64 * 2.4 + 20) * sample
    parts["LoRA"] = 3 * f["latent"] * args.lora_batch * args.lora_steps + 2 * args.lora_samples * sample
    f["total"] = sum(parts.values())
    print(f"this run computes {f['total'] / 1e12:.1f} TFLOP (" + ", ".join(f"{k} {v / 1e12:.1f}" for k, v in
          parts.items()) + f"{', and the UNets by the clock' if args.seconds else ''}): "
          f"{f['total'] / SLOW_CPU_FLOPS / 60:.0f} min at the budgets' 64 GFLOP/s (2 CPU cores without bf16 units)")
    return f

# %% The lesson, start to finish
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    autocast, precision = autocast_for(device)  # bf16 where the hardware has it (lesson 04)
    for folder in (args.out, args.run_dir):
        os.makedirs(folder, exist_ok=True)
    start, gen = time.time(), torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    alpha_bar = alpha_bar_of(cosine_betas(1000)).to(device)
    images, labels, captions = make_shapes(args.n_images, 32, args.seed)  # a fifth held out for the metrics
    held, train = torch.arange(args.n_images // 5), torch.arange(args.n_images // 5, args.n_images)
    print(f"shapes: {len(train)} training, {len(held)} held-out images | {device}, {precision}")
    cost = run_cost(args)
    clf, f_real = judge(images, labels, held, train, args, device, gen)
    vae, z_train, overhead = autoencoder(images, labels, held, train, clf, f_real, args, device, autocast, gen)
    net = latent_vs_pixel(to_unit(images[train]), z_train, labels[train], vae, clf, f_real, overhead, cost,
                          alpha_bar, args, autocast, gen)
    sdedit(net, vae, images, labels, held, clf, alpha_bar, args, autocast)
    inpaint(net, vae, images, captions, held, clf, alpha_bar, args, autocast)
    lora(net, vae, clf, alpha_bar, args, autocast, gen)
    print(f"wrote 07_recon, _samples, _sdedit, _inpaint, _lora.png to {args.out}/, checkpoints to {args.run_dir}/; "
          f"{time.time() - start:.0f} s, {cost['total'] / (time.time() - start) / 1e9:.0f} GFLOP/s by the count above")

def parse_args(argv=None):
    """The flags a learner varies; the lesson's other settings are the constants at the top (FULL, or QUICK)."""
    argv = [] if argv is None and "ipykernel" in sys.modules else argv  # in Jupyter sys.argv is the kernel's
    p = Parser(description="Lesson 07: latent diffusion.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--factor", type=int, default=4, choices=[2, 4, 8], help="VAE downsampling of the 32x32 images")
    p.add_argument("--colour-jitter", type=float, default=0.5, help="fraction of VAE images given random colours")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale s")
    budget = p.add_mutually_exclusive_group()  # default: the same FLOPs for each UNet (FULL's unet_tflop)
    budget.add_argument("--seconds", type=float, help="each UNet trains this many wall-clock seconds instead")
    budget.add_argument("--fixed-steps", type=step_pair, default=(), metavar="PIXEL,LATENT", help="or these steps")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--out", help="folder for the figures: figures/, or runs/quick/ with --quick")
    p.add_argument("--run-dir", help="checkpoint folder: runs/07/, or runs/quick/07/ with --quick")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    args = p.parse_args(argv)
    if args.seconds is not None and not args.seconds > 0 or not 0 <= args.colour_jitter <= 1:
        p.error(f"--seconds must be > 0 and --colour-jitter in [0, 1] (got {args.seconds}, {args.colour_jitter:g})")
    args.out = args.out or ("runs/quick" if args.quick else "figures")
    args.run_dir = args.run_dir or ("runs/quick/07" if args.quick else "runs/07")
    vars(args).update(QUICK if args.quick else FULL)
    args.latent_batch = args.latent_batch * args.factor ** 2 // 16  # as many latent positions a batch at any --factor
    if args.quick:  # a budget given with --quick stays that kind of budget, but tiny
        args.fixed_steps, args.seconds = args.fixed_steps and (6, 12), args.seconds and 2.0
    return args

# %% Appendix: pieces from earlier lessons
class Parser(argparse.ArgumentParser):  # argparse that reports a user's mistake in one line, exit status 2 (lesson 01)
    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
def step_pair(text):  # argparse type of --fixed-steps: 'PIXEL,LATENT' -> two positive step counts, else one line
    parts = text.split(",")
    if len(parts) != 2 or not all(s.strip().isdigit() and int(s) > 0 for s in parts):
        raise argparse.ArgumentTypeError(f"takes two positive step counts, like 300,1500 (got {text!r})")
    return tuple(int(s) for s in parts)
def pick_device(name):  # auto: cuda, then mps, then cpu; a device that is not there exits 2 with one line (lesson 01)
    have = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d in have if have[d]) if name == "auto" else name
    if not have[name]:
        Parser().error(f"--device {name} was asked for but {name.upper()} is not available; use --device cpu (or auto)")
    return torch.device(name)
def autocast_for(device):  # -> (autocast, name): bf16 on CUDA (TF32 on) and on CPUs with AVX512-BF16 or AMX units,
    # not plain AVX-512, where oneDNN emulates bf16 slowly (lesson 04)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = device.type == "cuda"
    units = any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and units
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16), "bf16") if bf16 else (nullcontext, "fp32")
def save_checkpoint(path, ckpt):  # atomic: a crash mid-write never leaves a half checkpoint at path (lesson 04)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)
def diffusion_loss(model, data, labels, alpha_bar, batch, gen, autocast):  # 04's v, min-SNR-5; labels dropped (06)
    device, idx = alpha_bar.device, torch.randint(len(data), (batch,), generator=gen)
    x0, y = data[idx].to(device), labels[idx].to(device)
    y = torch.where(torch.rand(batch, generator=gen).to(device) < P_UNCOND, model.num_classes, y)  # the null label
    t = torch.randint(len(alpha_bar), (batch,), generator=gen).to(device)
    eps, ab = torch.randn(x0.shape, generator=gen).to(device), alpha_bar[t].float().view(-1, 1, 1, 1)
    with autocast():
        out = model(q_sample(x0, t, alpha_bar, eps), t, y)
    return (min_snr_weight(ab.view(-1)) * (out.float() - v_target(x0, eps, ab)).square().mean((1, 2, 3))).mean()
def train_diffusion(model, data, labels, alpha_bar, args, autocast, gen, budget, marks, name):  # lesson 04's loop
    ema, opt = copy.deepcopy(model).requires_grad_(False), torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0)
    (kind, total, batch), snaps, step, busy = budget, [], 0, 0.0  # ("seconds" | "steps", n, batch) -> (EMAs, img/s)
    while True:
        used = busy if kind == "seconds" else step
        if any(used >= m for m in marks):  # one slow step can pass several marks: one copy for them all
            marks = [m for m in marks if used < m]
            snaps.append((busy, step, copy.deepcopy(ema.state_dict())))
        if used >= total:
            break
        tic = time.perf_counter()
        loss = diffusion_loss(model, data, labels, alpha_bar, batch, gen, autocast)
        steps = total if kind == "steps" else max(step + 1, step * total / max(busy, 1e-9))  # by the clock: estimated
        train_step(model, ema, opt, loss, step, learning_rate(step, steps, LR, args.warmup))  # the cosine ends at 0
        if alpha_bar.device.type == "cuda":
            torch.cuda.synchronize()
        busy, step = busy + time.perf_counter() - tic, step + 1
        if step % 20 == 0:
            print(f"\r  {name}: step {step}  loss {loss:.4f}  {step * batch / busy:.0f} img/s ", end="", flush=True)
    print()
    return snaps, step * batch / max(busy, 1e-9)
def learning_rate(step, steps, lr, warmup):  # a linear warmup, then a cosine to 0 over the run (lesson 04)
    return lr * min(1.0, (step + 1) / max(1, warmup)) * (1 + math.cos(math.pi * step / steps)) / 2
def train_step(model, ema, opt, loss, step, lr):  # an AdamW step at lr, gradient norm clipped at 1, power EMA (04)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    decay = (1 - 1 / (step + 1)) ** (EMA_GAMMA + 1)  # ema: the average of the weights w_s weighted by s^gamma
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)  # ema = decay * ema + (1 - decay) * w
def flops(net, *inputs):  # FLOPs of one call, counted by PyTorch: a multiply-add counts 2 (lesson 03)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(*inputs)
    return counter.get_total_flops()
def cosine_betas(T, s=0.008):  # improved DDPM's: alpha_bar_t = f(t) / f(0), betas clipped at 0.999 (lesson 01)
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)
def alpha_bar_of(betas):  # alpha_bar_t = prod_{s<=t} (1 - beta_s) (lesson 01)
    return torch.cumprod(1 - betas, dim=0)
def q_sample(x0, t, alpha_bar, noise):  # x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise (lesson 01)
    ab = alpha_bar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # [B, 1, 1, 1]
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
            pts = [(q, a + 2 * math.pi * j / len(radii)) for j, q in enumerate(radii)]
            ImageDraw.Draw(img).polygon([(cx + q * math.cos(b), cy + q * math.sin(b)) for q, b in pts], fill=255)
        masks[i] = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255
        captions.append(f"a {size_names[size_i[i]]} {color_names[color_i[i]]} {kind} "
                        f"{'in the' if pos_i[i] == 4 else 'at the'} {POSITIONS[pos_i[i]]}")
    rgb = np.array([COLORS[c] for c in color_names], dtype=np.float32)  # [6, 3]
    images = masks[:, None] * rgb[color_i][:, :, None, None]  # [n, 1, H, W] * [n, 3, 1, 1] -> [n, 3, H, W]
    return torch.from_numpy(np.rint(images).astype(np.uint8)), torch.from_numpy(shape_i.astype(np.int64)), captions
def to_unit(images):  # uint8 [0, 255] -> float [-1, 1], the range diffusion models are trained in (lesson 01)
    return images.float() / 127.5 - 1
def to_uint8(x):  # float [-1, 1] -> uint8 [0, 255], values outside clipped (lesson 01)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
def v_target(x0, eps, ab):  # lesson 04's target v = sqrt(ab) eps - sqrt(1 - ab) x_0; ab = alpha_bar_t [B, 1, 1, 1]
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0
def eps_x0_of_v(v, x_t, ab):  # the UNet's v -> (eps_hat, x0_hat): the inverse of q_sample and v_target (lesson 04)
    return (1 - ab).sqrt() * x_t + ab.sqrt() * v, ab.sqrt() * x_t - (1 - ab).sqrt() * v
def min_snr_weight(ab, gamma=5.0):  # min(SNR, gamma) on the x_0 error: min(SNR, gamma) / (1 + SNR) on v's (lesson 04)
    snr = ab / (1 - ab)
    return snr.clamp(max=gamma) / (snr + 1)
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
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # (time + label) embedding -> per-channel (scale, shift)
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

class UNet(nn.Module):  # v_theta(x_t, t, y): 06's class UNet, 2 ResBlocks a level down, 3 up, attention at 2 (03)
    def __init__(self, in_ch=3, base_ch=32, ch_mult=(1, 2, 2), num_classes=0):
        super().__init__()
        self.base_ch, self.num_classes, emb_dim = base_ch, num_classes, 4 * base_ch
        self.time_mlp = nn.Sequential(nn.Linear(base_ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None  # the last: null label
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
        self.mid, self.up = nn.ModuleList([ResBlock(ch, ch, emb_dim, True), ResBlock(ch, ch, emb_dim)]), nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(3):
                self.up.append(ResBlock(ch + chans.pop(), base_ch * mult, emb_dim, attn=level == 2))
                ch = base_ch * mult
            if level > 0:  # Upsample: nearest x2, then a 3x3 conv
                self.up.append(nn.Sequential(OrderedDict(up=nn.Upsample(scale_factor=2),
                                                         conv=nn.Conv2d(ch, ch, 3, padding=1))))
        self.norm_out, self.conv_out = group_norm(ch), nn.Conv2d(ch, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the untrained net predicts 0: loss starts at E[target^2]
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, y=None):
        emb = self.time_mlp(timestep_embedding(t, self.base_ch))  # [B, 4 base_ch]
        emb = emb if self.label_emb is None else emb + self.label_emb(y)
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

def guided_eps(model, x, t, y, scale):  # CFG out_u + scale (out_c - out_u), the model's parametrisation (lesson 06)
    y_null = torch.full_like(y, model.num_classes)
    if scale in (0, 1):  # exactly out_u or out_c
        return model(x, t, y if scale else y_null)
    out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).float().chunk(2)  # one pass
    return torch.lerp(out_u, out_c, scale)
@torch.no_grad()
def ddim_sample(model, x, alpha_bar, steps, autocast=nullcontext, clip=True, t_start=None, known=None, mask=None,
                generator=None):  # 04's DDIM x_T -> x_0 for a v model; from t_start: SDEdit; known, mask: inpainting
    ts = torch.linspace(len(alpha_bar) - 1 if t_start is None else t_start, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        ab = alpha_bar[t].to(x.device, torch.float32).view(1, 1, 1, 1)
        with autocast():
            out = model(x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
        eps, x0 = eps_x0_of_v(out.float(), x, ab)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # keep eps consistent with the clipped x0
        ab_next = alpha_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0  # the last step lands on x_0
        x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps
        if known is not None:  # z_s <- m * q(known at s) + (1 - m) * z_s
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x = mask * (math.sqrt(ab_next) * known + math.sqrt(1 - ab_next) * noise) + (1 - mask) * x
    return x

def train_classifier(images, labels, n_classes, device, steps, seed):  # 04's judge: a small CNN, Adam on real images
    body = nn.Sequential(  # -> 128-d features, what the Frechet distance compares
        nn.Conv2d(images.shape[1], 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.GroupNorm(8, 128), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    clf = nn.Sequential(OrderedDict(body=body, head=nn.Linear(128, n_classes))).to(device)  # features -> classes
    opt, g = torch.optim.Adam(clf.parameters(), 2e-3), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(images), (128,), generator=g)
        loss = F.cross_entropy(clf(to_unit(images[idx]).to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()
@torch.no_grad()
def features_and_classes(clf, x, device):  # features (float64, CPU) and predicted classes of x in [-1, 1] (lesson 04)
    f = clf.body(x.to(device))  # [N, 128], one batch here
    return f.double().cpu(), clf.head(f).argmax(1).cpu()
def frechet_distance(f1, f2):  # |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) of features [N, D] (lesson 04)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, V = torch.linalg.eigh(s1)
    s1_half = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((f1.mean(0) - f2.mean(0)).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross).item()

def grid(path, x_uint8, nrow, title, row_labels=(), col_labels=()):  # a titled grid, upscaled 3x (the drawing kit)
    g = make_grid(x_uint8, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()  # [H', W', 3]
    img = Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.Resampling.NEAREST)
    f = ImageFont.load_default(size=14)
    left, top = max((int(f.getlength(s)) + 12 for s in row_labels), default=8), 50 if col_labels else 32
    canvas = Image.new("RGB", (img.width + left + 8, img.height + top + 8), "white")
    canvas.paste(img, (left, top))
    d = ImageDraw.Draw(canvas)
    d.text((canvas.width // 2, 6), title, fill="black", font=ImageFont.load_default(size=16), anchor="ma")
    for i, s in enumerate(col_labels):  # labels centred over evenly spaced columns and rows
        d.text((left + (i + 0.5) * img.width / len(col_labels), top - 4), s, fill="black", font=f, anchor="md")
    for i, s in enumerate(row_labels):
        d.text((left - 6, top + (i + 0.5) * img.height / len(row_labels)), s, fill="black", font=f, anchor="rm")
    canvas.save(path)

if __name__ == "__main__":
    main()
