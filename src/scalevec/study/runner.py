"""Execute a study: each run in its own process, a pool of ``jobs`` at a time, resumable.

Layout under ``OUT`` (default ``runs/study``)::

    OUT/runs/<key>/          one ordinary run directory per distinct config (shared across studies)
    OUT/<study>/study.json   the manifest: knobs and every run spec with its run directory and status

A run whose ``summary.json`` and ``score.json`` exist is skipped; a trained run without a score is only
scored; a run with a ``config.toml`` but no summary is resumed from its newest checkpoint; a run that
diverged (non-finite loss) is recorded as such and not retried unless asked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scalevec.study.grids import best_lrs, get_study
from scalevec.study.spec import Knobs, RunSpec
from scalevec.study.worker import SCORE_FILE
from scalevec.typed_config import ConfigError

DIVERGED = "diverged"


class Runner:
    def __init__(
        self,
        out: Path,
        jobs: int = 2,
        threads: int = 1,
        retry_failed: bool = False,
        python: str = sys.executable,
        log=print,
        score: int = 3,
        score_tokens: int = 0,
    ):
        self.score_tokens = score_tokens
        self.out, self.jobs, self.threads = Path(out), max(1, jobs), max(1, threads)
        self.retry_failed, self.python, self.log, self.score = retry_failed, python, log, score

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "runs" / spec.key

    def status(self, spec: RunSpec) -> str:
        d = self.run_dir(spec)
        if (d / "summary.json").is_file():
            return "done" if not self.score or (d / SCORE_FILE).is_file() else "unscored"
        if (d / "failed.json").is_file():
            return json.loads((d / "failed.json").read_text()).get("kind", "failed")
        if (d / "config.toml").is_file():
            return "partial"
        return "todo"

    def lookup(self, spec: RunSpec) -> float | None:
        """The run's score (mean of its last evaluations on the whole validation split; the final periodic
        evaluation for runs scored without it); +inf for a diverged run; None while unfinished."""
        st = self.status(spec)
        if st == "done":
            return run_score(self.run_dir(spec))
        return math.inf if st == DIVERGED else None

    def command(self, spec: RunSpec) -> list[str]:
        d = self.run_dir(spec)
        cmd = [
            self.python,
            "-m",
            "scalevec.study.worker",
            *spec.config_overrides(),
            f"run.out={d}",
            f"train.threads={self.threads}",
            "train.progress=false",
            *(["--score", str(self.score), "--score-tokens", str(self.score_tokens)] if self.score else []),
        ]
        return [*cmd, "--resume"] if (d / "config.toml").is_file() else cmd

    def _one(self, spec: RunSpec) -> tuple[RunSpec, int, float]:
        d = self.run_dir(spec)
        d.mkdir(parents=True, exist_ok=True)
        while not _lock(d / "study.lock"):  # another study trains this very run: wait for it, then reuse it
            time.sleep(5)
        if self.status(spec) == "done":
            (d / "study.lock").unlink(missing_ok=True)
            return spec, 0, 0.0
        try:
            (d / "failed.json").unlink(missing_ok=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
            t0 = time.perf_counter()
            with open(d / "study.log", "a") as logf:
                rc = subprocess.run(
                    self.command(spec), stdout=logf, stderr=subprocess.STDOUT, env=env, check=False
                ).returncode
            dt = time.perf_counter() - t0
        finally:
            (d / "study.lock").unlink(missing_ok=True)
        res = d / "resources.json"
        if rc == 0 and res.is_file():  # the whole process, start and scoring included: the time estimate's unit
            res.write_text(json.dumps({**json.loads(res.read_text()), "runner_s": dt}, indent=1))
        if rc != 0:
            tail = (d / "study.log").read_text().strip().splitlines()[-1:] or [""]
            kind = DIVERGED if "non-finite" in tail[0] else "failed"
            (d / "failed.json").write_text(json.dumps({"kind": kind, "rc": rc, "error": tail[0]}, indent=1))
        return spec, rc, dt

    def execute(self, specs: list[RunSpec]) -> None:
        unique = list({sp.key: sp for sp in specs}.values())
        skip = ("done", DIVERGED) if not self.retry_failed else ("done",)
        todo = [sp for sp in unique if self.status(sp) not in skip]
        self.log(
            f"  {len(unique)} distinct runs, {len(unique) - len(todo)} finished earlier, {len(todo)} to run "
            f"({self.jobs} at a time, {self.threads} thread(s) each)"
        )
        if not todo:
            return
        errors: list[str] = []
        with ThreadPoolExecutor(self.jobs) as pool:
            for i, (sp, rc, dt) in enumerate(pool.map(self._one, todo), 1):
                if rc == 0:
                    loss = self.lookup(sp)
                    self.log(f"  [{i}/{len(todo)}] {sp.key:<28} {sp.arm:<22} val {loss:.4f}  ({dt:.0f} s)")
                else:
                    info = json.loads((self.run_dir(sp) / "failed.json").read_text())
                    self.log(f"  [{i}/{len(todo)}] {sp.key:<28} {sp.arm:<22} {info['kind']}: {info['error']}")
                    if info["kind"] != DIVERGED:
                        errors.append(f"{sp.key}: {info['error']}")
        if errors:
            raise ConfigError(
                f"{len(errors)} run(s) failed, first: {errors[0]} (log: study.log in the run folder)"
            )


def run_score(run_dir: Path) -> float:
    score = run_dir / SCORE_FILE
    if score.is_file():
        return float(json.loads(score.read_text())["score"])
    return float(json.loads((run_dir / "summary.json").read_text())["final_val_loss"])


def _lock(path: Path) -> bool:
    """Create ``path`` holding our pid; a lock whose process is gone is taken over."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
                os.kill(pid, 0)
                return False  # the owner is alive
            except (ValueError, ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)  # stale
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def manifest(
    study: str, budget: str, knobs: Knobs, runner: Runner, specs: list[RunSpec], command: str = ""
) -> dict:
    study_dir = runner.out / study
    runs = []
    for sp in specs:
        runs.append(
            {
                **sp.to_json(),
                "run_dir": os.path.relpath(runner.run_dir(sp), study_dir),
                "status": runner.status(sp),
            }
        )
    return {"study": study, "budget": budget, "command": command, "knobs": knobs.to_json(), "runs": runs}


