"""Train both reference models on phantoms and export them to ONNX: one command.

    .venv/bin/python -m inference.training --out inference/models

Reproducible: phantoms, sampling, initial weights and batch order all come from fixed
seeds (torch runs deterministic algorithms; on the same machine and torch build the
weights come out the same). Samples are cached under ``--cache`` so a second run with other
training settings does not regenerate the phantoms.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..spec import find_model, load_spec
from . import TRAIN_SEED_START, VALIDATION_SEED_START
from .data import SAMPLES_VERSION, cached_samples, mined_negatives
from .nets import NODULE_WIDTHS, NoduleUNet, TriageCNN, WithSigmoid
from .rescore import candidate_table, fit_logistic, rescore_table, write_rescore

NODULE = "lung-nodule-ct"
TRIAGE = "lung-triage-ct"


def build_dataset(seeds, nodule_input, triage_input, cache: Path, workers: int):
    # samples depend on the input specs and the sampling code: a cache folder per version
    key = hashlib.sha256(repr((SAMPLES_VERSION, nodule_input, triage_input)).encode()).hexdigest()[:12]
    cache = cache / f"samples-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    jobs = [(s, nodule_input, triage_input, str(cache)) for s in seeds]
    t0 = time.monotonic()
    # spawn, not fork: torch is already imported here and its thread pools do not survive fork
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        paths = []
        for n, p in enumerate(pool.map(cached_samples, jobs), 1):
            paths.append(p)
            if n % 10 == 0 or n == len(jobs):
                print(f"  phantoms {n}/{len(jobs)} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    parts = [np.load(p) for p in paths]
    return (
        np.concatenate([p["patches"] for p in parts]),
        np.concatenate([p["masks"] for p in parts]),
        np.concatenate([p["slices"] for p in parts]),
        np.concatenate([p["labels"] for p in parts]),
    )


def mine(model_dir: Path, seeds, cache: Path, workers: int):
    """Mined hard negatives (patches, masks) of the model in ``model_dir`` on ``seeds``;
    cached per ONNX file, so a rerun with the same weights reuses them."""
    onnx_hash = hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest()[:12]
    folder = cache / f"mined-{onnx_hash}"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(s, str(model_dir), str(folder), 0.5) for s in seeds]
    t0 = time.monotonic()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = list(pool.map(mined_negatives, jobs))
    print(f"  mined {len(paths)} phantoms ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    parts = [np.load(p) for p in paths]
    return np.concatenate([p["patches"] for p in parts]), np.concatenate([p["masks"] for p in parts])


def fit_rescorer(model_dir: Path, seeds, workers: int, l2: float) -> dict:
    """Fit the nodule model's rescorer on the candidates of ``seeds`` and write it into
    ``model_dir/model.toml``."""
    if not load_spec(model_dir).output.region_threshold:
        raise SystemExit(f"{model_dir}/model.toml [output].region_threshold: needed to fit a rescorer (regions are cut there)")
    t0 = time.monotonic()
    jobs = [(s, str(model_dir)) for s in seeds]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(candidate_table, jobs))
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    weights, bias = fit_logistic(x, y, l2)
    note = (f"fitted on {len(y)} candidates ({int(y.sum())} nodules) of phantoms {seeds.start}-{seeds.stop - 1}, "
            f"L2 {l2:g}; probability = sigmoid(bias + sum(weight * feature))")
    write_rescore(model_dir / "model.toml", rescore_table(weights, bias, note))
    print(f"{NODULE}: rescorer {note} ({time.monotonic() - t0:.0f} s). The reporting threshold is on its scale: "
          f"choose it again on the validation phantoms (bench/accuracy.py --seeds {VALIDATION_SEED_START}-"
          f"{VALIDATION_SEED_START + 19} --models {model_dir.parent})", file=sys.stderr)
    return {"rescore_seeds": [seeds.start, seeds.stop - 1], "candidates": int(len(y)), "nodules": int(y.sum()), "l2": l2}


def _windowed(x: np.ndarray, hu_window) -> torch.Tensor:
    lo, hi = hu_window
    t = torch.from_numpy(x.astype(np.float32))
    return ((t - lo) / (hi - lo)).clamp_(0.0, 1.0)


def _augment(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator, flip_channels: bool):
    """Flips and 90-degree turns in-plane, reversed slice order, a small HU offset."""
    if torch.rand(1, generator=gen) < 0.5:
        x = x.flip(-1)
        y = y.flip(-1) if y is not None else None
    if torch.rand(1, generator=gen) < 0.5:
        x = x.flip(-2)
        y = y.flip(-2) if y is not None else None
    if flip_channels and torch.rand(1, generator=gen) < 0.5:
        x = x.flip(1)
    k = int(torch.randint(0, 4, (1,), generator=gen))
    if k:
        x = torch.rot90(x, k, dims=(-2, -1))
        y = torch.rot90(y, k, dims=(-2, -1)) if y is not None else None
    x = (x + (torch.rand(x.shape[0], 1, 1, 1, generator=gen) - 0.5) * 0.03).clamp_(0.0, 1.0)
    return x, y


def _lr(step: int, steps: int, base: float) -> float:
    warm = min(1.0, (step + 1) / 50)
    return base * warm * 0.5 * (1 + math.cos(math.pi * step / steps))


def _dice(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss over the whole batch: every pixel the network calls a nodule where
    there is none counts against it, in whichever patch it lies."""
    return 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)


