"""Lesson 03: the UNet's contracts (shapes, sizes, gradients, zero init, time embedding, attention), the
shape trace and receptive field helpers, overfitting, and the script end to end."""
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import call_main, load_script, run_script

m = load_script("03_unet")


def randomised(model, seed=1):
    """The same net with its zero-initialised output conv given ordinary random weights."""
    torch.manual_seed(seed)
    model.conv_out.reset_parameters()
    return model


# -- shapes and sizes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("config, shape", [
    (dict(), (2, 3, 32, 32)),
    (dict(), (1, 3, 16, 24)),  # not square
    (dict(in_ch=1, out_ch=2, base_ch=16, ch_mult=(1, 2), attn_levels=(1,)), (3, 1, 28, 28)),
    (dict(base_ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_levels=(), heads=2), (2, 3, 16, 32)),
    (dict(base_ch=8, ch_mult=(1,), attn_levels=(0,), heads=1), (2, 3, 5, 7)),  # one level: any size
])
def test_output_shape(config, shape):
    torch.manual_seed(0)
    model = randomised(m.UNet(**config))
    x = torch.randn(shape)
    out = model(x, torch.randint(0, 1000, (shape[0],)))
    out_ch = config.get("out_ch") or config.get("in_ch", 3)
    assert out.shape == (shape[0], out_ch, *shape[2:])
    assert out.abs().sum() > 0


@pytest.mark.parametrize("config, size, multiple", [
    (dict(), (30, 32), 4), (dict(), (32, 18), 4), (dict(ch_mult=(1, 2, 2, 2)), (36, 36), 8)])
def test_bad_sizes_raise_with_message(config, size, multiple):
    model = m.UNet(**config)
    with pytest.raises(ValueError, match=rf"multiples of {multiple} .*got {size[0]}x{size[1]}"):
        model(torch.zeros(1, 3, *size), torch.zeros(1, dtype=torch.long))


# -- gradients and initialisation -----------------------------------------------------------------------
def training_step_grads(model):
    x, eps = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(x, torch.tensor([3, 700])), eps).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = m.UNet()
    grads = training_step_grads(model)
    assert all(g is not None for g in grads.values())  # an unused parameter would break DDP in lesson 04
    # at initialisation the zero output conv blocks every gradient upstream of it ...
    upstream = [n for n in grads if not n.startswith("conv_out")]
    assert all(grads[n].abs().sum() == 0 for n in upstream)
    assert grads["conv_out.weight"].abs().sum() > 0
    # ... so check for real with a random output conv: every parameter must take part
    grads = training_step_grads(randomised(model))
    dead = [n for n, g in grads.items() if g is None or g.abs().sum() == 0]
    assert not dead, f"parameters with no gradient: {dead}"


def test_output_is_exactly_zero_at_init():
    torch.manual_seed(0)
    out = m.UNet()(torch.randn(4, 3, 32, 32), torch.tensor([0, 10, 500, 999]))
    assert torch.equal(out, torch.zeros_like(out))


# -- the time embedding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [16, 32, 128])
def test_timestep_embedding(dim):
    t = torch.arange(1000)
    emb = m.timestep_embedding(t, dim)
    assert emb.shape == (1000, dim) and emb.dtype == torch.float32
    assert emb.min() >= -1 and emb.max() <= 1
    assert torch.cdist(emb, emb).add(torch.eye(1000) * 10).min() > 1e-3  # every t has its own vector
    # the formula: sin then cos of t * 10000^(-k / (dim/2))
    half = dim // 2
    for tv, k in [(0, 0), (7, 1), (500, half - 1), (999, half // 2)]:
        w = 10000 ** (-k / half)
        assert emb[tv, k].item() == pytest.approx(math.sin(tv * w), abs=2e-4)
        assert emb[tv, half + k].item() == pytest.approx(math.cos(tv * w), abs=2e-4)


# -- attention ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 32, 1, 16), (2, 32, 4, 4)])
def test_attention_is_equivariant_to_pixel_permutations(shape):
    torch.manual_seed(0)
    attn = m.Attention(32, heads=4)
    x = torch.randn(shape)
    perm = torch.randperm(shape[2] * shape[3])
    out = attn(x)
    out_of_permuted = attn(x.flatten(2)[:, :, perm].reshape(shape))
    assert torch.allclose(out_of_permuted.flatten(2), out.flatten(2)[:, :, perm], atol=1e-5)
    assert (out - x).abs().max() > 1e-3  # it does something
    # a 3x3 conv knows where pixels are: the same check on a ResBlock must fail
    block = m.ResBlock(32, 32, 8)
    e = torch.randn(shape[0], 8)
    assert not torch.allclose(block(x.flatten(2)[:, :, perm].reshape(shape), e).flatten(2),
                              block(x, e).flatten(2)[:, :, perm], atol=1e-3)


def test_attention_heads_must_divide_channels():
    with pytest.raises(ValueError, match="divisible by heads"):
        m.Attention(30, heads=4)


# -- reproducibility, the trace, the parameter count ----------------------------------------------------
def test_same_seed_same_weights_same_output():
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 600])
    nets = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        nets.append(randomised(m.UNet(), seed=seed))
    sd0, sd1, sd2 = (n.state_dict() for n in nets)
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert not all(torch.equal(sd0[k], sd2[k]) for k in sd0)
    assert torch.equal(nets[0](x, t), nets[1](x, t))
    assert not torch.allclose(nets[0](x, t), nets[2](x, t))


def test_default_configuration():
    model = m.UNet()
    assert model.base_ch == 32 and sum(p.numel() for p in model.parameters()) == 1_744_035


