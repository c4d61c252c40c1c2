"""The ``fxgrow`` command line. Run ``fxgrow --help`` or ``fxgrow COMMAND --help``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from .errors import (CheckpointError, ConfigError, EquivalenceError, FxgrowError, StorageError,
                     StudyError, storage_error)

EXAMPLES = """\
examples:
  fxgrow scale --model tiny_vit --reduce --epochs 12 --warmup 4 --interval 3 \\
      --end-epoch 10 --budget 64 --layer-threshold 2 --run-dir runs/digits
  fxgrow scale --resume runs/digits                   # continue a killed run
  fxgrow scale --model tiny_vit --model-kwargs '{"embed_dim": 32, "depth": 2}' --epochs 6 \
      --triple-width 64 --triple-depth 4 --triple-stage1 1 --triple-stage2 1 --run-dir runs/t3
                                       # TripLe: widen, stage I, deepen (+m), II, III
  fxgrow compare --model tiny_vit --epochs 12 --warmup 4 --interval 3 --end-epoch 10 \\
      --budget 64 --layer-threshold 2 --run-dir runs/compare
  fxgrow scale --model vit_tiny_patch16_224 --budget 32 --layer-threshold 2 \\
      --model-kwargs '{"img_size": 32, "patch_size": 4, "depth": 4}' --run-dir runs/t
  fxgrow reduce --model deit_small_patch16_224 --model-kwargs '{"num_classes": 100}' \\
      --out models/deit_s_reduced
  fxgrow inspect models/deit_s_reduced
  fxgrow analyze models/m --data digits --batches 4 --out m.report --plan-out plan.json \\
      --budget 32 --layer-threshold 2
  fxgrow grow models/m --plan plan.json --out models/m_grown
  fxgrow verify models/m models/m_grown
  fxgrow demo-reduce
  torchrun --nproc_per_node=4 -m fxgrow.cli scale --batch-size 256 ... --run-dir runs/ddp
                                       # DDP; --batch-size is the global batch

Models are timm names (built with pretrained=False; keyword arguments as JSON with
--model-kwargs) or fxgrow's own builders (fxgrow.models). --data is "digits" (scikit-learn's
digits, embedded) or an ImageFolder root with train/ and val/ sub-directories.
Exit codes: 0 success, 1 verification failed, 2 bad input or usage (nothing written),
3 another rank failed or a collective timed out (distributed runs), 4 the disk refused a
write (full, read-only, a path that is a file), 5 an internal error of fxgrow (a bug).
"""


STUDY_EXAMPLES = """\
examples:
  fxgrow study --quick --run-dir studies/quick
  fxgrow study --data teacher --model-kwargs '{"embed_dim": 64, "depth": 4, "num_heads": 4}' \\
      --img-size 16 --epochs 16 --lr 2e-3 --warmup 4 --interval 3 --end-epoch 13 \\
      --param-target 175000 --layer-threshold 4 --seeds 0,1,2 --run-dir studies/teacher
  fxgrow study --quick --variants '{"fused": {"schedule": {"mode": "fused"}}}' --run-dir studies/qf
  fxgrow study --full --data teacher --run-dir studies/full-teacher   # benchmarks/bench_study.py
  fxgrow study --resume studies/teacher       # continue a killed study
  fxgrow study --report studies/teacher       # rewrite report.md, report.json and plots/

