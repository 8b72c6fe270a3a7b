"""Lesson 06: conditioning. How to ask a diffusion model for *something*, a class ("a star") or a sentence
("a small red triangle at the top left"), and what guidance trades for it. Pieces from 01-05: the appendix.

1. Class labels: a label embedding is added to the time embedding, so every residual block's scale and
   shift depend on (t, y). Its extra row is the null label; label dropout (probability P_UNCOND) trains
   it, so one network learns both eps(x_t, t, y) and eps(x_t, t, null).
2. Classifier-free guidance (Ho & Salimans 2022), both outputs from one pass over a doubled batch:
       out = out(x_t, t, null) + s (out(x_t, t, y) - out(x_t, t, null))
   s = 0 is unconditional, s = 1 conditional, s > 1 pushes towards "this class". Papers also write
   (1 + w) out_c - w out_u with w = s - 1, or lerp(out_u, out_c, s): all are (1 - s) out_u + s out_c.
3. Classifier guidance (Dhariwal & Nichol 2021): a classifier of noisy images p(y | x_t, t) steers the
   unconditional model:  eps_hat = eps(x_t, t, null) - s sqrt(1 - ab_t) grad_x log p(y | x_t, t).
4. The trade-off, measured for both methods at their own scales: class accuracy of the samples (a clean
   classifier judges them) and their Frechet distance to real images on its features (as in 04).
5. Text: a word-level tokenizer over the shapes' captions, a small transformer encoder trained with the
   UNet by the diffusion loss alone, cross-attention softmax(Q K^T / sqrt(d) + mask) V from the UNet's
   8x8 features to the tokens (padding masked out), and the mean token feature added to the time
   embedding. Pairs held out of its captions (HOLDOUT) test whether words compose. It trains with min-snr+1,
   1 + min(SNR, 5) on the x_0 error (--text-loss-weight): min-SNR starves the noisiest steps, where colour is decided.

    python 06_condition.py                                # everything: 77 TFLOP, 20 min at 64 GFLOP/s
    python 06_condition.py --prompt "a large green star"  # draw from a caption (reuses runs/06/text.pt)
    python 06_condition.py --quick                        # seconds: a smoke test, written to runs/quick/

Models are saved in runs/06 and reused by a later run with the same settings (--retrain trains again). Writes
figures/06_cfg_grid.png, 06_classifier_guidance.png, 06_text_grid.png, 06_loss.png (06_prompt.png with --prompt);
prints the trade-off table (accuracy and FD per method and scale) and the text accuracy table.
"""
import argparse
import copy
import math
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext, suppress

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

FORMAT = "dmfs-06-v1"  # checkpoint format tag: a file written by another script is not reused
T, PRED = 1000, "v"  # timesteps of the cosine schedule; what the networks predict (as in 04)
CLASS_LOSS_WEIGHT = "min-snr"  # the class model's loss weight (the text model's is --text-loss-weight)
LR, CH_MULT, P_UNCOND = 2e-3, (1, 2, 4), 0.1  # AdamW's peak rate; UNet channels per level; label dropout rate
EMA_GAMMA, SLOW_CPU_FLOPS = 6.94, 64e9  # power EMA, 10% of the run wide (EDM2); FLOP/s of 2 cores without bf16 (04)
TEXT_INIT, TEXT_SCALE = "class", 3.0  # the text UNet starts from the class UNet (or "scratch"); its guidance scale
PAD, START = "<pad>", "<start>"  # the tokenizer's ids 0 and 1
CAPTION_KEEP = (0.5, 0.85, 0.85, 0.5)  # in training, keep a caption's size, colour, shape, place with these odds
HOLDOUT = [("red", "star"), ("green", "circle"), ("blue", "cross"), ("yellow", "triangle"), ("magenta", "square")]
SETTINGS = dict(n_shapes=10_000, base_ch=16, batch_size=16, warmup=100,  # --quick swaps in QUICK's
                text_steps=1500, text_width=64, text_layers=2,  # text model: steps, encoder width and layers
                clf_steps=600, noisy_clf_steps=300,  # the judge; a clean classifier, then as many steps on x_t
                eval_per_class=50, text_per_prompt=12,  # samples per class and scale; per 'a COLOUR SHAPE'
                sample_steps=8, n_prompt=16, grid_cols=6)  # DDIM steps; images for --prompt; per text-grid row
QUICK = dict(n_shapes=1000, batch_size=8, warmup=4, text_steps=12, text_width=16, text_layers=1, clf_steps=4,
             noisy_clf_steps=4, eval_per_class=2, text_per_prompt=1, sample_steps=3, n_prompt=4, grid_cols=2)

# %% Class labels, and label dropout to train the null label
# UNet(num_classes=K) adds label_emb(y), an nn.Embedding(K + 1, emb_dim), to the time embedding; row K is "no
# condition". The appendix's UNet is 03's plus label_emb and the CrossAttention below (each attention ResBlock);
# its train_diffusion (04's loop) passes every batch through drop_condition.
def drop_condition(y, y_null, p, gen):
    """Each condition -> the null one with probability p: labels [B] (y_null scalar) or tokens [B, L] (y_null [L])."""
    drop = (torch.rand(len(y), generator=gen) < p).to(y.device).view(-1, *([1] * (y.dim() - 1)))
    return torch.where(drop, y_null.to(y.device), y)

# %% Classifier-free guidance (Ho & Salimans 2022)
def guided_eps(model, x, t, y, scale, y_null=None):
    """out_u + scale (out_c - out_u) in the model's own output (v: guiding v is guiding eps, which is affine in v
    at fixed x_t). One pass over a doubled batch; scales 0 and 1 return exactly out_u or out_c."""
    y_null = torch.full_like(y, model.num_classes) if y_null is None else y_null.to(y.device).expand_as(y)
    if scale in (0, 1):  # exactly out_u or out_c
        return model(x, t, y if scale else y_null)
    out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).float().chunk(2)
    return torch.lerp(out_u, out_c, scale)  # out_u + scale (out_c - out_u)

