"""Lesson 07: latent diffusion, guidance in latent space, editing, and fine-tuning with LoRA.

The ideas behind Stable Diffusion (Rombach et al. 2022), at a scale that trains on a laptop CPU.
1. An autoencoder: a small convolutional VAE maps x (3 x 32 x 32) to a latent z (4 x 8 x 8 with --factor 4:
   12x fewer numbers) and back. Its encoder gives q(z | x) = N(mu, sigma^2); the loss is reconstruction plus
   a small KL term (Kingma & Welling 2014) that keeps the latent space smooth without blurring:
       L = mean (x - D(z))^2 + KL_WEIGHT * mean KL,  z = mu + sigma * eps,
       KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)   (0 when mu = 0, sigma = 1)
   Part of its images get random colours (--colour-jitter): fine-tuning (5) cannot teach a colour that the
   autoencoder cannot represent.
2. The latent scale factor: diffusion assumes data of unit variance, which the KL term does not give, so
   latents are multiplied by scale = 1 / std(mu) over the training set (SD's 0.18215).
3. Diffusion in latent space: lesson 06's class-conditional UNet with classifier-free guidance,
       eps_guided = eps(z_t, t, null) + s * (eps(z_t, t, y) - eps(z_t, t, null)),
   trained with lesson 04's objective (v, min-SNR-5, cosine schedule) on the scaled latents; DDIM gives z_0
   and the decoder x = D(z_0 / scale). Measured against the same UNet trained on pixels for the same time:
   images per second, lesson 04's Frechet distance, and the class accuracy of guided samples.
4. Editing. SDEdit (Meng et al. 2022): noise an image's latent to t, denoise it under another label.
   Inpainting: after every DDIM step the known part is the known latent noised to that step,
       z_s <- m * (sqrt(ab_s) z_known + sqrt(1 - ab_s) eps) + (1 - m) * z_s   (the last step keeps it exactly)
5. LoRA (Hu et al. 2022): freeze the UNet, learn low-rank updates of its attention projections, convolutions
   and embedding layers: W' = W + (alpha / r) B A, A: r x in (random), B: out x r (zeros: W' = W at the
   start). It teaches the model a colour it never saw (orange); the adapter is saved alone, then merged.

    python 07_latent.py                  # under 20 min on a 2-core CPU
    python 07_latent.py --quick          # seconds: a smoke test (figures in runs/quick/, models in runs/quick/07/)
    python 07_latent.py --factor 8       # 4 x 4 x 4 latents (or --factor 2: 16 x 16 x 4)
    python 07_latent.py --fixed-steps 300,1500   # step budgets instead of --seconds: the same numbers every run

It writes runs/07/{vae,pixel,latent,lora}.pt and figures/07_{recon,samples,sdedit,inpaint,lora}.png.
"""

# %% Setup: imports and the lesson's settings
import argparse
import copy
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

FORMAT = "dmfs-07-v1"  # checkpoint format tag
ORANGE = (255, 140, 0)  # the colour the base model never sees; LoRA teaches it
Z_CH, VAE_CH, VAE_LR, KL_WEIGHT = 4, 16, 3e-3, 1e-4  # latent channels, VAE width, its learning rate, KL weight
CH_MULT = (1, 2, 2)  # UNet levels, the same for both models: 32, 16, 8 pixels or 8, 4, 2 latents (--factor 4)
LR, EMA_DECAY, P_UNCOND = 1e-3, 0.999, 0.1  # lesson 04's training; label dropout for classifier-free guidance
LORA_RANK, LORA_ALPHA, LORA_LR = 2, 2.0, 3e-3
FULL = dict(n_images=10_000, vae_steps=1600, base_ch=32, batch=64, warmup=100, sample_steps=20, eval_samples=250,
            clf_steps=300, lora_images=300, lora_steps=600, lora_samples=200)  # a fifth of the images held out
QUICK = dict(n_images=600, vae_steps=40, base_ch=16, batch=16, warmup=5, sample_steps=4, eval_samples=40,
             clf_steps=30, lora_images=32, lora_steps=10, lora_samples=40)  # --quick: a smoke test


# %% 1. The autoencoder: a small KL-regularised convolutional VAE
class VAEBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))): a residual block without time embedding. Shape kept."""

    def __init__(self, ch):
        super().__init__()
        self.net = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                 group_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.net(x)


class VAE(nn.Module):
    """Encoder (B, 3, S, S) -> mu, logvar (B, z_ch, S/f, S/f); decoder back. f = factor (2, 4 or 8):
    log2(f) stride-2 convs down, as many nearest-upsample + conv steps up; width ch, 2ch, 4ch, ..."""

    def __init__(self, in_ch=3, z_ch=4, factor=4, ch=32):
        super().__init__()
        n = int(math.log2(factor))
        widths = [ch * min(2 ** i, 4) for i in range(n + 1)]
        enc = [nn.Conv2d(in_ch, widths[0], 3, padding=1)]
        for i in range(n):  # (B, w_i, S, S) -> (B, w_i+1, S/2, S/2)
            enc += [VAEBlock(widths[i]), nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)]
        enc += [VAEBlock(widths[n]), group_norm(widths[n]), nn.SiLU(), nn.Conv2d(widths[n], 2 * z_ch, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(z_ch, widths[n], 3, padding=1), VAEBlock(widths[n])]
        for i in reversed(range(n)):  # (B, w_i+1, s, s) -> (B, w_i, 2s, 2s)
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(widths[i + 1], widths[i], 3, padding=1),
                    VAEBlock(widths[i])]
        dec += [group_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], in_ch, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.scale = 1.0  # the latent scale factor, set after training (diffusers: vae.config.scaling_factor)

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x, generator=None):
        mu, logvar = self.encode(x)
        noise = torch.randn(mu.shape, generator=generator).to(mu.device)
        z = mu + (0.5 * logvar).exp() * noise  # the reparameterisation trick: z ~ N(mu, sigma^2), differentiable
        return self.decode(z), mu, logvar


def kl_divergence(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) per element, averaged: 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)."""
    return 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean()


