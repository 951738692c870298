"""`activeguard demo --quick` end to end: real license server, TorchServe and gateway processes.

Asserts on the JSON report what a newcomer is promised, and that nothing it started is left
running, after a normal run and after Ctrl-C in the middle of the served part.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ACTIVEGUARD = str(Path(sys.executable).with_name("activeguard"))


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (every server the demo starts names its report folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def gone(pid: int, group: bool = False) -> bool:
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    env = {**os.environ, "ACTIVEGUARD_WM_PASSPHRASE": "correct horse battery staple"}
    proc = subprocess.run(
        [ACTIVEGUARD, "demo", "--quick", "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=1500,  # a guard against a hang, not a speed check: the quick demo takes ~4-6 min alone on 2 cores
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout), proc


def test_report_files_and_stdout_match(demo_run):
    out, report, proc = demo_run
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "report.md").read_text().startswith("# ActiveGuard demo report")
    for png in ("clients.png", "audit.png"):
        assert (out / png).stat().st_size > 5000
    assert "correct horse" not in proc.stdout + proc.stderr  # the watermark passphrase is never printed
    assert (out / "watermark.agkey").stat().st_mode & 0o077 == 0


def test_licensed_users_are_served_and_unlicensed_are_refused(demo_run):
    _, report, _ = demo_run
    steps = report["steps"]
    assert steps["watermark"]["verified"] and steps["train"]["test_accuracy"] >= 0.95
    clients = steps["clients"]
    for row in clients["licensed"]:
        assert row["authenticated_as"] == row["user"]
        assert row["accuracy"] >= 0.93
        # the real model's outputs, not the control layer's: identical, except where the answer watermark
        # swapped the model's two top classes (where it is unsure)
        assert row["other_differences"] == 0 and row["identical_to_local_model"] >= 0.95, row
    assert clients["licensed_direct_carol"]["accuracy"] >= 0.9
    assert clients["gateway_without_token"] == "UNAUTHENTICATED"
    unlicensed = clients["unlicensed_direct"]
    # silent control layer: a refused answer has exactly the fields of carol's admitted one
    assert unlicensed["status"] == 200 and unlicensed["fields"] == clients["licensed_direct_carol"]["fields"]
    assert abs(unlicensed["accuracy"] - 0.1) <= 0.07  # the random policy: chance level


def test_revoked_user_is_refused(demo_run):
    _, report, _ = demo_run
    r = report["steps"]["revocation"]
    assert r["existing_session"] == "PERMISSION_DENIED" and r["new_authenticate"] == "PERMISSION_DENIED"
    assert r["refused_after_s"] < 10 and r["other_users_still_served"]


def test_the_licensed_extractor_is_named(demo_run):
    out, report, _ = demo_run
    e = report["steps"]["extraction"]
    assert e["named"] == [e["extractor"]] and e["bound"] <= 1e-6 and e["licenses_audited"] >= 2, e
    assert e["relative_accuracy"] >= 0.85 and e["owner_model_named"] == []  # a real surrogate; the owner is no thief
    assert (out / "answer-watermark.agkey").stat().st_mode & 0o077 == 0
    assert "Extraction:" in (out / "report.md").read_text()


def test_pirated_copies_flagged_and_independent_model_cleared(demo_run):
    _, report, _ = demo_run
    suspects = report["steps"]["audit"]["suspects"]
    methods = ("IPGuard", "CEM", "TAFA")
    for name, row in suspects.items():
        if row["derived_from_owner"]:
            assert row["watermark"]["flagged"], name
            assert any(row[m]["flagged"] for m in methods), name
        else:
            assert not row["watermark"]["flagged"] and not any(row[m]["flagged"] for m in methods), name
    assert sum(row["derived_from_owner"] for row in suspects.values()) == 2
    audit = report["steps"]["audit"]
    assert set(audit["calibration"]) == {"ipguard", "cem", "tafa"} and len(audit["references"]) == 6  # calibrated
    assert audit["alpha_per_method"] == pytest.approx(1e-3 / 4)
    for row in suspects.values():  # a copy only at a chance bound at most alpha per method
        for m in methods:
            assert row[m]["flagged"] == (row[m]["verdict"] == "copy")
            assert not row[m]["flagged"] or row[m]["chance_bound"] <= audit["alpha_per_method"]


def test_no_process_left_running(demo_run):
    out, report, _ = demo_run
    procs = report["processes"]
    assert procs["all_stopped"]
    assert gone(procs["license_server"]) and gone(procs["gateway"]) and gone(procs["torchserve_group"], group=True)
    assert processes_mentioning(str(out)) == []


def test_ctrl_c_during_the_served_part_stops_every_server(tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [ACTIVEGUARD, "demo", "--quick", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a suite started in the background of a non-interactive shell ignores SIGINT, and a child would
        # inherit that: give the demo the default disposition a terminal's Ctrl-C meets
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 600
        while not (out / "gateway" / "gateway.json").exists():  # written once TorchServe is up
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the demo never reached the gateway"
            time.sleep(0.2)
        time.sleep(1.0)
        assert processes_mentioning(str(out)), "servers should be running now"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output[-3000:]
    time.sleep(0.5)
    assert processes_mentioning(str(out)) == []
    assert json.loads((out / "report.json").read_text())["steps"]["licenses"]  # what ran is still reported


def test_a_second_run_replaces_the_first_runs_outputs_only(tmp_path):
    """Running the demo again into its directory used to stop at the gateway's existing key; a new run
    now removes what the last one wrote (keys, licenses, archives) and nothing else."""
    from demo.run import Demo

    demo = Demo(tmp_path, quick=True)
    for name in Demo.RUN_OUTPUTS:
        path = tmp_path / name
        if "." in name:
            path.write_text("old")
        else:
            (path / "inner").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("the user's own file")
    demo._clear_previous_run()
    assert not any((tmp_path / name).exists() for name in Demo.RUN_OUTPUTS)
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"
