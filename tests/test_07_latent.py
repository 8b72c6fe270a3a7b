"""Lesson 07: the VAE and its KL term, the latent scale factor, guidance, LoRA, inpainting, the script."""
import copy
import math

import pytest
import torch

from conftest import assert_clean_exit_2, call_main, load_script, run_script

m = load_script("07_latent")


def randomise(net, seed=0, std=0.05):
    """Every weight random (the zero-initialised output conv included), so outputs depend on all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def small_unet(in_ch=4):
    torch.manual_seed(0)
    return randomise(m.UNet(in_ch=in_ch, base_ch=16, ch_mult=(1, 2, 2), num_classes=5)).eval()


# -- the autoencoder -------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_vae_shapes_for_each_factor(factor):
    vae = m.VAE(in_ch=3, z_ch=4, factor=factor, ch=8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (2, 4, 32 // factor, 32 // factor)
    x_hat, mu2, _ = vae(x, torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape and torch.equal(mu, mu2)
    assert vae.decode(mu).shape == (2, 3, 32, 32)


def test_kl_term_is_zero_for_the_standard_normal_and_matches_torch():
    zero = torch.zeros(3, 4, 8, 8)
    assert m.kl_divergence(zero, zero).item() == 0.0  # mu = 0, sigma = 1
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).mean()
    assert m.kl_divergence(mu, logvar).item() == pytest.approx(ref.item(), rel=1e-5)
    assert m.kl_divergence(zero + 0.1, zero) > 0 and m.kl_divergence(zero, zero + 0.1) > 0


def test_scale_factor_gives_unit_variance():
    vae = randomise(m.VAE(3, 4, 4, ch=8), std=0.2)
    images, _, _ = m.make_shapes(64, 32, seed=1)
    z = vae.encode(m.to_unit(images))[0].detach()  # a batch of latents, std far from 1
    assert abs(z.std().item() - 1) > 0.05
    assert (z * m.latent_scale(z)).std().item() == pytest.approx(1.0, abs=1e-5)
    z2 = torch.randn(512, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 5.4 + 0.3
    assert (z2 * m.latent_scale(z2)).std().item() == pytest.approx(1.0, abs=1e-5)


def test_psnr():
    x = torch.zeros(2, 3, 4, 4)
    assert m.psnr(x, x + 0.02).tolist() == pytest.approx([10 * math.log10(4 / 0.0004)] * 2, rel=1e-4)


# -- data: the new colour ----------------------------------------------------------------------------------
def test_recolour_and_nearest_colour():
    images, labels, captions = m.make_shapes(60, 32, seed=2)
    names = list(m.COLORS)
    assert m.nearest_colour(images).tolist() == [names.index(c.split()[2]) for c in captions]
    orange = m.recolour(images, captions, m.ORANGE)
    assert (m.nearest_colour(orange) == len(m.COLORS)).all()
    same = torch.stack([m.recolour(images[i:i + 1], captions[i:i + 1], m.COLORS[c.split()[2]])[0]
                        for i, c in enumerate(captions)])
    assert (same.int() - images.int()).abs().max() <= 1  # recolouring to its own colour changes nothing


# -- guidance and sampling -----------------------------------------------------------------------------
def test_guided_eps_is_the_cfg_combination():
    net = small_unet()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([5, 500, 990]), torch.tensor([0, 2, 4])
    with torch.no_grad():
        c, u = net(x, t, y), net(x, t, torch.full_like(y, 5))
        assert torch.allclose(m.guided_eps(net, x, t, y, 3.0), u + 3.0 * (c - u), atol=1e-5)
        assert torch.equal(m.guided_eps(net, x, t, y, 1.0), c)
        assert torch.equal(m.guided_eps(net, x, t, y, 0.0), u)


def test_inpainting_keeps_the_known_region():
    net = small_unet()
    alpha_bar = m.alpha_bar_of(m.cosine_betas(1000)).float()
    g = torch.Generator().manual_seed(3)
    known = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1  # the left half is known
    y = torch.tensor([1, 3])
    fn = lambda x, t: m.guided_eps(net, x, t, y, 2.0)  # noqa: E731
    out = m.ddim_sample(fn, torch.randn(2, 4, 8, 8, generator=g), alpha_bar, 6, clip=False,
                        known=known, mask=mask, generator=g)
    assert torch.equal(out[..., :4], known[..., :4])
    assert not torch.allclose(out[..., 4:], known[..., 4:], atol=0.1)  # the rest was generated
    free = m.ddim_sample(fn, torch.randn(2, 4, 8, 8, generator=g), alpha_bar, 6, clip=False)
    assert not torch.allclose(free[..., :4], known[..., :4], atol=0.1)  # without the mask it is not kept


def test_sdedit_start_time():
    # with t_start the sampler visits t_start, ..., 0: a model of data = one point c lands on c from there
    ab_all = m.alpha_bar_of(m.cosine_betas(1000)).float()
    c = torch.tensor([0.3, -0.5]).view(1, 2, 1, 1)
    seen = []

    def model(x, t):  # exact v for data = {c}: v = sqrt(ab) eps - sqrt(1 - ab) c
        seen.append(t[0].item())
        ab = ab_all[t].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * c) / (1 - ab).sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * c

    x = m.ddim_sample(model, torch.randn(4, 2, 1, 1), ab_all, 5, clip=False, t_start=400)
    assert seen == [400, 300, 200, 100, 0]
    assert torch.allclose(x, c.expand(4, -1, -1, -1), atol=1e-4)


# -- LoRA ------------------------------------------------------------------------------------------------
def test_lora_with_b_zero_leaves_outputs_unchanged():
    net = small_unet()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 800]), torch.tensor([1, 5])
    with torch.no_grad():
        before = net(x, t, y)
        adapted = m.add_lora(copy.deepcopy(net), rank=3, alpha=6.0)
        assert torch.equal(adapted(x, t, y), before)
    n_lora = sum(isinstance(mod, m.LoRA) for mod in adapted.modules())
    n_blocks = sum(isinstance(mod, m.ResBlock) for mod in net.modules())
    n_attn = sum(isinstance(mod, m.Attention) for mod in net.modules())
    assert n_lora == 3 * n_blocks + 2 * n_attn  # conv1, conv2, emb per block; qkv, proj per attention


@pytest.mark.parametrize("layer", [torch.nn.Linear(12, 7), torch.nn.Conv2d(6, 8, 3, stride=2, padding=1),
                                   torch.nn.Conv2d(6, 18, 1)])
def test_lora_merge_is_exact_per_layer(layer):
    layer = layer.double()
    lora = m.LoRA(layer, rank=2, alpha=5.0).double()
    torch.nn.init.normal_(lora.B.weight)
    x = torch.randn(3, 12, dtype=torch.float64) if isinstance(layer, torch.nn.Linear) else \
        torch.randn(3, 6, 9, 9, dtype=torch.float64)
    merged = lora.merged()
    assert type(merged) is type(layer)
    assert torch.allclose(merged(x), lora(x), atol=1e-12)
    assert not torch.allclose(layer(x), lora(x))  # the update is not zero


@pytest.mark.parametrize("layer", [torch.nn.Linear(5, 3), torch.nn.Conv2d(4, 6, 3, padding=1)])
def test_lora_adapters_follow_the_base_layers_device_and_dtype(layer):
    # a CUDA model must get CUDA adapters (seen failing on an H100): the meta device stands in for CUDA here
    for base in (layer.double(), copy.deepcopy(layer).to("meta")):
        lora = m.LoRA(base, rank=2, alpha=2.0)
        for w in (lora.A.weight, lora.B.weight):
            assert (w.device, w.dtype) == (base.weight.device, base.weight.dtype)


def test_merged_unet_matches_adapters_and_loads_as_a_plain_unet():
    net = small_unet()
    adapted = m.add_lora(copy.deepcopy(net), rank=2, alpha=2.0)
    for mod in adapted.modules():
        if isinstance(mod, m.LoRA):
            torch.nn.init.normal_(mod.B.weight, std=0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 800]), torch.tensor([1, 5])
    with torch.no_grad():
        out = adapted(x, t, y)
        assert not torch.allclose(out, net(x, t, y), atol=1e-4)
        merged = m.merge_lora(adapted)
        assert list(merged.state_dict()) == list(net.state_dict())  # the base model's names again
        plain = m.UNet(in_ch=4, base_ch=16, ch_mult=(1, 2, 2), num_classes=5).eval()
        plain.load_state_dict(merged.state_dict())
        assert torch.allclose(plain(x, t, y), out, atol=1e-5)


def test_only_adapter_parameters_get_gradients():
    adapted = m.add_lora(small_unet().train(), rank=2, alpha=2.0)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 800]), torch.tensor([1, 5])
    adapted(x, t, y).square().mean().backward()
    for name, p in adapted.named_parameters():
        is_adapter = name.endswith((".A.weight", ".B.weight"))
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
    assert any(p.grad.abs().sum() > 0 for n, p in adapted.named_parameters() if n.endswith(".B.weight"))
    assert set(m.lora_state(adapted)) == {n for n, p in adapted.named_parameters() if p.requires_grad}


def test_default_lora_is_under_5_percent_of_the_model():
    net = m.UNet(4, *m.UNETS["latent"], num_classes=5)
    n_all = sum(p.numel() for p in net.parameters())
    adapted = m.add_lora(net, m.LORA_RANK, m.LORA_ALPHA)
    n_train = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert 0 < n_train < 0.05 * n_all


def test_unet_loads_a_06_style_class_state_dict():
    # parameter names as in lesson 06 (label_emb has num_classes + 1 rows, the last the null label)
    net = small_unet()
    keys = list(net.state_dict())
    assert "label_emb.weight" in keys and net.state_dict()["label_emb.weight"].shape[0] == 6
    assert not any("cross" in k for k in keys)


# -- the script ------------------------------------------------------------------------------------------
FIGURES = ("07_recon.png", "07_samples.png", "07_sdedit.png", "07_inpaint.png", "07_lora.png")


def test_quick_run_writes_every_figure(tmp_path):
    from PIL import Image
    code, out, err = run_script("07_latent", "--quick", "--out", tmp_path / "fig", "--run-dir", tmp_path / "run",
                                env={"OMP_NUM_THREADS": "1"})
    assert code == 0, err[-3000:]
    for name in FIGURES:
        lo, hi = Image.open(tmp_path / "fig" / name).convert("L").getextrema()
        assert hi > lo, name
    for line in ("this run computes", "| pixel |", "| latent |", "known latent kept to 0.0e+00",
                 "trainable parameters"):
        assert line in out, line
    lora = tmp_path / "run" / "lora.pt"
    assert lora.stat().st_size < (tmp_path / "run" / "latent.pt").stat().st_size / 2
    ckpt = torch.load(lora, weights_only=True)
    assert all(k.endswith((".A.weight", ".B.weight")) for k in ckpt["adapter"])


@pytest.mark.parametrize("args,needle", [
    (["--factor", "3"], "--factor"),
    (["--seconds", "0"], "--seconds"),
    (["--colour-jitter", "1.5"], "--colour-jitter"),
    (["--fixed-steps", "5"], "--fixed-steps"),
    (["--fixed-steps", "a,b"], "--fixed-steps"),
    (["--fixed-steps", "0,5"], "--fixed-steps"),
    (["--guidance", "x"], "--guidance"),
    (["--seconds", "60", "--fixed-steps", "5,5"], "--seconds"),  # one budget or the other
] + ([(["--device", "cuda"], "CUDA")] if not torch.cuda.is_available() else []))
def test_bad_input_exits_2(tmp_path, args, needle):
    # main in this process: the same exit path, without a new interpreter's start-up
    assert_clean_exit_2(*call_main(m, "--out", tmp_path / "fig", "--run-dir", tmp_path / "run", *args), needle)


def test_bad_input_from_the_shell_exits_2(tmp_path):
    # once as a real command: what a shell sees, start-up and shutdown included
    assert_clean_exit_2(*run_script("07_latent", "--out", tmp_path / "fig", "--run-dir", tmp_path / "run",
                                    "--factor", "3"), "--factor")


def test_parse_args_in_jupyter_ignores_the_kernels_flags(in_jupyter):
    # a notebook calls main() with sys.argv = the kernel's own command line
    assert vars(m.parse_args()) == vars(m.parse_args([]))


def test_quick_never_writes_over_the_defaults():
    full, quick = m.parse_args([]), m.parse_args(["--quick"])
    assert (full.out, full.run_dir) == ("figures", "runs/07")
    assert (quick.out, quick.run_dir) == ("runs/quick", "runs/quick/07")
    assert m.parse_args(["--quick", "--out", "x", "--run-dir", "y"]).out == "x"
    assert quick.n_images < full.n_images and quick.vae_steps < full.vae_steps
    assert m.parse_args(["--quick", "--fixed-steps", "300,1500"]).fixed_steps == (6, 12)
    assert m.parse_args(["--fixed-steps", "300,1500"]).fixed_steps == (300, 1500)
    assert m.parse_args(["--quick", "--seconds", "240"]).seconds == 2 and m.parse_args(["--seconds", "9"]).seconds == 9


# -- the budget: the same FLOPs for both UNets, the whole run within lesson 07's 77 TFLOP ---------------------------
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_default_run_gives_both_unets_the_same_flops_within_the_budget(factor, capsys):
    args = m.parse_args(["--factor", str(factor)])
    state = torch.get_rng_state()
    cost = m.run_cost(args)
    assert torch.equal(torch.get_rng_state(), state)  # counting on the meta device draws nothing
    assert args.latent_batch == m.FULL["latent_batch"] * factor ** 2 // 16  # as many latent positions a batch
    pixel, latent = (3 * cost[k] * b * n for k, b, n in zip(("pixel", "latent"), (args.batch, args.latent_batch),
                                                           cost["steps"]))
    assert pixel == pytest.approx(args.unet_tflop * 1e12, rel=1e-3) and latent == pytest.approx(pixel, rel=1e-3)
    assert cost["pixel"] > cost["latent"] > 0
    out = capsys.readouterr().out
    assert "this run computes" in out and "min at the budgets' 64 GFLOP/s" in out
    if factor == 4:  # the default run
        assert cost["total"] <= 77e12, out


def test_learning_rate_warms_up_and_decays_to_zero_over_the_steps():
    lrs = [m.learning_rate(s, 100, 2e-3, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(2e-4, rel=0.01) and max(lrs) == pytest.approx(2e-3, rel=0.03)
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_train_diffusion_keeps_ema_snapshots_at_the_marks():
    torch.manual_seed(0)
    net, alpha_bar = m.UNet(4, 16, (1, 2), num_classes=5), m.alpha_bar_of(m.cosine_betas(1000)).float()
    args = m.parse_args(["--quick"])
    data, labels = torch.randn(32, 4, 8, 8), torch.arange(32) % 5
    snaps, rate = m.train_diffusion(net, data, labels, alpha_bar, args, m.nullcontext, torch.Generator().manual_seed(0),
                                    ("steps", 6, 4), [3, 6], "test")
    assert [s for _, s, _ in snaps] == [3, 6] and rate > 0
    final = snaps[-1][2]
    assert not all(torch.equal(final[k], v) for k, v in net.state_dict().items())  # the EMA, not the weights