def latent_scale(z):
    """1 / std of a batch of latents: multiplying by it gives unit variance (SD's 0.18215)."""
    return 1.0 / z.float().std().item()


def train_vae(vae, images, args, device, autocast, gen):
    """Adam on reconstruction + KL_WEIGHT * KL, with a cosine-decayed learning rate."""
    opt = torch.optim.Adam(vae.parameters(), VAE_LR)
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = VAE_LR * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        x = to_unit(images[torch.randint(len(images), (args.batch,), generator=gen)])
        # random channel gains on part of the batch: the VAE learns colours beyond the data's six (as SD's VAE)
        gain = torch.rand(len(x), 3, 1, 1, generator=gen) * 1.1
        jitter = (torch.rand(len(x), 1, 1, 1, generator=gen) < args.colour_jitter).float()
        x = (jitter * ((x + 1) * gain - 1).clamp(-1, 1) + (1 - jitter) * x).to(device)
        with autocast():
            x_hat, mu, logvar = vae(x, gen)
        rec, kl = (x_hat.float() - x).square().mean(), kl_divergence(mu.float(), logvar.float())
        opt.zero_grad(set_to_none=True)
        (rec + KL_WEIGHT * kl).backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == args.vae_steps:
            print(f"\r  VAE step {step + 1}/{args.vae_steps}  reconstruction {rec.item():.4f}  KL {kl.item():.2f}",
                  end="", flush=True)
    print()
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images, device, batch=500):
    """uint8 images [N, 3, S, S] -> posterior means [N, z_ch, S/f, S/f] (unscaled, on the CPU) and mean sigma."""
    mus, sig = [], 0.0
    for i in range(0, len(images), batch):
        mu, logvar = vae.encode(to_unit(images[i:i + batch]).to(device))
        mus.append(mu.float().cpu())
        sig += (0.5 * logvar.float()).exp().sum().item()
    return torch.cat(mus), sig / sum(m.numel() for m in mus)


# %% 2. Sampling in latent space: guided DDIM, then the decoder
@torch.no_grad()
def generate(model, y, x_T, alpha_bar, args, autocast, vae=None, steps=None, t_start=None, batch=250):
    """Guided DDIM from x_T (at t_start: SDEdit) for labels y, decoded x = D(z_0 / scale) if vae -> (x, img/s)."""
    tic, out, device = time.perf_counter(), [], alpha_bar.device
    for i in range(0, len(y), batch):
        yb = y[i:i + batch].to(device)
        x = ddim_sample(lambda x, t: guided_eps(model, x, t, yb, args.guidance), x_T[i:i + batch].to(device), alpha_bar,
                        steps or args.sample_steps, "v", autocast, clip=vae is None, t_start=t_start)  # pixels only
        out.append((x if vae is None else vae.decode(x / vae.scale)).float().clamp(-1, 1).cpu())
    return torch.cat(out), len(y) / (time.perf_counter() - tic)


# %% 3. LoRA: low-rank adapters on a frozen model, and a colour to teach
class LoRA(nn.Module):
    """base(x) + (alpha / r) B(A(x)) with base frozen. Linear: A in -> r, B r -> out. Conv2d: A is a
    k x k conv (same stride, padding) to r channels, B a 1 x 1 conv back; B starts at zero."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / rank
        if isinstance(base, nn.Linear):
            self.A = nn.Linear(base.in_features, rank, bias=False)
            self.B = nn.Linear(rank, base.out_features, bias=False)
        else:
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


def add_lora(model, rank, alpha):
    """Freeze the model and wrap attention qkv/proj and ResBlock conv1/conv2/emb in LoRA, in place."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        names = ("qkv", "proj") if isinstance(module, Attention) else \
            ("conv1", "conv2", "emb") if isinstance(module, ResBlock) else ()
        for n in names:
            setattr(module, n, LoRA(getattr(module, n), rank, alpha))
    return model


def merge_lora(model):
    """Replace every LoRA by its merged layer, in place: the state dict is the base model's again."""
    for module in list(model.modules()):
        for n, child in list(module.named_children()):
            if isinstance(child, LoRA):
                setattr(module, n, child.merged())
    return model


