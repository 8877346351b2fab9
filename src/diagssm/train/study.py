"""`diagssm study`: train every model of a comparison on one task, over seeds, and tabulate.

A study file (configs/study/<task>.yaml) holds

    study: sfashion                 # the name; runs go to <runs-dir>/<study>/<model>/seed<k>
    seeds: [0, 1, 2]                # run.seed: model initialisation, data order, dropout
    models: models.yaml             # the variants: a file (relative to this one) or a mapping
    config: ../sfashion.yaml        # the training config all rows share: a file or a mapping
    set: {model.d_model: 64}        # optional: settings changed in it for every row
    extra_tests:                    # optional: more test sets for each finished row, e.g.
      8kHz: {rate: 2, set: {task.params.test_rate: 8000}}   # the zero-shot sampling-rate test

and a variant is a name with the dotted settings it changes (`model.layer: s4d`,
`model.layer_kwargs.init: inv`). Every row uses the same task data (task.seed of the config),
depth, width, optimiser and number of steps; only the variant's settings and run.seed differ.

    diagssm study run configs/study/sfashion.yaml [--models s4d-legs,s5] [--seeds 0] [--set K=V]
    diagssm study table configs/study/*.yaml [--out docs/results-table.md] [--per-seed]
    diagssm study list configs/study/sfashion.yaml          # rows, parameter counts, commands

`run` skips rows that have a result, resumes rows that have a checkpoint, and starts the others
(a row stopped before its first checkpoint starts again). A row that fails (diverges, say) is
reported and the next rows still run; the command then exits 1 and lists the failed rows.
A finished row writes result.json: the test metric of the best-validation checkpoint, the best
validation metric, the parameter count, seconds of the run (training with its evaluations and
checkpoints) and seconds per epoch, and the git commit of the code. The table averages the study's
seeds only, and marks with ‡ a row whose config.yaml differs from what the study file gives now. `--set`
changes every row (for a quick smoke run); such rows record it and the table marks them.
"""
import json
import math
import statistics
import sys
import time
from pathlib import Path

import yaml

from diagssm.train import config as config_mod

RESULT = "result.json"
DEFAULT_RUNS_DIR = "runs/study"


class Study:
    """A parsed study file (module docstring)."""

    def __init__(self, path):
        self.path = Path(path)
        data = _read_yaml(self.path)
        allowed = ("study", "seeds", "models", "config", "set", "extra_tests")
        unknown = set(data) - set(allowed)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
        for key in ("study", "seeds", "models", "config"):
            if key not in data:
                raise ValueError(f"{path}: missing key {key!r}")
        self.name, self.seeds = str(data["study"]), data["seeds"]
        if not (isinstance(self.seeds, list) and self.seeds and len(set(self.seeds)) == len(self.seeds)
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds)):
            raise ValueError(f"{path}: seeds={self.seeds!r} must be a non-empty list of distinct ints >= 0")
        base = data["config"]
        self.base = _read_yaml(self.path.parent / base, "config") if isinstance(base, str) else base
        if not isinstance(self.base, dict):
            raise ValueError(f"{path}: config must be a training config file or a mapping")
        self.common = [f"{key}={json.dumps(value)}" for key, value in _mapping(data.get("set"), path, "set").items()]
        self.extra_tests = _mapping(data.get("extra_tests"), path, "extra_tests")
        for name, spec in self.extra_tests.items():
            if not (isinstance(spec, dict) and not set(spec) - {"rate", "set"} and isinstance(spec.get("rate", 1.0),
                    (int, float)) and spec.get("rate", 1.0) > 0 and isinstance(spec.get("set") or {}, dict)):
                raise ValueError(f"{path}: extra_tests.{name} must be {{rate: r > 0, set: {{dotted key: value}}}}")
        models = data["models"]
        self.models = _read_yaml(self.path.parent / models, "models") if isinstance(models, str) else models
        if not isinstance(self.models, dict) or not self.models or \
                not all(isinstance(v, dict) or v is None for v in self.models.values()):
            raise ValueError(f"{path}: models must name a mapping of variants (name: {{dotted key: value}})")
        for name in self.models:
            try:  # every variant must give a valid config, with each extra test's settings too
                self.config(name)
                for test, spec in self.extra_tests.items():
                    self.config(name, extra=self.extra_sets(test))
            except ValueError as e:
                raise ValueError(f"{path}: model {name!r}: {e}") from None

    def extra_sets(self, test):
        """The --set strings of extra test `test`."""
        return [f"{k}={json.dumps(v)}" for k, v in (self.extra_tests[test].get("set") or {}).items()]

    def overrides(self, model):
        """The variant's settings as --set strings (JSON values are YAML)."""
        if model not in self.models:
            raise ValueError(f"model {model!r} is not in study {self.name!r}; known: {', '.join(self.models)}")
        return [f"{key}={json.dumps(value)}" for key, value in (self.models[model] or {}).items()]

    def config(self, model, seed=None, extra=()):
        """The TrainConfig of row (model, seed) with `extra` --set strings applied last."""
        data = json.loads(json.dumps(self.base))  # a deep copy
        sets = self.common + self.overrides(model) + ([f"run.seed={seed}"] if seed is not None else []) + list(extra)
        return config_mod.from_dict(config_mod.apply_overrides(data, sets))

    def run_dir(self, runs_dir, model, seed):
        return Path(runs_dir) / self.name / model / f"seed{seed}"

    def select(self, models=None, seeds=None):
        """The (model, seed) rows picked by comma-separated --models / --seeds (default: all)."""
        names = self.models if not models else models.split(",")
        picked = self.seeds if not seeds else [int(s) for s in seeds.split(",")]
        for name in names:
            self.overrides(name)  # unknown names are errors before any work
        return [(m, s) for m in names for s in picked]


