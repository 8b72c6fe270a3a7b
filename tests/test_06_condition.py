"""Lesson 06: guidance formulas, label dropout, classifier guidance, the tokenizer and cross-attention,
the held-out captions, and the script end to end (quick settings) with bad input."""

import re

import pytest
import torch
from PIL import Image

from conftest import assert_clean_exit_2, call_main, load_script, run_script

m = load_script("06_condition")


def randomised(net, seed=0):
    """Every parameter random (the output conv starts at zero, which would hide any bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def class_unet():
    return randomised(m.UNet(base_ch=16, ch_mult=(1, 2), attn_levels=(1,), num_classes=3))


# -- classifier-free guidance -------------------------------------------------------------------------
def test_guidance_scale_one_is_conditional_and_zero_unconditional_exactly():
    net = class_unet()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 200, 600, 999]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 3))
        assert torch.equal(m.guided_eps(net, x, t, y, 1.0), cond)
        assert torch.equal(m.guided_eps(net, x, t, y, 0.0), uncond)
        assert not torch.allclose(cond, uncond)  # the label matters, so the two checks above can fail
        # other scales: one batched pass gives u + s (c - u)
        for s in (0.5, 3.0, 7.5):
            assert torch.allclose(m.guided_eps(net, x, t, y, s), uncond + s * (cond - uncond), atol=1e-5)


def cfg_forms(out_u, out_c, s):
    """One formula, written four ways in papers and repositories (w = s - 1):
        out_u + s (out_c - out_u)             GLIDE (Nichol et al. 2022), diffusers' guidance_scale = s
        (1 + w) out_c - w out_u               Ho & Salimans 2022, with w = s - 1 (w = 0: no guidance)
        out_c + (s - 1) (out_c - out_u)       'conditional plus a push away from unconditional'
        lerp(out_u, out_c, s)                 torch.lerp: start + weight (end - start), weight s > 1 extrapolates
    Expanding each gives (1 - s) out_u + s out_c. So 'scale 7.5' in one repository is 'w = 6.5' in the paper."""
    w = s - 1
    return [out_u + s * (out_c - out_u), (1 + w) * out_c - w * out_u, out_c + (s - 1) * (out_c - out_u),
            torch.lerp(out_u, out_c, s)]


def test_the_cfg_forms_are_one_formula():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for s in (0.0, 1.0, 2.0, 3.0, 7.5):
        forms = cfg_forms(u, c, s)
        assert len(forms) == 4
        for f in forms:
            assert torch.allclose(f, (1 - s) * u + s * c, atol=1e-5)
        # the script's guided_eps, over a "model" that returns c for label 1 and u for the null label 0
        model = lambda x, t, y: torch.where((y == 1).view(-1, 1, 1, 1), torch.cat([c, c])[:len(y)],  # noqa: E731
                                            torch.cat([u, u])[:len(y)])
        guided = m.guided_eps(model, u, torch.zeros(2), torch.ones(2, dtype=torch.long), s, torch.zeros(2).long())
        assert torch.allclose(guided, (1 - s) * u + s * c, atol=1e-5)
    assert torch.equal(cfg_forms(u, c, 1.0)[3], c) and torch.equal(cfg_forms(u, c, 0.0)[3], u)


def test_guiding_v_equals_guiding_eps():
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 3, 8, 8, generator=g)
    v_u, v_c = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    ab = m.alpha_bar_of(m.cosine_betas(1000))[torch.tensor([5, 300, 700, 990])].float().view(-1, 1, 1, 1)
    eps_u, eps_c = m.eps_x0_of_v(v_u, x_t, ab)[0], m.eps_x0_of_v(v_c, x_t, ab)[0]
    for s in (2.0, 3.0, 7.5):
        eps_from_guided_v = m.eps_x0_of_v(torch.lerp(v_u, v_c, s), x_t, ab)[0]
        assert torch.allclose(eps_from_guided_v, torch.lerp(eps_u, eps_c, s), atol=1e-4)


def test_label_dropout_uses_the_null_label_at_the_rate():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(5, (40_000,), generator=g)
    for p in (0.1, 0.3):
        out = m.drop_condition(y, torch.tensor(5), p, torch.Generator().manual_seed(1))
        dropped = out == 5
        assert abs(dropped.float().mean().item() - p) < 0.01
        assert torch.equal(out[~dropped], y[~dropped])  # the rest keep their label
    assert torch.equal(m.drop_condition(y, torch.tensor(5), 0.0, g), y)
    tokens = torch.randint(2, 20, (1000, 9), generator=g)
    null = torch.tensor([1] + [0] * 8)
    out = m.drop_condition(tokens, null, 0.1, torch.Generator().manual_seed(2))
    rows = (out == null).all(1)
    assert 0.07 < rows.float().mean().item() < 0.13 and torch.equal(out[~rows], tokens[~rows])


# -- classifier guidance -------------------------------------------------------------------------------
class LinearClassifier(torch.nn.Module):
    """log p(y | x) concave in x: a gradient step must raise it."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 16 * 16, 3)

    def forward(self, x, t):
        return self.lin(x.flatten(1))


