"""One printer: the plugin, the DSL and the drop-ins say the same things the same way."""

from __future__ import annotations

import re

import dask.array as da
import numpy as np
import pytest

import dask_sweep
from dask_sweep import dsl
from dask_sweep.ndimage import explain_label
from dask_sweep.plan import printer

PEAK = re.compile(r"^  projected peak [\d.]+ \w?i?B of [\d.]+ \w?i?B budget \(\d+%; incl\. "
                  r"[\d.]+ \w?i?B runtime overhead\), at stage .+; held between steps <= ")
READ = re.compile(r"^  (expected )?bytes read / input bytes = \d\.\d{3} \(")


@pytest.fixture
def vol():
    return (np.random.default_rng(3).random((40, 24, 24)) * 255).astype("u1")


def _texts(vol):
    from dask_image import ndfilters

    plugin = dask_sweep.explain(
        ndfilters.gaussian_filter(da.from_array(vol, chunks=(4, 24, 24)), 1.0) > 128,
        memory_limit="16MiB")
    lang = dsl.explain((dsl.source(vol).gaussian(1) > 128).to(), memory_limit="16MiB")
    return plugin, lang


def test_sweeps_of_both_front_ends_print_alike(vol):
    plugin, lang = _texts(vol)
    a, b = str(plugin).splitlines(), str(lang).splitlines()
    for lines in (a, b):
        # the same stage wording, peak line and read line
        kernel = [ln for ln in lines if "kernel  window -4/+4, halo (4, 4, 4)" in ln]
        assert len(kernel) == 1, lines
        assert "map     elementwise, any slab" in "\n".join(lines)
        assert sum(bool(PEAK.match(ln)) for ln in lines) == 1, lines
        assert sum(bool(READ.match(ln)) for ln in lines) == 1, lines
    header = re.compile(r"along axis 0 over 40 planes in \d+ steps? of [\d-]+ planes?; "
                        r"\d threads? per step$")
    assert header.search(a[0]) and header.search(b[0]), (a[0], b[0])


def test_both_front_ends_show_a_table_and_a_budget_bar(vol):
    for e in _texts(vol):
        html = e._repr_html_()
        assert "<table>" in html and "projected peak" in html and "<details>" in html
        assert "gt" in html or ">" in html


def test_table_passes_print_with_the_drop_ins_lines(vol):
    mask = vol > 128
    drop_in = explain_label(da.from_array(mask, chunks=(4, 24, 24)), memory_limit="16MiB")
    labels, _ = dsl.label(dsl.source(mask))
    lang = str(dsl.explain(labels.to(), memory_limit="16MiB"))
    # both front ends' pass 1 keeps its local labels for the pass reading them
    for text, reads in ((drop_in, 1), (lang, 1)):
        assert re.search(r"pass 1 label-local: .* B/voxel x \d+ slab\(s\) in flight", text)
        assert re.search(r"projected peak .* budget \(\d+%\); bytes read / input bytes = "
                         rf"{reads}\.00", text)


def test_long_labels_are_cut_in_the_table_but_whole_on_the_out_line():
    st = dsl.source(np.zeros((8, 4, 4), "f4")).gaussian(1)
    for _ in range(3):
        st = st + 1
    text = str(dsl.explain(st.to(), memory_limit="16MiB"))
    assert "…" in text
    out = [ln for ln in text.splitlines() if ln.startswith("  out [")]
    assert out and "…" not in out[0]


def test_ring_and_planes_wording():
    assert printer.planes(1) == "1 plane" and printer.planes(8) == "8 planes"
    assert printer.io_line(0, 0).endswith("(0 B of 0 B)")
    bar = printer.budget_bar(3, 4, 2)
    assert 'title="floor"' in bar and "75.0%" in bar