# %% Classifier guidance (Dhariwal & Nichol 2021): a classifier of noisy images steers an unconditional model
class NoisyClassifier(nn.Module):
    """p(y | x_t, t): 04's Classifier plus a per-channel shift by t after each GroupNorm, zero at first."""
    def __init__(self, n_classes):
        super().__init__()
        self.body, self.head = Classifier(3, n_classes)  # 04's two halves
        self.chans = [m.num_channels for m in self.body if isinstance(m, nn.GroupNorm)]  # 32, 64, 128
        self.time = nn.Sequential(nn.Linear(32, 128), nn.SiLU(), nn.Linear(128, sum(self.chans)))
        nn.init.zeros_(self.time[2].weight)
        nn.init.zeros_(self.time[2].bias)
    def forward(self, x, t):
        shifts = iter(self.time(timestep_embedding(t, 32)).split(self.chans, dim=1))  # per GroupNorm [B, c]
        for layer in self.body:
            x = layer(x)
            if isinstance(layer, nn.GroupNorm):
                x = x + next(shifts)[:, :, None, None]
        return self.head(x)  # [B, n_classes]
def train_noisy_classifier(images, labels, n_classes, alpha_bar, device, steps, seed):
    """A clean Classifier (as in 04), then as many steps on x_t = q_sample(x_0, t) with t uniform."""
    clf = NoisyClassifier(n_classes).to(device)  # body and head from the clean classifier; the time shifts stay zero
    clf.load_state_dict(train_classifier(images, labels, n_classes, device, steps, seed + 1).state_dict(), strict=False)
    g, opt = torch.Generator().manual_seed(seed + 2), torch.optim.Adam(clf.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(len(images), (128,), generator=g)
        x0, t = to_unit(images[idx]).to(device), torch.randint(len(alpha_bar), (128,), generator=g).to(device)
        x_t = q_sample(x0, t, alpha_bar, torch.randn(x0.shape, generator=g).to(device))
        loss = F.cross_entropy(clf(x_t, t), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()
def classifier_guided_eps(model, clf, x, t, y, scale, alpha_bar):
    """eps(x_t, t, null) - scale sqrt(1 - ab_t) grad_x log p(y | x_t, t), the score of p(x_t) p(y | x_t)^scale
    (eps = -sqrt(1 - ab) grad log p(x_t); Dhariwal & Nichol, eq. 14). Returns eps, not v."""
    ab = alpha_bar[t].to(x.device, torch.float32).view(-1, 1, 1, 1)
    eps = eps_x0_of_v(model(x, t, torch.full_like(y, model.num_classes)).float(), x, ab)[0]  # PRED is "v"
    if scale == 0:
        return eps
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):  # the gradient in fp32
        x_in = x.detach().float().requires_grad_(True)
        log_p = F.log_softmax(clf(x_in, t), dim=1).gather(1, y[:, None]).sum()  # sum over the batch: [B] grads
        (grad,) = torch.autograd.grad(log_p, x_in)
    return eps - scale * (1 - ab).sqrt() * grad

# %% Text: captions as tokens, a small transformer encoder, cross-attention
def caption_variant(caption, keep):
    """The caption without the parts whose keep flag is off: trained on these, 'a green star' means what it says."""
    w = caption.split()  # the parts: size w[1], colour w[2], shape w[3], position w[4:]
    return " ".join(["a"] + [word for part, k in zip([w[1:2], w[2:3], w[3:4], w[4:]], keep) if k for word in part])
def text_training_set(captions, idx, holdout):  # the indices in idx whose caption has no held-out (colour, shape) pair
    return torch.tensor([i for i in idx.tolist() if tuple(captions[i].split()[2:4]) not in holdout], dtype=torch.long)
class Tokenizer:
    """Words -> [START, w_1, ..., w_k, PAD, ...]; the empty caption (the null condition) keeps START to attend to."""
    def __init__(self, captions):
        self.vocab = [PAD, START] + sorted({w for c in captions for w in c.split()})  # ids 0, 1, then the words
        self.ids, self.length = {w: i for i, w in enumerate(self.vocab)}, 1 + max(len(c.split()) for c in captions)
    def encode(self, texts):  # list of str -> int64 [B, length]; an unknown word or a too-long text raises ValueError
        out = torch.zeros(len(texts), self.length, dtype=torch.long)  # PAD = 0
        for b, text in enumerate(texts):
            words = text.lower().split()
            if unknown := [w for w in words if w not in self.vocab[2:]]:
                raise ValueError(f"unknown word {unknown[0]!r}; the vocabulary is: {' '.join(self.vocab[2:])}")
            if len(words) > self.length - 1:
                raise ValueError(f"{text!r} has {len(words)} words; captions have at most {self.length - 1}")
            out[b, :1 + len(words)] = torch.tensor([1] + [self.ids[w] for w in words])
        return out
class TextEncoder(nn.Module):
    """tokens [B, L] -> (features [B, L, width], mask [B, L]): pre-norm transformer layers, padding masked."""
    def __init__(self, vocab_size, length, width=64, layers=2, heads=4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, width), nn.Embedding(length, width)  # token and position
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks, self.norm = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), nn.LayerNorm(width)
    def forward(self, tokens):
        mask = tokens != 0  # True: a real token (the Transformer's key_padding_mask means the opposite: ~mask)
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))  # [B, L, width]
        return self.norm(self.blocks(h, src_key_padding_mask=~mask)), mask