--data is "digits", "teacher" (random inputs labelled by a random full-width model, fresh
samples every epoch) or an ImageFolder root. The dense condition needs --param-target.
--variants adds named grown conditions (a rule, the base's head-dim and MLP ratios, schedule
overrides; docs/study.md), run besides --conditions (default: the six and every variant).
"""


# -------------------------------------------------------------------------- argument groups


DEFAULT_MODEL = "tiny_vit"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that a command can tell an option given from one left out.
    p.add_argument("--model", default=None,
                   help=f"timm model name or fxgrow builder (default: {DEFAULT_MODEL})")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help='keyword arguments of the model as JSON, e.g. \'{"depth": 4}\'')


def _add_reduce_args(p: argparse.ArgumentParser, flag: bool) -> None:
    if flag:
        p.add_argument("--reduce", action="store_true",
                       help="start from the reduced model (paper: head dim and MLP halved)")
    p.add_argument("--head-dim", type=float, default=0.5, help="head-dim ratio of the reduction")
    p.add_argument("--mlp-hidden", type=float, default=0.5,
                   help="MLP hidden-width ratio of the reduction")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and training")
    g.add_argument("--data", default="digits", help='"digits" or an ImageFolder root')
    g.add_argument("--img-size", type=int, default=None,
                   help="image size (default 32 for digits, 224 for folders)")
    g.add_argument("--epochs", type=int, default=12)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--lr-warmup", type=float, default=1.0, help="LR warm-up in epochs")
    g.add_argument("--optimizer", default="adamw", help="timm optimizer name (default adamw)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=None,
                   help="global grad-norm clipping (sees new params' gradients after growth)")
    g.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("scaling schedule")
    s.add_argument("--warmup", type=int, default=4, help="epochs before the first growth")
    s.add_argument("--interval", type=int, default=3, help="epochs between growth rounds")
    s.add_argument("--end-epoch", type=int, default=None,
                   help="last epoch after which growth may happen (default: epochs - 1)")
    s.add_argument("--budget", type=int, default=None,
                   help="new neurons (or params, see --budget-unit) per round")
    s.add_argument("--param-target", type=int, default=None,
                   help="final parameter count, spread over the rounds (instead of --budget)")
    s.add_argument("--budget-unit", choices=("neurons", "params"), default="neurons")
    s.add_argument("--layer-threshold", type=int, default=60,
                   help="skip layers with fewer eligible neurons (paper: 60 for DeiT-S)")
    s.add_argument("--targets", default=None, help="comma-separated linear targets (default all)")
    s.add_argument("--analysis-batches", type=int, default=4)
    s.add_argument("--method", choices=("fast", "exact"), default="fast")
    s.add_argument("--reservoir", type=int, default=None, help="analysis reservoir tokens")
    s.add_argument("--growth-scale", type=float, default=0.2)
    s.add_argument("--growth-mode", choices=("paper", "fused"), default="paper")
    s.add_argument("--init-state", choices=("fresh", "parent"), default="fresh",
                   help="optimizer state of new params (parent: copied from the grown neuron)")
    s.add_argument("--no-pack", action="store_true",
                   help="train grown models in the exact form instead of packed (two GEMMs "
                        "per grown target; docs/packing.md)")
    p.add_argument("--run-dir", default=None, help="new run directory (refused if it exists)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (all other options come from it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    d = p.add_argument_group("distributed (under torchrun; see docs/distributed.md)")
    d.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                   help="process-group backend (default: nccl with CUDA, else gloo)")
    d.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long a rank waits for the others before failing (default 600)")
    d.add_argument("--no-shard-analysis", action="store_true",
                   help="every rank analyses every target, instead of its share of them "
                        "(the same report either way)")


def _add_triple_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("TripLe schedule (widen before training, deepen after stage I)")
    t.add_argument("--triple-width", type=int, default=None,
                   help="residual width to widen to before training")
    t.add_argument("--triple-depth", type=int, default=None,
                   help="blocks after stage I (omit: TripLe without depth expansion)")
    t.add_argument("--triple-stage1", type=int, default=1, help="stage I epochs")
    t.add_argument("--triple-stage2", type=int, default=1,
                   help="stage II epochs (old blocks frozen)")
    t.add_argument("--triple-width-op", choices=("st", "b2b", "pad0"), default="st")
    t.add_argument("--triple-heads", choices=("follow", "keep"), default="follow")
    t.add_argument("--triple-depth-op", choices=("stck", "inpt", "st", "st_stck", "st_inpt"),
                   default="stck")
    t.add_argument("--triple-fresh-state", action="store_true",
                   help='"-m": drop the optimizer state at each expansion (default "+m")')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxgrow", description="Grow transformers by exact surgery on torch.fx graphs.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scale", help="train with growth rounds (reduce -> train -> grow ...)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    _add_reduce_args(p, flag=True)
    _add_train_args(p)
    _add_triple_args(p)

    p = sub.add_parser("compare", help="full-width model vs reduce-then-grow, trained alike "
                       "(paper table 1)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    _add_reduce_args(p, flag=False)
    _add_train_args(p)

    p = sub.add_parser("study", help="conditions x seeds on one data set (full, base, "
                       "splitting, random, uniform, dense), resumable, with a report",
                       epilog=STUDY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    _add_reduce_args(p, flag=False)
    _add_train_args(p)
    t = p.add_argument_group("study (--run-dir is the study directory; rerunning resumes it)")
    t.add_argument("--conditions", default=None,
                   help="comma-separated conditions (default: all six)")
    t.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    t.add_argument("--teacher-train-size", type=int, default=2048,
                   help="--data teacher: fresh training samples per epoch")
    t.add_argument("--teacher-val-size", type=int, default=1024)
    t.add_argument("--quick", action="store_true",
                   help="the test suite's tiny study (2 conditions, 1 seed, 3 epochs); "
                        "ignores the model and training options")
    t.add_argument("--full", action="store_true",
                   help="the benchmark's full study (the six conditions and the paper's "
                        "optional axes as variants; docs/study.md) on --data digits or "
                        "teacher; ignores the model and training options")
    t.add_argument("--variants", default=None, metavar="JSON_OR_PATH",
                   help="extra grown conditions: a JSON object name -> {rule, head_dim, "
                        "mlp_hidden, schedule}, or a path to a JSON file holding one")
    t.add_argument("--report", default=None, metavar="STUDY_DIR",
                   help="rewrite the report and plots of STUDY_DIR without training")

    p = sub.add_parser("inspect", help="per-node table of a saved model and its growth")
    p.add_argument("model_dir")
    p.add_argument("--img-size", type=int, default=None)

    p = sub.add_parser("reduce", help="reduce a model (head dim, MLP hidden) and save it")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--load", default=None, metavar="MODEL_DIR", help="a saved model")
    _add_model_args(p)
    _add_reduce_args(p, flag=False)
    p.add_argument("--out", required=True, help="output model directory")

    p = sub.add_parser("analyze", help="splitting analysis of a saved model; optional plan")
    p.add_argument("model_dir")
    p.add_argument("--data", default="digits")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batches", type=int, default=4, help="analysis batches (at least 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--method", choices=("fast", "exact"), default="fast")
    p.add_argument("--out", required=True,
                   help="report file to create (safetensors; refused if it exists)")
    p.add_argument("--plan-out", default=None, help="write the selected plan (JSON) here")
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--budget-unit", choices=("neurons", "params"), default="neurons")
    p.add_argument("--layer-threshold", type=int, default=60)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("grow", help="grow a saved model by a plan (JSON) and save the result")
    p.add_argument("model_dir")
    p.add_argument("--plan", required=True, help="plan JSON file")
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=float, default=0.2)
    p.add_argument("--mode", choices=("paper", "fused"), default="paper")
    p.add_argument("--img-size", type=int, default=None)

    p = sub.add_parser("verify", help="check two saved models compute the same function")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the random test input")

    sub.add_parser("demo-reduce", help="trace DeiT-S and reduce it as the paper does")
    return parser


# ----------------------------------------------------------------------------- validation
# One function per option group, each run before a command reads or writes anything, so that
# bad input costs nothing and leaves nothing behind.


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_number(args: argparse.Namespace, name: str, *, low: float, above: bool = False,
                  high: float | None = None, optional: bool = False) -> None:
    """``--name`` is finite and at least ``low`` (above ``low`` with ``above``), at most
    ``high``; None passes when ``optional``."""
    value = getattr(args, name)
    flag = "--" + name.replace("_", "-")
    if value is None:
        _need(optional, f"{flag} is required")
        return
    bound = f"> {low}" if above else f">= {low}"
    kind = "an integer" if isinstance(value, int) else "a finite number"
    _need(math.isfinite(value) and (value > low if above else value >= low)
          and (high is None or value <= high),
          f"{flag} must be {kind} {bound}{f' and <= {high}' if high is not None else ''}"
          f", got {value}")


def _check_model_args(args: argparse.Namespace) -> None:
    """--model / --model-kwargs; fills their defaults (as the run directory records them)."""
    if args.model is None:
        args.model = DEFAULT_MODEL
    if args.model_kwargs is None:
        args.model_kwargs = "{}"
    _need(bool(args.model.strip()), "--model must name a model")
    _model_kwargs(args.model_kwargs)


def _check_reduce_args(args: argparse.Namespace) -> None:
    for name in ("head_dim", "mlp_hidden"):
        _check_number(args, name, low=0.0, above=True, high=1.0)


def _check_image_size(args: argparse.Namespace) -> None:
    _check_number(args, "img_size", low=1, optional=True)


def _check_train_args(args: argparse.Namespace) -> None:
    """Training, scaling-schedule and distributed options of ``scale`` and ``compare``."""
    _check_image_size(args)
    for name in ("epochs", "batch_size", "interval", "analysis_batches"):
        _check_number(args, name, low=1)
    for name in ("warmup", "layer_threshold", "seed"):
        _check_number(args, name, low=0)
    for name in ("budget", "param_target", "reservoir", "end_epoch"):
        _check_number(args, name, low=1 if name != "end_epoch" else 0, optional=True)
    _check_number(args, "lr", low=0.0, above=True)
    _check_number(args, "min_lr", low=0.0, high=args.lr if math.isfinite(args.lr) else None)
    for name in ("weight_decay", "lr_warmup"):
        _check_number(args, name, low=0.0)
    _check_number(args, "label_smoothing", low=0.0)
    _need(args.label_smoothing < 1, f"--label-smoothing must be < 1, got {args.label_smoothing}")
    _check_number(args, "clip_grad", low=0.0, above=True, optional=True)
    _check_number(args, "growth_scale", low=0.0, above=True)
    _check_number(args, "dist_timeout", low=0.0, above=True, optional=True)
    _need(args.budget is not None or args.param_target is not None
          or _triple(args) is not None,
          "give --budget (per round) or --param-target (final params)")
    _need(args.budget is None or args.param_target is None,
          "give only one of --budget and --param-target")
    if args.targets is not None:
        names = args.targets.split(",")
        _need(all(n.strip() for n in names), f"--targets has an empty name: {args.targets!r}")
    _train_config(args)  # the trainer's own checks (optimizer name, min_lr <= lr, ...)
    _schedule(args)


def _check_targets(args: argparse.Namespace, gm) -> None:
    """--targets names linears of the model (checked once it is built, before training)."""
    if args.targets is None:
        return
    from .linears import linear_sites

    sites = linear_sites(gm)
    unknown = [t for t in args.targets.split(",") if t not in sites]
    _need(not unknown, f"--targets names no linear of the model: {unknown}; it has e.g. "
                       f"{list(sites)[:4]}")


def _check_new_output(path: str, flag: str) -> None:
    """An output path that must not exist yet, in a directory that can hold it."""
    target = Path(path)
    _need(not (target.exists() or target.is_symlink()),
          f"{flag} {path!r} already exists; choose another output (nothing was written)")
    parent = next((p for p in target.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise StorageError(f"{flag} {path!r}: {parent} is a file, not a directory")


def _check_analyze_args(args: argparse.Namespace) -> None:
    _check_image_size(args)
    for name in ("batches", "batch_size"):
        _check_number(args, name, low=1)
    _check_number(args, "layer_threshold", low=0)
    _check_number(args, "budget", low=1, optional=True)
    _check_new_output(args.out, "--out")
    if args.plan_out is not None:
        _need(args.budget is not None, "--plan-out needs --budget (neurons or params per plan)")
        _need(Path(args.plan_out).absolute() != Path(args.out).absolute(),
              "--plan-out and --out name the same file")
        _check_new_output(args.plan_out, "--plan-out")


def _check_grow_args(args: argparse.Namespace) -> None:
    _check_image_size(args)
    _check_number(args, "scale", low=0.0, above=True)
    _check_new_output(args.out, "--out")


def _check_verify_args(args: argparse.Namespace) -> None:
    _check_image_size(args)
    _check_number(args, "batch", low=1)
    _check_number(args, "seed", low=0)


def _check_reduce_command(args: argparse.Namespace) -> None:
    if args.load is not None:
        _need(args.model is None and args.model_kwargs is None,
              "--load reduces a saved model: --model and --model-kwargs do not apply to it")
    else:
        _check_model_args(args)
    _check_reduce_args(args)
    _check_new_output(args.out, "--out")


# -------------------------------------------------------------------------------- helpers


def _model_kwargs(text: str) -> dict[str, Any]:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-kwargs is not JSON: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object, got {text!r}")
    return kwargs


def model_spec(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The build spec of a model name: fxgrow's builders first, then timm."""
    from . import models

    source = "fxgrow" if name in models.BUILDERS else "timm"
    return {"source": source, "name": name, "kwargs": kwargs}


