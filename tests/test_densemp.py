"""DenseMP stages 2-3 (fsmis.train): the pipeline resumes at the interrupted stage, and the protocol is honest
(no checkpoint chosen on the test fold, fine-tuning labels only from the training label group of the training cases,
under Setting 2 no training slice holds a test organ)."""
import dataclasses, subprocess, sys
import numpy as np
import pytest
import torch
from fsmis.config import ExperimentConfig
from fsmis.data.datasets import open_dataset
from fsmis.data.folds import fold_split
import fsmis.data.episodes as E
import fsmis.learner as L
import fsmis.train as DM
import fsmis.pretrain.densecl as D
import fsmis.train as T
from fsmis.experiments import run_experiment

PH = dict(n_cases=8, shape=(16, 96, 96))


def _cfg(**kw):
    d = dict(name='dm', dataset='phantom', dataset_kw=PH, method='panet', pseudo_labels='superpixels', protocols=['ouyang'],
             fold_variant='ouyang', setting=2, label_groups=['lower'], folds=[0], n_folds=3, runs=1, size=32, lr=1e-2,
             n_steps=12, finetune_steps=6, finetune_lr=1e-3, pretrain_steps=2, pretrain_kw=dict(size=32, bs=4, queue=16, grid=4),
             baselines=[], thresholds=[], device='cpu', dls_kw=dict(min_pixels=20))
    d.update(kw)
    return ExperimentConfig(**d)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch, tmp_path):
    monkeypatch.setenv('FSMIS_CACHE', str(tmp_path/'cache'))
    torch.set_num_threads(1)


def _ds(): return open_dataset('phantom', **PH)


def _state(path): return L.read_checkpoint(path)['model']


def test_interrupted_pipeline_continues_at_the_interrupted_stage(tmp_path, monkeypatch):
    cfg = _cfg()
    run_experiment(cfg, tmp_path/'ref', dataset=_ds(), progress=False)  # uninterrupted
    real_save = L.Checkpointer._save
    def save_then_die(self):
        real_save(self)
        if self.folder.name.startswith('stage2') and self.learn.iteration == 6: raise KeyboardInterrupt
    monkeypatch.setattr(L.Checkpointer, '_save', save_then_die)
    with pytest.raises(KeyboardInterrupt): run_experiment(cfg, tmp_path/'int', dataset=_ds(), progress=False)
    d = tmp_path/'int'
    assert (d/'densecl_fold0_no2-3.pth').is_file() and not list(d.glob('stage2_*.pth')) and not list(d.glob('stage3_*'))
    assert [p.name for p in L.list_checkpoints(d/'stage2_fold0_run0_test2-3_checkpoints')][-1] == 'iter_0000006.pth'
    monkeypatch.setattr(L.Checkpointer, '_save', real_save)
    pre, calls, real_pre, real_train = [], [], D.pretrain_densecl, DM.train_fold
    monkeypatch.setattr(D, 'pretrain_densecl', lambda *a, **k: pre.append(1) or real_pre(*a, **k))
    monkeypatch.setattr(DM, 'train_fold', lambda cfg, *a, **k: calls.append((cfg.pseudo_labels, k['resume'])) or real_train(cfg, *a, **k))
    run_experiment(cfg, d, dataset=_ds(), progress=False)
    assert pre == []  # stage 1 was finished: not run again
    assert calls == [('superpixels', 'last'), ('superpixels+labels', None)]  # stage 2 resumed, stage 3 started
    for s in ('stage2_fold0_run0_test2-3.pth', 'stage3_fold0_run0_test2-3.pth'):
        a, b = _state(tmp_path/'ref'/s), _state(d/s)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), s  # as if never interrupted
    calls.clear(); run_experiment(cfg, d, dataset=_ds(), progress=False)
    assert calls == []  # everything cached
    with pytest.raises(ValueError, match='stage2_fold0_run0_test2-3.pth'):  # a stage made by other settings is refused
        run_experiment(dataclasses.replace(cfg, lr=0.05), d, dataset=_ds(), progress=False)


