"""Episode sampling + augmentation throughput at 256 x 256 on one core (target: >= 50 episodes/s per core).

Uses CHAOS T2 with the authors' reference supervoxels when the real data is present (FSMIS_DATA / ../shared/data),
else phantom cases made at 256 x 256 with our own supervoxels/superpixels. Prints episodes/s per sampler, single
thread (`torch.set_num_threads(1)`), plus a DataLoader figure with worker processes.
Usage: python bench/bench_episodes.py [--n 300] [--workers 2]

The table of nbs/08_data.episodes.ipynb is the run of 2026-12-02 on the 2-core development machine, otherwise idle
(CHAOS T2 with the authors' supervoxels, 4 cases, one torch thread; vSSL 162.1 episodes/s fused, 89.7 two-step).
"""
import argparse, os, time
os.environ.setdefault('OMP_NUM_THREADS', '1')
import numpy as np
import torch
from fsmis.core import data_root
from fsmis.data.episodes import (VSSLSampler, PSSLSampler, SupervisedSampler, densemp_finetune_sampler, episode_dls)


def load(n_cases=4):
    "(source name, cases, 3D supervoxels, 2D superpixels) at 256 x 256."
    root = data_root()
    if root is not None and (root / 'chaos_t2' / 'reference_supervoxels').is_dir():
        from fsmis.data.datasets import open_dataset
        from fsmis.data.io import read_nifti
        from fsmis.data.supervoxels import dataset_supervoxels
        ds = open_dataset('chaos_t2', root=root)
        ids = ds.case_ids[:n_cases]
        cases = [ds.load(c) for c in ids]
        sv = {c: read_nifti(root / 'chaos_t2' / 'reference_supervoxels' / f'superpix-MIDDLE_{c}.nii.gz', reorient=False)[0].astype(np.int32) for c in ids}
        sp = dataset_supervoxels(ds, mode='2d', case_ids=ids, progress=False)
        return 'CHAOS T2 (reference supervoxels)', cases, sv, sp
    from fsmis.data.datasets import open_dataset
    from fsmis.data.supervoxels import dataset_supervoxels
    ds = open_dataset('phantom', n_cases=n_cases, shape=(24, 256, 256))
    sv = dataset_supervoxels(ds, mode='3d', progress=False)
    sp = dataset_supervoxels(ds, mode='2d', progress=False)
    return 'phantom 24x256x256', [ds.load(c) for c in ds.case_ids], sv, sp


def rate(sampler, n):
    "Episodes per second drawing n episodes with fresh seeds (after a short warm-up)."
    for i in range(5): sampler.sample(np.random.default_rng(10**6 + i))
    t = time.perf_counter()
    for i in range(n): sampler.sample(np.random.default_rng(i))
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=300, help='episodes per measurement')
    ap.add_argument('--workers', type=int, default=2, help='DataLoader worker processes for the loader figure (0 = skip)')
    a = ap.parse_args()
    torch.set_num_threads(1)
    name, cases, sv, sp = load()
    print(f"data: {name}, {len(cases)} cases, slices {cases[0].shape[1:]}, torch {torch.__version__}, 1 thread")
    samplers = {
        'vssl (ADNet, aug one side)': VSSLSampler(cases, sv),
        'vssl, no augmentation': VSSLSampler(cases, sv, augment=False),
        'pssl (SSL-ALPNet, aug both)': PSSLSampler(cases, sp),
        'supervised S2 (aug both)': SupervisedSampler(cases, classes=[2, 3], test_classes=[1, 4], setting=2),
        'DenseMP mix 25/75': densemp_finetune_sampler(cases, sp, classes=[2, 3], test_classes=[1, 4], setting=2),
        'vssl 3-shot 1-query': VSSLSampler(cases, sv, n_shots=3, n_queries=1, min_pixels=200),
    }
    print(f"{'sampler':32s} {'episodes/s/core':>16s}  target 50")
    worst = np.inf
    for k, s in samplers.items():
        r = rate(s, a.n)
        if 'no augmentation' not in k and '3-shot' not in k: worst = min(worst, r)
        print(f"{k:32s} {r:16.1f}  {'ok' if r >= 50 else 'BELOW'}")
    print(f"slowest 1-shot sampler with augmentation: {worst:.1f} episodes/s per core ({worst / 50:.2f} x target)")
    if a.workers:
        dls = episode_dls(cases, pseudo_labels=sv, sampler='vssl', n_episodes=a.n, bs=8, num_workers=a.workers, device='cpu')
        next(iter(dls.train))
        t = time.perf_counter(); n = sum(len(b[0]) for b in dls.train)
        print(f"EpisodeDL vssl, bs 8, {a.workers} workers: {n / (time.perf_counter() - t):.1f} episodes/s")


if __name__ == '__main__':
    main()
