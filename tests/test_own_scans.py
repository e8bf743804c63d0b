"Scans as users have them: any orientation or axis order, other spacings, extreme voxels, many queries (`fsmis segment`)."
import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from fsmis.data.io import read_nifti, write_nifti, slice_plane, spacing_to_affine, zhw_to_nifti
from fsmis.data.phantom import make_phantom

ORIENTATIONS = [('L', 'A', 'S'), ('R', 'A', 'S'), ('L', 'P', 'I'), ('R', 'P', 'S'), ('S', 'R', 'A'), ('A', 'I', 'L'), ('P', 'L', 'I')]


def _tiny_model(seed=0, **meta):
    from fsmis.learner import build_model
    torch.manual_seed(seed); torch.set_num_threads(1)
    m = build_model('adnet', encoder='small').eval()
    m.fsmis_meta.update(meta)
    return m


def _store(path, zhw, affine, codes):
    "Save the canonical (z, h, w) array `zhw` (affine `affine`) as the same scan stored with axis codes `codes`."
    img = nib.Nifti1Image(np.ascontiguousarray(zhw_to_nifti(zhw)), affine)
    t = ornt_transform(io_orientation(affine), axcodes2ornt(codes))
    other = img.as_reoriented(t)
    other.set_qform(other.affine, code=1); other.set_sform(other.affine, code=1)
    nib.save(other, str(path))
    assert nib.aff2axcodes(other.affine) == codes
    return path


def _canonical(path):
    "A written label map brought to L, A, S by nibabel alone (independent of fsmis' reader)."
    img = nib.load(str(path))
    t = ornt_transform(io_orientation(img.affine), axcodes2ornt(('L', 'A', 'S')))
    return np.asarray(img.as_reoriented(t).dataobj)


@pytest.fixture(scope='module')
def pair():
    sup, qry = make_phantom(1, (10, 48, 48)), make_phantom(2, (10, 48, 48))
    return sup, qry


@pytest.mark.parametrize('codes', ORIENTATIONS)
def test_reader_gives_one_canonical_array(tmp_path, pair, codes):
    "Any storage order of an axial scan reads as the same (z, h, w) array, spacing and world geometry."
    _, q = pair
    p = _store(tmp_path/'q.nii.gz', q.image, q.affine, codes)
    arr, sp, aff = read_nifti(p)
    np.testing.assert_array_equal(arr, q.image)
    np.testing.assert_allclose(sp, q.spacing); np.testing.assert_allclose(aff, q.affine, atol=1e-6)
    assert slice_plane(aff) == 'axial'
    # written back `like` the file: its own layout, voxel for voxel, affine and header kept
    write_nifti(tmp_path/'w.nii.gz', arr, like=p)
    a, b = nib.load(str(p)), nib.load(str(tmp_path/'w.nii.gz'))
    np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))
    np.testing.assert_allclose(b.affine, a.affine); assert b.header['qform_code'] == a.header['qform_code'] == 1
    np.testing.assert_allclose(b.header.get_zooms(), a.header.get_zooms())


def test_segmentations_agree_across_orientations(tmp_path, pair):
    "One query stored in several orientations and axis orders: the written label maps agree voxel for voxel once reoriented."
    from fsmis.eval.inference import segment_files
    sup, q = pair
    model = _tiny_model()
    write_nifti(tmp_path/'s.nii.gz', sup.image, sup.affine); write_nifti(tmp_path/'m.nii.gz', sup.label, sup.affine)
    maps = {}
    for codes in ORIENTATIONS:
        tag = ''.join(codes)
        qp = _store(tmp_path/f'q_{tag}.nii.gz', q.image, q.affine, codes)
        segment_files(model, qp, tmp_path/'s.nii.gz', tmp_path/'m.nii.gz', tmp_path/f'p_{tag}.nii.gz')
        out, src = nib.load(str(tmp_path/f'p_{tag}.nii.gz')), nib.load(str(qp))
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)  # the query's own grid
        maps[tag] = _canonical(tmp_path/f'p_{tag}.nii.gz')
    ref = maps['LAS']
    assert ref.any() and len(np.unique(ref)) > 2  # a multi-class map, not an empty one
    for tag, m in maps.items(): np.testing.assert_array_equal(m, ref, err_msg=tag)


