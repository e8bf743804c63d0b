"""The package's structure, checked: no import cycle (function-level imports included), one training path that gives
bit-identical weights whoever calls it, one Setting 2 filter, and one default source for rho."""
import ast, shutil
from pathlib import Path
import numpy as np
import pytest
import torch

import fsmis
PKG = Path(fsmis.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix('')
    parts = list(rel.parts)
    if parts[-1] == '__init__': parts = parts[:-1]
    return '.'.join(parts)


def import_graph() -> dict:
    "{module: {imported fsmis modules}} from every import statement of the package, at any depth (functions included)."
    mods = {_module_name(p): p for p in PKG.rglob('*.py')}
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == '__init__.py'
        base = name.split('.') if is_pkg else name.split('.')[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    root = base[:len(base) - (node.level - 1)]
                    mod = '.'.join(root + ([node.module] if node.module else []))
                else: mod = node.module or ''
                targets = [mod] + [f'{mod}.{a.name}' for a in node.names]
            else: continue
            for t in targets:
                while t and t not in mods: t = t.rpartition('.')[0]  # the deepest module that exists
                if t and t != name and t.startswith('fsmis'): deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph):
    "One import cycle as a list of modules, or None."
    state, stack = {}, []
    def visit(n):
        state[n] = 1; stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1: return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c: return c
        state[n] = 2; stack.pop()
    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c: return c


def test_no_import_cycle():
    g = import_graph()
    assert 'fsmis.train' in g and 'fsmis.data.datasets' in g['fsmis.train']  # the walker sees the package
    assert find_cycle(g) is None, ' -> '.join(find_cycle(g))
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']  # the check can fail


def test_layers_point_down():
    "eval imports no training code; data imports no model, evaluation or training code (only core and the figures of viz); viz only core; io only core."
    g = import_graph()
    training = {'fsmis.learner', 'fsmis.train', 'fsmis.experiments', 'fsmis.cli', 'fsmis.demo', 'fsmis.losses'}
    for m, deps in g.items():
        if m.startswith('fsmis.eval'): assert not deps & training, (m, deps & training)
        if m.startswith('fsmis.data'): assert not {d for d in deps if not d.startswith(('fsmis.data', 'fsmis.core', 'fsmis.viz'))}, (m, deps)
    assert g['fsmis.viz'] <= {'fsmis.core'}, g['fsmis.viz']
    assert g['fsmis.data.io'] <= {'fsmis.core'}
    assert not g['fsmis.eval.inference'] & training


@pytest.fixture(scope='module')
def phantom_folder(tmp_path_factory):
    from fsmis.data.phantom import PhantomDataset
    d = tmp_path_factory.mktemp('phantoms')
    PhantomDataset(n_cases=6, seed=5, shape=(10, 48, 48), spacing=(4., 3., 3.)).to_folder(d)
    return d


def _state(sd): return {k: v.detach().cpu().clone() for k, v in sd.items()}


def test_three_callers_one_training(phantom_folder, tmp_path, monkeypatch):
    "The same configuration and seed through `fsmis train`, the demo's training and `run_experiment`: bit-identical weights."
    from fsmis.cli import main
    from fsmis.config import ExperimentConfig
    from fsmis.data.folds import fold_split
    from fsmis.demo import demo_dataset, train_demo
    from fsmis.experiments import run_experiment
    monkeypatch.setenv('FSMIS_CACHE', str(tmp_path/'cache'))
    torch.set_num_threads(1)
    common = dict(steps=20, size=32, lr=1e-2, rho=300, seed=0)
    ck = tmp_path/'ck'
    assert main(['train', '--dataset', str(phantom_folder), '--fold', '0', '--iters', '20', '--size', '32', '--lr', '0.01',
                 '--rho', '300', '--seed', '0', '--device', 'cpu', '--checkpoints', str(ck), '--quiet']) == 0
    a = torch.load(ck/'final.pth', weights_only=True)['model']
    cfg = ExperimentConfig(name='x', dataset=str(phantom_folder), folds=[0], runs=1, n_steps=20, size=32, lr=1e-2, rho=300,
                           seed=0, device='cpu', protocols=['EP2'], baselines=[])
    run_experiment(cfg, tmp_path/'exp', progress=False)
    b = torch.load(tmp_path/'exp'/'model_fold0_run0.pth', weights_only=True)['model']
    ds = demo_dataset(phantom_folder, n_cases=None)
    split = fold_split(ds.case_ids, 0)
    learn, _, _ = train_demo(ds, split.train_ids, n_steps=20, size=32, lr=1e-2, seed=0, device='cpu', rho=300, progress=False)
    c = _state(learn.model.state_dict())
    assert a.keys() == b.keys() == c.keys()
    for k in a: assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
    learn2, _, _ = train_demo(ds, split.train_ids, n_steps=20, size=32, lr=1e-2, seed=1, device='cpu', rho=300, progress=False)
    assert any(not torch.equal(c[k], v.cpu()) for k, v in learn2.model.state_dict().items())  # the check can fail


def test_setting2_training_uses_the_documented_filter(monkeypatch):
    import fsmis.data.episodes as E, fsmis.data.folds as Fo
    from fsmis.config import ExperimentConfig
    from fsmis.data.datasets import open_dataset
    from fsmis.train import train_fold
    assert E.setting_keep is Fo.setting_keep
    calls = []
    def spy(label, test_classes, setting=1):
        calls.append((tuple(test_classes), setting)); return Fo.setting_keep(label, test_classes, setting)
    monkeypatch.setattr(E, 'setting_keep', spy)
    torch.set_num_threads(1)
    ds = open_dataset('phantom', n_cases=4, shape=(16, 48, 48))
    cfg = ExperimentConfig(dataset='phantom', n_steps=1, size=32, rho=200, setting=2, classes=['right kidney', 'left kidney'])
    train_fold(cfg, ds, ['1', '2', '3'], seed=0)
    assert calls and all(c == ((2, 3), 2) for c in calls)


class _Stop(Exception): pass


def _registered_folder(root, name, codes):
    "A folder named like a registered dataset, holding phantom scans with that dataset's raw label codes."
    from fsmis.data.phantom import PhantomDataset
    from fsmis.data.io import write_nifti
    d = root/name; d.mkdir()
    for c in PhantomDataset(n_cases=6, seed=1, shape=(8, 32, 32)).cases(normalize=False):
        write_nifti(d/f'image_{c.case_id}.nii.gz', c.image, c.affine)
        write_nifti(d/f'label_{c.case_id}.nii.gz', np.vectorize(codes.get)(c.label).astype(np.int16), c.affine)
    return d


@pytest.mark.parametrize('name,codes,rho', [('chaos_t2', {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}, 5000),
                                            ('ms_cmrseg_bssfp', {0: 0, 1: 500, 2: 200, 3: 600, 4: 0}, 1000)])
def test_rho_default_is_the_datasets_on_every_route(name, codes, rho, tmp_path, monkeypatch):
    import fsmis.data.supervoxels as S
    from fsmis.cli import main
    d = _registered_folder(tmp_path, name, codes)
    seen = []
    def fake(volume, spacing, mode, r, kw, path): seen.append(r); raise _Stop()
    monkeypatch.setattr(S, '_compute_and_store', fake)
    monkeypatch.setenv('FSMIS_CACHE', str(tmp_path/'cache'))
    routes = [['supervoxels', str(d), '--workers', '1'], ['supervoxels', str(d), '--cases', '2', '3', '--workers', '1'],
              ['train', '--dataset', str(d), '--iters', '1', '--workers', '1', '--checkpoints', str(tmp_path/'ck'), '--quiet']]
    for args in routes:
        with pytest.raises(_Stop): main(args)
    assert seen == [rho] * 3 and all(type(r) is int for r in seen)


def _tiny_model(seed=0, **meta):
    from fsmis.learner import build_model
    torch.manual_seed(seed)
    m = build_model('adnet', encoder='small').eval()
    m.fsmis_meta.update(meta)
    return m


def _write_pair(folder, ds, ids):
    "Raw (unnormalized) image and label files of `ids`, as a user would hand them to `fsmis segment`."
    from fsmis.data.io import write_nifti
    for cid in ids:
        c = ds.load(cid, normalize=False)
        write_nifti(folder/f'image_{cid}.nii.gz', c.image.astype(np.float32), c.affine)
        write_nifti(folder/f'label_{cid}.nii.gz', c.label.astype(np.uint8), c.affine)


@pytest.mark.parametrize('norm', ['volume', 'global'])
def test_segment_writes_what_evaluate_scores(tmp_path, norm):
    "For one class, the label map `fsmis segment` writes equals the mask `evaluate` scores (same support slice, normalization from the checkpoint)."
    from fsmis.data.datasets import open_dataset
    from fsmis.data.io import read_nifti
    from fsmis.eval.inference import segment_files, encode_volume, predict_tasks, eval_mode
    from fsmis.eval.protocols import ep2_tasks
    torch.set_num_threads(1)
    ds = open_dataset('phantom', n_cases=3, shape=(12, 48, 48))
    if norm == 'global': ds.spec = __import__('dataclasses').replace(ds.spec, modality='CT'); ds.fit_norm(['3'])
    model = _tiny_model(norm=ds.norm_params())
    _write_pair(tmp_path, ds, ['1', '2'])
    sup, qry = ds.load('1'), ds.load('2')
    for c in (1, 3):
        one = (sup.label == c).astype(np.uint8)
        from fsmis.data.io import write_nifti
        write_nifti(tmp_path/f'mask{c}.nii.gz', one, sup.affine)
        r = segment_files(model, tmp_path/'image_2.nii.gz', tmp_path/'image_1.nii.gz', tmp_path/f'mask{c}.nii.gz', tmp_path/f'p{c}.nii.gz')
        written = read_nifti(tmp_path/f'p{c}.nii.gz', dtype=None)[0]
        tasks = ep2_tasks(sup.label, qry.label, c)
        assert r['slice'] == tasks[0].sup_slices[0]  # one support-slice rule
        with eval_mode(model):
            scored = predict_tasks(model, encode_volume(model, qry.image), qry.image.shape[1:], sup.image, sup.label, tasks)[c]
        assert written.shape == scored.shape and written.any()
        np.testing.assert_array_equal(written > 0, scored > 0)
    # the check can fail: another normalization gives another map
    segment_files(model, tmp_path/'image_2.nii.gz', tmp_path/'image_1.nii.gz', tmp_path/'mask3.nii.gz', tmp_path/'q.nii.gz',
                  norm={'kind': 'global', 'mean': 0., 'std': 1e3})
    assert not np.array_equal(read_nifti(tmp_path/'q.nii.gz', dtype=None)[0], written)


def test_multiclass_output_is_defined_on_the_binary_tasks():
    "segment_volume = per-class binary tasks merged by the largest foreground margin; one class = the binary mask."
    from fsmis.data.datasets import open_dataset
    from fsmis.eval.inference import segment_volume, predict_tasks, encode_volume, eval_mode, Task, labels_from_margins
    torch.set_num_threads(1)
    ds = open_dataset('phantom', n_cases=2, shape=(8, 48, 48))
    sup, qry = ds.load('1'), ds.load('2')
    m = _tiny_model()
    z = 4
    lab = segment_volume(m, qry.image, sup.image[z], sup.label[z])
    cls = [int(c) for c in np.unique(sup.label[z]) if c]
    with eval_mode(m):
        qf = encode_volume(m, qry.image)
        mg = predict_tasks(m, qf, qry.image.shape[1:], sup.image[z][None], sup.label[z][None], [Task(c, [0], np.arange(8)) for c in cls], scores=True)
        bins = predict_tasks(m, qf, qry.image.shape[1:], sup.image[z][None], sup.label[z][None], [Task(c, [0], np.arange(8)) for c in cls])
    np.testing.assert_array_equal(lab, labels_from_margins(mg))
    for c in cls: np.testing.assert_array_equal(bins[c] > 0, mg[c] > 0)
    one = segment_volume(m, qry.image, sup.image[z], (sup.label[z] == cls[0]) * cls[0])
    np.testing.assert_array_equal(one > 0, bins[cls[0]] > 0)
    assert set(np.unique(lab)) <= {0, *cls}


def test_every_run_model_loads_without_method(tmp_path, monkeypatch):
    "Every model file `run_experiment` writes loads with `fsmis segment` and `fsmis evaluate` as is; old bare files need --method."
    from fsmis.cli import main
    from fsmis.config import ExperimentConfig
    from fsmis.experiments import run_experiment
    from fsmis.data.datasets import open_dataset
    monkeypatch.setenv('FSMIS_CACHE', str(tmp_path/'cache'))
    torch.set_num_threads(1)
    cfg = ExperimentConfig(name='x', dataset='phantom', dataset_kw=dict(n_cases=6, shape=(10, 48, 48)), folds=[0], runs=1, n_steps=2,
                           size=32, rho=300, device='cpu', protocols=['EP2'], baselines=[], method='panet', pseudo_labels='superpixels',
                           encoder='small')
    run_experiment(cfg, tmp_path/'exp', progress=False)
    f = tmp_path/'exp'/'model_fold0_run0.pth'
    ck = torch.load(f, weights_only=True)
    assert ck['model_kind'] == 'panet' and ck['size'] == 32 and ck['norm'] == {'kind': 'volume'} and ck['fold'] == 0
    ds = open_dataset('phantom', n_cases=6, shape=(10, 48, 48))
    _write_pair(tmp_path, ds, ['1', '2'])
    assert main(['segment', str(tmp_path/'image_2.nii.gz'), str(tmp_path/'image_1.nii.gz'), str(tmp_path/'label_1.nii.gz'),
                 '--checkpoint', str(f), '--out', str(tmp_path/'p.nii.gz'), '--device', 'cpu']) == 0
    bare = tmp_path/'bare.pth'; torch.save(ck['model'], bare)  # how fsmis < 0.3 wrote a run's model
    assert main(['segment', str(tmp_path/'image_2.nii.gz'), str(tmp_path/'image_1.nii.gz'), str(tmp_path/'label_1.nii.gz'),
                 '--checkpoint', str(bare), '--out', str(tmp_path/'b.nii.gz'), '--device', 'cpu']) == 2
    assert main(['segment', str(tmp_path/'image_2.nii.gz'), str(tmp_path/'image_1.nii.gz'), str(tmp_path/'label_1.nii.gz'),
                 '--checkpoint', str(bare), '--method', 'panet', '--out', str(tmp_path/'b.nii.gz'), '--device', 'cpu']) == 0


def test_training_reaches_factories_through_the_registry(monkeypatch):
    "`train_fold` builds its learner from `LEARNERS[cfg.method]`, not from a built name."
    import fsmis.learner as L
    from fsmis.config import ExperimentConfig
    from fsmis.data.datasets import open_dataset
    from fsmis.train import train_fold
    seen = []
    real = L.LEARNERS['adnet']
    monkeypatch.setitem(L.LEARNERS, 'adnet', lambda *a, **k: seen.append(k) or real(*a, **k))
    torch.set_num_threads(1)
    ds = open_dataset('phantom', n_cases=3, shape=(8, 48, 48))
    learn = train_fold(ExperimentConfig(dataset='phantom', n_steps=1, size=32, rho=200), ds, ['1', '2'], seed=0)
    assert len(seen) == 1 and seen[0]['encoder'] == 'small' and learn.iteration == 1
    assert learn.model.fsmis_meta['norm'] == {'kind': 'volume'} and learn.model.fsmis_meta['size'] == 32


def test_ct_statistics_come_from_the_training_cases_only(tmp_path, monkeypatch):
    "`fsmis train` on a CT dataset records the statistics of the fold's training cases; `fsmis evaluate` normalizes with them."
    from fsmis.cli import main
    from fsmis.data.datasets import open_dataset
    from fsmis.data.folds import fold_split
    d = _registered_folder(tmp_path, 'synapse_ct', {0: 0, 1: 6, 2: 2, 3: 3, 4: 1})
    monkeypatch.setenv('FSMIS_CACHE', str(tmp_path/'cache'))
    torch.set_num_threads(1)
    assert main(['train', '--dataset', str(d), '--iters', '1', '--size', '32', '--rho', '300', '--workers', '1', '--device', 'cpu',
                 '--checkpoints', str(tmp_path/'ck'), '--quiet']) == 0
    ck = torch.load(tmp_path/'ck'/'final.pth', weights_only=True)
    ds = open_dataset(d)
    train = fold_split(ds.case_ids, 0).train_ids
    mean, std = ds.fit_norm(train)
    assert ck['norm'] == {'kind': 'global', 'mean': mean, 'std': std, 'clip': {'window': [-125.0, 275.0]}}  # clip: the recipe's HU window of raw scans
    assert ds.fit_norm() != (mean, std)  # all cases (test cases included) would give other statistics: the check can fail
    seen = []
    import fsmis.data.datasets as D
    real = D.Dataset.set_norm
    monkeypatch.setattr(D.Dataset, 'set_norm', lambda self, norm: seen.append(norm) or real(self, norm))
    assert main(['evaluate', str(tmp_path/'ck'/'final.pth'), '--dataset', str(d), '--classes', 'liver', '--quiet', '--device', 'cpu']) == 0
    assert seen == [ck['norm']]
