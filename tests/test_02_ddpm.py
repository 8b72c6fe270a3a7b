"""Lesson 02: the posterior, the eps <-> x_0 conversions, ancestral sampling against an exact answer,
the ideal denoiser's memorisation, and the script end to end."""
import math
import os

import pytest
import torch
from PIL import Image

from conftest import call_main, load_script, run_script

FIGURES = ["02_samples.png", "02_trajectory.png", "02_loss.png", "02_loss_by_t.png", "02_memorisation.png",
           "02_sampling.gif"]


@pytest.fixture(scope="module")
def m():
    return load_script("02_ddpm")


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are small: on a shared 2-core machine two threads per op cost far more than they gain."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def schedules(m, T=1000):
    return {"linear": m.linear_betas(T), "cosine": m.cosine_betas(T)}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_brute_force_conditioning(m, schedule):
    """Write every x_s as a_s x_0 + sum_j c_sj e_j by running the chain x_s = sqrt(1 - b_s) x_{s-1} + sqrt(b_s) e_s
    (no closed form used), then condition the Gaussian (x_{t-1}, x_t) | x_0 on x_t with a matrix solve."""
    betas = schedules(m)[schedule]
    T, x0, xt = len(betas), 0.7, -0.3
    for t in (0, 1, 2, 10, 100, 500, 998, T - 1):
        a, c = torch.ones((), dtype=torch.float64), torch.zeros(T, dtype=torch.float64)  # x_{-1} = x_0
        rows = []
        for s in range(t + 1):
            rows.append((a, c))
            a, c = (1 - betas[s]).sqrt() * a, (1 - betas[s]).sqrt() * c
            c = c.clone()
            c[s] += betas[s].sqrt()
        (a_prev, c_prev), (a_t, c_t) = rows[-1], (a, c)  # coefficients of x_{t-1} and x_t
        C = torch.stack([c_prev, c_t])  # [2, T]
        cov = C @ C.T  # joint covariance of (x_{t-1}, x_t) given x_0
        gain = torch.linalg.solve(cov[1:, 1:], cov[1:, :1])  # C_22^-1 C_21
        mean = a_prev * x0 + (gain.T @ torch.tensor([xt - a_t * x0], dtype=torch.float64)).squeeze()
        var = cov[0, 0] - (cov[0, 1:] @ gain).squeeze()
        c0, ct, beta_tilde = m.posterior(betas, t)
        assert torch.allclose(c0 * x0 + ct * xt, mean, rtol=1e-9, atol=1e-12), (schedule, t)
        assert torch.allclose(beta_tilde, var, rtol=1e-7, atol=1e-12), (schedule, t)


def test_eps_and_x0_convert_exactly(m):
    g = torch.Generator().manual_seed(0)
    for betas in schedules(m).values():
        ab = m.alpha_bar_of(betas)
        x0, eps = torch.randn(64, 2, generator=g, dtype=torch.float64), torch.randn(64, 2, generator=g,
                                                                                   dtype=torch.float64)
        t = torch.randint(0, len(betas), (64,), generator=g)
        x_t, abt = m.q_sample(x0, t, ab, eps), ab[t][:, None]
        assert torch.allclose(m.x0_from_eps(x_t, eps, abt), x0, rtol=0, atol=1e-9)
        assert torch.allclose(m.eps_from_x0(x_t, x0, abt), eps, rtol=0, atol=1e-9)
        assert not torch.allclose(m.x0_from_eps(x_t, eps, ab[(t + 1).clamp(max=len(betas) - 1)][:, None]), x0)


def expected_output(betas, mu, s, sigma):
    """Mean and variance that Algorithm 2, driven by the exact eps-predictor of N(mu, s^2), returns: every step
    is linear in x, x_{t-1} = A x_t + B + sigma_t z, so mean and variance follow a scalar recursion.
    Written with eq. 11, mu_theta = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t), not the lesson's code."""
    ab = torch.cumprod(1 - betas, 0).tolist()
    mean, var = 0.0, 1.0  # x_{T-1} ~ N(0, 1)
    for t in range(len(betas) - 1, -1, -1):
        b, a = betas[t].item(), ab[t]
        k = math.sqrt(1 - a) / (a * s * s + 1 - a)  # eps_hat = k (x - sqrt(a) mu)
        A = (1 - b / math.sqrt(1 - a) * k) / math.sqrt(1 - b)
        B = b / math.sqrt(1 - a) * k * math.sqrt(a) * mu / math.sqrt(1 - b)
        noise = 0.0 if t == 0 else (b if sigma == "beta" else (1 - ab[t - 1]) / (1 - a) * b)
        mean, var = A * mean + B, A * A * var + noise
    return mean, var


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_sampler_with_exact_eps_recovers_a_gaussian(m, schedule, sigma):
    """Data N(mu, s^2): E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab), in closed form."""
    betas, mu, s, n = schedules(m)[schedule], 1.5, 0.5, 100_000
    ab = m.alpha_bar_of(betas)

    def exact_eps(x, t):
        a = ab[t[0]]  # the sampler calls the model with one t for the whole batch
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)

    g = torch.Generator().manual_seed(0)
    x, _ = m.ddpm_sample(exact_eps, torch.randn(n, 1, generator=g, dtype=torch.float64), betas, sigma, g)
    mean_exp, var_exp = expected_output(betas, mu, s, sigma)
    # the sampler is only exact as T -> infinity; with T = 1000 it is within 2% of the data's variance
    assert abs(mean_exp - mu) < 1e-3 and abs(var_exp / s**2 - 1) < 0.02
    # sample mean: standard error sqrt(var / n); sample variance: sqrt(2 / n) var (Gaussian); allow 4 of each
    assert abs(x.mean().item() - mean_exp) < 4 * math.sqrt(var_exp / n)
    assert abs(x.var().item() - var_exp) < 4 * math.sqrt(2 / n) * var_exp