def _record(monkeypatch):
    "Record every episode the samplers draw: (sampler kind, label, [(case, slice), ...])."
    seen, real = [], E.EpisodeSampler._episode
    def episode(self, sup, qry, label, rng):
        seen.append((self.kind, int(label), [(c.case_id, int(z)) for c, z, _ in list(sup) + list(qry)]))
        return real(self, sup, qry, label, rng)
    monkeypatch.setattr(E.EpisodeSampler, '_episode', episode)
    return seen


def test_honest_protocol_setting2(tmp_path, monkeypatch):
    "No checkpoint chosen on the test fold; fine-tuning labels only from the training group of the training cases; Setting 2 keeps test organs out."
    ds = _ds(); split = fold_split(ds.case_ids, 0, 3, 'ouyang')
    evals, real_eval = [], T.evaluate
    monkeypatch.setattr(T, 'evaluate', lambda m, store, sup, qry, *a, **k: evals.append((sup, list(qry))) or real_eval(m, store, sup, qry, *a, **k))
    seen = _record(monkeypatch)
    cfg = _cfg(select='val', n_val=2, val_every=4, finetune_steps=12, p_supervised=0.5)
    run_experiment(cfg, tmp_path/'x', dataset=ds, progress=False)
    train = set(split.train_ids); test = {2, 3}  # the 'lower' group: right and left kidney
    assert evals and all({s, *q} <= train for s, q in evals)  # validation checkpoints: training cases only
    sup = [s for s in seen if s[0] == 'supervised']
    assert sup and all(lab not in test for _, lab, _ in sup)  # ground truth of the training label group only (liver, spleen)
    assert all(cid in train for _, _, ids in seen for cid, _ in ids)  # every training episode: training cases only
    labels = {c: ds.load(c).label for c in train}
    assert all(not np.isin(labels[c][z], list(test)).any() for _, _, ids in seen for c, z in ids)  # Setting 2: no kidney anywhere


def test_setting1_check_can_fail(tmp_path, monkeypatch):
    "The same record under Setting 1 does find training slices with a test organ (so the Setting 2 check above can fail)."
    ds = _ds(); split = fold_split(ds.case_ids, 0, 3, 'ouyang')
    seen = _record(monkeypatch)
    run_experiment(_cfg(setting=1, pretrain_steps=None, finetune_steps=3), tmp_path/'y', dataset=ds, progress=False)
    labels = {c: ds.load(c).label for c in split.train_ids}
    assert any(np.isin(labels[c][z], [2, 3]).any() for _, _, ids in seen for c, z in ids)
    assert sorted(p.name for p in (tmp_path/'y').glob('stage*.pth')) == ['stage2_fold0_run0.pth', 'stage3_fold0_run0_test2-3.pth']


def test_finetune_needs_a_training_label_group(tmp_path):
    with pytest.raises(ValueError, match='no training label group'):
        run_experiment(_cfg(label_groups=None, pretrain_steps=None), tmp_path/'z', dataset=_ds(), progress=False)


