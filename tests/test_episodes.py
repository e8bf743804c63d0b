"Episode samplers, augmentation and DataLoaders (fsmis.data.augment, fsmis.data.episodes), from outside the package."
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fsmis.core import Case
from fsmis.data.augment import (EpisodeAugment, RandomGamma, adnet_augment, alpnet_augment, augment_slice,
                                gamma_transform, paper_geometry, smooth_noise)
from fsmis.data.episodes import (Episode, EpisodeDataset, EpisodeDL, MixtureSampler, PSSLSampler, SupervisedSampler,
                                 VSSLSampler, densemp_finetune_sampler, episode_dls, slice_counts)

torch.set_num_threads(1)


# ---------------------------------------------------------------- fixtures
def _toy(cid='0', z=10, hw=48, seed=0):
    "Tiny case: class 1 ellipse in slices 2..7, class 2 disc in 4..7; 4x4 box pseudo-labels split at slice 5."
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[:hw, :hw] / hw
    lab = np.zeros((z, hw, hw), np.uint8)
    for k in range(2, 8): lab[k][((yy - .45) / .25)**2 + ((xx - .4) / .2)**2 < 1] = 1
    for k in range(4, 8): lab[k][((yy - .7)**2 + (xx - .75)**2) < .012] = 2
    img = (r.normal(0, .1, lab.shape) + 1.5 * lab).astype(np.float32)
    pl = (1 + (yy * 4).astype(int) * 4 + (xx * 4).astype(int))[None].repeat(z, 0) + 16 * (np.arange(z) >= 5)[:, None, None]
    pl[:, :, :3] = 0
    return Case(img, lab, (5., 1.5, 1.5), case_id=cid, classes={1: 'big', 2: 'small'}), pl.astype(np.int32)


@pytest.fixture(scope='module')
def toy():
    t = [_toy(str(i), seed=i) for i in range(3)]
    return [c for c, _ in t], [p for _, p in t]


@pytest.fixture(scope='module')
def phantom():
    "Four small phantom cases with their ADNet supervoxels (rho 1000) and SSL-ALPNet superpixels (cached)."
    from fsmis.data.datasets import open_dataset
    from fsmis.data.supervoxels import dataset_supervoxels
    ds = open_dataset('phantom', n_cases=4, shape=(16, 96, 96))
    sv = dataset_supervoxels(ds, mode='3d', n_workers=1, progress=False)
    sp = dataset_supervoxels(ds, mode='2d', n_workers=1, progress=False)
    return ds, [ds.load(c) for c in ds.case_ids], sv, sp


# ---------------------------------------------------------------- augmentation
def _dice(a, b): return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize('seed', range(8))
def test_augment_keeps_image_and_mask_aligned(seed):
    torch.manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(128.), torch.arange(128.), indexing='ij')
    mask = (((yy - 60) / 30)**2 + ((xx - 70) / 22)**2 < 1).to(torch.uint8)
    img = mask[None].float() * 2 - 1  # the image IS the mask: warped together they must still coincide
    ai, am = augment_slice(img, mask, paper_geometry(size=128), RandomGamma())
    assert am.dtype == torch.uint8 and set(am.unique().tolist()) <= {0, 1}
    assert _dice(ai[0] > 0, am > 0) > 0.97
    assert not torch.equal(am, mask)
    ratio = am.sum().item() / mask.sum().item()  # isotropic scale 0.9-1.2 (shear ~1): area x 0.81..1.44
    assert 0.75 < ratio < 1.5


def test_affine_ranges_match_the_paper():
    aff = paper_geometry(size=256).affine
    assert tuple(aff.degrees) == (-5., 5.) and tuple(aff.scale) == (0.9, 1.2)
    assert tuple(aff.shear) == (-5., 5.) and np.allclose(np.array(aff.translate) * 256, 5)
    torch.manual_seed(0)  # a point far from the centre moves by at most rotation + scale + shear + shift
    for _ in range(20):
        img = torch.zeros(1, 256, 256); img[0, 128, 128] = 1
        out = aff(__import__('torchvision').tv_tensors.Image(img))
        y, x = np.unravel_index(int(out[0].argmax()), (256, 256))
        assert abs(y - 128) <= 6 and abs(x - 128) <= 6  # the centre only shifts (±5 px, rounding)


