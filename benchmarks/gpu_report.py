"""Merge the parts ``gpu_check.sh`` wrote into one ``results.md`` + ``results.json``.

    python benchmarks/gpu_report.py DIR [--dry-run]

``DIR/parts/`` holds ``phases.tsv`` (phase, exit status, seconds, cap), ``tests.xml`` (pytest's
JUnit report), ``kernels/results.json`` (``kernel_speed.py --results``) and ``step/results.json``
(``gpu_step.py --out``); any of them may be missing (a phase that failed or ran out of time, or a
dry run, which makes no figures), which the report says. ``results.json`` holds every part, so
``gpu_check.sh`` removes ``parts/`` afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from common import machine, machine_line, markdown, write_results

EXIT = {0: "ok", 124: "stopped at its time cap", 137: "killed at its time cap"}


def phases(path: Path) -> list[dict[str, Any]]:
    """``phases.tsv``: one row per phase."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, rc, seconds, cap = line.split("\t")
        rows.append({"phase": name, "rc": int(rc), "seconds": float(seconds), "cap_s": float(cap),
                     "status": EXIT.get(int(rc), f"failed (exit {rc})")})
    return rows


def tests(path: Path) -> dict[str, Any] | None:
    """Counts and failures from pytest's JUnit XML."""
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cases = []
    for case in suite.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = tag, (found.get("message") or "")[:200]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0)), "message": message})
    return {**counts, "cases": cases}


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def render(data: dict[str, Any], dry_run: bool) -> str:
    """The merged report as markdown (the parts' own tables, under a phase table)."""
    out = ["**GPU check** (`bash benchmarks/gpu_check.sh`)" + (" — dry run on the CPU, no figures" if dry_run else "")]
    out.append(markdown(["phase", "status", "seconds", "cap s"],
                        [[p["phase"], p["status"], f"{p['seconds']:.0f}", f"{p['cap_s']:.0f}"] for p in data["phases"]]))
    missing = "rehearsed (dry run): no figures." if dry_run else "no results (the phase did not finish)."
    t = data["tests"]
    if t is None:
        out.append(f"Kernel tests: {missing}")
    else:
        out.append(f"Kernel tests (native, no interpreter): {t['tests']} run, {t['failures']} failed, {t['errors']} "
                   f"errors, {t['skipped']} skipped.")
        bad = [[c["test"], c["outcome"], c["message"]] for c in t["cases"] if c["outcome"] != "passed"]
        if bad:
            out.append(markdown(["test", "outcome", "message"], bad))
    for key, title in (("kernels", "Kernels"), ("step", "Denoiser step")):
        part = data[key]
        out.append(part["text"].split("\nMachine:")[0].strip() if part else f"{title}: {missing}")
    return "\n\n".join(out)


def merge(out_dir: Path, dry_run: bool = False) -> list[Path]:
    """Read the parts and write the report; returns the files written."""
    parts = out_dir / "parts"
    data: dict[str, Any] = {"machine": machine(), "dry_run": dry_run, "phases": phases(parts / "phases.tsv"),
                            "tests": tests(parts / "tests.xml")}
    for key in ("kernels", "step"):
        part = load(parts / key / "results.json")
        md = parts / key / "results.md"
        data[key] = None if part is None else {**part, "text": md.read_text() if md.exists() else ""}
    text = f"{render(data, dry_run)}\n\n{machine_line(data['machine'])}"
    paths = write_results(out_dir, text, data)
    print(text)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder gpu_check.sh wrote (its parts/ is read)")
    parser.add_argument("--dry-run", action="store_true", help="label the report a dry run")
    args = parser.parse_args(argv)
    paths = merge(args.out, args.dry_run)
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