def _build(spec: dict[str, Any], reduce: tuple[float, float] | None):
    """A freshly initialised model, reduced if asked. keep="first": the kept rows of a random
    init are a random init of the narrower model (largest-norm rows would skew it)."""
    from . import models

    gm = models.build(spec)
    if reduce is not None:
        from .passes import ReduceSpec, reduce as reduce_pass

        gm = reduce_pass(gm, ReduceSpec(head_dim=reduce[0], mlp_hidden=reduce[1], keep="first"))
    return gm


def _example_input(gm, img_size: int | None, batch: int = 1, seed: int = 0):
    import torch

    if img_size is None:
        base = (gm.meta.get("fxgrow") or {}).get("base") or {}
        img_size = base.get("kwargs", {}).get("img_size")
    if img_size is None:
        try:
            size = gm.get_submodule("patch_embed").img_size
            img_size = size[0] if isinstance(size, (tuple, list)) else size
        except AttributeError:
            img_size = 224
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img_size, img_size, generator=generator)


def _train_config(args: argparse.Namespace):
    from .training.trainer import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        weight_decay=args.weight_decay, warmup_epochs=args.lr_warmup, optimizer=args.optimizer,
        label_smoothing=args.label_smoothing, clip_grad=args.clip_grad, seed=args.seed,
    )


