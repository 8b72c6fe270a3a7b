"""Lesson 01: the schedules, the closed form against the chain, the shapes dataset, the script."""
import math
import os

import pytest
import torch
from PIL import Image

from conftest import call_main, load_script, run_script

m = load_script("01_forward")


# -- schedules ---------------------------------------------------------------------------------------
def test_linear_schedule_numbers():
    betas = m.linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    alpha_bar = m.alpha_bar_of(betas)
    # DDPM's linear schedule ends at alpha_bar_T = 4.04e-5 (x_T = 0.0064 x_0 + 0.99998 eps)
    assert alpha_bar[-1].item() == pytest.approx(4.036e-5, rel=1e-3)
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()


@pytest.mark.parametrize("T", [10, 100, 1000, 4000])
def test_cosine_schedule_matches_f(T):
    s = 0.008
    betas = m.cosine_betas(T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert (betas > 0).all() and (betas <= 0.999).all()
    alpha_bar = m.alpha_bar_of(betas)
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    clipped = (betas >= 0.999).nonzero()
    first_clipped = clipped[0].item() if len(clipped) else T
    assert first_clipped >= T - 2  # only the very last steps may be clipped
    for t in range(first_clipped):
        # 0-based t: alpha_bar[t] is the paper's alpha_bar_{t+1} = f((t+1)/T) / f(0)
        assert alpha_bar[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9, abs=1e-12)


def test_linear_betas_within_bounds_for_other_T():
    for T in (2, 50, 1000):
        b = m.linear_betas(T)
        assert b.min().item() >= 1e-4 - 1e-15 and b.max().item() <= 0.02 + 1e-15


def test_snr_definition():
    ab = m.alpha_bar_of(m.cosine_betas(1000))
    assert torch.allclose(m.snr(ab), ab / (1 - ab))
    assert (m.snr(ab)[1:] < m.snr(ab)[:-1]).all()  # noise only grows


# -- the closed form against the chain ------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_closed_form_matches_chain(schedule):
    betas = m.linear_betas(1000) if schedule == "linear" else m.cosine_betas(1000)
    n = 40_000
    rows = m.check_closed_form(betas, n, [0, 5, 100, 500, 999], x0_value=0.8, seed=1)
    alpha_bar = m.alpha_bar_of(betas)
    for t, mean_cf, mean_ch, var_cf, var_ch, z_mean, z_var in rows:
        # the table's closed-form columns are the formula itself
        assert mean_cf == pytest.approx(alpha_bar[t].sqrt().item() * 0.8)
        assert var_cf == pytest.approx(1 - alpha_bar[t].item())
        # standard errors from the sample count: mean sqrt(var/n), variance sqrt(2/n) var; 5 sigma
        assert abs(mean_ch - mean_cf) < 5 * math.sqrt(var_cf / n)
        assert abs(var_ch - var_cf) < 5 * math.sqrt(2 / n) * var_cf


def test_chain_with_wrong_step_would_be_caught():
    # the same check applied to a chain that forgets the sqrt(1 - beta) shrink must fail
    betas = m.linear_betas(1000)
    g = torch.Generator().manual_seed(0)
    x = torch.full((20_000,), 0.8, dtype=torch.float64)
    for t in range(100):
        x = x + betas[t].sqrt() * torch.randn(x.shape, generator=g, dtype=x.dtype)
    alpha_bar = m.alpha_bar_of(betas)
    assert abs(x.mean().item() - alpha_bar[99].sqrt().item() * 0.8) > 5 * math.sqrt(1 / 20_000)


def test_q_sample_formula_and_batch_of_t():
    ab = m.alpha_bar_of(m.linear_betas(1000))
    x0 = torch.randn(4, 3, 8, 8)
    noise = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    xt = m.q_sample(x0, t, ab, noise)
    for i in range(4):
        a = ab[t[i]].float()
        assert torch.allclose(xt[i], a.sqrt() * x0[i] + (1 - a).sqrt() * noise[i], atol=1e-6)


def test_q_sample_at_T_is_standard_normal():
    images, _, _ = m.make_shapes(256, seed=3)
    x0 = m.to_unit(images)
    assert x0.min() >= -1 and x0.max() <= 1
    ab = m.alpha_bar_of(m.linear_betas(1000))
    g = torch.Generator().manual_seed(0)
    xt = m.q_sample(x0, torch.full((256,), 999), ab, torch.randn(x0.shape, generator=g)).flatten().double()
    n = xt.numel()
    # mean is shifted by at most sqrt(alpha_bar_T) = 0.0064 in the worst case (all pixels at +-1)
    assert abs(xt.mean().item()) < 0.0064 + 5 / math.sqrt(n)
    assert abs(xt.var().item() - 1) < 0.01
    # and the shape of the distribution: fraction within one standard deviation is 68.27%
    assert abs((xt.abs() < 1).double().mean().item() - 0.6827) < 0.005


# -- the shapes dataset ---------------------------------------------------------------------------------
def test_make_shapes_types_and_ranges():
    images, labels, captions = m.make_shapes(1000, seed=0)
    assert images.shape == (1000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (1000,) and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < len(m.SHAPES)
    assert set(labels.tolist()) == set(range(len(m.SHAPES)))  # every class present
    assert len(captions) == 1000
    assert images.max() > 200 and images.min() == 0  # bright shapes on a black background
    per_image_max = images.flatten(1).max(1).values
    assert (per_image_max > 100).all()  # no empty picture


def test_make_shapes_captions_match_labels_and_pixels():
    images, labels, captions = m.make_shapes(300, seed=5)
    for img, lab, cap in zip(images, labels, captions):
        words = cap.split()
        assert words[0] == "a" and words[1] in m.SIZES and words[2] in m.COLORS
        assert words[3] == m.SHAPES[lab]
        assert " ".join(words[6:]) in m.POSITIONS
        # the brightest pixel has the caption's colour
        flat = img.flatten(1).float()  # [3, HW]
        pix = flat[:, flat.sum(0).argmax()]
        target = torch.tensor(m.COLORS[words[2]], dtype=torch.float)
        assert (pix - target).abs().max() < 30


def test_make_shapes_positions_match_captions():
    images, _, captions = m.make_shapes(300, seed=6)
    for img, cap in zip(images, captions):
        mass = img.float().sum(0)  # [H, W]
        ys, xs = torch.meshgrid(torch.arange(32.), torch.arange(32.), indexing="ij")
        cx, cy = (mass * xs).sum() / mass.sum(), (mass * ys).sum() / mass.sum()
        where = cap.split(" the ")[-1]
        if "left" in where:
            assert cx < 16
        if "right" in where:
            assert cx > 15
        if where.startswith("top"):
            assert cy < 16
        if where.startswith("bottom"):
            assert cy > 15


def test_make_shapes_deterministic_and_seeded():
    a = m.make_shapes(50, seed=7)
    b = m.make_shapes(50, seed=7)
    c = m.make_shapes(50, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0])


def test_make_shapes_other_sizes():
    images, _, _ = m.make_shapes(20, size=64, seed=0)
    assert images.shape == (20, 3, 64, 64)


# -- the script ---------------------------------------------------------------------------------------
FIGURES = ["01_chain.png", "01_noising.png", "01_schedules.png", "01_2d_diffusion.png", "01_xT_histogram.png",
           "01_noising.gif"]


def test_script_quick_writes_every_figure(tmp_path):
    code, out, err = run_script("01_forward", "--quick", "--out", tmp_path)
    assert code == 0, err
    assert "largest |z|" in out
    for name in FIGURES:
        img = Image.open(tmp_path / name)
        img.load()
        lo, hi = img.convert("L").getextrema()
        assert hi > lo, f"{name} is a constant image"
    gif = Image.open(tmp_path / "01_noising.gif")
    assert gif.n_frames > 10


@pytest.mark.parametrize("args,needle", [(["--T", "0"], "--T"), (["--n-check", "5"], "--n-check"),
                                         (["--device", "tpu"], "--device")])
def test_script_bad_values_exit_2_with_one_line(tmp_path, args, needle):
    code, out, err = call_main(m, *args, "--out", tmp_path)  # main in this process: the same exit path
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert "Traceback" not in err


def test_script_bad_value_from_the_shell_exits_2_with_one_line(tmp_path):
    # once as a real command: what a shell sees, start-up and shutdown included
    code, out, err = run_script("01_forward", "--T", "0", "--out", tmp_path)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--T" in err
    assert "Traceback" not in err


def test_parse_args_in_jupyter_ignores_the_kernel_flags(in_jupyter):
    # a notebook cell calls main() with sys.argv holding the kernel's own flags: they must not be parsed
    assert vars(m.parse_args()) == vars(m.parse_args([]))


def test_quick_never_writes_over_the_default_figures():
    assert m.parse_args([]).out == "figures"
    assert os.path.normpath(m.parse_args(["--quick"]).out) == os.path.join("runs", "quick")
    assert m.parse_args(["--quick", "--out", "elsewhere"]).out == "elsewhere"
