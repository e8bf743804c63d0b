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
    'slice out of range': (lambda f: _seg(f, '--slice', '99', '--out', f/'o10.nii.gz'), '99'),
    'empty slice': (lambda f: _seg(f, '--slice', '0', '--out', f/'o11.nii.gz'), 'slice 0'),
    'bad device': (lambda f: _seg(f, '--device', 'bogus', '--out', f/'o12.nii.gz'), '--device'),
    'negative size': (lambda f: _seg(f, '--size', '-4', '--out', f/'o13.nii.gz'), '--size'),
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
