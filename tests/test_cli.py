"""The command line, run as users run it: ``python -m dask_sweep ...`` in a subprocess.

Inputs are small generated volumes (a Zarr array and the same volume as a folder
of TIFF slices); results are compared with scipy and with the DSL in-process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile
import zarr

from dask_sweep import cli, dsl
from dask_sweep.errors import SinkError

SHAPE = (32, 64, 64)
BUDGET = "16MiB"


def sweep_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_SWEEP__")}
    return subprocess.run(
        [sys.executable, "-m", "dask_sweep", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    blobs = ndi.maximum_filter(rng.random(SHAPE) > 0.998, 5)
    vol = np.clip(rng.normal(70, 30, SHAPE) + 110 * blobs, 0, 255).astype("uint8")
    zpath = str(d / "vol.zarr")
    zarr.create_array(zpath, shape=SHAPE, chunks=(8, 64, 64), dtype="uint8")[...] = vol
    tdir = d / "slices"
    tdir.mkdir()
    for i, plane in enumerate(vol):
        tifffile.imwrite(tdir / f"z{i:03d}.tif", plane)
    return {"dir": d, "vol": vol, "zarr": zpath, "tiff": str(tdir)}


# ----------------------------------------------------------------------------- parsing (in-process)


def test_parse_operations():
    op, v = cli.parse_operation("gaussian:sigma=2")
    assert op.name == "gaussian" and v == {"sigma": 2.0}
    assert cli.parse_operation("gaussian:2x1x1")[1] == {"sigma": (2.0, 1.0, 1.0)}
    assert cli.parse_operation("median:3")[1] == {"size": 3}
    assert cli.parse_operation("median:size=[3,5,5]")[1] == {"size": (3, 5, 5)}
    assert cli.parse_operation("threshold:otsu")[1] == {"value": "otsu"}
    assert cli.parse_operation("threshold:quantile=0.9")[1] == {"quantile": 0.9}
    assert cli.parse_operation("astype:uint8,clip=true")[1] == {
        "dtype": np.dtype("uint8"), "clip": True}
    assert cli.parse_operation("edt:sampling=2x1x1")[0].name == "distance_transform_edt"
    assert cli.parse_operation("binary-opening:iterations=2")[0].name == "binary_opening"
    assert cli.parse_operation("label")[1] == {}


@pytest.mark.parametrize(
    "spec, words",
    [
        ("gausian:sigma=2", ["unknown operation", "Did you mean 'gaussian'", "median"]),
        ("gaussian:sigma=2,foo=1", ["unknown parameter 'foo'", "sigma, truncate, mode"]),
        ("gaussian", ["missing sigma", "gaussian:sigma=2"]),
        ("gaussian:sigma=abc", ["sigma=abc", "2x1x1"]),
        ("median:0", ["positive integer"]),
        ("median:3,4", ["too many bare values", "key=value"]),
        ("gaussian:sigma=1,sigma=2", ["given twice"]),
        ("gaussian:mode=wrap,sigma=1", ["reflect, nearest"]),
        ("astype:complex64", ["bool, integer or float"]),
        ("threshold:high", ["otsu, mean or a number"]),
    ],
)
def test_parse_errors_say_what_is_available(spec, words):
    with pytest.raises(cli.UsageError) as e:
        cli.parse_operation(spec)
    for w in words:
        assert w in str(e.value)


def test_every_option_has_help():
    import argparse

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in parser._actions:
        assert action.help, action
    for name, sub in subs.choices.items():
        if name == "demo":
            continue
        for action in sub._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"


def test_operations_are_documented():
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "cli.md")).read()
    for name, op in cli.OPERATIONS.items():
        assert f"`{name}" in text, f"docs/cli.md does not document {name}"
        for p in op.params:
            assert p.name in text
    for code in cli.EXIT_CODES:
        assert f"| {code} |" in text


# ----------------------------------------------------------------------------- the program


def test_version_and_help():
    import dask_sweep

    r = sweep_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dask-sweep {dask_sweep.__version__}"
    r = sweep_cli("run", "--help")
    assert r.returncode == 0
    for name in cli.OPERATIONS:
        assert name in r.stdout
    assert "exit codes" in r.stdout
    r = sweep_cli("demo", "--help")
    assert r.returncode == 0 and "--memory-limit" in r.stdout
    assert "stock dask" in r.stdout


def test_run_zarr_windowed_chain_equals_scipy(data, tmp_path):
    out = tmp_path / "smooth.zarr"
    r = sweep_cli("run", data["zarr"], out, "gaussian:sigma=1.5", "median:3",
                  "--memory-limit", BUDGET, "--progress")
    assert r.returncode == 0, r.stderr
    assert "100.0%" in r.stderr and "pass 1/1" in r.stderr  # progress on stderr
    assert "wrote" in r.stdout and "1.00 x input" in r.stdout
    expected = ndi.median_filter(ndi.gaussian_filter(data["vol"], 1.5), 3)
    np.testing.assert_array_equal(zarr.open_array(str(out))[:], expected)


def test_run_tiff_folder_to_labels(data, tmp_path):
    ops = ["gaussian:1", "threshold:otsu", "binary_opening:iterations=1",
           "label:connectivity=3"]
    out = tmp_path / "labels.zarr"
    r = sweep_cli("run", data["tiff"], out, *ops, "-m", BUDGET, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    # the same pipeline in-process, and scipy with the threshold the run found
    s = dsl.source(data["vol"]).gaussian(1)
    t = dsl.otsu(s)
    labels, n = dsl.label(
        (s > t).binary_opening(iterations=1), ndi.generate_binary_structure(3, 3))
    res = dsl.run(labels, n, t, memory_limit=BUDGET)
    got = zarr.open_array(str(out))[:]
    np.testing.assert_array_equal(got, res.values[0])
    ref, ref_n = ndi.label(
        ndi.binary_opening(ndi.gaussian_filter(data["vol"], 1) > res.values[2]),
        np.ones((3, 3, 3)))
    np.testing.assert_array_equal(got, ref)
    assert f"= {ref_n}" in r.stdout and f"= {res.values[2]}" in r.stdout


def test_run_edt_to_bigtiff(data, tmp_path):
    out = tmp_path / "dist.tif"
    r = sweep_cli("run", data["zarr"], out, "threshold:100", "edt:sampling=2x1x1",
                  "astype:float32", "-m", BUDGET, "--threads", "1")
    assert r.returncode == 0, r.stderr
    expected = ndi.distance_transform_edt(data["vol"] > 100, sampling=(2, 1, 1))
    np.testing.assert_allclose(tifffile.imread(out), expected.astype("float32"), rtol=1e-6)


def test_explain_writes_nothing(data, tmp_path):
    out = tmp_path / "never.zarr"
    r = sweep_cli("run", data["zarr"], out, "gaussian:2", "threshold:otsu", "label",
                  "-m", BUDGET, "--explain")
    assert r.returncode == 0, r.stderr
    assert "pass 0 of" in r.stdout and "projected peak" in r.stdout
    assert os.listdir(tmp_path) == []


def test_info(data, tmp_path):
    p = str(tmp_path / "sharded.zarr")
    zarr.create_array(p, shape=SHAPE, chunks=(4, 32, 32), shards=(8, 64, 64),
                      dtype="uint16")[...] = data["vol"]
    r = sweep_cli("info", p, "--memory-limit", BUDGET)
    assert r.returncode == 0, r.stderr
    for words in ("32 x 64 x 64", "uint16", "Zarr v3", "4x32x32", "shards:", "8x64x64",
                  "compression:", "on disk", "sweep at 16.00 MiB", "1.00 x input"):
        assert words in r.stdout, words
    r = sweep_cli("info", data["tiff"])
    assert r.returncode == 0, r.stderr
    assert "32 TIFF slices" in r.stdout and re.search(r"compression: +none", r.stdout)
    r = sweep_cli("info", data["tiff"], "-m", "1MiB")  # the plan does not fit: said so
    assert r.returncode == 0 and "does not fit" in r.stdout


@pytest.mark.parametrize(
    "case, code, words",
    [
        ("unknown-operation", cli.EXIT_USAGE, "unknown operation"),
        ("bad-memory", cli.EXIT_USAGE, "--memory-limit"),
        ("missing-input", cli.EXIT_INPUT, "input error"),
        ("corrupt-input", cli.EXIT_INPUT, "not a readable TIFF"),
        ("output-exists", cli.EXIT_OUTPUT, "--overwrite"),
        ("budget", cli.EXIT_BUDGET, "budget too small"),
        ("plan", cli.EXIT_SWEEP, "clip=true"),
    ],
)
def test_exit_codes(data, tmp_path, case, code, words):
    z, out = data["zarr"], tmp_path / "out.zarr"
    args = {
        "unknown-operation": ["run", z, out, "gausian:2"],
        "bad-memory": ["run", z, out, "-m", "lots"],
        "missing-input": ["run", tmp_path / "nope.zarr", out],
        "corrupt-input": ["info", tmp_path / "bad.tif"],
        "output-exists": ["run", z, tmp_path, "median:3"],
        "budget": ["run", z, out, "gaussian:4", "-m", "2MiB"],
        "plan": ["run", z, out, "gaussian:1", "astype:int8"],
    }[case]
    (tmp_path / "bad.tif").write_bytes(b"not a tiff at all")
    r = sweep_cli(*args)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert words in r.stderr
    if code != cli.EXIT_USAGE:
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line, no traceback
    assert not out.exists()


def test_debug_prints_the_traceback(tmp_path):
    r = sweep_cli("run", tmp_path / "nope.zarr", tmp_path / "o.zarr", "--debug")
    assert r.returncode == cli.EXIT_INPUT
    assert "Traceback" in r.stderr and "SourceError" in r.stderr


def test_resume_an_interrupted_write(data, tmp_path):
    out = str(tmp_path / "smooth.zarr")
    seen = [0]

    def crash_after_half(x):
        seen[0] += x.shape[0] if x.ndim == 3 else 0
        if seen[0] > SHAPE[0] // 2:
            raise RuntimeError("simulated crash")
        return x

    # an interrupted write of the same pipeline and budget, as a crash would leave it
    with pytest.raises(RuntimeError, match="simulated"):
        s = dsl.source(data["zarr"]).gaussian(1).map(crash_after_half, dtype="uint8")
        dsl.run(s.to(out), memory_limit="9MiB")
    assert os.path.exists(out + ".partial") and not os.path.exists(out)
    with pytest.raises(SinkError):  # what the CLI reports as exit code 4
        dsl.run(dsl.source(data["zarr"]).gaussian(1).to(out), memory_limit="9MiB")

    r = sweep_cli("run", data["zarr"], out, "gaussian:1", "-m", "9MiB")
    assert r.returncode == cli.EXIT_OUTPUT and "--resume" in r.stderr
    r = sweep_cli("run", data["zarr"], out, "gaussian:1", "-m", "9MiB", "--resume")
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(out + ".partial")
    np.testing.assert_array_equal(zarr.open_array(out)[:], ndi.gaussian_filter(data["vol"], 1))


def _scipy_reference(vol):
    g = ndi.gaussian_filter
    return {
        "gaussian:1": g(vol, 1),
        "uniform:3": ndi.uniform_filter(vol, 3),
        "median:3": ndi.median_filter(vol, 3),
        "minimum:3": ndi.minimum_filter(vol, 3),
        "maximum:3x1x1": ndi.maximum_filter(vol, (3, 1, 1)),
        "rank:2,3": ndi.rank_filter(vol, 2, 3),
        "erosion:3": ndi.grey_erosion(vol, 3),
        "dilation:3": ndi.grey_dilation(vol, 3),
        "opening:3": ndi.grey_opening(vol, 3),
        "closing:3": ndi.grey_closing(vol, 3),
        "threshold:100 binary_erosion:connectivity=2":
            ndi.binary_erosion(vol > 100, ndi.generate_binary_structure(3, 2)),
        "threshold:100 binary_dilation:2,border_value=1":
            ndi.binary_dilation(vol > 100, iterations=2, border_value=1),
        "threshold:100 binary_opening": ndi.binary_opening(vol > 100),
        "threshold:100 binary_closing:1,connectivity=3":
            ndi.binary_closing(vol > 100, np.ones((3, 3, 3))),
        "dog:1,2": g(vol, 1, output="float32") - g(vol, 2, output="float32"),
        "threshold:quantile=0.5": vol > np.quantile(vol, 0.5, method="inverted_cdf"),
        "threshold:100 invert": ~(vol > 100),
        "clip:10,100": np.clip(vol, 10, 100),
        "astype:float32": vol.astype("float32"),
        "threshold:200 label:2,output=uint16":
            ndi.label(vol > 200, ndi.generate_binary_structure(3, 2), output="uint16")[0],
        "threshold:50 edt:sampling=2": ndi.distance_transform_edt(vol > 50, sampling=2),
    }


def test_every_operation_equals_scipy():
    """In-process: each operation, built from its command-line text, gives scipy's result."""
    vol = (np.random.default_rng(1).random((12, 16, 16)) * 255).astype("uint8")
    refs = _scipy_reference(vol)
    covered = {cli.parse_operation(op)[0].name for specs in refs for op in specs.split()}
    assert covered == set(cli.OPERATIONS) - {"bilateral"}  # bilateral: tests/test_dsl*.py
    for specs, ref in refs.items():
        s, ctx = cli.build_pipeline(dsl.source(vol), specs.split())
        got = dsl.run(s, *ctx.scalars, memory_limit="32MiB").values[0]
        assert got.dtype == ref.dtype, specs
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6, err_msg=specs)
        else:
            np.testing.assert_array_equal(got, ref, err_msg=specs)
