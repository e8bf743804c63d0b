"""Cost of a full few-shot training step relative to the encoder alone (CPU by default).

For each encoder and image size, on the same 1-episode batch (1 support + 1 query image):
  enc   = encoder forward + backward of the 2 images (the floor: any method pays it)
  step  = the model's forward (ADNet: prototype, anomaly score, PAR) + its training loss + backward + SGD step
  learn = one iteration of fastai `fit_iters` on a DataLoader repeating that batch (adds callbacks, logging; ADNet only)
and prints step/enc (min over interleaved repetitions; target <= 1.15) and learn/enc (mean over mean).
SE-Net has no backbone: its `enc` is the forward + backward of its two arms (the whole network, `sum()` as the loss),
so its ratio is what the loss, the excitation bookkeeping and the optimizer add.
Usage: python bench/bench_models.py [--threads 1] [--reps 5] [--configs small:128,...] [--models adnet,alpnet,panet,ppnet,canet,senet]
"""
import argparse, os, time, tempfile
import torch
from fsmis.models.adnet import ADNet
from fsmis.models.alpnet import ALPNet, PANet
from fsmis.models.ppnet import PPNet
from fsmis.models.canet import CANet
from fsmis.models.senet import SENet
from fsmis.losses import ADNetLoss, ProtoCELoss
from fsmis.data.phantom import ToyEpisodes
from fsmis.learner import adnet_learner, fit_iters
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader


class Repeat(torch.utils.data.Dataset):
    "The same episode over and over (so the bench measures the step, not episode generation)."
    def __init__(self, item, n): self.item, self.n = item, n
    def __len__(self): return self.n
    def __getitem__(self, i): return self.item


def bench(name, size, reps, model_cls=ADNet, loss_cls=ADNetLoss):
    torch.manual_seed(0)
    item = ToyEpisodes(1, size)[0]
    si, sm, qi, qm = [t[None] for t in item]
    model = model_cls(name); loss_f = loss_cls()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x = torch.cat([si.flatten(0, 1), qi.flatten(0, 1)])

    def enc_step():
        model.zero_grad(set_to_none=True)
        if model_cls is SENet: model(si, sm, qi)['qry'].sum().backward()  # no backbone: the network itself
        else: model.encoder(x).sum().backward()

    def full_step():
        loss = loss_f(model(si, sm, qi), qm)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

    for _ in range(2): enc_step(); full_step()  # warm-up
    te, tf = [], []
    for _ in range(reps):  # interleaved, so load from other processes hits both alike
        for f, ts in ((enc_step, te), (full_step, tf)):
            t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    t_enc, t_full = min(te), min(tf)  # min: the least-disturbed run of each
    res = dict(encoder=name, size=size, model=model_cls.__name__, enc_ms=t_enc * 1e3, step_ms=t_full * 1e3, ratio=t_full / t_enc)
    if model_cls is ADNet:
        n = 2 * reps
        dls = DataLoaders(DataLoader(Repeat(item, 10 * n), bs=1), DataLoader(Repeat(item, 1), bs=1)); dls.n_inp = 3
        learn = adnet_learner(dls, name, path=tempfile.mkdtemp())
        fit_iters(learn, 2, progress=False)  # warm-up
        t0 = time.perf_counter(); fit_iters(learn, 2 + n, progress=False)
        res['learn_ms'] = (time.perf_counter() - t0) / n * 1e3; res['learn_ratio'] = res['learn_ms'] / (sum(te) / len(te) * 1e3)
    return res


# kind -> (model class, its training loss as the learner factories build it)
MODELS = {'adnet': (ADNet, ADNetLoss), 'alpnet': (ALPNet, ProtoCELoss), 'panet': (PANet, lambda: ProtoCELoss(w_bg=1.0)),
          'ppnet': (PPNet, lambda: ProtoCELoss(w_bg=1.0)), 'canet': (CANet, lambda: ProtoCELoss(w_bg=1.0, par=False)),
          'senet': (SENet, lambda: ProtoCELoss(w_bg=1.0, par=False, w_dice=1.0))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    ap.add_argument('--reps', type=int, default=7, help='timed repetitions (median)')
    ap.add_argument('--configs', default='small:128,small:256,resnet18:256,resnet50:256', help='encoder:size list')
    ap.add_argument('--alpnet', action='store_true', help='also time ALPNet steps (same as adding alpnet to --models)')
    ap.add_argument('--models', default='adnet', help='comma-separated: adnet, alpnet, panet, ppnet, canet, senet')
    a = ap.parse_args()
    kinds = a.models.split(',') + (['alpnet'] if a.alpnet and 'alpnet' not in a.models else [])
    bad = [k for k in kinds if k not in MODELS]
    if bad: ap.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} CPU thread(s), min of {a.reps} interleaved repetitions, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (memory-bound head ops suffer most under load)")
    print(f"{'model':7} {'encoder':9} {'size':>4} {'enc f+b ms':>10} {'step ms':>9} {'step/enc':>8} {'fit_iters ms':>12} {'fit/enc':>7}")
    for cfg in a.configs.split(','):
        name, size = cfg.split(':'); size = int(size)
        for mc, lc in [MODELS[k] for k in kinds]:
            if mc is SENet and name != 'small': continue  # SE-Net has no backbone to choose
            r = bench(name, size, a.reps, mc, lc)
            extra = f"{r['learn_ms']:12.1f} {r['learn_ratio']:7.3f}" if 'learn_ms' in r else ''
            print(f"{r['model']:7} {name:9} {size:4d} {r['enc_ms']:10.1f} {r['step_ms']:9.1f} {r['ratio']:8.3f} {extra}", flush=True)


if __name__ == '__main__': main()