def _read_yaml(path, what="study"):
    try:
        with open(path) as f:
            data = config_mod.read_yaml(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what} file") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


def _mapping(value, path, key):
    """`value` of study key `key`: a mapping, or {} when absent."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {key} must be a mapping; got {type(value).__name__}")
    return value


def count_parameters(cfg):
    """Parameters of the model of `cfg` (builds the task for its input and output sizes)."""
    from diagssm.train.setup import make_model, make_task

    return sum(p.numel() for p in make_model(cfg.model, make_task(cfg)).parameters())


MAX_PARAMETER_SPREAD = 10.0  # percent: issue #8's "parameter counts within 10% of each other"


def parameter_spread(counts):
    """How far, in percent, the largest of the parameter counts (a dict or list) is above the smallest."""
    values = list(counts.values()) if isinstance(counts, dict) else list(counts)
    return 100 * (max(values) / min(values) - 1)


def train_row(study, runs_dir, model, seed, extra=()):
    """Train (or resume, or skip) row (model, seed); return the exit code (0: the row has its
    result; 128 + n: stopped by signal n, with a checkpoint to resume from)."""
    from diagssm.train.loop import Trainer

    run_dir = study.run_dir(runs_dir, model, seed)
    if (run_dir / RESULT).exists():
        print(f"[{study.name}] {model} seed {seed}: done before ({run_dir / RESULT})")
        changed = config_changes(study, run_dir, model, seed, extra)
        if isinstance(changed, Exception):  # a row of an older config format: the note is not worth failing
            print(f"[{study.name}] {model} seed {seed}: its config.yaml was not compared ({changed})")
        elif changed:  # kept, but say so: a --set that differs from the finished row's does not rerun it
            print(f"[{study.name}] {model} seed {seed}: note: it ran with other settings than asked now ("
                  + "; ".join(f"{k}: {old!r}, now {new!r}" for k, (old, new) in changed.items())
                  + "); kept as it is: use another --runs-dir (or delete the row) to rerun it")
        return 0
    started = (run_dir / "config.yaml").exists()  # a row stopped before its first checkpoint restarts
    resume = started and any((run_dir / "checkpoints").glob("step_*.pt"))
    cfg = study.config(model, seed, extra)
    print(f"[{study.name}] {model} seed {seed}: {'resuming' if resume else 'training'} in {run_dir}")
    trainer = Trainer(cfg, run_dir, resume=started)  # resuming with no checkpoint starts at step 0
    try:
        outcome = trainer.run()
    finally:
        trainer.close()
    if outcome.status != "completed":
        return outcome.exit_code
    write_result(study, trainer, model, seed, extra)
    return 0


def write_result(study, trainer, model, seed, extra):
    """Evaluate the best checkpoint on the test split and write result.json atomically."""
    from diagssm.files import atomic_write_text
    from diagssm.train.data import eval_loader
    from diagssm.train.objective import evaluate

    cfg, task = trainer.cfg, trainer.task
    best = trainer.ckpts.resolve("best")[1]
    trainer.model.load_state_dict(best["model"])
    loader = eval_loader(task.test, task, cfg.optim.batch_size, trainer.world)
    test = evaluate(trainer.model, loader, task, trainer.world)
    steps_per_epoch = trainer.sampler.steps_per_epoch
    result = {"study": study.name, "model": model, "seed": seed, "metric": task.metric,
              "test": test["metric"], "val": trainer.best["metric"] if trainer.best else None,
              "best_step": best["step"], "params": sum(p.numel() for p in trainer.model.parameters()),
              "steps": trainer.step, "seconds": trainer.elapsed_now(),
              "seconds_per_epoch": trainer.elapsed_now() / trainer.step * steps_per_epoch,
              "overrides": list(extra), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": code_commit(),
              "extra_tests": extra_tests(study, trainer, model, seed, extra)}
    atomic_write_text(json.dumps(result, indent=1) + "\n", trainer.run_dir / RESULT)
    print(f"[{study.name}] {model} seed {seed}: test {task.metric} {test['metric']:.4f} "
          f"(best val {result['val']:.4f} at step {best['step']})")
    return result


def code_commit():
    """The git commit of the code that ran (with "+changes" when its tree had uncommitted changes), or
    None outside a git checkout: a change of code, such as a new initialisation, leaves the config alone."""
    import subprocess

    here = Path(__file__).parent
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", Path(__file__).name], cwd=here,
                                 capture_output=True, text=True, timeout=10)  # this package's repository, not
        if tracked.returncode != 0:  # one that an installed copy merely sits in (a venv inside a project)
            return None
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "."], cwd=here.parent,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def extra_tests(study, trainer, model, seed, extra):
    """{name: test metric} of the (best) model on each of the study's extra test sets: the task
    rebuilt with that test's settings, every SSM step size scaled by its rate."""
    from diagssm.train.data import eval_loader
    from diagssm.train.objective import evaluate
    from diagssm.train.setup import make_task

    out = {}
    for name, spec in study.extra_tests.items():
        cfg = study.config(model, seed, list(extra) + study.extra_sets(name))
        task = make_task(cfg)
        loader = eval_loader(task.test, task, cfg.optim.batch_size, trainer.world)
        rate = float(spec.get("rate", 1.0))
        out[name] = evaluate(trainer.model, loader, task, trainer.world, rate=rate)["metric"]
        print(f"[{study.name}] {model} seed {seed}: {name} (rate {rate:g}) test {task.metric} {out[name]:.4f}")
    return out


