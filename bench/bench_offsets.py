"""Does a DenseCL encoder find corresponding places? `offset_recovery` of encoders on the test scans of a fold.

Two crops of one slice with a known offset of (2, 3) grid cells (independent intensity jitter and blur); the dense
positive of every body cell of view 1 (the most similar backbone feature of view 2, as DenseCL's dense term picks it)
is counted exact, within one cell, or at the same cell index (a wrong answer: a position-in-view shortcut).
Random encoders (two init seeds) are the reference; each weights file given is an encoder written by
`fsmis pretrain densecl` or by stage 1 inside an experiment (its steps are printed from its metadata).
Usage: python bench/bench_offsets.py [--data chaos_t2] [--fold 0] [--sizes 64 128] [--n 64] [WEIGHTS.pth ...]

The table of the DenseCL lesson ("On real scans") is the run of 2026-12-03 on the 2-core development machine:
`python bench/bench_offsets.py densecl_45steps_fold0.pth densecl_704steps_fold0.pth` (stage-1 encoders copied out
of two experiments' cell folders on CHAOS fold 0); the exploratory phantom runs of the lesson's "Follow-up
measurements" date from 2026-12-02.
"""
import argparse, os, time
import torch
from fsmis.data.datasets import open_dataset
from fsmis.data.folds import fold_split
from fsmis.models.encoders import make_encoder
from fsmis.pretrain.densecl import unlabeled_slices, offset_recovery, read_encoder_meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('weights', nargs='*'); ap.add_argument('--data', default='chaos_t2'); ap.add_argument('--fold', type=int, default=0)
    ap.add_argument('--sizes', type=int, nargs='+', default=[64, 128]); ap.add_argument('--n', type=int, default=64)
    ap.add_argument('--encoder', default='small'); ap.add_argument('--threads', type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ds = open_dataset(a.data, **(dict(n_cases=6, shape=(16, 128, 128)) if a.data == 'phantom' else {}))
    train = set(map(str, fold_split(ds.case_ids, a.fold, 5 if a.data != 'phantom' else 3).train_ids))
    test = [c for c in ds.case_ids if str(c) not in train]
    ev = unlabeled_slices(ds, case_ids=test)  # images only; the test scans, which stage 1 of this fold never saw
    print(f"{a.data}, fold {a.fold}: test cases {' '.join(map(str, test))}, {len(ev)} slices with body; {a.n} tested, "
          f"offset (2, 3) cells of an 8 x 8 grid; load average {os.getloadavg()[0]:.1f}\n")
    print('| encoder | DenseCL steps | view (px) | exact | within 1 | same cell | cells |\n|---|---:|---:|---:|---:|---:|---:|')
    encs = [(f'random init (seed {s})', None, s) for s in (0, 1)] + [(os.path.basename(w), w, None) for w in a.weights]
    for name, w, seed in encs:
        if w is None: torch.manual_seed(seed); e, steps = make_encoder(a.encoder), 0
        else: e, steps = make_encoder(a.encoder, weights=w), read_encoder_meta(w)['steps']
        for size in a.sizes:
            r = offset_recovery(e, ev, size=size, n=a.n)
            print(f"| {name} | {steps} | {size} | {r['exact']:.1%} | {r['within_1']:.1%} | {r['same_cell']:.1%} | {r['cells']} |")


if __name__ == '__main__': main()
