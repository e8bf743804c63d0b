"""Speed of DenseMP's stages 2 and 3 on the CPU: steps per second and step time / encoder forward+backward.

Trains stage 2 (PANet, superpixel episodes, CE + L_PAR) and stage 3 (fine-tuning on the mixture of superpixel and
ground-truth episodes) through the package's training path (`fsmis.train.train_stage` -> `train_fold`) for
--steps steps each, on the built-in phantoms (default) or a dataset (--data chaos_t2), and times, interleaved on the
same machine, the encoder's forward + backward of one episode's two images (1 support + 1 query) at the same size:
ratio = training step (everything fit_iters does: episode drawing, augmentation, model, loss, backward, SGD,
callbacks) / encoder forward+backward. Stage 1 (DenseCL) has its own bench: bench/bench_densecl.py.
Usage: python bench/bench_densemp.py [--data phantom|chaos_t2] [--steps 300] [--size 128] [--encoder small] [--threads 1]
"""
import argparse, os, tempfile, time
from pathlib import Path
import torch
from fsmis.config import ExperimentConfig
from fsmis.data.datasets import open_dataset
from fsmis.data.folds import fold_split
from fsmis.models.encoders import make_encoder
from fsmis.train import train_stage, finetune_config


def enc_ms(encoder, size, reps=20):
    "Min over reps of one forward + backward of the encoder on 2 images (ms)."
    torch.manual_seed(0)
    enc = make_encoder(encoder); x = torch.randn(2, next(m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)).in_channels, size, size)
    for _ in range(3): enc.zero_grad(set_to_none=True); enc(x).sum().backward()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); enc.zero_grad(set_to_none=True); enc(x).sum().backward(); ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', default='phantom'); ap.add_argument('--steps', type=int, default=300)
    ap.add_argument('--size', type=int, default=128); ap.add_argument('--encoder', default='small')
    ap.add_argument('--threads', type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ds = open_dataset(a.data, **(dict(n_cases=8, shape=(16, 128, 128)) if a.data == 'phantom' else {}))
    split = fold_split(ds.case_ids, 0, 5 if a.data != 'phantom' else 3, 'ouyang')
    cfg = ExperimentConfig(dataset=a.data, method='panet', encoder=a.encoder, pseudo_labels='superpixels', setting=2, size=a.size,
                           n_steps=a.steps, finetune_steps=a.steps, device='cpu')
    test = [2, 3]  # the kidneys: stage 3 fine-tunes on liver and spleen
    print(f"torch {torch.__version__}, {a.threads} thread(s), {a.data}, {a.encoder} at {a.size} px, {a.steps} steps per stage, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    e0 = enc_ms(a.encoder, a.size)
    with tempfile.TemporaryDirectory() as d:
        s2 = Path(d)/'stage2.pth'
        _, i2 = train_stage(cfg, ds, split.train_ids, s2, test_classes=test)
        _, i3 = train_stage(finetune_config(cfg, s2), ds, split.train_ids, Path(d)/'stage3.pth', test_classes=test)
    e1 = enc_ms(a.encoder, a.size)
    e = min(e0, e1)
    print(f"encoder forward+backward (2 images): {e:.1f} ms (before {e0:.1f}, after {e1:.1f})")
    for name, i in (('stage 2', i2), ('stage 3', i3)):
        ms = i['train_s'] / i['steps'] * 1e3
        print(f"{name}: {i['steps']} steps in {i['train_s']:.1f} s = {i['steps'] / i['train_s']:.1f} steps/s, "
              f"{ms:.1f} ms/step, step / encoder f+b = {ms / e:.2f}")


if __name__ == '__main__': main()
