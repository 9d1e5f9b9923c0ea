"""The torch / fbgemm / torchrec guard, with simulated mismatches."""

import subprocess
import sys

import pytest

from cctl_rec._versions import FIX_CPU, StackError, check_stack, installed

GOOD = {"torch": "2.13.0+cpu", "fbgemm": "1.8.0", "fbgemm_dist": "fbgemm-gpu-cpu", "torchrec": "1.8.0"}


def test_installed_stack_is_a_tested_combination():
    v = check_stack()
    assert v["torch"].startswith("2.13.0") and v["torchrec"] == "1.8.0"


def test_untested_combination_names_versions_and_fix():
    bad = dict(GOOD, fbgemm="1.9.0")
    with pytest.raises(StackError) as e:
        check_stack(bad, import_module=lambda m: None)
    msg = str(e.value)
    assert "fbgemm-gpu-cpu 1.9.0" in msg and "torch 2.13.0+cpu" in msg and FIX_CPU in msg
    assert "\n" not in msg


def test_fbgemm_that_fails_to_load_is_reported_in_one_line():
    def broken(name):
        if name == "fbgemm_gpu":
            raise OSError("/x/fbgemm_gpu_py.so: undefined symbol: _ZN3c1010Dispatcher\nmore")
    with pytest.raises(StackError) as e:
        check_stack(GOOD, import_module=broken)
    assert "fbgemm_gpu failed to load (/x/fbgemm_gpu_py.so: undefined symbol" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_torchrec():
    with pytest.raises(StackError, match=r"missing \['torchrec'\]"):
        check_stack(dict(GOOD, torchrec=None), import_module=lambda m: None)


@pytest.mark.slow  # a fresh interpreter (subprocess)
def test_import_guard_fires_at_import_time(tmp_path):
    # a fake fbgemm_gpu package earlier on sys.path simulates a broken binary
    (tmp_path / "fbgemm_gpu").mkdir()
    (tmp_path / "fbgemm_gpu" / "__init__.py").write_text("raise OSError('undefined symbol: _ZN5torch3jit')\n")
    r = subprocess.run([sys.executable, "-c", "import cctl_rec"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert "fbgemm_gpu failed to load (undefined symbol: _ZN5torch3jit)" in r.stderr
    assert installed()["torchrec"] == "1.8.0"
