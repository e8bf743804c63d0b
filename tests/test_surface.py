"""Surface distances (HD95, ASSD in mm): hand-computed values on cubes, a brute-force check, symmetry, spacing,
empty masks, the evaluated-slices restriction, the `hd95` / `assd` columns of `evaluate_case`, and the distance
tables (infinite volumes counted, never averaged)."""
import numpy as np, pandas as pd, pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from fsmis.core import Case
from fsmis.eval.metrics import (surface_voxels, surface_distances, summarize, summary_tables, results_tables,
                                available_metrics, infinite_counts, METRICS)
from fsmis.eval.protocols import evaluate_case, evaluate
from fsmis.models.intensity import IntensityPrototype

CHAOS = (3.0, 1.25, 1.25)  # (z, h, w) mm


def _cube(lo, hi, shape=(12, 10, 10)):
    m = np.zeros(shape, bool); m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_cube_surface():
    "A 4 x 4 x 4 cube: 64 voxels, 8 in the 2 x 2 x 2 core, 56 on the surface (face neighbours, 6-connectivity)."
    s = surface_voxels(_cube((2, 2, 2), (6, 6, 6)))
    assert s.sum() == 56 and not s[3:5, 3:5, 3:5].any()


def test_cubes_shifted_two_slices_by_hand():
    """Cubes A = [2:6]^3 and B = A shifted by 2 slices (z), spacing (3, 1.25, 1.25) mm. 56 surface voxels each.

    A -> B: A's bottom face z=2 (16 voxels) is 2 slices = 6 mm below B (B's bottom face z=4 is all surface);
    the ring of z=3 (16 - 4 core = 12 voxels) is 3 mm from B's bottom face; the rings of z=4 and z=5 (24 voxels)
    lie on B's surface (B's bottom face and B's side walls), 0 mm; the 4 centre voxels of A's top face z=5 are
    inside B's core, 1 in-plane step from B's side wall: 1.25 mm (the nearest in z, B's bottom face, is 3 mm).
    B -> A is the mirror image. The 112 pooled distances: 48 x 0, 8 x 1.25, 24 x 3, 32 x 6 mm.
    ASSD = (8*1.25 + 24*3 + 32*6) / 112 = 274 / 112 = 2.4464 mm.
    HD95: position 0.95 * 111 = 105.45 of the sorted distances (linear interpolation); positions 80-111 are 6 mm,
    so HD95 = 6 mm.
    """
    a, b = _cube((2, 2, 2), (6, 6, 6)), _cube((4, 2, 2), (8, 6, 6))
    sd = surface_distances(a, b, CHAOS)
    assert sd['assd'] == pytest.approx(274 / 112) and sd['hd95'] == pytest.approx(6.0)


def test_cubes_shifted_one_column_by_hand():
    """B = A shifted by 1 voxel in w, spacing (3, 1.25, 1.25). A -> B: A's face w=2 (16 voxels) is 1.25 mm from B's
    face w=3; the 4 voxels of A's face w=5 with z, h in {3, 4} are in B's core, 1.25 mm from B's face w=6 (or its
    side walls in h); the other 36 surface voxels of A lie on B's surface. Same the other way: 112 distances,
    40 x 1.25 mm, 72 x 0. ASSD = 40 * 1.25 / 112 = 50 / 112 = 0.4464 mm; HD95 at position 105.45 >= 72: 1.25 mm.
    """
    a, b = _cube((2, 2, 2), (6, 6, 6)), _cube((2, 2, 3), (6, 6, 7))
    sd = surface_distances(a, b, CHAOS)
    assert sd['assd'] == pytest.approx(50 / 112) and sd['hd95'] == pytest.approx(1.25)


def test_a_percentile_between_two_values():
    """A single voxel against a 1 x 1 x 3 bar along w (1 mm spacing), the voxel at the bar's first end.
    Surfaces: the voxel (1 point) and the bar (3 points, all surface). voxel -> bar: 0; bar -> voxel: 0, 1, 2.
    Pooled: 0, 0, 1, 2. ASSD = 3/4. HD95: position 0.95 * 3 = 2.85, between 1 and 2: 1 + 0.85 = 1.85."""
    p = np.zeros((3, 3, 5), bool); p[1, 1, 1] = True
    t = np.zeros_like(p); t[1, 1, 1:4] = True
    sd = surface_distances(p, t)
    assert sd['assd'] == pytest.approx(0.75) and sd['hd95'] == pytest.approx(1.85)