def test_support_in_another_orientation_segments_as_when_they_match(tmp_path, pair):
    "Support image and mask stored otherwise than the query (and than each other): the same label map as a matching pair."
    from fsmis.eval.inference import segment_files
    sup, q = pair
    model = _tiny_model()
    write_nifti(tmp_path/'q.nii.gz', q.image, q.affine)
    write_nifti(tmp_path/'s.nii.gz', sup.image, sup.affine); write_nifti(tmp_path/'m.nii.gz', sup.label, sup.affine)
    segment_files(model, tmp_path/'q.nii.gz', tmp_path/'s.nii.gz', tmp_path/'m.nii.gz', tmp_path/'same.nii.gz')
    same = nib.load(str(tmp_path/'same.nii.gz')).get_fdata()
    for sc, mc in [(('R', 'P', 'I'), ('R', 'P', 'I')), (('S', 'R', 'A'), ('L', 'P', 'S'))]:
        _store(tmp_path/'s2.nii.gz', sup.image, sup.affine, sc); _store(tmp_path/'m2.nii.gz', sup.label, sup.affine, mc)
        segment_files(model, tmp_path/'q.nii.gz', tmp_path/'s2.nii.gz', tmp_path/'m2.nii.gz', tmp_path/'other.nii.gz')
        np.testing.assert_array_equal(nib.load(str(tmp_path/'other.nii.gz')).get_fdata(), same)


def test_thick_non_axial_series_kept_and_refused_against_axial(tmp_path, pair):
    "A thick-slice sagittal series keeps its plane (not resliced); segmenting it from an axial support is refused in one line."
    from fsmis.eval.inference import segment_files
    sup, q = pair
    write_nifti(tmp_path/'s.nii.gz', sup.image, sup.affine); write_nifti(tmp_path/'m.nii.gz', sup.label, sup.affine)
    sag = np.array([[0, 0, 5., 0], [1.5, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])  # slices 5 mm apart along left-right
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((48, 10, 12), np.float32), sag), str(tmp_path/'sag.nii.gz'))
    arr, sp, aff = read_nifti(tmp_path/'sag.nii.gz')
    assert arr.shape == (12, 10, 48) and sp == (5.0, 1.5, 1.5) and slice_plane(aff) == 'sagittal'
    with pytest.raises(ValueError, match='sagittal slices, but the support .* axial'):
        segment_files(_tiny_model(), tmp_path/'sag.nii.gz', tmp_path/'s.nii.gz', tmp_path/'m.nii.gz', tmp_path/'o.nii.gz')
    assert not (tmp_path/'o.nii.gz').exists()


def test_canonical_frame_is_the_phantoms_and_spacing_to_affines():
    assert nib.aff2axcodes(spacing_to_affine((4., 1.5, 1.5))) == ('L', 'A', 'S')
    assert nib.aff2axcodes(make_phantom(0, (4, 16, 16)).affine) == ('L', 'A', 'S')


@pytest.mark.data
def test_shared_data_reads_as_stored(data_root):
    "The shared preprocessed scans (CHAOS: L, A, S; cardiac: oblique short-axis stacks) read exactly as the plain transpose."
    files = sorted(data_root.glob('*/image_*.nii.gz')) + sorted(data_root.glob('*/label_*.nii.gz'))
    assert len(files) >= 100
    for f in files:
        img = nib.load(str(f))
        arr, sp, aff = read_nifti(f, dtype=None)
        np.testing.assert_array_equal(arr, np.asanyarray(img.dataobj).transpose(2, 1, 0), err_msg=str(f))
        np.testing.assert_allclose(aff, img.affine)
    assert slice_plane(read_nifti(data_root/'chaos_t2'/'image_1.nii.gz')[2]) == 'axial'


def _dice(p, l, c): return 2 * ((p == c) & (l == c)).sum() / max((p == c).sum() + (l == c).sum(), 1)


