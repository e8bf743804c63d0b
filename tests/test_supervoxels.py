"Tests of fsmis.data.supervoxels: exactness against a plain transcription of ADNet's algorithm, masks, errors, cache, data."
import numpy as np
import pytest
import fsmis.data.supervoxels as svm
from fsmis.core import Case
from fsmis.data.supervoxels import (supervoxels, superpixels, felzenszwalb_3d, body_mask, rescale_255, edge_weights,
                                    cached_supervoxels, dataset_supervoxels, write_supervoxels, adjusted_rand_index,
                                    supervoxel_table, supervoxel_stats, reference_agreement)


# ---------- a slow, obvious transcription of the ADNet recipe (stable argsort, python union-find) ----------
def _pairs(a, d):
    "Slices (first endpoint, second endpoint) of array a for an offset d along each axis."
    f = {1: slice(1, None), -1: slice(None, -1), 0: slice(None)}
    s = {1: slice(None, -1), -1: slice(1, None), 0: slice(None)}
    return a[tuple(f[x] for x in d)], a[tuple(s[x] for x in d)]

# the original's 13 directions in its order, with weight class 0 in-plane, 1 z+one axis, 2 z+both, 3 z
_ORIG = [((0, 1, 0), 0), ((0, 1, 1), 0), ((0, 0, 1), 0), ((0, 1, -1), 0), ((1, 1, 0), 1), ((1, 1, 1), 2), ((1, 0, 1), 1),
         ((1, -1, 0), 1), ((1, -1, -1), 2), ((1, 0, -1), 1), ((1, 1, -1), 2), ((1, -1, 1), 2), ((1, 0, 0), 3)]

def _reference_felz(v, spacing, min_size, scale=1.0):
    s = spacing[0] / spacing[2]
    w = [1.0, (np.sqrt(1 + s**2) / np.sqrt(2))**2, (np.sqrt(2 + s**2) / np.sqrt(3))**2, s**2]
    idx = np.arange(v.size).reshape(v.shape)
    costs, edges = [], []
    for d, c in _ORIG:
        v1, v2 = _pairs(v, d); i1, i2 = _pairs(idx, d)
        costs.append(np.sqrt(w[c] * (v1 - v2)**2).ravel()); edges.append(np.c_[i1.ravel(), i2.ravel()])
    costs, edges = np.concatenate(costs), np.concatenate(edges)
    order = np.argsort(costs, kind='stable'); costs, edges = costs[order], edges[order]
    parent = list(range(v.size)); size = [1] * v.size; cint = [0.0] * v.size
    def find(i):
        while parent[i] != i: i = parent[i]
        return i
    scale = scale / 255.
    for (p, q), c in zip(edges, costs):
        a, b = find(p), find(q)
        if a == b: continue
        if c < min(np.float32(cint[a] + scale / size[a]), np.float32(cint[b] + scale / size[b])):
            parent[b] = a; size[a] += size[b]; cint[a] = c
    for p, q in edges:
        a, b = find(p), find(q)
        if a != b and (size[a] < min_size or size[b] < min_size):
            parent[b] = a; size[a] += size[b]
    return np.array([find(i) for i in range(v.size)]).reshape(v.shape)


@pytest.mark.parametrize('seed', range(6))
def test_kernel_equals_transcription(seed):
    "Random integer volumes (many ties): identical partition to the stable-sort transcription of the original."
    rng = np.random.default_rng(seed)
    shape = tuple(int(x) for x in rng.integers(3, 9, 3))
    v = rescale_255(rng.integers(0, 6 + seed * 10, shape).astype(np.int16))
    sp = [(7.7, 1.25, 1.25), (1., 1., 1.), (3., 0.8, 0.8)][seed % 3]
    for min_size in (1, 5, 20):
        ours, ref = felzenszwalb_3d(v, sp, min_size=min_size), _reference_felz(v, sp, min_size)
        assert adjusted_rand_index(ours, ref) == pytest.approx(1.0), (seed, min_size)
        assert ours.max() == len(np.unique(ref))