def _brute(p, t, spacing):
    "Pairwise distances between surface voxels (scipy cdist): an independent definition of both metrics."
    P, T = (np.argwhere(surface_voxels(np.pad(m, 1))) * np.asarray(spacing) for m in (p, t))
    D = cdist(P, T)
    d = np.concatenate([D.min(1), D.min(0)])
    return np.percentile(d, 95), d.mean()


@pytest.mark.parametrize('seed', range(8))
def test_matches_brute_force_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    blob = lambda: ndimage.gaussian_filter(rng.normal(size=(10, 14, 13)), 2) > 0.05
    p, t, spacing = blob(), blob(), rng.uniform(0.5, 4, 3)
    sd = surface_distances(p, t, spacing)
    h, m = _brute(p, t, spacing)
    assert sd['hd95'] == pytest.approx(h) and sd['assd'] == pytest.approx(m)


def test_symmetric_translation_invariant_and_linear_in_spacing():
    rng = np.random.default_rng(0)
    p = ndimage.gaussian_filter(rng.normal(size=(10, 20, 20)), 2) > 0.1
    t = ndimage.binary_dilation(p, iterations=2) & ~(rng.random(p.shape) < 0.02)
    sd = surface_distances(p, t, CHAOS)
    assert surface_distances(t, p, CHAOS) == sd
    two = surface_distances(p, t, [2 * s for s in CHAOS])
    assert two == pytest.approx({k: 2 * v for k, v in sd.items()})
    big = lambda m: np.pad(m, ((3, 1), (0, 5), (2, 2)))  # same shapes elsewhere in a larger scan: the crop is exact
    assert surface_distances(big(p), big(t), CHAOS) == pytest.approx(sd)
    assert surface_distances(p, p, CHAOS) == dict(hd95=0.0, assd=0.0)
    # anisotropy matters: the same voxels with z and w spacings exchanged give other distances
    assert surface_distances(p, t, (1.25, 1.25, 3.0)) != pytest.approx(sd)


def test_empty_masks():
    "Both empty: nan (nothing to measure, as Dice); one empty: inf (the distance to an empty surface), either way round."
    a, z = _cube((2, 2, 2), (6, 6, 6)), np.zeros((12, 10, 10), bool)
    assert all(np.isnan(v) for v in surface_distances(z, z, CHAOS).values())
    assert surface_distances(a, z, CHAOS) == surface_distances(z, a, CHAOS) == dict(hd95=np.inf, assd=np.inf)


def test_evaluated_slices_only():
    "`slices`: the other slices count as background, and a gap between evaluated slices keeps its thickness."
    t = np.zeros((10, 6, 6), bool); t[1:9, 2:4, 2:4] = True
    p = t.copy(); p[3:] = False  # the prediction stops after slice 2
    ev = [1, 2, 6, 7]
    keep = np.isin(np.arange(10), ev)[:, None, None]
    sd = surface_distances(p, t, CHAOS, slices=ev)
    assert sd == surface_distances(p & keep, t & keep, CHAOS)
    # target slices 6 and 7 are 4 and 5 slices (12, 15 mm) from the prediction's last slice, not 1 and 2 as when stacked
    assert sd['hd95'] == pytest.approx(15.0) and surface_distances(p[ev], t[ev], CHAOS)['hd95'] == pytest.approx(6.0)
    assert surface_distances(p, t, CHAOS, slices=[7]) == dict(hd95=np.inf, assd=np.inf)  # the prediction is empty there
    assert all(np.isnan(v) for v in surface_distances(p, t, CHAOS, slices=[0, 9]).values())  # both empty there
    assert all(np.isnan(v) for v in surface_distances(p, t, CHAOS, slices=[]).values())


def test_input_errors():
    a = _cube((2, 2, 2), (6, 6, 6))
    with pytest.raises(ValueError, match='shape'): surface_distances(a, a[1:], CHAOS)
    with pytest.raises(ValueError, match='spacing must be 3 positive numbers'): surface_distances(a, a, (3, 1.25))
    with pytest.raises(ValueError, match='spacing must be 3 positive numbers'): surface_distances(a, a, (3, -1, 1))
    with pytest.raises(ValueError, match='spacing must be 3 positive numbers'): surface_distances(a, a, (3, np.nan, 1))


