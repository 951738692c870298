"""The ``activeguard`` admin command line.

Exit codes: 0 success, 1 a negative verdict or a failed run, 2 a usage or input error, 141 the output pipe closed early (`| head`).
Every command that produces figures accepts ``--json`` for automation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from activeguard.cli.support import (
    EVALUATION_SUITES,
    EXIT_NEGATIVE,
    EXIT_OK,
    EXIT_USAGE,
    MODEL_HELP,
    PASSPHRASE_ENV,
    ArgumentParser,
    UsageError,
    add_common,
    add_data_argument,
    add_evaluation_suite,
    add_model_arguments,
    add_passphrase,
    add_spec_arguments,
    emit,
    load_model_argument,
    model_data,
    parse_digits,
    parse_floats,
    parse_users,
    progress_enabled,
    read_passphrase,
)

if TYPE_CHECKING:
    from activeguard.models.sources import LoadedModel


def cmd_train(args: argparse.Namespace) -> int:
    from activeguard.models.architectures import accuracy, save_model, train_lenet5
    from activeguard.models.data import load_dataset

    split = load_dataset(args.dataset, seed=args.seed)
    if split.task != "classification":
        raise UsageError(f"train builds a LeNet-5 classifier; {args.dataset} is a {split.task} dataset")
    model = train_lenet5(split, epochs=args.epochs, seed=args.seed, progress=progress_enabled(args))
    acc = accuracy(model, split.x_test, split.y_test)
    mid = save_model(model, args.out, {"dataset": args.dataset, "seed": args.seed, "epochs": args.epochs})
    payload = {"model": str(args.out), "model_id": mid, "dataset": args.dataset, "test_accuracy": acc}
    emit(args, payload, lambda: f"saved {args.out}\n  model id {mid}\n  test accuracy {acc:.2%}")
    return EXIT_OK


def _require_classifier(loaded: LoadedModel, command: str) -> None:
    if loaded.task != "classification" or not loaded.num_classes:
        raise UsageError(f"{command} needs a classifier; {loaded.path} is a {loaded.task} model")


def cmd_inspect(args: argparse.Namespace) -> int:
    info = load_model_argument(args).describe()
    emit(args, info, lambda: _describe_text(info))
    return EXIT_OK


def _describe_text(info: dict[str, Any]) -> str:
    """``inspect`` for a person: what the model is, what it takes, where a watermark can go."""
    spec = info["input"]
    norm = spec["normalize"]
    lines = [
        f"{info['path']}: {info['source_title']}",
        f"  model id      {info['model_id']}",
        f"  task          {info['task']}" + (f", {info['num_classes']} classes" if info["num_classes"] else ""),
        f"  parameters    {info['parameters']:,}",
        f"  input         one row of shape {'x'.join(map(str, spec['shape']))}, values in "
        f"[{spec['range'][0]:g}, {spec['range'][1]:g}]",
        "  normalize     "
        + ("none" if norm is None else f"mean {_numbers(norm['mean'])} / std {_numbers(norm['std'])}"),
        f"  outputs       {spec['outputs']}",
    ]
    if "model_file" in info:
        lines.append(f"  model file    {info['model_file']} (class {info['model_class']})")
    layers = info["watermark_layers"]
    if not layers:
        lines.append("  watermark     no conv layer (4-D weight) to carry one")
        return "\n".join(lines)
    lines.append("  watermark layers (conv weights; * = default for --layer):")
    width = max(len(layer["name"]) for layer in layers)
    for layer in layers:
        mark = "*" if layer["name"] == info["default_watermark_layer"] else " "
        shape = "x".join(map(str, layer["shape"]))
        lines.append(f"    {mark} {layer['name']:<{width}}  {shape:<14} {layer['parameters']:,} parameters")
    lines.append(
        "  embedding     "
        + (
            "yes: 'watermark embed' fine-tunes it and saves it in the same format"
            if info["can_embed_watermark"]
            else "no: embed in the eager or TorchScript model and export after ('watermark verify' works here)"
        )
    )
    return "\n".join(lines)


def _numbers(values: list[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def cmd_fingerprint(args: argparse.Namespace) -> int:
    import numpy as np

    from activeguard.credentials.control import ControlConfig
    from activeguard.credentials.fingerprints import generate_fingerprints
    from activeguard.experiments.core_evaluation import seed_images

    loaded = load_model_argument(args)
    _require_classifier(loaded, "fingerprint")
    config = ControlConfig(
        num_classes=loaded.num_classes, confidences=parse_floats(args.confidences), epsilon=args.epsilon
    )
    users = parse_users(args.users, config.num_users)
    count = len(users) * args.per_user
    seeds = (
        None if args.data is None else seed_images(model_data(args.data, loaded, args.seed).x_test, count, args.seed)
    )
    fps = generate_fingerprints(
        loaded.model,
        config,
        users,
        seeds,
        per_user=args.per_user,
        input_shape=loaded.spec.shape,
        bounds=loaded.spec.bounds,
        encoding=args.encoding,
        seed=args.seed,
        progress=progress_enabled(args),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for row, user in enumerate(fps.users.tolist()):
        fo = config.fo_of_user(user)
        name = f"user-{user:03d}-{row % args.per_user:02d}.npy"
        if fps.success[row]:
            np.save(out / name, fps.inputs[row].numpy())
        entries.append(
            {
                "user": user,
                "class": fo.target,
                "confidence": fo.confidence,
                "runner_up": fo.runner_up,
                "runner_up_confidence": fo.runner_up_confidence,
                "ok": bool(fps.success[row]),
                "measured": float(fps.confidence[row]),
                "file": name if fps.success[row] else None,
            }
        )
    manifest = {
        "model_id": loaded.model_id,
        "source": loaded.record(),
        "input": loaded.spec.to_dict(),  # the .npy rows are client inputs in this range and encoding
        "encoding": args.encoding,
        "seeds": args.data or "noise",
        "num_classes": loaded.num_classes,
        "epsilon": args.epsilon,
        "confidences": list(config.confidences),
        "fingerprints": entries,
    }
    (out / "fingerprints.json").write_text(json.dumps(manifest, indent=2))
    failed = sum(not e["ok"] for e in entries)
    emit(
        args,
        manifest,
        lambda: (
            f"wrote {len(entries) - failed} fingerprints to {out}"
            + (f" ({failed} failed the re-check and were not written)" if failed else "")
        ),
    )
    return EXIT_NEGATIVE if failed else EXIT_OK


def cmd_watermark_embed(args: argparse.Namespace) -> int:
    from activeguard.models.architectures import accuracy
    from activeguard.models.sources import default_watermark_layer
    from activeguard.watermark import digits as wm

    loaded = load_model_argument(args)
    _require_classifier(loaded, "watermark embed")
    if not loaded.source.trainable:
        raise UsageError(
            f"{loaded.path} is an {loaded.source.title}, which cannot be fine-tuned or re-saved: embed the "
            "watermark in the eager or TorchScript model and export it after"
        )
    layer = args.layer or default_watermark_layer(loaded.network)
    # the key first: a layer or digits that do not fit fail before any data is read
    key = wm.generate_key(loaded.model, parse_digits(args.digits), layer=layer, experiment_seed=args.experiment_seed)
    split = model_data(args.data, loaded, args.seed)
    passphrase = read_passphrase(args, confirm=True)
    if args.experiment_seed is not None:
        print(
            "warning: --experiment-seed makes the watermark key guessable; use it only for experiments", file=sys.stderr
        )
    before = accuracy(loaded.model, split.x_test, split.y_test)
    wm.embed(
        loaded.model,
        key,
        split.x_train,
        split.y_train,
        epochs=args.epochs,
        lam=args.lam,
        seed=args.seed,
        progress=progress_enabled(args),
    )
    result = wm.verify(loaded.model, key)
    after = accuracy(loaded.model, split.x_test, split.y_test)
    mid = loaded.save(args.out, {"watermarked": True})
    wm.save_key(key, args.key_out, passphrase)
    payload = {
        "model": str(args.out),
        "model_id": mid,
        "source": {**loaded.record(), "path": str(args.out)},
        "layer": layer,
        "key": str(args.key_out),
        "verified": result.success,
        "digits_matched": result.matched,
        "digits": result.total,
        "accuracy_before": before,
        "accuracy_after": after,
        "key_source": "os-entropy" if args.experiment_seed is None else "experiment-seed",
    }
    model_file = (
        f"\n  load it with the same --model-file {loaded.model_file}"
        + (f" --model-class {loaded.model_class}" if loaded.model_class else "")
        if loaded.model_file is not None
        else ""
    )
    emit(
        args,
        payload,
        lambda: (
            f"embedded {result.total} digits in {layer}: extracted {result.matched}/{result.total}\n"
            f"  test accuracy {before:.2%} -> {after:.2%}\n"
            f"  model {args.out} (id {mid}), saved as {loaded.source.title}{model_file}\n"
            f"  encrypted key {args.key_out} (mode 0600)"
        ),
    )
    return EXIT_OK if result.success else EXIT_NEGATIVE


def owner_reference(args: argparse.Namespace):
    """(the owner's original model, noise probes over its input range) for ``--owner``, else (None, None)."""
    if getattr(args, "owner", None) is None:
        return None, None
    import torch

    from activeguard.cli.support import spec_overrides
    from activeguard.models import sources

    if hasattr(args, "model_file"):  # `watermark verify`: the suspect's model flags describe the owner too
        options = sources.SourceOptions(args.model_file, args.model_class, spec_overrides(args))
    else:  # `audit all`: the suspect's network code, if any
        options = sources.SourceOptions(args.suspect_model_file, args.suspect_model_class)
    owner = sources.load(args.owner, options)
    low, high = owner.spec.bounds
    noise = torch.rand(256, *owner.spec.shape, generator=torch.Generator().manual_seed(0))
    return owner.model, low + (high - low) * noise


def check_watermark(model: Any, args: argparse.Namespace):
    """``model`` against the key of ``--key`` (passphrase as the flags say), aligned to ``--owner`` if given."""
    from activeguard.watermark import digits as wm

    key = wm.load_key(args.key, read_passphrase(args))
    reference, probes = owner_reference(args)
    return wm.verify(model, key, reference=reference, probes=probes)


def add_owner_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--owner",
        type=Path,
        help="your original (watermarked) model: the suspect's filters and their input channels are "
        "matched to it first, so a suspect whose filters were permuted or positively rescaled keeps the mark",
    )


