"Tests of fsmis.eval: 3D Dice, aggregation, Wilcoxon, EP1/EP2 plans, Setting 2, volume inference, the runner."
import numpy as np
import pandas as pd
import pytest
import torch

from fsmis.core import Case
from fsmis.eval.metrics import dice, dice_counts, dice_from_counts, summarize, paired_wilcoxon, to_markdown
from fsmis.eval.protocols import ep1_tasks, ep2_tasks, protocol_tasks, support_slice_indices, query_chunks, labelled_slices, evaluate, evaluate_case
from fsmis.models.intensity import IntensityPrototype
from fsmis.eval.inference import segment_volume, threshold_override, learned_threshold
from fsmis.data.folds import setting2_keep, setting_keep


# ---------------------------------------------------------------- metrics
def test_dice_hand_made():
    t = np.zeros((2, 3, 3), bool); p = np.zeros_like(t)
    t[0, :2, :2] = True                    # 4 voxels
    p[0, :2, :1] = True; p[1, 2, 2] = True  # 2 hits, 1 false positive, 2 misses
    assert dice_counts(p, t) == (2, 1, 2)
    assert dice(p, t) == pytest.approx(4 / 7)
    assert dice(t, t) == 1.0 and dice(~t, t) == 0.0
    assert np.isnan(dice(np.zeros_like(t), np.zeros_like(t)))
    assert dice_from_counts(0, 3, 0) == 0.0


def test_dice_is_3d_not_mean_of_slices():
    t = np.zeros((2, 10, 10), bool); p = t.copy()
    t[0] = True; p[0] = True               # big slice perfect
    t[1, 0, 0] = True                      # tiny slice missed
    assert dice(p, t) == pytest.approx(200 / 201)
    assert np.mean([dice(p[i], t[i]) for i in range(2)]) == pytest.approx(0.5)


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match='shape'): dice(np.zeros((2, 2)), np.zeros((2, 3)))


def test_summarize_matches_paper_mean_std():
    # ADNet Table 2, CHAOS EP2: L kid 62.33, R kid 86.46, spleen 63.73, liver 77.12 -> 72.41 +- 9.96
    vals = {'L kid.': 0.6233, 'R kid.': 0.8646, 'Spleen': 0.6373, 'Liver': 0.7712}
    df = pd.DataFrame([{'method': 'm', 'fold': 0, 'run': 0, 'case': 'q', 'class': c, 'dice': v} for c, v in vals.items()])
    s = summarize(df)
    assert s.loc['m', 'Mean'] == pytest.approx(72.41, abs=0.01)
    assert s.loc['m', 'Mean std'] == pytest.approx(9.96, abs=0.01)
    assert '72.41 ± 9.96' in to_markdown(s)


def test_summarize_std_over_runs():
    # class mean per (fold, run) averages the volumes; std is over the fold-run means
    rows = [dict(method='m', fold=f, run=r, case=q, **{'class': 'a'}, dice=d)
            for f, r, q, d in [(0, 0, 'x', .5), (0, 0, 'y', .7), (0, 1, 'x', .8), (0, 1, 'y', .8)]]
    s = summarize(pd.DataFrame(rows))
    assert s.loc['m', 'a'] == pytest.approx(70.0)
    assert s.loc['m', 'a std'] == pytest.approx(10.0)


def test_wilcoxon_one_sided():
    rng = np.random.default_rng(1)
    keys = pd.DataFrame([dict(fold=0, run=0, case=str(i), **{'class': 'c'}) for i in range(20)])
    b = keys.assign(dice=rng.uniform(.3, .7, 20))
    a = keys.assign(dice=b.dice + rng.uniform(.01, .05, 20))
    assert paired_wilcoxon(a, b)['pvalue'] < 0.001
    assert paired_wilcoxon(b, a)['pvalue'] > 0.99
    with pytest.raises(ValueError, match='paired'): paired_wilcoxon(a.iloc[:1], b.iloc[:1])


# ---------------------------------------------------------------- protocol index logic
def _vol(z, lo, hi, cls=1):
    v = np.zeros((z, 3, 3), np.int64); v[lo:hi, 1, 1] = cls; return v