def test_a_classifier_guidance_step_raises_log_p_of_the_guided_class():
    torch.manual_seed(0)
    net, clf = class_unet(), LinearClassifier()
    alpha_bar = m.alpha_bar_of(m.cosine_betas(1000)).float()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t, s_next = 500, 480
    tt = torch.full((6,), t)
    ab_t, ab_s = alpha_bar[t], alpha_bar[s_next]

    def ddim_step(eps):  # x_t -> x_s with the given eps (DDIM, eta = 0)
        x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
        return ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps

    for c in range(3):
        y = torch.full((6,), c)
        with torch.no_grad():
            plain = ddim_step(m.classifier_guided_eps(net, clf, x, tt, y, 0.0, alpha_bar))
            guided = ddim_step(m.classifier_guided_eps(net, clf, x, tt, y, 2.0, alpha_bar))
            log_p = [torch.log_softmax(clf(z, tt), 1)[:, c] for z in (plain, guided)]
        assert (log_p[1] > log_p[0]).all(), (c, log_p)
        assert not torch.allclose(plain, guided)


# -- text: tokenizer, padding, held-out pairs ----------------------------------------------------------
CAPTIONS = m.make_shapes(300, size=16, seed=0)[2]


def test_tokenizer_round_trips_and_rejects_unknown_words():
    tok = m.Tokenizer(CAPTIONS)
    ids = tok.encode(CAPTIONS)
    decode = lambda tokens: [" ".join(tok.vocab[i] for i in row.tolist() if i > 1) for row in tokens]  # noqa: E731
    assert ids.shape == (300, tok.length) and (ids[:, 0] == 1).all()  # START first, never padding
    assert decode(ids) == CAPTIONS
    assert decode(tok.encode(["a large green star"])) == ["a large green star"]
    assert tok.encode([""]).tolist() == [[1] + [0] * (tok.length - 1)]  # the empty caption: START only
    with pytest.raises(ValueError, match="purple.*vocabulary.*green"):
        tok.encode(["a purple star"])
    with pytest.raises(ValueError, match="at most"):
        tok.encode(["a " * tok.length])


def test_padding_tokens_change_nothing_through_cross_attention():
    tok = m.Tokenizer(CAPTIONS)
    L = tok.length
    torch.manual_seed(0)
    model = randomised(m.TextToImage(m.UNet(base_ch=16, ch_mult=(1, 2), attn_levels=(1,), ctx_dim=32),
                                     m.TextEncoder(len(tok.vocab), L + 4, width=32, layers=2)))
    tokens = tok.encode(["a red star", "a small blue circle at the top left", ""])
    longer = torch.cat([tokens, torch.zeros(3, 4, dtype=torch.long)], 1)  # 4 more padding tokens
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([10, 500, 900])
    with torch.no_grad():
        a, b = model(x, t, tokens), model(x, t, longer)
        other = model(x, t, tok.encode(["a green star", "a small blue circle at the top left", ""]))
        pad_effect, word_effect = (a - b).abs().max(), (a[0] - other[0]).abs().max()
        assert pad_effect < 1e-6 and word_effect > 1e-5, (pad_effect, word_effect)  # a real word does matter
        # the cross-attention alone: garbage in the padded positions of ctx is ignored
        cross = randomised(m.CrossAttention(16, 32, heads=4))
        ctx, mask = torch.randn(3, L, 32, generator=g), tokens != 0
        h = torch.randn(3, 16, 8, 8, generator=g)
        junk = torch.where(mask[:, :, None], ctx, 100 * torch.randn(3, L, 32, generator=g))
        assert torch.allclose(cross(h, ctx, mask), cross(h, junk, mask), atol=1e-6)


