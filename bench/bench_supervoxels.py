"""Benchmark fsmis.data.supervoxels against the ADNet authors' original supervoxel code, side by side, on the real data.

For every volume of each set (CHAOS rho 5000, cardiac rho 1000), one fresh process per call, the two in alternating
order (original first on even volumes, fsmis first on odd ones), so that neither gets a warmer machine:
- original: `felzenszwalb_3d(img255, min_size=rho, sigma=0, spacing=(z, x, y))` from sha168/ADNet's `supervoxels/`
  (the Cython extension `felzenszwalb_3d_cy`, built from their files; not shipped with fsmis), on the volume
  min-max rescaled to 0-255 in float64 (as their script; the rescale is timed, their per-slice body mask is not);
- fsmis: `supervoxels(image, spacing, rho)`: rescale, kernel, body mask and relabelling (numba compilation excluded:
  a warm-up call on a small volume first; the compiled code is cached on disk).
Each process reports the wall and CPU seconds of the call and its peak resident-memory increase over the call (the
process's peak RSS when the call raised it, else a 2 ms sampling thread's peak, minus the RSS just before the call).
Per set: medians, the ratio of median times (original / fsmis) and the per-volume ratios, and the memory ratio; the
fsmis worker also gives the ARI and the count against reference_supervoxels/ (the authors' files).

Getting the original (once): `git clone https://github.com/sha168/ADNet`, then in `ADNet/supervoxels/`, with numpy and
Cython installed, build its two extensions with Cython 0.29's semantics:
    python -c "from setuptools import setup, Extension; from Cython.Build import cythonize; import numpy;
    setup(script_args=['build_ext', '--inplace'], ext_modules=cythonize([Extension(n, [n + '.pyx'],
    include_dirs=[numpy.get_include()]) for n in ('_ccomp', 'felzenszwalb_3d_cy')],
    compiler_directives={'legacy_implicit_noexcept': True}))"
and pass that folder as `--adnet` (or set ADNET_SUPERVOXELS). Their own `setup.py build_ext --inplace` works too, but
under Cython 3 it makes every `find_root` call check for a Python error with the GIL taken (their cdef functions are
not declared `noexcept`): that build is about 2x slower than one with Cython 0.29's semantics, which their code
was written for (CHAOS 31.6-37.9 s against 14.5-16.8 s per volume at load ~2), and would flatter fsmis. Without --adnet the bench times fsmis alone.

Usage: python bench/bench_supervoxels.py --adnet PATH/ADNet/supervoxels [--sets chaos_t2,ms_cmrseg_bssfp] [--limit N]
       [--tie-order stable|numpy1] [--skimage]
The load average is printed before and after: other processes inflate the timings, the original's more than
fsmis's (its argsort and gathers are memory-bound), so quote figures measured on an idle machine.

Measured 2026-12-04 on the 2-core development machine (other sessions' tests running beside it: load average
given per run), first 5 volumes of each set, `--limit 5`:
  load 2.95 before, 4.15 after (`--adnet` a build with Cython 0.29 semantics, as above):
  chaos_t2: fsmis median 0.73 s/volume (0.65-0.76), +125 MiB median (+127 max); original median 15.66 s (14.41-22.42),
    +2109 MiB median (+2169 max); speed-up 21.6x (ratio of medians; per volume 20.6-30.7x, median 22.5x);
    memory 16.9x less (per volume 15.7-17.4x); ARI mean 0.9502 (min 0.8954)
  ms_cmrseg_bssfp: fsmis median 0.27 s/volume (0.21-0.45), +69 MiB median (+90 max); original median 4.21 s
    (3.73-10.07), +734 MiB median (+1094 max); speed-up 15.4x (per volume 10.4-22.4x, median 17.7x); memory 10.6x
    less (per volume 10.0-12.2x); ARI mean 0.9778 (min 0.9388)
  An earlier run of the same (load 2.5-3.1): CHAOS 21.9x (per volume 21.2-29.0x), memory 15.5x; cardiac 12.8x.
  CHAOS cases 1-2 alone at load ~2: original 14.45-16.79 s, fsmis 0.46-0.53 s (31.6x).
Earlier the same day, same volumes, the original built with Cython 3 defaults (the slow build described above), load
1.5-2.4: CHAOS original median 35.8 s, fsmis 0.74 s (48.2x); cardiac 8.9 s vs 0.38 s (23.2x); and under load 4-6: CHAOS
52.6 s vs 1.24 s (42.4x). fsmis before that day's kernel changes, same process and load (~1.5), CHAOS case 1:
0.80-0.82 s against 0.48-0.50 s after. Idle figures from before (same machine kind): original 10.1-15.6 s and ~2.1 GB
per CHAOS volume, 3-6 s and 0.75-1.1 GB cardiac; fsmis then 0.54-0.68 s and ~200 MB.
"""
import os, sys, time, json, threading, argparse, resource, subprocess
import numpy as np