def lora_state(model):
    """Only the adapters' weights (names ending in .A.weight / .B.weight)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith((".A.weight", ".B.weight"))}


def train_lora(model, data, labels, alpha_bar, args, autocast, gen):
    """AdamW on the adapters only, with the base model's loss (no warmup, clipping or EMA). Returns the last loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LORA_LR, weight_decay=0)
    model.train()
    for _ in range(args.lora_steps):
        loss = diffusion_loss(model, data, labels, alpha_bar, args.batch, gen, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def recolour(images, captions, rgb):
    """The same shapes in colour rgb: an image is mask * colour, mask = max channel / the colour's (caption's)."""
    peak = torch.tensor([max(COLORS[c.split()[2]]) for c in captions], dtype=torch.float32).view(-1, 1, 1, 1)
    mask = images.float().amax(1, keepdim=True) / peak  # [N, 1, S, S] in [0, 1]
    return (mask * torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)).round().clamp(0, 255).to(torch.uint8)


# %% Experiments: one function per figure or table
def autoencoder(images, labels, held, train, clf, f_real, args, device, autocast, gen):
    """Train the VAE, judge it, set vae.scale; 07_recon.png. -> (vae, scaled training latents, seconds spent)."""
    tic, n, x, y = time.time(), 32 // args.factor, images[held[:len(f_real)]], labels[held[:len(f_real)]]
    vae = VAE(3, Z_CH, args.factor, VAE_CH).to(device)
    print(f"1. VAE {n_params(vae) / 1e6:.2f}M params: 3x32x32 -> {Z_CH}x{n}x{n} ({3 * 32 * 32 / (Z_CH * n * n):.0f}x "
          f"fewer numbers), kl weight {KL_WEIGHT:g}")
    vae = train_vae(vae, images[train], args, device, autocast, gen)
    seconds, mu = time.time() - tic, encode_all(vae, x, device)[0]
    rec = vae.decode(mu.to(device)).float().cpu()
    p, (acc, fd) = psnr(rec, to_unit(x)), score(clf, rec, y, f_real)
    print(f"   trained in {seconds:.0f} s; held-out PSNR {p.mean():.2f} dB (min {p.min():.2f}); on reconstructions "
          f"class accuracy {acc:.1%}, FD {fd:.2f}")
    save_checkpoint(os.path.join(args.run_dir, "vae.pt"), dict(format=FORMAT, config=vars(args),
                                                               model=vae.state_dict(), step=args.vae_steps))
    tic = time.time()
    z_mu, sigma = encode_all(vae, images[train], device)  # the training set, encoded once
    vae.scale = latent_scale(z_mu)
    seconds += time.time() - tic
    print(f"   encoded {len(train)} images in {time.time() - tic:.1f} s: posterior means have std {1 / vae.scale:.4f} "
          f"(mean {z_mu.mean():.3f}), mean sigma {sigma:.4f}; scale factor {vae.scale:.4f}")
    lat = F.interpolate((mu[:8] * vae.scale).clamp(-2.5, 2.5).flatten(0, 1)[:, None] / 2.5, size=32)  # grey: 0
    channels = [to_uint8(lat.view(8, Z_CH, 32, 32)[:, c:c + 1].expand(-1, 3, -1, -1)) for c in range(Z_CH)]
    save(args, "07_recon.png", torch.cat([x[:8], to_uint8(rec[:8])] + channels), 8, f"VAE (f={args.factor}): held-out "
         f"images, reconstructions ({p.mean():.1f} dB), latent channels",
         ["original", "reconstruction"] + [f"z channel {c}" for c in range(Z_CH)])
    return vae, z_mu * vae.scale, seconds