def _schedule(args: argparse.Namespace):
    from .training.scaler import ScalingSchedule

    if args.budget is None and args.param_target is None:
        return None  # a TripLe run without neuron growth (validated by _check_train_args)
    return ScalingSchedule(
        warmup_epochs=args.warmup, interval=args.interval,
        end_epoch=args.end_epoch if args.end_epoch is not None else args.epochs - 1,
        budget_per_round=args.budget, total_param_target=args.param_target,
        budget_unit=args.budget_unit, layer_threshold=args.layer_threshold,
        targets=args.targets.split(",") if args.targets else None,
        analysis_batches=args.analysis_batches, method=args.method, reservoir=args.reservoir,
        scale=args.growth_scale, mode=args.growth_mode, init_state=args.init_state,
        epochs=args.epochs,
    )


def _triple(args: argparse.Namespace):
    if getattr(args, "triple_width", None) is None and getattr(args, "triple_depth", None) is None:
        return None
    from .training.triple import TripleSchedule

    return TripleSchedule(
        width=args.triple_width, depth=args.triple_depth, stage1_epochs=args.triple_stage1,
        stage2_epochs=args.triple_stage2, width_operator=args.triple_width_op,
        heads=args.triple_heads, depth_operator=args.triple_depth_op,
        carry_state=not args.triple_fresh_state, seed=args.seed,
    )


