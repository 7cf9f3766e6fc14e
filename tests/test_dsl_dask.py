"""DSL pipelines as dask graphs (via emit), on distributed, and with file sources/sinks."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr

from dask_sweep import dsl

# runtime_overhead=0: tiny budgets that force many steps on tiny volumes
SMALL = dict(memory_limit="8MiB", target_slab_bytes="16KiB", runtime_overhead=0)


def vol(shape=(36, 28, 20), dtype="uint8", seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, shape).astype(dtype)


def pipeline(x):
    s = dsl.source(x)
    a, b = s.tee()
    dog = dsl.zip(
        a.gaussian(1, output="float32"), b.gaussian(2, output="float32"), lambda p, q: p - q
    )
    return (dog > dsl.otsu(s.gaussian(1))).astype("uint8")


def reference(x):
    g1 = ndi.gaussian_filter(x, 1, output=np.float32)
    g2 = ndi.gaussian_filter(x, 2, output=np.float32)
    t = dsl.otsu_from_histogram(
        np.bincount(ndi.gaussian_filter(x, 1).ravel(), minlength=256), np.arange(256.0)
    )
    return ((g1 - g2) > t).astype("uint8")


def test_to_dask_equals_local_run_and_reference():
    x = vol()
    out = pipeline(x).to()
    local = out.run(**SMALL).value
    d = out.to_dask(**SMALL)
    assert isinstance(d, da.Array)
    names = [n for n in d.__dask_graph__().layers if n.startswith("sweep-")]
    assert len(names) == 2  # one step chain per pass
    for sched in ("sync", "threads"):
        np.testing.assert_array_equal(d.compute(scheduler=sched), local)
    np.testing.assert_array_equal(local, reference(x))


def test_to_dask_single_pass_and_scalar():
    x = vol()
    s = dsl.source(x).median(size=3)
    d = s.to_dask(**SMALL)
    np.testing.assert_array_equal(d.compute(), ndi.median_filter(x, 3))
    q = dsl.to_dask(dsl.quantile(s, 0.5), **SMALL)
    assert q.compute() == np.quantile(ndi.median_filter(x, 3), 0.5, method="inverted_cdf")


def test_distributed_in_process():
    distributed = pytest.importorskip("distributed")
    x = vol((24, 20, 16))
    out = pipeline(x).to()
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0"
    ) as client:
        got = client.compute(out.to_dask(**SMALL)).result()
    np.testing.assert_array_equal(got, reference(x))


def test_zarr_source_and_sink(tmp_path):
    from dask_sweep.io import CountingStore  # noqa: F401  (io is importable)

    x = vol((40, 24, 24))
    src = tmp_path / "in.zarr"
    z = zarr.create_array(str(src), shape=x.shape, chunks=(4, 24, 24), dtype=x.dtype)
    z[...] = x
    out_path = tmp_path / "out.zarr"
    mask = dsl.otsu_threshold(str(src), sigma=1).astype("uint8")
    r = mask.to(str(out_path)).run(**SMALL)
    assert r.value == str(out_path)
    got = zarr.open_array(str(out_path))[...]
    g = ndi.gaussian_filter(x, 1)
    t = dsl.otsu_from_histogram(np.bincount(g.ravel(), minlength=256), np.arange(256.0))
    np.testing.assert_array_equal(got, (g > t).astype("uint8"))
    assert r.report.bytes_read == 2 * x.nbytes
    # and through dask: a Delayed that writes and returns the path
    out2 = tmp_path / "out2.zarr"
    dly = mask.to(str(out2)).to_dask(**SMALL)
    assert dly.compute() == str(out2)
    np.testing.assert_array_equal(zarr.open_array(str(out2))[...], got)


def test_dask_array_source_and_array_targets():
    x = vol((30, 16, 16))
    d = da.from_array(x, chunks=(5, 16, 16))
    s = dsl.source(d).maximum(size=3)
    buf = np.zeros(x.shape, x.dtype)
    s.to(buf).run(**SMALL)
    np.testing.assert_array_equal(buf, ndi.maximum_filter(x, 3))
    z = zarr.create_array(
        zarr.storage.MemoryStore(), shape=x.shape, chunks=(6, 16, 16), dtype=x.dtype
    )
    s.to(z).run(**SMALL)
    np.testing.assert_array_equal(z[...], ndi.maximum_filter(x, 3))


def test_dask_config_scheduler_untouched():
    # a DSL graph computes under whatever scheduler the user set
    x = vol((12, 8, 8))
    with dask.config.set(scheduler="sync"):
        np.testing.assert_array_equal(
            dsl.source(x).gaussian(1).to_dask(**SMALL).compute(), ndi.gaussian_filter(x, 1)
        )


def test_failed_run_records_the_slabs_it_wrote(tmp_path):
    x = vol((40, 24, 24))
    out = tmp_path / "out.zarr"

    def fails_late(p):
        if fails_late.seen >= 2:  # a few steps in
            raise RuntimeError("boom")
        fails_late.seen += 1
        return p

    fails_late.seen = 0
    s = dsl.source(x).gaussian(1).map(fails_late, dtype="uint8")
    with pytest.raises(RuntimeError, match="boom"):
        s.to(str(out), chunks=(4, 24, 24)).run(**{**SMALL, "target_slab_bytes": "4KiB"})
    assert not out.exists()
    from dask_sweep.io.base import _LOG_LINE, recorded_slabs

    # the slabs written before the failure were synced and recorded, none left unsynced
    done = recorded_slabs(out)
    assert done
    logs = b"".join(p.read_bytes() for p in out.parent.glob(f"{out.name}.progress/log-*"))
    written = {(int(m.group(2)), int(m.group(3))) for m in _LOG_LINE.finditer(logs)
               if m.group(1) == b"W"}
    assert written <= set(done)


def test_graph_keys_are_deterministic():
    """The same pipeline gives the same keys (dask reuses results, as for its own arrays);
    anything that changes the result or the plan changes them."""
    x = vol()

    def build(t=100, data=x, structure=None):
        mask = dsl.source(data).gaussian(1) > t
        lab, n = dsl.label(mask, structure)
        return lab, n, dsl.mean(mask.astype("float32"))

    lab, n, m = build()
    first = dsl.to_dask(lab, n, m, **SMALL)
    again = dsl.to_dask(lab, n, m, **SMALL)
    rebuilt = dsl.to_dask(*build(), **SMALL)
    names = lambda r: (r[0].name, r[1].key, r[2].key)  # noqa: E731
    assert names(first) == names(again) == names(rebuilt)
    assert set(first[0].__dask_graph__()) == set(rebuilt[0].__dask_graph__())
    for other in (
        dsl.to_dask(*build(t=101), **SMALL),
        dsl.to_dask(*build(data=x[::-1].copy()), **SMALL),
        dsl.to_dask(*build(structure=np.ones((3, 3, 3))), **SMALL),
        dsl.to_dask(lab, n, m, **{**SMALL, "memory_limit": "9MiB"}),
    ):
        assert not set(names(first)) & set(names(other))
    # merged in one compute, equal keys are one computation, and the values are right
    a, b = dask.compute(first[1], rebuilt[1])
    assert a == b == ndi.label(ndi.gaussian_filter(x, 1) > 100)[1]


def test_graph_keys_are_the_same_in_another_process():
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from dask_sweep import dsl\n"
        "s = dsl.source(np.arange(8 * 5 * 5, dtype='u1').reshape(8, 5, 5))\n"
        "m = s.map(lambda a: a * 2 + 1) > dsl.mean(s)\n"
        "lab, n = dsl.label(m)\n"
        "print(s.gaussian(1).to_dask(memory_limit='64MiB').name,\n"
        "      lab.to_dask(memory_limit='64MiB').name, dsl.to_dask(n).key)\n"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 3
