"""Benchmark fsmis.data.supervoxels on the real data: seconds and memory per volume, ratio to scikit-image 2D.

Runs every CHAOS volume (rho 5000) and every cardiac volume (rho 1000) in one process and prints, per set, the median
wall and CPU seconds per volume of `supervoxels` (first-call compilation excluded: one warm-up call on a small volume
first; numba caches compiled code between processes), the peak resident-memory increase during a call (sampled every
2 ms by a thread), and, on the same volumes in the same run, scikit-image's 2D Felzenszwalb applied slice by slice with
SSL-ALPNet's superpixel settings (scale 1, sigma 1, min_size 400): ratio = ours / skimage (per-volume medians).
It also recomputes the faithfulness figures (ARI and counts against reference_supervoxels/).

Usage: python bench/bench_supervoxels.py [--sets chaos_t2,ms_cmrseg_bssfp] [--limit N] [--tie-order stable|numpy1]
The machine load (1-minute load average) is printed before and after: other processes inflate the timings; the ratio
to the skimage baseline, measured interleaved on the same volumes, is the fairer figure.
"""
import os, sys, time, threading, argparse
os.environ.setdefault('OMP_NUM_THREADS', '1')
import numpy as np
import psutil
from skimage.segmentation import felzenszwalb
from fsmis.core import data_root
from fsmis.data.datasets import open_dataset
from fsmis.data.io import read_nifti
from fsmis.data.supervoxels import supervoxels, adjusted_rand_index


class PeakRSS:
    "Context manager: peak RSS increase (bytes) over the block, sampled by a thread."
    def __init__(self, dt=0.002): self.dt, self.proc = dt, psutil.Process()
    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss); time.sleep(self.dt)
    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event(); self._t = threading.Thread(target=self._run, daemon=True); self._t.start()
        return self
    def __exit__(self, *a):
        self._stop.set(); self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss); self.delta = self.peak - self.base


def skimage_slices(vol):
    "Baseline: scikit-image 2D Felzenszwalb slice by slice (scale 1, sigma 1, min_size 400)."
    return np.stack([felzenszwalb(sl, scale=1, sigma=1, min_size=400) for sl in vol])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--sets', default='chaos_t2,ms_cmrseg_bssfp')
    ap.add_argument('--tie-order', default='stable', choices=['stable', 'numpy1'])
    ap.add_argument('--limit', type=int, default=0, help='only the first N volumes of each set (0: all)')
    args = ap.parse_args()
    if data_root() is None: sys.exit('real data not found: set FSMIS_DATA to the folder holding chaos_t2/ and ms_cmrseg_bssfp/')
    print(f'tie_order={args.tie_order}; load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores')
    t = time.time(); supervoxels(np.random.default_rng(0).normal(size=(4, 32, 32)), (5., 1., 1.), rho=50, tie_order=args.tie_order)
    print(f'warm-up (numba compile or cache load): {time.time() - t:.2f} s')
    for name in args.sets.split(','):
        ds = open_dataset(name); rho = ds.spec.rho
        ids = ds.case_ids[:args.limit] if args.limit else ds.case_ids
        rows = []
        for cid in ids:
            c = ds.load(cid, normalize=False)
            gc_vol = c.image
            with PeakRSS() as m:
                t0, p0 = time.perf_counter(), time.process_time()
                sv = supervoxels(gc_vol, c.spacing, rho=rho, tie_order=args.tie_order)
                t1, p1 = time.perf_counter(), time.process_time()
            t2 = time.perf_counter(); skimage_slices(gc_vol); t3 = time.perf_counter()
            ref, _, _ = read_nifti(ds.image_path(cid).parent/'reference_supervoxels'/f'superpix-MIDDLE_{cid}.nii.gz', dtype=None)
            rows.append(dict(case=cid, shape=c.image.shape, wall=t1 - t0, cpu=p1 - p0, mem=m.delta / 2**20, sk=t3 - t2,
                             n=int(sv.max()), n_ref=int(len(np.unique(ref)) - 1), ari=adjusted_rand_index(sv, ref)))
            r = rows[-1]
            print(f"  {name} {cid:>3} {str(r['shape']):>16}: ours {r['wall']:.2f} s (cpu {r['cpu']:.2f}), "
                  f"+{r['mem']:.0f} MiB, skimage-2D {r['sk']:.2f} s | n {r['n']} (ref {r['n_ref']}) ARI {r['ari']:.4f}", flush=True)
        col = lambda k: np.array([r[k] for r in rows])
        print(f"{name} (rho {rho}, {len(rows)} volumes): median {np.median(col('wall')):.2f} s/volume wall "
              f"(cpu {np.median(col('cpu')):.2f}), max {col('wall').max():.2f} s; peak memory +{col('mem').max():.0f} MiB "
              f"(median +{np.median(col('mem')):.0f}); skimage 2D slice-by-slice median {np.median(col('sk')):.2f} s; "
              f"ratio ours/skimage {np.median(col('wall')) / np.median(col('sk')):.2f} "
              f"(per-volume ratios median {np.median(col('wall') / col('sk')):.2f})")
        print(f"{name}: ARI mean {col('ari').mean():.4f} min {col('ari').min():.4f}; count ours {col('n').min()}-{col('n').max()} "
              f"(median {np.median(col('n')):.0f}), reference {col('n_ref').min()}-{col('n_ref').max()} (median {np.median(col('n_ref')):.0f})")
    print(f'load average after: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__': main()
