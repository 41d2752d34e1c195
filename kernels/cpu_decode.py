"""Builds and loads the fused bf16 CPU decode step (`csrc/cpu_decode.cpp`).

The extension is compiled on first use with torch's C++ extension builder (g++ and ninja,
about 40 s on 2 cores) for this machine's CPU (-march=native), and cached by torch under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); later loads take about a second,
and a changed source rebuilds. `scripts/setup.sh` builds it, so neither the tests nor the
first engine start pay for the compile.

Where it cannot be built (no compiler, no oneDNN), `load()` returns None and says why, and
the engine decodes through the Python model, which is also the reference the extension is
tested against (tests/test_cpu_fused_decode.py). MOESERVE_CPU_DECODE=torch forces that path.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_decode.cpp"
NAME = "moeserve_cpu_decode"
DISABLE_ENV = "MOESERVE_CPU_DECODE"  # "torch": decode through the Python model

_state: dict[str, object] = {}


def disabled_reason() -> str | None:
    value = os.environ.get(DISABLE_ENV, "").strip().lower()
    if value in ("", "fused", "auto"):
        return None
    if value == "torch":
        return f"{DISABLE_ENV}=torch"
    raise ValueError(f"{DISABLE_ENV} must be 'torch' or 'fused', got {value!r}")


def toolchain_missing() -> str | None:
    """Why this machine cannot build the extension at all (no oneDNN, no compiler), or None."""
    import torch
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    return None


def load():
    """The compiled module, or None when it cannot be built here (the reason: `why_unavailable()`)."""
    if "module" in _state:
        return _state["module"]
    module, reason = None, toolchain_missing()
    if reason is None:
        try:
            module = _build()
        except Exception as exc:  # noqa: BLE001 - any build failure means: decode through the Python model
            reason = f"building {SOURCE.name} failed: {_first_error(str(exc)) or repr(exc)}"
    _state["module"], _state["reason"] = module, reason
    if reason:
        log.warning("fused CPU decode unavailable (%s); decoding through the Python model", reason)
    return module


def why_unavailable() -> str | None:
    load()
    return _state["reason"]  # type: ignore[return-value]


def _first_error(message: str) -> str:
    """The compiler's first error line out of a build log, else the log's last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "build stopped" not in line]
    return errors[0] if errors else (lines[-1] if lines else "")


def _build():
    if shutil.which("ninja") is None:  # the pip package's binary, when its venv is not on PATH
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    from torch.utils.cpp_extension import load as load_extension
    # -fopenmp: at::parallel_for's OpenMP region lives in an ATen header, so without it the
    # extension's parallel loops run on one thread (the runtime is torch's own libgomp).
    flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
    return load_extension(NAME, [str(SOURCE)], extra_cflags=flags, verbose=False)


if __name__ == "__main__":  # python -m kernels.cpu_decode: build now (scripts/setup.sh)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("fused CPU decode: " + ("built" if load() is not None else f"unavailable ({why_unavailable()})"))