HERE = os.path.abspath(__file__)


class PeakRSS:
    "Context manager: peak RSS increase (bytes) over the block: the process's peak RSS when the block raised it, else the peak of a sampling thread."
    def __init__(self, dt=0.002):
        import psutil
        self.dt, self.proc = dt, psutil.Process()
    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss); time.sleep(self.dt)
    def __enter__(self):
        self.max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event(); self._t = threading.Thread(target=self._run, daemon=True); self._t.start()
        return self
    def __exit__(self, *a):
        self._stop.set(); self._t.join()
        max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = max(self.peak, self.proc.memory_info().rss, max1 if max1 > self.max0 else 0)
        self.delta = self.peak - self.base


def skimage_slices(vol):
    "Baseline: scikit-image 2D Felzenszwalb slice by slice (scale 1, sigma 1, min_size 400)."
    from skimage.segmentation import felzenszwalb
    return np.stack([felzenszwalb(sl, scale=1, sigma=1, min_size=400) for sl in vol])


def worker(args):
    "One timed call in this process; prints one JSON line."
    from fsmis.data.datasets import open_dataset
    ds = open_dataset(args.set); c = ds.load(args.case, normalize=False); rho = ds.spec.rho
    img, sp = np.ascontiguousarray(c.image), tuple(float(s) for s in c.spacing)
    if args.worker == 'original':
        sys.path.insert(0, args.adnet)
        from felzenszwalb_3d import felzenszwalb_3d  # the authors' wrapper around their Cython kernel
        def call(x, rho):
            x = x.astype(np.float64); x = 255 * (x - x.min()) / np.ptp(x)  # their script's rescale, in float64
            return felzenszwalb_3d(x, min_size=rho, sigma=0, spacing=sp)
    else:
        from fsmis.data.supervoxels import supervoxels
        call = lambda x, rho: supervoxels(x, sp, rho=rho, tie_order=args.tie_order)
    call(np.random.default_rng(0).normal(size=(4, 32, 32)), 50)  # warm-up: numba cache load / extension import
    with PeakRSS() as m:
        t0, p0 = time.perf_counter(), time.process_time()
        sv = call(img, rho)
        t1, p1 = time.perf_counter(), time.process_time()
    out = dict(wall=t1 - t0, cpu=p1 - p0, mem=m.delta / 2**20, shape=list(img.shape))
    if args.worker == 'fsmis':
        from fsmis.data.io import read_nifti
        from fsmis.data.supervoxels import adjusted_rand_index
        ref, _, _ = read_nifti(ds.image_path(args.case).parent/'reference_supervoxels'/f'superpix-MIDDLE_{args.case}.nii.gz', dtype=None, reorient=False)
        out.update(n=int(sv.max()), n_ref=int(len(np.unique(ref)) - 1), ari=adjusted_rand_index(sv, ref))
        if args.skimage:
            t = time.perf_counter(); skimage_slices(img); out['sk'] = time.perf_counter() - t
    print('RESULT ' + json.dumps(out), flush=True)


