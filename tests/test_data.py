"Data layer from outside: NIfTI I/O, dataset registry, real datasets, folds, preprocessing, phantom, boundary errors."
import gzip, os
from pathlib import Path
import numpy as np
import nibabel as nib
import pytest

from fsmis.core import Case
from fsmis.data.io import read_nifti, write_nifti
from fsmis.data.datasets import get_spec, DATASETS, open_dataset, Dataset, sort_ids
from fsmis.data.folds import fold_split, fold_table, FoldSplit
from fsmis.data.preprocess import preprocess_folder, preprocess_case, resample_label, window_ct, clip_top
from fsmis.data.phantom import make_phantom, threshold_dice, PhantomDataset

CHAOS_IDS = ['1', '2', '3', '5', '8', '10', '13', '15', '19', '20', '21', '22', '31', '32', '33', '34', '36', '37', '38', '39']


def _pair(folder, cid, img, lab=None, spacing=(5., 1., 1.)):
    write_nifti(folder/f'image_{cid}.nii.gz', img, spacing=spacing)
    if lab is not None: write_nifti(folder/f'label_{cid}.nii.gz', lab, spacing=spacing)


def _good(shape=(4, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 10, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8); lab[1:3, 4:9, 4:9] = 1; lab[2, 10:13, 10:14] = 2
    return img, lab


def _folder_ds(folder, **kw):
    return open_dataset(folder, classes={1: 'a', 2: 'b'}, **kw)


# ---------------------------------------------------------------- NIfTI boundary
def test_nifti_roundtrip_axes_and_geometry(tmp_path):
    vol = np.random.default_rng(1).normal(size=(3, 5, 7)).astype(np.float32)
    aff = np.array([[-0.8, 0.1, 0, 12], [0.05, 0.9, 0, -4], [0, 0, 6.5, 30], [0, 0, 0, 1.]])
    p = write_nifti(tmp_path/'v.nii.gz', vol, aff)
    on_disk = nib.load(str(p))
    assert on_disk.shape == (7, 5, 3)                               # (x, y, z) = (w, h, z)
    np.testing.assert_array_equal(np.asanyarray(on_disk.dataobj), vol.transpose(2, 1, 0))
    back, sp, aff2 = read_nifti(p)
    np.testing.assert_array_equal(back, vol)
    np.testing.assert_allclose(aff2, aff, atol=1e-5)
    assert back.dtype == np.float32 and back.flags.c_contiguous
    z = on_disk.header.get_zooms()
    assert sp == pytest.approx((z[2], z[1], z[0]), rel=1e-6)
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.')]  # no temporary files left


def test_int16_images_read_as_float32(tmp_path):
    write_nifti(tmp_path/'i.nii.gz', np.full((2, 3, 3), 30000, np.int16) - np.eye(3, dtype=np.int16))
    arr, _, _ = read_nifti(tmp_path/'i.nii.gz')
    assert arr.dtype == np.float32 and (arr * 2).max() == 60000   # no int16 overflow downstream
    raw, _, _ = read_nifti(tmp_path/'i.nii.gz', dtype=None)
    assert raw.dtype == np.int16


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    def boom(*a, **k): raise RuntimeError('disk full')
    monkeypatch.setattr(nib, 'save', boom)
    with pytest.raises(RuntimeError): write_nifti(tmp_path/'x.nii.gz', np.zeros((2, 2, 2), np.float32))
    assert os.listdir(tmp_path) == []


def test_write_validates(tmp_path):
    with pytest.raises(ValueError, match='3D'): write_nifti(tmp_path/'x.nii.gz', np.zeros((2, 2)))
    with pytest.raises(ValueError, match='.nii'): write_nifti(tmp_path/'x.npy', np.zeros((2, 2, 2)))


# ---------------------------------------------------------------- registry
def test_registry_label_maps():
    assert set(DATASETS) >= {'chaos_t2', 'ms_cmrseg_bssfp', 'synapse_ct', 'folder', 'phantom'}
    assert get_spec('chaos_t2').classes == {1: 'liver', 2: 'right kidney', 3: 'left kidney', 4: 'spleen'}
    card = get_spec('ms_cmrseg_bssfp')
    assert card.classes == {1: 'LV-BP', 2: 'LV-MYO', 3: 'RV'} and card.label_codes == {500: 1, 200: 2, 600: 3}
    syn = get_spec('synapse_ct')
    assert len(syn.classes) == 13 and syn.test_classes == (1, 2, 3, 6)
    assert [syn.classes[k] for k in syn.test_classes] == ['spleen', 'right kidney', 'left kidney', 'liver']
    assert get_spec('phantom').classes == get_spec('chaos_t2').classes
    assert {s.modality for s in DATASETS.values()} <= {'MR', 'CT'}
    assert syn.norm == 'global' and card.norm == 'volume'
    assert get_spec('chaos_t2').rho == 5000 and card.rho == 1000


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset 'chaos'"): get_spec('chaos')
    with pytest.raises(ValueError, match="unknown dataset 'not_a_dataset'"): open_dataset('not_a_dataset')


# ---------------------------------------------------------------- real data
README = {'chaos_t2': (CHAOS_IDS, (31, 46), (7.7, 1.25, 1.25), 4),
          'ms_cmrseg_bssfp': ([str(i) for i in range(1, 36)], (11, 19), (7.99, 1.25, 1.25), 3)}


@pytest.mark.data
@pytest.mark.parametrize('name', list(README))
def test_real_dataset_matches_readme(name, data_root):
    ids, (zlo, zhi), spacing, ncls = README[name]
    ds = open_dataset(name, root=data_root, cache=False)
    assert ds.case_ids == ids and len(ds) == len(ids)
    zs = []
    for cid in ds.case_ids:
        c = ds.load(cid)
        assert c.image.dtype == np.float32 and c.shape[1:] == (256, 256)
        assert zlo <= c.n_slices <= zhi
        assert c.spacing == pytest.approx(spacing, abs=1e-4)
        assert set(np.unique(c.label).tolist()) == set(range(ncls + 1))
        assert abs(float(c.image.mean())) < 1e-3 and abs(float(c.image.std()) - 1) < 1e-3   # MR: per-volume z-score
        assert c.classes == ds.classes and c.case_id == cid
        zs.append(c.n_slices)
    assert (min(zs), max(zs)) == (zlo, zhi)
    assert ds.image_path('1').name == 'image_1.nii.gz'


# ---------------------------------------------------------------- folds
def _idx(ids, sel): return [ids.index(i) for i in sel]


def test_fold_tables_chaos_match_papers():
    # ADNet get_folds('CHAOST2'): range(4k, 4k+5), fold 4 = range(16, 20) + {0}; support = last in sorted order
    for k in range(5):
        a, o = fold_split(CHAOS_IDS, k), fold_split(CHAOS_IDS, k, variant='ouyang')
        fold = sorted({i % 20 for i in range(4*k, 4*k + 5)})
        assert sorted(_idx(CHAOS_IDS, [a.support_id] + a.query_ids)) == fold
        assert sorted(_idx(CHAOS_IDS, [o.support_id] + o.query_ids)) == fold
        assert sorted(_idx(CHAOS_IDS, a.train_ids)) == [i for i in range(20) if i not in fold]
        assert a.train_ids == o.train_ids and len(a.train_ids) == 15
        assert a.support_id == (CHAOS_IDS[4*k + 4] if k < 4 else '39')
        assert o.support_id == CHAOS_IDS[(4*k + 4) % 20]              # SSL-ALPNet: circular slice, support_idx=-1
    assert fold_split(CHAOS_IDS, 4).query_ids == ['1', '36', '37', '38']
    assert fold_split(CHAOS_IDS, 4, variant='ouyang').query_ids == ['36', '37', '38', '39']
    assert isinstance(fold_split(CHAOS_IDS, 0), FoldSplit)


def test_fold_tables_cardiac_and_synapse():
    cmr = [str(i) for i in range(1, 36)]
    for k in range(5):   # ADNet get_folds('CMR'): range(7k, 7k+8), fold 4 = range(28, 35) + {0}
        s = fold_split(cmr, k)
        assert sorted(_idx(cmr, [s.support_id] + s.query_ids)) == sorted({i % 35 for i in range(7*k, 7*k + 8)})
        assert s.support_id == cmr[min(7*k + 7, 34)]
    syn = [str(i) for i in range(1, 31)]
    for k in range(5):   # SSL-ALPNet SABS _SEP [0, 6, 12, 18, 24, 30]
        o = fold_split(syn, k, variant='ouyang')
        assert _idx(syn, [o.support_id]) == [(6*k + 6) % 30] and len(o.query_ids) == 6


def test_fold_split_sorts_and_validates():
    shuffled = list(reversed(CHAOS_IDS))
    assert fold_split(shuffled, 2) == fold_split(CHAOS_IDS, 2)
    assert sort_ids([10, 2, '1']) == ['1', '2', '10']
    with pytest.raises(ValueError, match='fold must be'): fold_split(CHAOS_IDS, 5)
    with pytest.raises(ValueError, match='variant'): fold_split(CHAOS_IDS, 0, variant='x')
    with pytest.raises(ValueError, match='at least'): fold_split(['1', '2', '3'], 0)
    with pytest.raises(ValueError, match='duplicates'): fold_split(['1', '1', '2', '3', '4', '5', '6'], 0)
    t = fold_table(CHAOS_IDS, variant='ouyang')
    assert list(t['support']) == ['8', '19', '31', '36', '1']


# ---------------------------------------------------------------- file datasets and boundary errors
def test_folder_dataset_loads_and_maps_codes(tmp_path):
    for cid in ['3', '12']:
        img, lab = _good()
        _pair(tmp_path, cid, img.astype(np.int16), (lab * 100).astype(np.uint16))
    ds = open_dataset(tmp_path, classes={1: 'a', 2: 'b'}, label_codes={100: 1, 200: 2})
    assert ds.case_ids == ['3', '12'] and isinstance(ds, Dataset)
    c = ds.load(12)
    assert isinstance(c, Case) and c.image.dtype == np.float32 and set(np.unique(c.label)) == {0, 1, 2}
    assert c.spacing == (5.0, 1.0, 1.0) and c.classes == {1: 'a', 2: 'b'}
    assert len(list(ds.cases())) == 2
    raw = ds.load('3', normalize=False)
    assert raw.image.mean() > 50
    with pytest.raises(ValueError, match="unknown case id '7'"): ds.load('7')


def test_ct_global_normalization(tmp_path):
    for i, cid in enumerate(['1', '2']):
        img, lab = _good(seed=i)
        _pair(tmp_path, cid, img + 100*i, lab)
    ds = open_dataset(tmp_path, classes={1: 'a', 2: 'b'}, modality='CT')
    a, b = ds.load('1').image, ds.load('2').image
    both = np.concatenate([a.ravel(), b.ravel()])
    assert abs(both.mean()) < 1e-3 and abs(both.std() - 1) < 1e-3
    assert a.mean() < -0.5 < 0.5 < b.mean()                          # global, not per volume
    ds.fit_norm(['1'])
    assert abs(ds.load('1').image.mean()) < 1e-3


def test_error_shape_mismatch(tmp_path):
    img, lab = _good()
    write_nifti(tmp_path/'image_1.nii.gz', img); write_nifti(tmp_path/'label_1.nii.gz', lab[:, :, :8])
    with pytest.raises(ValueError, match=r'label_1\.nii\.gz: label shape .* != image shape'): _folder_ds(tmp_path).load('1')


def test_error_not_3d(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(tmp_path/'image_1.nii.gz'))
    with pytest.raises(ValueError, match=r'image_1\.nii\.gz: expected a 3D volume'): read_nifti(tmp_path/'image_1.nii.gz')
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(tmp_path/'image_2.nii.gz'))
    with pytest.raises(ValueError, match=r'image_2\.nii\.gz: expected a 3D volume'): read_nifti(tmp_path/'image_2.nii.gz')
    with pytest.raises(ValueError, match='3D'): Case(np.zeros((8, 8), np.float32))


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_error_nan_inf(tmp_path, bad):
    img, lab = _good(); img[2, 3, 3] = bad
    _pair(tmp_path, '1', img, lab)
    with pytest.raises(ValueError, match=r'image_1\.nii\.gz: contains \d+ non-finite values \(NaN or inf\)'): _folder_ds(tmp_path).load('1')