@pytest.mark.parametrize('n', range(1, 14))
def test_ep1_indices_odd_and_even(n):
    sup, qry = _vol(30, 4, 4 + n), _vol(25, 2, 2 + n)
    s = support_slice_indices(sup, 1)
    assert s == [4 + min(n - 1, int(f * n)) for f in (1 / 6, 1 / 2, 5 / 6)]
    assert s == sorted(s) and all(4 <= i < 4 + n for i in s)
    ch = query_chunks(qry, 1)
    assert np.concatenate(ch).tolist() == list(range(2, 2 + n))          # every labelled slice once, in order
    sizes = [len(c) for c in ch]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes)  # the remainder goes to the last chunks
    tasks = ep1_tasks(sup, qry, 1)
    assert [t.sup_slices[0] for t in tasks] == [s[t.chunk] for t in tasks]   # chunk i uses support slice i
    assert all(len(t.sup_slices) == 1 for t in tasks)


def test_ep1_examples():
    # 6 labelled slices 10..15: support at 11, 13, 15; query of 6: chunks (0,1) (2,3) (4,5)
    assert support_slice_indices(_vol(20, 10, 16), 1) == [11, 13, 15]
    assert [c.tolist() for c in query_chunks(_vol(6, 0, 6), 1)] == [[0, 1], [2, 3], [4, 5]]
    # 7 labelled: 1/6*7=1, 3.5->3, 5.83->5; chunks 2,2,3
    assert support_slice_indices(_vol(7, 0, 7), 1) == [1, 3, 5]
    assert [len(c) for c in query_chunks(_vol(7, 0, 7), 1)] == [2, 2, 3]  # the remainder to the last chunks, as both releases
    assert [len(c) for c in query_chunks(_vol(8, 0, 8), 1)] == [2, 3, 3]


def test_ep1_only_slices_with_class():
    qry = np.zeros((10, 3, 3), np.int64); qry[[1, 2, 5, 6, 8], 0, 0] = 2
    assert labelled_slices(qry, 2).tolist() == [1, 2, 5, 6, 8]
    tasks = ep1_tasks(_vol(10, 0, 9, 2), qry, 2)
    assert sorted(np.concatenate([t.qry_slices for t in tasks]).tolist()) == [1, 2, 5, 6, 8]


@pytest.mark.parametrize('n', [1, 2, 5, 6])
def test_ep2_exactly_one_support_slice(n):
    sup, qry = _vol(20, 3, 3 + n), _vol(17, 4, 9)
    tasks = ep2_tasks(sup, qry, 1)
    assert len(tasks) == 1 and len(tasks[0].sup_slices) == 1
    assert tasks[0].sup_slices[0] == 3 + n // 2
    assert tasks[0].qry_slices.tolist() == list(range(17))                # the whole query volume


def test_protocol_errors():
    with pytest.raises(ValueError, match='protocol'): protocol_tasks('EP3', _vol(4, 0, 2), _vol(4, 0, 2), 1)
    with pytest.raises(ValueError, match='no slice with class 3'): ep2_tasks(_vol(4, 0, 2), _vol(4, 0, 2), 3)


def test_setting2_excludes_any_test_class():
    lab = np.zeros((6, 2, 2), np.int64)
    lab[0, 0, 0] = 1; lab[1, 0, 0] = 4; lab[2, 0, 0] = 1; lab[2, 0, 1] = 4; lab[3, 0, 0] = 2  # slice 4, 5 empty
    keep = setting2_keep(lab, [1, 4])
    assert keep.tolist() == [False, False, False, True, True, True]
    assert setting_keep(lab, [1, 4], 1).all()
    with pytest.raises(ValueError, match='setting'): setting_keep(lab, [1], 3)
    with pytest.raises(ValueError, match='empty'): setting2_keep(lab, [])


# ---------------------------------------------------------------- volume inference
def _toy(seed, z=9, n=24):
    rng = np.random.default_rng(seed)
    lab = np.zeros((z, n, n), np.int64)
    lab[1:8, 4:10, 4:10] = 1; lab[3:9, 14:20, 14:18] = 2
    img = np.where(lab == 1, 2., np.where(lab == 2, -2., 0.)).astype(np.float32) + rng.normal(0, .2, lab.shape).astype(np.float32)
    return Case(img, lab, case_id=str(seed), classes={1: 'a', 2: 'b'})


class CountingModel(IntensityPrototype):
    "Intensity baseline that counts slices encoded."
    def __init__(self):
        super().__init__(); self.n_encoded = 0; self.threshold = torch.nn.Parameter(torch.tensor(-10.))
    def encode(self, imgs):
        self.n_encoded += len(imgs); return super().encode(imgs)


def test_query_encoded_once_for_all_classes():
    m = CountingModel(); sup, qry = _toy(0), _toy(1)
    rows = evaluate_case(m, sup, qry, protocol='EP2')
    # 9 query slices + one support slice per class (EP2), not 2 x 9
    assert m.n_encoded == 9 + 2
    assert {r['class'] for r in rows} == {'a', 'b'} and all(r['dice'] > .95 for r in rows)
    assert all(r['n_slices'] == 9 for r in rows)