def latent_vs_pixel(x_train, z_train, y_train, vae, clf, f_real, overhead, alpha_bar, args, autocast, gen):
    """The UNet on pixels and on latents, the same budget, judged at EMA snapshots: the table, 07_samples.png."""
    kind, (sp, sl) = ("steps", args.fixed_steps) if args.fixed_steps else ("seconds", (args.seconds,) * 2)
    e2e = sl - overhead if kind == "seconds" else 0  # the latent model is also judged at budget - VAE seconds
    print(f"2. both UNets: pixel for {sp:g} {kind}, latent for {sl:g}; each snapshot judged on {len(f_real)} guided "
          f"samples (s = {args.guidance:g}, DDIM {args.sample_steps} steps)")
    y, final_fd, samples, rates, table = torch.arange(len(f_real)) % len(SHAPES), {}, {}, {}, []
    for name, data, total, marks in [("pixel", x_train, sp, [sp / 2, sp]),
                                     ("latent", z_train, sl, [sl / 4, sl / 2, sl] + [e2e] * (e2e > 0))]:
        torch.manual_seed(args.seed)
        net = UNet(data.shape[1], args.base_ch, CH_MULT, num_classes=len(SHAPES)).to(alpha_bar.device)
        snaps, rate = train_diffusion(net, data, y_train, alpha_bar, args, autocast, gen, (kind, total), marks, name)
        latent, curve = name == "latent", []
        for secs, step, state in snaps:
            net.load_state_dict(state)
            x_T = torch.randn(len(y), *data.shape[1:], generator=torch.Generator().manual_seed(args.seed + 7))
            samples[name], srate = generate(net.eval(), y, x_T, alpha_bar, args, autocast, vae if latent else None)
            acc, fd = score(clf, samples[name], y, f_real)
            curve.append((secs, step, acc, fd))
            print(f"   {name:6} step {step:5d}  {secs:6.0f} s  FD {fd:7.2f}  class accuracy {acc:6.1%}  sampling "
                  f"{srate:6.1f} img/s")
        final_fd[name], rates[name], rows = fd, (rate, srate), [(name, curve[-1])]
        if latent and e2e > 0:  # and the snapshot at which UNet + VAE + encoding seconds make the pixel budget
            rows.append(("latent, VAE counted", min(curve, key=lambda c: abs(c[0] - e2e))))
        table += [f"| {label} | {n_params(net) / 1e6:.2f}M | {rate:.0f} | {srate:.1f} | {step} | {secs:.0f} | "
                  f"{secs + overhead * latent:.0f} | {fd:.2f} | {acc:.1%} |" for label, (secs, step, acc, fd) in rows]
        save_checkpoint(os.path.join(args.run_dir, f"{name}.pt"), dict(format=FORMAT, config=vars(args), ema=state,
                        model=net.state_dict(), step=step, scale=vae.scale if latent else 1.0))
    print("\n| model | UNet params | train img/s | sample img/s | steps | UNet s | total s | FD | class acc |",
          "|---|---|---|---|---|---|---|---|---|", *table, sep="\n")
    (p_train, p_sample), (l_train, l_sample) = rates["pixel"], rates["latent"]
    print(f"VAE training + encoding {overhead:.0f} s; latent/pixel: training {l_train / p_train:.1f}x, sampling "
          f"{l_sample / p_sample:.1f}x the images/s")
    order = torch.cat([torch.nonzero(y == c).flatten()[:8] for c in range(len(SHAPES))])  # 8 per label
    both = torch.cat([to_uint8(samples[n][order].view(len(SHAPES), -1, 3, 32, 32)) for n in ("pixel", "latent")], 1)
    save(args, "07_samples.png", both.flatten(0, 1), 16, f"guided samples (s={args.guidance:g}): pixel UNet, FD "
         f"{final_fd['pixel']:.2f} (left) | latent UNet, FD {final_fd['latent']:.2f} (right)", list(SHAPES))
    return net


def sdedit(net, vae, images, labels, held, clf, alpha_bar, args, autocast):
    """Noise held-out non-star latents to t and denoise them as 'star'; 07_sdedit.png."""
    device, target, fracs = alpha_bar.device, SHAPES.index("star"), (0.3, 0.5, 0.7, 0.9)
    src = held[labels[held] != target][:64]
    z_src, cols = encode_all(vae, images[src], device)[0].to(device) * vae.scale, [images[src[:6]]]
    print(f"3. SDEdit: {len(src)} held-out non-star images, noised to t and denoised as 'star' (s = {args.guidance:g})")
    for frac in fracs:
        t0, g = int(frac * 999), torch.Generator().manual_seed(args.seed + 11)
        z_t = q_sample(z_src, torch.full((len(src),), t0, device=device), alpha_bar,
                       torch.randn(z_src.shape, generator=g).to(device))  # z_t = sqrt(ab) E(x) + sqrt(1 - ab) eps
        x, _ = generate(net, torch.full((len(src),), target), z_t, alpha_bar, args, autocast, vae,
                        max(2, round(args.sample_steps * frac)), t_start=t0)  # DDIM from t0 under "star"
        print(f"   t = {t0:3d}: classified as star {score(clf, x, target)[0]:6.1%}, colour kept "
              f"{colour_kept(x, images[src]):6.1%}, PSNR to the source {psnr(x, to_unit(images[src])).mean():5.2f} dB")
        cols.append(to_uint8(x[:6]))
    save(args, "07_sdedit.png", torch.stack(cols, 1).flatten(0, 1), len(cols), "SDEdit: noise the latent to t, "
         "denoise as 'star'", col_labels=["source"] + [f"t={int(f * 999)}" for f in fracs])