def test_shape_trace_covers_every_block_and_parameter():
    model = m.UNet()
    rows = m.shape_trace(model, torch.randn(1, 3, 32, 32), torch.tensor([10]))
    assert rows[0][:2] == ("time_mlp", "Sequential") and rows[1][2] == (1, 3, 32, 32)
    assert rows[-1][0] == "conv_out" and rows[-1][3] == (1, 3, 32, 32)
    assert sum(r[-1] for r in rows) == sum(p.numel() for p in model.parameters())
    by_name = {r[0]: r for r in rows}
    assert by_name["down.2"][1:4] == ("Downsample", (1, 32, 32, 32), (1, 32, 16, 16))
    assert by_name["up.0"][1:4] == ("ResBlock+attention", (1, 128, 8, 8), (1, 64, 8, 8))  # 64 + 64 from the skip
    names = {f"{r[0]}." for r in rows}
    assert all(any(k.startswith(n) for n in names) for k in model.state_dict())


def test_receptive_field_grows_with_depth():
    torch.manual_seed(0)
    model = randomised(m.UNet())
    fields = m.receptive_fields(model, torch.randn(1, 3, 32, 32), torch.tensor([500]))
    assert [f[:2] for f in fields] == [("encoder level 0", 32), ("encoder level 1", 16), ("encoder level 2", 8),
                                       ("middle", 8), ("whole UNet", 32)]
    wide = [int((g > 0.01 * g.max()).sum()) for _, _, g in fields]
    assert wide[0] < 150 < wide[1] < wide[2]  # 3x3 convs grow it step by step; attention at 8x8 makes it global
    # level 0 is conv_in and the 4 convs of two res blocks: an 11x11 cone around the centre; outside it
    # only GroupNorm's statistics (a mean over all pixels) reach, with a far smaller gradient
    g0, outside = fields[0][2], fields[0][2].clone()
    outside[11:22, 11:22] = 0
    assert outside.max() < 0.03 * g0.max() and g0[11:22, 11:22].sum() > 0.7 * g0.sum()


def test_overfitting_a_batch_drives_the_loss_down():
    torch.manual_seed(0)
    model = m.UNet(base_ch=16, ch_mult=(1, 2), attn_levels=())
    x0 = m.to_unit(m.make_shapes(4, size=16)[0])
    t = torch.tensor([50, 150, 300, 450])
    alpha_bar = m.alpha_bar_of(m.linear_betas(1000))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=g)
    losses, fresh = m.overfit(model, x0, m.q_sample(x0, t, alpha_bar, eps), eps, t, alpha_bar, 40, 2e-3, g)
    assert len(losses) == 40 and losses[0] == pytest.approx(1.0, abs=0.15)  # eps_theta = 0: loss = E[eps^2]
    assert losses[-1] < 0.35 * losses[0]  # 0.21 here; a net that cannot learn stays near 1


# -- the script end to end ------------------------------------------------------------------------------
def test_script_quick_writes_every_figure(tmp_path):
    code, out, err = run_script("03_unet", "--quick", "--out", tmp_path)
    assert code == 0, err
    for name in m.FIGURES:
        img = Image.open(tmp_path / name)
        img.load()
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 50, f"{name} is blank"
    total = int(re.search(r"total parameters: (\d+)", out).group(1))
    assert total == sum(p.numel() for p in m.UNet().parameters())
    rows = re.findall(r"^\s*(\S+)\s+\S+\s+\(.*\)\s+\(.*\)\s+([\d,]+)$", out, re.M)
    assert len(rows) == 25 and sum(int(n.replace(",", "")) for _, n in rows) == total


@pytest.mark.parametrize("args, says", [(["--steps", "0"], "--steps"), (["--image-size", "30"], "multiples of 4"),
                                        (["--device", "tpu"], "invalid choice"), (["--lr", "0"], "--lr")])
def test_bad_input_exits_2_with_one_line(tmp_path, args, says):
    code, out, err = call_main(m, "--quick", "--out", tmp_path / "x", *args)  # in this process: the same exit path
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_bad_input_from_the_shell_exits_2_with_one_line(tmp_path):
    # once as a real command: what a shell sees, start-up and shutdown included
    code, out, err = run_script("03_unet", "--quick", "--out", tmp_path / "x", "--image-size", "30")
    assert code == 2 and "multiples of 4" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bench_prints_every_row_and_the_bf16_speed_ratio(capsys):
    m.bench(torch.device("cpu"), iters=1, batch=2, size=16)
    out = capsys.readouterr().out
    flops = float(re.search(r"([\d.]+) GFLOP per 16x16 forward", out).group(1))
    assert 0.1 < flops < 0.3  # 0.728 GFLOP at 32x32: a quarter of the pixels, about a quarter
    rows = re.findall(r"^\s*(fp32|bf16)\s+(NCHW|channels_last)\s+([\d.]+)\s+\d+\s+([\d.]+)\s+\d+$", out, re.M)
    assert [r[:2] for r in rows] == [("fp32", "NCHW"), ("fp32", "channels_last"), ("bf16", "NCHW"),
                                     ("bf16", "channels_last")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    ratios = re.search(r"bf16 autocast runs at ([\d.]+)x fp32's speed in NCHW and ([\d.]+)x .* channels_last", out)
    assert ratios and all(float(r) > 0 for r in ratios.groups())


# -- the two hazards: a notebook's sys.argv, and --quick over the committed figures ----------------------------
def test_parse_args_in_jupyter_ignores_the_kernels_argv(in_jupyter):
    assert vars(m.parse_args()) == vars(m.parse_args([]))


def test_quick_never_writes_over_the_committed_figures():
    assert m.parse_args([]).out == "figures"
    quick = m.parse_args(["--quick"])
    assert quick.out == os.path.join("runs", "quick") and quick.steps <= 30
    assert m.parse_args(["--quick", "--out", "/tmp/x"]).out == "/tmp/x"