def test_reproduce_densemp_commands():
    r = subprocess.run([sys.executable, '-m', 'fsmis.cli', 'reproduce', '--list'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(f'densemp-{d}-setting{s}' in r.stdout for d in ('chaos', 'synapse') for s in (1, 2))
    r = subprocess.run([sys.executable, '-m', 'fsmis.cli', 'reproduce', 'densemp-chaos-setting2', '--print-config', '--minutes', '7'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for line in ('method: alpnet', 'setting: 2', 'pretrain_minutes: 7.0', 'minutes: 7.0', 'finetune_steps: 1000', 'fold_variant: ouyang'):
        assert line in r.stdout, line


def test_stage1_setting2_leaves_test_organ_slices_out(tmp_path, monkeypatch):
    "Stage 1 is training too: under Setting 2 DenseCL never sees a slice with a test organ (Setting 1: it does, so the check can fail)."
    from fsmis.train import stage1_weights
    ds = _ds(); split = fold_split(ds.case_ids, 0, 3, 'ouyang')
    made, real = [], D.unlabeled_slices
    monkeypatch.setattr(D, 'unlabeled_slices', lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    labels = {c: ds.load(c).label for c in split.train_ids}
    def organ_slices(s): return sum(np.isin(labels[s.names[v].split('/')[-1]][z], [2, 3]).any() for v, z in s.index)
    w2 = stage1_weights(_cfg(setting=2), ds, split.train_ids, 0, tmp_path, test_classes=[2, 3])
    w1 = stage1_weights(_cfg(setting=1), ds, split.train_ids, 0, tmp_path, test_classes=[2, 3])
    assert (w2.name, w1.name) == ('densecl_fold0_no2-3.pth', 'densecl_fold0.pth')
    s2, s1 = made
    assert organ_slices(s2) == 0 and organ_slices(s1) > 0 and s2.n_excluded > 0
    assert D.read_encoder_meta(w2)['n_excluded'] == s2.n_excluded
    with pytest.raises(ValueError, match='needs test_classes'):
        stage1_weights(_cfg(setting=2), ds, split.train_ids, 0, tmp_path/'b')


@pytest.mark.data
@pytest.mark.parametrize('setting,expected', [(1, {'lower': 544, 'upper': 544}), (2, {'lower': 303, 'upper': 202})])
def test_ouyang_configs_run_label_groups_one_at_a_time(setting, expected, data_root):
    "SSL-ALPNet and DenseMP on CHAOS: each label group is evaluated in turn and trains without its own classes' slices (Setting 2)."
    from fsmis.config import reproduce_config
    from fsmis.data.datasets import open_dataset, CaseStore
    from fsmis.data.folds import fold_split, setting_keep
    from fsmis.experiments import label_group_classes
    for name in (f'alpnet-chaos-setting{setting}', f'densemp-chaos-setting{setting}'):
        cfg = reproduce_config(name)
        assert cfg.method == 'alpnet' and cfg.label_groups == ['lower', 'upper']  # DenseMP: ALPNet's head
        ds = open_dataset(cfg.dataset)
        store = CaseStore(ds)
        train = fold_split(ds.case_ids, 0, cfg.n_folds, cfg.fold_variant).train_ids
        groups = label_group_classes(cfg, ds)
        kept = {g: int(sum(setting_keep(store[c].label, list(cl), cfg.setting).sum() for c in train)) for g, cl in groups.items()}
        assert kept == expected, (name, kept)


def test_every_ouyang_run_trains_per_group(monkeypatch):
    "run_experiment with label groups: one stage-2 training per group under Setting 2, each without its own classes."
    from fsmis.train import train_classes
    calls = []
    real = DM.train_fold
    def spy(cfg, ds, train_ids, seed=None, test_classes=None, **k):
        calls.append((cfg.pseudo_labels, sorted(test_classes)))
        return real(cfg, ds, train_ids, seed=seed, test_classes=test_classes, **k)
    monkeypatch.setattr(DM, 'train_fold', spy)
    cfg = dataclasses.replace(_cfg(setting=2), finetune_steps=2, n_steps=2, pretrain_steps=None, label_groups=['lower', 'upper'])
    run_experiment(cfg, None, dataset=_ds(), progress=False)
    assert sorted(calls) == [('superpixels', [1, 4]), ('superpixels', [2, 3]), ('superpixels+labels', [1, 4]), ('superpixels+labels', [2, 3])]
    ds = _ds()
    assert train_classes(ds, [2, 3]) == [1, 4] and train_classes(ds, [1, 4]) == [2, 3]  # stage 3: the other group's labels
