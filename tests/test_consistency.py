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