_RUN_ONLY = ("resume", "quiet", "run_dir", "command", "backend", "dist_timeout",
             "no_shard_analysis")


def _recorded_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in _RUN_ONLY}


def _resumed_args(args: argparse.Namespace, run_dir: Path) -> argparse.Namespace:
    from .training.rundir import RunDir

    saved = RunDir(run_dir, resume=True).config().get("extra", {}).get("cli")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{run_dir} was not started by the fxgrow command line")
    return _merged(saved, args, run_dir)


def _merged(saved: dict[str, Any], args: argparse.Namespace, run_dir: Path) -> argparse.Namespace:
    """The recorded options of a run and this invocation's run-only options, re-validated
    (a run directory is a file a user can edit)."""
    defaults = vars(build_parser().parse_args([args.command]))
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
        raise CheckpointError(f"{run_dir}: the recorded options name unknown options {unknown}")
    merged = argparse.Namespace(**{**defaults, **saved})
    for key in _RUN_ONLY:
        setattr(merged, key, getattr(args, key, None))
    try:
        _check_model_args(merged)
        _check_reduce_args(merged)
        _check_train_args(merged)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{run_dir}: the recorded options are invalid: {exc}") from exc
    return merged


def _setup(args: argparse.Namespace, reduced: bool):
    """Data, model and train config for one run (no file written)."""
    from .training import data as data_mod
    from .training.trainer import seed_everything

    img_size = args.img_size if args.img_size is not None else (
        32 if args.data == "digits" else 224)
    bundle = data_mod.load(args.data, img_size, seed=args.seed)
    kwargs = _model_kwargs(args.model_kwargs)
    kwargs.setdefault("num_classes", bundle.num_classes)
    spec = model_spec(args.model, kwargs)
    if spec["source"] == "fxgrow":
        kwargs.setdefault("img_size", img_size)
    config = _train_config(args)
    seed_everything(args.seed)
    reduce = (args.head_dim, args.mlp_hidden) if reduced else None
    model = _build(spec, reduce)
    _check_targets(args, model)
    return bundle, model, config