def test_held_out_pairs_never_occur_in_training_captions():
    images, _, captions = m.make_shapes(2000, size=16, seed=0)
    holdout = [("red", "star"), ("green", "circle"), ("blue", "cross")]
    train = m.text_training_set(captions, torch.arange(2000), holdout)
    pairs = [f" {c} {s} " for c, s in holdout]
    assert sum(any(p in c + " " for p in pairs) for c in captions) > 100  # they exist in the data
    g = torch.Generator().manual_seed(0)
    for i in train.tolist():
        keep = (torch.rand(4, generator=g) < 0.5).tolist()
        for text in (captions[i], m.caption_variant(captions[i], keep)):
            assert not any(p in text + " " for p in pairs), text
    assert len(train) + sum(any(p in c + " " for p in pairs) for c in captions) == 2000


def test_warm_started_text_model_is_the_unconditional_class_model():
    cls = class_unet()
    tok = m.Tokenizer(CAPTIONS)
    text = randomised(m.TextToImage(m.UNet(base_ch=16, ch_mult=(1, 2), attn_levels=(1,), ctx_dim=32),
                                    m.TextEncoder(len(tok.vocab), tok.length, width=32)), seed=5)
    m.warm_start(text.unet, cls)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([3, 400, 950])
    with torch.no_grad():
        out = text(x, t, tok.encode(["a red star", "a small blue circle at the top left", ""]))
        assert torch.allclose(out, cls(x, t, torch.full((3,), 3)), atol=1e-5)


def test_caption_variants_drop_parts():
    c = "a small red star at the top left"
    assert m.caption_variant(c, [True] * 4) == c
    assert m.caption_variant(c, [False, True, True, False]) == "a red star"
    assert m.caption_variant(c, [True, False, True, True]) == "a small star at the top left"


def test_colour_from_pixels_is_exact_on_real_shapes():
    images, _, captions = m.make_shapes(300, size=32, seed=4)
    want = torch.tensor([list(m.COLORS).index(c.split()[2]) for c in captions])
    assert torch.equal(m.colour_of(m.to_unit(images)), want)


# -- the script ----------------------------------------------------------------------------------------
def test_quick_run_writes_every_figure_then_draws_a_prompt(tmp_path):
    args = ["--quick", "--out", tmp_path / "fig", "--run-dir", tmp_path / "run"]
    code, out, err = run_script("06_condition", *args)
    assert code == 0, err
    assert "guide says" in out and "unseen (held out)" in out and "target (CFG scale 3" in out
    assert "this run computes" in out
    # the trade-off (accuracy and FD per method and scale) is the printed table: a row per scale of each method
    assert all(f"classifier-free {s:6g}" in out for s in (0, 1, 3, 5))
    assert all(f"classifier {s:6g}" in out for s in (0, 3, 10, 30))
    for name in ("06_cfg_grid.png", "06_classifier_guidance.png", "06_text_grid.png", "06_loss.png"):
        lo, hi = Image.open(tmp_path / "fig" / name).convert("L").getextrema()
        assert hi > lo, name
    for name in ("class.pt", "text.pt", "noisy_classifier.pt", "classifier.pt"):
        ckpt = torch.load(tmp_path / "run" / name, map_location="cpu", weights_only=True)
        assert ckpt["format"] == m.FORMAT
    # the prompt in this process: what links it to the run above is only what that run wrote to disk
    code, out, err = call_main(m, *args, "--prompt", "a large green star")
    assert code == 0, err
    assert "reusing" in out and "(12 steps" in out  # the text model trained above (its step count), not a new one
    assert Image.open(tmp_path / "fig" / "06_prompt.png").size[0] > 100


