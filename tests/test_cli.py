"The `fsmis` command line from outside: help, user errors, segment, supervoxels, train/evaluate and a short demo."
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from fsmis.cli import main, build_parser
from fsmis.data.io import read_nifti

COMMANDS = ['demo', 'preprocess', 'supervoxels', 'train', 'evaluate', 'segment', 'pretrain', 'reproduce', 'ablate']


def fsmis(*args, cwd=None, env=None, timeout=600):
    "Run `python -m fsmis.cli ARGS` in a subprocess: CompletedProcess with text stdout/stderr."
    e = {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg', **(env or {})}
    return subprocess.run([sys.executable, '-m', 'fsmis.cli', *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=timeout)


def run_main(capsys, *args):
    "main(args) in-process -> (exit code, stdout, stderr)."
    try: code = main([str(a) for a in args])
    except SystemExit as x: code = x.code
    o = capsys.readouterr()
    return code, o.out, o.err


def one_line_error(err, cmd):
    lines = [l for l in err.strip().splitlines() if l.strip() and 'Warning' not in l and 'warnings.warn' not in l]
    assert len(lines) == 1, err
    assert lines[0].startswith(f'fsmis {cmd}: error:'), err
    assert 'Traceback' not in err
    return lines[0]


@pytest.fixture(scope='module')
def phantom_folder(tmp_path_factory):
    "Six small phantom cases as image_<id>/label_<id> NIfTI files."
    from fsmis.data.phantom import PhantomDataset
    d = tmp_path_factory.mktemp('phantom')
    PhantomDataset(n_cases=6, seed=3, shape=(10, 64, 64), spacing=(4., 3., 3.)).to_folder(d)
    return d


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    "An (untrained) ADNet checkpoint as `fsmis train` / `fsmis demo` write them."
    import torch
    from fsmis.data.phantom import toy_dls
    from fsmis.learner import adnet_learner, save_checkpoint
    torch.manual_seed(0)
    learn = adnet_learner(toy_dls(4, 32), 'small', path=tmp_path_factory.mktemp('ck'))
    return save_checkpoint(learn, Path(learn.path)/'model.pth')


def test_entry_point_help():
    r = fsmis('--help')
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)
    r = fsmis('demo', '--help')
    assert r.returncode == 0 and '--iters' in r.stdout and '--data' in r.stdout and '--device' in r.stdout


def test_cli_page_names_every_subcommand():
    "The command-line page's summary line, the module docstring and its table of commands name every registered subcommand."
    import fsmis.cli as cli
    from fsmis.cli import _SUBCOMMANDS
    nb = json.loads((Path(__file__).parents[1]/'nbs'/'51_cli.ipynb').read_text())
    md = '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    summary = cli.__doc__.split('\n')[0]
    assert set(COMMANDS) <= set(_SUBCOMMANDS)
    for name in _SUBCOMMANDS:
        assert f'| `fsmis {name}` |' in md, f"51_cli.ipynb: no row for `fsmis {name}` in the table of commands"
        assert f' {name} ' in summary.replace('|', ' ').replace('`', ' ').replace(':', ' '), f"cli docstring does not name {name}"


@pytest.mark.parametrize('cmd', COMMANDS)
def test_help(capsys, cmd):
    code, out, _ = run_main(capsys, cmd, '--help')
    assert code == 0 and out.startswith(f'usage: fsmis {cmd}')


def test_no_command(capsys):
    code, out, _ = run_main(capsys)
    assert code == 2 and 'COMMAND' in out


@pytest.mark.parametrize('args', [
    ['segment', 'nope_q.nii.gz', 'nope_s.nii.gz', 'nope_m.nii.gz', '--checkpoint', 'nope.pth'],
    ['supervoxels', 'no_such_folder'],
    ['preprocess', 'no_such_folder', 'out'],
    ['evaluate', 'no_such_checkpoint.pth', '--dataset', 'phantom'],
    ['train', '--config', 'no_such_config.yaml'],
    ['demo', '--data', 'no_such_folder'],
    ['demo', '--iters', 'many'],
    ['reproduce', 'no-such-configuration', '--print-config'],
    ['segment', 'q.nii.gz'],
])
def test_user_errors_in_process(capsys, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, *args)
    assert code == 2
    one_line_error(err, args[0])


def test_user_error_subprocess(tmp_path):
    r = fsmis('segment', 'missing.nii.gz', 'sup.nii.gz', 'mask.nii.gz', '--checkpoint', 'model.pth', cwd=tmp_path)
    assert r.returncode == 2
    one_line_error(r.stderr, 'segment')
    assert 'missing.nii.gz' in r.stderr


def test_segment_phantom(phantom_folder, checkpoint, tmp_path):
    out = tmp_path/'pred.nii.gz'
    q = phantom_folder/'image_1.nii.gz'
    r = fsmis('segment', q, phantom_folder/'image_2.nii.gz', phantom_folder/'label_2.nii.gz', '--checkpoint', checkpoint,
              '--out', out, '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    pred, sp, aff = read_nifti(out, dtype=None)
    img, sp0, aff0 = read_nifti(q)
    assert pred.shape == img.shape and np.allclose(aff, aff0) and sp == sp0
    assert set(np.unique(pred)) <= {0, 1, 2, 3, 4}


def test_segment_user_errors(phantom_folder, checkpoint, tmp_path, capsys):
    base = ['segment', phantom_folder/'image_1.nii.gz', phantom_folder/'image_2.nii.gz', phantom_folder/'label_2.nii.gz',
            '--checkpoint', checkpoint, '--device', 'cpu']
    for extra in (['--slice', '999'], ['--slice', '0', '--out', tmp_path/'p.nii.gz'], ['--out', tmp_path/'p.png']):
        code, _, err = run_main(capsys, *base, *extra)
        assert code == 2, (extra, err)
        one_line_error(err, 'segment')


def test_supervoxels_folder(phantom_folder, tmp_path):
    r = fsmis('supervoxels', phantom_folder, '--out', tmp_path/'sv', '--rho', 300, '--cases', 1, 2, '--workers', 1, '--quiet',
              env={'FSMIS_CACHE': str(tmp_path/'cache')})
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path/'sv').glob('superpix-MIDDLE_*.nii.gz'))
    assert [f.name for f in files] == ['superpix-MIDDLE_1.nii.gz', 'superpix-MIDDLE_2.nii.gz']
    sv, _, aff = read_nifti(files[0], dtype=None)
    img, _, aff0 = read_nifti(phantom_folder/'image_1.nii.gz')
    assert sv.shape == img.shape and np.allclose(aff, aff0) and sv.max() >= 2