def inpaint(net, vae, images, captions, held, clf, alpha_bar, args, autocast):
    """Keep the left half of a latent, generate the right half under each label; 07_inpaint.png."""
    device, y = alpha_bar.device, torch.arange(len(SHAPES))
    src = held[[("centre" in captions[i]) for i in held.tolist()]][:4]  # shapes the cut goes through
    src = src if len(src) == 4 else held[:4]
    x_src, z_src = to_unit(images[src]), encode_all(vae, images[src], device)[0].to(device) * vae.scale
    mask = torch.zeros(1, 1, *z_src.shape[-2:], device=device)
    mask[..., :mask.shape[-1] // 2] = 1  # known: the left half; the right half is generated
    pix = F.interpolate(mask, size=32).cpu()  # the mask in pixels; the figure draws the unknown half grey
    rows, accs, kept, known_db, err = [], [], [], [], 0.0
    for i in range(len(src)):
        zk, g = z_src[i:i + 1].expand(len(SHAPES), -1, -1, -1), torch.Generator().manual_seed(args.seed + 13)
        z0 = ddim_sample(lambda x, t: guided_eps(net, x, t, y.to(device), args.guidance), torch.randn(
            zk.shape, generator=g).to(device), alpha_bar, args.sample_steps, "v", autocast, clip=False, known=zk,
            mask=mask, generator=g)  # a known region: ddim_sample's inpainting step
        err = max(err, ((z0 - zk) * mask).abs().max().item())
        x = vae.decode(z0 / vae.scale).float().clamp(-1, 1).cpu()
        accs.append(score(clf, x, y)[0])
        kept.append(colour_kept(x, images[src[i:i + 1]]))
        mse = ((x - x_src[i:i + 1]).square() * pix).sum((1, 2, 3)) / (3 * pix.sum())  # on the known pixels
        known_db.append(10 * torch.log10(4 / mse).mean())
        rows += [to_uint8(x_src[i:i + 1]), to_uint8(x_src[i:i + 1] * pix + (1 - pix) * 0.3), to_uint8(x)]
    print(f"   inpainting (latent space, right half of {mask.shape[-1]}x{mask.shape[-1]} unknown): known latent kept "
          f"to {err:.1e}; known pixels {torch.stack(known_db).mean():.2f} dB PSNR to the source (the VAE's error); "
          f"class accuracy of the filled images {np.mean(accs):.1%}, colour kept {np.mean(kept):.1%}")
    save(args, "07_inpaint.png", torch.cat(rows), 2 + len(SHAPES), "latent inpainting: left half kept (re-noised to "
         "t every step), right half generated under each label", col_labels=["source", "known"] + list(SHAPES))


def lora(net, vae, clf, alpha_bar, args, autocast, gen):
    """Teach the frozen latent UNet a colour it never saw (orange); save the adapter, merge it; 07_lora.png."""
    images, labels, captions = make_shapes(args.lora_images, 32, args.seed + 99)
    images = recolour(images, captions, ORANGE)
    z_mu = encode_all(vae, images, alpha_bar.device)[0]
    rec = vae.decode(z_mu.to(alpha_bar.device)).float().cpu()
    print(f"4. LoRA: {len(images)} orange shapes; the frozen VAE reconstructs them at "
          f"{psnr(rec, to_unit(images)).mean():.2f} dB, {colour_kept(rec, len(COLORS)):.0%} still orange (the UNet "
          "can only learn what the autoencoder can represent)")
    base, lora_net = copy.deepcopy(net).requires_grad_(False), add_lora(copy.deepcopy(net), LORA_RANK, LORA_ALPHA)
    n_train, n_all = n_params(lora_net, trainable=True), n_params(base)
    print(f"   rank {LORA_RANK}, alpha {LORA_ALPHA:g}: {n_train:,} trainable parameters, "
          f"{100 * n_train / n_all:.2f}% of the UNet's {n_all:,}")
    tic = time.time()
    loss = train_lora(lora_net, z_mu * vae.scale, labels, alpha_bar, args, autocast, gen)
    print(f"   fine-tuned {args.lora_steps} steps in {time.time() - tic:.0f} s (last loss {loss:.4f})")
    path, weights = os.path.join(args.run_dir, "lora.pt"), os.path.join(args.run_dir, "latent.pt.weights.tmp")
    save_checkpoint(path, dict(format=FORMAT + "-lora", rank=LORA_RANK, alpha=LORA_ALPHA,
                               adapter=lora_state(lora_net.eval())))
    torch.save(base.state_dict(), weights)  # only to compare sizes
    print(f"   adapter saved to {path}: {os.path.getsize(path) / 1024:.0f} KiB, against "
          f"{os.path.getsize(weights) / 1024:.0f} KiB for the UNet's weights")
    os.remove(weights)
    probe = [a.to(alpha_bar.device) for a in (torch.randn(4, *z_mu.shape[1:], generator=gen),
                                              torch.tensor([0, 250, 500, 999]), torch.arange(4))]  # (z_t, t, y)
    with torch.no_grad():
        before, merged = lora_net(*probe), merge_lora(lora_net)  # merged: W + (alpha / r) B A, a plain UNet again
        print(f"   merged into the weights; max |adapters - merged| output {(before - merged(*probe)).abs().max():.1e}")
    y, rows, orange = torch.arange(args.lora_samples) % len(SHAPES), [images[:10]], []
    for name, model in (("before", base), ("after", merged)):
        x_T = torch.randn(len(y), *z_mu.shape[1:], generator=torch.Generator().manual_seed(args.seed + 21))
        x, _ = generate(model, y, x_T, alpha_bar, args, autocast, vae)
        orange.append(colour_kept(x, len(COLORS)))
        print(f"   {name:6}: {orange[-1]:6.1%} of {len(y)} samples orange, class accuracy {score(clf, x, y)[0]:6.1%}")
        rows.append(to_uint8(x[:10]))
    save(args, "07_lora.png", torch.cat(rows), 10, f"LoRA (rank {LORA_RANK}, {100 * n_train / n_all:.1f}% of the "
         f"parameters): orange, {orange[0]:.0%} -> {orange[1]:.0%} of samples",
         ["fine-tuning data", "before (base)", "after (merged)"])


# %% The lesson, start to finish
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bf16 = bf16_supported(device)  # bf16 autocast where the hardware has it (lesson 04)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16 else nullcontext
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.run_dir, exist_ok=True)
    start = time.time()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    alpha_bar = alpha_bar_of(cosine_betas(1000)).to(device)
    images, labels, captions = make_shapes(args.n_images, 32, args.seed)  # a fifth held out for the metrics
    held, train = torch.arange(args.n_images // 5), torch.arange(args.n_images // 5, args.n_images)
    print(f"shapes: {len(train)} training, {len(held)} held-out images | {device}, {'bf16' if bf16 else 'fp32'}")
    clf, f_real = judge(images, labels, held, train, args, device, gen)
    vae, z_train, overhead = autoencoder(images, labels, held, train, clf, f_real, args, device, autocast, gen)
    net = latent_vs_pixel(to_unit(images[train]), z_train, labels[train], vae, clf, f_real, overhead, alpha_bar,
                          args, autocast, gen)
    sdedit(net, vae, images, labels, held, clf, alpha_bar, args, autocast)
    inpaint(net, vae, images, captions, held, clf, alpha_bar, args, autocast)
    lora(net, vae, clf, alpha_bar, args, autocast, gen)
    print(f"wrote 07_recon, 07_samples, 07_sdedit, 07_inpaint and 07_lora (.png) to {args.out}/ and checkpoints to "
          f"{args.run_dir}/; total {time.time() - start:.0f} s")


def parse_args(argv=None):
    """The flags a learner varies; the lesson's other settings are the constants at the top (FULL, or QUICK)."""
    if argv is None and "ipykernel" in sys.modules:  # in Jupyter, sys.argv holds the kernel's own flags
        argv = []
    p = Parser(description="Lesson 07: latent diffusion.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--factor", type=int, default=4, choices=[2, 4, 8], help="VAE downsampling of the 32x32 images")
    p.add_argument("--colour-jitter", type=float, default=0.5, help="fraction of VAE images given random colours")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale s")
    p.add_argument("--seconds", type=float, default=240, help="training budget of each UNet (wall clock)")
    p.add_argument("--fixed-steps", type=step_pair, default=(), metavar="PIXEL,LATENT", help="steps, not --seconds")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--out", help="folder for the figures: figures/, or runs/quick/ with --quick")
    p.add_argument("--run-dir", help="checkpoint folder: runs/07/, or runs/quick/07/ with --quick")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    args = p.parse_args(argv)
    if not args.seconds > 0 or not 0 <= args.colour_jitter <= 1:
        fail(f"--seconds must be positive and --colour-jitter in [0, 1] (got {args.seconds:g}, {args.colour_jitter:g})")
    args.out = args.out or ("runs/quick" if args.quick else "figures")
    args.run_dir = args.run_dir or ("runs/quick/07" if args.quick else "runs/07")
    vars(args).update(QUICK if args.quick else FULL)
    if args.quick:  # a step budget stays one, of quick size
        args.seconds, args.fixed_steps = 2.0, (6, 12) if args.fixed_steps else ()
    return args


# %% Appendix: pieces from earlier lessons
class Parser(argparse.ArgumentParser):
    """argparse that reports a user's mistake in one line and exits with status 2 (lesson 01)."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def step_pair(text):
    """argparse type of --fixed-steps: 'PIXEL,LATENT' -> two positive step counts, else a one-line error."""
    parts = text.split(",")
    if len(parts) != 2 or not all(s.strip().isdigit() and int(s) > 0 for s in parts):
        raise argparse.ArgumentTypeError(f"takes two positive step counts, like 300,1500 (got {text!r})")
    return tuple(int(s) for s in parts)


def fail(message):
    """One line naming the fix, exit status 2, no traceback (lesson 01)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def pick_device(name):
    """auto: cuda, then mps, then cpu; a device that is not there exits 2 (lesson 01)."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not mps):
        fail(f"--device {name} was asked for but {name.upper()} is not available; use --device cpu (or auto)")
    return torch.device(name)


def cpu_has_bf16():
    """bf16 units (AVX512-BF16 or AMX). oneDNN's own check also says yes on AVX-512 CPUs without them, where bf16
    is emulated and slower than fp32 (03_unet.py --bench measures it) (lesson 04)."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def bf16_supported(device):
    """bf16 autocast on CUDA and on CPUs with bf16 units (lesson 04)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def save_checkpoint(path, ckpt):
    """Atomic: a crash mid-write never leaves a half checkpoint at `path` (lesson 04)."""
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def diffusion_loss(model, data, labels, alpha_bar, batch, gen, autocast):
    """Lesson 04's loss (v, min-SNR-5) on a random batch, labels dropped to the null one as in lesson 06."""
    device = alpha_bar.device
    idx = torch.randint(len(data), (batch,), generator=gen)
    x0, y = data[idx].to(device), labels[idx].to(device)
    y = torch.where(torch.rand(batch, generator=gen).to(device) < P_UNCOND, model.num_classes, y)
    t = torch.randint(len(alpha_bar), (batch,), generator=gen).to(device)
    eps = torch.randn(x0.shape, generator=gen).to(device)
    ab = alpha_bar[t].float().view(-1, 1, 1, 1)
    with autocast():
        out = model(q_sample(x0, t, alpha_bar, eps), t, y)
    per_sample = (out.float() - target_of("v", x0, eps, ab)).square().mean((1, 2, 3))
    return (loss_weight("min-snr", "v", ab.view(-1)) * per_sample).mean()


def train_diffusion(model, data, labels, alpha_bar, args, autocast, gen, budget, marks, name):
    """Lesson 04's loop (warmup, clipping, EMA) for a budget ("seconds"|"steps", n) -> (EMA at marks, img/s)."""
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    (kind, total), marks, snaps, step, busy = budget, sorted(marks), [], 0, 0.0
    while True:
        used = busy if kind == "seconds" else step
        while marks and used >= marks[0]:
            marks.pop(0)
            if not snaps or snaps[-1][1] != step:  # one slow step can pass several marks: keep one copy
                snaps.append((busy, step, copy.deepcopy(ema.state_dict())))
        if used >= total:
            break
        tic = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / max(1, args.warmup))  # linear warmup
        loss = diffusion_loss(model, data, labels, alpha_bar, args.batch, gen, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # ema = decay * ema + (1 - decay) * w, the decay warming up to EMA_DECAY
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - min(EMA_DECAY, (1 + step) / (10 + step)))
        if alpha_bar.device.type == "cuda":
            torch.cuda.synchronize()
        busy, step = busy + time.perf_counter() - tic, step + 1
        if step % 20 == 0:
            print(f"\r  {name}: step {step}  {busy:.0f} s  loss {loss.item():.4f}  {step * args.batch / busy:.0f} "
                  "img/s ", end="", flush=True)
    print()
    return snaps, step * args.batch / max(busy, 1e-9)