@pytest.mark.parametrize('seed', range(4))
def test_fused_geometry_is_the_two_step_geometry(seed):
    "AffineElastic = v2.RandomAffine then ElasticTransform (same draws), resampled once instead of twice."
    from torchvision import tv_tensors
    yy, xx = torch.meshgrid(torch.arange(96.), torch.arange(96.), indexing='ij')
    img = (torch.sin(xx / 8) + torch.cos(yy / 6) + 2)[None]
    mask = ((yy - 50)**2 + (xx - 45)**2 < 25**2).to(torch.uint8)
    for alpha, tol, min_dice in ((0., 1e-4, 0.999), (10., 5e-3, 0.97)):
        torch.manual_seed(seed); ti, tm = paper_geometry(size=96, alpha=alpha, fused=False)(tv_tensors.Image(img), tv_tensors.Mask(mask))
        torch.manual_seed(seed); fi, fm = paper_geometry(size=96, alpha=alpha)(tv_tensors.Image(img), tv_tensors.Mask(mask))
        assert type(fi) is tv_tensors.Image and type(fm) is tv_tensors.Mask and fm.dtype == torch.uint8
        assert (fi - ti)[..., 16:-16, 16:-16].abs().max() / img.max() < tol
        assert _dice(fm > 0, tm > 0) > min_dice
    # both consumed the RNG alike: the next draws agree
    torch.manual_seed(seed); paper_geometry(size=96, fused=False)(tv_tensors.Image(img)); a = torch.rand(3)
    torch.manual_seed(seed); paper_geometry(size=96)(tv_tensors.Image(img)); b = torch.rand(3)
    assert torch.equal(a, b)


def test_elastic_field_statistics():
    torch.manual_seed(0)
    d = smooth_noise((64, 128, 128), 5.) * 10  # alpha 10 px, sigma 5 px
    # uniform [-1,1] (var 1/3) smoothed by a 2D Gaussian: var = (1/3) / (4 pi sigma^2)
    expect = 10 * np.sqrt((1 / 3) / (4 * np.pi * 25))
    assert abs(d.std().item() - expect) / expect < 0.05


def test_gamma_keeps_range_and_orders():
    x = torch.randn(1, 32, 32) * 2 - 0.5
    for g in (0.5, 0.8, 1.2, 1.5):
        y = gamma_transform(x, g)
        assert torch.isclose(y.min(), x.min(), atol=1e-5) and torch.isclose(y.max(), x.max(), atol=1e-4)
        assert ((y > x).float().mean() > 0.9) == (g < 1)
    with pytest.raises(ValueError, match='gamma'): RandomGamma((2, 1))


def test_episode_augment_policies():
    si = torch.randn(2, 1, 40, 40); sm = (torch.rand(2, 40, 40) > .5).long(); qi, qm = torch.randn(1, 1, 40, 40), torch.zeros(1, 40, 40).long()
    one = adnet_augment(size=40)
    touched = []
    for s in range(60):
        r = one(si, sm, qi, qm, rng=np.random.default_rng(s))
        touched.append((not torch.equal(r[0], si), not torch.equal(r[2], qi)))
    t = np.array(touched)
    assert t.any(1).all()  # ADNet: something changes every time...
    assert 0.2 < t[:, 0].mean() < 0.95 and 0.2 < t[:, 1].mean() < 0.95  # ...each side about 3/4 of the time
    both = alpnet_augment(size=40)(si, sm, qi, qm, rng=np.random.default_rng(0))
    assert not torch.equal(both[0][0], both[0][1])  # each shot its own draw
    none = EpisodeAugment(geom_on='none', gamma_on='none')(si, sm, qi, qm, rng=np.random.default_rng(0))
    for a, b in zip(none, (si, sm, qi, qm)): assert torch.equal(a, b)
    with pytest.raises(ValueError, match='gamma_on'): EpisodeAugment(gamma_on='x')


