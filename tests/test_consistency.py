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


def _shapes_schedules_and_objective_match_04(other, names, ch):
    """The re-derived data, schedules and objective of a later lesson give 04's exact bytes."""
    b = load_script("04_train")
    for name in names:
        assert getattr(b, name) == getattr(other, name)
    for n, size, seed in [(64, 32, 0), (20, 64, 7)]:
        (ib, lb, cb), (io, lo, co) = b.make_shapes(n, size, seed), other.make_shapes(n, size, seed)
        assert torch.equal(ib, io) and torch.equal(lb, lo) and cb == co
    x = torch.linspace(-1.2, 1.2, 101)
    assert torch.equal(b.to_uint8(x), other.to_uint8(x)) and torch.equal(b.to_unit(ib), other.to_unit(io))
    for T in (10, 1000):
        if hasattr(other, "linear_betas"):
            assert torch.equal(b.linear_betas(T), other.linear_betas(T))
        assert torch.equal(b.cosine_betas(T), other.cosine_betas(T))
        assert torch.equal(b.alpha_bar_of(b.cosine_betas(T)), other.alpha_bar_of(other.cosine_betas(T)))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, ch, 8, 8, generator=g), torch.randn(4, ch, 8, 8, generator=g)
    t, ab_all = torch.tensor([0, 10, 500, 999]), b.alpha_bar_of(b.cosine_betas(1000))
    assert torch.equal(b.q_sample(x0, t, ab_all, eps), other.q_sample(x0, t, ab_all, eps))
    ab = ab_all[t].float().view(-1, 1, 1, 1)
    # 06 trains v only (PRED): its trimmed copies give 04's bytes for pred "v" and weighting "min-snr"
    assert torch.equal(b.target_of("v", x0, eps, ab), other.v_target(x0, eps, ab))
    for u, v in zip(b.to_eps_x0("v", x0, eps, ab), other.eps_x0_of_v(x0, eps, ab)):
        assert torch.equal(u, v)
    assert torch.equal(b.loss_weight("min-snr", "v", ab.view(-1)), other.min_snr_weight(ab.view(-1)))
    for steps in (torch.tensor([0, 7, 999]), t):
        assert torch.equal(b.timestep_embedding(steps, 32), other.timestep_embedding(steps, 32))


def test_06_shapes_schedules_and_objective_match_04():
    _shapes_schedules_and_objective_match_04(load_script("06_condition"),
                                             ("SHAPES", "COLORS", "SIZES", "POSITIONS"), ch=3)


def test_06_unet_without_conditions_matches_04():
    b, f = load_script("04_train"), load_script("06_condition")
    for kwargs in [{}, dict(in_ch=1, base_ch=16, ch_mult=(1, 2), attn_levels=(1,)), dict(base_ch=24)]:
        torch.manual_seed(0)
        net_b = b.UNet(**kwargs)
        torch.manual_seed(1)
        net_f = f.UNet(**kwargs, num_classes=0, ctx_dim=0)
        g = _randomised_pair(net_b, net_f)
        x, t = torch.randn(3, kwargs.get("in_ch", 3), 16, 16, generator=g), torch.tensor([0, 321, 999])
        with torch.no_grad():
            assert torch.equal(net_b(x, t), net_f(x, t))
        # DDIM from 04 and 06 over the same network gives the same samples
        with torch.no_grad():
            ab = b.alpha_bar_of(b.cosine_betas(1000)).float()
            for pred in ("v", "eps"):  # eps: what classifier guidance hands the sampler
                assert torch.equal(b.ddim_sample(net_b, x, ab, 4, pred), f.ddim_sample(net_f, x, ab, 4, pred))


def test_06_classifier_and_frechet_distance_match_04():
    b, f = load_script("04_train"), load_script("06_condition")
    g = torch.Generator().manual_seed(0)
    f1, f2 = (torch.randn(300, 8, generator=g, dtype=torch.float64) for _ in range(2))
    assert b.frechet_distance(f1, f2 * 1.5) == f.frechet_distance(f1, f2 * 1.5)
    images, labels, _ = b.make_shapes(64, 32, 0)
    torch.manual_seed(0)  # the classifier's initial weights come from the global generator
    clf_b = b.train_classifier(images, labels, 5, "cpu", 3, 0)
    torch.manual_seed(0)
    clf_f = f.train_classifier(images, labels, 5, "cpu", 3, 0)
    for (kb, vb), (kf, vf) in zip(clf_b.state_dict().items(), clf_f.state_dict().items()):
        assert kb == kf and torch.equal(vb, vf)
    x = torch.randn(4, 3, 32, 32, generator=g)
    fb, cb = b.features_and_classes(clf_b, x, "cpu")
    ff, cf = f.features_and_classes(clf_f, x, "cpu")
    assert torch.equal(fb, ff) and torch.equal(cb, cf)


def test_07_shapes_schedules_and_objective_match_04():
    # 07 trains v with min-SNR only, as 06 does: the same check, on 4-channel latents
    _shapes_schedules_and_objective_match_04(load_script("07_latent"), ("SHAPES", "COLORS", "SIZES", "POSITIONS"), ch=4)


