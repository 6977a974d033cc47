"""The fault table: run the fault suite (tests/test_faults.py) and count how each fault ended.

    python bench/faults.py [--repeat N] [--out faults.json]

Every test of the suite injects one fault for real (a write limit or a full tmpfs, a second
process, a flipped bit, a truncated file, a planted pickle, kill -9, ...) and records how it
ended: identical to an undisturbed run, or a clean error (one line, nothing wrong published
or overwritten). A test that fails is counted as lost. Planted code that ran would fail its
test, so it counts as lost too.
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


def run_suite() -> list[dict]:
    """One pass of the suite: per test, its fault, how it ended, and whether it passed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "tests/test_faults.py"), f"--junitxml={report}", "-o", "junit_family=xunit1"],
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
                         "outcome": "skipped" if skipped else ("lost" if failed else properties["outcome"])})
        return rows


def table(rows: list[dict]) -> list[dict]:
    by_fault: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        by_fault[row["fault"]][row["outcome"]] += 1
    return [{"fault": fault, "runs": sum(c.values()) - c["skipped"], "identical": c["identical"],
             "clean error": c["clean error"], "lost": c["lost"], "skipped": c["skipped"]}
            for fault, c in by_fault.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="Passes of the suite (the races vary between passes).")
    parser.add_argument("--out", type=Path, help="Also write the table as JSON here.")
    args = parser.parse_args()
    rows = [row for _ in range(args.repeat) for row in run_suite()]
    summary = table(rows)
    totals = {k: sum(r[k] for r in summary) for k in ("runs", "identical", "clean error", "lost")}
    width = max(len(r["fault"]) for r in summary)

    def line(name: str, r: dict, note: str = "") -> str:
        return f"{name:<{width}}  {r['runs']:>4}  {r['identical']:>9}  {r['clean error']:>11}  {r['lost']:>4}{note}"

    print(f"\n{'fault':<{width}}  runs  identical  clean error  lost")
    for r in summary:
        print(line(r["fault"], r, f"  ({r['skipped']} skipped)" if r["skipped"] else ""))
    print(line(f"total ({len(summary)} kinds of fault)", totals))
    if args.out:
        args.out.write_text(json.dumps({"faults": summary, "totals": totals}, indent=2) + "\n")
    sys.exit(1 if totals["lost"] else 0)


if __name__ == "__main__":
    main()