# ---------------------------------------------------------------- vSSL
def _check_vssl(e, pls_by_id, min_pixels, dist=1, plain=True):
    (cs, zs), (cq, zq) = e.support[0], e.query[0]
    pl = pls_by_id[cs]
    assert cs == cq and abs(zs - zq) == dist
    assert (pl[zs] == e.label).sum() >= min_pixels and (pl[zq] == e.label).any() and e.label > 0
    if plain:
        assert np.array_equal(e.sup_masks[0].numpy(), pl[zs] == e.label)
        assert np.array_equal(e.qry_masks[0].numpy(), pl[zq] == e.label)


def test_vssl_rules_toy(toy):
    cases, pls = toy
    by_id = {c.case_id: p for c, p in zip(cases, pls)}
    for dist in (1, 2):
        smp = VSSLSampler(cases, pls, dist=dist, min_pixels=100, augment=False)
        eps = [smp(s) for s in range(150)]
        for e in eps: _check_vssl(e, by_id, 100, dist)
        up = np.mean([e.support[0][1] < e.query[0][1] for e in eps])
        assert 0.35 < up < 0.65
    # boxes cut by the 'outside' strip (108 px) are never drawn at min_pixels=120; whole boxes (144 px) are
    smp = VSSLSampler(cases, pls, min_pixels=120, augment=False)
    labels = set()
    for s in range(100): e = smp(s); _check_vssl(e, by_id, 120); labels.add(e.label % 16)
    assert not labels & {1, 5, 9, 13}


def test_vssl_min_pixels_on_first(toy):
    cases, pls = toy
    smp = VSSLSampler(cases, pls, min_pixels=100, min_pixels_on='first', augment=False)
    for s in range(50):
        e = smp(s); lo = min(e.support[0][1], e.query[0][1])
        assert (pls[int(e.support[0][0])][lo] == e.label).sum() >= 100


def test_vssl_multi_shot_windows(toy):
    cases, pls = toy
    smp = VSSLSampler(cases, pls, n_shots=2, n_queries=2, min_pixels=100, augment=False)
    for s in range(40):
        e = smp(s)
        zs = [z for _, z in e.support + e.query]
        assert np.all(np.abs(np.diff(zs)) == 1) and len(set(np.sign(np.diff(zs)))) == 1
        assert e.sup_imgs.shape == (2, 1, 48, 48) and e.qry_masks.shape == (2, 48, 48)


def test_vssl_impossible_requests_fail_fast(toy):
    cases, pls = toy
    with pytest.raises(ValueError, match='no supervoxel spans'): VSSLSampler(cases, pls, n_shots=3, n_queries=3)
    with pytest.raises(ValueError, match='no supervoxel spans'): VSSLSampler(cases, [np.zeros_like(p) for p in pls])
    with pytest.raises(ValueError, match='no supervoxel spans'): VSSLSampler(cases, pls, dist=20)
    with pytest.raises(ValueError, match='pseudo_labels'): VSSLSampler(cases, pls[:2])
    with pytest.raises(ValueError, match='shape'): VSSLSampler(cases, [p[:, :10] for p in pls])
    with pytest.raises(ValueError, match='integer'): VSSLSampler(cases, [p.astype(float) for p in pls])
    with pytest.raises(ValueError, match='dist'): VSSLSampler(cases, pls, dist=0)
    with pytest.raises(ValueError, match='empty'): VSSLSampler([], [])


def test_vssl_phantom(phantom):
    ds, cases, sv, _ = phantom
    smp = VSSLSampler(cases, sv, augment=False)
    for s in range(100): _check_vssl(smp(s), sv, 200)
    aug = VSSLSampler(cases, sv, size=64)
    e = aug(0)
    assert e.sup_imgs.shape == (1, 1, 64, 64) and e.qry_masks.dtype == torch.int64


@pytest.mark.data
def test_vssl_on_chaos_reference_supervoxels(data_root):
    from fsmis.data.datasets import open_dataset
    from fsmis.data.io import read_nifti
    ds = open_dataset('chaos_t2', root=data_root)
    ids = ds.case_ids[:4]
    cases = [ds.load(c) for c in ids]
    sv = {c: read_nifti(data_root / 'chaos_t2' / 'reference_supervoxels' / f'superpix-MIDDLE_{c}.nii.gz', reorient=False)[0].astype(np.int32) for c in ids}
    for c in cases: assert sv[c.case_id].shape == c.shape
    smp = VSSLSampler(cases, sv, augment=False)
    assert smp.n_candidates > 1000
    eps = [smp(s) for s in range(300)]
    for e in eps: _check_vssl(e, sv, 200)
    assert 0.4 < np.mean([e.support[0][1] < e.query[0][1] for e in eps]) < 0.6
    assert len({(e.support[0][0], e.label) for e in eps}) > 40  # many different supervoxels
    e = VSSLSampler(cases, sv)(1)  # with ADNet's augmentation
    assert e.sup_imgs.shape == (1, 1, 256, 256) and torch.isfinite(e.sup_imgs).all()


