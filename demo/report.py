"""The demo's report directory: report.json, report.md (the verdict table) and two PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from activeguard.audit import base as audit_base

METHODS = ("watermark", *(m.label for m in audit_base.methods().values()))  # the audit step's columns


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write whatever steps have run so far; the file names go into ``report["files"]``."""
    steps = report["steps"]
    files = ["report.json", "report.md"]
    if "clients" in steps:
        _plot_clients(steps["clients"], out / "clients.png")
        files.append("clients.png")
    if "audit" in steps:
        _plot_audit(steps["audit"], out / "audit.png")
        files.append("audit.png")
    report["files"] = files  # recorded before report.json is written, so the file matches what is printed
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_markdown(report))


def verdict_table(audit: dict[str, Any]) -> list[str]:
    lines = ["| suspect | derived from owner | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for name, row in audit["suspects"].items():
        cells = []
        for m in METHODS:
            r = row[m]
            cells.append(f"{'COPY' if r['flagged'] else r['verdict']} ({r['evidence']})")
        lines.append(f"| {name} | {'yes' if row['derived_from_owner'] else 'no'} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    s = report["steps"]
    lines = [
        "# ActiveGuard demo report",
        "",
        f"Data: {report['dataset']}. Size: {'quick' if report['quick'] else 'full'}. "
        f"Total time: {report.get('total_seconds', '…')} s.",
        "",
    ]
    if "watermark" in s:
        w = s["watermark"]
        lines += [
            f"Owner model: LeNet-5, test accuracy {s['train']['test_accuracy']:.2%}; with the {w['digits']}-digit "
            f"watermark {w['test_accuracy']:.2%} (extracted: {w['verified']}); model id {w['model_id'][:16]}….",
            "",
        ]
    if "clients" in s:
        c = s["clients"]
        lines += ["## Clients", "", "| client | path | outcome | accuracy |", "|---|---|---|---|"]
        for row in c["licensed"]:
            lines.append(
                f"| {row['user']} (licensed) | gateway | session as {row['authenticated_as']} | {row['accuracy']:.2%} |"
            )
        d = c["licensed_direct_carol"]
        lines.append(
            f"| carol (licensed) | TorchServe + license header | HTTP {d['status']}, fields {d['fields']} "
            f"| {d['accuracy']:.2%} |"
            if d["accuracy"] is not None
            else f"| carol (licensed) | TorchServe + license header | HTTP {d['status']} | – |"
        )
        lines.append(f"| no license | gateway | {c['gateway_without_token']} | – |")
        u = c["unlicensed_direct"]
        acc = f"{u['accuracy']:.2%} (chance 10%)" if u["accuracy"] is not None else "–"
        lines.append(
            f"| no license | TorchServe | HTTP {u['status']}, fields {u['fields']} (silent control layer) | {acc} |"
        )
        lines.append("")
    if "revocation" in s:
        r = s["revocation"]
        lines += [
            f"Revoking {r['user']}: the live session got {r['existing_session']} after {r['refused_after_s']} s, "
            f"a new Authenticate got {r['new_authenticate']}; other users still served: "
            f"{r['other_users_still_served']}.",
            "",
        ]
    if "extraction" in s:
        e = s["extraction"]
        named = ", ".join(e["named"]) or "nobody"
        lines += [
            f"Extraction: {e['extractor']}, licensed, sent {e['queries']} queries ({e['attack']}) and trained a surrogate "
            f"with {e['relative_accuracy']:.1%} of the owner's accuracy; the extraction audit named **{named}** "
            f"(chance bound {e['bound']:.1e}, {e['licenses_audited']} licenses audited, {e['records']} records); the "
            f"owner's own model was attributed to {', '.join(e['owner_model_named']) or 'nobody'}. "
            f"By hand: `{e['command']}`.",
            "",
        ]
    if "audit" in s:
        a = s["audit"]
        lines += [
            "## Ownership audit of suspects",
            "",
            *verdict_table(a),
            "",
            f"Fingerprints: {', '.join(f'{m} {n}' for m, n in a['points'].items())} points, each calibrated on {len(a['references'])} references "
            f"(LeNet-5s trained afresh on the owner's data, {a['reference_seconds']} s); all built in "
            f"{a['fingerprint_seconds']} s. A method accuses when the chance that an independent model scores as "
            f"high is at most {a['alpha_per_method']:.2g} (α 1e-3 over the methods). TAFA here is our "
            "reconstruction, not the published algorithm.",
            "",
        ]
    return "\n".join(lines)


def _plot_clients(clients: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['user']}\n(gateway)" for r in clients["licensed"]]
    values = [r["accuracy"] * 100 for r in clients["licensed"]]
    if clients["licensed_direct_carol"]["accuracy"] is not None:
        names.append("carol\n(direct, license)")
        values.append(clients["licensed_direct_carol"]["accuracy"] * 100)
    if clients["unlicensed_direct"]["accuracy"] is not None:
        names.append("no license\n(direct)")
        values.append(clients["unlicensed_direct"]["accuracy"] * 100)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, values, color=["tab:green"] * (len(values) - 1) + ["tab:red"])
    ax.axhline(10, color="grey", linestyle=":", label="chance")
    ax.set(ylabel="accuracy on MNIST test images (%)", ylim=(0, 100), title="What each client gets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_audit(audit: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    suspects = list(audit["suspects"])
    fig, ax = plt.subplots(figsize=(8.5, 3.2))
    width = 0.8 / len(METHODS)
    cap = 12.0
    for a, m in enumerate(METHODS):
        rows = [audit["suspects"][s][m] for s in suspects]
        xs = np.arange(len(suspects)) + a * width
        heights = [min(cap, -np.log10(max(r["chance_bound"], 10**-cap))) for r in rows]
        ax.bar(xs, heights, width=width, label=m)
    ax.axhline(-np.log10(audit["alpha_per_method"]), color="black", linewidth=1.5, label="accuses above (α per method)")
    ax.set_xticks(np.arange(len(suspects)) + 0.4 - width / 2, suspects)
    ax.set(
        ylabel="−log10 chance bound",
        ylim=(0, cap + 0.5),
        title="How unlikely an independent model scores as high (each method against its null)",
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
