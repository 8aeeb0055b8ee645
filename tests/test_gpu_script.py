"""Smoke test of the GPU check, ``benchmarks/gpu.sh``: the same script on CPU at tiny sizes (``SCALEVEC_GPU_SMOKE=1``),
the preflight and every phase, with the packages the GPU image lacks made unimportable, so a GPU run cannot fail
for a reason this test could have shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
# On none of: the GPU image (PyTorch, triton, transformers and their dependencies) or what gpu-prep carries.
IMAGE_LACKS = ("scipy", "matplotlib", "tiktoken", "ninja", "tensorboard")
BLOCKER = f"""import importlib.abc
import sys


class _NotOnImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {IMAGE_LACKS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU image)")
        return None


sys.meta_path.insert(0, _NotOnImage())
"""


def run_script(env: dict[str, str], *phases: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *phases], env={**os.environ, "PY": sys.executable, **env},
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The whole script, once: a small corpus prepared as ``make gpu-prep`` would, then every phase."""
    tmp = tmp_path_factory.mktemp("gpu-smoke")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the {i % 7} quick {i % 11} foxes jump over {i % 13} dogs"
                                for i in range(1500)))
    subprocess.run([sys.executable, "-m", "scalevec", "prepare", f"data.source={corpus}", "data.tokenizer=byte",
                    f"data.dir={tmp / 'data'}"], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    image = tmp / "image"
    image.mkdir()
    (image / "sitecustomize.py").write_text(BLOCKER)
    out = run_script({"SCALEVEC_GPU_SMOKE": "1", "OUT": str(tmp / "out"), "SCALEVEC_GPU_DATA": str(tmp / "data"),
                      "PYTHONPATH": str(image)})
    return out, tmp / "out"


def load(out: Path, phase: str) -> dict:
    r = json.loads((out / f"gpu_{phase}.json").read_text())
    assert r["complete"] and r["smoke"] and r["device"] == "cpu", phase
    return r


@pytest.mark.slow
def test_gpu_script_smoke_runs_every_phase_and_writes_its_json(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("gpu preflight: ok (cpu"), proc.stdout[:500]
    load(out, "preflight")

    a = load(out, "a")
    assert a["ok"] and len(a["checks"]) == 11, [c for c in a["checks"] if not c["ok"]]
    assert {c["name"].split(":")[0] for c in a["checks"]} >= {"tiny/unified", "moe-tiny/unified", "sdpa kernel, GQA"}
    dispatch = [c for c in a["checks"] if "grouped vs loop" in c["name"]]
    assert dispatch and all(c["grouped_mm_calls"] > 0 and c["empty_expert_grads_zero"] for c in dispatch)
    assert all(c["flash"] for c in a["checks"] if c["name"].startswith("sdpa"))
    resume = next(c for c in a["checks"] if c["name"].startswith("train 40 steps"))
    assert resume["steps_compared"] == 20

    for phase, preset in (("b", "tiny"), ("c", "moe-tiny"), ("d", "small")):
        r = load(out, phase)
        assert r["preset"] == preset
        assert set(r["tok_per_s"]) == {"baseline", "unified", "baseline (A/A)"}
        for key in ("time_ratio", "aa_ratio", "memory_ratio"):
            assert r[key] > 0, (phase, key)
        assert all(m["peak_bytes"] > 0 for m in r["memory"].values())
        assert set(r["first_call_s"]) == {"baseline", "unified"} and set(r["first_call_warm_cache_s"]) == {"baseline"}
        assert r["mfu_measured_peak"]["baseline"] > 0 and r["flops_per_token"]["total"] > 0
        assert all(r["top_kernels"][s] for s in ("baseline", "unified"))

    e = load(out, "e")
    assert all(len(e["runs"][s]) == 2 for s in ("baseline", "unified"))
    p = e["paired_final_val_loss_unified_minus_baseline"]
    assert p["n"] == 2 and p["ci95"] is None and "scipy" in p["note"]  # scipy is not on the image
    assert all(len(curve) == 2 for curve in e["mean_val_curve"].values())


@pytest.mark.slow
def test_gpu_summary_tables_the_smoke_run(smoke):
    _, out = smoke
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "summary", str(out)],
                          capture_output=True, text=True, check=False, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "a: 11/11 correctness checks pass" in proc.stdout
    assert all(f"| {p} | " in proc.stdout for p in "bcd")
    assert "e: tiny" in proc.stdout and "(no interval)" not in proc.stdout  # scipy here adds the interval


def test_gpu_script_stops_at_the_preflight_with_one_line(tmp_path):
    """Without a CUDA device (this machine) or without the carried corpus: one line, exit 2, no phase run."""
    proc = run_script({"OUT": str(tmp_path / "out")}, timeout=60)
    assert proc.returncode == 2 and proc.stdout.startswith("gpu preflight: no CUDA device"), proc.stdout + proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and not (tmp_path / "out" / "gpu_a.json").exists()
    proc = run_script({"OUT": str(tmp_path / "out"), "SCALEVEC_GPU_SMOKE": "1",
                       "SCALEVEC_GPU_DATA": str(tmp_path / "missing")}, timeout=60)
    assert proc.returncode == 2 and proc.stdout.strip().splitlines() == [
        f"gpu preflight: no prepared corpus at {tmp_path / 'missing'} (make gpu-prep on CPU, then carry .cache/gpu)"]
    proc = run_script({"OUT": str(tmp_path / "out")}, "x", timeout=60)
    assert proc.returncode == 2 and "unknown phase 'x'" in proc.stdout


@pytest.mark.parametrize("command", ["train", "eval", "export", "sample"])
def test_commands_the_gpu_runs_import_nothing_the_image_lacks(tmp_path, command):
    """Building the command line imports every subcommand's module: none may need a package the image lacks."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    proc = subprocess.run([sys.executable, "-m", "scalevec", command, "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