# ---------------------------------------------------------------- pSSL
def test_pssl_rules(toy):
    cases, pls = toy
    plain = PSSLSampler(cases, pls, min_pixels=100, augment=False)
    for s in range(50):
        e = plain(s)
        assert e.support == e.query and torch.equal(e.sup_imgs, e.qry_imgs)
        c, z = e.support[0]
        assert (pls[int(c)][z] == e.label).sum() >= 100
    e = PSSLSampler(cases, pls, min_pixels=100)(0)
    assert e.support == e.query and not torch.equal(e.sup_imgs, e.qry_imgs)
    e = PSSLSampler(cases, pls, min_pixels=100, exclude_classes=[1, 2], augment=False)
    for s in range(30):
        c, z = e(s).support[0]
        assert not cases[int(c)].label[z].any()
    with pytest.raises(ValueError, match='no superpixel'): PSSLSampler(cases, pls, min_pixels=10**5)


def test_pssl_phantom_superpixels(phantom):
    _, cases, _, sp = phantom
    smp = PSSLSampler(cases, sp)
    e = smp(3)
    c, z = e.support[0]
    assert (sp[c][z] == e.label).sum() >= 200 and e.kind == 'pssl'


# ---------------------------------------------------------------- supervised, Settings 1 and 2
def test_supervised_settings_toy(toy):
    cases, _ = toy
    s2 = SupervisedSampler(cases, classes=[1], test_classes=[2], setting=2, augment=False)
    for s in range(100):
        e = s2(s)
        for c, z in e.support + e.query: assert not (cases[int(c)].label[z] == 2).any()
        assert e.support[0][0] != e.query[0][0]
        assert np.array_equal(e.qry_masks[0].numpy(), cases[int(e.query[0][0])].label[e.query[0][1]] == 1)
    same = SupervisedSampler(cases, classes=[1], pairing='same_case', n_shots=2, augment=False)
    for s in range(20):
        e = same(s); assert len({c for c, _ in e.support + e.query}) == 1 and len({z for _, z in e.support + e.query}) == 3
    anyp = SupervisedSampler(cases[:1], classes=[1, 2], pairing='any', augment=False)
    assert {anyp(s).label for s in range(30)} == {1, 2}


def test_supervised_impossible_requests(toy):
    cases, _ = toy
    with pytest.raises(ValueError, match='empty'): SupervisedSampler(cases, classes=[])
    with pytest.raises(ValueError, match='absent from every allowed slice'): SupervisedSampler(cases, classes=[7])
    with pytest.raises(ValueError, match='absent from every allowed slice'):  # every class-2 slice also holds class 1
        SupervisedSampler(cases, classes=[2], test_classes=[1], setting=2)
    with pytest.raises(ValueError, match='also test_classes'): SupervisedSampler(cases, classes=[1], test_classes=[1])
    with pytest.raises(ValueError, match='needs test_classes'): SupervisedSampler(cases, classes=[1], setting=2)
    with pytest.raises(ValueError, match='setting'): SupervisedSampler(cases, classes=[1], setting=3)
    with pytest.raises(ValueError, match='cannot be paired'): SupervisedSampler(cases[:1], classes=[1])
    full = Case(cases[0].image, np.full(cases[0].shape, 2, np.uint8), case_id='x')
    with pytest.raises(ValueError, match='excludes every slice'): SupervisedSampler([full], classes=[1], test_classes=[2], setting=2)
    with pytest.raises(ValueError, match='no label'): SupervisedSampler([Case(cases[0].image)], classes=[1])