def test_07_training_recipe_and_flop_count_match_04():
    b, s = load_script("04_train"), load_script("07_latent")
    assert (s.LR, s.EMA_GAMMA, s.SLOW_CPU_FLOPS) == (2e-3, b.EMA_GAMMA, b.SLOW_CPU_FLOPS)
    assert (s.UNETS["pixel"], s.FULL["batch"]) == ((b.BASE_CH, b.CH_MULT), 16)  # the pixel UNet is 04's
    for step, steps, warmup in [(0, 100, 10), (5, 100, 10), (50, 100, 10), (99, 100, 1), (3, 7, 200)]:
        assert b.learning_rate(step, steps, 2e-3, warmup) == s.learning_rate(step, steps, 2e-3, warmup)
    weights = []
    for lesson in (b, s):  # the same AdamW steps, clipping and power EMA on the same weights and losses
        torch.manual_seed(0)
        net, ema = (torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.SiLU(), torch.nn.Linear(5, 3)) for _ in "ab")
        ema.load_state_dict(net.state_dict())
        opt, g = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=0.0), torch.Generator().manual_seed(1)
        for step in range(5):
            loss = net(torch.randn(8, 6, generator=g) * 10).square().mean()
            lesson.train_step(net, ema.requires_grad_(False), opt, loss, step, lesson.learning_rate(step, 5, 2e-3, 2))
        weights.append([*net.parameters(), *ema.parameters()])
    assert all(torch.equal(u, v) for u, v in zip(*weights))
    net, x, t = b.UNet(base_ch=16, ch_mult=(1, 2, 4)), torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)
    assert b.flops(net, x, t) == s.flops(net, x, t) > 0


def _randomised_pair(net_a, net_b, seed=2):
    state = net_a.state_dict()
    assert list(state) == list(net_b.state_dict())  # same parameter names, same order
    g = torch.Generator().manual_seed(seed)
    for p in state.values():  # randomise everything, the zero-initialised output conv included
        p.copy_(torch.randn(p.shape, generator=g) * 0.05 if p.dtype.is_floating_point else p)
    net_a.load_state_dict(state)
    net_b.load_state_dict(state)
    return g


def test_07_unet_matches_06_class_unet_and_04_unet():
    b, f, s = load_script("04_train"), load_script("06_condition"), load_script("07_latent")
    # 07's copy has no attn_levels (attention at level 2 and in the middle, as 04's default): the (1, 2) case
    # has attention only in the middle
    for kwargs in [{}, dict(in_ch=4, base_ch=16, ch_mult=(1, 2, 2)), dict(in_ch=1, base_ch=16, ch_mult=(1, 2))]:
        c = kwargs.get("in_ch", 3)
        # a 06 class-conditional state dict (ctx_dim=0) loads into 07's UNet and gives the same outputs
        torch.manual_seed(0)
        net_f = f.UNet(**kwargs, num_classes=5, ctx_dim=0)
        net_s = s.UNet(**kwargs, num_classes=5)
        g = _randomised_pair(net_f, net_s)
        x, t, y = torch.randn(3, c, 16, 16, generator=g), torch.tensor([0, 321, 999]), torch.tensor([0, 4, 5])
        with torch.no_grad():
            assert torch.equal(net_f(x, t, y), net_s(x, t, y))
            assert torch.equal(f.guided_eps(net_f, x, t, y[:3] % 5, 2.5), s.guided_eps(net_s, x, t, y[:3] % 5, 2.5))
        # without labels it is 04's UNet, and DDIM with the default options is 04's DDIM
        net_b, net_s0 = b.UNet(**kwargs), s.UNet(**kwargs, num_classes=0)
        g = _randomised_pair(net_b, net_s0)
        x = torch.randn(3, c, 16, 16, generator=g)
        ab = b.alpha_bar_of(b.cosine_betas(1000)).float()
        with torch.no_grad():
            assert torch.equal(net_b(x, t), net_s0(x, t))
            assert torch.equal(b.ddim_sample(net_b, x, ab, 4, "v"), s.ddim_sample(net_s0, x, ab, 4))


def test_07_classifier_and_frechet_distance_match_04():
    b, s = load_script("04_train"), load_script("07_latent")
    g = torch.Generator().manual_seed(0)
    f1, f2 = (torch.randn(300, 8, generator=g, dtype=torch.float64) for _ in range(2))
    assert b.frechet_distance(f1, f2 * 1.5) == s.frechet_distance(f1, f2 * 1.5)
    images, labels, _ = b.make_shapes(64, 32, 0)
    torch.manual_seed(0)  # the classifier's initial weights come from the global generator
    clf_b = b.train_classifier(images, labels, 5, "cpu", 3, 0)
    torch.manual_seed(0)
    clf_s = s.train_classifier(images, labels, 5, "cpu", 3, 0)
    for (kb, vb), (ks, vs) in zip(clf_b.state_dict().items(), clf_s.state_dict().items()):
        assert kb == ks and torch.equal(vb, vs)
    x = torch.randn(4, 3, 32, 32, generator=g)
    fb, cb = b.features_and_classes(clf_b, x, "cpu")
    fs, cs = s.features_and_classes(clf_s, x, "cpu")
    assert torch.equal(fb, fs) and torch.equal(cb, cs)
