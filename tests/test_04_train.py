"""Lesson 04: the training script end to end (quick settings), exact resume, DDP, data, bad input.
Subprocesses where the process is under test (the command line, resume after the process is gone, torchrun,
Ctrl-C); main called in this process where only what the run does is (data, checkpoints, NaN, bad values)."""
import os
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, THREADS, call_main, load_script, run_script

m = load_script("04_train")
# settings that are module constants, not flags: a launcher sets them, then calls main with the flags
LAUNCHER = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("lesson_04", {path!r})
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
vars(m).update({constants!r})
{extra}
m.main(sys.argv[1:])
"""
# Ctrl-C in the middle of step `at` (its batch drawn, the generator moved on): the run finishes that step, saves its
# checkpoint there and exits 130; a checkpoint taken mid-step would make --resume inexact
INTERRUPT = """import os, signal
draw, calls = m.draw_batch, []
def draw_batch(*args):
    batch = draw(*args)
    calls.append(1)
    if len(calls) == {at}:
        os.kill(os.getpid(), signal.SIGINT)
    return batch
m.draw_batch = draw_batch"""
# what the runs below test (data, checkpoints, resume, DDP, NaN, Ctrl-C) does not depend on the network's width or on
# the figures: no quality metric, an 8-channel UNet (16 with --quick), 2 DDIM steps for the grids (5); the same code
SMALL = dict(EVAL_SAMPLES=0, BASE_CH=8, SAMPLE_STEPS=2)


def launcher(tmp, interrupt_at=None, **constants):
    """A script that runs 04_train.py's main with some module constants changed (SMALL's unless given), and
    interrupted at step `interrupt_at` if given."""
    path = tmp / "launch_04.py"
    extra = INTERRUPT.format(at=interrupt_at) if interrupt_at is not None else ""
    path.write_text(LAUNCHER.format(path=str(ROOT / "04_train.py"), constants={**SMALL, **constants}, extra=extra))
    return str(path)


def train(tmp, *args, run="run", interrupt_at=None, **constants):
    """A small --quick run (SMALL) as a subprocess; returns (exit status, stdout, stderr)."""
    cmd = [sys.executable, launcher(tmp, interrupt_at, **constants), "--quick", "--out", tmp / "fig",
           "--run-dir", tmp / run, *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(THREADS)))
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    return proc.returncode, proc.stdout, proc.stderr


def train_here(tmp, monkeypatch, *args, run="run", **constants):
    """The run `train` makes, in this process: module constants set for the test (SMALL's unless given), then main;
    returns (exit status, stdout, stderr)."""
    for name, value in {**SMALL, **constants}.items():
        monkeypatch.setattr(m, name, value)
    return call_main(m, "--quick", "--out", tmp / "fig", "--run-dir", tmp / run, *args)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# -- the objective's conversions ------------------------------------------------------------------------
@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
def test_targets_convert_back_to_eps_and_x0(pred):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    ab = m.alpha_bar_of(m.cosine_betas(1000))[torch.tensor([0, 10, 200, 500, 900, 990])].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    eps_hat, x0_hat = m.to_eps_x0(pred, m.target_of(pred, x0, eps, ab), x_t, ab)
    assert torch.allclose(eps_hat, eps, atol=2e-3) and torch.allclose(x0_hat, x0, atol=2e-3)


def test_min_snr_weights_make_one_effective_weight():
    # min-SNR weights the x0-space error by min(SNR, 5) whatever the target:
    # eps error = SNR * x0 error, v error = (1 + SNR) * x0 error
    ab = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.001], dtype=torch.float64)
    snr = ab / (1 - ab)
    x0_weight = snr.clamp(max=5)
    assert torch.allclose(m.loss_weight("min-snr", "eps", ab) * snr, x0_weight)
    assert torch.allclose(m.loss_weight("min-snr", "v", ab) * (1 + snr), x0_weight)
    assert torch.allclose(m.loss_weight("min-snr", "x0", ab), x0_weight)
    assert torch.equal(m.loss_weight("none", "eps", ab), torch.ones_like(ab))


def test_frechet_distance_of_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0, 0], dtype=torch.float64)
    assert m.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    # N(0, I) vs N(mu, 4 I) in 3D: |mu|^2 + 3 (1 + 4 - 2 * 2) = 1 + 3 = 4
    assert m.frechet_distance(a, b) == pytest.approx(4.0, rel=0.1)


def test_ddim_with_exact_model_recovers_point_data():
    # data = one point c: the exact eps-model is (x_t - sqrt(ab) c) / sqrt(1 - ab); DDIM must land on c
    ab_all = m.alpha_bar_of(m.cosine_betas(1000)).float()
    c = torch.tensor([0.3, -0.5]).view(1, 2, 1, 1)

    def model(x, t):
        ab = ab_all[t].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * c) / (1 - ab).sqrt()

    x = m.ddim_sample(model, torch.randn(5, 2, 1, 1), ab_all, 10, "eps")
    assert torch.allclose(x, c.expand(5, -1, -1, -1), atol=1e-4)


# -- the script: outputs, checkpoint format, resume ---------------------------------------------------
@pytest.mark.xdist_group("quick_04")  # with -n 2 --dist loadgroup: one worker, one 04 run
def test_quick_run_writes_checkpoint_and_figures(quick_04):
    code, out, err, where = quick_04  # `04_train.py --quick` as a subprocess, once per session (05's tests use it)
    assert code == 0, err
    assert "FD(samples, real)" in out and "images/s" in out
    ckpt = load(where / "run" / "ckpt.pt")
    assert {"format", "config", "model", "ema", "optimizer", "step", "rng"} <= set(ckpt)
    assert ckpt["format"] == m.FORMAT and ckpt["step"] == 12
    assert ckpt["config"]["quick"] is True  # 05 warns when it samples from a quick run
    for name in ("04_samples.png", "04_progress.png", "04_loss.png", "04_x0_pred.png"):
        img = Image.open(where / "fig" / name)
        lo, hi = img.convert("L").getextrema()
        assert hi > lo
    # the EMA model in the checkpoint builds and runs
    unet = m.UNet(in_ch=3, base_ch=ckpt["config"]["base_ch"], ch_mult=ckpt["config"]["ch_mult"])
    unet.load_state_dict(ckpt["ema"])
    assert unet(torch.zeros(2, 3, 32, 32), torch.tensor([0, 999])).shape == (2, 3, 32, 32)


def test_resume_is_bit_exact(tmp_path):
    # the learning rate follows a cosine over --steps, so the split run is one 8-step run stopped at step 4
    assert train(tmp_path, "--steps", "8", run="straight", SAVE_EVERY=4)[0] == 0
    code, out, _ = train(tmp_path, "--steps", "8", run="split", interrupt_at=4)
    assert code == 130 and "interrupted at step 4" in out
    code, out, err = train(tmp_path, "--steps", "8", "--resume", run="split")
    assert code == 0, err
    assert "resumed" in out
    a, b = load(tmp_path / "straight" / "ckpt.pt"), load(tmp_path / "split" / "ckpt.pt")
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["log"]["losses"] == b["log"]["losses"]


def test_torchrun_two_processes_agree(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           launcher(tmp_path), "--quick", "--steps", "4", "--out", str(tmp_path / "fig"),
           "--run-dir", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), effective batch 32" in proc.stdout
    assert "ranks agree on the weights: True" in proc.stdout
    assert load(tmp_path / "run" / "ckpt.pt")["step"] == 4


def test_quick_never_writes_over_the_defaults():
    default, quick = m.parse_args([]), m.parse_args(["--quick"])
    assert (default.out, default.run_dir) == ("figures", "runs/04")
    assert (quick.out, quick.run_dir) == ("runs/quick", "runs/quick/04") and quick.steps == 12
    assert m.parse_args(["--quick", "--resume"]).resume == os.path.join("runs/quick/04", "ckpt.pt")
    assert m.parse_args(["--quick", "--out", "x"]).run_dir == "runs/quick/04"  # --out moves figures only


def test_parse_args_in_jupyter_ignores_the_kernel_flags(in_jupyter):
    # a notebook's sys.argv holds the kernel's own flags; main() in a cell must not parse them
    assert vars(m.parse_args()) == vars(m.parse_args([]))


def test_constants_reach_the_config(monkeypatch):
    monkeypatch.setattr(m, "BASE_CH", 24)
    monkeypatch.setattr(m, "EVAL_SAMPLES", 0)
    args = m.parse_args([])
    assert args.base_ch == 24 and args.eval_samples == 0 and args.ch_mult == m.CH_MULT and args.T == m.T
    assert m.parse_args(["--quick"]).base_ch == 16


# -- data ---------------------------------------------------------------------------------------------
def test_shapes_dataset_deterministic_and_in_range():
    a, la, names = m.load_dataset("shapes", "unused", 32, seed=3, n_shapes=200)
    b, lb, _ = m.load_dataset("shapes", "unused", 32, seed=3, n_shapes=200)
    assert torch.equal(a, b) and torch.equal(la, lb) and names == list(m.SHAPES)
    x, t, eps = m.draw_batch(a, torch.arange(200), 16, torch.Generator().manual_seed(0), hflip=True)
    assert x.min() >= -1 and x.max() <= 1 and x.shape == eps.shape == (16, 3, 32, 32)
    assert t.min() >= 0 and t.max() < m.T


def write_folder(root, classes=("a", "b"), n=3, size=40):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_folder_dataset(tmp_path, monkeypatch):
    write_folder(tmp_path / "imgs")
    images, labels, names = m.load_dataset("folder", str(tmp_path / "imgs"), 16, seed=0)
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and names == ["a", "b"]
    code, out, err = train_here(tmp_path, monkeypatch, "--dataset", "folder", "--data-dir", tmp_path / "imgs",
                                "--image-size", "16", "--steps", "3")
    assert code == 0, err


def write_idx(path, array):
    dims = array.shape
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, len(dims)) + struct.pack(">" + "I" * len(dims), *dims))
        f.write(array.astype(np.uint8).tobytes())


def test_mnist_from_idx_files_without_download(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    os.makedirs(raw)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    images, labels, names = m.load_dataset("mnist", str(tmp_path), 32, seed=0)
    assert images.shape == (20, 1, 32, 32)  # 28x28 padded to 32x32 with background
    assert images[:, :, :2].max() == 0 and labels.tolist() == [i % 10 for i in range(20)]
    code, out, err = train_here(tmp_path, monkeypatch, "--dataset", "mnist", "--data-dir", tmp_path, "--steps", "3")
    assert code == 0, err


# -- bad input: one line, exit 2 ----------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--dataset", "imagenet"], "--dataset"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/dir"], "does not exist"),
    (["--image-size", "30"], "--image-size 30"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--resume", "/nonexistent/ckpt.pt"], "no checkpoint"),
] + ([(["--device", "cuda"], "CUDA")] if not torch.cuda.is_available() else []))
def test_bad_input_exits_2(tmp_path, monkeypatch, args, needle):
    code, out, err = train_here(tmp_path, monkeypatch, *args)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


def test_bad_input_from_the_shell_exits_2(tmp_path):
    # once as a real command, the script itself: what a shell sees, start-up and shutdown included
    code, out, err = run_script("04_train", "--quick", "--out", tmp_path / "fig", "--run-dir", tmp_path / "run",
                                "--resume", tmp_path / "none.pt")
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "no checkpoint" in err and "Traceback" not in err


def test_empty_folder_exits_2(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "empty")
    code, out, err = train_here(tmp_path, monkeypatch, "--dataset", "folder", "--data-dir", tmp_path / "empty")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no images" in err


def test_corrupt_and_foreign_checkpoints_exit_2(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    code, _, err = train_here(tmp_path, monkeypatch, "--resume")
    assert code == 2 and "not a readable checkpoint" in err
    torch.save({"format": "something-else", "model": {}}, tmp_path / "run" / "ckpt.pt")
    code, _, err = train_here(tmp_path, monkeypatch, "--resume")
    assert code == 2 and "not written by 04_train.py" in err


def test_incompatible_checkpoint_exits_2(tmp_path, monkeypatch):
    assert train_here(tmp_path, monkeypatch, "--steps", "2")[0] == 0
    code, _, err = train_here(tmp_path, monkeypatch, "--steps", "4", "--resume", "--pred", "eps")
    assert code == 2 and "pred='v'" in err and len(err.strip().splitlines()) == 1


def test_nan_stops_the_run_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    assert train_here(tmp_path, monkeypatch, "--steps", "4")[0] == 0
    path = tmp_path / "run" / "ckpt.pt"
    before = path.read_bytes()
    # a learning rate of 1e38 blows the weights up within a step or two, before the next save (8, --quick's)
    code, out, err = train_here(tmp_path, monkeypatch, "--steps", "40", "--resume", "--lr", "1e38")
    assert code == 1
    assert "stopping" in err and "last good checkpoint" in err
    assert path.read_bytes() == before


def test_ctrl_c_saves_a_checkpoint_and_exits(tmp_path):
    import signal
    import time
    # not --quick: it caps the run at 12 steps, which a loaded machine can finish before the signal lands
    cmd = [sys.executable, launcher(tmp_path, SAVE_EVERY=100000, SAMPLE_EVERY=100000, N_SHAPES=2000),
           "--batch-size", "8", "--steps", "100000", "--out", str(tmp_path / "fig"), "--run-dir", str(tmp_path / "run")]
    # a shell that starts jobs in the background (nohup, CI runners) hands them SIGINT ignored, and Python then
    # keeps ignoring it; a terminal's Ctrl-C is what we test, so give the child the default disposition back
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = b"", time.time() + 300
    while b"step 20/" not in seen and time.time() < deadline:  # training has started
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"interrupted at step" in out
    step = load(tmp_path / "run" / "ckpt.pt")["step"]
    assert 20 <= step < 100000