def cmd_watermark_verify(args: argparse.Namespace) -> int:

    loaded = load_model_argument(args)
    result = check_watermark(loaded.model, args)
    payload = {
        "model": str(args.model),
        "model_id": loaded.model_id,
        "source": loaded.record(),
        "verified": result.success,
        "digits_matched": result.matched,
        "digits": result.total,
        "chance_probability": result.chance_probability,
        "threshold": result.threshold,
        "aligned_to_owner": result.aligned,
        "alignment_similarity": result.alignment_similarity,
    }
    verdict = "OWNERSHIP VERIFIED" if result.success else "not verified"
    emit(
        args,
        payload,
        lambda: f"{verdict}: {result.explanation()}",
    )
    return EXIT_OK if result.success else EXIT_NEGATIVE


def _run_core(args: argparse.Namespace, title: str) -> int:
    from activeguard.experiments import core_pipeline as pipeline

    out = Path(args.out)
    log = (lambda _msg: None) if args.json else print
    if not args.json:
        print(f"{title} (report directory: {out})")
    report = pipeline.run(
        out,
        quick=args.quick,
        seed=args.seed,
        log=log,
        progress=progress_enabled(args),
        passphrase=os.environ.get(PASSPHRASE_ENV),
        workload=args.workload,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print((out / "report.md").read_text())
        print(f"report written to {out}/ (report.json, report.md, pruning.png)")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from activeguard.models import workloads

    workloads.get(args.workload).check_available()  # unknown or missing data: one line, exit 2, before any work
    if args.out is None:
        suffix = "" if args.workload == workloads.DEFAULT_WORKLOAD else f"-{args.workload}"
        args.out = f"reports/evaluate-{args.suite}{suffix}"
    return EVALUATION_SUITES[args.suite].run(args)


def _evaluate_control_layer(args: argparse.Namespace) -> int:
    from activeguard.experiments.control_layer import run_control_layer_evaluation

    loaded = load_model_argument(args) if args.model is not None else None
    data = model_data(args.data, loaded, args.seed) if loaded is not None and args.data else None
    result = run_control_layer_evaluation(args.out, args.quick, args.seed, loaded=loaded, data=data)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(Path(args.out, "control_layer.md").read_text())
    return EXIT_OK


def _evaluate_core(args: argparse.Namespace) -> int:
    return _run_core(args, "ActiveGuard core evaluation (Tables 1-4 and Figure 2 analogs)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="activeguard",
        description="Protect served PyTorch models: user fingerprints, a control layer and weight watermarks.",
        epilog="Exit codes: 0 ok, 1 negative verdict or failure, 2 usage error, 141 output pipe closed early.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("evaluate", help="paper-shaped evaluation tables")
    add_evaluation_suite("core", "ActiveGuard Tables 1-4 and Figure 2 analogs", _evaluate_core)
    add_evaluation_suite(
        "control-layer",
        "how well a classifier on what clients see tells licensed from unlicensed answers (two_sample_auc)",
        _evaluate_control_layer,
    )
    suite = p.add_argument("suite", choices=EVALUATION_SUITES)  # the dict: plugins registered below count too
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run for a first look or CI (core: 5 instead of 20 fingerprints per user; "
        "audit: smaller zoos, 50 points (TAFA 100), a WGAN of 200 iterations on 2,000 images; fashion-resnet: a subset of the data and fewer epochs)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="report directory (default reports/evaluate-SUITE, plus -WORKLOAD if not the default)",
    )
    p.add_argument(
        "--workload",
        default="mnist-lenet5",
        metavar="NAME",
        help="model and data to evaluate on: mnist-lenet5 (default: LeNet-5 on the 5,000 bundled MNIST digits) "
        "or fashion-resnet (a BatchNorm ResNet, 15 conv layers, on the full Fashion-MNIST 60,000/10,000 from "
        "Debian's dataset-fashion-mnist). The trained owner is cached under $ACTIVEGUARD_CACHE "
        "(default .activeguard-cache)/workloads in all four model sources",
    )
    g = p.add_argument_group("control-layer: the model to measure (default: the bundled MNIST LeNet-5)")
    g.add_argument("--model", type=Path, default=None, metavar="MODEL", help=MODEL_HELP)
    g.add_argument("--model-file", type=Path, metavar="FILE.py", help="network code, for a state dict")
    g.add_argument("--model-class", metavar="NAME", help="the network class in --model-file")
    add_spec_arguments(g)
    add_data_argument(g, note="control-layer: the inputs to send (default: the model's test rows, else noise)")
    p.add_argument(
        "--families",
        default=None,
        metavar="NAME,NAME",
        help="audit, families: the model families to run (fmnist-conv1d, fmnist-gru, digits-mlp, "
        "mnist-separable, mnist-tanh; 'none' for none; default: every one, two with --quick)",
    )
    add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train the reference LeNet-5 and save a weights-only checkpoint")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist", "digits8x8"])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--out", required=True, type=Path, help="checkpoint path to write (.pt)")
    add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("inspect", help="what a model file is: format, model id, input spec, classes, watermark layers")
    add_model_arguments(p, flag="model")
    add_common(p, seed=False)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "fingerprint", help="generate users' fingerprints (C&W examples with fixed class and confidence)"
    )
    add_model_arguments(p)
    p.add_argument("--users", default="all", help="'all', '7', '0-9' or '1,4,7-9' (user = class*T + j)")
    p.add_argument("--per-user", type=int, default=1, help="fingerprints per user (default 1)")
    p.add_argument("--confidences", default="0.2,0.3,0.4", help="the confidence set C_fp (default 0.2,0.3,0.4)")
    p.add_argument("--epsilon", type=float, default=0.01, help="tolerance of the control layer (default 0.01)")
    p.add_argument(
        "--encoding",
        default="float32",
        choices=["float32", "uint8"],
        help="the exact encoding clients will send; uint8 = 256 levels over the input range",
    )
    add_data_argument(
        p,
        note="optional, fingerprints need no data: without --data the search starts from uniform noise in the "
        "model's input range, with it from test rows of that data",
    )
    p.add_argument("--out", required=True, help="directory for .npy fingerprints and fingerprints.json")
    add_common(p)
    p.set_defaults(func=cmd_fingerprint)

    wm_parser = sub.add_parser("watermark", help="embed or verify a digit watermark in conv weights")
    wm_sub = wm_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = wm_sub.add_parser(
        "embed",
        help="fine-tune a model with the watermark regularizer (Eq. 4) and save it in its own format "
        "(checkpoint, TorchScript, or state dict + model file)",
    )
    add_model_arguments(p)
    p.add_argument("--digits", default="1234567890210", help="the watermark, digits 0-9 (default: the paper's wm1)")
    p.add_argument(
        "--layer",
        default=None,
        metavar="NAME",
        help="conv weight to carry the watermark, by the network's own parameter name, e.g. conv2.weight or "
        "layer1.0.conv1.weight (default: the conv weight with the most parameters; 'activeguard inspect' lists them)",
    )
    add_data_argument(p, default="mnist", note="the fine-tuning data, in the model's input range")
    p.add_argument(
        "--epochs",
        type=int,
        default=15,
        help="fine-tuning epochs (default 15: with lambda=0.01 fewer may leave a digit unextracted)",
    )
    p.add_argument("--lam", type=float, default=0.01, help="regularizer weight lambda (default 0.01, as the paper)")
    p.add_argument("--out", required=True, type=Path, help="watermarked model to write, in the same format as --model")
    p.add_argument("--key-out", required=True, type=Path, help="encrypted key file to write (mode 0600)")
    p.add_argument(
        "--experiment-seed",
        type=int,
        default=None,
        metavar="N",
        help="derive the key's secret filter and positions from N instead of OS entropy, for "
        "reproducible experiments only: it makes the key guessable, and anyone who guesses it "
        "can overwrite the watermark (default: a fresh secret key)",
    )
    add_passphrase(p)
    add_common(
        p,
        seed_help="random seed for the data split and the fine-tuning (default 0); "
        "it does not choose the key (see --experiment-seed)",
    )
    p.set_defaults(func=cmd_watermark_embed)
    p = wm_sub.add_parser(
        "verify",
        help="extract the watermark from a suspect model of any format, .pt2 included (exit 0 = verified)",
    )
    add_model_arguments(p)
    p.add_argument("--key", required=True, type=Path)
    add_owner_argument(p)
    add_passphrase(p)
    add_common(p, seed=False)
    p.set_defaults(func=cmd_watermark_verify)
    _register_plugins(sub)
    # plugins may have added suites: the help lists what this installation offers
    suite.help = "; ".join(f"{name}: {s.help}" for name, s in EVALUATION_SUITES.items())
    return parser