def _nodule_dice(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss averaged over the patches that show a nodule. Over the whole batch a
    25 mm nodule's thousand pixels outweigh a 4 mm nodule's ten, and the network can
    ignore the small ones at almost no cost; here each nodule counts the same. Alone it
    lets false positives in empty patches go free (360 per scan), so it comes on top of
    the batch Dice, never instead."""
    dims = tuple(range(1, p.dim()))
    pos = y.sum(dims) > 0
    if not bool(pos.any()):
        return p.sum() * 0.0
    return (1 - (2 * (p * y).sum(dims)[pos] + 1) / (p.sum(dims)[pos] + y.sum(dims)[pos] + 1)).mean()


def train_nodule(patches, masks, spec, steps: int, batch: int, seed: int, net=None, hard=None, lr: float = 2e-3,
                 small_boost: float = 0.0, widths=NODULE_WIDTHS, dice_weight: float = 0.3, nodule_dice_weight: float = 0.0):
    """Train (or, given ``net``, fine-tune) the nodule network. ``hard``: (patches, masks)
    of mined hard negatives, a third of every batch when given. ``small_boost``: draw
    patches showing a small nodule (at most 40 pixels, about 7 mm across at 1 mm) that
    many times more often, so that learning to reject vessel cross-sections does not
    unlearn the small nodules they resemble."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = net or NoduleUNet(context=spec.input.context_slices, widths=widths)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    x_all = _windowed(patches, spec.input.hu_window)
    y_all = torch.from_numpy(masks.astype(np.float32))[:, None]
    if hard is not None and len(hard[0]):
        x_hard = _windowed(hard[0], spec.input.hu_window)
        y_hard = torch.from_numpy(hard[1].astype(np.float32))[:, None]
    else:
        x_hard = None
    n = len(x_all)
    area = masks.reshape(n, -1).sum(axis=1)
    weights = torch.from_numpy(1.0 + small_boost * ((area > 0) & (area <= 40)).astype(np.float64))
    t0 = time.monotonic()
    net.train()
    for step in range(steps):
        k = batch // 3 if x_hard is not None else 0
        if small_boost:
            idx = torch.multinomial(weights, batch - k, replacement=True, generator=gen)
        else:
            idx = torch.randint(0, n, (batch - k,), generator=gen)
        if x_hard is None:
            xb, yb = x_all[idx], y_all[idx]
        else:
            hidx = torch.randint(0, len(x_hard), (k,), generator=gen)
            xb, yb = torch.cat([x_all[idx], x_hard[hidx]]), torch.cat([y_all[idx], y_hard[hidx]])
        x, y = _augment(xb, yb, gen, flip_channels=True)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        logits = net(x)
        # plain BCE keeps the probabilities honest (a pos_weight made every vessel fork a
        # certain nodule); a light Dice term keeps small nodules from vanishing
        bce = F.binary_cross_entropy_with_logits(logits, y)
        p = torch.sigmoid(logits)
        dice = _dice(p, y)
        loss = bce + dice_weight * dice
        if nodule_dice_weight:
            loss = loss + nodule_dice_weight * _nodule_dice(p, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  nodule step {step}/{steps} loss {loss.item():.4f} (bce {bce.item():.4f}, dice {dice.item():.3f}) {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return net.eval()


def train_triage(slices, labels, spec, steps: int, batch: int, seed: int):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = TriageCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    x_all = _windowed(slices, spec.input.hu_window)
    y_all = torch.from_numpy(labels.astype(np.float32))[:, None]
    n = len(x_all)
    t0 = time.monotonic()
    net.train()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        x, _ = _augment(x_all[idx], None, gen, flip_channels=False)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 2e-3)
        loss = F.binary_cross_entropy_with_logits(net(x), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  triage step {step}/{steps} loss {loss.item():.4f} {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return net.eval()


def export(net, example: torch.Tensor, path: Path, input_name: str, output_name: str, spatial_dynamic: bool,
           temperature: float = 1.0) -> float:
    """ONNX export (opset 18, dynamic batch; dynamic rows/columns for fully convolutional
    nets) and the largest difference to torch on the example, checked with ONNX Runtime."""
    import onnxruntime as ort

    wrapped = WithSigmoid(net, temperature).eval()
    axes = {0: "batch"}
    if spatial_dynamic:
        axes.update({2: "rows", 3: "columns"})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        wrapped,
        (example,),
        str(tmp),
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: axes, output_name: axes},
        opset_version=18,
        dynamo=False,
    )
    os.replace(tmp, path)
    with torch.no_grad():
        ref = wrapped(example).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {input_name: example.numpy()})[0]
    return float(np.abs(got - ref).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inference.training", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "models"), help="models folder to write into")
    ap.add_argument("--phantoms", type=int, default=150, help="training phantoms (seeds from %d up)" % TRAIN_SEED_START)
    ap.add_argument("--cache", default="var/training-cache", help="sample cache folder")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--nodule-steps", type=int, default=5000, help="round-1 steps (1.3.0 and before: 2500)")
    ap.add_argument("--triage-steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1234, help="torch seed (weights, batches)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=[NODULE, TRIAGE])
    ap.add_argument("--mine-phantoms", type=int, default=40, help="training phantoms to mine hard negatives on (0: no round 2)")
    ap.add_argument("--finetune-steps", type=int, default=1500)
    ap.add_argument("--mining-rounds", type=int, default=3,
                    help="hard-negative mining rounds, each on the next --mine-phantoms training phantoms")
    # 4 on 1.0.0's network found more small nodules but let more vessels through (FROC 0.63
    # against 0.67 on seeds 0-11). 2 on 1.1.0's, with the rescorer sorting out the vessels,
    # raised the validation FROC from 0.824 to 0.837 and found 0.91 of the nodules at 8 FP/scan
    # against 0.88: 1.2.0 has it. 4 on 1.1.0's, with its own rescorer: validation FROC 0.817.
    ap.add_argument("--small-boost", type=float, default=2.0,
                    help="extra weight of small-nodule patches in the mining rounds' fine-tuning")
    # 2 with 5000 steps (1.4.0): validation FROC 0.890 against 0.847 for 2500 steps without it
    ap.add_argument("--round1-small-boost", type=float, default=2.0,
                    help="extra weight of small-nodule patches in round 1 (before any mining)")
    ap.add_argument("--resume", action="store_true", help="reuse cached round-1 weights of the nodule network")
    ap.add_argument("--temperature", type=float, default=4.0,
                    help="the nodule network's exported probability is sigmoid(logit / this)")
    ap.add_argument("--export-only", action="store_true",
                    help="export the cached final nodule weights again (e.g. with another --temperature)")
    ap.add_argument("--widths", default=",".join(map(str, NODULE_WIDTHS)), help="channels of the nodule U-Net's four levels")
    ap.add_argument("--dice-weight", type=float, default=0.3, help="weight of the Dice loss over the batch")
    ap.add_argument("--nodule-dice-weight", type=float, default=0.3,
                    help="weight of the Dice loss averaged over the patches showing a nodule")
    ap.add_argument("--rescore-phantoms", type=int, default=100,
                    help="phantoms after the training ones to fit the nodule rescorer on (0: none)")
    ap.add_argument("--rescore-l2", type=float, default=1.0, help="L2 penalty of the rescorer (standardised features)")
    ap.add_argument("--rescore-only", action="store_true", help="only fit the rescorer of the nodule model in --out")
    args = ap.parse_args(argv)
    rescore_seeds = range(TRAIN_SEED_START + args.phantoms, TRAIN_SEED_START + args.phantoms + args.rescore_phantoms)
    if rescore_seeds.stop > VALIDATION_SEED_START:
        ap.error(f"--phantoms + --rescore-phantoms: at most {VALIDATION_SEED_START - TRAIN_SEED_START} (validation seeds follow)")
    if args.rescore_only and not args.rescore_phantoms:
        ap.error("--rescore-only needs --rescore-phantoms above 0")
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--widths: four positive channel counts, e.g. 8,16,32,64 (got {args.widths!r})")
    shape = {"widths": widths, "dice_weight": args.dice_weight,
             "nodule_dice_weight": args.nodule_dice_weight}
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    nodule = load_spec(out / NODULE) if (out / NODULE / "model.toml").exists() else find_model(NODULE)
    triage = load_spec(out / TRIAGE) if (out / TRIAGE / "model.toml").exists() else find_model(TRIAGE)
    if args.rescore_only:
        print(json.dumps({NODULE: fit_rescorer(out / NODULE, rescore_seeds, args.workers, args.rescore_l2)}, indent=2))
        return 0
    seeds = range(TRAIN_SEED_START, TRAIN_SEED_START + args.phantoms)
    print(f"phantoms: seeds {seeds.start}-{seeds.stop - 1}", file=sys.stderr)
    patches, masks, slices, labels = build_dataset(seeds, nodule.input, triage.input, Path(args.cache), args.workers)
    print(f"nodule patches {len(patches)} ({masks.reshape(len(masks), -1).max(1).mean():.0%} with nodule), triage slices {len(slices)} ({labels.mean():.0%} positive)", file=sys.stderr)
    report = {"phantom_seeds": [seeds.start, seeds.stop - 1], "torch": torch.__version__}
    if args.only in (None, NODULE):
        example = _windowed(patches[:2], nodule.input.hu_window)
        if args.export_only:
            net = NoduleUNet(context=nodule.input.context_slices, widths=widths)
            net.load_state_dict(torch.load(Path(args.cache) / f"{NODULE}.pt"))
            report[NODULE] = {"weights": f"{args.cache}/{NODULE}.pt", "widths": list(widths)}
        else:
            # everything round 1 depends on names its cached weights (1.3.0 and before hashed
            # the shape alone, so --resume with other --nodule-steps reused stale weights)
            round1 = {**shape, "steps": args.nodule_steps, "small_boost": args.round1_small_boost, "seed": args.seed}
            tag = hashlib.sha256(repr(sorted(round1.items())).encode()).hexdigest()[:8]
            weights = Path(args.cache) / f"{NODULE}-round1-{tag}.pt"
            if args.resume and weights.exists():
                net = NoduleUNet(context=nodule.input.context_slices, widths=widths)
                net.load_state_dict(torch.load(weights))
                print(f"{NODULE}: round 1 weights from {weights}", file=sys.stderr)
            else:
                net = train_nodule(patches, masks, nodule, args.nodule_steps, args.batch, args.seed,
                                   small_boost=args.round1_small_boost, **shape)
                torch.save(net.state_dict(), weights)
            export(net, example, out / NODULE / "model.onnx", nodule.input.name, nodule.output.name, True)
            report[NODULE] = {"patches": int(len(patches)), "steps": args.nodule_steps, "widths": list(widths),
                              "dice_weight": args.dice_weight, "nodule_dice_weight": args.nodule_dice_weight,
                              "round1_small_boost": args.round1_small_boost, "parameters": sum(p.numel() for p in net.parameters())}
            if args.mine_phantoms:
                # rounds 2, 3...: hard negative mining. Run the network so far on training
                # phantoms it has not been mined on, cut patches where it sees a nodule that is
                # not there, and fine-tune with all mined patches so far in every batch.
                hard_p, hard_m, rounds = [], [], []
                for r in range(args.mining_rounds):
                    if r:
                        export(net, example, out / NODULE / "model.onnx", nodule.input.name, nodule.output.name, True)
                    first = TRAIN_SEED_START + r * args.mine_phantoms
                    mined = mine(out / NODULE, range(first, first + args.mine_phantoms), Path(args.cache), args.workers)
                    hard_p.append(mined[0])
                    hard_m.append(mined[1])
                    print(f"{NODULE}: round {r + 2}: {len(mined[0])} mined hard negatives", file=sys.stderr)
                    hard = (np.concatenate(hard_p), np.concatenate(hard_m))
                    net = train_nodule(patches, masks, nodule, args.finetune_steps, args.batch, args.seed + 1 + r,
                                       net=net, hard=hard, lr=5e-4, small_boost=args.small_boost, **shape)
                    rounds.append({"mined_on_seeds": [first, first + args.mine_phantoms - 1],
                                   "mined_negatives": int(len(mined[0])), "finetune_steps": args.finetune_steps})
                report[NODULE]["mining_rounds"] = rounds
        diff = export(net, example, out / NODULE / "model.onnx", nodule.input.name, nodule.output.name, True,
                      temperature=args.temperature)
        report[NODULE].update(onnx_max_abs_diff=diff, temperature=args.temperature)
        print(f"{NODULE}: exported, max |onnx - torch| = {diff:.2e}", file=sys.stderr)
        torch.save(net.state_dict(), Path(args.cache) / f"{NODULE}.pt")
        if args.rescore_phantoms:
            report[NODULE]["rescore"] = fit_rescorer(out / NODULE, rescore_seeds, args.workers, args.rescore_l2)
    if args.only in (None, TRIAGE):
        net = train_triage(slices, labels, triage, args.triage_steps, min(args.batch, 16), args.seed)
        example = _windowed(slices[:2], triage.input.hu_window)
        diff = export(net, example, out / TRIAGE / "model.onnx", triage.input.name, triage.output.name, False)
        report[TRIAGE] = {"slices": int(len(slices)), "steps": args.triage_steps, "onnx_max_abs_diff": diff,
                          "parameters": sum(p.numel() for p in net.parameters())}
        print(f"{TRIAGE}: exported, max |onnx - torch| = {diff:.2e}", file=sys.stderr)
        torch.save(net.state_dict(), Path(args.cache) / f"{TRIAGE}.pt")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
