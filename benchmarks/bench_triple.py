"""TripLe's operators and schedule on the embedded digits data (a tiny ViT, CPU).

1. Investigation 1: a small ViT (dim 32, 2 blocks, 2 heads, 16x16 images, patch 8) is trained
   briefly; every width operator (to dim 64, and 48 where d does not divide D) and depth
   operator (to 4 blocks) is applied and the expanded model evaluated without training:
   validation loss and top-1 before and after. Full functionality preservation shows as an
   unchanged loss; the paper's classes are full / partial (better than chance, 10% here) /
   none.
2. "+m" against "-m": the trained small model's AdamW state carried through the expansion
   (widen st to 64; deepen stck to 4 blocks) or dropped; the mean training loss of the first
   steps after the expansion, and the validation loss after one epoch, same batches for both.
3. The serialized schedule (TripleScaler): the pretrained small model widened to 64 (+m/-m),
   then with depth expansion (stage I 1 epoch, deepen stck to 4 blocks, stage II 1 epoch with
   the old blocks frozen, stage III) or without (TripLe's width-only variant), 4 epochs in all.

Figures depend on the machine only through timing, which is not reported; the losses are
deterministic for a seed on one machine.

Run: .venv/bin/python benchmarks/bench_triple.py [--seed 0] [--pretrain-epochs 4]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fxgrow.models import build
from fxgrow.passes import deepen, widen
from fxgrow.training import data as data_mod
from fxgrow.training.expand import expand_optimizer
from fxgrow.training.triple import TripleScaler, TripleSchedule

IMG, DIM = 16, 32
FIRST_STEPS = 5


def small_model(seed: int):
    torch.manual_seed(seed)
    return build("tiny_vit", embed_dim=DIM, depth=2, num_heads=2, img_size=IMG, patch_size=8,
                 num_classes=10)


def make_optimizer(model):
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, "adamw", lr=2e-3, weight_decay=0.05)


@torch.no_grad()
def evaluate(model, bundle) -> tuple[float, float]:
    model.eval()
    x = torch.stack([bundle.val[i][0] for i in range(len(bundle.val))])
    y = torch.tensor([bundle.val[i][1] for i in range(len(bundle.val))])
    logits = model(x)
    model.train()
    return float(F.cross_entropy(logits, y)), 100.0 * float((logits.argmax(-1) == y).float().mean())


def batches(bundle, epoch: int, seed: int, batch_size: int = 64):
    loader = data_mod.loader(bundle.train, batch_size, seed=seed, drop_last=True)
    loader.sampler.set_epoch(epoch)
    return list(loader)


def train_epoch(model, opt, bundle, epoch, seed, scaler=None) -> list[float]:
    losses = []
    model.train()
    for x, y in batches(bundle, epoch, seed):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scaler is not None:
            scaler.after_step()
        losses.append(loss.item())
    return losses


def pretrained(bundle, seed: int, epochs: int):
    model = small_model(seed)
    opt = make_optimizer(model)
    for epoch in range(epochs):
        train_epoch(model, opt, bundle, epoch, seed)
    return model, opt


def investigation_1(bundle, seed: int, epochs: int) -> None:
    model, _ = pretrained(bundle, seed, epochs)
    loss0, acc0 = evaluate(model, bundle)
    print(f"\n1. Investigation 1 (no training after expansion); the small model: "
          f"val loss {loss0:.4f}, top-1 {acc0:.1f}%")
    print(f"{'operator':<28} {'val loss':>9} {'change':>9} {'top-1':>7}  class")
    cases = [
        ("width st -> 64 (follow)", lambda: widen(model, 64, "st")),
        ("width st -> 64 (keep)", lambda: widen(model, 64, "st", "keep")),
        ("width st -> 48 (eq. 9-10)", lambda: widen(model, 48, "st")),
        ("width b2b -> 64", lambda: widen(model, 64, "b2b", seed=seed)),
        ("width pad0 -> 64", lambda: widen(model, 64, "pad0")),
        ("depth stck -> 4", lambda: deepen(model, 4, "stck")),
        ("depth inpt -> 4", lambda: deepen(model, 4, "inpt")),
        ("depth st -> 4", lambda: deepen(model, 4, "st", seed=seed)),
        ("depth st_stck -> 4", lambda: deepen(model, 4, "st_stck")),
        ("depth st_inpt -> 4", lambda: deepen(model, 4, "st_inpt")),
    ]
    for name, make in cases:
        loss, acc = evaluate(make(), bundle)
        change = loss - loss0
        kind = "full" if abs(change) < 1e-5 else "partial" if acc > 20.0 else "none"
        print(f"{name:<28} {loss:>9.4f} {change:>+9.4f} {acc:>7.1f}  {kind}")


def plus_m_minus_m(bundle, seed: int, epochs: int) -> None:
    print(f"\n2. +m against -m: mean training loss of the first {FIRST_STEPS} steps after the "
          f"expansion, val loss after one epoch")
    print(f"{'expansion':<22} {'+m first':>9} {'-m first':>9} {'+m val':>8} {'-m val':>8}")
    for name, make in (("widen st -> 64", lambda m: widen(m, 64, "st")),
                       ("deepen stck -> 4", lambda m: deepen(m, 4, "stck"))):
        row = {}
        for carry in (True, False):
            model, opt = pretrained(bundle, seed, epochs)
            big = make(model)
            new_opt = expand_optimizer(opt, model, big, carry_state=carry)
            losses = train_epoch(big, new_opt, bundle, epochs, seed)
            row[carry] = (sum(losses[:FIRST_STEPS]) / FIRST_STEPS, evaluate(big, bundle)[0])
        print(f"{name:<22} {row[True][0]:>9.4f} {row[False][0]:>9.4f} "
              f"{row[True][1]:>8.4f} {row[False][1]:>8.4f}")


def schedules(bundle, seed: int, epochs: int) -> None:
    print("\n3. The serialized schedule after pretraining (4 epochs: I, II, III, III); "
          f"first = mean loss of the first {FIRST_STEPS} steps of each stage")
    print(f"{'schedule':<26} {'state':>5} {'I first':>8} {'II first':>9} {'final val':>9} "
          f"{'top-1':>6} {'params':>8}")
    for depth in (4, None):
        for carry in (True, False):
            model, opt = pretrained(bundle, seed, epochs)
            schedule = TripleSchedule(width=64, depth=depth, stage1_epochs=1, stage2_epochs=1,
                                      carry_state=carry)
            scaler = TripleScaler(schedule)
            model, opt = scaler.start(model, opt)
            firsts = []
            for epoch in range(4):
                losses = train_epoch(model, opt, bundle, epochs + epoch, seed, scaler)
                firsts.append(sum(losses[:FIRST_STEPS]) / FIRST_STEPS)
                model, opt, _ = scaler.after_epoch(epoch, model, opt)
            loss, acc = evaluate(model, bundle)
            params = sum(p.numel() for p in model.parameters())
            name = "width 64, depth 4 (stck)" if depth else "width 64 only"
            print(f"{name:<26} {'+m' if carry else '-m':>5} {firsts[0]:>8.4f} "
                  f"{firsts[1]:>9.4f} {loss:>9.4f} {acc:>6.1f} {params:>8,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = data_mod.load("digits", IMG, seed=args.seed)
    print(f"digits at {IMG}x{IMG}: {len(bundle.train)} train, {len(bundle.val)} val images; "
          f"small model pretrained {args.pretrain_epochs} epochs (AdamW, lr 2e-3, batch 64)")
    investigation_1(bundle, args.seed, args.pretrain_epochs)
    plus_m_minus_m(bundle, args.seed, args.pretrain_epochs)
    schedules(bundle, args.seed, args.pretrain_epochs)


if __name__ == "__main__":
    main()