class CrossAttention(nn.Module):
    """Pixels (queries) attend to tokens (keys, values), padding masked: x (B, C, H, W), ctx (B, L, D) -> like x."""
    def __init__(self, ch, ctx_dim, heads=4):
        super().__init__()
        self.heads, self.norm = heads, group_norm(ch)
        self.q, self.kv, self.proj = nn.Conv2d(ch, ch, 1), nn.Linear(ctx_dim, 2 * ch), nn.Conv2d(ch, ch, 1)
    def forward(self, x, ctx, ctx_mask):
        B, C, H, W = x.shape
        q = self.q(self.norm(x)).reshape(B, self.heads, C // self.heads, H * W).transpose(2, 3)  # [B, h, HW, d]
        k, v = self.kv(ctx).reshape(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 2 x [B, h, L, d]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx_mask[:, None, None, :])  # bool: True may attend
        return x + self.proj(h.transpose(2, 3).reshape(B, C, H, W))
class TextToImage(nn.Module):
    """model(x_t, t, tokens): words through cross-attention, the whole caption (mean token feature) through the
    label_emb slot into every block's scale and shift, where colour is set (as in Imagen and SDXL)."""
    def __init__(self, unet, encoder):
        super().__init__()
        self.unet, self.encoder = unet, encoder
        unet.label_emb = nn.Linear(encoder.pos.embedding_dim, unet.time_mlp[2].out_features)  # pooled -> emb
    def forward(self, x, t, tokens):
        ctx, mask = self.encoder(tokens)  # [B, L, width], [B, L]
        pooled = (ctx * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean of the real tokens: [B, width]
        return self.unet(x, t, y=pooled, ctx=ctx, ctx_mask=mask)
@torch.no_grad()
def warm_start(text_unet, class_unet):
    """Start the text UNet as the class model with the null label: new layers zeroed, as ControlNet does."""
    state = {k: v for k, v in class_unet.state_dict().items() if not k.startswith("label_emb")}
    missing, unexpected = text_unet.load_state_dict(state, strict=False)
    assert not unexpected and all(".cross." in k or k.startswith("label_emb") for k in missing), missing
    for p in [p for m in text_unet.modules() if isinstance(m, CrossAttention) for p in m.proj.parameters()]:
        nn.init.zeros_(p)  # the output projection of every cross-attention
    nn.init.zeros_(text_unet.label_emb.weight)
    text_unet.label_emb.bias.copy_(class_unet.label_emb.weight[class_unet.num_classes])

# %% The models and the classifiers: trained, or reused from the run folder where their settings match
def train_or_load(path, config, module, train_fn, retrain):
    """Loads path's weights (its EMA if any) into module if trained with these settings, else trains, saves -> log."""
    ckpt = None  # none there, unreadable, or --retrain: train
    with suppress(Exception):
        ckpt = None if retrain else torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and ckpt.get("config") == config:
        print(f"reusing {path} ({ckpt.get('step')} steps, the same settings; --retrain to train again)")
    else:
        torch.manual_seed(config["seed"])  # new weights follow the seed alone, not what ran (or was reused) before
        out = train_fn()  # a module, or a checkpoint dict as 04 writes it (model, ema, optimizer, rng, log)
        ckpt = dict(format=FORMAT, config=config, step=config["steps"], **(
            out if isinstance(out, dict) else {"model": out.state_dict()}))
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a crash mid-write never leaves a half checkpoint at `path`
    module.load_state_dict(ckpt.get("ema", ckpt["model"]))
    return ckpt.get("log", {})
def batch(gen, data, idx, batch_size, tokenizer=None):
    """x_0 in [-1, 1] and labels, or tokens of captions shortened at random (CAPTION_KEEP)."""
    idx = idx[torch.randint(len(idx), (batch_size,), generator=gen)]
    if tokenizer is None:
        return to_unit(data[0][idx]), data[1][idx]
    keep = (torch.rand(len(idx), 4, generator=gen) < torch.tensor(CAPTION_KEEP)).tolist()
    return to_unit(data[0][idx]), tokenizer.encode([caption_variant(data[2][i], k) for i, k in zip(idx.tolist(), keep)])
def loss_weight(kind, ab):
    """The weight on a sample's v error: v's error is (1 + SNR) x the x_0 error. "none" keeps that; "min-snr" (04,
    the class model) makes it min(SNR, 5), which starves the noisiest t, where colour is decided; "min-snr+1" clamps
    SNR inside v's own weight, 1 + min(SNR, 5): 1 on v's error where SNR <= 5, 6 / (1 + SNR) above (the text model)."""
    snr = ab / (1 - ab)
    return {"none": torch.ones_like(ab), "min-snr": min_snr_weight(ab),
            "min-snr+1": (snr.clamp(max=5.0) + 1) / (snr + 1)}[kind]
def class_model(args, data, train_idx, alpha_bar, autocast):  # -> (the class-conditional UNet, config, log)
    torch.manual_seed(args.seed)
    unet = UNet(base_ch=args.base_ch, ch_mult=CH_MULT, num_classes=len(SHAPES)).to(alpha_bar.device)
    print(f"class model: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, label embedding "
          f"{len(SHAPES)} classes + null")
    config = dict(what="class", n_images=len(data[0]), seed=args.seed, pred=PRED, loss_weight=CLASS_LOSS_WEIGHT,
                  batch_size=args.batch_size, lr=LR, warmup=args.warmup, ema_gamma=EMA_GAMMA, p_uncond=P_UNCOND,
                  base_ch=args.base_ch, ch_mult=CH_MULT, steps=args.steps)
    log = train_or_load(os.path.join(args.run_dir, "class.pt"), config, unet, lambda: train_diffusion(
        unet, lambda g: batch(g, data, train_idx, args.batch_size), torch.tensor(len(SHAPES)), args.steps,
        CLASS_LOSS_WEIGHT, args.warmup, alpha_bar, autocast, args.seed + 10, "class model"), args.retrain)
    return unet.eval().requires_grad_(False), config, log
def new_text_model(args, tokenizer):  # the UNet with cross-attention (no labels), and the text encoder
    return TextToImage(UNet(base_ch=args.base_ch, ch_mult=CH_MULT, ctx_dim=args.text_width), TextEncoder(
        len(tokenizer.vocab), tokenizer.length, args.text_width, args.text_layers))
def text_model(args, class_unet, class_config, data, train_idx, tokenizer, alpha_bar, autocast):
    """UNet with cross-attention + text encoder -> (model, log, the null condition: empty caption [L])."""
    text_idx = text_training_set(data[2], train_idx, HOLDOUT)
    torch.manual_seed(args.seed + 2)
    model, y_null = new_text_model(args, tokenizer).to(alpha_bar.device), tokenizer.encode([""])[0]  # START, padding
    if TEXT_INIT == "class":
        warm_start(model.unet, class_unet)
    config = dict(class_config, what="text", loss_weight=args.text_loss_weight, steps=args.text_steps,
                  width=args.text_width, layers=args.text_layers, holdout=[" ".join(p) for p in HOLDOUT],
                  vocab=tokenizer.vocab, init=class_config if TEXT_INIT == "class" else "scratch")
    print(f"text model: UNet + encoder {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{len(text_idx)} training captions (held-out pairs removed: {', '.join(' '.join(p) for p in HOLDOUT)})")
    log = train_or_load(os.path.join(args.run_dir, "text.pt"), config, model, lambda: train_diffusion(
        model, lambda g: batch(g, data, text_idx, args.batch_size, tokenizer), y_null, args.text_steps,
        args.text_loss_weight, args.warmup, alpha_bar, autocast, args.seed + 20, "text model"), args.retrain)
    return model.eval().requires_grad_(False), log, y_null
def classifiers(args, data, train_idx, alpha_bar):  # p(y | x_t, t) for classifier guidance; the judge of samples
    x, y, device, K, seed = data[0][train_idx], data[1][train_idx], alpha_bar.device, len(SHAPES), args.seed
    n_noisy, n_clf, config = args.noisy_clf_steps, args.clf_steps, dict(n_images=len(data[0]), seed=seed)
    noisy, clf = NoisyClassifier(K).to(device), Classifier(3, K).to(device)  # clf: the judge
    train_or_load(os.path.join(args.run_dir, "noisy_classifier.pt"), dict(what="noisy", **config, steps=n_noisy),
                  noisy, lambda: train_noisy_classifier(x, y, K, alpha_bar, device, n_noisy, seed), args.retrain)
    train_or_load(os.path.join(args.run_dir, "classifier.pt"), dict(what="judge", **config, steps=n_clf), clf,
                  lambda: train_classifier(x, y, K, device, n_clf, seed), args.retrain)
    return noisy.eval().requires_grad_(False), clf.eval()
def sample(fn, cond, seed, pred, alpha_bar, steps, autocast, batch=100):  # 04's DDIM from seed's noise, 100 at a time
    noise = torch.randn(len(cond), 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # fn(x, t, cond) -> pred
    return torch.cat([ddim_sample(lambda x, t: fn(x, t, cond[i:i + batch].to(x.device)), noise[i:i + batch].to(
        alpha_bar.device), alpha_bar, steps, pred, autocast).clamp(-1, 1).cpu() for i in range(0, len(cond), batch)])
def text_sample(args, model, y_null, tokens, alpha_bar, autocast, seed):  # tokens [N, L] -> images, CFG at TEXT_SCALE
    return sample(lambda x, t, c: guided_eps(model, x, t, c, TEXT_SCALE, y_null), tokens, seed, PRED, alpha_bar,
                  args.sample_steps, autocast)
def run_cost(args, tokenizer):
    """Lesson 04's FLOP count, for this run from scratch (a reused model costs none), an image at a time: training
    3 forwards, a DDIM step 1 (2 for CFG past s = 1; classifier guidance adds the classifier's forward and gradient)."""
    x, t, K = torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), len(SHAPES)
    unet, clf = flops(UNet(base_ch=args.base_ch, ch_mult=CH_MULT, num_classes=K), x, t, t), flops(Classifier(3, K), x)
    text, n = flops(new_text_model(args, tokenizer), x, t, tokenizer.encode([""])), K * args.eval_per_class
    n_text = args.n_prompt if args.prompt is not None else K * len(COLORS) * args.text_per_prompt + 10 * args.grid_cols
    parts = {"class model": 3 * unet * args.batch_size * args.steps,
             "text model": 3 * text * args.batch_size * args.text_steps}
    if args.prompt is None:  # the classifiers train on batches of 128 (the noisy one twice), then read ~30 sets of n
        cg = [s for s in args.cg_scales if s > 0 or 0 not in args.scales]  # CG at s = 0 reuses CFG's samples
        parts["classifiers"] = clf * (3 * 128 * (args.clf_steps + 2 * args.noisy_clf_steps) + 30 * n)
        parts["guidance"] = n * args.sample_steps * (unet * (sum(1 + (s not in (0, 1)) for s in args.scales) + len(cg))
                                                     + 2 * clf * sum(s > 0 for s in cg))
    parts["text sampling"] = text * args.sample_steps * (1 + (TEXT_SCALE not in (0, 1))) * n_text  # table + 10-row grid
    total = sum(parts.values())
    print(f"this run computes {total / 1e12:.1f} TFLOP (" + ", ".join(f"{k} {v / 1e12:.1f}" for k, v in parts.items())
          + f"): {total / SLOW_CPU_FLOPS / 60:.0f} min at the budgets' 64 GFLOP/s (2 CPU cores without bf16 units)")

# %% Experiment 1: guidance measured, both methods, the same noises at every scale
@torch.no_grad()
def measure_guidance(args, unet, noisy, clf, data, held, alpha_bar, autocast):
    """Prints the judge, the noisy classifier by t and the trade-off table (accuracy and FD per method and scale);
    writes 06_cfg_grid.png and 06_classifier_guidance.png, a row per class and m samples per scale."""
    t1, device, K, epc = time.time(), alpha_bar.device, len(SHAPES), args.eval_per_class
    real, y_real = to_unit(data[0][held[:epc * K]]), data[1][held[:epc * K]]
    real_feats, real_pred = features_and_classes(clf, real, device)
    g, x0, acc_by_t, per_class = torch.Generator().manual_seed(args.seed + 5), real[:500].to(device), [], {}
    for t in (0, 250, 500, 750, 900):  # the noisy classifier's accuracy on held-out x_t, by t
        tt = torch.full((len(x0),), t, device=device)
        said = noisy(q_sample(x0, tt, alpha_bar, torch.randn(x0.shape, generator=g).to(device)), tt).argmax(1)
        acc_by_t.append(f"t={t} {(said.cpu() == y_real[:len(x0)]).float().mean():.0%}")
    fd = lambda x: frechet_distance(features_and_classes(clf, x, device)[0], real_feats)  # on the judge's features
    floor, ceil = fd(to_unit(data[0][held[epc * K:2 * epc * K]])), fd(torch.randn(real.shape, generator=g).clamp(-1, 1))
    print(f"judge: accuracy on held-out real {(real_pred == y_real).float().mean():.1%} | noisy classifier accuracy "
          f"by t: {', '.join(acc_by_t)} | {time.time() - t1:.0f} s")
    t1, y, m = time.time(), torch.arange(K).repeat_interleave(epc), min(3, epc)  # class-major labels [K * epc]
    draw = lambda fn, pred: sample(fn, y, args.seed + 777, pred, alpha_bar, args.sample_steps, autocast)
    cfg = {s: draw(lambda x, t, c: guided_eps(unet, x, t, c, s), PRED) for s in args.scales}  # the v output guided
    cg = {s: cfg[0] if s == 0 and 0 in cfg else draw(  # eps, pushed along the noisy classifier's gradient
        lambda x, t, c: classifier_guided_eps(unet, noisy, x, t, c, s, alpha_bar), "eps") for s in args.cg_scales}
    print(f"\nguidance measured ({epc} samples per class and scale, DDIM {args.sample_steps} steps; "
          f"{time.time() - t1:.0f} s). FD floor (real vs real) {floor:.2f}, ceiling (noise) {ceil:.1f}")
    print(f"{'method':>15} {'scale':>6} {'accuracy':>9} {'worst class':>12} {'FD':>7} {'guide says':>11}")
    guide = lambda x: f"{(noisy(x.to(device), 0 * y.to(device)).argmax(1).cpu() == y).float().mean():11.1%}"  # at t=0
    for name, xs, file in (("classifier-free", cfg, "cfg_grid"), ("classifier", cg, "classifier_guidance")):
        for s, x in xs.items():  # (CG at scale 0: the unconditional model, as CFG's)
            feats, said = features_and_classes(clf, x, device)
            per_class[name, s] = per = [(said[y == c] == c).float().mean().item() for c in range(K)]
            print(f"{name:>15} {s:6g} {(said == y).float().mean():9.1%} {min(per):12.1%} "
                  f"{frechet_distance(feats, real_feats):7.2f} " + (guide(x) if name == "classifier" else ""))
        grid(f"{args.out}/06_{file}.png", torch.cat([b[k * epc:k * epc + m] for k in range(K) for b in xs.values()]),
             m * len(xs), f"{name} guidance: a row per class, {m} samples per scale (the same {m} noises at every scale"
             + ("" if xs is cfg else " and in 06_cfg_grid.png") + ")", SHAPES, [f"s = {s:g}" for s in xs], scale=2)
    if per := per_class.get(("classifier-free", 3.0)):
        print(f"target (CFG scale 3, every class >= 95%): {'met' if min(per) >= 0.95 - 1e-6 else 'NOT met'}: "
              + ", ".join(f"{c} {a:.0%}" for c, a in zip(SHAPES, per)))

# %% Experiment 2: text, on the colour-shape pairs it saw and on the held-out ones
def colour_of(x):  # [B, 3, H, W] -> [B] into COLORS: mean RGB of the brighter pixels, nearest palette colour by cosine
    u = (x.clamp(-1, 1) + 1) / 2
    mask = (u.amax(1) >= 0.5 * u.amax((1, 2, 3))[:, None, None]).float()  # pixels at least half the brightest [B, H, W]
    mean = (u * mask[:, None]).sum((2, 3)) / mask.sum((1, 2))[:, None]  # [B, 3]
    return F.cosine_similarity(mean[:, None], torch.tensor(list(COLORS.values()))[None].float(), dim=2).argmax(1)
def measure_text(args, model, y_null, clf, data, held, tokenizer, alpha_bar, autocast):
    """Shape (judge) and colour (pixels) accuracy of 'a COLOUR SHAPE', seen and held out; writes 06_text_grid.png."""
    t1, n, real = time.time(), args.text_per_prompt, held[:args.eval_per_class * len(SHAPES)].tolist()
    exact = (colour_of(to_unit(data[0][real])) == torch.tensor([list(COLORS).index(data[2][i].split()[2])
                                                                for i in real])).float().mean()  # on real images
    asked = [(c, s) for s in SHAPES for c in COLORS for _ in range(n)]  # n samples of each 'a COLOUR SHAPE'
    x = text_sample(args, model, y_null, tokenizer.encode([f"a {c} {s}" for c, s in asked]), alpha_bar, autocast,
                    args.seed + 555)
    shape, colour = features_and_classes(clf, x, alpha_bar.device)[1].tolist(), colour_of(x).tolist()
    ok = torch.tensor([[SHAPES[a] == s, list(COLORS)[b] == c] for (c, s), a, b in zip(asked, shape, colour)])
    unseen = torch.tensor([p in HOLDOUT for p in asked])
    print(f"\ntext model, 'a COLOUR SHAPE' prompts, {n} samples each, guidance scale {TEXT_SCALE:g} ("
          f"{time.time() - t1:.0f} s); colour read from pixels (exact on real images: {exact:.1%}), shape by the judge")
    print(f"{'prompts':>16} {'n':>5} {'shape acc':>10} {'colour acc':>11} {'both':>6}")
    for name, sel in (("seen", ~unseen), ("unseen (held out)", unseen)):
        acc = ok[sel].float().mean(0)  # shape, colour
        print(f"{name:>16} {int(sel.sum()):5d} {acc[0]:10.1%} {acc[1]:11.1%} {ok[sel].all(1).float().mean():6.1%}")
    for c, s in HOLDOUT:
        got = [f"{SHAPES[a]}/{list(COLORS)[b]}" for p, a, b in zip(asked, shape, colour) if p == (c, s)]
        print(f"  'a {c} {s}' (unseen) drew (shape/colour): {', '.join(got)}")
    shows = ["a large blue star", "a small yellow circle at the top left", "a red square in the centre",
             "a cyan triangle at the bottom", "a green cross at the right"] + [f"a {c} {s}" for c, s in HOLDOUT]
    x = text_sample(args, model, y_null, tokenizer.encode([p for p in shows for _ in range(args.grid_cols)]),
                    alpha_bar, autocast, args.seed + 556)
    grid(f"{args.out}/06_text_grid.png", x, args.grid_cols, f"text-conditional samples, guidance scale {TEXT_SCALE:g}",
         [p + (" (unseen pair)" if any(f" {c} {s}" in p for c, s in HOLDOUT) else "") for p in shows])
def save_losses(out, class_losses, text_losses, text_loss_weight):
    """06_loss.png: both training losses, each averaged over windows of len // 100 steps, on a log axis."""
    series = []
    for name, weight, losses in (("class", CLASS_LOSS_WEIGHT, class_losses), ("text", text_loss_weight, text_losses)):
        k = max(1, len(losses) // 100)
        means = [sum(losses[i:i + k]) / k for i in range(0, len(losses) - k + 1, k)]
        series.append((f"{name}: v, {weight}", range(k, len(losses) + 1, k), means))
    line_plot(os.path.join(out, "06_loss.png"), series, "training loss (mean over steps)", "step", "loss (log)")

# %% Main: the class model, the two classifiers, guidance measured; then the text model
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    autocast, precision = autocast_for(device)
    t_start, data = time.time(), make_shapes(args.n_shapes, seed=args.seed)  # (uint8 [N, 3, 32, 32], labels, captions)
    tokenizer = Tokenizer(data[2])
    try:  # a prompt with an unknown word fails now, not after training
        prompt_tokens = tokenizer.encode([args.prompt or ""] * args.n_prompt)
    except ValueError as e:
        fail(f"--prompt: {e}")
    n, n_hold = len(data[0]), min(len(data[0]) // 5, 2000)  # held-out real images for the metrics, the rest to train
    held, train_idx = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tensor_split([n_hold])
    alpha_bar = alpha_bar_of(cosine_betas(T)).to(device)
    for folder in (args.run_dir, args.out):
        os.makedirs(folder, exist_ok=True)
    print(f"shapes: {len(train_idx)} training images (3, 32, 32), {len(SHAPES)} classes, {n_hold} held out | "
          f"{device}, {precision} | pred {PRED}, cosine schedule")
    run_cost(args, tokenizer)
    unet, class_config, class_log = class_model(args, data, train_idx, alpha_bar, autocast)
    if args.prompt is not None:  # only draw from one caption
        model, _, y_null = text_model(args, unet, class_config, data, train_idx, tokenizer, alpha_bar, autocast)
        path = os.path.join(args.out, "06_prompt.png")
        grid(path, text_sample(args, model, y_null, prompt_tokens, alpha_bar, autocast, args.seed + 999),
             min(8, args.n_prompt), f"'{args.prompt}' (guidance scale {TEXT_SCALE:g})")
        print(f"wrote {path}")
        return
    noisy, clf = classifiers(args, data, train_idx, alpha_bar)
    measure_guidance(args, unet, noisy, clf, data, held, alpha_bar, autocast)
    model, text_log, y_null = text_model(args, unet, class_config, data, train_idx, tokenizer, alpha_bar, autocast)
    measure_text(args, model, y_null, clf, data, held, tokenizer, alpha_bar, autocast)
    if class_log.get("losses") and text_log.get("losses"):  # (a reused model has its log)
        save_losses(args.out, class_log["losses"], text_log["losses"], args.text_loss_weight)
    print(f"total {(time.time() - t_start) / 60:.1f} min; wrote 06_cfg_grid.png, 06_classifier_guidance.png, "
          f"06_text_grid.png, 06_loss.png to {args.out}/")
def parse_args(argv=None):
    argv = [] if argv is None and "ipykernel" in sys.modules else argv  # in Jupyter, sys.argv is the kernel's
    p = argparse.ArgumentParser(description="Lesson 06: class labels, guidance and text, trained from scratch.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda message: fail(f"{message} (see --help)")  # one line and exit status 2, not argparse's usage block
    a = p.add_argument
    a("--steps", type=int, default=3000, help="training steps of the class-conditional UNet")
    a("--scales", type=scale_list, default="0,1,3,5", help="CFG scales (0: unconditional, 1: conditional)")
    a("--cg-scales", type=scale_list, default="0,3,10,30", help="classifier-guidance scales (other units)")
    a("--text-loss-weight", default="min-snr+1", choices=["none", "min-snr", "min-snr+1"], help="see loss_weight")
    a("--prompt", default=None, help="only draw from this caption with the text model, e.g. 'a large green star'")
    a("--retrain", action="store_true", help="train again even where the run folder has a model with these settings")
    a("--run-dir", default="runs/06", help="folder of the models (with --quick: runs/quick/06)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    a("--seed", type=int, default=0, help="fixes the data and every random draw")
    a("--out", default="figures", help="folder for the figures (with --quick: runs/quick)")
    a("--quick", action="store_true", help="tiny settings for a smoke test (seconds)")
    args = p.parse_args(argv)
    if args.steps <= 0:
        fail(f"--steps must be positive (got {args.steps})")
    vars(args).update(SETTINGS, **(QUICK if args.quick else {}))
    if args.quick:  # tiny settings; a smoke test never writes over the default figures and models
        args.steps, args.out = min(args.steps, 12), "runs/quick" if args.out == "figures" else args.out
        args.run_dir = os.path.join("runs", "quick", "06") if args.run_dir == "runs/06" else args.run_dir
    return args

# %% Appendix: pieces from earlier lessons
def train_diffusion(model, batch_fn, y_null, steps, weight, warmup, alpha_bar, autocast, seed, name):
    """Lesson 04's training loop plus label dropout; batch_fn(gen) -> (x_0, labels or tokens) -> checkpoint."""
    ema, opt = copy.deepcopy(model).requires_grad_(False), torch.optim.AdamW(model.parameters(), LR, weight_decay=0.0)
    losses, t0, gen = [], time.time(), torch.Generator().manual_seed(seed)
    for step in range(steps):
        x0, y = (a.to(alpha_bar.device) for a in batch_fn(gen))
        y = drop_condition(y, y_null, P_UNCOND, gen)  # classifier-free guidance needs the null condition
        t = torch.randint(len(alpha_bar), (len(x0),), generator=gen).to(x0.device)
        eps, ab = torch.randn(x0.shape, generator=gen).to(x0.device), alpha_bar[t].float().view(-1, 1, 1, 1)
        for group in opt.param_groups:  # a linear warmup, then a cosine from LR to 0 (lesson 04's learning_rate)
            group["lr"] = LR * min(1.0, (step + 1) / max(1, warmup)) * (1 + math.cos(math.pi * step / steps)) / 2
        with autocast():
            out = model(q_sample(x0, t, alpha_bar, eps), t, y)  # v (PRED)
        per_sample = (out.float() - v_target(x0, eps, ab)).square().mean((1, 2, 3))  # [B]
        loss = (loss_weight(weight, ab.view(-1)) * per_sample).mean()
        if not torch.isfinite(loss):
            sys.exit(f"\n{name}: loss is {loss.item()} at step {step}; lower LR (now {LR:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # lesson 04's power EMA: decay = (1 - 1/(step+1))^(gamma+1) weights w_s by s^gamma
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - (1 - 1 / (step + 1)) ** (EMA_GAMMA + 1))  # ema = decay * ema + (1 - decay) * w
        losses.append(loss.item())
        if (step + 1) % 10 == 0 or step + 1 == steps:
            rate = (step + 1) * len(x0) / (time.time() - t0)
            print(f"\r{name}: step {step + 1}/{steps}  loss {sum(losses[-10:]) / len(losses[-10:]):.4f}  "
                  f"{rate:.0f} img/s  ETA {(steps - step - 1) * len(x0) / rate / 60:.1f} min ", end="", flush=True)
    print(f"\n{name}: trained {steps} steps in {(time.time() - t0) / 60:.1f} min")
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "rng": {"train": gen.get_state()}, "log": {"losses": losses, "seconds": time.time() - t0}}
def flops(net, *inputs):  # FLOPs of one call, counted by PyTorch: a multiply-add counts 2 (lesson 03)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(*inputs)
    return counter.get_total_flops()
@torch.no_grad()
def ddim_sample(model, x, alpha_bar, steps, pred, autocast=nullcontext):  # deterministic DDIM, x0 clipped (lesson 04)
    ts = torch.linspace(len(alpha_bar) - 1, 0, steps).round().long().tolist()  # t_i = round(i (T-1) / (steps-1))
    for i, t in enumerate(ts):
        ab = alpha_bar[t].to(x.device, torch.float32).view(1, 1, 1, 1)
        with autocast():  # out: v, or eps (classifier guidance) -> x0_hat
            out = model(x, torch.full((len(x),), t, device=x.device, dtype=torch.long)).float()
        x0 = (eps_x0_of_v(out, x, ab)[1] if pred == "v" else (x - (1 - ab).sqrt() * out) / ab.sqrt()).clamp(-1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # keep eps consistent with the clipped x0
        ab_next = alpha_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0  # the last step lands on x_0
        x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * eps
    return x
def v_target(x0, eps, ab):  # lesson 04's target v = sqrt(ab) eps - sqrt(1 - ab) x_0; ab = alpha_bar_t [B, 1, 1, 1]
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0
def eps_x0_of_v(v, x_t, ab):  # the UNet's v -> (eps_hat, x0_hat): the inverse of q_sample and v_target (lesson 04)
    return (1 - ab).sqrt() * x_t + ab.sqrt() * v, ab.sqrt() * x_t - (1 - ab).sqrt() * v
def min_snr_weight(ab, gamma=5.0):  # min(SNR, gamma) on the x_0 error: min(SNR, gamma) / (1 + SNR) on v's (lesson 04)
    snr = ab / (1 - ab)
    return snr.clamp(max=gamma) / (snr + 1)
def cosine_betas(T, s=0.008):  # improved DDPM's: alpha_bar_t = f(t) / f(0), betas clipped at 0.999 (lesson 01)
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)
def alpha_bar_of(betas):  # alpha_bar_t = prod_{s<=t} (1 - beta_s) (lesson 01)
    return torch.cumprod(1 - betas, dim=0)
def q_sample(x0, t, alpha_bar, noise):  # x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (lesson 01)
    ab = alpha_bar.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # [B, 1, 1, 1]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
def timestep_embedding(t, dim):  # t int64 [B] -> [B, dim]: sin, cos of t at frequencies 1 ... 1/10000 (lesson 03)
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2))
    args = t.float()[:, None] * freqs[None]  # [B, dim/2]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, dim]
def group_norm(ch):  # GroupNorm with up to 32 groups (lesson 03)
    return nn.GroupNorm(math.gcd(32, ch), ch)
class ResBlock(nn.Module):  # lesson 03's, with a (time + label) scale and shift, self- and cross-attention
    def __init__(self, c_in, c_out, emb_dim, attn_heads=0, ctx_dim=0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # (time + label) embedding -> per-channel (scale, shift)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = Attention(c_out, attn_heads) if attn_heads else nn.Identity()
        self.cross = CrossAttention(c_out, ctx_dim, attn_heads) if attn_heads and ctx_dim else None
    def forward(self, x, emb, ctx=None, ctx_mask=None):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x [B, C_out, 1, 1]
        h = self.attn(self.skip(x) + self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift)))
        return self.cross(h, ctx, ctx_mask) if self.cross is not None else h
class Attention(nn.Module):  # four-head self-attention among the H*W positions, with a residual (lesson 03)
    def __init__(self, ch, heads=4):
        super().__init__()
        self.heads, self.norm = heads, group_norm(ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(3, 4).unbind(1)
        return x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(B, C, H, W))
class UNet(nn.Module):  # lesson 03's, plus num_classes (+ a null label) and ctx_dim (cross-attention) inputs
    def __init__(self, in_ch=3, base_ch=32, ch_mult=(1, 2, 2), attn_levels=(2,), num_classes=0, ctx_dim=0):
        super().__init__()
        self.base_ch, self.num_classes, emb_dim = base_ch, num_classes, 4 * base_ch  # attention: 4 heads
        self.time_mlp = nn.Sequential(nn.Linear(base_ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_ch, base_ch, 3, padding=1)
        self.down, chans, ch = nn.ModuleList(), [base_ch], base_ch  # chans: every skip's channels, in order
        for level, mult in enumerate(ch_mult):
            for _ in range(2):
                self.down.append(ResBlock(ch, base_ch * mult, emb_dim, 4 * (level in attn_levels), ctx_dim))
                ch = base_ch * mult
                chans.append(ch)
            if level < len(ch_mult) - 1:  # Downsample, named as lesson 03's: a stride-2 3x3 conv
                self.down.append(nn.Sequential(OrderedDict(conv=nn.Conv2d(ch, ch, 3, stride=2, padding=1))))
                chans.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, 4, ctx_dim), ResBlock(ch, ch, emb_dim)])
        self.up = nn.ModuleList()  # each up block takes the matching skip (channels from chans, in reverse)
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(3):
                self.up.append(ResBlock(ch + chans.pop(), base_ch * mult, emb_dim, 4 * (level in attn_levels), ctx_dim))
                ch = base_ch * mult
            if level > 0:  # Upsample: nearest x2, then a 3x3 conv
                self.up.append(nn.Sequential(OrderedDict(up=nn.Upsample(scale_factor=2),
                                                         conv=nn.Conv2d(ch, ch, 3, padding=1))))
        self.norm_out, self.conv_out = group_norm(ch), nn.Conv2d(ch, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the untrained net predicts 0
        nn.init.zeros_(self.conv_out.bias)
    def forward(self, x, t, y=None, ctx=None, ctx_mask=None):
        emb = self.time_mlp(timestep_embedding(t, self.base_ch))  # [B, 4 base_ch]
        emb = emb if self.label_emb is None else emb + self.label_emb(y)  # y: labels [B] or TextToImage's pooled text
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb, ctx, ctx_mask) if isinstance(block, ResBlock) else block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, ctx, ctx_mask)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], 1), emb, ctx, ctx_mask) if isinstance(block, ResBlock) else block(h)
        return self.conv_out(F.silu(self.norm_out(h)))
