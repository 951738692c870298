"""``activeguard evaluate extraction``: licensed users extract the model; does the audit name them?

The bundled MNIST LeNet-5 is served behind the guard in this process (:mod:`activeguard.experiments.served`)
with the answer watermark on. Licensed users query it:

* ``alice`` runs a Knockoff-style attack: natural digits of another dataset (scikit-learn's, upscaled and
  augmented) plus 500 MNIST test digits;
* ``bob`` runs a JBDA-style attack: 300 seeds (half MNIST test digits) grown by Jacobian augmentation;
* ``carol`` sends the other MNIST test digits, as a benign client would;

and each attacker trains a surrogate of their own architecture on the labels they got. Every
surrogate, and independent models trained on the true labels without the API, is audited against
every license's journal (:mod:`activeguard.audit.extraction`): a surrogate must be attributed to its
user and no one else; an independent model to no one. Also measured: the licensed users' accuracy
loss (the owner's test digits through the API against the model's own answers) and how often the
watermark changes a natural answer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from activeguard.audit.extraction import audit_extraction
from activeguard.experiments import extraction_attacks as attacks
from activeguard.experiments.served import ROWS_PER_REQUEST, ServedModel, default_owner
from activeguard.guard.monitor import ALERT, ExtractionMonitor, MonitorSettings
from activeguard.models.architectures import LeNet5, train
from activeguard.models.data import Split
from activeguard.models.sources import LoadedModel
from activeguard.watermark.answers import DEFAULT_MARGIN, AnswerWatermark, create_secret_file, load_secret_file
from activeguard.watermark.journal import answer_records


def _accuracy(model: nn.Module, split: Split) -> float:
    with torch.no_grad():
        return float((model(split.x_test).argmax(1) == split.y_test).float().mean())


def _attacker_rows(split: Split) -> tuple[torch.Tensor, Split]:
    """(test digits the attackers hold, the split whose test rows measure accuracy): half of the test rows each."""
    half = len(split.x_test) // 2
    held_out = Split(split.name, split.task, split.x_train, split.y_train, split.x_test[half:], split.y_test[half:])
    return split.x_test[:half][:500], held_out


def _independents(split: Split, seed: int, epochs: int) -> dict[str, nn.Module]:
    """Models trained on the true labels, never on the API's answers."""
    torch.manual_seed(seed + 100)
    lenet = LeNet5(num_classes=split.num_classes, in_channels=split.input_shape[0], image_size=split.input_shape[-1])
    own = attacks.AttackerCnn(split.input_shape[0], split.input_shape[-1], split.num_classes)
    return {
        "independent LeNet-5": train(lenet, split.x_train, split.y_train, epochs=epochs, seed=seed + 100).eval(),
        "independent attacker CNN": train(own, split.x_train, split.y_train, epochs=epochs, seed=seed + 101).eval(),
    }