def results(study, runs_dir):
    """{model: [result dicts of finished seeds]} for every model of the study: the study's seeds only
    (other seed folders, or copies of one, are not averaged in); each dict's "stale" says whether the
    row's config.yaml differs from the config the study file gives it now."""
    found = {}
    for model in study.models:
        rows = []
        for seed in study.seeds:
            folder = study.run_dir(runs_dir, model, seed)
            if (folder / RESULT).exists():
                row = json.loads((folder / RESULT).read_text())
                row["stale"] = config_changes(study, folder, model, seed, row.get("overrides", [])) != {}
                rows.append(row)
        found[model] = rows
    return found


def config_changes(study, folder, model, seed, extra):
    """{dotted key: (the row's value, the study file's now)} between the row's config.yaml in `folder`
    and the config the study gives row (model, seed) with `extra` --set strings; the error instead
    when config.yaml does not load (an older format)."""
    try:
        return config_mod.diff(config_mod.load(folder / "config.yaml"), study.config(model, seed, extra))
    except (ValueError, FileNotFoundError) as e:
        return e


def spread(values):
    """(mean, sample standard deviation or nan for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def percent_scale(metric):
    """100 for accuracy (tables show %), 1 for other metrics."""
    return 100.0 if metric == "accuracy" else 1.0


def override_mark(rows):
    """'*' when any of `rows` was trained with --set overrides; '‡' when any ran another config than
    the study file gives now (an edited study or training config)."""
    return "*" * any(r["overrides"] for r in rows) + "‡" * any(r.get("stale") for r in rows)


def mean_std_text(values):
    """'mean ± std' to two decimals ('mean' alone for a single value)."""
    mean, std = spread(values)
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def table(studies, runs_dir):
    """A markdown table: per study and model, test metric mean +- std over seeds, seeds, best
    val, parameters, seconds per epoch. Rows trained with --set overrides are marked *."""
    lines = ["| task | model | test (mean ± std) | seeds | val (mean) | params | s / epoch |",
             "|---|---|---|---|---|---|---|"]
    for study in studies:
        for model, rows in results(study, runs_dir).items():
            if not rows:
                lines.append(f"| {study.name} | {model} | not run | 0 | | | |")
                continue
            scale = percent_scale(rows[0]["metric"])
            test = mean_std_text([r["test"] * scale for r in rows])
            val = statistics.fmean(r["val"] * scale for r in rows)
            mark = override_mark(rows)
            lines.append(f"| {study.name} | {model}{mark} | {test} | {len(rows)} | {val:.2f} | "
                         f"{rows[0]['params']:,} | {statistics.fmean(r['seconds_per_epoch'] for r in rows):.1f} |")
            for name in study.extra_tests:
                values = [r["extra_tests"][name] * scale for r in rows if name in r.get("extra_tests", {})]
                if values:
                    lines.append(f"| {study.name} | {model}{mark}, test {name} | {mean_std_text(values)} | "
                                 f"{len(values)} | | | |")
    return with_mark_note(lines)


def with_mark_note(lines):
    """The table's lines joined, and notes saying what * and ‡ mark when a row has them (past the header)."""
    notes = [note for mark, note in (("*", "\\* trained with --set overrides (each row's result.json lists them)"),
                                      ("‡", "‡ its config.yaml differs from the config the study file gives it now "
                                            "(`diagssm study run` on it names the settings)"))
             if any(mark in line for line in lines[2:])]
    return "\n".join(lines + ["\n" + "\n".join(notes)] * bool(notes))