def test_error_constant_volume(tmp_path):
    img, lab = _good(); img[:] = 7
    _pair(tmp_path, '1', img, lab)
    with pytest.raises(ValueError, match=r'image_1\.nii\.gz: volume is constant'): _folder_ds(tmp_path).load('1')


def test_error_unknown_label_codes(tmp_path):
    img, lab = _good(); lab[0, 0, 0] = 9
    _pair(tmp_path, '1', img, lab)
    with pytest.raises(ValueError, match=r"label_1\.nii\.gz: label codes \[9\] are not in the label map"): _folder_ds(tmp_path).load('1')
    # cardiac: class indices are not valid raw codes
    _pair(tmp_path, '2', img, np.where(lab == 9, 0, lab))
    ds = open_dataset('ms_cmrseg_bssfp', root=tmp_path)
    with pytest.raises(ValueError, match=r"label_2\.nii\.gz: label codes \[1, 2\]"): ds.load('2')


def test_error_missing_label_file(tmp_path):
    img, lab = _good()
    _pair(tmp_path, '1', img, lab); _pair(tmp_path, '2', img)
    ds = _folder_ds(tmp_path)
    ds.load('1')
    with pytest.raises(FileNotFoundError, match=r'label_2\.nii\.gz: label file missing for image image_2\.nii\.gz'): ds.load('2')
    assert _folder_ds(tmp_path, require_labels=False).load('2').label is None


