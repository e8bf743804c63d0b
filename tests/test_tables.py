"""One aggregation for every table, figure and ablation: the papers' Mean column (ADNet Table 1 recomputed), `tables.md`,
the ablation table and the bars of `dice.png` giving the same numbers on one results frame, and the Wilcoxon test paired
per run (n = folds x runs)."""
import json
import numpy as np, pandas as pd, pytest
import matplotlib
matplotlib.use('Agg')
from fsmis.eval.metrics import summarize, summary_tables, results_tables, cell_text, run_wilcoxon, paired_wilcoxon
from fsmis.ablate import Ablation, ablation_table, ablation_tables, plot_ablation
from fsmis.viz import plot_results

TABLE1_CMR = {'LV-BP': (87.53, 2.03), 'LV-MYO': (62.43, 3.98), 'RV': (77.31, 3.48)}  # ADNet Table 1, cardiac, EP1 (mean, std)


def _runs(mean, std, n_folds, n_runs, rng):
    "Run scores (Dice in [0,1]) of exactly this mean and population std (in %), one per fold x run."
    z = rng.normal(size=n_folds*n_runs); z = (z - z.mean()) / z.std()
    return {(f, r): (mean + std*z[f*n_runs + r]) / 100 for f in range(n_folds) for r in range(n_runs)}


def test_adnet_table1_cardiac_row_from_its_class_means():
    one = pd.DataFrame([dict(method='ADNet', fold=0, run=0, case='q', **{'class': c}, dice=m/100) for c, (m, _) in TABLE1_CMR.items()])
    s = summarize(one, classes=list(TABLE1_CMR))
    assert cell_text(s).loc['ADNet', 'Mean'] == '75.76 ± 10.31'  # population std across the class means
    assert round(np.std([m for m, _ in TABLE1_CMR.values()], ddof=1), 2) == 12.62  # the sample std would not print the paper's row
    # the whole row: 5 folds x 3 runs x 4 query volumes whose run scores have the paper's class means and stds
    rng = np.random.default_rng(3)
    rows = [dict(method='ADNet', fold=f, run=r, case=f'q{i}', **{'class': c}, dice=v + e)
            for c, (m, sd) in TABLE1_CMR.items() for (f, r), v in _runs(m, sd, 5, 3, rng).items()
            for i, e in enumerate([.02, -.02, .01, -.01])]
    s = summarize(pd.DataFrame(rows), classes=list(TABLE1_CMR))
    assert cell_text(s).loc['ADNet'].tolist() == ['87.53 ± 2.03', '62.43 ± 3.98', '77.31 ± 3.48', '75.76 ± 10.31']


def _results(rng, methods=(('adnet', .7), ('panet', .6)), folds=3, runs=2):
    "A results frame in the layout of `run_experiment`: two protocols, a NaN volume, threshold-sweep rows that must not count."
    rows = [dict(method=m, fold=f, run=r, seed=100*f + r, protocol=p, threshold_sweep=False, threshold=-15., case=q, support='s',
                 **{'class': c}, dice=float(np.clip(mu + (c == 'spleen') * .1 - (p == 'EP2') * .05 + rng.normal(0, .05), 0, 1)))
            for m, mu in methods for f in range(folds) for r in range(runs) for p in ('EP1', 'EP2')
            for c in ('liver', 'spleen', 'right kidney') for q in ('1', '2', '3')]
    res = pd.DataFrame(rows)
    res.loc[0, 'dice'] = np.nan  # prediction and target both empty: skipped, not a zero
    sweep = res[res.protocol == 'EP1'].assign(threshold_sweep=True, threshold=-17., dice=0.)
    return pd.concat([res, sweep], ignore_index=True)


def _bars(ax):
    "{method: (heights, error half-widths)} of a pandas bar chart with error bars."
    out = {}
    from matplotlib.container import BarContainer
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    for cont, lab in zip(bars, [t.get_text() for t in ax.get_legend().get_texts()]):
        h = [p.get_height() for p in cont.patches]
        segs = cont.errorbar.lines[2][0].get_segments() if cont.errorbar is not None else []
        out[lab] = (np.array(h), np.array([(s[1][1] - s[0][1]) / 2 for s in segs]))
    return out