# ------------------------------------------------------------------------------- commands


def _new_run_dir(args: argparse.Namespace) -> Path:
    from .training import distributed
    from .training.rundir import RunDir

    if args.run_dir is None:
        raise ConfigError("give --run-dir (a new directory) or --resume RUN_DIR")
    run_dir = Path(args.run_dir)
    # Refuse an existing directory before any work (rank 0 decides for all ranks).
    distributed.on_main(lambda: RunDir(run_dir), "checking the run directory")
    return run_dir


def cmd_scale(args: argparse.Namespace) -> int:
    from .training import distributed
    from .training.trainer import fit

    if args.resume:
        run_dir = Path(args.resume)
        args = _resumed_args(args, run_dir)
    else:
        _check_model_args(args)
        _check_reduce_args(args)
        _check_train_args(args)
        run_dir = _new_run_dir(args)
    cli = _recorded_args(args)
    schedule = _schedule(args)
    bundle, model, config = _setup(args, reduced=args.reduce)
    result = fit(model, bundle, config, str(run_dir), schedule=schedule,
                 run_config={"cli": cli}, resume=bool(args.resume), quiet=args.quiet,
                 triple=_triple(args), pack=not getattr(args, "no_pack", False),
                 shard_analysis=not args.no_shard_analysis)
    if distributed.is_main():
        print(result.summary)
        print(f"run directory: {run_dir}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .training import distributed
    from .training.trainer import fit

    from . import _fsio

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "compare.json").is_file():
            raise CheckpointError(f"{run_dir} is not a compare run directory (no compare.json)")
        try:
            saved = json.loads((run_dir / "compare.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{run_dir}/compare.json is unreadable: {exc}") from exc
        if not isinstance(saved, dict):
            raise CheckpointError(f"{run_dir}/compare.json is not a record of options")
        args = _merged(saved, args, run_dir)
    else:
        _check_model_args(args)
        _check_reduce_args(args)
        _check_train_args(args)
        run_dir = _new_run_dir(args)
    cli = _recorded_args(args)
    # The grown arm's reduction is checked before the full arm trains (its ratios may not fit).
    _build(model_spec(args.model, _model_kwargs(args.model_kwargs)), (args.head_dim,
                                                                      args.mlp_hidden))
    rows = []
    for label, grow_model in (("full", False), ("grown", True)):
        bundle, model, config = _setup(args, reduced=grow_model)
        schedule = _schedule(args) if grow_model else None
        sub = run_dir / label
        resume = bool(args.resume) and (sub / "config.json").is_file()
        if not args.resume and label == "full":
            def start() -> None:
                with _fsio.storage_errors(f"creating the run directory {run_dir}"):
                    run_dir.mkdir(parents=True)
                _fsio.atomic_write(run_dir / "compare.json",
                                   json.dumps(cli, indent=1, sort_keys=True))

            distributed.on_main(start, "creating the run directory")
        if not args.quiet and distributed.is_main():
            print(f"== {label}: {'reduce-then-grow' if grow_model else 'full width'}",
                  file=sys.stderr)
        result = fit(model, bundle, config, str(sub), schedule=schedule,
                     run_config={"cli": cli, "compare": label}, resume=resume, quiet=args.quiet,
                     pack=not getattr(args, "no_pack", False),
                     shard_analysis=not args.no_shard_analysis)
        # The schedule forbids growth after the last epoch: its metrics are the final model's.
        first, last = result.metrics[0], result.metrics[-1]
        rows.append({"model": f"{args.model} ({'reduce+grow' if grow_model else 'full'})",
                     "base_params": first["params"], "final_params": last["params"],
                     "base_flops": first["flops"], "final_flops": last["flops"],
                     "top1": last["top1"], "top5": last["top5"],
                     "rounds": sum(1 for r in result.growth if r.get("grown"))})
    table = compare_table(rows)
    if distributed.is_main():
        _fsio.atomic_write(run_dir / "compare.md", table + "\n")
        print(table)
        print(f"run directory: {run_dir}")
    return 0


def compare_table(rows: list[dict[str, Any]]) -> str:
    """Paper table 1 columns: base/final params, base/final FLOPs, top-1, top-5."""
    head = (f"| {'model':<28} | base params | final params | base MFLOPs | final MFLOPs "
            f"| top-1 | top-5 | rounds |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(
            f"| {r['model']:<28} | {r['base_params']:>11,} | {r['final_params']:>12,} "
            f"| {r['base_flops'] / 1e6:>11.2f} | {r['final_flops'] / 1e6:>12.2f} "
            f"| {r['top1']:>5.1f} | {r['top5']:>5.1f} | {r['rounds']:>6} |"
        )
    return "\n".join(lines)


def _variants(text: str | None) -> dict[str, Any]:
    """--variants: a JSON object, or the path of a JSON file holding one."""
    if text is None:
        return {}
    source = "--variants"
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"--variants {text!r} is neither a JSON object nor a file")
        source, text = f"--variants file {path}", path.read_text()
    try:
        variants = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source} is not JSON: {exc}") from exc
    if not isinstance(variants, dict):
        raise ConfigError(f"{source} must be a JSON object of name -> variant, got "
                          f"{type(variants).__name__}")
    return variants