def test_ep1_scores_only_labelled_slices():
    rows = evaluate_case(IntensityPrototype(), _toy(0), _toy(1), protocol='EP1')
    assert {r['class']: r['n_slices'] for r in rows} == {'a': 7, 'b': 6}


def test_segment_volume_label_geometry():
    sup, qry = _toy(0), _toy(2)
    lv = segment_volume(IntensityPrototype(), qry.image, sup.image[4], sup.label[4])
    assert lv.shape == qry.image.shape and set(np.unique(lv)) <= {0, 1, 2}
    assert dice(lv == 1, qry.label == 1) > .95 and dice(lv == 2, qry.label == 2) > .95
    with pytest.raises(ValueError, match='must match'): segment_volume(IntensityPrototype(), qry.image, sup.image[4][:5], sup.label[4][:5])


def test_threshold_override_restores():
    m = CountingModel()
    with threshold_override(m, -17.):
        assert learned_threshold(m) == -17.
    assert learned_threshold(m) == -10.
    with pytest.raises(ValueError, match='threshold'):
        with threshold_override(IntensityPrototype(), -1.): pass


def test_evaluate_dataframe_and_sweep():
    cases = {str(i): _toy(i) for i in range(3)}
    df = evaluate(CountingModel(), cases, '0', ['1', '2'], protocol='EP2', thresholds=[-15., -10.])
    assert len(df) == 2 * 2 * 2 and set(df.threshold) == {-15., -10.}
    with pytest.raises(ValueError, match='also in query_ids'): evaluate(IntensityPrototype(), cases, '0', ['0'])


def test_line_search_with_fsmis_adnet():
    adnet = pytest.importorskip('fsmis.models.adnet')
    torch.manual_seed(0)
    m = adnet.ADNet('small')
    cases = {str(i): _toy(i, n=32) for i in range(2)}
    t0 = learned_threshold(m)
    df = evaluate(m, cases, '0', ['1'], protocol='EP2', thresholds=[-18., -12.])
    assert learned_threshold(m) == t0 and sorted(set(df.threshold)) == [-18., -12.]
    # a lower threshold can only shrink the foreground: p_fg = 1 - sigmoid(k (S - T)) falls as T falls
    fg = df.assign(npred=df.tp + df.fp).groupby('threshold').npred.sum()
    assert fg[-18.] <= fg[-12.]


# ---------------------------------------------------------------- experiment runner
from fsmis import experiments as X, train as T, config as Cfg
from types import SimpleNamespace

def _train(cfg, ds, train_ids, seed, test_classes=None, store=None):
    "(model, info) of `train_fold` (the one training path)."
    learn = T.train_fold(cfg, ds, train_ids, seed=seed, test_classes=test_classes, store=store)
    return learn.model, learn.train_info


class _ToyDS:
    "Six tiny synthetic cases with the Dataset interface."
    classes = {1: 'a', 2: 'b'}
    case_ids = [str(i) for i in range(1, 7)]
    def load(self, cid, normalize=True): return _toy(int(cid))


def test_config_roundtrip_and_validation(tmp_path):
    cfg = Cfg.cpu_budget_config('ms_cmrseg_bssfp', minutes=5)
    assert Cfg.ExperimentConfig.load(cfg.save(tmp_path / 'c.yaml')) == cfg
    assert Cfg.ExperimentConfig.load(cfg.save(tmp_path / 'c.json')) == cfg
    assert cfg.minutes == 5 and cfg.select == 'final'
    with pytest.raises(ValueError, match='setting'): Cfg.ExperimentConfig(setting=3)
    with pytest.raises(ValueError, match='select'): Cfg.ExperimentConfig(select='best_test')
    (tmp_path / 'bad.json').write_text('{"nope": 1}')
    with pytest.raises(ValueError, match='unknown config keys'): Cfg.ExperimentConfig.load(tmp_path / 'bad.json')


