"""Resident memory of one DenseMP run (stage 1, then stages 2-3 for each label group) at every stage boundary.

The dataset is the built-in phantom (abdominal classes with Ouyang's label groups) at N volumes of Z x 256 x 256, so the
numbers scale with a known float32 size; every stage runs a few steps only (memory, not accuracy). Printed per stage:
resident memory before and after it, and the peak so far (sampled every 0.2 s); at the end the peak and the growth over
the start, both as multiples of the dataset's float32 size (goal: peak growth <= 3x, flat from stage to stage).
Usage: python bench/bench_memory.py [--cases 10] [--slices 96]
"""
import argparse, dataclasses, threading, time
import torch


def rss_gb() -> float:
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'): return int(line.split()[1]) / 1e6
    return float('nan')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--cases', type=int, default=10, help='phantom volumes')
    ap.add_argument('--slices', type=int, default=96, help='slices per volume (256 x 256 each)')
    ap.add_argument('--out', default=None, help='results folder (default: a temporary one)')
    a = ap.parse_args()
    torch.set_num_threads(1)
    import tempfile
    import fsmis.train as T, fsmis.experiments as E
    from fsmis.config import reproduce_config
    from fsmis.data.datasets import get_spec, ABDOMEN_GROUPS
    object.__setattr__(get_spec('phantom'), 'label_groups', ABDOMEN_GROUPS)  # the phantom's organs in Ouyang's two groups
    peak = [0.]
    def sample():
        while True: peak[0] = max(peak[0], rss_gb()); time.sleep(0.2)
    threading.Thread(target=sample, daemon=True).start()
    def watch(name, f):
        def g(*args, **kw):
            before = rss_gb(); r = f(*args, **kw)
            print(f"{name:8s} resident {before:5.2f} -> {rss_gb():5.2f} GB, peak so far {peak[0]:5.2f} GB", flush=True)
            return r
        return g
    T.train_stage = watch('stage', T.train_stage)  # `train_stages` calls it from fsmis.train
    E.stage1_weights = watch('stage 1', E.stage1_weights)  # `run_experiment` imported this one by name
    size = a.cases * a.slices * 256 * 256 * 4 / 1e9
    cfg = dataclasses.replace(reproduce_config('densemp-chaos-setting2'), dataset='phantom',
                              dataset_kw={'n_cases': a.cases, 'shape': (a.slices, 256, 256)}, folds=[0], n_steps=4, minutes=None,
                              pretrain_steps=3, pretrain_minutes=None, finetune_steps=4, device='cpu', baselines=[])
    start = rss_gb()
    print(f"torch {torch.__version__}; phantom {a.cases} x {a.slices} x 256 x 256 = {size:.2f} GB as float32; resident at start {start:.2f} GB")
    t0 = time.time()
    E.run_experiment(cfg, out_dir=a.out or tempfile.mkdtemp(), progress=False)
    print(f"{time.time() - t0:.0f} s; peak {peak[0]:.2f} GB = start + {(peak[0] - start) / size:.1f} x the dataset; "
          f"at the end start + {(rss_gb() - start) / size:.1f} x")


if __name__ == '__main__': main()
