"""Benchmark: EP2 evaluation of one CHAOS query volume, 4 classes versus 1 class.

The query volume is encoded once and every class's prototype is applied to the same features, so 4 classes
should cost little more than 1. Prints wall times, the 4:1 ratio and query slices per second.

Usage: python bench/bench_eval.py [--encoder small] [--device cpu] [--size 256] [--repeat 3] [--threads 2]
Needs the real data (FSMIS_DATA or ../shared/data); falls back to the built-in phantom with a note.

The figures of nbs/21_eval.protocols.ipynb ("Speed") are the run of 2026-12-02 on the 2-core development machine
(defaults: small encoder, CPU, 2 threads): EP2 for 1 class 1.87 s, for 4 classes 2.29 s (ratio 1.22).
"""
import argparse, time
import numpy as np
import torch

from fsmis.core import data_root, default_device
from fsmis.data.datasets import open_dataset
from fsmis.data.folds import fold_split
from fsmis.eval.protocols import evaluate_case
from fsmis.models.intensity import IntensityPrototype
from fsmis.data.datasets import CaseStore


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--encoder', default='small', help="ADNet encoder ('small', 'resnet18', 'resnet50', 'resnet101') or 'intensity'")
    ap.add_argument('--device', default=None)
    ap.add_argument('--size', type=int, default=None, help='model input size (e.g. 128, the CPU-budget size); Dice stays at the native 256')
    ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--batch-size', type=int, default=16)
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    name = 'chaos_t2' if data_root() is not None else 'phantom'
    if name == 'phantom': print('note: real data not found, using the phantom dataset')
    ds = open_dataset(name) if name == 'chaos_t2' else open_dataset('phantom', n_cases=6)
    store = CaseStore(ds)
    split = fold_split(store.case_ids, 0)
    sup, qry = store.load(split.support_id), store.load(split.query_ids[0])
    dev = default_device(a.device)
    if a.encoder == 'intensity': model = IntensityPrototype()
    else:
        from fsmis.models.adnet import ADNet
        torch.manual_seed(0); model = ADNet(a.encoder).to(dev).eval()
    classes = dict(ds.classes)
    one = {k: classes[k] for k in list(classes)[:1]}
    evaluate_case(model, sup, qry, one, 'EP2', batch_size=a.batch_size, size=a.size)  # warm-up
    if dev.type == 'cuda': torch.cuda.synchronize()
    t = {}
    for label, cl in [('1 class', one), (f'{len(classes)} classes', classes)]:
        ts = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            evaluate_case(model, sup, qry, cl, 'EP2', batch_size=a.batch_size, size=a.size)
            if dev.type == 'cuda': torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        t[label] = min(ts)
    z = qry.n_slices
    print(f"dataset {name}, query {qry.case_id} ({z} slices, {qry.shape[1]}x{qry.shape[2]}), support {sup.case_id}, "
          f"encoder {a.encoder}, device {dev}, threads {torch.get_num_threads()}, batch {a.batch_size}")
    for label, s in t.items(): print(f"EP2 {label:>10}: {s:7.3f} s   {z/s:8.1f} query slices/s")
    k1, k4 = t['1 class'], t[f'{len(classes)} classes']
    print(f"ratio {len(classes)} classes / 1 class: {k4/k1:.2f}  (naive re-encoding per class would be ~{len(classes)})")
    print(f"class-slices per second ({len(classes)} classes): {len(classes)*z/k4:.1f}")


if __name__ == '__main__': main()
