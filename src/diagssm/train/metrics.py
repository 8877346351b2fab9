"""Where a run's numbers go: `metrics.csv` always, TensorBoard when chosen and importable.

metrics.csv has one row per logged point: step, epoch, split ("train" = the mean over the
steps since the previous train row; "val"), loss, metric (accuracy or mse, as the task says),
lr (optim.lr at the schedule's factor: the "decay" group's; the SSM group runs at ssm_lr times
the same factor), time (seconds of training so far, over resumes).
"""
import csv
import importlib
import os
from pathlib import Path

FIELDS = ("step", "epoch", "split", "loss", "metric", "lr", "time")


def find_tensorboard(mode):
    """(torch.utils.tensorboard or None, a sentence saying which) for run.tensorboard = auto | on | off.
    Call it before writing anything: "on" without TensorBoard is an error."""
    if mode == "off":
        return None, "TensorBoard: off (run.tensorboard=off)"
    try:
        module = importlib.import_module("torch.utils.tensorboard")
    except ImportError as e:
        if mode == "on":
            raise ValueError(f"run.tensorboard=on but torch.utils.tensorboard does not import ({e}); "
                             f"pip install tensorboard, or set run.tensorboard=auto or off") from e
        return None, f"TensorBoard: not used (torch.utils.tensorboard does not import: {e})"
    return module, "TensorBoard: logging to {log_dir}"


def read_rows(path):
    """The rows of a metrics.csv as dicts with numbers converted (an empty metric stays None)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: (row[k] if k == "split" else None if row[k] == "" else
                             int(row[k]) if k in ("step", "epoch") else float(row[k])) for k in FIELDS})
    return rows


class MetricsLog:
    """Appends rows to run_dir/metrics.csv (and TensorBoard scalars when `tensorboard`, the result
    of find_tensorboard, holds the module). `resume_step`: rows after that step (logged by an
    interrupted run after its last checkpoint) are dropped first."""

    def __init__(self, run_dir, tensorboard=(None, "TensorBoard: off"), resume_step=None):
        self.path = Path(run_dir) / "metrics.csv"
        if resume_step is not None and self.path.exists():
            self._truncate(resume_step)
        is_new = not self.path.exists() or self.path.stat().st_size == 0  # empty: stopped before a row
        self.file = open(self.path, "w" if is_new else "a", newline="")
        self.writer = csv.writer(self.file, lineterminator="\n")  # csv's default is \r\n
        if is_new:
            self.writer.writerow(FIELDS)
            self.file.flush()  # on disk before any row: a run stopped now leaves a readable file
        module, message = tensorboard  # from find_tensorboard
        log_dir = Path(run_dir) / "tensorboard"
        # a resume purges the events after its checkpoint's step, as the rows above
        purge = {} if resume_step is None else {"purge_step": resume_step + 1}
        self.tensorboard = None if module is None else module.SummaryWriter(str(log_dir), **purge)
        self.backend = message.format(log_dir=log_dir)

    def _truncate(self, step):
        """Keep the header and the rows up to `step`; a file without its header (written before the
        header was flushed at creation) gets it back."""
        with open(self.path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        body = rows[1:] if rows and rows[0] == list(FIELDS) else rows
        kept = [FIELDS] + [r for r in body if int(r[0]) <= step]
        tmp = self.path.with_name(".metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(kept)
        os.replace(tmp, self.path)

    def log(self, step, epoch, split, loss, metric, lr, time):
        self.writer.writerow([step, epoch, split, f"{loss:.6g}", f"{metric:.6g}", f"{lr:.6g}", f"{time:.2f}"])
        self.file.flush()
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(f"{split}/loss", loss, step)
            self.tensorboard.add_scalar(f"{split}/metric", metric, step)
            if split == "train":
                self.tensorboard.add_scalar("lr", lr, step)

    def close(self):
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class NoLog:
    """What a non-main process logs: nothing."""

    backend = "no logging on this rank"

    def log(self, *args):
        pass

    def close(self):
        pass