def test_runner_same_seed_same_numbers(tmp_path):
    cfg = Cfg.ExperimentConfig(name='t', dataset='toy', method='intensity', folds=[0, 1], n_folds=2, runs=2, baselines=[])
    a = X.run_experiment(cfg, tmp_path / 'a', dataset=_ToyDS(), progress=False)
    b = X.run_experiment(cfg, None, dataset=_ToyDS(), progress=False)
    pd.testing.assert_frame_equal(a.results, b.results)
    assert {'config.yaml', 'results.csv', 'runs.csv', 'tables.md', 'dice.png'} <= {p.name for p in (tmp_path / 'a').iterdir()}
    assert Cfg.ExperimentConfig.load(tmp_path / 'a' / 'config.yaml') == cfg
    csv = pd.read_csv(tmp_path / 'a' / 'results.csv')
    assert {'method', 'protocol', 'fold', 'run', 'case', 'class', 'tp', 'fp', 'fn', 'dice'} <= set(csv.columns)
    assert len(csv) == 2 * 2 * 2 * 3 * 2  # folds x runs x protocols x queries (fold of 4 cases: 1 support + 3) x classes
    assert '| Method |' in (tmp_path / 'a' / 'tables.md').read_text()


def test_runner_never_trains_or_selects_on_the_test_fold(monkeypatch):
    seen = []
    def fake_train(cfg, ds, train_ids, seed=None, test_classes=None, store=None):
        seen.append((list(train_ids), seed))
        return SimpleNamespace(model=IntensityPrototype(), train_info=dict(train_s=0., steps=0, select=cfg.select))
    monkeypatch.setattr(X, 'train_fold', fake_train)
    cfg = Cfg.ExperimentConfig(name='t', dataset='toy', method='adnet', folds=[0, 1], n_folds=2, runs=1, baselines=['intensity'])
    res = X.run_experiment(cfg, None, dataset=_ToyDS(), progress=False)
    from fsmis.data.folds import fold_split
    for (train_ids, seed), fold in zip(seen, [0, 1]):
        sp = fold_split(_ToyDS.case_ids, fold, 2)
        assert not set(train_ids) & {sp.support_id, *sp.query_ids}
        assert set(res.results[res.results.fold == fold].case) == set(sp.query_ids)
    assert Cfg.ExperimentConfig().select == 'final'  # the default evaluates the final weights (the 'val' path: next test)
    assert (res.runs['select'] == 'final').all() and (res.runs.steps == 0).all()


def test_val_checkpoint_scores_training_cases_only(monkeypatch):
    """select='val': the weights are chosen on validation cases drawn from the training cases, never the test fold;
    under Setting 2 the test classes are not scored even there."""
    pytest.importorskip('fsmis.learner')
    from fsmis.data.datasets import open_dataset
    torch.set_num_threads(1)
    ds = open_dataset('phantom', n_cases=6, shape=(16, 64, 64))
    calls, real = [], T.evaluate
    def spy(model, store, support_id, query_ids, protocol='EP2', classes=None, **kw):
        calls.append((support_id, list(query_ids), dict(classes or {})))
        return real(model, store, support_id, query_ids, protocol, classes, **kw)
    monkeypatch.setattr(T, 'evaluate', spy)
    train = ['1', '2', '3', '4']
    cfg = Cfg.ExperimentConfig(dataset='phantom', encoder='small', n_steps=6, rho=100, select='val', n_val=2, val_every=2)
    model, info = _train(cfg, ds, train, 0, [1, 2, 3, 4])
    assert len(calls) == 3 and info['select'] == 'val' and info['val_step'] in (2, 4, 6)
    val = info['val_ids'].split()
    assert len(val) == 2 and set(val) <= set(train) and info['n_train'] == 2
    for sup, qs, cl in calls: assert {sup, *qs} == set(val) and set(cl) == {1, 2, 3, 4}
    calls.clear()
    cfg2 = Cfg.ExperimentConfig(dataset='phantom', encoder='small', n_steps=2, rho=100, select='val', n_val=2, val_every=2,
                              setting=2)
    _train(cfg2, ds, train, 0, [1])  # only test class 1 excluded: validate on the others
    assert calls and all(1 not in cl and cl for _, _, cl in calls)
    with pytest.raises(ValueError, match='no class left to validate'): _train(cfg2, ds, train, 0, [1, 2, 3, 4])


def test_empty_folds_is_an_error():
    with pytest.raises(ValueError, match='folds is empty'):
        X.run_experiment(Cfg.ExperimentConfig(dataset='toy', method='intensity', folds=[]), None, dataset=_ToyDS(), progress=False)


def test_validation_split_only_from_training_cases():
    train = ['3', '4', '5', '6', '7', '8']
    fit, val = T.validation_split(train, 2, seed=1)
    assert len(val) == 2 and set(val) <= set(train) and not set(fit) & set(val) and set(fit) | set(val) == set(train)
    assert T.validation_split(train, 0) == (train, [])
    with pytest.raises(ValueError, match='n_val'): T.validation_split(train, 6)