def cosine_betas(T, s=0.008):
    """Improved DDPM's schedule, alpha_bar_t = f(t)/f(0), f(t) = cos^2(((t/T)+s)/(1+s) pi/2) (lesson 01)."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def alpha_bar_of(betas):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (lesson 01)."""
    return torch.cumprod(1 - betas, dim=0)


def q_sample(x0, t, alpha_bar, noise):
    """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise, for a batch of t (lesson 01)."""
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


def target_of(pred, x0, eps, ab):
    """The regression target for pred; ab = alpha_bar_t as [B, 1, 1, 1] (lesson 04)."""
    return {"eps": eps, "x0": x0}[pred] if pred != "v" else ab.sqrt() * eps - (1 - ab).sqrt() * x0


def to_eps_x0(pred, out, x_t, ab):
    """The network's output -> (eps_hat, x0_hat), whatever it predicts (lesson 04)."""
    if pred == "eps":
        return out, (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    if pred == "x0":
        return (x_t - ab.sqrt() * out) / (1 - ab).sqrt(), out
    return (1 - ab).sqrt() * x_t + ab.sqrt() * out, ab.sqrt() * x_t - (1 - ab).sqrt() * out  # from v


def loss_weight(kind, pred, ab, gamma=5.0):
    """Per-sample weight: 1, or min-SNR-gamma for the target pred (Hang et al. 2023; lesson 04)."""
    if kind == "none":
        return torch.ones_like(ab)
    snr = ab / (1 - ab)
    return {"eps": snr.clamp(max=gamma) / snr, "x0": snr.clamp(max=gamma), "v": snr.clamp(max=gamma) / (snr + 1)}[pred]


def timestep_embedding(t, dim):
    """t int64 [B] -> [B, dim]: sin and cos of t at frequencies 1 to 1/10000 (lesson 03)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, dim]


def group_norm(ch):
    """GroupNorm with up to 32 groups (lesson 03)."""
    return nn.GroupNorm(math.gcd(32, ch), ch)


class ResBlock(nn.Module):
    """skip(x) + conv(SiLU(GN(conv(SiLU(GN(x)))) * (1 + scale) + shift)), then optional attention (lesson 03)."""

    def __init__(self, c_in, c_out, emb_dim, attn_heads=0):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # (time + label) embedding -> per-channel (scale, shift)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out, attn_heads) if attn_heads else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x [B, C_out, 1, 1]
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.attn(self.skip(x) + h)


class Attention(nn.Module):
    """Multi-head self-attention among the H*W positions of a feature map, with a residual (lesson 03)."""

    def __init__(self, ch, heads=4):
        super().__init__()
        self.heads, self.norm = heads, group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(3, 4).unbind(1)  # 3 x [B, heads, HW, C/heads]
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
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
    """eps_theta(x_t, t, y): lesson 06's class UNet (attention at level 2 and in the middle; null label num_classes)."""

    def __init__(self, in_ch=3, base_ch=32, ch_mult=(1, 2, 2), num_classes=0):
        super().__init__()
        self.base_ch, self.num_classes, emb_dim = base_ch, num_classes, 4 * base_ch
        self.time_mlp = nn.Sequential(nn.Linear(base_ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_ch, base_ch, 3, padding=1)
        self.down, chans, ch = nn.ModuleList(), [base_ch], base_ch  # chans: every skip's channels, in order
        for level, mult in enumerate(ch_mult):
            for _ in range(2):
                self.down.append(ResBlock(ch, base_ch * mult, emb_dim, 4 * (level == 2)))
                ch = base_ch * mult
                chans.append(ch)
            if level < len(ch_mult) - 1:
                self.down.append(Downsample(ch))
                chans.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, 4), ResBlock(ch, ch, emb_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(3):
                self.up.append(ResBlock(ch + chans.pop(), base_ch * mult, emb_dim, 4 * (level == 2)))
                ch = base_ch * mult
            if level > 0:
                self.up.append(Upsample(ch))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the untrained net predicts 0: loss starts at E[target^2]
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, y=None):
        emb = self.time_mlp(timestep_embedding(t, self.base_ch))  # [B, 4 base_ch]
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
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


def guided_eps(model, x, t, y, scale):
    """Classifier-free guidance out_u + scale (out_c - out_u), in the model's parametrisation, one pass (lesson 06)."""
    y_null = torch.full_like(y, model.num_classes)
    if scale == 0:
        return model(x, t, y_null)
    if scale == 1:
        return model(x, t, y)
    out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).float().chunk(2)
    return torch.lerp(out_u, out_c, scale)


