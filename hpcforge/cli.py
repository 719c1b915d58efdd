"""The `hpcforge` command (also `python -m hpcforge`): the top layer, the one module that may
import `jobs` and `benchmarks` as well as `pipeline`.

    hpcforge prepare [-e EXPERIMENT] [key=value ...]
    hpcforge train   [-e EXPERIMENT] [--nproc N] [key=value ...]
    hpcforge bench   [--quick] [--only NAME,...]
    hpcforge config  [-e EXPERIMENT] [key=value ...]   (print the resolved config)
    hpcforge submit  [-e EXPERIMENT] [--stages prepare,train] [key=value ...]   (jobs/, Slurm)
    hpcforge sweep   [-e EXPERIMENT] --grid key=v1,v2 [--task "k=v ..."] [--stages train,evaluate]
                     [--rank-by [min:|max:]METRIC] [key=value ...]
    hpcforge status|logs|cancel JOBID [--jobs-dir DIR]
    hpcforge evaluate CHECKPOINT [key=value ...]
    hpcforge explain CHECKPOINT [--n 8] [--methods saliency,...] [--heads 0,1] [key=value ...]
    hpcforge attack  CHECKPOINT [--eps 0,0.01,0.02,0.05] [--steps 10] [key=value ...]
    hpcforge report  RUN_DIR... [--out report.html]

Bad input prints one line (`hpcforge: error: ...`) and exits 2; nothing is started.
"""
from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
from pathlib import Path

from pipeline.core.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse with its refusals on one line, like every other bad input (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"hpcforge: error: {message}; see `{self.prog} --help`\n")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-e", "--experiment", default="demo",
                   help="configs/experiment/<name>.yaml (default: demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="group=name swaps a config group file; a.b=value sets a key")


_SOURCES = "(the sources and importers)"   # replaced by the registry's text, for --help only


class _SourcesEpilog(argparse.RawDescriptionHelpFormatter):
    """`prepare --help` lists every source and importer with an example, built from the registry
    (pipeline.sources.describe) when help is shown: importing it takes ~1 s."""

    def add_text(self, text):
        if text == _SOURCES:
            from pipeline.config import available
            from pipeline.sources import describe
            text = describe(set(available("data")))
        super().add_text(text)


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="hpcforge", description="Distributed HPC training pipeline: "
                                 "Dask -> Zarr -> Horovod/MPI -> W&B, on Slurm through submitit.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("prepare", help="generate/import a dataset with Dask into a sharded Zarr store",
                       formatter_class=_SourcesEpilog, epilog=_SOURCES)
    _add_config_args(p)
    p = sub.add_parser("train", help="train a model data-parallel (Horovod over MPI)")
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks to start on this machine (sets train.dist.nproc)")
    p.epilog = ("runs: each run writes <output_dir>/train/ (checkpoints, metrics.jsonl, W&B run); "
                "a new run (train.resume=never, the default) into an output_dir that holds a run "
                "is refused, naming a free output_dir-N; train.resume=auto continues the run "
                "there from its newest valid checkpoint (a requeued Slurm job does this). "
                "transfer learning: train.init_from=CHECKPOINT (model weights, fresh optimizer), "
                "train.freeze=[prefix,...], train.optim.groups.<prefix>=<lr scale>; adversarial "
                "training: train.adversarial.eps=0.1 (method=fgsm|pgd, steps, fraction); an "
                "average of the generator's weights for sampling: train.ema.decay=0.999 "
                "(train.ema.start=<updates>); every key with its default: hpcforge config")
    p = sub.add_parser("config", help="print the resolved config as JSON")
    _add_config_args(p)
    p = sub.add_parser("bench", help="run the ratio benchmarks under benchmarks/")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    p.add_argument("--out", default="outputs/bench/results.json", help="JSON file for the table")
    p.add_argument("--only", default="", metavar="NAME[,NAME]",
                   help="run only these benchmarks (allreduce, trainer, data_prepare, data_loader)")
    p = sub.add_parser("evaluate", help="score a checkpoint on the test split (metrics JSON + W&B)")
    p.add_argument("checkpoint", help="a .pt file written by `hpcforge train`")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="change the stored config, e.g. data.path=... (a moved store)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: the run's train.seed); two seeds show the "
                        "evaluation's own spread")
    p.add_argument("--per-t", type=int, default=256, metavar="N",
                   help="temperature-conditional Ising generators: N generated and 2 x N "
                        "independent reference lattices per temperature (grid and held-out "
                        "midpoints), bootstrap intervals and controls (precise/...); 0 skips it")
    p.epilog = ("latent models (vae, aae, gan, dcgan, wgan_gp, cgan, calo_wgan) also get latent "
                "interpolations (slerp and linear), traversals and the observables along the path "
                "(latent/...); conditional generators on a source that declares CONDITION_BINS "
                "(calo) get W1 / floor per condition bin (w1_ratio_bin/K/NAME, edges bin/K/low, "
                "bin/K/high) and the response (response_bin/K/real, generated, ratio; figure "
                "response.png); a checkpoint trained with train.ema.decay > 0 samples with its "
                "weight average, train.ema.weights=raw evaluates the raw weights instead")
    _add_probe_commands(sub)
    p = sub.add_parser("report", help="write one self-contained HTML page of one or more runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a run's output_dir, its train/ folder, or a W&B run folder")
    p.add_argument("--out", default="report.html", help="the HTML file to write")
    _add_job_commands(sub)
    ap.commands = sub.choices  # name -> its parser, for parse()
    return ap


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with options and key=value overrides in any order (`sweep --grid a=1,2
    train.epochs=1 --grid b=3,4`): each command's own parser reads it intermixed."""
    ap = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ap.commands:
        return ap.parse_args(argv)  # --help, or a refusal that lists the commands
    args = ap.commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


