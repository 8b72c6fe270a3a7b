"""Lesson 05: the samplers against exact answers (2D Gaussian-mixture data, whose eps-model is closed
form), the timestep bookkeeping, and the script end to end on a tiny 04 checkpoint."""
import math

import pytest
import torch

from conftest import load_script, run_script

m = load_script("05_sample")
AB = m.alpha_bar_of(m.cosine_betas(1000))
MIX = m.mixture()
MODEL = m.mixture_eps_model(*MIX, AB)


def x_T(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sample_mixture(means, stds, weights, n, generator):
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    return means[k] + stds[k, None] * torch.randn(n, means.shape[1], generator=generator, dtype=means.dtype)


@pytest.fixture(scope="module")
def reference():
    """The probability-flow ODE solved on all 1000 timesteps, from 500 fixed starting points."""
    x = x_T(500)
    return x, m.dpmpp_2m(MODEL, x, AB, 1000, spacing="time")


def err(x, ref):
    return (x - ref).norm(dim=1).mean().item()


# -- timesteps and respacing ---------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["time", "logsnr"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_timesteps_start_at_T_minus_1_end_at_0_and_are_distinct(spacing, schedule):
    ab = m.alpha_bar_of(getattr(m, f"{schedule}_betas")(1000))
    for n in (2, 3, 5, 10, 50, 500, 1000):
        ts = m.timesteps(ab, n, spacing)
        assert len(ts) == n and ts[0] == 999 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
    assert m.timesteps(ab, 1000, "time") == list(range(999, -1, -1))
    assert m.timesteps(ab, 5, "time") == [999, 749, 500, 250, 0]
    with pytest.raises(ValueError):
        m.timesteps(ab, 1001, spacing)


def test_trailing_timesteps_skip_t_0_and_land_on_x_0_from_T_over_n():
    for n in (2, 3, 5, 10, 50, 500, 999, 1000):
        ts = m.timesteps(AB, n, "trailing")
        assert len(ts) == n and ts[0] == 999 and ts[-1] == round(1000 / n) - 1
        assert all(a > b for a, b in zip(ts, ts[1:]))
    assert m.timesteps(AB, 5, "trailing") == [999, 799, 599, 399, 199]
    assert m.timesteps(AB, 1000, "trailing") == list(range(999, -1, -1))


def test_trailing_ddim_beats_time_spacing_at_10_steps_and_is_the_default(reference):
    # with "time" spacing DDIM spends its 10th evaluation at t = 0, where almost nothing is left to remove
    x, ref = reference
    e_trailing, e_time = (err(m.ddim(MODEL, x, AB, 10, spacing=s), ref) for s in ("trailing", "time"))
    assert e_trailing < 0.95 * e_time, (e_trailing, e_time)
    assert torch.equal(m.ddim(MODEL, x[:50], AB, 10), m.ddim(MODEL, x[:50], AB, 10, spacing="trailing"))


def test_logsnr_spacing_is_even_in_lambda():
    lam = 0.5 * (AB / (1 - AB)).log()
    ts = m.timesteps(AB, 20, "logsnr")[1:]  # the first step starts at T-1, the even range at T-2
    gaps = (lam[ts[1:]] - lam[ts[:-1]]).tolist()
    assert max(gaps) / min(gaps) < 2  # integer t near T-1 rounds, so only roughly even
    ts = m.timesteps(AB, 20, "time")[1:]
    gaps = (lam[ts[1:]] - lam[ts[:-1]]).tolist()
    assert max(gaps) / min(gaps) > 5  # evenly spaced in time is far from even in lambda


def test_respaced_betas_keep_alpha_bar_at_kept_timesteps():
    for ab in (AB, m.alpha_bar_of(m.linear_betas(1000))):
        for kept in ([0, 249, 499, 749, 999], [0, 10, 11, 500, 999], list(range(1000))):
            betas = m.respaced_betas(ab, kept)
            assert torch.allclose(torch.cumprod(1 - betas, 0), ab[kept], rtol=1e-7, atol=0)
        assert torch.allclose(m.respaced_betas(ab, list(range(1000)))[1:], 1 - ab[1:] / ab[:-1])


# -- samplers against the exact eps-model ----------------------------------------------------------------
def test_exact_mixture_eps_model_matches_autograd_score():
    # eps = -sqrt(1 - ab) * grad log q_t(x), with q_t the noised mixture's density
    means, stds, w = MIX
    x, t = x_T(8, seed=3).requires_grad_(True), torch.tensor([0, 1, 10, 100, 400, 700, 900, 999])
    ab = AB[t][:, None]
    var = ab * stds ** 2 + 1 - ab  # [8, K]
    d2 = (x[:, None] - ab.sqrt()[:, :, None] * means).square().sum(2)
    logq = torch.logsumexp(w.log() - var.log() - 0.5 * d2 / var - math.log(2 * math.pi), 1).sum()
    score, = torch.autograd.grad(logq, x)
    assert torch.allclose(MODEL(x.detach(), t), -(1 - ab).sqrt() * score, atol=1e-10)


def test_ddpm_over_all_steps_has_the_data_mean_and_variance():
    means, stds, w = MIX
    n = 10000
    x = m.ddpm(MODEL, x_T(n, seed=1), AB, 1000, generator=torch.Generator().manual_seed(2))
    mean = (w[:, None] * means).sum(0)  # the mixture's mean and covariance
    cov = (w[:, None, None] * (stds[:, None, None] ** 2 * torch.eye(2) + means[:, :, None] * means[:, None])).sum(0)
    cov = cov - mean[:, None] * mean[None]
    se_mean = (cov.diagonal() / n).sqrt()
    se_var = cov.diagonal() * math.sqrt(2 / n)
    assert ((x.mean(0) - mean).abs() < 5 * se_mean).all(), (x.mean(0), mean)
    assert ((x.T.cov().diagonal() - cov.diagonal()).abs() < 5 * se_var).all(), (x.T.cov(), cov)
    assert (x.T.cov()[0, 1] - cov[0, 1]).abs() < 5 * se_var.max()


@pytest.mark.parametrize("name,fn,tol", [
    ("ddim time", lambda x, n: m.ddim(MODEL, x, AB, n, spacing="time"), 0.005),
    # trailing: the reference, like "time", ends with an evaluation at t = 0; trailing's last jump starts at t = 4
    # at 200 steps, which leaves it 1% above "time" there (it is ahead below 50 steps)
    ("ddim trailing (default)", lambda x, n: m.ddim(MODEL, x, AB, n), 0.0055),
    ("dpm++2m logsnr", lambda x, n: m.dpmpp_2m(MODEL, x, AB, n), 0.005),
    ("dpm++2m time", lambda x, n: m.dpmpp_2m(MODEL, x, AB, n, spacing="time"), 0.005),
    ("heun", lambda x, n: m.heun(MODEL, x, AB, m.steps_for("heun", n)), 0.005),
])
def test_deterministic_samplers_converge_to_the_same_ode_solution(reference, name, fn, tol):
    x, ref = reference
    errors = [err(fn(x, n), ref) for n in (10, 50, 200)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < tol, errors  # 0.1% of the data's spread
    assert errors[0] < 0.2, errors


def test_orders_ddim_first_dpmpp_second(reference):
    x, ref = reference
    e_ddim = [err(m.ddim(MODEL, x, AB, n), ref) for n in (20, 80)]
    e_dpm = [err(m.dpmpp_2m(MODEL, x, AB, n), ref) for n in (20, 80)]
    assert 2.5 < e_ddim[0] / e_ddim[1] < 6  # 4x the steps: first order ~4x smaller
    assert e_dpm[0] / e_dpm[1] > 10  # second order ~16x smaller


def test_dpmpp_2m_at_10_steps_beats_ddim_at_10_steps(reference):
    x, ref = reference
    assert err(m.dpmpp_2m(MODEL, x, AB, 10), ref) < 0.8 * err(m.ddim(MODEL, x, AB, 10), ref)


def test_dpmpp_first_step_is_ddim_and_heun_first_step_is_euler():
    x = x_T(50)
    ddim = m.ddim(MODEL, x, AB, 2, spacing="time")
    assert torch.allclose(m.dpmpp_2m(MODEL, x, AB, 2, spacing="time"), ddim, atol=1e-12)
    assert torch.allclose(m.heun(MODEL, x, AB, 2), ddim, atol=1e-9)


class Captured(Exception):
    pass


def second_visit(sampler, ab, x_start, c, **opts):
    """Run `sampler` over all steps of the schedule ab from x_start with the exact eps-model of point
    data c, and return the x it reaches after its first step (captured at the second model call)."""
    def model(x, t):
        if t[0] == len(ab) - 2:
            raise Captured(x)
        ab_t = ab[t[0]].item()
        return (x - math.sqrt(ab_t) * c) / math.sqrt(1 - ab_t)
    try:
        sampler(model, x_start, ab, len(ab), **opts)
    except Captured as e:
        return e.args[0]
    raise AssertionError("the sampler never visited t = T-2")


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_ddim_eta_1_over_all_steps_is_the_ddpm_posterior(t):
    # point data c: x0_hat = c exactly, so one step from a fixed x_t draws from q(x_{t-1} | x_t, x_0 = c):
    # mean mu_tilde, variance beta_tilde = (1 - ab_{t-1}) / (1 - ab_t) beta_t (Ho et al. 2020, eq. 7)
    ab = AB[:t + 1]
    c = torch.tensor([0.3, -0.5], dtype=torch.float64)
    x_t = (math.sqrt(ab[t]) * c + math.sqrt(1 - ab[t]) * torch.tensor([0.7, 0.2], dtype=torch.float64)).expand(40000, 2)
    beta = 1 - ab[t].item() / ab[t - 1].item()
    beta_tilde = (1 - ab[t - 1].item()) / (1 - ab[t].item()) * beta
    mu = (math.sqrt(ab[t - 1]) * beta / (1 - ab[t]) * c + math.sqrt(1 - beta) * (1 - ab[t - 1]) / (1 - ab[t]) * x_t[0])
    for x in (second_visit(m.ddim, ab, x_t, c, eta=1.0, generator=torch.Generator().manual_seed(0)),
              second_visit(m.ddpm, ab, x_t, c, generator=torch.Generator().manual_seed(0))):
        assert torch.allclose(x.mean(0), mu, atol=5 * math.sqrt(beta_tilde / 40000))
        assert torch.allclose(x.var(0), torch.full((2,), beta_tilde, dtype=torch.float64), rtol=0.03)
    # and eta = 0 takes no noise at all
    x = second_visit(m.ddim, ab, x_t, c, eta=0.0)
    assert x.std(0).max() < 1e-12


def test_ddim_inversion_round_trips():
    x0 = sample_mixture(*MIX, 1000, torch.Generator().manual_seed(5))
    errors = []
    for n in (20, 100):
        z = m.ddim_invert(MODEL, x0, AB, n)
        errors.append(err(m.ddim(MODEL, z, AB, n), x0))
    assert errors[1] < 0.03 and errors[1] < errors[0] / 3, errors  # data spread ~1; first order in steps
    assert z.std().item() == pytest.approx(1.0, abs=0.08)  # the inverted points look like N(0, I)


def test_slerp_keeps_the_norm_and_the_endpoints():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 32, 32, generator=g), torch.randn(3, 32, 32, generator=g)
    assert torch.allclose(m.slerp(z0, z1, torch.tensor(0.0)), z0, atol=1e-5)
    assert torch.allclose(m.slerp(z0, z1, torch.tensor(1.0)), z1, atol=1e-5)
    mid = m.slerp(z0, z1, torch.tensor(0.5))
    assert mid.norm().item() == pytest.approx(0.5 * (z0.norm() + z1.norm()).item(), rel=0.02)
    assert (0.5 * (z0 + z1)).norm().item() < 0.8 * mid.norm().item()  # the straight line shrinks it


# -- the script ----------------------------------------------------------------------------------------------
FIGURES = ["05_quality.png", "05_grid.png", "05_exactness.png", "05_determinism.png", "05_inversion.png",
           "05_interpolation.png"]


@pytest.mark.xdist_group("quick_04")  # with -n 2 --dist loadgroup: one worker, one 04 run
def test_script_quick_on_a_04_checkpoint_writes_every_figure(tmp_path, quick_04):
    rc, _, errs, where = quick_04  # `04_train.py --quick`, run once per session (test_04 checks what it wrote)
    assert rc == 0, errs
    ckpt = where / "run" / "ckpt.pt"
    rc, out, errs = run_script("05_sample", "--quick", "--ckpt", ckpt, "--out", tmp_path / "f")
    assert rc == 0, errs
    assert f"loaded {ckpt}: step " in out  # which checkpoint, its step count...
    assert errs.strip().startswith("warning:") and "--quick run" in errs and len(errs.strip().splitlines()) == 1
    for name in FIGURES:
        assert (tmp_path / "f" / name).stat().st_size > 1000, name
    for word in ("exactness", "quality", "inversion", "dpm++2m", "heun", "images/s"):
        assert word in out


def test_missing_or_foreign_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    rc, out, errs = run_script("05_sample", "--quick", "--ckpt", tmp_path / "nope.pt", "--out", tmp_path)
    assert rc == 2 and "04_train.py" in errs and len(errs.strip().splitlines()) == 1, errs
    torch.save({"format": "someone-else", "model": {}}, tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    for name in ("foreign.pt", "garbage.pt"):  # in-process: the same exit path, without a second start-up
        with pytest.raises(SystemExit) as e:
            m.main(["--quick", "--ckpt", str(tmp_path / name), "--out", str(tmp_path)])
        errs = capsys.readouterr().err
        assert e.value.code == 2 and "04_train.py" in errs and len(errs.strip().splitlines()) == 1, errs
    with pytest.raises(SystemExit) as e:
        m.main(["--nfe", "5,x"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_dpmpp_2m_sde_first_step_is_ddpm_and_many_steps_give_the_data_moments():
    # one step of size h from x_T with D = x0_hat is the DDPM posterior step: DDIM with eta = 1, same noise
    x = x_T(300, seed=4)
    a = m.dpmpp_2m_sde(MODEL, x, AB, 2, spacing="time", generator=torch.Generator().manual_seed(5))
    b = m.ddim(MODEL, x, AB, 2, eta=1.0, spacing="time", generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-10)
    means, stds, w = MIX
    n = 10000
    x = m.dpmpp_2m_sde(MODEL, x_T(n, seed=6), AB, 200, generator=torch.Generator().manual_seed(7))
    mean = (w[:, None] * means).sum(0)
    cov = (w[:, None, None] * (stds[:, None, None] ** 2 * torch.eye(2) + means[:, :, None] * means[:, None])).sum(0)
    cov = cov - mean[:, None] * mean[None]
    assert ((x.mean(0) - mean).abs() < 5 * (cov.diagonal() / n).sqrt()).all(), (x.mean(0), mean)
    assert ((x.T.cov().diagonal() - cov.diagonal()).abs() < 5 * cov.diagonal() * math.sqrt(2 / n)).all()


def test_parse_args_in_jupyter_ignores_the_kernels_own_flags(in_jupyter):
    assert vars(m.parse_args()) == vars(m.parse_args([]))


def test_quick_never_writes_over_the_defaults():
    default, quick = m.parse_args([]), m.parse_args(["--quick"])
    assert (default.ckpt, default.out) == ("runs/04/ckpt.pt", "figures")
    assert (quick.ckpt, quick.out) == ("runs/quick/04/ckpt.pt", "runs/quick")
    assert m.parse_args(["--quick", "--out", "x", "--ckpt", "y.pt"]).out == "x"
