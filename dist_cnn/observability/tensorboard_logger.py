"""TensorBoard event files, on rank 0 only: `--tensorboard` writes into `<run_dir>/tensorboard/`.

The same numbers as the W&B logger at the same global steps (train/<field>, test/accuracy,
test/per_class_accuracy/<class>, ...) plus the confusion matrix as an image. A resumed run opens a
new event file in the same folder with purge_step = the checkpoint's step + 1, so TensorBoard drops
whatever the interrupted attempt logged after that checkpoint and the curves continue at increasing
steps. Like W&B, a failing writer never stops training: one line, then logging is off. (The
tensorboard package is an optional extra; config validation refuses --tensorboard without it.)
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from dist_cnn.errors import one_line
from dist_cnn.observability.format import class_names, is_number
from dist_cnn.observability.rank_times import rank_scalars
from dist_cnn.observability.report import plot_confusion

log = logging.getLogger(__name__)


class TensorBoardLogger:
    """log_train / log_eval / finish, as WandbLogger. A no-op unless enabled (rank 0 with --tensorboard)."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None):
        self._writer = None
        self.log_dir = Path(run_dir) / "tensorboard"
        if not enabled:
            return
        try:  # the writer's own thread would fail later, with a traceback of its own
            self.log_dir.mkdir(parents=True, exist_ok=True)
            tempfile.NamedTemporaryFile(dir=self.log_dir, prefix=".probe", suffix=".tmp").close()
        except OSError as e:
            log.warning(
                f"tensorboard: cannot write {self.log_dir} ({e.strerror or one_line(e)}); TensorBoard logging disabled"
            )
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(str(self.log_dir), purge_step=purge, flush_secs=10)
        except Exception as e:
            log.warning(f"tensorboard: cannot write {self.log_dir} ({one_line(e)}); TensorBoard logging disabled")

    @property
    def active(self) -> bool:
        return self._writer is not None

    def _safely(self, fn) -> None:
        if self._writer is None:
            return
        try:
            fn(self._writer)
        except Exception as e:  # never let monitoring stop training
            log.warning(f"tensorboard: write failed ({one_line(e)}); TensorBoard logging off for the rest of the run")
            self._close()

    def log_train(self, record: dict) -> None:
        """train/<field> for every number of a metrics.jsonl train event but step and time, and
        rank/<r>/<part>_ms for every rank's time accounting."""

        def write(w):
            for k, v in record.items():
                if is_number(v) and k not in ("step", "time"):
                    w.add_scalar(f"train/{k}", v, record["step"])
            for k, v in rank_scalars(record).items():
                w.add_scalar(k, v, record["step"])
            w.flush()  # on disk at once, as metrics.jsonl: a crash loses no logged step

        self._safely(write)

    def log_eval(self, record: dict, classes: list[str]) -> None:
        """test/accuracy, test/correct, test/total, test/epoch, train_seconds,
        test/per_class_accuracy/<class> and the confusion matrix image test/confusion_matrix."""

        def write(w):
            step = record["step"]
            w.add_scalar("test/accuracy", record["test_accuracy"], step)
            for k in ("test_correct", "test_total", "epoch"):
                if is_number(record.get(k)):
                    w.add_scalar(f"test/{k.removeprefix('test_')}", record[k], step)
            if is_number(record.get("train_seconds")):
                w.add_scalar("train_seconds", record["train_seconds"], step)
            per_class = record.get("per_class_accuracy") or []
            for name, acc in zip(class_names(classes, len(per_class)), per_class):
                if is_number(acc):  # a class without test images has no accuracy
                    w.add_scalar(f"test/per_class_accuracy/{name}", acc, step)
            matrix = record.get("confusion_matrix")
            if matrix:
                w.add_image(
                    "test/confusion_matrix",
                    _confusion_image(matrix, class_names(classes, len(matrix)), record.get("epoch")),
                    step,
                )
            w.flush()

        self._safely(write)

    def finish(self, summary: dict | None = None) -> None:
        """The summary as a text (JSON) at the last step, then flush and close. Safe to call twice."""
        if summary:
            step = int(summary.get("steps", 0) or 0)
            self._safely(lambda w: w.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```", step))
        self._close()

    def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass


def _confusion_image(matrix, names, epoch):
    """The report's confusion-matrix plot as a uint8 [3, H, W] tensor."""
    from torchvision.io import ImageReadMode, decode_png, read_file

    with tempfile.TemporaryDirectory() as d:
        path = plot_confusion(matrix, names, Path(d) / "confusion.png", f"confusion matrix, epoch {epoch}")
        return decode_png(read_file(str(path)), mode=ImageReadMode.RGB)