def test_error_corrupt_or_not_nifti(tmp_path):
    img, lab = _good()
    _pair(tmp_path, '1', img, lab)
    (tmp_path/'image_2.nii.gz').write_bytes(b'this is not a NIfTI file'); write_nifti(tmp_path/'label_2.nii.gz', lab)
    data = (tmp_path/'image_1.nii.gz').read_bytes()
    (tmp_path/'image_3.nii.gz').write_bytes(data[:len(data)//2]); write_nifti(tmp_path/'label_3.nii.gz', lab)  # truncated
    (tmp_path/'image_4.nii').write_bytes(b'\x00' * 400); write_nifti(tmp_path/'label_4.nii.gz', lab)          # bad header
    ds = _folder_ds(tmp_path)
    for cid in ['2', '3', '4']:
        with pytest.raises(ValueError, match=rf'image_{cid}\.nii(\.gz)?: not a readable NIfTI file'): ds.load(cid)
    with pytest.raises(FileNotFoundError, match='no such file'): read_nifti(tmp_path/'nope.nii.gz')


def test_error_folder_problems(tmp_path):
    with pytest.raises(FileNotFoundError, match='no image_<id>'): _folder_ds(tmp_path)
    with pytest.raises(ValueError, match='classes'): open_dataset(tmp_path)
    img, lab = _good(); _pair(tmp_path, '1', img, lab)
    with pytest.raises(ValueError, match='modality'): open_dataset(tmp_path, classes={1: 'a'}, modality='PET')


# ---------------------------------------------------------------- preprocessing
def _sphere(shape, spacing, r, c):
    g = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing='ij')
    return sum((x - y)**2 for x, y in zip(g, c)) <= r*r


def test_preprocess_roundtrip_mr(tmp_path):
    raw, out = tmp_path/'raw', tmp_path/'out'
    rng = np.random.default_rng(0)
    shp, sp = (9, 300, 180), (7.0, 0.75, 1.5)
    img = rng.uniform(0, 1000, shp).astype(np.float32)
    lab = np.zeros(shp, np.uint8)
    lab[_sphere(shp, sp, 30, (31, 110, 130))] = 1; lab[_sphere(shp, sp, 15, (31, 160, 150))] = 4
    _pair(raw, '5', img, lab, spacing=sp)
    man = preprocess_folder(raw, out, dataset='chaos_t2', progress=False)
    assert (out/'manifest.json').is_file() and (out/'manifest.csv').is_file() and len(man) == 1
    c = open_dataset('chaos_t2', root=out).load('5', normalize=False)
    assert c.shape == (9, 256, 256) and c.spacing == pytest.approx((7.0, 1.25, 1.25))
    # known intensity range: uniform 0..1000 clipped at the 99.5th percentile (~995)
    assert c.image.max() == pytest.approx(np.percentile(img, 99.5), rel=1e-3) and c.image.min() >= 0
    for k in (1, 4):   # physical volume kept within a few percent
        v_in = (lab == k).sum() * np.prod(sp); v_out = (c.label == k).sum() * np.prod(c.spacing)
        assert v_out == pytest.approx(v_in, rel=0.04)
    # geometry: world centroid unchanged
    def wc(p, code):
        im = nib.load(str(p)); a = np.asanyarray(im.dataobj)
        return (im.affine @ np.r_[np.array(np.nonzero(a == code)).mean(1), 1])[:3]
    np.testing.assert_allclose(wc(raw/'label_5.nii.gz', 1), wc(out/'label_5.nii.gz', 1), atol=0.5)
    # second run skips existing outputs
    assert preprocess_folder(raw, out, dataset='chaos_t2', progress=False)['skipped'].all()


def test_preprocess_ct_window_and_resize():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1500, (5, 320, 320)).astype(np.float32)
    lab = np.zeros(hu.shape, np.int16); lab[:, 100:200, 100:200] = 6
    im, lb, sp, aff = preprocess_case(hu, lab, (3., 0.7, 0.7), modality='CT', target_spacing=(None, None, None),
                                      size=256, inplane='resize', border_crop=32)
    assert im.shape == lb.shape == (5, 256, 256)
    assert im.min() >= 0 and im.max() <= 255 and im.max() > 250
    assert sp == pytest.approx((3.0, 256*0.7/256, 256*0.7/256))
    assert set(np.unique(lb)) == {0, 6}
    np.testing.assert_allclose(window_ct(np.array([-125., 275.])), [0, 255])


def test_preprocess_errors(tmp_path):
    img, lab = _good(); lab[0, 0, 0] = 9
    _pair(tmp_path/'raw', '1', img, lab)
    with pytest.raises(ValueError, match=r'label_1\.nii\.gz: label codes \[9\]'):
        preprocess_folder(tmp_path/'raw', tmp_path/'out', dataset='chaos_t2', progress=False)
    with pytest.raises(ValueError, match='unknown dataset'):
        preprocess_folder(tmp_path/'raw', tmp_path/'out', dataset='nope', progress=False)
    with pytest.raises(ValueError, match='dst must differ'):
        preprocess_folder(tmp_path/'raw', tmp_path/'raw', progress=False)


def test_resample_label_keeps_small_classes():
    lab = np.zeros((3, 40, 40), np.uint8); lab[:, 10:30, 10:30] = 1; lab[:, 18:21, 18:21] = 2
    out, sp = resample_label(lab, (5, 1, 1), (None, 1.5, 1.5))
    assert set(np.unique(out)) == {0, 1, 2} and sp == (5.0, 1.5, 1.5)


# ---------------------------------------------------------------- phantom
def test_phantom_deterministic_and_structured():
    a, b, c = make_phantom(7), make_phantom(7), make_phantom(8)
    np.testing.assert_array_equal(a.image, b.image); np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)
    assert a.shape == (32, 128, 128) and a.spacing == (4.0, 1.5, 1.5) and a.image.dtype == np.float32
    assert a.classes == {1: 'liver', 2: 'right kidney', 3: 'left kidney', 4: 'spleen'}
    for case in (a, c):
        n = {k: int((case.label == k).sum()) for k in range(1, 5)}
        assert min(n.values()) > 500 and n[1] == max(n.values())
        for k in range(1, 5): assert (case.label == k).any((1, 2)).sum() >= 8
        # anatomy sides (patient's right = image left): liver and right kidney left of spleen and left kidney
        wc = {k: np.nonzero(case.label == k)[2].mean() for k in range(1, 5)}
        assert wc[1] < 64 < wc[4] and wc[2] < 64 < wc[3]


def test_phantom_not_separable_by_intensity():
    for seed in range(4):
        c = make_phantom(seed)
        d = [threshold_dice(c.image, c.label == k)[0] for k in range(1, 5)]
        assert sum(x < 0.8 for x in d) >= 2, (seed, d)


def test_threshold_dice_oracle():
    img = np.zeros((2, 10, 10), np.float32); img[:, :5] = 1
    assert threshold_dice(img, img > 0)[0] == pytest.approx(1.0)


def test_phantom_dataset_interface():
    ds = open_dataset('phantom', n_cases=6, seed=1, shape=(16, 64, 64))
    assert isinstance(ds, PhantomDataset) and isinstance(ds, Dataset)
    assert ds.case_ids == [str(i) for i in range(1, 7)] and len(ds) == 6 and ds.spec is get_spec('phantom')
    c = ds.load('2')
    assert c.shape == (16, 64, 64) and abs(c.image.mean()) < 1e-3 and c.classes == ds.classes
    assert ds.load('2', normalize=False).image is not ds.load('2', normalize=False).image   # callers get copies
    np.testing.assert_array_equal(ds.load(2).label, ds.load('2').label)
    assert ds.image_path('2') is None
    assert fold_split(ds.case_ids, 0).support_id == '2'
    other = open_dataset('phantom', n_cases=6, seed=2, shape=(16, 64, 64))
    assert not np.array_equal(other.load('2').label, c.label)


def test_phantom_to_folder_roundtrip(tmp_path):
    ds = open_dataset('phantom', n_cases=2, shape=(8, 32, 32))
    ds.to_folder(tmp_path)
    fd = open_dataset(tmp_path, classes=ds.classes)
    a, b = ds.load('1', normalize=False), fd.load('1', normalize=False)
    np.testing.assert_array_equal(a.label, b.label); np.testing.assert_allclose(a.image, b.image)
    assert b.spacing == a.spacing