def test_kernel_float_intensities_and_scale():
    "Non-integer intensities (distinct costs within a bucket) and a larger scale (the Felzenszwalb pass merges)."
    rng = np.random.default_rng(7)
    v = rescale_255(np.round(rng.normal(size=(5, 9, 8)), 2))
    for scale, min_size in ((1., 4), (300., 4), (2000., 1)):
        assert adjusted_rand_index(felzenszwalb_3d(v, (2., 1., 1.), scale=scale, min_size=min_size),
                                   _reference_felz(v, (2., 1., 1.), min_size, scale)) == pytest.approx(1.0)


def test_flat_regions_and_zero_costs():
    "Large flat regions (most edges of cost 0, joined from bit sets before the sort) with noise: same partition as the transcription."
    rng = np.random.default_rng(11)
    v = np.zeros((5, 12, 11)); v[:, 3:9, 2:8] = 100; v[2:, 5:, :4] = 40
    noise = rng.random(v.shape) < 0.1; v[noise] = rng.integers(0, 200, noise.sum())
    v = rescale_255(v)
    for min_size in (1, 10, 60):
        ours, ref = felzenszwalb_3d(v, (3., 1., 1.), min_size=min_size), _reference_felz(v, (3., 1., 1.), min_size)
        assert adjusted_rand_index(ours, ref) == pytest.approx(1.0) and ours.max() == len(np.unique(ref))


def test_two_blocks_two_supervoxels():
    blocks = np.zeros((8, 30, 30), np.int16); blocks[4:] = 700
    for rho in (10, 1000, 3600):
        sv = felzenszwalb_3d(rescale_255(blocks), (7.7, 1.25, 1.25), min_size=rho)
        assert sorted(np.unique(sv)) == [1, 2]
        assert (sv[:4] == sv[0, 0, 0]).all() and (sv[4:] == sv[4, 0, 0]).all()
    body = np.zeros((8, 40, 40), np.int16); body[:, 5:35, 5:35] = 300; body[4:, 5:35, 5:35] = 900
    sv = supervoxels(body, (7.7, 1.25, 1.25), rho=1000)
    assert sorted(np.unique(sv)) == [0, 1, 2] and sv.dtype == np.int32
    assert (sv[:, :5] == 0).all()  # outside the body


def test_int16_no_overflow():
    "int16 volumes with a wide range: rescaling happens in float (the original overflowed in int16)."
    v = np.zeros((4, 20, 20), np.int16); v[:, 5:15, 5:15] = 30000; v[:, 0, 0] = -30000
    r = rescale_255(v)
    assert r.min() == 0 and r.max() == 255 and r[0, 10, 10] == 255


def test_bad_inputs():
    v = np.ones((4, 8, 8))
    with pytest.raises(ValueError, match='3D'): supervoxels(np.ones((8, 8)), (1, 1, 1))
    with pytest.raises(ValueError, match='3D'): felzenszwalb_3d(np.ones((2, 2, 2, 2)))
    bad = v.copy(); bad[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match='non-finite'): supervoxels(bad, (1, 1, 1))
    bad[1, 1, 1] = np.inf
    with pytest.raises(ValueError, match='non-finite'): superpixels(bad)
    for rho in (0, -5):
        with pytest.raises(ValueError, match='rho'): supervoxels(v, (1, 1, 1), rho=rho)
    for sp in ((0, 1, 1), (1, -1, 1), (1, 1), (np.nan, 1, 1)):
        with pytest.raises(ValueError, match='spacing'): supervoxels(v, sp)
    with pytest.raises(ValueError, match='mode'): cached_supervoxels(v, (1, 1, 1), mode='4d')
    for scale in (0, -1., np.nan, 1e-300):  # 1e-300: the per-voxel threshold would underflow to 0 in float32
        with pytest.raises(ValueError, match='scale'): supervoxels(v, (1, 1, 1), scale=scale)
        with pytest.raises(ValueError, match='scale'): felzenszwalb_3d(v, scale=scale)


