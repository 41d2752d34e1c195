"""The two Python halves of scripts/gpu_check.sh.

As a pytest plugin (`pytest -p gpu_check`, with scripts/ on PYTHONPATH) it keeps only the GPU
tests of the suite: every test gated by a skipif mark whose reason says it needs CUDA or a GPU
("needs a CUDA GPU", "needs at least 2 CUDA GPUs ..."), and every variant parametrized on the
"cuda" device. New GPU tests join by being written that
way, which is how the CPU suite already skips them with a reason.

As a script it writes the report of a run from what the shell left in REPORT_DIR: the tests'
JUnit XML (tests.xml) and one line per benchmark (benches.tsv: name, exit status, seconds,
log file). It prints the report, writes it to REPORT_DIR/report.md, and exits 0 when every
test passed and every benchmark ran, else 1.

    python scripts/gpu_check.py report REPORT_DIR
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

GPU_REASON = re.compile(r"\bneeds\b.*\b(CUDA|GPUs?)\b", re.IGNORECASE)  # "needs a CUDA GPU", ...
BENCH_LINES = 40  # the last lines of each benchmark's output that the report keeps
TIMED_OUT = 124  # timeout(1)'s exit status


# --- the pytest plugin ---------------------------------------------------------------------------

def is_gpu_test(item) -> bool:
    marks = [m for m in item.iter_markers("skipif") if GPU_REASON.search(str(m.kwargs.get("reason", "")))]
    params = getattr(getattr(item, "callspec", None), "params", {})
    return bool(marks) or any(str(v) == "cuda" for v in params.values())


def pytest_collection_modifyitems(config, items) -> None:
    keep = [item for item in items if is_gpu_test(item)]
    config.hook.pytest_deselected(items=[item for item in items if not is_gpu_test(item)])
    items[:] = keep


# --- the report ----------------------------------------------------------------------------------

def tests_summary(xml: Path) -> tuple[list[str], bool]:
    if not xml.is_file():
        return ["no results: the test run did not finish (see tests.log)"], False
    cases = ET.parse(xml).getroot().iter("testcase")
    outcome, failed, skipped = Counter(), [], Counter()
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        kind = kinds[0] if kinds else "passed"
        outcome[kind] += 1
        if kind in ("failure", "error"):
            failed.append(f"  {kind}: {name}")
        if kind == "skipped":
            skipped[case.find("skipped").get("message", "")] += 1
    lines = [f"passed {outcome['passed']}, failed {outcome['failure']}, errors {outcome['error']}, "
             f"skipped {outcome['skipped']}"]
    lines += failed
    lines += [f"  skipped x{n}: {reason}" for reason, n in skipped.most_common()]
    ok = outcome["passed"] > 0 and not outcome["failure"] and not outcome["error"]
    return lines, ok


def bench_summary(tsv: Path) -> tuple[list[str], bool]:
    lines, ok = [], True
    rows = [row.split("\t") for row in tsv.read_text().splitlines() if row] if tsv.is_file() else []
    for name, code, seconds, log in rows:
        code = int(code)
        status = ("ok" if code == 0 else f"timed out after {seconds} s" if code == TIMED_OUT
                  else f"FAILED (exit {code})")
        ok &= code == 0
        output = Path(log).read_text(errors="replace").splitlines()[-BENCH_LINES:] if Path(log).is_file() else []
        lines += [f"### {name}: {status}, {seconds} s", "```", *output, "```", ""]
    return lines, ok and bool(rows)


def environment() -> list[str]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    import torch
    gpus = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
            for i in range(torch.cuda.device_count())]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; host {platform.node()}; "
            f"commit {commit or 'unknown'}",
            f"GPUs: {', '.join(gpus) or 'none visible to torch'}",
            f"torch {torch.__version__} (CUDA {torch.version.cuda}); triton {version('triton')}; "
            f"flashinfer-python {version('flashinfer-python')}; flashinfer-cubin {version('flashinfer-cubin')}"]


def report(directory: Path) -> int:
    tests, tests_ok = tests_summary(directory / "tests.xml")
    benches, benches_ok = bench_summary(directory / "benches.tsv")
    verdict = "PASS" if tests_ok and benches_ok else "FAIL"
    text = "\n".join(["# moeserve GPU check", "", *environment(), "", "## GPU tests", *tests, "",
                      "## benchmarks", *benches, f"verdict: {verdict}", ""])
    (directory / "report.md").write_text(text)
    print(text, end="")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "report":
        sys.exit("usage: python scripts/gpu_check.py report REPORT_DIR")
    sys.exit(report(Path(sys.argv[2])))