# pipeline.analysis.explain.METHODS, spelled out: importing it (torch, Captum's users) would slow every command
EXPLAIN_METHODS = ("saliency", "guided_backprop", "integrated_gradients", "gradient_shap")


def _add_probe_commands(sub) -> None:
    p = sub.add_parser("explain", help="attribution maps (Captum) of a supervised checkpoint on "
                       "test samples: JSON + figures + W&B")
    p.add_argument("checkpoint", help="a .pt file written by `hpcforge train`")
    p.add_argument("--n", type=int, default=8, help="test samples to attribute (default: 8)")
    p.add_argument("--methods", default=",".join(EXPLAIN_METHODS), metavar="M[,M]",
                   help=f"comma-separated subset of {','.join(EXPLAIN_METHODS)} (default: all)")
    p.add_argument("--heads", default=None, metavar="H[,H]",
                   help="transformer checkpoints: attention heads whose maps (every layer, mean "
                        "over the windows) are drawn (default: all heads)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="change the stored config, e.g. data.path=... (a moved store)")
    p = sub.add_parser("attack", help="FGSM and PGD on the test split of a supervised checkpoint: "
                       "accuracy (or relative error) against eps")
    p.add_argument("checkpoint", help="a .pt file written by `hpcforge train`")
    p.add_argument("--eps", default="0,0.01,0.02,0.05", metavar="E[,E]",
                   help="L-inf radii in the model's input units, i.e. the store's inputs after "
                        "data.normalize (for minmax Ising spins 1 = one spin flip) "
                        "(default: 0,0.01,0.02,0.05)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps of 2.5*eps/steps (default: 10)")
    p.add_argument("--n", type=int, default=1024, help="test samples at most (default: 1024)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="change the stored config, e.g. data.path=... (a moved store)")


def _add_job_commands(sub) -> None:
    from pipeline.config import ClusterConfig
    p = sub.add_parser("submit", help="submit a run (or a prepare -> train chain) as Slurm jobs; "
                       "returns at once with job ids and log paths")
    _add_config_args(p)
    p.add_argument("--stages", default="train",
                   help="comma-separated, in order: prepare,train,evaluate; each later stage "
                        "starts only after the previous one succeeded (default: train)")
    p.add_argument("--json", action="store_true", help="print the submitted jobs as JSON")
    p = sub.add_parser("sweep", help="a grid/list over config keys as one Slurm job array, "
                       "with a summary table when all tasks end")
    _add_config_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one sweep axis (repeatable; tasks are the product of all axes)")
    p.add_argument("--task", action="append", default=[], metavar="'K=V K=V'",
                   help="one explicit task's overrides (repeatable; combined with --grid)")
    p.add_argument("--name", default=None, help="sweep name = W&B group (default: sweep-<exp>-<time>)")
    p.add_argument("--parallel", type=int, default=None,
                   help="tasks running at once (sets cluster.array_parallelism)")
    p.add_argument("--stages", default="train", metavar="train[,evaluate]",
                   help="train, or train,evaluate: `hpcforge evaluate` on each task's final "
                        "checkpoint in the same task, its metrics in the summary (default: train)")
    p.add_argument("--rank-by", default=None, metavar="[min:|max:]METRIC",
                   help="order the summary best first by a metric as evaluate writes it "
                        "(w1/energy, classifier/auc) or a training column (val/loss); lower is "
                        "better unless max: (e.g. --rank-by max:accuracy)")
    p.add_argument("--json", action="store_true", help="print the sweep record as JSON")
    for name, what in (("status", "show a submitted job's state and result"),
                       ("logs", "print a submitted job's log for one rank"),
                       ("cancel", "cancel a submitted job")):
        p = sub.add_parser(name, help=what)
        p.add_argument("job_id", metavar="JOBID")
        p.add_argument("--jobs-dir", default=ClusterConfig.jobs_dir,
                       help=f"the cluster.jobs_dir it was submitted with (default: {ClusterConfig.jobs_dir})")
        if name == "logs":
            p.add_argument("--rank", type=int, default=0, help="which rank's log (default: 0)")
            p.add_argument("--err", action="store_true", help="stderr instead of stdout")


def _config(args: argparse.Namespace, extra: list[str] | None = None):
    from pipeline.config import load_config
    return load_config(args.experiment, list(args.overrides) + (extra or []))


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.data.prepare import prepare
    cfg = _config(args)
    path = prepare(cfg.data, cfg.to_dict())
    from pipeline.data.store import open_store
    meta = open_store(path).meta
    sh = meta.shuffle
    print(f"[hpcforge] dataset: {path}  splits {meta.splits}  shards of {meta.shard_size}  "
          f"({sh['tasks']} Dask tasks, {sh['tasks_run']} run, {meta.seconds} s)")
    for name, bad in meta.invalid["variables"].items():
        print(f"[hpcforge] {name}: {bad['values']} NaN/Inf values in {bad['samples']} samples, "
              f"first at {bad['first']} ({meta.invalid['policy']})")
    return 0


def _check_store_fills_a_step(cfg, ranks: int) -> None:
    """Refuse a store too small for one optimizer step, before any rank starts. The rule is the
    loader's (pipeline/data/loader.py): each rank gets (n // ranks) samples of the train split, cut
    into full batches (the tail is dropped), and a step sums `accumulate` of them."""
    from pipeline.data.store import open_store
    train_cfg = cfg.train
    store = open_store(cfg.data.path)  # reads the metadata only; names a missing store
    n = store.meta.splits.get("train", 0)
    if (n // ranks) // train_cfg.batch_size >= train_cfg.accumulate:
        return
    batch, accumulate = train_cfg.batch_size, train_cfg.accumulate
    acc = f" x train.accumulate={accumulate}" if accumulate > 1 else ""
    raise UserError(f"train.batch_size={batch}{acc} on {ranks} rank(s) needs "
                    f"{batch * accumulate} training samples per rank, but {store.path} has "
                    f"{n} ({n // ranks} per rank); lower train.batch_size (or the ranks), or prepare "
                    f"more samples (data.n_samples)")


def cmd_train(args: argparse.Namespace) -> int:
    """Preemption signals are caught from here on, before torch is imported (pipeline.runtime.preemption):
    one that comes while the command starts or ends is acted on or, once the run is done,
    ignored, but never kills it (issue 25)."""
    from pipeline.runtime.preemption import SIGNALS, PreemptionFlag
    flag = PreemptionFlag().__enter__()
    try:
        return _train(args, flag)
    finally:
        flag.__exit__(None, None, None)
        if getattr(args, "program", False):
            # The run is over: a signal while the process exits (W&B's and MPI's teardown) has
            # nothing left to stop. Ignored, not caught: Python's finalization puts back the
            # default action (death) for signals caught in Python, but leaves ignored ones be.
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_IGN)


def _train(args: argparse.Namespace, flag) -> int:
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: expected at least 1 rank; pass --nproc 1 or more")
    extra = [f"train.dist.nproc={args.nproc}"] if args.nproc is not None else []
    cfg = _config(args, extra)  # validate before starting any rank
    from pipeline.runtime.dist import check_backend, detect_launcher
    from pipeline.runtime.launch import needs_launch, relaunch
    check_backend(cfg.train.dist)  # e.g. Horovod missing: one line naming ddp, no rank started
    launch = needs_launch(cfg.train.dist.nproc)
    if launch and cfg.train.dist.backend == "none":
        raise UserError(f"train.dist.nproc={cfg.train.dist.nproc} needs a distributed backend; "
                        f"set train.dist.backend=horovod")
    from pipeline.data.lock import check_free
    check_free(Path(cfg.data.path))  # not while a prepare writes it
    _check_store_fills_a_step(cfg, cfg.train.dist.nproc if launch else detect_launcher().world_size)
    if launch:
        from pipeline.train.trainer import check_before_start  # (ranks started elsewhere: train())
        check_before_start(cfg)  # one run, one record; the store's classes: before any rank
        argv = ["train", "-e", args.experiment, *args.overrides, *extra]
        return relaunch(cfg.train.dist.nproc, argv, cfg.train.dist.launcher,
                        cfg.train.dist.timeout_s, Path(cfg.output_dir) / "train" / "checkpoints",
                        flag, cfg.train.dist.backend)
    from pipeline.runtime.preemption import REQUEUE_EXIT_CODE, Preempted
    from pipeline.runtime.watchdog import preempted_status
    from pipeline.train.nonfinite import NonFiniteError
    from pipeline.train.trainer import train
    try:
        summary = train(cfg, flag)
    except Preempted as e:
        print(f"[hpcforge] {e}", file=sys.stderr, flush=True)
        return preempted_status(REQUEUE_EXIT_CODE)  # 75, or 0 for our launcher to make it 75
    except NonFiniteError as e:
        print(f"hpcforge: error: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:
        from pipeline.runtime.launch import PEER_GONE_EXIT, peer_gone
        if not peer_gone(e):
            raise
        print(f"[hpcforge] rank {detect_launcher().rank}: stopped, another rank ended during a "
              f"collective ({type(e).__name__}); the launcher names it", file=sys.stderr, flush=True)
        return PEER_GONE_EXIT
    if "checkpoint" in summary:  # rank 0
        last = summary["history"][-1] if summary["history"] else {}
        print(f"[hpcforge] {summary['steps']} steps on {summary['ranks']} ranks "
              f"({summary['launcher']}); final {json.dumps({k: round(v, 4) for k, v in last.items()})}")
        print(f"[hpcforge] checkpoint: {summary['checkpoint']}")
        print(f"[hpcforge] metrics:    {summary['metrics']}")
        print(f"[hpcforge] W&B run:    {summary['wandb_run']} (upload later: wandb sync <dir>)")
        print(f"[hpcforge] summary:    {Path(cfg.output_dir) / 'train' / 'summary.json'}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(_config(args).to_dict(), indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.run import main as bench_main
    return bench_main(quick=args.quick, out=args.out,
                      only=[n for n in args.only.split(",") if n])


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.analysis.evaluate import evaluate
    if args.per_t < 0:
        raise UserError(f"--per-t {args.per_t}: expected 0 (skip the precise evaluation) or a "
                        f"positive count of samples per temperature, e.g. --per-t 256")
    _print_result(evaluate(args.checkpoint, list(args.overrides), args.seed, args.per_t), "metrics")
    return 0


def _print_result(result: dict, label: str) -> None:
    """What evaluate, explain and attack print: the metrics, notes, the JSON file, the W&B run."""
    width = max(map(len, result["metrics"]), default=0)
    for k, v in result["metrics"].items():
        print(f"  {k:<{width}}  {v:.6g}")
    for note in result["notes"]:
        print(f"[hpcforge] note: {note}")
    print(f"[hpcforge] {label}: {result['json']}")
    if result["wandb_run"]:
        print(f"[hpcforge] W&B run: {result['wandb_run']} (run id {result['wandb_run_id']})")


def parse_ints(flag: str, text: str) -> list[int]:
    """'0,1' -> [0, 1]; anything else is a one-line user error naming the flag."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: expected comma-separated integers, e.g. {flag} 0,1") from None


def cmd_explain(args: argparse.Namespace) -> int:
    from pipeline.analysis.explain import explain
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    heads = None if args.heads is None else parse_ints("--heads", args.heads)
    result = explain(args.checkpoint, list(args.overrides), args.n, methods, heads)
    _print_result(result, result["kind"])
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from pipeline.analysis.attack import attack, parse_eps
    result = attack(args.checkpoint, parse_eps(args.eps), args.steps, args.n, list(args.overrides))
    _print_result(result, result["kind"])
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.analysis.report import report
    out = report(args.run_dirs, args.out)
    print(f"[hpcforge] report: {out}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submit import submit
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    out = submit(args.experiment, list(args.overrides), stages)
    for s in out:
        print(f"[hpcforge] {s.stage:<8} job {s.job_id} ({s.backend})  log {s.logs}", file=sys.stderr)
        print(f"[hpcforge]          record {s.record}", file=sys.stderr)
    if out and out[0].backend == "debug":  # in-process: run now, in order
        for s in out:
            print(f"[hpcforge] {s.stage} result: {_short(s.job.result())}", file=sys.stderr)
    else:
        print(f"[hpcforge] follow with: hpcforge status {out[-1].job_id}; hpcforge logs "
              f"{out[-1].job_id} [--rank R]; hpcforge cancel {out[-1].job_id}", file=sys.stderr)
    if args.json:  # last line of stdout (a debug run prints the trainer's output before it)
        print(json.dumps([{"stage": s.stage, "job_id": s.job_id, "backend": s.backend,
                           "record": str(s.record), "logs": str(s.logs)} for s in out]))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from jobs.sweep import sweep
    rec = sweep(args.experiment, list(args.overrides), args.grid, args.task, args.name, args.parallel,
                args.stages.split(","), args.rank_by)
    public = {k: v for k, v in rec.items() if not k.startswith("_") and k != "config"}
    if args.json:
        print(json.dumps(public))
    print(f"[hpcforge] sweep {rec['name']}: array job {rec['job_id']} with {len(rec['tasks'])} "
          f"tasks (at most {rec['parallelism']} at once); summary job {rec['summary_job']} writes "
          f"{rec['summary']}", file=sys.stderr)
    if "evaluate" in rec["stages"]:
        rank = rec["rank_by"]
        print(f"[hpcforge] each task evaluates its final checkpoint"
              f"{'; the summary ranks by ' + rank['direction'] + ':' + rank['metric'] if rank else ''}",
              file=sys.stderr)
    for i, t in enumerate(rec["tasks"]):
        print(f"[hpcforge]   {t['job_id']:<10} {' '.join(t['overrides'])}", file=sys.stderr)
    return 0


def _short(result) -> str:
    if isinstance(result, dict) and "summary" in result:
        s = result["summary"]
        last = (s.get("history") or [{}])[-1]
        return f"{s.get('steps')} steps on {s.get('ranks')} ranks; final " + \
            json.dumps({k: round(v, 4) for k, v in last.items() if isinstance(v, float)})
    return str(result)[:300]


def cmd_status(args: argparse.Namespace) -> int:
    from jobs import records
    rec = records.find(Path(args.jobs_dir), args.job_id)
    what = f"sweep {rec['name']}" if rec.get("kind") == "sweep" else f"{rec['stage']} job"
    print(f"{what} {rec['job_id']} ({rec['backend']}), submitted {rec['submitted']}, "
          f"git {rec['git_revision']}")
    print(f"  command: {' '.join(rec['command'])}")
    rows = records.states(rec)
    cols = [c for c in ("JobID", "State", "ExitCode", "Elapsed", "NodeList") if c in rows[0]]
    for row in [dict(zip(cols, cols)), *rows]:
        print("  " + "  ".join(f"{row.get(c, ''):<14}" for c in cols).rstrip())
    if rec.get("kind") == "sweep":
        summary = Path(rec["summary"]).with_suffix(".md")
        print(f"  summary: {summary.read_text() if summary.is_file() else '(not written yet: ' + str(summary) + ')'}")
        return 0
    result = records.result_of(rec)
    if result is not None:
        print(f"  result: {_short(result[1]) if result[0] == 'success' else result[1].strip().splitlines()[-1]}")
    print(f"  logs: {records.log_paths(rec)[0]} (hpcforge logs {rec['job_id']} --rank R)")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from jobs import records
    rec = records.find(Path(args.jobs_dir), args.job_id)
    if rec.get("kind") == "sweep":
        raise UserError(f"job {args.job_id} is a sweep (array); ask for one task's log: "
                        f"{', '.join(t['job_id'] for t in rec['tasks'])}")
    if not 0 <= args.rank < rec["ranks"]:
        raise UserError(f"--rank {args.rank}: job {rec['job_id']} has ranks 0..{rec['ranks'] - 1}")
    path = records.log_paths(rec, args.rank)[1 if args.err else 0]
    if not path.is_file():
        raise UserError(f"job {rec['job_id']} rank {args.rank}: no log yet at {path} "
                        f"(state: {records.states(rec)[0]['State']})")
    sys.stdout.write(path.read_text(errors="replace"))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from jobs import records
    rec = records.find(Path(args.jobs_dir), args.job_id)
    print(f"[hpcforge] {records.cancel(rec)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.program = argv is None  # the `hpcforge` command itself, not a call from Python
    try:
        return {"prepare": cmd_prepare, "train": cmd_train, "config": cmd_config,
                "bench": cmd_bench, "evaluate": cmd_evaluate, "explain": cmd_explain,
                "attack": cmd_attack, "report": cmd_report,
                "submit": cmd_submit, "sweep": cmd_sweep, "status": cmd_status,
                "logs": cmd_logs, "cancel": cmd_cancel}[args.command](args)
    except UserError as e:
        print(f"hpcforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (the first asks for a checkpoint while training)
        print("hpcforge: interrupted; the same command resumes a prepare (a training run with "
              "train.resume=auto)", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except OSError as e:  # a full disk anywhere is the user's to fix, not a traceback
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"hpcforge: error: disk full{where} ({e.strerror}); free space on that filesystem "
              f"(df -h) or point output_dir / data.path at one with room, then run the same "
              f"command again", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