def Classifier(in_ch, n_classes):  # lesson 04's small CNN: body -> 128-d features (what FD compares) -> head
    return nn.Sequential(OrderedDict(body=nn.Sequential(
        nn.Conv2d(in_ch, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.GroupNorm(8, 128), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten()), head=nn.Linear(128, n_classes)))  # [B, 128] -> [B, n_classes]
def train_classifier(images, labels, n_classes, device, steps, seed):  # Adam on real images in [-1, 1] (lesson 04)
    g, clf = torch.Generator().manual_seed(seed), Classifier(images.shape[1], n_classes).to(device)
    opt = torch.optim.Adam(clf.parameters(), 2e-3)
    for _ in range(steps):
        idx = torch.randint(len(images), (128,), generator=g)
        loss = F.cross_entropy(clf(to_unit(images[idx]).to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()
@torch.no_grad()
def features_and_classes(clf, x, device, batch=256):  # -> (features float64 [N, 128], classes [N]) (lesson 04)
    feats = [clf.body(x[i:i + batch].to(device)) for i in range(0, len(x), batch)]
    return torch.cat([f.double().cpu() for f in feats]), torch.cat([clf.head(f).argmax(1).cpu() for f in feats])
def frechet_distance(f1, f2):  # FD between Gaussians fitted to two feature sets [N, D] (float64) (lesson 04)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, V = torch.linalg.eigh(s1)
    s1_half = V @ torch.diag(w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((f1.mean(0) - f2.mean(0)).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross).item()
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
def fail(message):  # one line naming the fix, exit status 2, no traceback (every lesson)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
def scale_list(text):  # argparse type: '0,1,3' -> [0.0, 1.0, 3.0]; anything else is a one-line error
    values = [float(s) for s in text.split(",")]  # (argparse reports a ValueError in one line: "invalid ... value")
    if not all(s >= 0 and math.isfinite(s) for s in values):
        raise argparse.ArgumentTypeError(f"must be numbers >= 0 separated by commas, like 0,1,3 (got {text!r})")
    return values
def pick_device(name):  # auto: cuda, then mps, then cpu; a device that is not there exits 2 (every lesson)
    have = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d in have if have[d]) if name == "auto" else name
    if not have[name]:
        fail(f"--device {name} was asked for but {name.upper()} is not available; use --device cpu (or auto)")
    return torch.device(name)
def autocast_for(device):  # -> (autocast, name): bf16 on CUDA (TF32 on) and on CPUs with bf16 units, else fp32 (04)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = device.type == "cuda"
    units = any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    if not (torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and units):
        return nullcontext, "fp32"  # (on plain AVX-512 without AVX512-BF16 or AMX, bf16 is emulated: slower)
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bf16 autocast"
# The drawing kit (lesson 01's, trimmed to a grid and a line plot on a log y axis)
def grid(path, x, nrow, title, row_labels=(), col_labels=(), scale=3):  # x float [N, C, H, W] in [-1, 1], titled
    g = make_grid(to_uint8(x), nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()  # [H', W', 3]
    img = Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.Resampling.NEAREST)  # crisp
    f, top = ImageFont.load_default(size=14), 50 if col_labels else 32
    left = max((int(f.getlength(s)) + 12 for s in row_labels), default=8)
    canvas = Image.new("RGB", (img.width + left + 8, img.height + top + 8), "white")
    canvas.paste(img, (left, top))
    d = ImageDraw.Draw(canvas)
    d.text((canvas.width // 2, 6), title, fill="black", font=ImageFont.load_default(size=16), anchor="ma")
    for i, s in enumerate(col_labels):  # labels centred over evenly spaced columns and rows
        d.text((left + (i + 0.5) * img.width / len(col_labels), top - 4), s, fill="black", font=f, anchor="md")
    for i, s in enumerate(row_labels):
        d.text((left - 6, top + (i + 0.5) * img.height / len(row_labels)), s, fill="black", font=f, anchor="rm")
    canvas.save(path)
def line_plot(path, series, title, xlabel, ylabel):  # series [(label, xs, ys)] as lines on a log y axis, a legend
    xs, ys = [x for s in series for x in s[1]], [y for s in series for y in s[2]]
    (xa, xb), (ya, yb) = (min(xs), max(xs)), (min(ys) * 0.8, max(ys) * 1.25)
    img, f = Image.new("RGB", (620, 430), "white"), ImageFont.load_default(size=13)
    d, (x0, y0, x1, y1) = ImageDraw.Draw(img), (70, 50, 600, 380)
    to_px = lambda x, y: (x0 + (x - xa) / ((xb - xa) or 1) * (x1 - x0),
                          y1 - math.log(y / ya) / math.log(yb / ya) * (y1 - y0))
    raw = ((xb - xa) or 1) / 5  # x ticks 1, 2 or 5 times a power of ten apart; y ticks at powers of ten
    step = min(s for s in (m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)) if s >= raw)
    for v in [k * step for k in range(math.ceil(xa / step), math.floor(xb / step) + 1)]:
        d.line([(to_px(v, ya)[0], y0), (to_px(v, ya)[0], y1 + 4)], fill=(230, 230, 230))
        d.text((to_px(v, ya)[0], y1 + 6), f"{v:g}", fill="black", font=f, anchor="ma")
    for v in [10.0 ** e for e in range(math.ceil(math.log10(ya)), math.floor(math.log10(yb)) + 1)]:
        d.line([(x0 - 4, to_px(xa, v)[1]), (x1, to_px(xa, v)[1])], fill=(230, 230, 230))
        d.text((x0 - 6, to_px(xa, v)[1]), f"{v:g}", fill="black", font=f, anchor="rm")
    d.rectangle((x0, y0, x1, y1), outline="black")
    d.text(((x0 + x1) / 2, y1 + 24), xlabel, fill="black", font=f, anchor="ma")
    d.text((x0 - 4, y0 - 8), ylabel, fill="black", font=f, anchor="ld")
    d.text((310, 8), title, fill="black", font=ImageFont.load_default(size=15), anchor="ma")
    for k, ((name, xs_, ys_), color) in enumerate(zip(series, [(31, 119, 180), (214, 39, 40)])):
        d.line([to_px(x, y) for x, y in zip(xs_, ys_)], fill=color, width=2)
        d.line([(450, 62 + 18 * k), (475, 62 + 18 * k)], fill=color, width=3)
        d.text((480, 62 + 18 * k), name, fill="black", font=f, anchor="lm")
    img.save(path)

if __name__ == "__main__":
    main()