def _with_variants(spec, variants: dict[str, Any]):
    """``spec`` with ``variants`` added to its own and to its conditions (validated anew)."""
    import dataclasses

    new = [name for name in variants if name not in spec.conditions]
    return dataclasses.replace(spec, variants={**spec.variants, **variants},
                               conditions=[*spec.conditions, *new])


def _study_spec(args: argparse.Namespace):
    import dataclasses

    from .training import study

    variants = _variants(args.variants)
    if args.quick or args.full:
        if args.full and args.data not in ("digits", "teacher"):
            raise ConfigError(f"--full runs on --data digits or teacher, got {args.data!r}")
        spec = (study.quick_spec if args.quick else study.full_spec)(args.data)
        return _with_variants(spec, variants)
    conditions = args.conditions.split(",") if args.conditions else [
        *study.CONDITIONS, *variants]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}") \
            from exc
    train = dataclasses.asdict(_train_config(args))
    del train["seed"]
    schedule = {}
    if variants or any(c in ("splitting", "random", "uniform", "dense") for c in conditions):
        schedule = _schedule(args).to_dict()
        del schedule["epochs"], schedule["rule"]
    return study.StudySpec(
        data=args.data, img_size=args.img_size or (224 if args.data not in ("digits", "teacher")
                                                   else 32),
        model=args.model, model_kwargs=_model_kwargs(args.model_kwargs),
        head_dim=args.head_dim, mlp_hidden=args.mlp_hidden, conditions=conditions,
        seeds=seeds, train=train, schedule=schedule,
        teacher_train_size=args.teacher_train_size, teacher_val_size=args.teacher_val_size,
        variants=variants,
    )