def seed_table(studies, runs_dir):
    """A markdown table with one line per finished (model, seed): test and best val metric, the
    step of the best checkpoint and the steps trained (rows trained with --set marked *)."""
    lines = ["| task | model | seed | test | val (best) | best step / steps |", "|---|---|---|---|---|---|"]
    for study in studies:
        for model, rows in results(study, runs_dir).items():
            for r in rows:
                scale = percent_scale(r["metric"])
                val = "" if r["val"] is None else f"{r['val'] * scale:.2f}"
                lines.append(f"| {study.name} | {model}{override_mark([r])} | {r['seed']} | {r['test'] * scale:.2f} "
                             f"| {val} | {r['best_step']} / {r['steps']} |")
    return with_mark_note(lines)


def rerun_options(args):
    """The --runs-dir (where not the default) and --set options of `args`, as they would be typed."""
    runs = f" --runs-dir {args.runs_dir}" if str(args.runs_dir) != DEFAULT_RUNS_DIR else ""
    return runs + "".join(f" --set {item}" for item in args.set)


def cmd_study(args):
    if args.study_command == "table":
        make = seed_table if args.per_seed else table
        text = make([Study(p) for p in args.studies], args.runs_dir)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
            print(f"saved {args.out}")
        return 0
    study = Study(args.studies[0]) if len(args.studies) == 1 else None
    if study is None:
        raise ValueError(f"diagssm study {args.study_command} takes one study file, got {len(args.studies)}")
    rows = study.select(args.models, args.seeds)
    if args.study_command == "list":
        counts = {}
        for model in dict.fromkeys(m for m, _ in rows):
            counts[model] = count_parameters(study.config(model, extra=args.set))
            print(f"{model:<14} {counts[model]:>9,} parameters   diagssm study run {study.path} --models {model}"
                  + rerun_options(args))
        low, high, above = min(counts.values()), max(counts.values()), parameter_spread(counts)
        print(f"parameter counts from {low:,} to {high:,}: the largest is {above:.1f}% above the smallest")
        if above > MAX_PARAMETER_SPREAD:
            print(f"warning: more than the {MAX_PARAMETER_SPREAD:.0f}% a like-for-like comparison allows; change "
                  f"the state sizes or layer settings of {study.path}", file=sys.stderr)
        return 0
    from diagssm.train.checkpoint import CheckpointError
    from diagssm.train.loop import TrainingDiverged

    failed = []
    for model, seed in rows:
        try:
            code = train_row(study, args.runs_dir, model, seed, args.set)
        except (TrainingDiverged, CheckpointError, ValueError, OSError) as e:  # this row's failure: go on
            print(f"[{study.name}] {model} seed {seed}: failed: {e}", file=sys.stderr)
            failed.append(f"{model} seed {seed}")
            continue
        if code:  # stopped by a signal: every row stops (each resumes from its checkpoint)
            return code
    if failed:
        print(f"diagssm study run: {len(failed)} of {len(rows)} rows failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def add_study(sub):
    p = sub.add_parser("study", help="train and tabulate a model comparison (configs/study/)",
                       description=__doc__.split("\n\n")[0])
    q = p.add_subparsers(dest="study_command", required=True, help="run, list or table")
    for name, text in (("run", "train every (model, seed) row; resumes and skips finished rows"),
                       ("list", "the rows, their parameter counts and commands"),
                       ("table", "the results table (markdown) of one or more studies")):
        r = q.add_parser(name, help=text, description=text)
        r.add_argument("studies", nargs="+", help="study file(s), e.g. configs/study/sfashion.yaml")
        r.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help=f"where the runs are (default {DEFAULT_RUNS_DIR})")
        if name != "table":
            r.add_argument("--models", help="comma-separated variant names (default: all)")
            r.add_argument("--seeds", help="comma-separated seeds (default: the study's)")
            r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="change a setting of every row (marks them in the table)")
        else:
            r.add_argument("--out", help="also write the table to this file")
            r.add_argument("--per-seed", action="store_true",
                           help="one line per (model, seed) with the best checkpoint's step")
    p.set_defaults(run=cmd_study)
