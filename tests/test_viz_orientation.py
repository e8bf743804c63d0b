"Display orientation of `fsmis.viz`: anterior up from the NIfTI affine (`display_flip`), a flip option, the data untouched."
import matplotlib
matplotlib.use('Agg')
import nibabel as nib
import numpy as np
import pytest
from fsmis.core import Case
from fsmis.data.io import read_nifti, write_nifti
from fsmis.viz import display_flip, show_slices, VolumeViewer

# CHAOS T2 image_1.nii.gz: axis codes L, A, S (rows run posterior -> anterior)
LAS = np.array([[-1.25, 0, 0, 192.65], [0, 1.25, 0, -200.66], [0, 0, 7.7, -77.09], [0, 0, 0, 1.]])
LPS = LAS @ np.diag([1, -1, 1, 1.])  # the same grid stored with its rows anterior -> posterior


def marked_volume():
    "(z, h, w) volume: a bright band in the first rows of every slice, the posterior side of a LAS file."
    v = np.zeros((3, 8, 6), np.float32); v[:, :2] = 100.
    return v


def test_axis_codes_of_the_two_affines():
    assert nib.aff2axcodes(LAS) == ('L', 'A', 'S') and nib.aff2axcodes(LPS) == ('L', 'P', 'S')


@pytest.mark.parametrize('affine, flip', [(LAS, True), (LPS, False), (np.diag([1., 1, 1, 1]), True), (None, False),
                                          (np.array([[0, 0, -1., 0], [1., 0, 0, 0], [0, -1., 0, 0], [0, 0, 0, 1]]), False),
                                          (np.array([[0, 1.2, 0, 0], [-1., 0, 0, 0], [0, 0, 3., 0], [0, 0, 0, 1]]), False)])
def test_rule(affine, flip):
    "Flip exactly when one step down the rows (affine column 1) points mostly to anterior (+y in RAS+)."
    assert display_flip(affine) is flip


def test_option_overrides_and_bad_input():
    assert display_flip(LAS, flip_ud=False) is False and display_flip(LPS, flip_ud=True) is True
    assert display_flip(None, flip_ud=True) is True
    with pytest.raises(ValueError, match='4x4'): display_flip(np.eye(3))
    with pytest.raises(ValueError, match='flip_ud'): display_flip(LAS, flip_ud=1)


def test_rule_on_a_file_round_trip(tmp_path):
    "What read_nifti returns (the canonical L, A, S frame: rows posterior -> anterior) with its affine: anterior shown up."
    v = marked_volume()
    for aff, band_on_top, stored_rows in [(LAS, False, slice(None)), (LPS, True, slice(None, None, -1))]:
        p = write_nifti(tmp_path/'x.nii.gz', v, aff)
        img, _, a = read_nifti(p)
        shown = VolumeViewer(img, affine=a, zoom=1).rgb(1)[:, :, 0]
        assert bool(shown[0].mean() > shown[-1].mean()) == band_on_top
        np.testing.assert_array_equal(img, v[:, stored_rows])  # an LPS file is read in the canonical row order; viewing leaves the data as read
        assert display_flip(a) is True


def test_viewer_flips_display_only():
    v = marked_volume(); lab = np.zeros(v.shape, np.int64); lab[:, :2, :3] = 1
    before = v.copy(), lab.copy()
    up = VolumeViewer(Case(v, lab, affine=LAS), zoom=1)
    raw = VolumeViewer(Case(v, lab, affine=LAS), zoom=1, flip_ud=False)
    assert up.flip_ud and not raw.flip_ud
    np.testing.assert_array_equal(up.rgb(1), raw.rgb(1)[::-1])
    np.testing.assert_array_equal(up.volume, v); np.testing.assert_array_equal(up.label, lab)
    np.testing.assert_array_equal(v, before[0]); np.testing.assert_array_equal(lab, before[1])
    assert up.slider.value == raw.slider.value  # the slice index is the file's
    f = up.figure(1); img = np.asarray(f.axes[0].images[0].get_array())
    np.testing.assert_array_equal(img, v[1][::-1])
    assert not VolumeViewer(Case(v, lab, affine=LPS), zoom=1).flip_ud
    assert not VolumeViewer(v, zoom=1).flip_ud and VolumeViewer(v, zoom=1, affine=LAS).flip_ud


