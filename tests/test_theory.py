"""The theory checks: the fast subset passes, and the tools they rest on are right on cases with known answers."""

from __future__ import annotations

import json

import pytest
import torch

from scalevec import theory
from scalevec.theory.common import CheckResult
from scalevec.theory.hessian import top_hessian_eigenvalue
from scalevec.theory.preconditioning import one_step


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("theory")
    return out, theory.run_all(out, fast=True)


@pytest.mark.slow
def test_fast_subset_passes(fast_run):
    _, results = fast_run
    assert len(results) == len(theory.CHECKS)
    failed = {r.name: r.measured for r in results if not r.passed}
    assert not failed, failed


@pytest.mark.slow
def test_fast_run_writes_record_report_and_plots(fast_run):
    out, results = fast_run
    data = json.loads((out / "theory.json").read_text())
    assert [r["name"] for r in data["results"]] == [r.name for r in results]
    md = (out / "theory.md").read_text()
    assert all(r.name in md for r in results)
    for r in results:
        for fig in r.figures:
            assert (out / fig.file).stat().st_size > 0
            assert f"]({fig.file})" in md


def test_power_iteration_finds_top_eigenvalue_of_a_quadratic():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    eigs = torch.tensor([5.0, 3.0, 2.5, -2.0] + [1.0] * 8, dtype=torch.float64)
    a = q @ torch.diag(eigs) @ q.T
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    lam, history = top_hessian_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iters=200, rtol=1e-10)
    assert lam == pytest.approx(5.0, rel=1e-6)
    assert len(history) < 200  # converged, not just ran out of iterations


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "hg"])
def test_preconditioning_error_shrinks_linearly_with_step(shared):
    errs = [one_step(shared, eta, seed=1)["full"] for eta in (1e-2, 1e-3)]
    assert errs[1] < errs[0]
    assert errs[0] / errs[1] == pytest.approx(10.0, rel=0.2)  # O(η): a tenth of the step, a tenth of the error


def _fake(passed: bool):
    def check(seed: int = 0) -> CheckResult:
        return CheckResult("fake", "a claim", {"x": 1.0}, "x = 1", passed)
    return check


@pytest.mark.parametrize("passed, code", [(True, 0), (False, 1)])
def test_main_exit_code_says_whether_every_check_passed(tmp_path, monkeypatch, passed, code, capsys):
    monkeypatch.setattr(theory, "CHECKS", [(_fake(True), {}, {}), (_fake(passed), {}, {})])
    doc = tmp_path / "doc.md"
    assert theory.main(["--out", str(tmp_path / "out"), "--fast", "--doc", str(doc)]) == code
    assert "fake" in capsys.readouterr().out
    assert "fake" in doc.read_text()