def test_superpixels_folder(phantom_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('FSMIS_CACHE', str(tmp_path/'cache'))
    code, out, err = run_main(capsys, 'supervoxels', phantom_folder, '--superpixels', '--min-size', 100,
                                   '--out', tmp_path/'sp', '--cases', 3, '--workers', 1, '--quiet')
    assert code == 0, err
    assert (tmp_path/'sp'/'superpix-SUPERPIX_3.nii.gz').is_file()


def test_train_then_evaluate(phantom_folder, tmp_path):
    env = {'FSMIS_CACHE': str(tmp_path/'cache')}
    ck = tmp_path/'ck'
    r = fsmis('train', '--dataset', phantom_folder, '--fold', 0, '--iters', 4, '--size', 32, '--rho', 300, '--checkpoints', ck,
              '--checkpoint-every', 2, '--workers', 1, '--device', 'cpu', '--quiet', env=env)
    assert r.returncode == 0, r.stderr
    assert (ck/'final.pth').is_file() and (ck/'config.yaml').is_file() and list(ck.glob('iter_*.pth'))
    r = fsmis('train', '--dataset', phantom_folder, '--fold', 0, '--iters', 6, '--size', 32, '--rho', 300, '--checkpoints', ck,
              '--resume', 'last', '--workers', 1, '--device', 'cpu', '--quiet', env=env)
    assert r.returncode == 0, r.stderr
    assert '6 steps' in r.stdout
    r = fsmis('evaluate', ck/'final.pth', '--protocol', 'EP2', '--out', tmp_path/'ev', '--device', 'cpu', '--quiet', env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path/'ev'/'tables.md').is_file() and 'EP2' in r.stdout


def test_reproduce_config(capsys):
    code, out, _ = run_main(capsys, 'reproduce', '--list')
    assert code == 0 and 'adnet-chaos-ep2' in out
    code, out, _ = run_main(capsys, 'reproduce', 'adnet-chaos-ep2', '--budget', 'paper', '--print-config')
    assert code == 0 and 'resnet101' in out and 'n_steps: 50000' in out
    code, out, _ = run_main(capsys, 'reproduce', 'adnet-chaos-ep2', '--budget', 'cpu', '--print-config')
    assert code == 0 and 'encoder: small' in out


def test_demo_end_to_end(tmp_path):
    out = tmp_path/'demo'
    r = fsmis('demo', '--out', out, '--iters', 10, '--n-cases', 5, '--n-queries', 1, '--device', 'cpu', '--quiet',
              env={'FSMIS_CACHE': str(tmp_path/'cache')})
    assert r.returncode == 0, r.stderr
    res = json.loads((out/'results.json').read_text())
    assert set(res['dice']) == {'trained', 'untrained'}
    for m in ('trained', 'untrained'):
        assert set(res['dice'][m]) == {'liver', 'right kidney', 'left kidney', 'spleen', 'mean'}
        assert all(0 <= v <= 100 for v in res['dice'][m].values())
    assert res['n_steps'] == 10 and res['queries'] == ['5'] and res['support'] == '4'
    for f in ('dice.csv', 'dice.md', 'per_volume.csv', 'demo.png', 'model.pth'): assert (out/f).is_file(), f
    assert 'trained' in r.stdout and 'untrained' in r.stdout


@pytest.mark.data
def test_segment_chaos(data_root, checkpoint, tmp_path):
    d = data_root/'chaos_t2'
    out = tmp_path/'chaos_pred.nii.gz'
    r = fsmis('segment', d/'image_1.nii.gz', d/'image_2.nii.gz', d/'label_2.nii.gz', '--checkpoint', checkpoint, '--out', out,
              '--size', 128, '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    pred, _, aff = read_nifti(out, dtype=None)
    img, _, aff0 = read_nifti(d/'image_1.nii.gz')
    assert pred.shape == img.shape and np.allclose(aff, aff0)
    assert set(np.unique(pred)) <= {0, 1, 2, 3, 4}


def _package_files():
    "{path: (size, mtime)} of every file in the installed fsmis package (to check nothing is written there)."
    import fsmis
    root = Path(fsmis.__file__).parent
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob('*') if p.is_file() and '__pycache__' not in p.parts}


def test_segment_bundled_model_phantom(phantom_folder, tmp_path):
    "No --checkpoint: the model shipped in the package segments; the mask has the query's shape and affine."
    from fsmis.eval.inference import bundled_model_path
    assert bundled_model_path().is_file()
    before = _package_files()
    out = tmp_path/'pred.nii.gz'
    q = phantom_folder/'image_1.nii.gz'
    r = fsmis('segment', q, phantom_folder/'image_2.nii.gz', phantom_folder/'label_2.nii.gz', '--out', out, '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    pred, _, aff = read_nifti(out, dtype=None)
    img, _, aff0 = read_nifti(q)
    assert pred.shape == img.shape and np.allclose(aff, aff0)
    assert set(np.unique(pred)) <= {0, 1, 2, 3, 4}
    assert _package_files() == before, 'fsmis segment wrote into the installed package'


@pytest.mark.data
def test_segment_bundled_model_chaos(data_root, tmp_path):
    "No --checkpoint, on a CHAOS case the bundled model was not trained on (case 1, a fold-0 query; support 8)."
    d = data_root/'chaos_t2'
    out = tmp_path/'chaos_pred.nii.gz'
    r = fsmis('segment', d/'image_1.nii.gz', d/'image_8.nii.gz', d/'label_8.nii.gz', '--out', out, '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    pred, _, aff = read_nifti(out, dtype=None)
    img, _, aff0 = read_nifti(d/'image_1.nii.gz')
    assert pred.shape == img.shape and np.allclose(aff, aff0)
    assert {1, 4} <= set(np.unique(pred)) <= {0, 1, 2, 3, 4}   # liver and spleen found


@pytest.mark.data
def test_supervoxels_chaos(data_root, tmp_path):
    r = fsmis('supervoxels', data_root/'chaos_t2', '--out', tmp_path/'sv', '--cases', 1, '--workers', 1, '--quiet',
              env={'FSMIS_CACHE': str(tmp_path/'cache')})
    assert r.returncode == 0, r.stderr
    sv, _, aff = read_nifti(tmp_path/'sv'/'superpix-MIDDLE_1.nii.gz', dtype=None)
    img, _, aff0 = read_nifti(data_root/'chaos_t2'/'image_1.nii.gz')
    assert sv.shape == img.shape and np.allclose(aff, aff0)
    assert 10 <= len(np.unique(sv)) - 1 <= 60  # CHAOS at rho 5000: 20-39 supervoxels in the reference


def test_preprocess_folder(phantom_folder, tmp_path):
    out = tmp_path/'pre'
    r = fsmis('preprocess', phantom_folder, out, '--size', 64, '--quiet')
    assert r.returncode == 0, r.stderr
    man = json.loads((out/'manifest.json').read_text())
    assert man['settings']['dataset'] == 'chaos_t2' and len(man['cases']) == 6
    img, sp, _ = read_nifti(out/'image_1.nii.gz')
    assert img.shape[1:] == (64, 64) and sp[1:] == (1.25, 1.25)
    r = fsmis('preprocess', phantom_folder, out, '--dataset', 'no_such_dataset')
    assert r.returncode == 2
    one_line_error(r.stderr, 'preprocess')


def test_traceback_on_request(monkeypatch, tmp_path):
    "FSMIS_TRACEBACK=1 turns the one-line user error back into the exception (for debugging)."
    from fsmis.cli import main
    missing = str(tmp_path/'nope.nii.gz')
    args = ['segment', missing, missing, missing, '--checkpoint', missing, '--out', str(tmp_path/'o.nii.gz')]
    assert main(args) == 2
    monkeypatch.setenv('FSMIS_TRACEBACK', '1')
    from fsmis.cli import UserError
    with pytest.raises((UserError, FileNotFoundError, ValueError)): main(args)
