"""`make setup` for the machine at hand: Python >= 3.11 checked with a clear message, CPU torch where there is
no CUDA (the lock's CUDA build as the fallback), and no package that shadows a standard-library module."""
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make_n(tmp_path, *args) -> str:
    """The commands `make setup` would run (dry run, into a venv folder that does not exist)."""
    r = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_cpu_setup_takes_torch_from_the_cpu_index_and_falls_back_to_the_lock(tmp_path):
    out = make_n(tmp_path, "TORCH=cpu")
    lock = (REPO / "requirements.lock").read_text()
    torch = next(ln.split("==")[1] for ln in lock.splitlines() if ln.startswith("torch=="))
    assert f"torch=={torch}+cpu" in out and "--index-url https://download.pytorch.org/whl/cpu" in out
    assert "--timeout 15" in out and "requirements-cuda-torch.txt" in out.split("||", 1)[1]
    assert "-r requirements.lock" not in out
    # the split itself: the CPU list has no CUDA package, the two lists together are the lock
    pattern = out.split("grep -Ev '", 1)[1].split("'", 1)[0]
    cpu = subprocess.run(["grep", "-Ev", pattern, "requirements.lock"], cwd=REPO, capture_output=True, text=True).stdout
    cuda = subprocess.run(["grep", "-E", pattern, "requirements.lock"], cwd=REPO, capture_output=True, text=True).stdout
    assert not [ln for ln in cpu.splitlines() if ln.startswith(("torch==", "torchvision==", "triton==", "nvidia-"))]
    assert {ln.split("==")[0] for ln in cuda.splitlines()} >= {"torch", "torchvision", "triton", "nvidia-cublas"}
    assert sorted(cpu.splitlines() + cuda.splitlines()) == sorted(lock.splitlines())


def test_cuda_setup_installs_the_lock_as_is(tmp_path):
    out = make_n(tmp_path, "TORCH=cuda")
    assert "-r requirements.lock" in out and "whl/cpu" not in out


def test_an_old_python_is_refused_with_the_version_and_what_to_do(tmp_path):
    fake = tmp_path / "python3.10"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'Python 3.10.12'; exit 0; fi\nexit 1\n")
    fake.chmod(0o755)
    r = subprocess.run(["make", "setup", f"PY={fake}", f"VENV={tmp_path / 'venv'}"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "needs Python >= 3.11" in r.stderr and "Python 3.10.12" in r.stderr and "PY=python3.11" in r.stderr
    assert not (tmp_path / "venv").exists()


def test_no_installed_module_shadows_the_standard_library(tmp_path):
    """The 'dataclasses' backport (img2dataset asks for it) shadows the standard library's module when
    site-packages comes first on sys.path, as under `prefect server start` (uvicorn --app-dir), and breaks
    the server. make setup never installs it; pip install -e . no longer pulls it (img2dataset is an extra);
    the demo refuses to start beside one."""
    from flows import demo
    shadows = demo.stdlib_shadows()
    assert not shadows, f"remove them: pip uninstall -y {' '.join(p.stem for p in shadows)}"
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "dataclasses.py").write_text("")
    (fake / "not_stdlib.py").write_text("")
    paths = {"purelib": str(fake), "platlib": str(fake)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sysconfig, "get_paths", lambda: paths)
        assert demo.stdlib_shadows() == [fake / "dataclasses.py"]
        with pytest.raises(SystemExit, match="pip uninstall -y dataclasses"):
            demo.run_demo()
