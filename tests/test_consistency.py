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