@torch.no_grad()
def ddim_sample(model, x_T, alpha_bar, steps, pred, autocast=nullcontext, clip=True, t_start=None,
                known=None, mask=None, generator=None):
    """Lesson 04's DDIM x_T -> x_0, from t_start for SDEdit; with known and mask, this lesson's inpainting step."""
    ts = torch.linspace(len(alpha_bar) - 1 if t_start is None else t_start, 0, steps).round().long().tolist()
    x = x_T
    for i, t in enumerate(ts):
        ab = alpha_bar[t].to(x.device, torch.float32).view(1, 1, 1, 1)
        with autocast():
            out = model(x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
        eps, x0 = to_eps_x0(pred, out.float(), x, ab)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # keep eps consistent with the clipped x0
        ab_next = alpha_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0  # the last step lands on x_0
        x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps
        if known is not None:  # z_s <- m * q(known at s) + (1 - m) * z_s
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x = mask * (math.sqrt(ab_next) * known + math.sqrt(1 - ab_next) * noise) + (1 - mask) * x
    return x


class Classifier(nn.Module):
    """A small CNN; its 128-d penultimate features are what the Frechet distance compares (lesson 04)."""

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
    """A few hundred steps of Adam on real images in [-1, 1] (lesson 04)."""
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
    """The classifier's features (float64) and predicted classes for images x in [-1, 1] (lesson 04)."""
    feats, classes = [], []
    for i in range(0, len(x), batch):
        f = clf.body(x[i:i + batch].to(device))
        feats.append(f.double().cpu())
        classes.append(clf.head(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(classes)


def frechet_distance(f1, f2):
    """FD between Gaussians fitted to feature sets [N, D] (float64), via eigenvalues (lesson 04)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, V = torch.linalg.eigh(s1)
    s1_half = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross).item()


# This lesson's measuring and saving helpers
def judge(images, labels, held, train, args, device, gen):
    """Lesson 04's metric: a classifier of the training images, held-out features, the FD floor and ceiling."""
    n = min(args.eval_samples, len(held) // 2)
    clf = train_classifier(images[train], labels[train], len(SHAPES), device, args.clf_steps, args.seed)
    f_real, c_real = features_and_classes(clf, to_unit(images[held[:n]]), device)
    f_real2, _ = features_and_classes(clf, to_unit(images[held[n:2 * n]]), device)
    f_noise, _ = features_and_classes(clf, torch.randn(n, 3, 32, 32, generator=gen).clamp(-1, 1), device)
    print(f"classifier accuracy on held-out {(c_real == labels[held[:n]]).float().mean():.1%}; FD floor (real vs real) "
          f"{frechet_distance(f_real2, f_real):.2f}, ceiling (noise vs real) {frechet_distance(f_noise, f_real):.2f}")
    return clf, f_real


def psnr(a, b):
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2), per image [N]."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-10))


def nearest_colour(x_uint8):
    """Index into list(COLORS) + ["orange"] of the nearest colour to an image's foreground: the mean
    chromaticity (rgb / max channel) of its pixels brighter than half its brightest. [N] int64."""
    x = x_uint8.float()
    bright = x.amax(1)  # [N, S, S]
    fg = (bright > 0.5 * bright.amax((1, 2), keepdim=True)).float().unsqueeze(1)  # [N, 1, S, S]
    chroma = ((x / bright.clamp(min=1).unsqueeze(1)) * fg).sum((2, 3)) / fg.sum((2, 3)).clamp(min=1)  # [N, 3]
    palette = torch.tensor([*COLORS.values(), ORANGE], dtype=torch.float32)
    return torch.cdist(chroma, palette / palette.amax(1, keepdim=True)).argmin(1)


def score(clf, x, y, f_real=None):
    """Class accuracy of images x in [-1, 1] for labels y, and their FD to the real features f_real if given."""
    f, c = features_and_classes(clf, x, next(clf.parameters()).device)
    return (c == y).float().mean().item(), None if f_real is None else frechet_distance(f, f_real)


def colour_kept(x, ref):
    """The fraction of images x in [-1, 1] whose colour is ref's: a colour index, or that of uint8 images ref."""
    ref = nearest_colour(ref) if torch.is_tensor(ref) else ref
    return (nearest_colour(to_uint8(x)) == ref).float().mean().item()


def n_params(model, trainable=False):
    """The number of parameters (only those that get gradients, with trainable=True)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def save(args, name, x_uint8, nrow, title, row_labels=(), col_labels=()):
    """A titled image grid (the drawing kit's grid), saved as args.out/name."""
    grid(x_uint8, nrow, title, row_labels, col_labels).save(os.path.join(args.out, name))


# The drawing kit (lesson 01), with PIL: matplotlib is not a dependency
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


if __name__ == "__main__":
    main()