def test_last_step_adds_no_noise(m):
    betas = m.linear_betas(1000)[:3]  # three steps; the one at t = 0 must return the mean
    model = lambda x, t: 0.1 * x
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, kept = m.ddpm_sample(model, x_T, betas, "beta", torch.Generator().manual_seed(1), keep=(0,))
    out1, _ = m.ddpm_sample(model, kept[0], betas[:1], "beta", torch.Generator().manual_seed(2))
    out2, _ = m.ddpm_sample(model, kept[0], betas[:1], "beta", torch.Generator().manual_seed(3))
    assert torch.equal(out1, out2)


def test_ideal_denoiser_memorises(m):
    g = torch.Generator().manual_seed(0)
    betas = m.linear_betas(1000)
    ab = m.alpha_bar_of(betas)
    # at small t, E[x_0 | x_t] is the training point that x_t was made from (points 0.5 apart, noise <= 0.03)
    grid = torch.stack(torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij"), -1).reshape(25, 2)
    grid = (grid * 0.5 - 1).double()
    ideal = m.ideal_eps_model(grid, ab)
    for t_val in (0, 5):
        t = torch.full((25,), t_val)
        x_t = m.q_sample(grid, t, ab, torch.randn(25, 2, generator=g, dtype=torch.float64))
        assert not torch.allclose(x_t, grid, atol=1e-3)
        x0_hat = m.x0_from_eps(x_t, ideal(x_t, t), ab[t][:, None])
        assert torch.allclose(x0_hat, grid, atol=1e-9)
    train = m.make_data("moons", 50, g).double()
    ideal = m.ideal_eps_model(train, ab)
    # sampling with it lands (almost) every sample on a training point; fresh data mostly does not
    x, _ = m.ddpm_sample(ideal, torch.randn(1000, 2, generator=g, dtype=torch.float64), betas, "beta_tilde", g)
    assert m.memorised_fraction(x, train, 0.01) > 0.97
    assert m.memorised_fraction(m.make_data("moons", 1000, g).double(), train, 0.01) < 0.1


def test_mmd_is_zero_for_equal_sets_and_grows_with_a_shift(m):
    g = torch.Generator().manual_seed(0)
    a, b = m.make_data("spiral", 1000, g), m.make_data("spiral", 1000, g)
    assert m.mmd2(a, a) == pytest.approx(0, abs=1e-12)
    assert m.mmd2(a, b) < m.mmd2(a, b + 0.1) < m.mmd2(a, b + 0.5)


def test_sliced_w2_is_zero_for_equal_sets_and_grows_with_a_shift(m):
    g = torch.Generator().manual_seed(0)
    a, b = m.make_data("spiral", 1000, g), m.make_data("spiral", 1000, g)
    assert m.sliced_w2(a, a) == pytest.approx(0, abs=1e-12)
    assert m.sliced_w2(a, b) < m.sliced_w2(a, b + 0.1) < m.sliced_w2(a, b + 0.5)
    # a pure shift by d moves every projection by d cos(angle): SW2 = |d| sqrt(mean cos^2) = |d| / sqrt(2)
    assert m.sliced_w2(a, a + torch.tensor([0.3, 0.0])) == pytest.approx(0.3 / math.sqrt(2), rel=1e-6)


def test_parse_args_in_jupyter_ignores_the_kernel_flags(m, in_jupyter):
    """A notebook cell calling main() must not parse the kernel's own `-f kernel.json` argument."""
    assert vars(m.parse_args()) == vars(m.parse_args([]))


def test_quick_never_writes_over_the_default_figures(m):
    assert m.parse_args([]).out == "figures"
    quick = m.parse_args(["--quick"])
    assert os.path.normpath(quick.out) == os.path.join("runs", "quick")
    assert (quick.steps, quick.n_memo, quick.n_train, quick.n_samples, quick.T) == (100, 100, 2000, 100, 200)
    assert m.parse_args(["--quick", "--out", "elsewhere"]).out == "elsewhere"


def test_quick_run_learns_and_writes_everything(tmp_path):
    samples = tmp_path / "samples.pt"
    rc, out, err = run_script("02_ddpm", "--quick", "--out", tmp_path, "--samples-out", samples)
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("loss ")]
    assert len(lines) == 4
    for ln in lines:  # "loss moons: first 25 steps 0.5049, last 25 steps 0.2956"
        first, last = float(ln.split(",")[0].split()[-1]), float(ln.split()[-1])
        assert last < first, ln
    for name in FIGURES:
        with Image.open(tmp_path / name) as img:
            lo, hi = img.convert("L").getextrema()
            assert hi - lo > 100, name
            if name.endswith(".gif"):
                assert img.n_frames > 10
    x = torch.load(samples, weights_only=True)
    assert x.dtype == torch.float32 and x.shape == (100, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize("args", [["--steps", "0"], ["--T", "0"], ["--data", "circles"], ["--sigma", "big"]])
def test_bad_value_exits_2_with_one_line(m, args, tmp_path):
    rc, out, err = call_main(m, *args, "--out", tmp_path)  # main in this process: the same exit path
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_value_from_the_shell_exits_2_with_one_line(tmp_path):
    # once as a real command: what a shell sees, start-up and shutdown included
    rc, out, err = run_script("02_ddpm", "--steps", "0", "--out", tmp_path)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