# ---------------------------------------------------------------- evaluate_case
def _toy(seed, spacing=(1.0, 1.0, 1.0), z=9, n=24):
    rng = np.random.default_rng(seed)
    lab = np.zeros((z, n, n), np.int64)
    lab[1:8, 4:10, 4:10] = 1; lab[3:9, 14:20, 14:18] = 2
    img = np.where(lab == 1, 2., np.where(lab == 2, -2., 0.)).astype(np.float32) + rng.normal(0, .6, lab.shape).astype(np.float32)
    return Case(img, lab, spacing, case_id=str(seed), classes={1: 'a', 2: 'b'})


class _Blind(IntensityPrototype):
    "Predicts background everywhere: every class's prediction is empty."
    def segment(self, f, protos, size):
        p = super().segment(f, protos, size); p = p * 0; p[:, 0] = 1; return p


@pytest.mark.parametrize('protocol', ['EP1', 'EP2'])
def test_evaluate_case_columns_use_query_spacing(protocol):
    sup = _toy(0)
    rows = pd.DataFrame(evaluate_case(IntensityPrototype(), sup, _toy(1, CHAOS), protocol=protocol))
    twice = pd.DataFrame(evaluate_case(IntensityPrototype(), sup, _toy(1, tuple(2 * s for s in CHAOS)), protocol=protocol))
    assert {'hd95', 'assd'} <= set(rows.columns) and np.isfinite(rows[['hd95', 'assd']].to_numpy()).all()
    assert (rows[['hd95', 'assd']].to_numpy() > 0).all()  # noise: some boundary error
    np.testing.assert_allclose(twice[['hd95', 'assd']].to_numpy(), 2 * rows[['hd95', 'assd']].to_numpy())
    assert (twice.dice == rows.dice).all()
    off = evaluate_case(IntensityPrototype(), sup, _toy(1, CHAOS), protocol=protocol, surface=False)
    assert not {'hd95', 'assd'} & set(off[0]) and [r['dice'] for r in off] == rows.dice.tolist()


def test_evaluate_case_values_are_surface_distances_of_the_prediction(monkeypatch):
    "EP1 scores the labelled slices only: each row is surface_distances of the prediction on those slices, at the query's spacing."
    import fsmis.eval.protocols as P
    sup, qry = _toy(0), _toy(1, CHAOS)
    fixed = {1: np.roll(qry.label == 1, 1, axis=2).astype(np.uint8), 2: np.ones(qry.shape, np.uint8)}  # class b: everything
    monkeypatch.setattr(P, 'predict_tasks', lambda *a, **k: fixed)
    rows = evaluate_case(IntensityPrototype(), sup, qry, protocol='EP1')
    for r in rows:
        ev = np.flatnonzero((qry.label == r['cls']).any((1, 2)))
        assert r['n_slices'] == len(ev)
        want = surface_distances(fixed[r['cls']], qry.label == r['cls'], CHAOS, slices=ev)
        assert {k: r[k] for k in want} == pytest.approx(want)
    assert rows[0]['hd95'] == pytest.approx(1.25)  # one column off: one in-plane step
    assert rows[1]['hd95'] != pytest.approx(surface_distances(fixed[2], qry.label == 2, CHAOS)['hd95'])  # not all slices


def test_missed_organ_is_infinite_and_counted_in_the_table():
    cases = {str(i): _toy(i, CHAOS) for i in range(3)}
    df = evaluate(_Blind(), cases, '0', ['1', '2'], protocol='EP2')
    assert (df.dice == 0).all() and np.isinf(df.hd95).all() and np.isinf(df.assd).all()
    good = evaluate(IntensityPrototype(), cases, '0', ['1', '2'], protocol='EP2')
    res = pd.concat([good.assign(method='intensity'), df.assign(method='blind')]).assign(fold=0, run=0)
    md = results_tables(res, ['a', 'b'], metrics=available_metrics(res))['EP2']
    assert 'inf' not in md.replace('infinite', '')  # no inf in a mean
    assert '| blind | nan ± nan |' in md  # every volume infinite: no mean, not a number
    assert 'infinite HD95 (prediction or target empty), left out of the means: blind a: 2 of 2 volumes, blind b: 2 of 2 volumes' in md
    assert 'infinite ASSD' in md