def run_one(kind, name, cid, args):
    cmd = [sys.executable, HERE, '--worker', kind, '--set', name, '--case', str(cid), '--tie-order', args.tie_order]
    if args.adnet: cmd += ['--adnet', args.adnet]
    if args.skimage: cmd += ['--skimage']
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
    if p.returncode or not lines: raise RuntimeError(f'{kind} worker failed on {name} {cid}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}')
    return json.loads(lines[-1][7:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--sets', default='chaos_t2,ms_cmrseg_bssfp')
    ap.add_argument('--tie-order', default='stable', choices=['stable', 'numpy1'])
    ap.add_argument('--limit', type=int, default=0, help='only the first N volumes of each set (0: all)')
    ap.add_argument('--adnet', default=os.environ.get('ADNET_SUPERVOXELS', ''), help="folder holding the built original (sha168/ADNet's supervoxels/)")
    ap.add_argument('--skimage', action='store_true', help="also time scikit-image's 2D Felzenszwalb slice by slice (in the fsmis worker)")
    ap.add_argument('--worker', choices=['original', 'fsmis'], help=argparse.SUPPRESS)
    ap.add_argument('--set', help=argparse.SUPPRESS); ap.add_argument('--case', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker: return worker(args)
    from fsmis.core import data_root
    from fsmis.data.datasets import open_dataset
    if data_root() is None: sys.exit('real data not found: set FSMIS_DATA to the folder holding chaos_t2/ and ms_cmrseg_bssfp/')
    if args.adnet and not os.path.isfile(os.path.join(args.adnet, 'felzenszwalb_3d.py')):
        sys.exit(f'--adnet {args.adnet!r}: no felzenszwalb_3d.py there (the supervoxels/ folder of a built sha168/ADNet checkout)')
    kinds = ['original', 'fsmis'] if args.adnet else ['fsmis']
    print(f'tie_order={args.tie_order}; load average before: {" ".join(f"{x:.2f}" for x in os.getloadavg())} on {os.cpu_count()} cores; '
          f'{"original vs fsmis" if args.adnet else "fsmis only (no --adnet)"}, one process per call, alternating order', flush=True)
    for name in args.sets.split(','):
        ds = open_dataset(name); rho = ds.spec.rho
        ids = ds.case_ids[:args.limit] if args.limit else ds.case_ids
        rows = []
        for j, cid in enumerate(ids):
            r = {'case': cid}
            for kind in (kinds if j % 2 == 0 else kinds[::-1]): r[kind] = run_one(kind, name, cid, args)
            rows.append(r); f = r['fsmis']
            line = f"  {name} {cid:>3} {str(tuple(f['shape'])):>15}: fsmis {f['wall']:.2f} s (cpu {f['cpu']:.2f}) +{f['mem']:.0f} MiB"
            if 'original' in r:
                o = r['original']
                line += f" | original {o['wall']:.2f} s (cpu {o['cpu']:.2f}) +{o['mem']:.0f} MiB | {o['wall'] / f['wall']:.1f}x faster, {o['mem'] / max(f['mem'], 1e-9):.1f}x less memory"
            if 'sk' in f: line += f" | skimage-2D {f['sk']:.2f} s"
            print(line + f" | n {f['n']} (ref {f['n_ref']}) ARI {f['ari']:.4f}", flush=True)
        col = lambda kind, k: np.array([r[kind][k] for r in rows])
        fw, fm = col('fsmis', 'wall'), col('fsmis', 'mem')
        print(f"{name} (rho {rho}, {len(rows)} volumes): fsmis median {np.median(fw):.2f} s/volume (range {fw.min():.2f}-{fw.max():.2f}, "
              f"cpu median {np.median(col('fsmis', 'cpu')):.2f}), peak memory +{np.median(fm):.0f} MiB median, +{fm.max():.0f} max")
        if 'original' in rows[0]:
            ow, om = col('original', 'wall'), col('original', 'mem')
            print(f"{name}: original median {np.median(ow):.2f} s/volume (range {ow.min():.2f}-{ow.max():.2f}), peak memory +{np.median(om):.0f} MiB "
                  f"median, +{om.max():.0f} max")
            rt, rm = ow / fw, om / np.maximum(fm, 1e-9)
            print(f"{name}: speed-up original/fsmis {np.median(ow) / np.median(fw):.1f}x (ratio of medians; per volume median "
                  f"{np.median(rt):.1f}x, range {rt.min():.1f}-{rt.max():.1f}x); memory original/fsmis {np.median(om) / np.median(fm):.1f}x "
                  f"(per volume range {rm.min():.1f}-{rm.max():.1f}x)")
        if 'sk' in rows[0]['fsmis']:
            print(f"{name}: skimage 2D slice by slice median {np.median(col('fsmis', 'sk')):.2f} s; fsmis/skimage {np.median(fw) / np.median(col('fsmis', 'sk')):.2f}")
        ari, n, nr = col('fsmis', 'ari'), col('fsmis', 'n'), col('fsmis', 'n_ref')
        print(f"{name}: ARI mean {ari.mean():.4f} min {ari.min():.4f}; count fsmis {n.min()}-{n.max()} (median {np.median(n):.0f}), "
              f"reference {nr.min()}-{nr.max()} (median {np.median(nr):.0f})", flush=True)
    print(f'load average after: {" ".join(f"{x:.2f}" for x in os.getloadavg())}')


if __name__ == '__main__': main()
