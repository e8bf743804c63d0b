"""Wall time and Dice of the whole `fsmis demo` command (the defaults), one fresh process per seed.

Each run is `fsmis demo --seed S --out DIR --quiet` in a subprocess, timed from outside (imports, phantoms,
supervoxels, 1000 training steps, EP2 evaluation, outputs); its results.json gives the trained and untrained mean Dice
and the demo's own split of the time. Prints one row per seed and the 1-minute load average before and after, since
on a shared machine other work changes the wall time far more than the code does.
Usage: python bench/bench_demo.py [--seeds 0 1 2] [--steps 1000]

Runs on the 2-core development machine (CPU, one torch thread, the demo's default):

- before the fused augmentation (`data.augment.AffineElastic`), other jobs running (load average 4-7), timed with
  /usr/bin/time: seed 0 trained 27.7 / untrained 3.4 mean Dice (+24.3) in 66-76 s (the 66 s including numba's first
  compilation of the supervoxel code, as on a fresh install); seed 1 23.1 / 3.6 (+19.5) in 140 s; seed 2 25.6 / 2.8
  (+22.8) in 133 s; seed 0 with 2000 steps 29.2 / 3.4 (+25.8) in 119 s.
- 2026-12-02, after the fused augmentation (other interpolation, same draws), machine otherwise idle (load average
  about 1), /usr/bin/time: seed 0 27.5 / 3.4 (+24.1) in 44.6 s (training 24 s); seed 1 23.3 / 3.6 (+19.7) in
  49.2 s; seed 2 25.5 / 2.8 (+22.7) in 39.3 s.
- 2026-12-02, after the restructure (one training path, `fsmis.train.train_fold`; episodes drawn 1000 per pass;
  float64 statistics in `zscore`): the same Dice to the digit for seeds 0-2; wall times 30.9, 44.9 and 44.1 s while
  two ablation workers kept both cores busy (so they say nothing new about speed).
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path


def run(seed: int, steps: int, out: Path) -> dict:
    "One `fsmis demo` in a fresh process: wall seconds and its results.json."
    cmd = [sys.executable, '-m', 'fsmis.cli', 'demo', '--seed', str(seed), '--steps', str(steps), '--out', str(out), '--quiet']
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    return dict(wall_s=wall, **json.loads((out/'results.json').read_text()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--steps', type=int, default=1000)
    a = p.parse_args(argv)
    load = lambda: os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f"load average before: {load():.2f}")
    print('| seed | trained mean Dice | untrained mean Dice | difference | wall time | training |')
    print('|---|---:|---:|---:|---:|---:|')
    with tempfile.TemporaryDirectory() as d:
        for s in a.seeds:
            r = run(s, a.steps, Path(d)/f'seed{s}')
            tr, un = r['dice']['trained']['mean'], r['dice']['untrained']['mean']
            print(f"| {s} | {tr:.1f} | {un:.1f} | {tr - un:+.1f} | {r['wall_s']:.1f} s | {r['seconds']['train']:.0f} s |", flush=True)
    print(f"load average after: {load():.2f}")


if __name__ == '__main__': main()