# ---------------------------------------------------------------- tables
def _results(rng):
    rows = [dict(method=m, fold=f, run=r, protocol='EP2', threshold_sweep=False, case=q, **{'class': c},
                 dice=float(np.clip(mu + rng.normal(0, .05), 0, 1)), hd95=float(h + rng.normal(0, 1)), assd=float(h / 4 + rng.normal(0, .2)))
            for m, mu, h in (('adnet', .75, 10.), ('panet', .6, 20.)) for f in range(3) for r in range(2)
            for c in ('liver', 'spleen') for q in '123']
    return pd.DataFrame(rows)


def test_distance_tables_same_rule_as_dice():
    res = _results(np.random.default_rng(0))
    res.loc[0, 'hd95'] = np.inf  # adnet, fold 0, run 0, liver, volume 1
    h = summary_tables(res, ['spleen', 'liver'], metric='hd95')['EP2']
    keep = res[(res.method == 'adnet') & (res['class'] == 'liver') & np.isfinite(res.hd95)]
    runs = keep.groupby(['fold', 'run']).hd95.mean()
    assert h.loc['adnet', 'liver'] == pytest.approx(runs.mean()) and h.loc['adnet', 'liver std'] == pytest.approx(runs.std(ddof=0))
    assert h.loc['adnet', 'Mean'] == pytest.approx((h.loc['adnet', 'liver'] + h.loc['adnet', 'spleen']) / 2)  # mm: not x 100
    assert np.isfinite(h.to_numpy()).all()
    n = infinite_counts(res[res.method == 'adnet'], 'hd95')
    assert n.set_index('class').n_inf.to_dict() == {'liver': 1, 'spleen': 0} and set(n.n) == {18}
    with pytest.raises(ValueError, match='metric'): summarize(res, metric='hd99')
    with pytest.raises(ValueError, match=r"missing columns \['hd95'\].*surface=True"): summarize(res.drop(columns='hd95'), metric='hd95')


def test_results_tables_dice_first_and_default_unchanged():
    res = _results(np.random.default_rng(1))
    plain = results_tables(res, ['liver', 'spleen'], main='adnet')
    assert plain == results_tables(res.drop(columns=['hd95', 'assd']), ['liver', 'spleen'], main='adnet')
    assert plain['EP2'].startswith('| Method | liver | spleen | Mean |')
    md = results_tables(res, ['liver', 'spleen'], main='adnet', metrics=('dice', 'hd95', 'assd'))['EP2']
    parts = md.split('\n\n')
    assert parts[0] == METRICS['dice'] and parts[1] == plain['EP2'].split('\n\n')[0]  # then the Wilcoxon note
    heads = [l for l in md.splitlines() if l in METRICS.values()]
    assert heads == ['Dice (%)', 'HD95 (mm)', 'ASSD (mm)']
    assert md.count('one-sided Wilcoxon') == 1  # the test is on Dice only
    assert available_metrics(res) == ('dice', 'hd95', 'assd')
    assert available_metrics(res.assign(hd95=np.nan).drop(columns='assd')) == ('dice',)
    assert results_tables(res, metrics='hd95')['EP2'].startswith('| Method |')
    with pytest.raises(ValueError, match='choose from'): results_tables(res, metrics=('dice', 'hausdorff'))


def test_infinite_distances_survive_results_csv(tmp_path):
    "results.csv keeps inf and nan apart (`inf` and an empty field), so tables re-read from it are the same."
    res = _results(np.random.default_rng(2))
    res.loc[[0, 5], 'hd95'] = np.inf; res.loc[7, 'assd'] = np.nan
    res.to_csv(tmp_path/'results.csv', index=False)
    back = pd.read_csv(tmp_path/'results.csv', dtype={'case': str})
    assert np.isinf(back.hd95).sum() == 2 and back.assd.isna().sum() == 1
    m = ('dice', 'hd95', 'assd')
    assert results_tables(back, metrics=m, main='adnet') == results_tables(res, metrics=m, main='adnet')