def write_manifest(study_dir: Path, man: dict) -> None:
    tmp = study_dir / "study.json.tmp"
    tmp.write_text(json.dumps(man, indent=1))
    tmp.replace(study_dir / "study.json")


def run_study(
    name: str, budget: str, knobs: Knobs, runner: Runner, dry_run: bool = False, command: str = ""
) -> Path:
    """Run every stage of a study in order; returns the study folder (holding ``study.json``)."""
    study = get_study(name)
    study_dir = runner.out / study.name
    study_dir.mkdir(parents=True, exist_ok=True)
    specs: list[RunSpec] = []
    t0 = time.perf_counter()
    estimate = 0.0
    for i, (stage_name, stage) in enumerate(study.stages):
        stage_specs = stage(knobs, _assumed if dry_run and i else runner.lookup)
        earlier = {sp.key for sp in specs}
        specs += stage_specs
        runner.log(f"{study.name}/{stage_name}: {len(stage_specs)} runs"
                   + (" (counted as if every grid were finished)" if dry_run and i else ""))
        if dry_run:
            estimate += _describe([sp for sp in stage_specs if sp.key not in earlier], runner, budget)
            continue
        write_manifest(study_dir, manifest(study.name, budget, knobs, runner, specs, command))
        runner.execute(stage_specs)
    if not dry_run:
        write_manifest(study_dir, manifest(study.name, budget, knobs, runner, specs, command))
    sweep = [sp for sp in specs if sp.stage == "sweep"]
    if sweep and not dry_run:
        best = best_lrs(sweep, runner.lookup)
        (study_dir / "best_lr.json").write_text(json.dumps(best, indent=1))
    if dry_run and math.isfinite(estimate):
        runner.log(f"{study.name}: about {estimate / 60:.0f} min in all")
    if not dry_run:
        runner.log(f"{study.name}: done in {time.perf_counter() - t0:.0f} s; `scalevec report {study_dir}`")
    return study_dir


def _assumed(spec: RunSpec) -> float:
    """A stand-in score for a dry run's later stages: only how many runs they hold matters there."""
    return 2.0 + math.log(spec.coords.get("x", 1.0)) ** 2


def _describe(specs: list[RunSpec], runner: Runner, budget: str) -> float:
    """Print a stage's grid and estimate; returns the estimated wall seconds (NaN without a time model)."""
    from scalevec.study.estimate import DEFAULTS, calibrate, study_seconds

    unique = list({sp.key: sp for sp in specs}.values())
    todo = [sp for sp in unique if runner.status(sp) != "done"]
    model = calibrate(runner.out, default=DEFAULTS.get(budget))
    tokens = sum(int(sp.overrides.get("train.steps", 0)) * int(sp.overrides.get("train.batch_size", 16))
                 * int(sp.overrides.get("train.seq_len", 128)) for sp in unique)
    head = f"  {len(unique)} distinct runs ({len(todo)} not finished), {tokens / 1e6:.1f}M training tokens"
    if model is None:
        runner.log(f"{head}; no time estimate: the {budget} budget has no measured runs yet (one appears once "
                   f"6 runs have finished in {runner.out})")
        seconds = math.nan
    else:
        seconds = study_seconds(todo, model) / runner.jobs
        runner.log(f"{head}; about {seconds / 60:.0f} min with {runner.jobs} at a time ({model.source})")
    for sp in unique[:12]:
        runner.log(f"    {sp.group:<30} {sp.arm:<22} seed {sp.seed}  {sp.key}")
    if len(unique) > 12:
        runner.log(f"    ... and {len(unique) - 12} more")
    return seconds