def test_supervised_phantom_setting2(phantom):
    _, cases, _, _ = phantom
    s2 = SupervisedSampler(cases, classes=[2, 3], test_classes=[1, 4], setting=2, augment=False)
    hits = 0
    for s in range(200):
        e = s2(s)
        by = {c.case_id: c for c in cases}
        hits += sum(np.isin(by[c].label[z], [1, 4]).any() for c, z in e.support + e.query)
    assert hits == 0


@pytest.mark.data
def test_setting2_on_chaos_excludes_every_test_organ_slice(data_root):
    from fsmis.data.datasets import open_dataset
    ds = open_dataset('chaos_t2', root=data_root)
    cases = [ds.load(c) for c in ds.case_ids[:8]]
    kidneys, liver_spleen = [2, 3], [1, 4]
    s2 = SupervisedSampler(cases, classes=kidneys, test_classes=liver_spleen, setting=2, augment=False)
    s1 = SupervisedSampler(cases, classes=kidneys, test_classes=liver_spleen, setting=1, augment=False)
    # every allowed slice: count those holding a test organ (must be 0)
    n_bad = sum(int(np.isin(c.label[a], liver_spleen).any(axis=(1, 2)).sum()) for c, a in zip(cases, s2.allowed))
    assert n_bad == 0
    any_rule = sum(int((~np.isin(c.label, liver_spleen).any(axis=(1, 2))).sum()) for c in cases)
    all_rule = sum(int((~(np.isin(c.label, [1]).any(axis=(1, 2)) & np.isin(c.label, [4]).any(axis=(1, 2)))).sum()) for c in cases)
    assert s2.n_allowed == any_rule < all_rule  # ANY test class excludes the slice: stricter than "all of them"
    by = {c.case_id: c for c in cases}
    n_test_organ = {1: 0, 2: 0}
    for s in range(300):
        for k, smp in ((1, s1), (2, s2)):
            e = smp(s)
            n_test_organ[k] += sum(np.isin(by[c].label[z], liver_spleen).any() for c, z in e.support + e.query)
    assert n_test_organ[2] == 0 and n_test_organ[1] > 100  # Setting 1 does show liver/spleen as background


# ---------------------------------------------------------------- mixture
def test_mixture(toy):
    cases, pls = toy
    mix = densemp_finetune_sampler(cases, pls, classes=[1], test_classes=[2], setting=2, min_pixels=100, augment=False)
    kinds = [mix(s).kind for s in range(300)]
    assert abs(kinds.count('supervised') / 300 - 0.25) < 0.07
    for s in range(60):
        e = mix(s)
        for c, z in e.support + e.query: assert not (cases[int(c)].label[z] == 2).any()  # Setting 2 on both parts
    v = VSSLSampler(cases, pls, min_pixels=100)
    with pytest.raises(ValueError, match='disagree'): MixtureSampler([v, VSSLSampler(cases, pls, min_pixels=100, size=24)])
    with pytest.raises(ValueError, match='weights'): MixtureSampler([v, v], [1, -1])


# ---------------------------------------------------------------- datasets and loaders
def test_dataset_determinism_and_fresh_epochs(toy):
    cases, pls = toy
    smp = VSSLSampler(cases, pls, min_pixels=100)
    a, b = EpisodeDataset(smp, 5, seed=3), EpisodeDataset(smp, 5, seed=3)
    for i in range(5):
        for x, y in zip(a[i], b[i]): assert torch.equal(x, y)
    assert not torch.equal(a[0][0], EpisodeDataset(smp, 5, seed=4)[0][0])
    dl = EpisodeDL(a, bs=5)
    p0, p1 = next(iter(dl))[0], next(iter(dl))[0]
    assert not torch.equal(p0, p1)
    v = EpisodeDL(EpisodeDataset(smp, 5, seed=3), bs=5, fresh=False)
    assert torch.equal(next(iter(v))[0], next(iter(v))[0])
    one = dl.one_batch()[0]; assert torch.equal(one, dl.one_batch()[0])  # one_batch does not advance
    with pytest.raises(IndexError): a.episode(5)


def test_workers_give_the_same_batches(toy):
    cases, pls = toy
    kw = dict(pseudo_labels=pls, sampler='vssl', n_episodes=6, bs=2, min_pixels=100, device='cpu', seed=5)
    b0 = list(episode_dls(cases, num_workers=0, **kw).train)
    b2 = list(episode_dls(cases, num_workers=2, **kw).train)
    assert len(b0) == len(b2) == 3
    for x, y in zip(b0, b2):
        for s, t in zip(x, y): assert torch.equal(s, t)