@pytest.fixture(scope='module')
def bundled():
    from fsmis.eval.inference import bundled_model_path
    from fsmis.learner import load_model
    torch.set_num_threads(1)
    return load_model(bundled_model_path(), 'cpu')


@pytest.fixture(scope='module')
def phantom_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('ph')
    sup, q = make_phantom(1, (16, 128, 128)), make_phantom(2, (16, 128, 128))
    write_nifti(d/'s.nii.gz', sup.image, sup.affine); write_nifti(d/'m.nii.gz', sup.label, sup.affine)
    write_nifti(d/'q.nii.gz', q.image, q.affine)
    return d, q


def test_extreme_voxels_segment_as_the_clean_query(tmp_path, bundled, phantom_files):
    "A handful of voxels at 3e38 (hot pixels, metal): the recipe's clip before the z-score makes them harmless."
    from fsmis.eval.inference import segment_files, checkpoint_norm
    d, q = phantom_files
    spiked = q.image.copy(); spiked.flat[np.random.default_rng(0).choice(spiked.size, 5, replace=False)] = 3e38
    write_nifti(tmp_path/'spiked.nii.gz', spiked, q.affine)
    assert checkpoint_norm(bundled.fsmis_meta)['clip'] == {'pct': 99.5}  # the bundled model predates the record: its dataset's recipe
    segment_files(bundled, d/'q.nii.gz', d/'s.nii.gz', d/'m.nii.gz', tmp_path/'clean.nii.gz')
    segment_files(bundled, tmp_path/'spiked.nii.gz', d/'s.nii.gz', d/'m.nii.gz', tmp_path/'sp.nii.gz')
    clean, sp = (read_nifti(tmp_path/f, dtype=None)[0] for f in ('clean.nii.gz', 'sp.nii.gz'))
    assert clean.any() and (clean == sp).mean() > 0.999
    # the check can fail: without the clip the z-score is ruined and the map is another one
    segment_files(bundled, tmp_path/'spiked.nii.gz', d/'s.nii.gz', d/'m.nii.gz', tmp_path/'raw.nii.gz', norm={'kind': 'volume'})
    assert (read_nifti(tmp_path/'raw.nii.gz', dtype=None)[0] == clean).mean() < 0.99


def test_norm_records_the_clip_and_datasets_do_not_reapply_it():
    from fsmis.data.datasets import open_dataset, normalize_volume, get_spec
    assert get_spec('chaos_t2').clip == {'pct': 99.5} and get_spec('synapse_ct').clip == {'window': [-125.0, 275.0]}
    ds = open_dataset('phantom', n_cases=1, shape=(4, 16, 16))
    assert ds.norm_params() == {'kind': 'volume'}  # phantoms are made in the normalized layout: nothing to clip
    from fsmis.eval.inference import _normalize_raw
    x = np.random.default_rng(0).random((4, 16, 16)).astype(np.float32); x[0, 0, 0] = 1e6
    n = {'kind': 'volume', 'clip': {'pct': 99.5}}
    np.testing.assert_array_equal(normalize_volume(x, n), normalize_volume(x))  # load time (preprocessed files): the z-score only
    assert _normalize_raw(x, n, 'x').max() < 3 and normalize_volume(x, n).max() > 30  # a raw scan at inference: clipped first
    with pytest.raises(ValueError, match='clip'): _normalize_raw(x, {'kind': 'volume', 'clip': {'top': 1}}, 'x')


