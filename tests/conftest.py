"""Helpers shared by the tests: load a numbered script as a module, run one as a subprocess or call its main
in this process, and one 04 --quick run that several tests read.

Scripts start with a digit (01_forward.py), so `import 01_forward` is a syntax error: they are loaded
by path with importlib. Loading runs only the module's top level (definitions), never `main`.
A subprocess costs a new interpreter's start-up (seconds: importing torch), so tests run a script as one only
where the process itself is under test (its exit status and stderr as a shell sees them, a signal, torchrun,
a resume after the process is gone); elsewhere they call main in this process (`call_main`).
"""
import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_loaded = {}
# `pytest -n 2` (pytest-xdist) runs the tests in 2 processes: each then gets its share of the cores, so that
# torch's threads in one do not fight the other's (on 2 cores: 1 thread each, in-process and in subprocesses)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, (os.cpu_count() or 1) // WORKERS) if WORKERS > 1 else 2
if WORKERS > 1:
    torch.set_num_threads(THREADS)


def load_script(name):
    """Import ROOT/<name>.py (e.g. "01_forward") and return the module; cached per session."""
    if name not in _loaded:
        path = ROOT / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"lesson_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look modules up here
        spec.loader.exec_module(module)
        _loaded[name] = module
    return _loaded[name]


def run_script(name, *args, timeout=600, cwd=None, env=None):
    """Run `python <name>.py args...` in a subprocess; return (exit status, stdout, stderr)."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", str(THREADS))
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable, str(ROOT / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=full_env)
    return proc.returncode, proc.stdout, proc.stderr


def call_main(module, *args):
    """module.main(args) in this process; return (exit status, stdout, stderr) as run_script does. An exception
    other than SystemExit propagates: the test fails with its traceback, where a subprocess would print one."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main([str(a) for a in args])
            code = 0
        except SystemExit as e:  # as the interpreter turns sys.exit(x) into an exit status: None 0, a message 1
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    return code, out.getvalue(), err.getvalue()


def assert_clean_exit_2(code, out, err, needle):
    """A bad command line: exit status 2 and one line on stderr that names the problem, no traceback."""
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err


@pytest.fixture
def in_jupyter(monkeypatch):
    """The process as a Jupyter kernel runs a notebook: ipykernel loaded, sys.argv the kernel's own flags."""
    monkeypatch.setitem(sys.modules, "ipykernel", type(sys)("ipykernel"))
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"])


@pytest.fixture(scope="session")
def lesson():
    """lesson("01_forward") -> the loaded module."""
    return load_script


@pytest.fixture(scope="session")
def quick_04(tmp_path_factory):
    """One `04_train.py --quick` subprocess for the session: test_04 checks what it wrote, test_05 samples from its
    checkpoint. -> (exit status, stdout, stderr, folder): folder/run/ckpt.pt, the figures in folder/fig."""
    where = tmp_path_factory.mktemp("quick_04")
    return (*run_script("04_train", "--quick", "--out", where / "fig", "--run-dir", where / "run"), where)
