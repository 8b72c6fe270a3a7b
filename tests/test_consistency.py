"""Re-derived pieces must stay identical across lessons: same schedule, same data, same UNet outputs."""
import torch

from conftest import load_script


def test_03_make_shapes_matches_01():
    a, b = load_script("01_forward"), load_script("03_unet")
    for name in ("SHAPES", "COLORS", "SIZES", "POSITIONS"):
        assert getattr(a, name) == getattr(b, name)
    for n, size, seed in [(64, 32, 0), (50, 16, 1), (20, 64, 7)]:
        (ia, la, ca), (ib, lb, cb) = a.make_shapes(n, size, seed), b.make_shapes(n, size, seed)
        assert torch.equal(ia, ib) and torch.equal(la, lb) and ca == cb
    x = torch.linspace(-1.2, 1.2, 101)
    assert torch.equal(a.to_uint8(x), b.to_uint8(x)) and torch.equal(a.to_unit(ia), b.to_unit(ib))


def test_03_schedule_matches_01():
    a, b = load_script("01_forward"), load_script("03_unet")
    for T in (10, 1000):
        assert torch.equal(a.linear_betas(T), b.linear_betas(T))
        assert torch.equal(a.alpha_bar_of(a.linear_betas(T)), b.alpha_bar_of(b.linear_betas(T)))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    ab = a.alpha_bar_of(a.linear_betas(1000))
    assert torch.equal(a.q_sample(x0, t, ab, noise), b.q_sample(x0, t, ab, noise))


def test_04_make_shapes_and_schedules_match_01():
    a, b = load_script("01_forward"), load_script("04_train")
    for name in ("SHAPES", "COLORS", "SIZES", "POSITIONS"):
        assert getattr(a, name) == getattr(b, name)
    for n, size, seed in [(64, 32, 0), (20, 64, 7)]:
        (ia, la, ca), (ib, lb, cb) = a.make_shapes(n, size, seed), b.make_shapes(n, size, seed)
        assert torch.equal(ia, ib) and torch.equal(la, lb) and ca == cb
    for T in (10, 1000):
        assert torch.equal(a.linear_betas(T), b.linear_betas(T))
        assert torch.equal(a.cosine_betas(T), b.cosine_betas(T))
        assert torch.equal(a.alpha_bar_of(a.cosine_betas(T)), b.alpha_bar_of(b.cosine_betas(T)))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t, ab = torch.tensor([0, 10, 500, 999]), a.alpha_bar_of(a.cosine_betas(1000))
    assert torch.equal(a.q_sample(x0, t, ab, noise), b.q_sample(x0, t, ab, noise))


def test_04_unet_matches_03():
    a, b = load_script("03_unet"), load_script("04_train")
    for kwargs in [{}, dict(in_ch=1, base_ch=16, ch_mult=(1, 2), attn_levels=(1,)),
                   dict(base_ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)]:
        torch.manual_seed(0)
        net_a = a.UNet(**kwargs)
        torch.manual_seed(1)
        net_b = b.UNet(**kwargs)
        state = net_a.state_dict()
        assert list(state) == list(net_b.state_dict())  # same parameter names, same order
        g = torch.Generator().manual_seed(2)
        for p in state.values():  # randomise everything, the zero-initialised output conv included
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 if p.dtype.is_floating_point else p)
        net_a.load_state_dict(state)
        net_b.load_state_dict(state)
        c = kwargs.get("in_ch", 3)
        x, t = torch.randn(3, c, 16, 16, generator=g), torch.tensor([0, 321, 999])
        with torch.no_grad():
            assert torch.equal(net_a(x, t), net_b(x, t))


def test_02_schedule_and_q_sample_match_01():
    a, b = load_script("01_forward"), load_script("02_ddpm")
    for T in (2, 10, 1000, 4000):
        assert torch.equal(a.linear_betas(T), b.linear_betas(T))
        assert torch.equal(a.cosine_betas(T), b.cosine_betas(T))
        for betas in (a.linear_betas(T), a.cosine_betas(T)):
            assert torch.equal(a.alpha_bar_of(betas), b.alpha_bar_of(betas))
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    for shape, dtype in [((6, 2), torch.float32), ((6, 2), torch.float64), ((6, 3, 8, 8), torch.float32)]:
        x0, noise = torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)
        for ab in (a.alpha_bar_of(a.linear_betas(1000)), a.alpha_bar_of(a.cosine_betas(1000))):
            assert torch.equal(a.q_sample(x0, t, ab, noise), b.q_sample(x0, t, ab, noise))
    assert torch.equal(a.two_moons(500, torch.Generator().manual_seed(3)),
                       b.make_data("moons", 500, torch.Generator().manual_seed(3)))


def test_05_schedules_shapes_and_metric_match_01_and_04():
    a, b, c = load_script("01_forward"), load_script("04_train"), load_script("05_sample")
    for T in (10, 1000):
        for sched in ("linear_betas", "cosine_betas"):
            assert torch.equal(getattr(a, sched)(T), getattr(c, sched)(T))
            assert torch.equal(b.alpha_bar_of(getattr(b, sched)(T)), c.alpha_bar_of(getattr(c, sched)(T)))
    assert c.FORMAT == b.FORMAT
    for n, size, seed in [(64, 32, 0), (20, 64, 7)]:
        (ib, lb, cb), (ic, lc, cc) = b.make_shapes(n, size, seed), c.make_shapes(n, size, seed)
        assert torch.equal(ib, ic) and torch.equal(lb, lc) and cb == cc
    g = torch.Generator().manual_seed(0)
    f1, f2 = (torch.randn(300, 8, generator=g, dtype=torch.float64) for _ in range(2))
    assert b.frechet_distance(f1, f2 * 1.5) == c.frechet_distance(f1, f2 * 1.5)
    torch.manual_seed(0)
    clf_b = b.Classifier(3, 5)
    clf_c = c.Classifier(3, 5)
    clf_c.load_state_dict(clf_b.state_dict())
    x = torch.randn(4, 3, 32, 32, generator=g)
    fb, kb = b.features_and_classes(clf_b.eval(), x, "cpu")
    fc, kc = c.features_and_classes(clf_c.eval(), x, "cpu")
    assert torch.equal(fb, fc) and torch.equal(kb, kc)


def test_05_unet_and_eps_conversion_match_04():
    b, c = load_script("04_train"), load_script("05_sample")
    for kwargs in [{}, dict(in_ch=1, base_ch=16, ch_mult=(1, 2))]:
        torch.manual_seed(0)
        net_b = b.UNet(**kwargs)
        torch.manual_seed(1)
        net_c = c.UNet(**kwargs)
        state = net_b.state_dict()
        assert list(state) == list(net_c.state_dict())
        g = torch.Generator().manual_seed(2)
        for p in state.values():  # randomise everything, the zero-initialised output conv included
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 if p.dtype.is_floating_point else p)
        net_b.load_state_dict(state)
        net_c.load_state_dict(state)
        x, t = torch.randn(3, kwargs.get("in_ch", 3), 16, 16, generator=g), torch.tensor([0, 321, 999])
        with torch.no_grad():
            out_b, out_c = net_b(x, t), net_c(x, t)
        assert torch.equal(out_b, out_c)
        ab = b.alpha_bar_of(b.cosine_betas(1000))[t].float().view(-1, 1, 1, 1)
        for pred in ("eps", "v", "x0"):
            for u, v in zip(b.to_eps_x0(pred, out_b, x, ab), c.to_eps_x0(pred, out_c, x, ab)):
                assert torch.equal(u, v)