def cmd_study(args: argparse.Namespace) -> int:
    from .training import study

    if args.report:
        study.write_report(args.report)
        print(Path(args.report, "report.md").read_text(), end="")
        return 0
    if args.resume:
        root = Path(args.resume)
        if not (root / study.SPEC_FILE).is_file():
            raise StudyError(f"{root} is not a study directory (no {study.SPEC_FILE})")
        spec = study.StudySpec.from_dict(json.loads((root / study.SPEC_FILE).read_text()))
    elif args.run_dir is None:
        raise ConfigError("give --run-dir (the study directory) or --resume STUDY_DIR")
    else:
        if args.quick and args.full:
            raise ConfigError("give at most one of --quick and --full")
        if not (args.quick or args.full):
            _check_model_args(args)
            _check_reduce_args(args)
            _check_image_size(args)
        root, spec = Path(args.run_dir), _study_spec(args)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    study.run_study(spec, root, quiet=args.quiet, log=log)
    print((root / "report.md").read_text(), end="")
    print(f"study directory: {root}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import load
    from .inspection import summary

    _check_image_size(args)
    gm = load(args.model_dir)
    print(summary(gm, _example_input(gm, args.img_size)))
    return 0


def cmd_reduce(args: argparse.Namespace) -> int:
    from . import load, save
    from .passes import ReduceSpec, reduce as reduce_pass
    from .verify import count_params

    _check_reduce_command(args)
    if args.load:
        gm = reduce_pass(load(args.load), ReduceSpec(head_dim=args.head_dim,
                                                     mlp_hidden=args.mlp_hidden))
        before = count_params(load(args.load))
    else:
        spec = model_spec(args.model, _model_kwargs(args.model_kwargs))
        from . import models

        before = count_params(models.build(spec))
        gm = _build(spec, (args.head_dim, args.mlp_hidden))
    save(gm, args.out)
    print(f"reduced: {before:,} -> {count_params(gm):,} parameters; saved to {args.out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from . import _fsio, load, select
    from .training import data as data_mod
    from .passes import analyze

    _check_analyze_args(args)
    gm = load(args.model_dir)
    img_size = args.img_size if args.img_size is not None else _example_input(gm, None).shape[-1]
    bundle = data_mod.load(args.data, img_size)
    batches = []
    for batch in data_mod.loader(bundle.train, args.batch_size, shuffle=False):
        batches.append(batch)
        if len(batches) == args.batches:
            break
    report = analyze(gm, batches, F.cross_entropy, method=args.method, progress=not args.quiet)
    plan = None
    if args.plan_out:  # selected before anything is written
        plan = select(report, budget=args.budget, layer_threshold=args.layer_threshold,
                      budget_unit=args.budget_unit)
    with _fsio.storage_errors(f"writing the report {args.out}"):
        report.save(args.out)
    print(report.summary())
    if plan is not None:
        _fsio.atomic_write(args.plan_out, plan.to_json())
        print(f"plan: {plan.num_neurons} neurons in {len(plan)} layers -> {args.plan_out}")
    return 0


def cmd_grow(args: argparse.Namespace) -> int:
    from . import GrowthPlan, load, save
    from .errors import PlanError
    from .passes import grow
    from .verify import check_equivalence, count_params

    _check_grow_args(args)
    try:
        plan = GrowthPlan.from_json(Path(args.plan).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"cannot read plan {args.plan}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise PlanError(f"plan {args.plan} is not a UTF-8 text file: {exc}") from exc
    gm = load(args.model_dir)
    grown = grow(gm, plan, scale=args.scale, mode=args.mode)
    report = check_equivalence(gm, grown, _example_input(gm, args.img_size, batch=2))
    if not report.ok:
        print(report)
        return 1
    save(grown, args.out)
    print(f"grown: {count_params(gm):,} -> {count_params(grown):,} parameters, function "
          f"preserved; saved to {args.out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from . import load
    from .verify import check_equivalence

    _check_verify_args(args)
    reference, candidate = load(args.reference), load(args.candidate)
    report = check_equivalence(reference, candidate,
                               _example_input(reference, args.img_size, batch=args.batch,
                                              seed=args.seed))
    print(report)
    print("equivalent" if report.ok else "NOT equivalent")
    return 0 if report.ok else 1


def cmd_demo_reduce(args: argparse.Namespace) -> int:
    from .demos import reduction_demo

    reduction_demo()
    return 0


COMMANDS = {
    "scale": cmd_scale, "compare": cmd_compare, "study": cmd_study, "inspect": cmd_inspect,
    "reduce": cmd_reduce,
    "analyze": cmd_analyze, "grow": cmd_grow, "verify": cmd_verify,
    "demo-reduce": cmd_demo_reduce,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fxgrow`` console script; returns the exit code (see EXAMPLES)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    if args.command not in ("scale", "compare"):
        return _run(args)
    import torch.distributed

    from .training import distributed

    timeout = args.dist_timeout if args.dist_timeout is not None else distributed.DEFAULT_TIMEOUT
    try:
        joined = distributed.init_from_env(args.backend, timeout)
    except FxgrowError as exc:
        print(f"fxgrow: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except (RuntimeError, torch.distributed.DistError) as exc:
        if not distributed.is_distributed():
            raise
        # A collective inside DDP's backward or optimizer step: a peer died or timed out.
        rank, world = distributed.rank_world()
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"fxgrow: error: rank {rank}/{world}: distributed training failed: another rank "
              f"failed, exited or did not answer within the timeout ({first})", file=sys.stderr)
        return 3
    finally:
        if joined:
            distributed.shutdown()


def _run(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args)
    except EquivalenceError as exc:
        print(f"fxgrow: {exc}", file=sys.stderr)
        return 1
    except FxgrowError as exc:
        print(f"fxgrow: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a write fxgrow did not wrap: still the disk's answer, named
        error = storage_error(exc, f"fxgrow {args.command}")
        print(f"fxgrow: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
