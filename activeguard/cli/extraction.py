"""``activeguard audit extraction``: which licensed user's answers a suspect model learnt from."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from activeguard.cli.support import EXIT_NEGATIVE, EXIT_OK, EXTRACTION_ALPHA, UsageError, emit, progress_enabled


def open_records(source: str, model_id: str | None) -> Iterator[Any]:
    """The answer records of a journal directory, or of a database the license server ingested them into."""
    if "://" in source:
        try:
            from activeguard.watermark.record_store import open_records as from_database
        except ImportError as exc:  # the record store needs SQLAlchemy (the license-server extra)
            raise UsageError(f"--records {source}: reading a database needs SQLAlchemy ({exc})") from None
        return from_database(source, model_id=model_id)
    from activeguard.watermark.journal import answer_records

    if not Path(source).is_dir():
        raise UsageError(f"--records {source}: no such journal directory (or give a database URL)")
    return answer_records(source, model_id)


def cmd_extraction(args: argparse.Namespace, suspect_options: Any) -> int:
    """Replay every license's records to the suspect; exit 0 when a license is named, 1 when none is."""
    from activeguard.audit.extraction import audit_extraction
    from activeguard.audit.remote import open_suspect
    from activeguard.models.inputs import InputSpec
    from activeguard.watermark.answers import AnswerWatermark, load_secret_file

    if not 0.0 < args.alpha < 1.0:
        raise UsageError(f"--alpha must be in (0, 1), got {args.alpha}")
    records = list(open_records(args.records, args.model_id))
    if not records:
        raise UsageError(f"--records {args.records}: no answer records{' for that model' if args.model_id else ''}")
    models = {r.model_id for r in records}
    if len(models) > 1:
        raise UsageError(f"--records holds {len(models)} models' records: choose one with --model-id")
    num_classes = args.num_classes or 1 + max(max(r.owner_label, r.runner_up, r.third, r.label) for r in records)
    watermark = None
    if args.key is not None:
        watermark = AnswerWatermark(load_secret_file(args.key), num_classes=num_classes)
    bar = _progress(args, len(records))
    with open_suspect(args.suspect, owner_spec=InputSpec(records[0].shape), **suspect_options) as suspect:
        audit = audit_extraction(
            records, suspect, num_classes, alpha=args.alpha, watermark=watermark, progress=bar.update if bar else None
        )
    if bar is not None:
        bar.close()
    payload = {"suspect": str(args.suspect), "model_id": models.pop(), "records": len(records), **audit.to_dict()}
    emit(args, payload, lambda: _human(payload))
    return EXIT_OK if audit.named else EXIT_NEGATIVE


def _progress(args: argparse.Namespace, total: int) -> Any:
    if not progress_enabled(args):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="replaying records", unit="row")


def _human(payload: dict[str, Any]) -> str:
    lines = [
        f"{payload['verdict'].upper() if payload['named'] else payload['verdict']} "
        f"(suspect {payload['suspect']}, {payload['records']} records, alpha {payload['alpha']:g})"
    ]
    if payload["rejected_records"]:
        lines.append(f"  {payload['rejected_records']} records dropped: the key does not give their labels")
    lines.append(f"  {'license':<24} {'user':<16} {'records':>7} {'groups':>6} {'leaning':>7}  bound")
    for e in sorted(payload["licenses"], key=lambda e: e["bound"])[:20]:
        mark = "  <- named" if e["named"] else ""
        lines.append(
            f"  {e['license_id'][:24]:<24} {e['user'][:16]:<16} {e['records']:>7} {e['groups']:>6} "
            f"{e['agreeing']:>7}  {e['bound']:.2g}{mark}"
        )
    return "\n".join(lines)


def add_extraction_parser(
    audit_sub: argparse._SubParsersAction, add_suspect: Any, add_transport: Any, add_common: Any
) -> argparse.ArgumentParser:
    """The ``audit extraction`` parser, with the audit's own suspect and endpoint flags (its caller sets ``func``)."""
    p = audit_sub.add_parser(
        "extraction",
        help="name the licensed user whose answers a suspect model was trained on (the answer watermark)",
        description="Replay each license's recorded answers in the watermark's band to the suspect and measure, "
        "pair of classes by pair, whether it leans the way that license's key tilted the answers. The chance "
        "bound is exact (each tilt is a keyed coin a model that never saw the license's answers cannot know), "
        "needs no reference models, and is multiplied by the number of licenses that could be named; a "
        "license is named at a bound <= --alpha.",
        epilog="Exit codes: 0 a license named, 1 none named, 2 usage or input error.",
    )
    add_suspect(p)
    p.add_argument(
        "--records",
        required=True,
        metavar="DIR_OR_URL",
        help="the handler's answer journal directory (--answer-journal of package/protect), or the license "
        "server's database (sqlite:///licenses.db, postgresql://...) after it ingested the journals",
    )
    p.add_argument("--key", type=Path, metavar="FILE", help="the answer watermark key: check every record first")
    p.add_argument("--model-id", help="the model whose records to use (needed when the records hold several)")
    p.add_argument("--num-classes", type=int, default=None, help="the model's classes (default: from the records)")
    p.add_argument(
        "--alpha",
        type=float,
        default=EXTRACTION_ALPHA,
        help=f"the largest chance bound that names a license (default {EXTRACTION_ALPHA:g})",
    )
    add_transport(p)
    add_common(p, seed=False)
    return p
