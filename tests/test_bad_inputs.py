"""Bad input, tried as a user would: every CLI mistake ends with exit code 2 and one line naming the culprit, inputs and
outputs are never damaged, and the Python API refuses what it cannot handle with a clear message."""
import os
from pathlib import Path
import numpy as np
import pytest
import torch
from fsmis.cli import main
from fsmis.data.io import read_nifti, write_nifti


def run(capsys, *args):
    try: code = main([str(a) for a in args])
    except SystemExit as x: code = x.code
    o = capsys.readouterr()
    return code, o.out, o.err


def one_line(err, *names):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and 'Traceback' not in err, err
    for n in names: assert str(n) in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    "Phantom scans, a tiny trained checkpoint and assorted broken files."
    from fsmis.data.phantom import PhantomDataset
    from fsmis.data.phantom import toy_dls
    from fsmis.learner import adnet_learner, save_checkpoint, fit_iters
    d = tmp_path_factory.mktemp('bad')
    PhantomDataset(n_cases=6, seed=2, shape=(8, 48, 48)).to_folder(d/'data')
    torch.manual_seed(0)
    learn = adnet_learner(toy_dls(4, size=32), 'small', path=d)
    fit_iters(learn, 1, progress=False)
    save_checkpoint(learn, d/'model.pth')
    raw = (d/'model.pth').read_bytes()
    (d/'truncated.pth').write_bytes(raw[:len(raw) // 3])
    torch.save(torch.zeros(3), d/'tensor.pth')
    (d/'empty.yaml').write_text('')
    (d/'bad.yaml').write_text('method: [adnet\n')
    (d/'list.yaml').write_text('- 1\n- 2\n')
    (d/'typed.yaml').write_text('n_steps: many\n')
    (d/'tag.yaml').write_text('method: !!python/object/apply:os.system ["true"]\n')
    (d/'unknown.yaml').write_text('methd: adnet\n')
    (d/'notes.txt').write_text('not a scan')
    img, _, aff = read_nifti(d/'data'/'image_1.nii.gz')
    nan = img.copy(); nan[0, 0, 0] = np.nan; write_nifti(d/'nan.nii.gz', nan, aff)
    write_nifti(d/'const.nii.gz', np.ones_like(img), aff)
    lab, _, _ = read_nifti(d/'data'/'label_2.nii.gz', dtype=None)
    write_nifti(d/'neg.nii.gz', -lab.astype(np.int16), aff)
    write_nifti(d/'small.nii.gz', lab[:3], aff)
    import gzip, nibabel as nib
    hdr = nib.Nifti1Header(); hdr.set_data_shape((1000, 1000, 1000)); hdr.set_data_dtype(np.int16)  # claims 2 GB in 1 kB
    with gzip.open(d/'forged.nii.gz', 'wb') as fh: fh.write(hdr.binaryblock + b'\0' * 1004)
    return d


def _seg(f, *extra, query=None, support=None, mask=None, ck=None):
    return ['segment', query or f/'data'/'image_1.nii.gz', support or f/'data'/'image_2.nii.gz', mask or f/'data'/'label_2.nii.gz',
            '--checkpoint', ck or f/'model.pth', '--device', 'cpu', *extra]


SEGMENT_CASES = {  # name: (arguments after the fixture, text the message must contain)
    'missing query': (lambda f: _seg(f, query=f/'nope.nii.gz'), 'nope.nii.gz'),
    'query is text': (lambda f: _seg(f, '--out', f/'o1.nii.gz', query=f/'notes.txt'), 'notes.txt'),
    'nan query': (lambda f: _seg(f, '--out', f/'o2.nii.gz', query=f/'nan.nii.gz'), 'nan.nii.gz'),
    'constant query': (lambda f: _seg(f, '--out', f/'o3.nii.gz', query=f/'const.nii.gz'), 'const.nii.gz'),
    'negative mask': (lambda f: _seg(f, '--out', f/'o4.nii.gz', mask=f/'neg.nii.gz'), 'negative'),
    'image as mask': (lambda f: _seg(f, '--out', f/'o5.nii.gz', mask=f/'data'/'image_2.nii.gz'), 'image_2.nii.gz'),
    'mask shape': (lambda f: _seg(f, '--out', f/'o6.nii.gz', mask=f/'small.nii.gz'), 'shape'),
    'out is query': (lambda f: _seg(f, '--out', f/'data'/'image_1.nii.gz'), 'query'),
    'out is mask': (lambda f: _seg(f, '--out', f/'data'/'label_2.nii.gz'), 'support mask'),
    'out suffix': (lambda f: _seg(f, '--out', f/'p.png'), '--out'),
    'out is folder': (lambda f: _seg(f, '--out', f/'data.nii.gz') if (f/'data.nii.gz').mkdir() is None else None, 'folder'),
    'truncated checkpoint': (lambda f: _seg(f, '--out', f/'o7.nii.gz', ck=f/'truncated.pth'), 'truncated.pth'),
    'tensor checkpoint': (lambda f: _seg(f, '--out', f/'o8.nii.gz', ck=f/'tensor.pth'), 'tensor.pth'),
    'text checkpoint': (lambda f: _seg(f, '--out', f/'o9.nii.gz', ck=f/'notes.txt'), 'notes.txt'),
    'slice out of range': (lambda f: _seg(f, '--slice', '99', '--out', f/'o10.nii.gz'), '--slice 99'),
    'empty slice': (lambda f: _seg(f, '--slice', '0', '--out', f/'o11.nii.gz'), '--slice 0'),
    'bad device': (lambda f: _seg(f, '--device', 'bogus', '--out', f/'o12.nii.gz'), '--device'),
    'negative size': (lambda f: _seg(f, '--size', '-4', '--out', f/'o13.nii.gz'), '--size'),
    'huge size': (lambda f: _seg(f, '--size', '100000', '--out', f/'o14.nii.gz'), '--size'),
    'out under a file': (lambda f: _seg(f, '--out', f/'notes.txt'/'o15.nii.gz'), 'notes.txt is a file'),
    'out under /proc': (lambda f: _seg(f, '--out', '/proc/o16.nii.gz'), '/proc/o16.nii.gz'),
    'forged header': (lambda f: _seg(f, '--out', f/'o17.nii.gz', query=f/'forged.nii.gz'), 'forged.nii.gz'),
}


@pytest.mark.parametrize('case', list(SEGMENT_CASES))
def test_segment_bad_input(case, files, capsys):
    make, culprit = SEGMENT_CASES[case]
    before = {p: p.read_bytes() for p in (files/'data').iterdir()}
    code, out, err = run(capsys, *make(files))
    assert code == 2, (case, out, err)
    one_line(err, culprit)
    assert {p: p.read_bytes() for p in (files/'data').iterdir()} == before  # no input changed
    assert not list(files.glob('o*.nii.gz')) and not list(files.glob('.*.tmp*'))  # no output left behind


TRAIN_CASES = {
    'lr nan': (['--lr', 'nan'], '--lr'), 'lr negative': (['--lr', '-1'], '--lr'), 'lr inf': (['--lr', 'inf'], '--lr'),
    'size zero': (['--size', '0'], '--size'), 'iters negative': (['--iters', '-5'], '--iters'),
    'iters text': (['--iters', 'ten'], '--iters'), 'rho zero': (['--rho', '0'], '--rho'), 'rho float': (['--rho', '2.5'], '--rho'),
    'fold negative': (['--fold', '-1'], '--fold'), 'fold too big': (['--fold', '9'], 'fold'),
    'device': (['--device', 'gpu0'], '--device'), 'workers zero': (['--workers', '0'], '--workers'),
    'unknown method': (['--method', 'unet'], '--method'), 'missing dataset': (['--dataset', '/no/such/dir'], '/no/such/dir'),
    'missing config': (['--config', '/no/config.yaml'], 'config.yaml'),
    'empty config': (['--config', '{d}/empty.yaml'], 'empty.yaml'), 'malformed config': (['--config', '{d}/bad.yaml'], 'bad.yaml'),
    'list config': (['--config', '{d}/list.yaml'], 'list.yaml'), 'typed config': (['--config', '{d}/typed.yaml'], 'n_steps'),
    'python tag config': (['--config', '{d}/tag.yaml'], 'tag.yaml'), 'unknown key config': (['--config', '{d}/unknown.yaml'], 'methd'),
    'checkpoints is a file': (['--checkpoints', '{d}/notes.txt'], 'notes.txt'),
    'truncated resume': (['--resume', '{d}/truncated.pth'], 'truncated.pth'),
    'resume other kind': (['--resume', '{d}/tensor.pth'], 'tensor.pth'),
}


@pytest.mark.parametrize('case', list(TRAIN_CASES))
def test_train_bad_input(case, files, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv('FSMIS_CACHE', str(tmp_path/'cache'))
    args, culprit = TRAIN_CASES[case]
    args = [a.format(d=files) for a in args]
    base = ['train', '--dataset', files/'data', '--iters', '2', '--size', '32', '--rho', '300', '--device', 'cpu', '--quiet',
            '--workers', '1']
    if '--checkpoints' not in args: base += ['--checkpoints', tmp_path/'ck']
    code, out, err = run(capsys, *base, *args)
    assert code == 2, (case, out, err)
    one_line(err, culprit)
    assert not (tmp_path/'ck'/'final.pth').exists()


OTHER_CASES = {
    'evaluate truncated': (['evaluate', '{d}/truncated.pth', '--dataset', '{d}/data'], 'truncated.pth'),
    'evaluate tensor': (['evaluate', '{d}/tensor.pth', '--dataset', '{d}/data'], 'tensor.pth'),
    'evaluate missing': (['evaluate', '{d}/none.pth'], 'none.pth'),
    'evaluate bad protocol': (['evaluate', '{d}/model.pth', '--protocol', 'EP3'], '--protocol'),
    'preprocess size zero': (['preprocess', '{d}/data', '{d}/pp', '--size', '0'], '--size'),
    'preprocess missing src': (['preprocess', '{d}/nothing', '{d}/pp'], 'nothing'),
    'supervoxels missing': (['supervoxels', '{d}/nothing'], 'nothing'),
    'supervoxels file': (['supervoxels', '{d}/notes.txt'], 'notes.txt'),
    'supervoxels rho': (['supervoxels', '{d}/data', '--rho', '-1'], '--rho'),
    'supervoxels cases': (['supervoxels', '{d}/data', '--cases', '77'], '77'),
    'demo iters': (['demo', '--iters', 'x'], '--iters'),
    'demo lr': (['demo', '--lr', '0'], '--lr'),
    'demo missing data': (['demo', '--data', '{d}/nothing', '--out', '{d}/demo_out'], 'nothing'),
    'reproduce unknown': (['reproduce', 'adnet-nowhere'], 'adnet-nowhere'),
    'reproduce minutes': (['reproduce', 'adnet-chaos-ep2', '--minutes', '-3'], '--minutes'),
    'unknown command': (['frobnicate'], 'frobnicate'),
    'pretrain no budget': (['pretrain', 'densecl', 'phantom'], '--steps'),
    'pretrain steps zero': (['pretrain', 'densecl', 'phantom', '--steps', '0'], '--steps'),
    'pretrain unknown method': (['pretrain', 'simclr', 'phantom'], 'simclr'),
}


@pytest.mark.parametrize('case', list(OTHER_CASES))
def test_other_commands_bad_input(case, files, capsys):
    args, culprit = OTHER_CASES[case]
    code, out, err = run(capsys, *[a.format(d=files) for a in args])
    assert code == 2, (case, out, err)
    one_line(err, culprit)
    assert not (files/'pp').exists() and not (files/'demo_out').exists()


# ---------------------------------------------------------------- Python API
def test_api_segment_files_refuses_nan_and_keeps_inputs(files):
    from fsmis.eval.inference import segment_files
    from fsmis.models.intensity import IntensityPrototype
    with pytest.raises(ValueError, match='nan.nii.gz'):
        segment_files(IntensityPrototype(), files/'nan.nii.gz', files/'data'/'image_2.nii.gz', files/'data'/'label_2.nii.gz', files/'x.nii.gz')
    assert not (files/'x.nii.gz').exists()


def test_api_checkpoint_errors(files):
    from fsmis.learner import load_model, read_checkpoint
    for name in ('truncated.pth', 'tensor.pth', 'notes.txt'):
        with pytest.raises(ValueError, match=name): load_model(files/name)
    assert isinstance(read_checkpoint(files/'model.pth'), dict)


def test_api_config_errors(files):
    from fsmis.config import ExperimentConfig
    for name in ('empty.yaml', 'bad.yaml', 'list.yaml', 'tag.yaml'):
        with pytest.raises(ValueError, match=name): ExperimentConfig.load(files/name)
    for kw, what in [(dict(lr=float('nan')), 'lr'), (dict(n_steps=2.5), 'n_steps'), (dict(size=0), 'size'), (dict(rho=0), 'rho'),
                     (dict(folds='0'), 'folds')]:
        with pytest.raises(ValueError, match=what): ExperimentConfig(**kw)


def test_api_nonfinite_loss_stops_with_the_step(tmp_path):
    from fsmis.data.phantom import toy_dls
    from fsmis.learner import adnet_learner, fit_iters, NonFiniteLoss, list_checkpoints, read_checkpoint
    torch.manual_seed(0)
    learn = adnet_learner(toy_dls(20, size=32), 'small', lr=1e-3, path=tmp_path)
    fit_iters(learn, 3, ckpt_every=3, ckpt_dir=tmp_path/'ck', progress=False)
    learn.fsmis_schedule = {**learn.fsmis_schedule, 'lr': float('nan')}
    with pytest.raises(NonFiniteLoss, match=r'(?s)step 4: .*lr nan'): fit_iters(learn, 6, ckpt_every=1, ckpt_dir=tmp_path/'ck', progress=False)
    last = list_checkpoints(tmp_path/'ck')[-1]
    assert all(torch.isfinite(v).all() for v in read_checkpoint(last)['model'].values() if v.is_floating_point())


def test_api_support_mask_checks():
    from fsmis.eval.inference import check_support_mask, support_slice
    with pytest.raises(ValueError, match='negative'): check_support_mask(-np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match='complex'): check_support_mask(np.ones((2, 3, 3), complex))
    with pytest.raises(ValueError, match='empty'): support_slice(np.zeros((3, 4, 4), int))


def test_api_broken_supervoxel_cache_is_recomputed(tmp_path):
    from fsmis.data.phantom import make_phantom
    from fsmis.data.supervoxels import cached_supervoxels
    c = make_phantom(0, (6, 32, 32))
    a = cached_supervoxels(c.image, c.spacing, rho=100, cache_dir=tmp_path)
    (f,) = tmp_path.glob('*.npz')
    f.write_bytes(f.read_bytes()[:40])
    b = cached_supervoxels(c.image, c.spacing, rho=100, cache_dir=tmp_path)
    assert np.array_equal(a, b) and np.load(f)['labels'].shape == a.shape


def test_api_nonfinite_message_is_ours_not_fastais(tmp_path):
    "fastai prefixes errors raised in callbacks; the divergence message reaches the user as one clean line."
    from fsmis.data.phantom import toy_dls
    from fsmis.learner import adnet_learner, fit_iters, NonFiniteLoss
    learn = adnet_learner(toy_dls(8, size=32), 'small', lr=float('nan'), path=tmp_path)
    with pytest.raises(NonFiniteLoss) as e: fit_iters(learn, 3, progress=False)
    assert str(e.value).startswith('training diverged at step 1') and 'Exception occured' not in str(e.value)


def _task(k=1, n=2, size=32):
    return torch.randn(k, 1, size, size), (torch.rand(k, 1, size, size) > .5).float(), torch.randn(n, 1, size, size)


MODEL_CASES = {  # name: (change to the (sup_imgs, sup_masks, qry_imgs) task, exception, text of the message)
    'integer images': (lambda s, m, q: ((s * 100).short(), m, q), TypeError, 'sup_imgs: dtype torch.int16'),
    'integer query': (lambda s, m, q: (s, m, q.long()), TypeError, 'qry_imgs: dtype torch.int64'),
    'numpy images': (lambda s, m, q: (s.numpy(), m, q), TypeError, 'sup_imgs must be a torch.Tensor'),
    'zero shots': (lambda s, m, q: (s[:0], m[:0], q), ValueError, 'at least one support shot'),
    'zero queries': (lambda s, m, q: (s, m, q[:0]), ValueError, 'one query'),
    'mask of another size': (lambda s, m, q: (s, m[..., :16, :16], q), ValueError, 'does not match'),
    'mask shots differ': (lambda s, m, q: (s, torch.cat([m, m]), q), ValueError, 'does not match'),
    'mask values 0..255': (lambda s, m, q: (s, m * 255, q), ValueError, '0/1'),
    'negative mask': (lambda s, m, q: (s, -m, q), ValueError, '0/1'),
    'NaN query': (lambda s, m, q: (s, m, q.index_fill(0, torch.tensor([0]), float('nan'))), ValueError, 'qry_imgs contains NaN'),
    'inf support': (lambda s, m, q: (s.index_fill(0, torch.tensor([0]), float('inf')), m, q), ValueError, 'sup_imgs contains NaN or inf'),
    'channels differ': (lambda s, m, q: (s, m, q.expand(-1, 3, -1, -1)), ValueError, 'expected'),
    '3D images': (lambda s, m, q: (s[:, 0], m, q), ValueError, 'expected'),
}


@pytest.mark.parametrize('kind', ['adnet', 'alpnet', 'panet'])
@pytest.mark.parametrize('case', list(MODEL_CASES))
def test_api_model_predict_boundary(kind, case):
    from fsmis.learner import build_model
    torch.manual_seed(0)
    model = build_model(kind, encoder='small').eval()
    change, exc, text = MODEL_CASES[case]
    with pytest.raises(exc, match=text.replace('(', r'\(')): model.predict(*change(*_task()))


def test_api_model_casts_float64_and_trains_on_float16_free_input():
    from fsmis.learner import build_model
    torch.manual_seed(0)
    model = build_model('adnet', encoder='small').eval()
    s, m, q = _task()
    assert torch.allclose(model.predict(s.double(), m, q.double()), model.predict(s, m, q))
    out = model(s[None], m[:, 0][None], q[None])  # forward (a training batch) checks shapes without a pass over the data
    assert out['qry'].shape == (1, 2, 2, 32, 32)
    with pytest.raises(ValueError, match='does not match'): model(s[None], m[:, 0, :16][None], q[None])


def test_api_segment_volume_refuses_nonfinite_and_out_of_range():
    from fsmis.learner import build_model
    from fsmis.eval.inference import segment_volume
    model = build_model('adnet', encoder='small').eval()
    img = np.random.default_rng(0).normal(size=(4, 32, 32)).astype(np.float32); lab = (img[1] > 0).astype(int)
    nan = img.copy(); nan[2, 3, 3] = np.nan
    with pytest.raises(ValueError, match='query image: contains 1 non-finite'): segment_volume(model, nan, img[1], lab)
    with pytest.raises(ValueError, match='support image'): segment_volume(model, img, nan[2], lab)
    huge = img.astype(np.float64); huge[0, 0, 0] = 1e39
    with pytest.raises(ValueError, match='float32 range'): segment_volume(model, huge, img[1], lab)
    assert segment_volume(model, img, img[1], lab).shape == img.shape


@pytest.mark.parametrize('dtype', [np.complex64, object, 'U3'])
def test_api_write_nifti_refuses_what_nifti_cannot_hold(tmp_path, dtype):
    a = np.zeros((2, 3, 4), dtype)
    with pytest.raises(ValueError, match=f'dtype .* cannot be written as NIfTI'): write_nifti(tmp_path/'x.nii.gz', a)
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left


def test_api_zscore_of_huge_values_is_finite():
    from fsmis.data.datasets import zscore
    v = np.zeros((2, 4, 4), np.float32); v[0, 0, 0] = 3e38
    z = zscore(v)
    assert np.isfinite(z).all() and z[0, 0, 0] > 0


def test_killed_write_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    import signal, subprocess, sys, time
    target = tmp_path/'big.bin'
    code = ("import time; from fsmis.core import atomic_write\n"
            f"with atomic_write({str(target)!r}) as f:\n    f.write(b'x' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'writing'
    os.kill(p.pid, signal.SIGKILL); p.wait()
    left = [f for f in tmp_path.iterdir() if f.name != 'big.bin']
    assert len(left) == 1 and str(p.pid) in left[0].name and not target.exists()  # a killed writer cannot clean up
    from fsmis.core import atomic_write
    with atomic_write(target) as f: f.write(b'done')
    assert sorted(f.name for f in tmp_path.iterdir()) == ['big.bin'] and target.read_bytes() == b'done'


def test_supervoxels_out_checked_before_the_work(files, capsys, tmp_path):
    import time
    blocker = tmp_path/'afile'; blocker.write_text('x')
    t = time.perf_counter()
    code, _, err = run(capsys, 'supervoxels', files/'data', '--out', blocker/'sub', '--quiet', '--workers', 1)
    assert code == 2 and time.perf_counter() - t < 5
    one_line(err, '--out', 'afile')


@pytest.mark.parametrize('args, text', [
    (['demo', '--data', '{afile}'], 'not a folder'),
    (['evaluate', '{afile}'], 'not a PyTorch checkpoint'),
    (['evaluate', '{empty}'], 'it is empty'),
    (['pretrain', 'densecl', '{data}', '--steps', '1', '--out', '{data}/image_1.nii.gz'], 'not a NIfTI path'),
])
def test_more_bad_inputs_found_by_a_sweep(args, text, files, capsys, tmp_path):
    (tmp_path/'afile').write_text('x'); (tmp_path/'empty.pth').write_bytes(b'')
    before = {p: p.read_bytes() for p in (files/'data').iterdir()}
    code, out, err = run(capsys, *[a.format(afile=tmp_path/'afile', empty=tmp_path/'empty.pth', data=files/'data') for a in args])
    assert code == 2 and text in one_line(err)
    assert {p: p.read_bytes() for p in (files/'data').iterdir()} == before  # no input touched


def test_finite_guard_passes_huge_finite_weights_and_stops_nan_weights():
    "The fast check (fused norms) overflows at ~1e19; the exact per-tensor check must then decide."
    from types import SimpleNamespace
    from fsmis.learner import FiniteGuard, NonFiniteLoss
    m = torch.nn.Linear(3, 2); g = FiniteGuard(); g.learn = SimpleNamespace(training=True, model=m, iteration=4, opt=None)
    g.after_step()
    with torch.no_grad(): m.weight.fill_(1e20)
    g.after_step()  # finite, though its norm is inf in float32
    with torch.no_grad(): m.bias[0] = float('nan')
    with pytest.raises(NonFiniteLoss, match='step 5: the weights became non-finite'): g.after_step()


# ---------------------------------------------------------------- faults outside the happy path (issue 31)
# Outputs that cannot be written: a read-only or full file system (a real tmpfs where this test may mount one, as root;
# skipped otherwise), and the same errors raised by a patched writer, which runs everywhere.
import errno, shutil, subprocess, sys


def _no_temporaries(*folders):
    return not [p for d in folders if Path(d).is_dir() for p in Path(d).rglob('.*.tmp*')]


@pytest.fixture
def tmpfs(tmp_path):
    "mount(name, size, ro=False) -> a fresh tmpfs folder under tmp_path; unmounted at the end. Skips where mounting is not permitted."
    mounted = []
    def mount(name, size='256k', ro=False):
        d = tmp_path/name; d.mkdir()
        if os.geteuid() != 0 or shutil.which('mount') is None: pytest.skip('mounting a tmpfs needs root and mount(8)')
        r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(d)], capture_output=True, text=True)
        if r.returncode: pytest.skip(f'cannot mount a tmpfs here: {r.stderr.strip()}')
        mounted.append(d)
        if ro and subprocess.run(['mount', '-o', 'remount,ro', str(d)], capture_output=True).returncode: pytest.skip('cannot remount read-only')
        return d
    yield mount
    for d in reversed(mounted): subprocess.run(['umount', '-l', str(d)], capture_output=True)


def _fill(d, leave=0):
    "Fill the file system of `d` up to `leave` free bytes (a disk that is full, or nearly)."
    with open(d/'filler', 'wb') as f:
        try:
            while True:
                free = shutil.disk_usage(d).free - leave
                if free <= 0: break
                f.write(b'\0' * min(free, 1 << 16)); f.flush()
        except OSError: pass


def test_segment_out_on_a_read_only_file_system(files, capsys, tmpfs):
    ro = tmpfs('ro', ro=True)
    code, out, err = run(capsys, *_seg(files, '--out', ro/'p.nii.gz'))
    assert code == 2 and 'Read-only file system' in one_line(err, ro/'p.nii.gz')


def test_segment_out_on_a_full_disk(files, capsys, tmpfs):
    full = tmpfs('full'); _fill(full)
    code, out, err = run(capsys, *_seg(files, '--out', full/'p.nii.gz'))
    assert code == 2 and 'No space left on device' in one_line(err, full/'p.nii.gz')
    assert not (full/'p.nii.gz').exists() and _no_temporaries(full)


def test_preprocess_disk_full_mid_way_then_the_rerun_finishes(files, capsys, tmpfs):
    full = tmpfs('full', '512k'); _fill(full, leave=90_000)  # room for a case or two, not six
    args = ['preprocess', files/'data', full/'pp', '--dataset', 'phantom', '--size', 48, '--quiet']
    code, out, err = run(capsys, *args)
    assert code == 2 and 'No space left on device' in one_line(err, full/'pp')
    assert _no_temporaries(full) and not (full/'pp'/'manifest.json').exists()
    for p in (full/'pp').glob('*.nii.gz'): assert read_nifti(p, dtype=None)[0].shape[1:] == (48, 48)  # what is there is whole
    (full/'filler').unlink()
    code, out, err = run(capsys, *args)
    assert code == 0 and (full/'pp'/'manifest.json').is_file(), err


def test_supervoxels_out_and_cache_on_full_and_read_only_disks(files, capsys, tmpfs, monkeypatch, recwarn):
    full, ro = tmpfs('full'), tmpfs('ro', ro=True); _fill(full)
    monkeypatch.setenv('FSMIS_CACHE', str(ro/'cache'))  # a read-only cache: computed without it, said once
    code, out, err = run(capsys, 'supervoxels', files/'data', '--out', files/'sv_ok', '--quiet', '--workers', 1, '--rho', 300)
    assert code == 0 and len(list((files/'sv_ok').glob('*.nii.gz'))) == 6, err
    assert [str(w.message) for w in recwarn if 'computing without the cache' in str(w.message)].__len__() == 1
    code, out, err = run(capsys, 'supervoxels', files/'data', '--out', full/'sv', '--quiet', '--workers', 1, '--rho', 300)
    assert code == 2 and 'No space left on device' in one_line(err, full/'sv') and _no_temporaries(full)


# the same faults without a mount: a writer that fails as a full or read-only disk would
@pytest.mark.parametrize('err_no, text', [(errno.ENOSPC, 'No space left on device'), (errno.EROFS, 'Read-only file system'),
                                          (errno.EACCES, 'Permission denied')])
def test_write_faults_are_one_line_naming_the_output(files, capsys, monkeypatch, err_no, text):
    import fsmis.data.io as io
    real = io.nib.save
    def failing_save(img, path):  # half the file written, then the disk refuses
        real(img, path); Path(path).write_bytes(Path(path).read_bytes()[:100]); raise OSError(err_no, os.strerror(err_no))
    monkeypatch.setattr(io.nib, 'save', failing_save)
    out = files/'fault.nii.gz'
    code, _, err = run(capsys, *_seg(files, '--out', out))
    assert code == 2 and text in one_line(err, out) and not out.exists() and _no_temporaries(files)


def test_read_only_folder_without_a_mount(files, capsys, monkeypatch):
    import fsmis.core as core
    def refuse(*a, **k): raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(core.tempfile, 'mkstemp', refuse)
    code, _, err = run(capsys, 'evaluate', files/'model.pth', '--dataset', files/'data', '--protocol', 'EP2', '--quiet', '--out', files/'ev')
    assert code == 2 and 'Read-only file system' in one_line(err, files/'ev')


def test_unwritable_cache_computes_without_it_and_says_so_once(files, capsys, tmp_path, monkeypatch, recwarn):
    blocker = tmp_path/'cache_is_a_file'; blocker.write_text('x')
    monkeypatch.setenv('FSMIS_CACHE', str(blocker))
    for k in range(2):
        code, out, err = run(capsys, 'supervoxels', files/'data', '--out', tmp_path/f'sv{k}', '--quiet', '--workers', 1, '--rho', 300, '--cases', 1, 2)
        assert code == 0 and len(list((tmp_path/f'sv{k}').glob('*.nii.gz'))) == 2, err
    assert len([w for w in recwarn if 'computing without the cache' in str(w.message)]) == 1


def test_reproduce_out_is_a_file(files, capsys):
    code, _, err = run(capsys, 'reproduce', 'adnet-phantom-ep2', '--out', files/'notes.txt', '--minutes', '0.01')
    assert code == 2 and 'notes.txt' in one_line(err)
    assert (files/'notes.txt').read_text() == 'not a scan'


# Bounded inputs: refused up front against the bounds of fsmis.core (MAX_SIZE, MAX_VOXELS, MAX_CONFIG_BYTES), memory
# cases in a subprocess under an address-space limit, so that a failing test cannot take the machine down.
@pytest.mark.parametrize('cmd', [['demo'], ['preprocess', 'a', 'b'], ['train'], ['evaluate', 'x.pth'], ['segment', 'a', 'b', 'c'],
                                 ['pretrain', 'densecl', 'phantom', '--steps', '1'], ['ablate', 'phantom-losses']])
def test_size_is_bounded_everywhere(cmd, capsys):
    from fsmis.core import MAX_SIZE
    code, _, err = run(capsys, *cmd, '--size', MAX_SIZE + 1)
    assert code == 2 and f'<= {MAX_SIZE}' in one_line(err, '--size')
    _, out, _ = run(capsys, *cmd[:1], '--help')
    assert f'at most {MAX_SIZE}' in ' '.join(out.split())  # documented


def _limited(args, gb=6, timeout=120):
    "`fsmis ARGS` in a subprocess under RLIMIT_AS: (exit code, stderr)."
    code = (f"import resource, sys; lim = {gb} * 2**30; resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n"
            f"from fsmis.cli import main; sys.exit(main({[str(a) for a in args]!r}))")
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'})
    return p.returncode, p.stderr


def test_memory_forged_nifti_header_is_refused_before_reading(files):
    code, err = _limited(['segment', files/'forged.nii.gz', files/'data'/'image_2.nii.gz', files/'data'/'label_2.nii.gz',
                          '--checkpoint', files/'model.pth', '--device', 'cpu', '--out', files/'forged_out.nii.gz'])
    assert code == 2 and 'header claims' in one_line(err, 'forged.nii.gz')


def test_memory_absurd_spacing_is_refused_by_preprocess(files, tmp_path):
    img, _, aff = read_nifti(files/'data'/'image_1.nii.gz')
    (tmp_path/'raw').mkdir(); write_nifti(tmp_path/'raw'/'image_1.nii.gz', img, spacing=(5000., 5000., 5000.))  # 4 km voxels
    code, err = _limited(['preprocess', tmp_path/'raw', tmp_path/'pp', '--no-labels', '--dataset', 'chaos_t2', '--quiet'])
    assert code == 2 and 'MAX_VOXELS' in one_line(err, 'image_1.nii.gz')


def test_memory_phantom_cases_are_bounded(tmp_path):
    code, err = _limited(['demo', '--n-cases', 100_000, '--out', tmp_path/'demo', '--quiet'])
    assert code == 2 and 'MAX_VOXELS' in one_line(err, 'n_cases') and not (tmp_path/'demo').exists()
    from fsmis.data.datasets import open_dataset
    with pytest.raises(ValueError, match='MAX_VOXELS'): open_dataset('phantom', n_cases=10, shape=(4000, 4000, 4000))  # refused before any case is made


def test_memory_yaml_billion_laughs_is_refused(tmp_path):
    lol = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lol += [f'{c}: &{c} [{", ".join([f"*{p}"] * 9)}]' for p, c in zip('abcdefgh', 'bcdefghi')]
    (tmp_path/'laughs.yaml').write_text('\n'.join(lol) + '\nname: *i\n')
    code, err = _limited(['train', '--config', tmp_path/'laughs.yaml', '--dataset', 'phantom'], timeout=60)
    assert code == 2 and 'aliases' in one_line(err, 'laughs.yaml')
    (tmp_path/'big.yaml').write_text('# padding\n' * 200_000)
    code, err = _limited(['train', '--config', tmp_path/'big.yaml'], timeout=60)
    assert code == 2 and 'MAX_CONFIG_BYTES' in one_line(err, 'big.yaml')


# Configs and checkpoints validated at the boundary
@pytest.mark.parametrize('text, field', [('classes: liver', 'classes'), ('dataset_kw: [1, 2]', 'dataset_kw'), ('minutes: .inf', 'minutes'),
                                         ('lr: 1e400', 'lr'), ('size: 100000', 'size'), ('folds: [9]', 'folds'), ('n_steps: 1e30', 'n_steps'),
                                         ('encoder: [small]', 'encoder'), ('thresholds: [a, b]', 'thresholds'), ('num_threads: -1', 'num_threads'),
                                         ('learner_kw: 3', 'learner_kw'), ('name: {a: 1}', 'name')])
def test_config_types_and_ranges(text, field, tmp_path, capsys):
    from fsmis.config import ExperimentConfig
    (tmp_path/'c.yaml').write_text(text + '\n')
    with pytest.raises(ValueError, match=f'c.yaml: {field}'): ExperimentConfig.load(tmp_path/'c.yaml')
    code, _, err = run(capsys, 'train', '--config', tmp_path/'c.yaml', '--checkpoints', tmp_path/'ck')
    assert code == 2 and field in one_line(err, 'c.yaml') and not (tmp_path/'ck').exists()


@pytest.mark.parametrize('field, value', [('classes', ['liver']), ('classes', {'1': 'liver'}), ('size', 'large'), ('size', 10**7),
                                          ('norm', {'kind': 'global', 'mean': float('nan'), 'std': 1.}), ('norm', 'zscore'),
                                          ('model_kind', ['adnet']), ('model_config', {'encoder': 'small', 'wings': 2}),
                                          ('model_config', ['small']), ('fold', -1), ('n_folds', 'five'), ('precision', 'fp8'),
                                          ('dataset', 3), ('model_kind', 'unet')])
def test_edited_checkpoint_metadata(field, value, files, tmp_path, capsys):
    from fsmis.learner import load_model
    ck = torch.load(files/'model.pth', weights_only=True); ck[field] = value
    torch.save(ck, tmp_path/'edited.pth')
    with pytest.raises(ValueError, match=r"edited\.pth.*" + field): load_model(tmp_path/'edited.pth', 'cpu')
    code, _, err = run(capsys, *_seg(files, '--out', tmp_path/'o.nii.gz', ck=tmp_path/'edited.pth'))
    assert code == 2 and field in one_line(err, 'edited.pth') and not (tmp_path/'o.nii.gz').exists()


def test_resume_from_edited_checkpoint(files, tmp_path):
    from fsmis.data.phantom import toy_dls
    from fsmis.learner import adnet_learner, load_checkpoint
    ck = torch.load(files/'model.pth', weights_only=True); ck['iteration'] = 'ten'
    torch.save(ck, tmp_path/'edited.pth')
    learn = adnet_learner(toy_dls(4, size=32), 'small', path=tmp_path)
    with pytest.raises(ValueError, match=r"edited\.pth: field 'iteration'"): load_checkpoint(learn, tmp_path/'edited.pth')


# Resumes that mean what they say
def test_pretrain_resume_with_more_steps_continues(files, tmp_path, capsys):
    from fsmis.pretrain.densecl import read_encoder_meta
    from fsmis.learner import list_checkpoints
    base = ['pretrain', 'densecl', files/'data', '--size', 32, '--out', tmp_path/'enc.pth', '--quiet', '--device', 'cpu']
    code, _, err = run(capsys, *base, '--steps', 3, '--checkpoint-every', 1)
    assert code == 0, err
    assert [p.name for p in list_checkpoints(tmp_path/'enc_checkpoints')] == ['iter_0000002.pth', 'iter_0000003.pth']  # every step
    code, _, err = run(capsys, *base, '--steps', 5, '--resume', 'last')
    assert code == 0, err
    assert read_encoder_meta(tmp_path/'enc.pth')['steps'] == 5 and list_checkpoints(tmp_path/'enc_checkpoints')[-1].name == 'iter_0000005.pth'


def test_checkpoint_every_is_one_option_for_train_and_pretrain():
    from fsmis.cli import build_parser
    p = build_parser()
    subs = next(a for a in p._actions if a.dest == 'cmd').choices
    acts = [next(a for a in subs[c]._actions if a.dest == 'checkpoint_every') for c in ('train', 'pretrain')]
    assert acts[0].default == acts[1].default is None and acts[0].help == acts[1].help
    def parsed(t, s):
        try: return t(s)
        except Exception as e: return type(e).__name__
    for s in ('1', '250', '0', '-3', '2.5', 'x', str(2**40)): assert parsed(acts[0].type, s) == parsed(acts[1].type, s), s  # one type


# Failed commands leave no state that blocks the corrected one
def test_ablate_bad_folds_leaves_nothing_then_the_right_command_runs(tmp_path, capsys):
    out = tmp_path/'abl'
    code, _, err = run(capsys, 'ablate', 'phantom-losses', '--steps', 1, '--size', 32, '--folds', 7, '--out', out, '--quiet')
    assert code == 2 and 'folds' in one_line(err) and not out.exists()


def test_ablation_leftovers_of_a_failed_grid_do_not_block(tmp_path):
    import json
    from fsmis.ablate import run_ablation, ablation_cells
    out = tmp_path/'abl'; out.mkdir()
    stale = ablation_cells('phantom-losses', folds=[1], over={'n_steps': 1, 'minutes': None, 'size': 32})
    (out/'ablation.json').write_text(json.dumps(dict(name='phantom-losses', budget='cpu', folds=[1], runs=None, minutes=30., over={},
                                                     cells=[dict(index=c.index, folder=c.folder) for c in stale])))
    (out/stale[0].folder).mkdir(); (out/stale[0].folder/'config.yaml').write_text('half a cell')  # a cell that failed
    run_ablation('phantom-losses', out, folds=[0], cells=[], progress=False)  # the corrected grid is accepted
    assert json.loads((out/'ablation.json').read_text())['folds'] == [0] and not (out/stale[0].folder).exists()
    (out/'x_done').mkdir(); (out/'x_done'/'done.json').write_text('{}')  # once a cell has finished, another grid is refused
    d = json.loads((out/'ablation.json').read_text()); d['cells'].append(dict(index=99, folder='x_done')); (out/'ablation.json').write_text(json.dumps(d))
    with pytest.raises(ValueError, match='other options'): run_ablation('phantom-losses', out, folds=[1], cells=[], progress=False)


# Caches validated against what they claim
@pytest.mark.parametrize('poison', ['shape', 'negative', 'float', 'key'])
def test_supervoxel_cache_entry_that_lies_is_recomputed(tmp_path, poison):
    from fsmis.data.phantom import make_phantom
    from fsmis.data.supervoxels import cached_supervoxels
    c = make_phantom(0, (6, 32, 32))
    a = cached_supervoxels(c.image, c.spacing, rho=100, cache_dir=tmp_path)
    (f,) = tmp_path.glob('*.npz')
    other = make_phantom(1, (6, 32, 32))
    bad = {'shape': a[:3], 'negative': -a, 'float': a.astype(np.float32) + .5, 'key': None}[poison]
    if bad is None:  # another volume's entry copied onto this key: right shape, wrong labels
        b = cached_supervoxels(other.image, other.spacing, rho=100, cache_dir=tmp_path)
        (g,) = [p for p in tmp_path.glob('*.npz') if p != f]; g.replace(f)
        assert not np.array_equal(a, b) and a.shape == b.shape
    else: np.savez_compressed(f, labels=bad, key=np.array(f.stem))
    b = cached_supervoxels(c.image, c.spacing, rho=100, cache_dir=tmp_path)
    assert np.array_equal(a, b) and np.array_equal(np.load(f)['labels'], a)


def test_supervoxels_cli_with_a_poisoned_cache_writes_the_right_shape(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('FSMIS_CACHE', str(tmp_path/'cache'))
    args = ['supervoxels', files/'data', '--quiet', '--workers', 1, '--rho', 300, '--cases', 1]
    assert run(capsys, *args, '--out', tmp_path/'a')[0] == 0
    for f in (tmp_path/'cache'/'supervoxels').glob('*.npz'): np.savez_compressed(f, labels=np.zeros((2, 3, 4), np.int32))
    assert run(capsys, *args, '--out', tmp_path/'b')[0] == 0
    img = read_nifti(files/'data'/'image_1.nii.gz')[0]
    assert read_nifti(tmp_path/'b'/'superpix-MIDDLE_1.nii.gz', dtype=None)[0].shape == img.shape


# The widget's own inputs; models given tasks they cannot take
@pytest.mark.parametrize('kw, text', [(dict(mask='nan'), 'NaN'), (dict(mask=-1), 'labels [-1]'), (dict(mask=7), 'labels [7]'),
                                      (dict(mask=0.5), 'fractional'), (dict(classes={0: 'bg'}), '1..255'), (dict(classes={1000: 'x'}), '1..255'),
                                      (dict(classes={'1': 'liver'}), '1..255')])
def test_label_widget_refuses_bad_masks_and_classes(kw, text):
    pytest.importorskip('ipympl')
    from fsmis.label import LabelWidget
    img = np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32)
    if 'mask' in kw: kw['mask'] = np.full(img.shape, np.nan if kw['mask'] == 'nan' else kw['mask'])
    with pytest.raises(ValueError, match=text.replace('[', r'\[')): LabelWidget(img, **kw)


@pytest.mark.parametrize('kind', ['adnet', 'alpnet', 'panet'])
def test_forward_with_support_and_query_of_different_sizes(kind):
    from fsmis.learner import build_model
    model = build_model(kind, encoder='small')
    s, m, q = _task(size=32)
    with pytest.raises(ValueError, match='same size'): model(s[None], m[:, 0][None], torch.randn(1, 2, 1, 48, 48))
    assert model.predict(s, m, torch.randn(2, 1, 48, 48)).shape[-2:] == (48, 48)  # one task: any sizes


@pytest.mark.parametrize('text', ['{"name": "phantom-losses", "cells": [', '[1, 2]', '{"cells": 5}', '\xff\xfe'])
def test_ablate_edited_record_is_named(text, tmp_path, capsys):
    out = tmp_path/'abl'; out.mkdir(); (out/'ablation.json').write_bytes(text.encode('latin-1'))
    code, _, err = run(capsys, 'ablate', 'phantom-losses', '--steps', 1, '--size', 32, '--out', out, '--cell', 0, '--quiet')
    assert code == 2 and 'ablation.json' in one_line(err)


def test_config_with_keys_that_are_not_names(tmp_path, capsys):
    (tmp_path/'k.yaml').write_text('1: 2\nmethd: adnet\n')
    code, _, err = run(capsys, 'train', '--config', tmp_path/'k.yaml')
    assert code == 2 and 'unknown config keys' in one_line(err, 'k.yaml')


def test_resume_from_a_model_file_is_named(files, capsys, tmp_path):
    from fsmis.learner import load_model, save_model
    save_model(load_model(files/'model.pth', 'cpu'), tmp_path/'weights_only.pth')
    code, _, err = run(capsys, 'train', '--dataset', files/'data', '--iters', 2, '--size', 32, '--rho', 300, '--device', 'cpu', '--quiet',
                       '--workers', 1, '--checkpoints', tmp_path/'ck', '--resume', tmp_path/'weights_only.pth')
    assert code == 2 and 'not a training checkpoint' in one_line(err, 'weights_only.pth')
