"""What a comparison with constant fields can ask of one conv block: an upper bound.

Sparse targets through conv blocks (Sec. III-E, ``sigprop.rules.sigprop.sparse``) are constant fields
after block 1, so L_pred compares a block's output map with a class's field through the
map's spatial sum: a linear classifier on the globally average-pooled map. Dense
targets are compared with the whole map: a linear classifier on the flattened map.
This script trains the first ``--blocks`` blocks of a network and one linear classifier
on top, end to end by backprop (the most either comparison could get out of those
blocks), once on the pooled map ("field": adaptive average pooling to a ``--grid`` x
``--grid`` map, 1 by default) and once on the flattened map ("dense"), and prints the
test accuracy of each after every epoch.

    python scripts/field_ceiling.py --network conv --blocks 1 --train-limit 10000 --epochs 8
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from sigprop.data.datasets import dataset_spec, load_dataset
from sigprop.data.loader import DeviceLoader
from sigprop.errors import ConfigError, SigpropError
from sigprop.networks import build_network


def train(data, pooled: bool, args) -> list[float]:
    spec, (xtr, ytr), (xte, yte) = data
    torch.manual_seed(args.seed)
    net = build_network(args.network, tuple(xtr.shape[1:]), spec.num_classes,
                        dropout=args.dropout)
    body = nn.Sequential(*list(net.blocks)[:args.blocks])
    with torch.no_grad():
        out = body.eval()(torch.zeros(2, *xtr.shape[1:]))
    g = args.grid
    feats = out.shape[1] * g * g if pooled and out.dim() == 4 else out[0].numel()
    head = nn.Linear(feats, spec.num_classes)
    model = nn.Sequential(body, nn.AdaptiveAvgPool2d(g) if pooled and out.dim() == 4
                          else nn.Identity(), nn.Flatten(), head)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    kw = dict(mean=spec.mean, std=spec.std)
    train_loader = DeviceLoader(xtr, ytr, batch_size=128, seed=args.seed, **kw)
    test_loader = DeviceLoader(xte, yte, batch_size=1000, shuffle=False, **kw)
    accs = []
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_loader.epoch(epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader.epoch(0):
                correct += (model(x).argmax(1) == y).sum()
        accs.append(float(correct) / len(yte))
        print(f"{'field (pooled)' if pooled else 'dense (flattened)'} epoch {epoch + 1}: "
              f"test acc {accs[-1]:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return accs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", default="conv")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=int, default=1,
                   help="pool the map to GRID x GRID cells instead of 1 (a coarse field)")
    p.add_argument("--only", choices=["field", "dense"], default=None)
    args = p.parse_args()
    try:
        if min(args.blocks, args.grid, args.epochs, args.train_limit) < 1:
            raise ConfigError("--blocks, --grid, --epochs and --train-limit must be positive")
        spec = dataset_spec(args.dataset)
        xtr, ytr = load_dataset(args.dataset, "train")
        data = (spec, (xtr[: args.train_limit], ytr[: args.train_limit]),
                load_dataset(args.dataset, "test"))
        for pooled in (True, False):
            if args.only in (None, "field" if pooled else "dense"):
                acc = train(data, pooled, args)
                print(f"{args.network}, first {args.blocks} block(s), "
                      f"{f'field on a {args.grid}x{args.grid} grid' if pooled else 'dense'}: "
                      f"{acc[-1]:.4f}")
    except SigpropError as err:
        print(f"field_ceiling: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