def test_episode_dls_batch_format_and_learner(toy):
    from fastai.learner import Learner
    cases, pls = toy
    dls = episode_dls(cases, pseudo_labels={c.case_id: p for c, p in zip(cases, pls)}, sampler='vssl', n_episodes=4,
                      bs=2, size=32, min_pixels=100, device='cpu', valid_ids=[cases[2]], valid_pseudo_labels=[pls[2]], n_valid=2)
    si, sm, qi, qm = dls.one_batch()
    assert dls.n_inp == 3
    assert (si.shape, sm.shape, qi.shape, qm.shape) == ((2, 1, 1, 32, 32), (2, 1, 32, 32), (2, 1, 1, 32, 32), (2, 1, 32, 32))
    assert (si.dtype, sm.dtype, qi.dtype, qm.dtype) == (torch.float32, torch.float32, torch.float32, torch.int64)

    class Toy(torch.nn.Module):
        def __init__(self): super().__init__(); self.c = torch.nn.Conv2d(1, 2, 3, padding=1)
        def forward(self, si, sm, qi): return self.c(qi[:, 0])[:, None] + (si * sm[:, :, None]).mean() * 0
    learn = Learner(dls, Toy(), loss_func=lambda p, y: F.cross_entropy(p.flatten(0, 1), y.flatten(0, 1)))
    learn.fit(2)
    assert len(learn.recorder.losses) == 4 and all(np.isfinite(float(l)) for l in learn.recorder.losses)
    assert len(learn.recorder.values) == 2  # validation ran on the fixed valid episodes


def test_episode_dls_from_dataset_and_supervised(phantom):
    ds, cases, sv, _ = phantom
    dls = episode_dls(ds, case_ids=ds.case_ids[:3], pseudo_labels=sv, n_episodes=2, device='cpu', size=64)
    assert dls.one_batch()[0].shape == (1, 1, 1, 64, 64)
    assert [c.case_id for c in dls.train.dataset.sampler.cases] == list(ds.case_ids[:3])
    sup = episode_dls(ds, sampler='supervised', classes=[2, 3], test_classes=[1, 4], setting=2, n_episodes=2, device='cpu', n_shots=2)
    assert sup.one_batch()[1].shape == (1, 2, 96, 96)
    with pytest.raises(ValueError, match='sampler must be one of'): episode_dls(ds, sampler='vsl')
    with pytest.raises(ValueError, match='not among'): episode_dls(cases, case_ids=['zz'], pseudo_labels=sv)


def test_show_batch_and_results(toy):
    import matplotlib; matplotlib.use('Agg')
    cases, pls = toy
    dls = episode_dls(cases, pseudo_labels=pls, n_episodes=2, bs=2, min_pixels=100, device='cpu')
    b = dls.one_batch()
    axs = dls.train.show_batch(b, max_n=2)
    assert axs.shape == (2, 2)
    axs = dls.train.show_results(b, torch.randn(2, 1, 2, 48, 48), max_n=1)
    assert axs.shape == (1, 2)
    e = dls.train.dataset.episode(0)
    assert isinstance(e, Episode) and len(e.show()) == 2


def test_slice_counts():
    v = np.array([[[0, 2], [2, 2]], [[1, 0], [0, 0]]])
    assert slice_counts(v).tolist() == [[1, 0, 3], [3, 1, 0]]
    with pytest.raises(ValueError): slice_counts(v - 1)


def test_unknown_sampler_options_are_named():
    "A misspelt or misplaced option is an error naming it, not a TypeError deep inside (or a silently ignored option)."
    from fsmis.data.phantom import make_phantom
    cases = [make_phantom(seed=s, shape=(12, 48, 48)) for s in range(2)]
    with pytest.raises(ValueError, match=r"no option\(s\) \['setting', 'test_classes'\]"):
        episode_dls(cases, pseudo_labels='supervoxels', sampler='vssl', setting=2, test_classes=[1])
    smp = SupervisedSampler(cases, classes=[1])
    with pytest.raises(ValueError, match='only to a sampler name'): episode_dls(cases, sampler=smp, size=32)
