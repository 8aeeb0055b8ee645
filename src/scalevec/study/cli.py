"""``scalevec study NAME`` and ``scalevec report DIR`` (registered by the main CLI)."""

from __future__ import annotations

import argparse
from pathlib import Path

from scalevec.typed_config import ConfigError


def cmd_study(args) -> int:
    from scalevec.study.budgets import JOBS, knobs_for
    from scalevec.study.runner import Runner, run_study

    knobs = knobs_for(args.name, args.budget)
    if args.grid:
        knobs.load(args.grid)
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        knobs.set(k.strip(), v.strip())
    if args.seeds is not None:
        knobs.seeds = args.seeds
        knobs.sweep_seeds = min(knobs.sweep_seeds, args.seeds)
    if args.steps is not None:
        knobs.steps = args.steps
    if args.lr_from:
        knobs.lr_from = args.lr_from
    if knobs.seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {knobs.seeds}")
    if args.override:
        knobs.base = [*knobs.base, *args.override]
    jobs = args.jobs if args.jobs is not None else JOBS[args.budget]
    threads = args.threads if args.threads is not None else 1
    runner = Runner(Path(args.out), jobs=jobs, threads=threads, retry_failed=args.retry_failed,
                    score=knobs.score_evals, score_tokens=knobs.score_tokens)
    command = reproduce_command(args.name, args.budget, knobs, args.out)
    study_dir = run_study(args.name, args.budget, knobs, runner, dry_run=args.dry_run, command=command)
    if args.report and not args.dry_run:
        from scalevec.study.report import write_report

        write_report(study_dir, Path(args.report_out) if args.report_out else None)
    return 0


def toml_inline(v) -> str:
    """A value in TOML inline syntax (what ``--set`` parses)."""
    import json

    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_inline(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_inline(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v) if isinstance(v, str) else repr(v)


def reproduce_command(name: str, budget: str, knobs, out: str) -> str:
    """The command that rebuilds exactly this grid: the budget plus every knob that differs from it."""
    import shlex

    from scalevec.study.budgets import knobs_for

    default = knobs_for(name, budget).to_json()
    parts = ["scalevec", "study", name, "--budget", budget, "--out", out]
    for k, v in knobs.to_json().items():
        if v == default[k]:
            continue
        if k == "base" and v[: len(default[k])] == default[k]:  # only additions: say them as --override
            for item in v[len(default[k]) :]:
                parts += ["--override", item]
            continue
        parts += ["--set", f"{k}={v if isinstance(v, str) else toml_inline(v)}"]
    return shlex.join(parts)


def cmd_report(args) -> int:
    from scalevec.study.report import write_report

    root = Path(args.dir)
    dirs = [root] if (root / "study.json").is_file() else sorted(p.parent for p in root.glob("*/study.json"))
    if not dirs:
        raise ConfigError(f"report: {root} holds no study (no study.json in it or in its subfolders)")
    if args.answer_into:
        from scalevec.study.report import check_answer_block

        check_answer_block(Path(args.answer_into))
    reports = {}
    for d in dirs:
        out = (
            Path(args.out) / d.name if args.out and len(dirs) > 1 else (Path(args.out) if args.out else None)
        )
        reports[d.name] = write_report(d, out)
        print(f"{d.name}: {reports[d.name]}")
        if args.tensorboard:
            from scalevec.study.report import export_tensorboard

            n = export_tensorboard(d, Path(args.tensorboard) / d.name)
            print(f"{d.name}: {n} runs written to TensorBoard logs under {args.tensorboard}")
    if len(dirs) > 1:
        from scalevec.study.report import write_index

        print(f"index: {write_index(reports, Path(args.out) if args.out else root)}")
    if args.answer_into:
        from scalevec.study.report import write_answer

        print(f"answer: {write_answer(reports, Path(args.answer_into))}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from scalevec.study.budgets import BUDGETS, JOBS
    from scalevec.study.grids import STUDIES

    st = sub.add_parser(
        "study",
        help="run one of the paper's experiments as a grid of paired, resumable runs",
        description="Studies: " + "; ".join(f"{k}: {v.doc}" for k, v in STUDIES.items()),
    )
    st.add_argument("name", choices=list(STUDIES))
    st.add_argument(
        "--budget",
        choices=list(BUDGETS),
        default="cpu",
        help="grid size: cpu = at most 90 minutes per study on 2 cores; gpu = at most 8 minutes on one H100; "
        "smoke = the whole pipeline on toy shapes in about a minute",
    )
    st.add_argument(
        "--seeds",
        type=int,
        help="paired seeds per arm (default: the budget's, at least 5 where effects are small)",
    )
    st.add_argument(
        "--steps", type=int, help="optimizer steps per run instead of --set tokens_per_param=... (tests)"
    )
    st.add_argument("--out", default="runs/study", help="root of run folders and study manifests")
    st.add_argument("--jobs", type=int, help="runs at once (default: "
                    + ", ".join(f"{n} on {b}" for b, n in JOBS.items()) + ")")
    st.add_argument("--threads", type=int, help="torch threads per run (default 1)")
    st.add_argument("--lr-from", help="an lr-sweep (pilot) study folder: centre each arm's LR grid on its optimum")
    st.add_argument("--grid", help="a TOML file of study knobs (see configs/studies/)")
    st.add_argument(
        "--set", action="append", metavar="KNOB=VALUE", help="one study knob, e.g. lrs=[1e-3,3e-3]"
    )
    st.add_argument(
        "--override",
        action="append",
        metavar="KEY=VALUE",
        help="a run config override applied to every run, e.g. data.source=corpus.txt",
    )
    st.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as diverged")
    st.add_argument("--dry-run", action="store_true", help="print the grid and an estimate; run nothing")
    st.add_argument("--report", action="store_true", help="write the report when the study is done")
    st.add_argument("--report-out", help="folder of the report (default: STUDY_DIR/report)")
    st.set_defaults(fn=cmd_study)

    rp = sub.add_parser(
        "report", help="tables, significance and plots of a study folder (or a folder of them)"
    )
    rp.add_argument("dir", help="a study folder (holding study.json) or a root holding several")
    rp.add_argument("--out", help="where to write (default: DIR/report; with several studies: OUT/<study>)")
    rp.add_argument(
        "--tensorboard", metavar="LOGDIR", help="also write every run's metrics as TensorBoard logs"
    )
    rp.add_argument(
        "--answer-into", metavar="DOC",
        help="also replace the marked answer block of DOC (e.g. docs/studies.md) with every claim's row",
    )
    rp.set_defaults(fn=cmd_report)