def test_body_mask():
    v = np.zeros((3, 50, 50)); yy, xx = np.mgrid[:50, :50]; r = np.hypot(yy - 25, xx - 25)
    v[:, (r > 10) & (r < 18)] = 500; v[:, 1:3, 1:3] = 800; v[2] = 0; v[2, 0, 0] = 1  # ring + speck; slice 2 empty
    m = body_mask(v)
    assert m[0, 25, 25] and not m[0, 1, 1] and not m[0, 0, 49] and not m[2].any()
    assert body_mask(v, thresh=600, rescale=False)[0].sum() == 4  # only the speck is above 600


def test_superpixels():
    rng = np.random.default_rng(0)
    v = np.zeros((3, 64, 64)); v[:, 8:56, 8:56] = 200 + rng.normal(0, 20, (3, 48, 48)); v[:, 20:30, 20:30] += 300
    sp = superpixels(v, min_size=100)
    assert sp.shape == v.shape and sp.dtype == np.int32
    assert (sp[:, :8] == 0).all() and (sp[:, 8:56, 8:56] > 0).all()
    for z in range(3):  # ids 1..n per slice, each >= min_size (pixels of a region clipped by the mask may be fewer)
        ids = np.unique(sp[z]); assert list(ids) == list(range(0, ids.max() + 1))


def test_cache_reuse(tmp_path, monkeypatch):
    v = np.zeros((6, 24, 24), np.float32); v[:, 2:22, 2:22] = 100; v[3:, 2:22, 2:22] = 200
    a = cached_supervoxels(v, (5, 1, 1), rho=50, cache_dir=tmp_path)
    assert len(list(tmp_path.glob('*.npz'))) == 1
    def boom(*a, **k): raise AssertionError('recomputed instead of reading the cache')
    monkeypatch.setattr(svm, '_compute', boom)
    np.testing.assert_array_equal(cached_supervoxels(v, (5, 1, 1), rho=50, cache_dir=tmp_path), a)
    with pytest.raises(AssertionError, match='recomputed'):  # other parameters: other key
        cached_supervoxels(v, (5, 1, 1), rho=60, cache_dir=tmp_path)
    v2 = v.copy(); v2[0, 0, 0] = 1
    with pytest.raises(AssertionError, match='recomputed'):  # other content: other key
        cached_supervoxels(v2, (5, 1, 1), rho=50, cache_dir=tmp_path)
    assert not list(tmp_path.glob('.*tmp*'))  # no half-written files


class _Set:
    "Dataset-like stand-in: case_ids, spec (rho, modality), load(cid, normalize)."
    case_ids = ['1', '2']
    class spec: rho = 50; modality = 'MR'
    def load(self, cid, normalize=True):
        v = np.zeros((5, 20, 20), np.float32); v[:, 3:17, 3:17] = 100 + 10 * int(cid); v[2:, 3:17, 3:10] = 300
        return Case(v, spacing=(4., 1., 1.), case_id=cid)


def test_dataset_supervoxels_and_write(tmp_path, monkeypatch):
    svs = dataset_supervoxels(_Set(), cache_dir=tmp_path, n_workers=1, progress=False)
    assert list(svs) == ['1', '2'] and all(s.max() >= 2 for s in svs.values())
    monkeypatch.setattr(svm, '_compute', lambda *a, **k: (_ for _ in ()).throw(AssertionError('recomputed')))
    again = dataset_supervoxels(_Set(), cache_dir=tmp_path, n_workers=1, progress=False)
    for k in svs: np.testing.assert_array_equal(svs[k], again[k])
    paths = write_supervoxels(svs, tmp_path/'out', tag='MIDDLE')
    assert [p.name for p in paths] == ['superpix-MIDDLE_1.nii.gz', 'superpix-MIDDLE_2.nii.gz']
    from fsmis.data.io import read_nifti
    back, _, _ = read_nifti(paths[0], dtype=None)
    np.testing.assert_array_equal(back, svs['1'])


def test_dataset_supervoxels_pool(tmp_path):
    "The process pool gives the same labels as the serial path."
    par = dataset_supervoxels(_Set(), cache_dir=tmp_path/'a', n_workers=2, progress=False)
    ser = dataset_supervoxels(_Set(), cache_dir=tmp_path/'b', n_workers=1, progress=False)
    for k in ser: np.testing.assert_array_equal(par[k], ser[k])