def test_text_model_trains_with_its_own_loss_weight(tmp_path, monkeypatch):
    seen, train = {}, m.train_diffusion

    def spy(model, batch_fn, y_null, steps, weight, *rest):
        seen[rest[-1]] = weight  # rest ends with the model's name
        return train(model, batch_fn, y_null, steps, weight, *rest)

    monkeypatch.setattr(m, "train_diffusion", spy)
    m.main(["--quick", "--out", str(tmp_path / "fig"), "--run-dir", str(tmp_path / "run"), "--scales", "3",
            "--cg-scales", "0", "--text-loss-weight", "none"])
    assert seen == {"class model": "min-snr", "text model": "none"}
    text = torch.load(tmp_path / "run" / "text.pt", map_location="cpu", weights_only=True)
    assert text["config"]["loss_weight"] == "none"  # so a min-SNR text model is not reused as this one


def test_text_loss_weight_min_snr_plus_1_is_vs_weight_with_the_snr_clamped():
    ab = torch.tensor([0.9999, 0.99, 0.9, 0.5, 0.1, 1e-4])
    snr = ab / (1 - ab)
    w = m.loss_weight("min-snr+1", ab)  # on the v error; the x_0 error's weight is 1 + min(SNR, 5)
    assert torch.allclose(w * (1 + snr), 1 + snr.clamp(max=5))
    assert torch.allclose(w[snr <= 5], torch.ones(int((snr <= 5).sum())))  # plain v's weight where SNR <= 5
    assert torch.allclose(w - m.loss_weight("min-snr", ab), 1 / (1 + snr))  # min-SNR's weight + 1 on the x_0 error
    assert torch.equal(m.loss_weight("none", ab), torch.ones(6))


def test_run_cost_is_printed_scales_with_steps_and_the_default_fits_its_budget(capsys):
    tok = m.Tokenizer(CAPTIONS)

    def total(*argv):
        m.run_cost(m.parse_args(list(argv)), tok)
        out = capsys.readouterr().out
        assert "min at the budgets' 64 GFLOP/s (2 CPU cores without bf16 units)" in out, out
        return float(re.search(r"this run computes ([0-9.]+) TFLOP", out).group(1))

    default, longer = total(), total("--steps", str(m.parse_args([]).steps + 2400))
    assert 0 < default <= 77  # lesson 06's budget: 20 min at 64 GFLOP/s
    assert 20 < longer - default < 40  # 2400 more class-model steps, ~13 GFLOP each
    assert 0 < total("--quick") < 1 and total("--prompt", "a red star") < default


@pytest.mark.parametrize("bad, says", [
    (["--prompt", "a purple star"], "vocabulary"),
    (["--prompt", "a small red star at the top left at the top"], "at most"),
    (["--scales", "1,two"], "--scales"),
    (["--cg-scales", "-3"], "--cg-scales"),
    (["--steps", "0"], "--steps"),
    (["--text-loss-weight", "snr"], "--text-loss-weight"),
])
def test_bad_input_exits_2(tmp_path, bad, says):
    # main in this process: the same exit path, without a new interpreter's start-up
    assert_clean_exit_2(*call_main(m, "--quick", "--out", tmp_path, "--run-dir", tmp_path, *bad), says)


def test_bad_input_from_the_shell_exits_2(tmp_path):
    # once as a real command: what a shell sees, start-up and shutdown included
    assert_clean_exit_2(*run_script("06_condition", "--quick", "--out", tmp_path, "--run-dir", tmp_path,
                                    "--prompt", "a purple star"), "vocabulary")


def test_quick_runs_never_write_over_the_defaults():
    full, quick = m.parse_args([]), m.parse_args(["--quick"])
    assert (full.out, full.run_dir) == ("figures", "runs/06")
    assert quick.out == "runs/quick" and quick.run_dir.replace("\\", "/") == "runs/quick/06"
    assert vars(m.parse_args(["--quick", "--out", "figures", "--run-dir", "runs/06"])) == vars(quick)
    assert m.parse_args(["--quick", "--out", "o", "--run-dir", "r"]).run_dir == "r"
    assert quick.steps == 12 and full.steps == 3000 and quick.text_steps < full.text_steps


def test_parse_args_ignores_the_jupyter_kernel_arguments(in_jupyter):
    assert vars(m.parse_args()) == vars(m.parse_args([]))