def measure(
    loaded: LoadedModel,
    split: Split,
    work_dir: Path,
    *,
    quick: bool,
    seed: int = 0,
    margin: float = DEFAULT_MARGIN,
    progress: bool = False,
) -> dict[str, Any]:
    """The scenario on ``loaded`` (an MNIST-shaped classifier) with its ``split``; journal and key under ``work_dir``."""
    key_file, journal = work_dir / "answer-watermark.agkey", work_dir / "journal"
    if not key_file.exists():
        create_secret_file(key_file)
    served = ServedModel(
        loaded,
        answer_watermark_margin=margin,
        answer_key_file=str(key_file),
        answer_journal_dir=str(journal),
    )
    known, held_out = _attacker_rows(split)
    owner_accuracy = _accuracy(loaded.model, held_out)
    sizes = {"related": 2500 if quick else 4000, "seeds": 150, "rounds": 3 if quick else 4}
    epochs = 8 if quick else 10

    streams: dict[str, list[torch.Tensor]] = {"knockoff": [], "jbda": []}  # each attacker's queries, in order

    def api(session: str, stream: list[torch.Tensor]):
        return attacks.recording(lambda x: served.answer(x, session).argmax(1), stream)

    started = time.perf_counter()
    models: dict[str, tuple[str | None, nn.Module, str, int]] = {}  # name -> (user, model, attack, queries)
    side = split.input_shape[-1]
    queries = torch.cat([attacks.related_digits(sizes["related"], side, seed), known])
    alice = api(served.session("alice"), streams["knockoff"])
    model, spent = attacks.knockoff(alice, queries, epochs=epochs, seed=seed)
    models["alice's Knockoff surrogate"] = ("alice", model, "knockoff", spent)
    seeds = torch.cat([attacks.related_digits(sizes["seeds"], side, seed + 1), known[: sizes["seeds"]]])
    bob = api(served.session("bob"), streams["jbda"])
    model, spent = attacks.jbda(bob, seeds, rounds=sizes["rounds"], epochs=epochs, seed=seed)
    models["bob's JBDA surrogate"] = ("bob", model, "jbda", spent)
    carol = served.session("carol")
    licensed = served.answer(held_out.x_test, carol).argmax(1)
    for name, independent in _independents(split, seed, epochs).items():
        models[name] = (None, independent, "none (true labels)", 0)
    attack_seconds = time.perf_counter() - started

    records = list(answer_records(journal, loaded.model_id))
    watermark = AnswerWatermark(load_secret_file(key_file), margin, served.profile.num_classes)
    surrogates, others = [], []
    false_attributions = 0
    saved = work_dir / "models"
    saved.mkdir(exist_ok=True)
    for name, (user, model, attack, spent) in models.items():
        torch.save(model, saved / f"{name.replace(' ', '-').replace(chr(39), '')}.pt")  # for audit extraction by hand
        audit = audit_extraction(records, model, served.profile.num_classes, watermark=watermark)
        labels_only = audit_extraction(records, _LabelsOnly(model), served.profile.num_classes, watermark=watermark)
        own_labels_only = next((e for e in labels_only.licenses if e.user == user), None)
        named = [e.user for e in audit.named]
        own = next((e for e in audit.licenses if e.user == user), None)
        wrong = [u for u in named if u != user]
        false_attributions += len(wrong)
        entry = {
            "name": name,
            "user": user,
            "attack": attack,
            "queries": spent,
            "relative_accuracy": round(_accuracy(model, held_out) / owner_accuracy, 4),
            "attributed_to": named,
            "bound": own.bound if own is not None else min((e.bound for e in audit.licenses), default=1.0),
            "bound_labels_only": own_labels_only.bound if own_labels_only is not None else None,
            "groups": own.groups if own is not None else None,
            "agreeing_groups": own.agreeing if own is not None else None,
        }
        (surrogates if user is not None else others).append(entry)
    with torch.no_grad():
        own_labels = loaded.model(held_out.x_test).argmax(1)
    return {
        "owner_accuracy": round(owner_accuracy, 4),
        "margin": margin,
        "surrogates": surrogates,
        "independents": others,
        "false_attributions": false_attributions,
        "licensed_accuracy_loss": round(owner_accuracy - float((licensed == held_out.y_test).float().mean()), 4),
        "changed_answers": round(float((licensed != own_labels).float().mean()), 4),
        "records": len(records),
        "record_bytes_per_1000_queries": _journal_bytes(journal) * 1000 // max(1, _queries(models, split)),
        "attack_seconds": round(attack_seconds, 1),
        "monitor": monitor_measurement(
            loaded.model, {k: torch.cat(v) for k, v in streams.items()}, split, held_out.x_test
        ),
    }


BENIGN_STREAMS = 20
BENIGN_STREAM_ROWS = 250
BENIGN_ROWS_PER_REQUEST = 8


