"""Training step time in float32 against bfloat16 autocast + channels-last (`precision='bf16'`), one CPU thread.

    python bench/bench_precision.py [--size 128] [--steps 20] [--reps 3] [--encoders small resnet18]

For each encoder: the median time of one `fit_iters` step of an ADNet learner on 1-shot toy episodes (episode drawing,
forward, losses, backward, SGD, callbacks) in each precision, measured in alternating order, and the ratio
bf16 / fp32 (issue target: <= 0.45 for the small encoder at 128 px). Prints the CPU's bf16 flags: on a CPU without
AMX or AVX-512 BF16, bf16 autocast is emulated and slower.
"""
import argparse, statistics, time
import torch
from fsmis.data.phantom import toy_dls
from fsmis.learner import adnet_learner, fit_iters, cpu_has_bf16


def step_ms(encoder, precision, size, steps, seed=0):
    "Median milliseconds per training step over `steps` steps after 3 warm-up steps."
    torch.manual_seed(seed)
    learn = adnet_learner(toy_dls(1000, size), encoder, lr=1e-3, precision=precision)
    fit_iters(learn, 3, progress=False)
    ts = []
    for i in range(steps):
        t0 = time.perf_counter(); fit_iters(learn, 4 + i, progress=False); ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts)


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--size', type=int, default=128); ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--reps', type=int, default=3); ap.add_argument('--encoders', nargs='+', default=['small', 'resnet18'])
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"CPU bf16 (AMX or AVX-512 BF16): {cpu_has_bf16()}; torch {torch.__version__}; 1 thread; {a.size} px; {a.steps} steps x {a.reps} reps")
    print(f"| encoder | fp32 step (ms) | bf16 step (ms) | bf16 / fp32 |\n|---|---:|---:|---:|")
    for enc in a.encoders:
        r = {'fp32': [], 'bf16': []}
        for rep in range(a.reps):  # alternate the order so that load drifts hit both
            for p in (['fp32', 'bf16'] if rep % 2 == 0 else ['bf16', 'fp32']): r[p].append(step_ms(enc, p, a.size, a.steps))
        f, b = statistics.median(r['fp32']), statistics.median(r['bf16'])
        print(f"| {enc} | {f:.0f} | {b:.0f} | {b / f:.2f} |")