def _register_plugins(sub: argparse._SubParsersAction) -> None:
    """Server packages add their commands through the ``activeguard.commands`` entry point group,
    so the core never imports them (one direction of dependency)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="activeguard.commands"):
        try:
            ep.load()(sub)
        except ImportError as exc:
            hint = f"{ep.name} commands need extra packages ({exc.name}): run ./setup.sh or pip install activeguard[{ep.name}]"
            p = sub.add_parser(ep.name, help=f"(unavailable: {exc.name} is not installed)")
            p.set_defaults(func=lambda _args, hint=hint: (_ for _ in ()).throw(UsageError(hint)))


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell expects of a writer whose reader went away


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:
        # the reader left early (`activeguard … | head`): stop quietly, as Unix tools do, and point
        # stdout at /dev/null so that Python's flush at exit does not complain a second time
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _loaded_key_errors() -> tuple[type[Exception], ...]:
    """The watermark's key error, once a command has loaded the watermark module: before that nothing can
    raise it, and importing it only to catch it would load torch for every command."""
    digits = sys.modules.get("activeguard.watermark.digits")
    return (digits.WatermarkKeyError,) if digits is not None else ()


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, *_loaded_key_errors()) as exc:  # evaluated once raised
        print(f"activeguard {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:  # e.g. a server that could not start: say why, no traceback
        print(f"activeguard {args.command}: failed: {exc}", file=sys.stderr)
        return EXIT_NEGATIVE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
