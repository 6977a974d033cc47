"""The fault table: run the fault suites (tests/test_faults.py, tests/test_trust.py) and count
how each fault and bad input ended.

    python bench/faults.py [--repeat N] [--out faults.json]

Every test injects one fault for real (a write limit or a full tmpfs, a second process, a
flipped bit, kill -9, a planted pickle or model directory, a symlink out of the data, HDF5
external storage, NaN weights, a bad option value, ...) and records how it ended: identical
to an undisturbed run, or a clean error (one line, nothing wrong published or overwritten),
and what it would have done unmended (its risk: data loss, code ran, read outside, wrong
result, or a poor end: a traceback, an unbounded allocation). A test that fails counts
against its risk: a failed "code ran" test is code that ran.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("tests/test_faults.py", "tests/test_trust.py")
RISKS = ("data loss", "code ran", "read outside", "wrong result", "poor")


def run_suite() -> list[dict]:
    """One pass of the suite: per test, its fault, how it ended, and whether it passed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *(str(ROOT / suite) for suite in SUITES), f"--junitxml={report}", "-o", "junit_family=xunit1"],
                       cwd=ROOT, check=False)
        cases = ElementTree.parse(report).getroot().iter("testcase")
        rows = []
        for case in cases:
            properties = {p.get("name"): p.get("value") for p in case.iter("property")}
            failed = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped") is not None
            if "fault" not in properties and not failed:
                continue  # a test of the suite that injects no fault (e.g. the CPU class check)
            rows.append({"test": case.get("name"), "fault": properties.get("fault", case.get("name")),
                         "risk": properties.get("risk", "data loss"),
                         "outcome": "skipped" if skipped else ("lost" if failed else properties["outcome"])})
        return rows


def table(rows: list[dict]) -> list[dict]:
    by_fault: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        by_fault[row["fault"], row["risk"]][row["outcome"]] += 1
    return [{"fault": fault, "risk": risk, "runs": sum(c.values()) - c["skipped"], "identical": c["identical"],
             "clean error": c["clean error"], "lost": c["lost"], "skipped": c["skipped"]}
            for (fault, risk), c in by_fault.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="Passes of the suites (the races vary between passes).")
    parser.add_argument("--out", type=Path, help="Also write the table as JSON here.")
    args = parser.parse_args()
    rows = [row for _ in range(args.repeat) for row in run_suite()]
    summary = table(rows)
    totals = {k: sum(r[k] for r in summary) for k in ("runs", "identical", "clean error", "lost")}
    failed_by_risk = {risk: sum(r["lost"] for r in summary if r["risk"] == risk) for risk in RISKS}
    width = max(len(r["fault"]) for r in summary)

    def line(name: str, risk: str, r: dict, note: str = "") -> str:
        return (f"{name:<{width}}  {risk:<12}  {r['runs']:>4}  {r['identical']:>9}  {r['clean error']:>11}  "
                f"{r['lost']:>6}{note}")

    print(f"\n{'fault':<{width}}  {'risk':<12}  runs  identical  clean error  failed")
    for r in summary:
        print(line(r["fault"], r["risk"], r, f"  ({r['skipped']} skipped)" if r["skipped"] else ""))
    print(line(f"total ({len(summary)} kinds of fault)", "", totals))
    print("failed by risk: " + ", ".join(f"{n} {risk}" for risk, n in failed_by_risk.items()))
    if args.out:
        args.out.write_text(json.dumps({"faults": summary, "totals": totals, "failed_by_risk": failed_by_risk},
                                       indent=2) + "\n")
    sys.exit(1 if totals["lost"] else 0)


if __name__ == "__main__":
    main()
