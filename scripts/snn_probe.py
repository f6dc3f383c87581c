"""Linear probes on every block of a trained spiking network: how much class information
its spikes (and its charged voltages) carry, whatever rule trained it.

Loads a run folder's checkpoint (``sigprop train --network snn-conv ...``), runs the
first ``--train-limit`` training images and the whole test set through the network in
eval mode (no targets), and for every block takes two feature vectors per image: its
output spikes after pooling and its charged voltages before firing, each averaged over
the time steps (block 1's voltages, 100k values an image, are skipped: too large to
hold). One linear classifier per feature set is trained on the standardised training
features (Adam 1e-3, batch 256, ``--epochs`` epochs, L2 1e-4) and scored on the test
set. The same protocol on a Shallow run (random, untrained blocks) gives the baseline a
learning rule's blocks should beat.

    python scripts/snn_probe.py runs/sp-surrogate --train-limit 20000
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from sigprop.data.datasets import dataset_spec, load_dataset
from sigprop.data.loader import DeviceLoader
from sigprop.engine import load_trained
from sigprop.errors import ConfigError, SigpropError
from sigprop.networks.spiking import SpikingNetwork


@torch.no_grad()
def block_features(net: SpikingNetwork, loader: DeviceLoader) -> tuple[list, torch.Tensor]:
    """Per block: [spike rates (N, D), voltages (N, D) or None]; and the labels."""
    feats: list[list[list[torch.Tensor]]] = [[[], []] for _ in net.blocks]
    labels = []
    for x, y in loader.epoch(0):
        h = x
        for j, block in enumerate(net.blocks):
            h, charged = block.run(h)
            feats[j][0].append(h.float().mean(0).flatten(1))
            if j:
                feats[j][1].append(charged.float().mean(0).flatten(1))
        labels.append(y)
    return ([[torch.cat(f) if f else None for f in pair] for pair in feats],
            torch.cat(labels))


def probe(train: torch.Tensor, ytr: torch.Tensor, test: torch.Tensor, yte: torch.Tensor,
          classes: int, epochs: int, seed: int) -> tuple[float, float]:
    """(train, test) accuracy of a linear classifier on standardised features."""
    torch.manual_seed(seed)
    mu, sd = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mu) / sd, (test - mu) / sd
    lin = torch.nn.Linear(train.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(train)).split(256):
            loss = F.cross_entropy(lin(train[idx]), ytr[idx]) + 1e-4 * lin.weight.square().sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return ((lin(train).argmax(1) == ytr).float().mean().item(),
                (lin(test).argmax(1) == yte).float().mean().item())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder (or its checkpoint.pt) of a spiking network")
    p.add_argument("--train-limit", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=30, help="epochs of each probe")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        if min(args.train_limit, args.epochs) < 1:
            raise ConfigError("--train-limit and --epochs must be positive")
        exp, cfg, _, ckpt = load_trained(args.run, device="cpu")
        net = exp.rule.network.eval()
        if not isinstance(net, SpikingNetwork):
            raise ConfigError(f"{ckpt} holds a {cfg.model.network} network, not a spiking "
                              "one; give a run of snn-conv")
        spec = dataset_spec(cfg.data.dataset)
        xtr, ytr = load_dataset(cfg.data.dataset, "train", cfg.data.data_dir)
        kw = dict(batch_size=500, mean=spec.mean, std=spec.std, shuffle=False)
        tr, ytr = block_features(net, DeviceLoader(xtr[: args.train_limit],
                                                   ytr[: args.train_limit], **kw))
        te, yte = block_features(net, exp.test)
        name = f"{cfg.rule.name} ({ckpt.parent.name})"
        for j in range(len(net.blocks)):
            for k, kind in enumerate(("spikes", "voltages")):
                if tr[j][k] is None:
                    continue
                a_tr, a_te = probe(tr[j][k], ytr, te[j][k], yte, spec.num_classes,
                                   args.epochs, args.seed)
                print(f"{name}: block {j + 1} {kind} ({tr[j][k].shape[1]} values): "
                      f"probe train {a_tr:.4f}, test {a_te:.4f}", flush=True)
    except SigpropError as err:
        print(f"snn_probe: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