def test_query_at_another_spacing_segments_alike(tmp_path, bundled, phantom_files):
    "The query resampled to 0.8 mm in-plane and 3 mm slices: Dice within 0.05 of the original grid's, each class."
    from fsmis.data.preprocess import resample_image, resample_label
    from fsmis.eval.inference import segment_files, model_spacing
    d, q = phantom_files
    assert model_spacing(bundled.fsmis_meta) == (2.5, 2.5)  # CHAOS' 1.25 mm slices of 256 px, seen at 128 px
    qi, sp = resample_image(q.image, q.spacing, (3., .8, .8)); ql, _ = resample_label(q.label, q.spacing, (3., .8, .8))
    write_nifti(tmp_path/'fine.nii.gz', qi, q.affine @ np.diag([.8/1.5, .8/1.5, 3/4., 1]))
    r0 = segment_files(bundled, d/'q.nii.gz', d/'s.nii.gz', d/'m.nii.gz', tmp_path/'a.nii.gz')
    r1 = segment_files(bundled, tmp_path/'fine.nii.gz', d/'s.nii.gz', d/'m.nii.gz', tmp_path/'b.nii.gz')
    assert r0['spacing'] == r1['spacing'] == (2.5, 2.5)
    a, b = read_nifti(tmp_path/'a.nii.gz', dtype=None)[0], read_nifti(tmp_path/'b.nii.gz', dtype=None)[0]
    assert b.shape == qi.shape == (21, 240, 240)  # written on the query's own grid
    for c in (1, 2, 3, 4):
        d0, d1 = _dice(a, q.label, c), _dice(b, ql, c)
        assert abs(d0 - d1) < 0.05, (c, d0, d1)
    assert _dice(a, q.label, 1) > 0.3


def test_spacing_recorded_by_training(tmp_path):
    "A training records the pixel size its network saw; inference reads it back."
    from fsmis.config import ExperimentConfig
    from fsmis.data.datasets import open_dataset
    from fsmis.train import train_fold
    from fsmis.eval.inference import model_spacing
    ds = open_dataset('phantom', n_cases=2, shape=(8, 48, 48))
    cfg = ExperimentConfig(method='adnet', dataset='phantom', n_steps=1, size=32, device='cpu', select='final')
    learn = train_fold(cfg, ds, ['1', '2'], n_workers=1, cache_dir=tmp_path/'cache')
    assert model_spacing(learn.model.fsmis_meta) == pytest.approx((1.5 * 48 / 32, 1.5 * 48 / 32))