def test_show_slices_flips_image_and_label_together():
    v = marked_volume(); lab = np.zeros(v.shape, np.int64); lab[:, :2, :3] = 1
    c = Case(v, lab, affine=LAS)
    up, raw = show_slices(c, slices=[1]), show_slices(c, slices=[1], flip_ud=False)
    (i_up, o_up), (i_raw, o_raw) = ([np.asarray(im.get_array()) for im in f.axes[0].images] for f in (up, raw))
    np.testing.assert_array_equal(i_up, i_raw[::-1]); np.testing.assert_array_equal(o_up, o_raw[::-1])
    np.testing.assert_array_equal(i_raw, v[1])
    a = show_slices(v, lab, slices=[1], affine=LAS).axes[0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(a), v[1][::-1])


def test_real_chaos_scan_is_shown_anterior_up(data_root):
    "A CHAOS T2 file (skipped without the data): its rows run posterior -> anterior, so the viewer flips them."
    f = next((data_root/'chaos_t2').glob('image_*.nii.gz'))
    img, _, aff = read_nifti(f)
    assert display_flip(aff)
    assert nib.aff2axcodes(aff)[1] == 'A'


def _click(w, x, y):
    "Mouse move, press and release at image point (x, y) of LabelWidget `w`, as the canvas receives them."
    from matplotlib.backend_bases import MouseEvent
    cx, cy = w.to_canvas(x, y)
    MouseEvent('motion_notify_event', w.canvas, cx, w.fig.bbox.height - cy)._process()
    for kind in ('button_press_event', 'button_release_event'):
        MouseEvent(kind, w.canvas, cx, w.fig.bbox.height - cy, button=1)._process()


def test_label_widget_draws_on_the_right_voxels_when_flipped(tmp_path):
    "The labelling canvas flips like the viewer; a polygon clicked on it lands on the same voxels as unflipped."
    pytest.importorskip('ipympl')
    from fsmis.label import LabelWidget, polygon_mask
    from matplotlib.backend_bases import MouseEvent
    v = np.random.default_rng(0).normal(size=(4, 40, 32)).astype(np.float32)
    up, raw = LabelWidget(Case(v, affine=LAS), slice_index=2, zoom=4), LabelWidget(Case(v, affine=LAS), slice_index=2, zoom=4, flip_ud=False)
    assert up.flip_ud and not raw.flip_ud and not LabelWidget(Case(v, affine=LPS), zoom=4).flip_ud
    assert up.to_canvas(10, 0)[1] > up.to_canvas(10, 39)[1] and raw.to_canvas(10, 0)[1] < raw.to_canvas(10, 39)[1]
    tri = [(4.0, 3.0), (26.0, 8.0), (12.0, 30.0)]
    for w in (up, raw):
        for x, y in tri + tri[:1]: _click(w, x, y)
        np.testing.assert_allclose(w.last_vertices, tri, atol=0.3)
    np.testing.assert_array_equal(up.mask, raw.mask)
    np.testing.assert_array_equal(up.mask[2] == 1, polygon_mask(up.last_vertices, (40, 32)))
    assert up.mask[2, :6].any() and not up.mask[2, 32:].any()  # the first rows (top of the file), drawn at the bottom
    # a brush press near the top of the flipped canvas paints the last rows of the slice
    up.tool.value = 'brush'; up.radius.value = 2; up.cls.value = 1
    before, H = up.mask[2].copy(), up.fig.bbox.height
    MouseEvent('button_press_event', up.canvas, 16 * 4, H - 4, button=1)._process()  # canvas pixel (64, 4) from the top
    MouseEvent('button_release_event', up.canvas, 16 * 4, H - 4, button=1)._process()
    rows = np.flatnonzero((up.mask[2] != before).any(1))
    assert rows.size and rows.min() >= 36, rows  # 4 screen px = 1 voxel from the top edge: rows 37-39 of 40
    p = up.save(tmp_path/'m.nii.gz'); m, _, a = read_nifti(p, dtype=None)
    np.testing.assert_array_equal(m, up.mask); np.testing.assert_allclose(a, LAS, atol=1e-4)  # saved in the file's own order
