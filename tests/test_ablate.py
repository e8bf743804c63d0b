"""The ablation runner: a killed run continues where it stopped (finished cells are never rerun), parallel workers give
the same table as one process, one cell runs alone, and the named ablations are the paper's grids."""
import dataclasses, json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np, pandas as pd, pytest
from fsmis.ablate import ABLATIONS, ablation_cells, run_ablation, ablation_tables, finished_cells

TOY = dict(n_steps=6, minutes=None, size=32, device='cpu', n_val=0)
CLI_TOY = ['--steps', '6', '--size', '32', '--folds', '0', '1', '--device', 'cpu']


def _fsmis(*args, **kw):
    return subprocess.Popen([sys.executable, '-m', 'fsmis.cli', *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_killed_runner_continues_and_never_reruns_a_finished_cell(tmp_path):
    out = tmp_path/'abl'
    p = _fsmis('ablate', 'phantom-losses', *CLI_TOY, '--runs', '2', '--out', out)  # 2 rows x 2 folds x 2 runs = 8 cells
    t0 = time.time()
    while not list(out.glob('*/done.json')) and time.time() - t0 < 300: time.sleep(0.2)
    p.send_signal(signal.SIGKILL); p.wait()
    done = {d.parent.name: d.stat().st_mtime_ns for d in out.glob('*/done.json')}
    assert 1 <= len(done) < 8, done
    r = _fsmis('ablate', 'phantom-losses', *CLI_TOY, '--runs', '2', '--out', out, '--quiet'); o, e = r.communicate(timeout=600)
    assert r.returncode == 0, e
    after = {d.parent.name: d.stat().st_mtime_ns for d in out.glob('*/done.json')}
    assert len(after) == 8 and all(after[k] == v for k, v in done.items())  # finished cells untouched
    assert 'L_S only' in o and 'p (default > row)' in o


def test_workers_give_the_same_table_as_one_process(tmp_path):
    a = run_ablation('phantom-losses', tmp_path/'one', folds=[0, 1], over=TOY, progress=False)
    b = run_ablation('phantom-losses', tmp_path/'two', folds=[0, 1], over=TOY, workers=2, progress=False)
    assert a['tables'] == b['tables'] and len(b['cells']) == 4
    assert (finished_cells(tmp_path/'two')['overhead_s'] >= 0).all()  # recorded per cell (its size is a bench figure, not a test: load changes it)


def test_one_cell_alone_and_a_table_from_what_finished(tmp_path):
    r = run_ablation('phantom-losses', tmp_path, folds=[0, 1], over=TOY, cells=[3], progress=False)
    assert [p.name for p in tmp_path.glob('*/done.json')] == ['done.json'] and len(r['cells']) == 1
    t = ablation_tables('phantom-losses', tmp_path)['EP2']
    assert 'not run' in t.splitlines()[2] and 'L_S only' in t  # the default row has no finished cell yet
    with pytest.raises(ValueError, match='has cells 0..3'): run_ablation('phantom-losses', tmp_path, folds=[0, 1], over=TOY, cells=[4])


def test_interrupted_cell_starts_afresh(tmp_path):
    c = ablation_cells('phantom-losses', folds=[0, 1], over=TOY)[0]
    d = tmp_path/c.folder; d.mkdir(parents=True); (d/'results.csv').write_text('half written')
    run_ablation('phantom-losses', tmp_path, folds=[0, 1], over=TOY, cells=[0], progress=False)
    assert (d/'done.json').is_file() and (d/'results.csv').read_text().startswith(('fold', 'case', 'method', 'protocol', 'support', 'class', 'dice'))


def test_named_ablations_are_the_papers_grids():
    rows = {k: list(a.rows) for k, a in ABLATIONS.items()}
    assert rows['adnet-table5'] == ['rho 500', 'rho 1000', 'rho 1500', 'rho 2000', 'rho 5000']
    assert [c.cfg.learner_kw['kappa'] for c in ablation_cells('adnet-table6')] == [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    t4 = {c.row: c.cfg.learner_kw for c in ablation_cells('adnet-table4')}
    assert t4 == {'L_S + L_T + L_PAR': {}, 'without L_T': {'thresh': False}, 'without L_PAR': {'par': False}, 'L_S only': {'thresh': False, 'par': False}}
    t7 = {c.row: (c.cfg.method, c.cfg.pseudo_labels, c.cfg.protocols) for c in ablation_cells('adnet-table7-chaos')}
    assert t7['ALPNet pSSL'] == ('alpnet', 'superpixels', ['EP2']) and t7['ADNet vSSL'] == ('adnet', 'supervoxels', ['EP2'])
    assert all(c.cfg.dataset == 'ms_cmrseg_bssfp' and c.cfg.protocols == ['EP1'] for c in ablation_cells('adnet-table5'))
    paper = ablation_cells('adnet-main-chaos', budget='paper')
    assert len(paper) == 5 * 15 and paper[0].cfg.protocols == ['EP1', 'EP2']  # 5 methods x 5 folds x 3 runs
    main = {c.row: (c.cfg.method, c.cfg.pseudo_labels) for c in ablation_cells('adnet-main-cmr')}
    assert main == {'ADNet': ('adnet', 'supervoxels'), 'pSSL-PANet': ('panet', 'superpixels'), 'pSSL-ALPNet': ('alpnet', 'superpixels'),
                    'vSSL-PPNet': ('ppnet', 'supervoxels'), 'vSSL-CANet': ('canet', 'supervoxels')}  # ADNet Tables 1-2's five methods
    a = ABLATIONS['adnet-main-chaos']
    assert a.paper_for('EP1')['ADNet']['Mean'] == '78.82 ± 3.35' and a.paper_for('EP2')['vSSL-CANet']['Mean'] == '58.23 ± 8.98'
    dm = {c.row: c.cfg for c in ablation_cells('densemp-chaos-setting2')}
    for row, kind in (('Vanilla PANet', 'panet'), ('SE-Net', 'senet')):  # supervised baselines: ground truth, no stage 1, no stage 3
        c = dm[row]; assert (c.method, c.pseudo_labels, c.pretrain_steps, c.pretrain_minutes, c.finetune_steps) == (kind, 'labels', None, None, 0)


@pytest.mark.parametrize('args, text', [(['ablate', 'nope'], 'unknown ablation'), (['ablate', 'phantom-losses', '--steps', '0'], '--steps'),
                                        (['ablate', 'phantom-losses', '--cell', '-1'], '--cell')])
def test_cli_bad_input(args, text, tmp_path):
    r = _fsmis(*args, '--out', tmp_path/'x'); o, e = r.communicate(timeout=120)
    assert r.returncode == 2 and len(e.strip().splitlines()) == 1 and text in e, e


def test_extra_rows_read_a_baseline_of_a_rows_cells(tmp_path):
    "An extra row is another model evaluated in a row's own cells (here the untrained ADNet): no cell of its own, its own numbers."
    from fsmis.ablate import Ablation, ablation_tables, _cell_results
    a = Ablation('x', 'toy', 'adnet-phantom-ep2', {'trained': {}}, 'trained', protocol='EP2',
                 base_over={'baselines': ['untrained'], 'thresholds': [], 'dataset_kw': {'n_cases': 6, 'shape': (16, 64, 64)}, 'n_folds': 2},
                 extra={'no few-shot training': ('trained', 'untrained')})
    r = run_ablation(a, tmp_path, folds=[0, 1], over=TOY, progress=False)
    assert len(r['cells']) == 2  # the extra row adds no cell
    res = _cell_results(a, tmp_path)
    tr, un = (res[res['row'] == k].sort_values(['fold', 'case', 'class'])['dice'].to_numpy() for k in ('trained', 'no few-shot training'))
    assert len(tr) == len(un) > 0 and not np.allclose(tr, un)
    raw = pd.concat([pd.read_csv(p) for p in sorted(tmp_path.glob('*/results.csv'))])
    assert np.isclose(np.sort(un), np.sort(raw[raw['method'] == 'untrained']['dice'].to_numpy())).all()
    t = ablation_tables(a, tmp_path)['EP2']
    assert '| no few-shot training |' in t and '| trained |' in t
    # columns in the paper's order where the ablation prints the paper's numbers (DenseMP: RK, LK, liver, spleen)
    header = lambda t: [c.strip() for c in t.splitlines()[0].strip('|').split('|')]
    names = header(t)[1:-2]  # between 'setting' and 'Mean', 'p (...)'
    rev = dataclasses.replace(a, paper={'trained': {**{c: '1' for c in names[::-1]}, 'Mean': '1'}})
    assert header(ablation_tables(rev, tmp_path)['EP2'])[1:-2] == names[::-1] and len(names) > 1
    with pytest.raises(ValueError, match='not one of the rows'):
        Ablation('y', 'toy', 'adnet-phantom-ep2', {'trained': {}}, 'trained', extra={'u': ('missing', 'untrained')})


def test_stage1_by_steps_reaches_the_rows_that_have_stage_1_only():
    "`--pretrain-steps` (stage 1 by steps, not minutes) changes every row with a stage 1 and no row without one."
    over = {'pretrain_steps': 9, 'pretrain_minutes': None}
    got = {c.row: (c.cfg.pretrain_steps, c.cfg.pretrain_minutes) for c in ablation_cells('densemp-table6', minutes=5., over=over)}
    assert got == {'dense (lambda 0.5)': (9, None), 'global only (lambda 0)': (9, None), 'no stage 1': (None, None)}
    base = {c.row: (c.cfg.pretrain_steps, c.cfg.pretrain_minutes) for c in ablation_cells('densemp-table6', minutes=5.)}
    assert base['dense (lambda 0.5)'] == (None, 5.) and base['no stage 1'] == (None, None)
    got = {c.row: (c.cfg.pretrain_steps, c.cfg.pretrain_minutes) for c in ablation_cells('densecl-adnet-chaos', over=over)}
    assert got == {'ADNet, random weights': (None, None), 'ADNet, DenseCL encoder (stage 1, 30 min)': (None, 30.)}


def test_cli_pretrain_steps_replaces_stage_1_minutes(tmp_path):
    import yaml
    from fsmis.cli import main
    import contextlib, io
    for extra, want in [([], (None, 30.)), (['--pretrain-steps', '7'], (7, None))]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf): assert not main(['reproduce', 'densemp-chaos-setting1', '--print-config', *extra])
        cfg = yaml.safe_load(buf.getvalue())
        assert (cfg['pretrain_steps'], cfg['pretrain_minutes']) == want


def test_runs_of_a_fold_stay_apart(tmp_path):
    "Each cell trains one (fold, run) and writes it as run 0: the tables must count the cells' runs apart (spread across runs, one Wilcoxon pair per run)."
    from fsmis.ablate import _cell_results
    run_ablation('phantom-losses', tmp_path, folds=[0], runs=2, over=TOY, progress=False)
    r = _cell_results(ABLATIONS['phantom-losses'], tmp_path)
    assert sorted(r.groupby('row')['run'].unique().map(sorted).iloc[0]) == [0, 1] and set(r['fold']) == {0}
    t = ablation_tables('phantom-losses', tmp_path)['EP2']
    assert '(n = 2)' in t.splitlines()[3], t  # L_S only against the default: paired by run