def test_cli_many_queries_k_shots_names_and_largest_component(tmp_path, capsys):
    "`fsmis segment` on several queries: one model load, K shots, the user's class names, optional largest component."
    from fsmis.cli import main
    from fsmis.learner import save_model
    from fsmis.eval.inference import largest_components
    import scipy.ndimage as ndi
    m = _tiny_model(spacing=[1.5, 1.5], classes={1: 'liver', 2: 'right kidney', 3: 'left kidney', 4: 'spleen'}, dataset='chaos_t2')
    save_model(m, tmp_path/'m.pth')
    for i in (1, 2, 3):
        c = make_phantom(i, (8, 48, 48)); write_nifti(tmp_path/f'q{i}.nii.gz', c.image, c.affine)
        if i == 1: write_nifti(tmp_path/'mask.nii.gz', (c.label == 2).astype(np.uint8), c.affine)  # a right-kidney mask saved as class 1
    (tmp_path/'names.txt').write_text('1 right kidney\n')
    q = [str(tmp_path/'q2.nii.gz'), str(tmp_path/'q3.nii.gz')]
    args = ['segment', *q, str(tmp_path/'q1.nii.gz'), str(tmp_path/'mask.nii.gz'), '--checkpoint', str(tmp_path/'m.pth'), '--device', 'cpu']
    assert main(args + ['--out', str(tmp_path/'out'), '--shots', '2']) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and all('support slices ' in l and 'class 1:' in l and 'liver' not in l for l in out), out
    assert main(args + ['--out', str(tmp_path/'named'), '--classes', str(tmp_path/'names.txt'), '--slice', '3', '--largest-component']) == 0
    out = capsys.readouterr().out
    assert out.count('right kidney:') == 2 and 'liver' not in out and 'support slice 3;' in out
    for name in ('q2.nii.gz', 'q3.nii.gz'):
        lab = read_nifti(tmp_path/'named'/name, dtype=None)[0]
        assert ndi.label(lab == 1, structure=np.ones((3, 3, 3)))[1] <= 1 and (largest_components(lab) == lab).all()
        assert read_nifti(tmp_path/'out'/name, dtype=None)[0].shape == (8, 48, 48)
    # one-line errors: a --out file for several queries, an unreadable classes file, too many shots
    for extra in (['--out', str(tmp_path/'x.nii.gz')], ['--out', str(tmp_path/'o2'), '--classes', str(tmp_path/'q1.nii.gz')],
                  ['--out', str(tmp_path/'o3'), '--shots', '99']):
        assert main(args + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('fsmis segment: error:') and '\n' not in err, err
    assert not (tmp_path/'o2').exists() and not (tmp_path/'o3').exists()


@pytest.fixture(scope='module')
def kernel_cache(tmp_path_factory): return tmp_path_factory.mktemp('cache')  # supervoxel kernels compiled once for the module


def test_training_writes_its_log_and_provenance(tmp_path, monkeypatch, kernel_cache):
    "`fsmis train` writes <checkpoint>.csv (step, loss terms, T, lr) beside each checkpoint, whole across a resume; provenance in the file."
    import pandas as pd
    from fsmis.cli import main
    from fsmis.learner import read_checkpoint
    monkeypatch.setenv('FSMIS_CACHE', str(kernel_cache))
    torch.set_num_threads(1)
    ck = tmp_path/'ck'
    base = ['train', '--dataset', 'phantom', '--size', '32', '--rho', '300', '--workers', '1', '--device', 'cpu',
            '--checkpoints', str(ck), '--checkpoint-every', '2', '--quiet']
    assert main(base + ['--iters', '4']) == 0
    log = pd.read_csv(ck/'final.csv')
    assert list(log['step']) == [1, 2, 3, 4] and {'loss', 'T', 'lr', 'dice'} <= set(log.columns)
    assert (log['lr'] > 0).all() and log['T'].notna().all()
    assert sorted(p.name for p in ck.glob('iter_*')) == ['iter_0000002.csv', 'iter_0000002.pth', 'iter_0000004.csv', 'iter_0000004.pth']
    assert main(base + ['--iters', '6', '--resume', 'last']) == 0  # resumed: the log goes on from step 5
    log = pd.read_csv(ck/'final.csv')
    assert list(log['step']) == [1, 2, 3, 4, 5, 6], log
    assert not (ck/'iter_0000002.csv').exists()  # rotated away with its checkpoint
    prov = read_checkpoint(ck/'final.pth')['provenance']
    assert prov['device'] == 'cpu' and prov['numpy'] == np.__version__ and prov['torch'] == torch.__version__
    assert 'train' in prov['command'] or prov['command']  # the command line of the process
    assert set(prov) >= {'fsmis', 'git_commit', 'numba', 'precision'}


def test_results_folder_records_provenance(tmp_path, monkeypatch, kernel_cache):
    import json
    from fsmis.config import ExperimentConfig
    from fsmis.experiments import run_experiment
    monkeypatch.setenv('FSMIS_CACHE', str(kernel_cache))
    torch.set_num_threads(1)
    cfg = ExperimentConfig(name='x', dataset='phantom', dataset_kw=dict(n_cases=6, shape=(8, 48, 48)), folds=[0], runs=1, n_steps=1,
                           size=32, rho=300, device='cpu', protocols=['EP2'], baselines=[], classes=['liver'])
    run_experiment(cfg, tmp_path/'exp', progress=False)
    prov = json.loads((tmp_path/'exp'/'provenance.json').read_text())
    assert prov['device'] == 'cpu' and prov['numpy'] == np.__version__
    assert (tmp_path/'exp'/'model_fold0_run0.csv').is_file()  # the run's training log beside its model file


def _vol(path, arr, affine=np.diag([0.8, 0.8, 3., 1.])):
    path.parent.mkdir(parents=True, exist_ok=True); nib.save(nib.Nifti1Image(arr, affine), str(path))


def _download(root, layout):
    "A tiny synthetic download in `layout`: two cases, 2 classes (codes 1, 2)."
    import json
    rng = np.random.default_rng(0)
    for i in (1, 2):
        img = (rng.random((80, 80, 6)) * 100).astype(np.float32); lab = np.zeros((80, 80, 6), np.uint8)  # Synapse's recipe crops 32 px borders
        lab[34:44, 34:44, 1:5] = 1; lab[45:50, 38:46, 2:4] = 2
        if layout == 'msd':
            _vol(root/'imagesTr'/f'case_{i:03d}.nii.gz', img); _vol(root/'labelsTr'/f'case_{i:03d}.nii.gz', lab)
        elif layout == 'nnunet':
            for ch in (0, 1): _vol(root/'imagesTr'/f'case_{i:03d}_{ch:04d}.nii.gz', img + 1000 * ch)
            _vol(root/'labelsTr'/f'case_{i:03d}.nii.gz', lab)
        else:
            _vol(root/'Training'/'img'/f'img{i:04d}.nii.gz', img); _vol(root/'Training'/'label'/f'label{i:04d}.nii.gz', lab)
    if layout == 'msd': (root/'dataset.json').write_text(json.dumps({'name': 'Kidney', 'modality': {'0': 'MRI'}, 'labels': {'0': 'background', '1': 'right kidney', '2': 'left kidney'}}))
    if layout == 'nnunet': (root/'dataset.json').write_text(json.dumps({'channel_names': {'0': 'CT', '1': 'PET'}, 'labels': {'background': 0, 'kidney': 1, 'tumour': 2}, 'file_ending': '.nii.gz'}))
    return root


@pytest.mark.parametrize('layout, classes, modality, ids', [
    ('msd', {1: 'right kidney', 2: 'left kidney'}, 'MR', ['case_001', 'case_002']),
    ('nnunet', {1: 'kidney', 2: 'tumour'}, 'CT', ['case_001', 'case_002']),
    ('synapse', None, 'CT', ['1', '2'])])
def test_import_layouts_then_preprocess(tmp_path, layout, classes, modality, ids):
    "Each public layout imports into image/label pairs whose manifest names the classes; `fsmis preprocess` reads the result."
    from fsmis.cli import main
    from fsmis.data.datasets import open_dataset, SYNAPSE_CLASSES
    src = _download(tmp_path/'download', layout)
    assert main(['import', layout, str(src), str(tmp_path/'imp'), '--quiet']) == 0
    ds = open_dataset(tmp_path/'imp')
    assert ds.case_ids == ids and ds.spec.modality == modality and ds.classes == (classes or SYNAPSE_CLASSES)
    c = ds.load(ids[0], normalize=False)
    assert c.image.shape == (6, 80, 80) and set(np.unique(c.label)) == {0, 1, 2}
    if layout == 'nnunet': assert c.image.max() < 1000  # channel 0, not the PET channel
    assert main(['preprocess', str(tmp_path/'imp'), str(tmp_path/'pre'), '--size', '32', '--quiet']) == 0
    pre = open_dataset(tmp_path/'pre')
    assert pre.case_ids == ids and pre.classes == ds.classes and pre.load(ids[0]).image.shape[1:] == (32, 32)


def test_import_wrong_folder_is_one_line(tmp_path, capsys):
    from fsmis.cli import main
    _download(tmp_path/'syn', 'synapse'); _download(tmp_path/'msd', 'msd')
    (tmp_path/'msd'/'labelsTr'/'case_002.nii.gz').unlink()
    for args, culprit in [(['msd', str(tmp_path/'syn')], 'not an MSD / nnU-Net folder'), (['synapse', str(tmp_path/'msd')], 'not a Synapse / BTCV folder'),
                          (['msd', str(tmp_path/'msd')], 'no label for case'), (['nnunet', str(tmp_path/'nope')], 'not found'),
                          (['dicom', str(tmp_path/'syn')], 'invalid choice')]:
        assert main(['import', *args, str(tmp_path/'out'), '--quiet']) == 2 if args[0] != 'dicom' else True
        if args[0] == 'dicom':
            with pytest.raises(SystemExit) as e: main(['import', *args, str(tmp_path/'out')])
            assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert culprit in err and '\n' not in err, err
    assert not list((tmp_path/'out').glob('*.nii.gz')) if (tmp_path/'out').exists() else True