def monitor_measurement(
    model: nn.Module,
    attacks_seen: dict[str, torch.Tensor],
    split: Split,
    carol: torch.Tensor,
    settings: MonitorSettings | None = None,
) -> dict[str, Any]:
    """The extraction monitor (PRADA per license, :mod:`activeguard.guard.monitor`) on each attacker's
    stream as sent (requests of :data:`ROWS_PER_REQUEST` rows), and on benign streams: at least
    :data:`BENIGN_STREAMS` disjoint streams of the owner's natural digits (train and test, shuffled; up
    to :data:`BENIGN_STREAM_ROWS` each, in requests of :data:`BENIGN_ROWS_PER_REQUEST`) and carol's."""
    settings = settings or MonitorSettings(policy=ALERT)
    digits = torch.cat([split.x_train, split.x_test])
    digits = digits[torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))]
    length = min(BENIGN_STREAM_ROWS, len(digits) // BENIGN_STREAMS)
    benign = [digits[i * length : (i + 1) * length] for i in range(len(digits) // length)]

    def flagged(x: torch.Tensor, rows: int) -> int | None:
        watch = ExtractionMonitor(settings, x[0].numel())
        with torch.no_grad():
            labels = model(x).argmax(1)
        for start in range(0, len(x), rows):
            flag = watch.observe("license", x[start : start + rows], labels[start : start + rows])
            if flag is not None:
                return flag.queries
        return None

    alarms = sum(flagged(x, BENIGN_ROWS_PER_REQUEST) is not None for x in benign)
    return {
        "flagged_within_queries": {name: flagged(x, ROWS_PER_REQUEST) for name, x in attacks_seen.items()},
        "stream_queries": {name: len(x) for name, x in attacks_seen.items()},
        "false_alarm_rate": round(alarms / len(benign), 4),
        "benign_streams": len(benign),
        "benign_stream_queries": length,
        "carol_flagged_within_queries": flagged(carol, ROWS_PER_REQUEST),
        "thresholds": {
            "delta": settings.delta,
            "min_queries": settings.min_queries,
            "window": settings.window,
            "max_per_class": settings.max_per_class,
            "sketch_dim": settings.sketch_dim,
        },
    }


class _LabelsOnly(nn.Module):
    """A suspect that shows only its top class (an API that returns labels)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(1)


def _queries(models: dict, split: Split) -> int:
    return sum(m[3] for m in models.values()) + len(split.x_test) // 2


def _journal_bytes(journal: Path) -> int:
    return sum(p.stat().st_size for p in journal.glob("*")) if journal.is_dir() else 0


def run_extraction_evaluation(
    out_dir: str | Path, quick: bool = False, seed: int = 0, *, progress: bool = False, **_: Any
) -> dict[str, Any]:
    """On the bundled MNIST LeNet-5 workload's owner; ``extraction.json`` and ``extraction.md`` in ``out_dir``."""
    split, loaded = default_owner(quick, seed, progress)
    out = Path(out_dir)
    work_dir = out / "extraction-run"
    work_dir.mkdir(parents=True, exist_ok=True)
    result = measure(loaded, split, work_dir, quick=quick, seed=seed, progress=progress)
    (out / "extraction.json").write_text(json.dumps(result, indent=2))
    (out / "extraction.md").write_text(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Who extracted the model?",
        "",
        f"Owner accuracy {r['owner_accuracy']:.3f}; answer watermark band margin {r['margin']:.3f} nats.",
        "",
        "| model | user | queries | accuracy vs owner | attributed to | bound |",
        "|---|---|---|---|---|---|",
    ]
    for e in [*r["surrogates"], *r["independents"]]:
        named = ", ".join(e["attributed_to"]) or "nobody"
        lines.append(
            f"| {e['name']} | {e['user'] or '—'} | {e['queries']} | {e['relative_accuracy']:.3f} | {named} | {e['bound']:.2g} |"
        )
    lines += [
        "",
        f"False attributions: **{r['false_attributions']}**. Licensed accuracy loss: {r['licensed_accuracy_loss']:.4f} "
        f"({r['changed_answers']:.2%} of natural answers changed). Journal: {r['record_bytes_per_1000_queries']} bytes "
        "per 1,000 queries.",
        "",
        _monitor_line(r["monitor"]),
        "",
    ]
    return "\n".join(lines)


def _monitor_line(m: dict[str, Any]) -> str:
    within = ", ".join(
        f"{name} {'within ' + str(q) if q is not None else 'not flagged in'} of {m['stream_queries'][name]} queries"
        for name, q in m["flagged_within_queries"].items()
    )
    return (
        f"Extraction monitor (PRADA, W < {m['thresholds']['delta']} after {m['thresholds']['min_queries']} queries): "
        f"{within}; false alarms {m['false_alarm_rate']:.0%} of {m['benign_streams']} benign streams of "
        f"{m['benign_stream_queries']} natural digits."
    )