def test_stats_table():
    sv = np.zeros((4, 6, 6), np.int32); sv[:2, :3] = 1; sv[1:, 3:] = 2
    t = supervoxel_table(sv)
    assert list(t.voxels) == [36, 54] and list(t.slices) == [2, 3]
    s = supervoxel_stats(sv, 'x')
    assert s['n'] == 2 and s['size_max'] == 54 and s['slices_max'] == 3


def test_ari():
    assert adjusted_rand_index([1, 1, 2, 2], [3, 3, 0, 0]) == pytest.approx(1.0)
    assert adjusted_rand_index(np.zeros(5), np.zeros(5)) == 1.0
    with pytest.raises(ValueError): adjusted_rand_index([1, 2], [1, 2, 3])


@pytest.mark.data
@pytest.mark.parametrize('name,ref_range', [('chaos_t2', (20, 39)), ('ms_cmrseg_bssfp', (22, 48))])
def test_faithful_to_reference(data_root, tmp_path, name, ref_range):
    "Recomputed on every volume: mean ARI >= 0.93 against the authors' files, counts close to theirs."
    from fsmis.data.datasets import open_dataset
    r = reference_agreement(open_dataset(name, root=data_root), cache_dir=tmp_path, progress=False)
    print(r.describe())
    assert r.ari.mean() >= 0.93 and r.ari.min() >= 0.80  # stable ties: CHAOS 33 is the worst at 0.81
    assert r.n_ref.min() == ref_range[0] and r.n_ref.max() == ref_range[1]
    assert (abs(r.n_ours - r.n_ref) <= 0.25 * r.n_ref + 3).all()


def test_numpy1_introsort_recorded():
    "The introsort re-implementation against permutations recorded from numpy 1.26.4's plain C argsort."
    from fsmis.data.sv_kernels import _np1_sort_pairs
    k = np.array([.1] * 10 + [0, .1, .1, 0, 0, .1, .1]); idx = np.arange(17, dtype=np.int32)
    _np1_sort_pairs(k, idx)
    assert list(idx) == [14, 13, 10, 0, 12, 11, 9, 15, 8, 6, 5, 4, 3, 2, 1, 7, 16]
    rng = np.random.default_rng(3)
    k = rng.integers(0, 9, 200_000).astype(float); idx = np.arange(k.size, dtype=np.int32); k0 = k.copy()
    _np1_sort_pairs(k, idx)
    assert (np.diff(k) >= 0).all() and (k0[idx] == k).all() and len(np.unique(idx)) == k.size


def test_tie_order_option():
    v = rescale_255(np.random.default_rng(1).integers(0, 5, (4, 12, 12)))
    a = felzenszwalb_3d(v, (3, 1, 1), min_size=20, tie_order='numpy1')
    assert np.bincount(a.ravel())[1:].min() >= 20
    with pytest.raises(ValueError, match='tie_order'): felzenszwalb_3d(v, tie_order='random')


@pytest.mark.data
@pytest.mark.parametrize('name,cids', [('chaos_t2', ['1', '33']), ('ms_cmrseg_bssfp', ['2'])])
def test_numpy1_ties_bit_exact(data_root, tmp_path, name, cids):
    "tie_order='numpy1' reproduces the authors' files exactly (same partition)."
    from fsmis.data.datasets import open_dataset
    r = reference_agreement(open_dataset(name, root=data_root), case_ids=cids, cache_dir=tmp_path, progress=False,
                            n_workers=1, tie_order='numpy1')
    assert r.ari.min() > 0.99999 and (r.n_ours == r.n_ref).all()


def test_superpixels_refuse_z_scored_input():
    "SSL-ALPNet's body mask thresholds raw intensities: a z-scored volume would give an all-zero result, so it is an error."
    rng = np.random.default_rng(0)
    v = np.zeros((3, 64, 64)); v[:, 8:56, 8:56] = 200 + rng.normal(0, 20, (3, 48, 48))
    z = (v - v.mean()) / v.std()
    with pytest.raises(ValueError, match='raw intensities'): superpixels(z)
    assert superpixels(z, fg_thresh=0.).max() > 0  # an explicit threshold on the normalized scale works