def test_trained_adnet_run_is_reproducible(tmp_path):
    pytest.importorskip('fsmis.learner'); pytest.importorskip('fsmis.data.episodes')
    from fsmis.data.datasets import open_dataset
    torch.set_num_threads(1)
    ds = open_dataset('phantom', n_cases=6, shape=(16, 64, 64))
    cfg = Cfg.ExperimentConfig(name='p', dataset='phantom', method='adnet', encoder='small', folds=[0], n_folds=2, runs=1,
                             n_steps=8, rho=100, protocols=['EP2'], baselines=['untrained'], thresholds=[-12., -8.])
    a = X.run_experiment(cfg, tmp_path, dataset=ds, progress=False)
    b = X.run_experiment(cfg, None, dataset=ds, progress=False)
    pd.testing.assert_frame_equal(a.results, b.results)
    assert int(a.runs.steps.iloc[0]) == 8 and (tmp_path / 'model_fold0_run0.pth').is_file()
    assert set(a.results.method) == {'adnet', 'untrained'} and a.results.threshold_sweep.any()
    assert (tmp_path / 'threshold_sweep.png').is_file()


def test_setting2_reaches_the_episode_sampler(monkeypatch):
    eps = pytest.importorskip('fsmis.data.episodes')
    from fsmis.data.datasets import open_dataset
    seen = {}
    class Stop(Exception): pass
    def fake_dls(source, **kw):
        seen.update(kw); raise Stop()
    monkeypatch.setattr(eps, 'episode_dls', fake_dls)
    ds = open_dataset('phantom', n_cases=4, shape=(16, 64, 64))
    cfg = Cfg.ouyang_config('chaos_t2', setting=2, group='lower', method='adnet', pseudo_labels='supervoxels', rho=200)
    assert cfg.classes == ['right kidney', 'left kidney'] and cfg.protocols == ['ouyang'] and cfg.fold_variant == 'ouyang'
    with pytest.raises(Stop): _train(cfg, ds, ['1', '2'], 0, [2, 3])
    assert seen['exclude_classes'] == [2, 3] and seen['case_ids'] == ['1', '2']
    seen.clear()
    with pytest.raises(Stop): _train(Cfg.ExperimentConfig(dataset='phantom', rho=200), ds, ['1', '2'], 0, [2, 3])
    assert 'exclude_classes' not in seen                                   # Setting 1: nothing excluded


def test_untrained_baseline_is_the_trained_models_start(monkeypatch):
    "The untrained baseline of a run has exactly the initial weights that training starts from."
    L = pytest.importorskip('fsmis.learner')
    from fsmis.data.datasets import open_dataset
    def no_fit(learn, n, **kw): learn.iteration = 0; return learn
    monkeypatch.setattr(L, 'fit_iters', no_fit)  # no training step: the model stays at its start
    ds = open_dataset('phantom', n_cases=4, shape=(16, 64, 64))
    cfg = Cfg.ExperimentConfig(dataset='phantom', encoder='small', n_steps=5, rho=100)
    model, _ = _train(cfg, ds, ['1', '2', '3'], 7)
    base = T.initial_model(cfg, 7)
    a, b = model.state_dict(), base.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k]) for k in a)


def test_ct_global_norm_fitted_on_each_folds_training_cases(tmp_path, monkeypatch):
    "CT is z-scored with one mean/std over the training scans (REFERENCE_FACTS): the test fold never enters it."
    from fsmis.data.datasets import open_dataset
    from fsmis.data.io import write_nifti
    from fsmis.data.folds import fold_split
    rng = np.random.default_rng(0)
    for i in range(1, 7):
        img = rng.normal(100 * i, 10, (6, 24, 24)).astype(np.float32); lab = np.zeros((6, 24, 24), np.uint8)
        lab[1:5, 6:16, 6:16] = 1; img[lab == 1] += 200
        write_nifti(tmp_path/f'image_{i}.nii.gz', img); write_nifti(tmp_path/f'label_{i}.nii.gz', lab)
    ds = open_dataset(tmp_path, classes={1: 'organ'}, modality='CT')
    fitted, real = [], ds.fit_norm
    def spy(case_ids=None): fitted.append(sorted(case_ids)); return real(case_ids)
    monkeypatch.setattr(ds, 'fit_norm', spy)
    cfg = Cfg.ExperimentConfig(dataset='folder', method='intensity', folds=[0, 1], n_folds=2, baselines=[], protocols=['EP2'])
    X.run_experiment(cfg, None, dataset=ds, progress=False)
    ids = [str(i) for i in range(1, 7)]
    assert fitted == [sorted(fold_split(ids, f, 2).train_ids) for f in (0, 1)]