def test_table_ablation_table_and_figure_agree(tmp_path):
    res = _results(np.random.default_rng(0))
    order = ['right kidney', 'liver', 'spleen']
    tabs = summary_tables(res, order)
    # tables.md: the markdown of results_tables prints the summary's cells
    md = results_tables(res, order, main='adnet')
    for p, s in tabs.items():
        for m, cells in cell_text(s).iterrows():
            line = next(l for l in md[p].splitlines() if l.startswith(f'| {m} |'))
            assert [c.strip().rstrip('*') for c in line.strip('|').split('|')][1:] == cells.tolist()
    # the sweep rows (all 0) are left out, the NaN volume is skipped
    s = tabs['EP1']
    keep = res[~res.threshold_sweep & (res.protocol == 'EP1') & (res.method == 'adnet') & (res['class'] == 'liver')]
    assert s.loc['adnet', 'liver'] == pytest.approx(100 * keep.groupby(['fold', 'run'])['dice'].mean().mean())
    assert s.loc['adnet', 'liver std'] == pytest.approx(100 * keep.groupby(['fold', 'run'])['dice'].mean().std(ddof=0))
    # the ablation table: the same rows with `row` for `method` give the same cells
    a = Ablation('t', 'toy', 'adnet-phantom-ep2', {'adnet': {}, 'panet': {}}, 'adnet', protocol='EP1')
    for p, s in tabs.items():
        r = res[(res.protocol == p) & ~res.threshold_sweep].rename(columns={'method': 'row'})
        t = ablation_table(a, r, order)
        for m, cells in cell_text(s).iterrows():
            line = next(l for l in t.splitlines() if l.startswith(f'| {m} |'))
            assert [c.strip().strip('*') for c in line.strip('|').split('|')][1:-1] == cells.tolist()
    # dice.png: the bars are the table's class means, the error bars its ±, from rows as from the tables
    for fig in (plot_results(res, order), plot_results(tabs, order)):
        for ax, (p, s) in zip(fig.axes, tabs.items()):
            assert ax.get_title() == p and [t.get_text() for t in ax.get_xticklabels()] == order
            for m, (h, e) in _bars(ax).items():
                np.testing.assert_allclose(h, s.loc[m, order].to_numpy(float))
                np.testing.assert_allclose(e, s.loc[m, [f'{c} std' for c in order]].to_numpy(float))


def test_fsmis_ablate_folder_gives_the_same_table(tmp_path):
    "The cells of an ablation folder, read as `fsmis ablate --table` does, print the experiment's table; `plot_ablation` draws its Mean ± ."
    from fsmis.config import reproduce_config
    res = _results(np.random.default_rng(1))
    res = res[res.protocol == 'EP2']
    cfg = reproduce_config('adnet-phantom-ep2')
    a = Ablation('t', 'toy', 'adnet-phantom-ep2', {'good': {}, 'worse': {}}, 'good', protocol='EP2')
    k = 0
    for row, m in [('good', 'adnet'), ('worse', 'panet')]:
        for (f, r), g in res[res.method == m].groupby(['fold', 'run']):
            d = tmp_path/f'{k:03d}'; d.mkdir(); k += 1
            g.assign(method=cfg.method).to_csv(d/'results.csv', index=False)
            cfg.save(d/'config.yaml')
            (d/'done.json').write_text(json.dumps(dict(index=k, row=row, fold=int(f), run=int(r))))
    s = summary_tables(res)['EP2'].rename({'adnet': 'good', 'panet': 'worse'})
    t = ablation_tables(a, tmp_path)['EP2']
    cols = [c.strip() for c in t.splitlines()[0].strip('|').split('|')]
    for m, cells in cell_text(s).iterrows():
        line = [c.strip().strip('*') for c in next(l for l in t.splitlines() if l.startswith(f'| {m} |')).strip('|').split('|')]
        assert dict(zip(cols[1:-1], line[1:-1])) == cells.to_dict()
    assert '(n = 6)' in t  # the default row against 'worse': 3 folds x 2 runs
    ax = plot_ablation(a, tmp_path)
    h, e = _bars(ax)['ours']
    np.testing.assert_allclose(h, s['Mean'].to_numpy(float))
    np.testing.assert_allclose(e, s['Mean std'].to_numpy(float))


def test_wilcoxon_pairs_per_run():
    res = _results(np.random.default_rng(2), folds=4, runs=2)
    res = res[(res.protocol == 'EP1') & ~res.threshold_sweep]
    a, b = res[res.method == 'adnet'], res[res.method == 'panet']
    w = run_wilcoxon(a, b)
    assert w['n'] == 4 * 2  # fold x run pairs, not volumes x classes
    assert paired_wilcoxon(a, b)['n'] == len(a.dropna())  # the per-volume pairing counts every (volume, class)
    ra, rb = (x.groupby(['fold', 'run', 'class'])['dice'].mean().groupby(['fold', 'run']).mean() for x in (a, b))
    assert w['mean_diff'] == pytest.approx((ra - rb).mean())
    from scipy import stats
    assert w['pvalue'] == pytest.approx(stats.wilcoxon(ra, rb, alternative='greater').pvalue)
    assert w['pvalue'] == pytest.approx(1 / 2**8) and run_wilcoxon(b, a)['pvalue'] > 0.99  # adnet wins every run; one-sided
    # few pairs: p < 0.05 is out of reach (4 pairs: 1/16), and one pair is no test
    few = run_wilcoxon(a[a.fold < 2], b[b.fold < 2])
    assert few['n'] == 4 and few['min_p'] == pytest.approx(1 / 16) and few['pvalue'] >= 0.05
    with pytest.raises(ValueError, match='1 fold x run pair'): run_wilcoxon(a[(a.fold == 0) & (a.run == 0)], b)
    md = results_tables(res, main='adnet')['EP1']
    assert 'n = 8 fold x run pairs' in md and '*' in md.splitlines()[2]
    md = results_tables(res[res.fold < 2], main='adnet')['EP1']
    assert 'n = 4 fold x run pairs' in md and 'no p below 0.062 is possible' in md and '*' not in md
