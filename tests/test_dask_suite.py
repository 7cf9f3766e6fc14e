"""dask's own map_overlap tests, run with the sweep switched on.

They come with dask's wheel; every graph they build goes through the sweep pass
(``fallback="raise"``, tiny slabs, so that anything recognised is swept in many
steps), and each test's own assertions compare with numpy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

CONFTEST = '''
import pytest

import dask_sweep


@pytest.fixture(autouse=True)
def sweep_on():
    with dask_sweep.enable(memory_limit="64MiB", fallback="raise", target_slab_bytes="4KiB"):
        yield
'''


@pytest.mark.timeout(300)
def test_dasks_overlap_tests_pass_with_the_sweep_on(tmp_path):
    import dask

    src = os.path.join(os.path.dirname(dask.__file__), "array", "tests", "test_overlap.py")
    if not os.path.exists(src):
        pytest.skip("dask's tests are not installed with this dask")
    shutil.copy(src, tmp_path / "test_overlap.py")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-W",
         "ignore", "test_overlap.py"],
        cwd=tmp_path, capture_output=True, text=True,
        # a run of its own, not a worker of this one (pytest-xdist's variables dropped)
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},
    )
    tail = p.stdout[-3000:]
    assert p.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail
