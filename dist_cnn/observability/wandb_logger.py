"""Weights & Biases logging, on rank 0 only.

Other ranks (and `--wandb disabled`) get an instance that does nothing and never imports wandb, so
no wandb files, processes or output appear there.  W&B must never take a training run down: a failed
`wandb.init` (no network, bad credentials, timeout) or a failed `log` is reported in one line and the
run continues (falling back to offline when online init fails, else with W&B logging off).

Files go under the run directory: `<run_dir>/wandb/offline-run-<time>-<id>/` (or `run-...` online).
Each `wandb.init` writes its own directory; a resumed run (same id, passed back from the checkpoint)
is a second directory with the same id, and `wandb sync <run_dir>/wandb` uploads them all.
Steps are the trainer's global optimizer step, so they keep increasing across resumes.

The API key is never read into anything logged: the config logged is the run config dict only,
credentials are only looked up to decide `auto` (presence, never the value).
"""

from __future__ import annotations

import configparser
import logging
import netrc
import os
import secrets
import string
import threading
from pathlib import Path
from urllib.parse import urlsplit

from dist_cnn.config import LogConfig
from dist_cnn.errors import one_line
from dist_cnn.observability.format import class_names, is_number
from dist_cnn.observability.rank_times import rank_scalars

log = logging.getLogger(__name__)

INIT_TIMEOUT_S = 30.0  # wandb's default is 90 s; online init without network fails after this
TEARDOWN_TIMEOUT_S = 15.0  # after a failed online init, before the offline fallback
_DEFAULT_HOSTS = ("api.wandb.ai",)
SYNC_HINT = "wandb sync {dir}"


def _wandb_default_host() -> str | None:
    """The default server of the installed wandb (lazily; None if that module moved)."""
    try:
        from wandb.sdk.lib import urls  # small module; wandb itself is imported anyway when used

        return urlsplit(urls.DEFAULT_BASE_URL).netloc or None
    except Exception:
        return None


def _settings_file() -> Path:
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or str(Path("~/.config/wandb").expanduser())
    return Path(config_dir) / "settings"


def _read_settings() -> dict:
    """[default] section of wandb's global settings file, if any (never raises)."""
    parser = configparser.ConfigParser()
    try:
        parser.read(_settings_file())
        return dict(parser["default"]) if parser.has_section("default") else {}
    except Exception:
        return {}


def _netrc_path() -> Path:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        p = Path(name).expanduser()
        if p.exists():
            return p
    return Path("~/.netrc").expanduser()


def has_credentials() -> bool:
    """Whether W&B credentials are available: env, ~/.netrc entry for the W&B host, or settings.

    Only presence is checked; the key itself is never returned, printed or stored.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    settings = _read_settings()
    if settings.get("api_key"):
        return True
    hosts = set(_DEFAULT_HOSTS)
    for url in (os.environ.get("WANDB_BASE_URL"), settings.get("base_url")):
        if url and urlsplit(url).netloc:
            hosts.add(urlsplit(url).netloc)
    if not os.environ.get("WANDB_BASE_URL") and not settings.get("base_url"):
        host = _wandb_default_host()
        if host:
            hosts.add(host)
    try:
        entries = netrc.netrc(_netrc_path())
    except Exception:  # no file, unreadable, or unparsable: no credentials from it
        return False
    for host in hosts:
        auth = entries.authenticators(host)
        if auth and auth[2]:
            return True
    return False


def resolve_mode(mode: str, run_dir: Path | str | None = None) -> tuple[str, str | None]:
    """'auto' -> 'online' with credentials, else 'offline' plus a one-line note on syncing later
    (WANDB_MODE=offline/disabled or WANDB_DISABLED=true in the environment still win under 'auto').

    'online' without credentials also goes offline (with a note) rather than prompting for a key.
    Returns (mode, message or None).
    """
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"unknown wandb mode {mode!r}")
    if mode in ("offline", "disabled"):
        return mode, None
    where = Path(run_dir) / "wandb" if run_dir is not None else "<run dir>/wandb"
    if mode == "auto":  # a job script's WANDB_MODE / WANDB_DISABLED still count under 'auto'
        env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if env_mode == "disabled" or os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1"):
            return "disabled", None
        if env_mode in ("offline", "dryrun"):
            return (
                "offline",
                f"wandb: offline (WANDB_MODE={env_mode}); upload later with: {SYNC_HINT.format(dir=where)}",
            )
    if has_credentials():
        return "online", None
    why = "no W&B credentials found" + (" for --wandb online" if mode == "online" else "")
    return "offline", (
        f"wandb: {why} (set WANDB_API_KEY or run `wandb login`): logging offline; "
        f"upload later with: {SYNC_HINT.format(dir=where)}"
    )


def _call_with_timeout(fn, timeout: float) -> bool:
    """Run fn in a daemon thread; True if it returned (raising counts) within timeout seconds."""

    def target():
        try:
            fn()
        except Exception:
            pass

    thread = threading.Thread(target=target, name="wandb-teardown", daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def new_run_id() -> str:
    """A W&B-style run id: 8 random lowercase letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


# W&B's own places, moved under <run dir>/wandb unless the user set them: clusters often give home
# directories small quotas. WANDB_CONFIG_DIR stays: it holds the user's W&B settings (host, entity).
RUN_DIR_PLACES = {"WANDB_CACHE_DIR": ".cache", "WANDB_DATA_DIR": ".data", "WANDB_ARTIFACT_DIR": ".artifacts"}
_OURS: set[str] = set()  # the variables set here (a user's own are never touched)


def keep_files_in_run_dir(run_dir: Path, environ=os.environ) -> None:
    for var, sub in RUN_DIR_PLACES.items():
        if var in _OURS or not environ.get(var):
            environ[var] = str((Path(run_dir) / "wandb" / sub).resolve())
            _OURS.add(var)


class WandbLogger:
    """Thin W&B run wrapper: log_train / log_eval / finish. A no-op unless enabled and not disabled."""

    def __init__(
        self,
        cfg_log: LogConfig,
        run_dir: Path,
        config: dict,
        run_id: str | None = None,
        enabled: bool = True,
    ):
        self._run = None
        self._wandb = None
        self.run_dir = Path(run_dir)
        self.run_id: str | None = None
        self.mode = "disabled"
        if not enabled or cfg_log.wandb == "disabled":
            return
        # wandb prints banners and "Loaded credentials" lines unless silenced; a user can set
        # WANDB_SILENT=false to see them again.
        os.environ.setdefault("WANDB_SILENT", "true")
        mode, message = resolve_mode(cfg_log.wandb, self.run_dir)
        if message:
            log.info(message)
        if mode == "disabled":
            return
        try:
            import wandb
        except Exception as e:  # broken install: training goes on
            log.warning(f"wandb: cannot import wandb ({one_line(e)}); W&B logging disabled")
            return
        self._wandb = wandb
        self.run_dir.mkdir(parents=True, exist_ok=True)
        keep_files_in_run_dir(self.run_dir)
        # A fresh run gets its id here rather than from wandb, so that an offline fallback after a
        # failed online init keeps the same id (and `wandb sync` later fills that run).
        init = dict(
            project=cfg_log.wandb_project or None,
            entity=cfg_log.wandb_entity or None,
            name=cfg_log.run_name or None,
            group=cfg_log.wandb_group or None,
            tags=list(cfg_log.wandb_tags) or None,
            config=dict(config),
            id=run_id or new_run_id(),
            resume="allow" if run_id else None,
            dir=str(self.run_dir),
        )
        self._run = self._init(init, mode)
        if self._run is None and mode == "online":
            where = self.run_dir / "wandb"
            log.info(f"wandb: logging offline instead; upload later with: {SYNC_HINT.format(dir=where)}")
            # wandb-core keeps the failed run's id busy until its service is torn down; should the
            # teardown itself hang (a black-holed network), go on with a fresh id instead.
            if not _call_with_timeout(wandb.teardown, TEARDOWN_TIMEOUT_S):
                init["id"] = new_run_id()
            self._run = self._init(init, "offline")
        if self._run is None:
            log.info("wandb: W&B logging disabled for this run")
            return
        self.run_id = self._run.id

    def _init(self, init: dict, mode: str):
        wandb = self._wandb
        try:
            settings = wandb.Settings(
                silent=True,
                quiet=True,
                console="off",
                init_timeout=INIT_TIMEOUT_S,
                reinit="finish_previous",
            )
            run = wandb.init(mode=mode, settings=settings, **init)
        except Exception as e:
            log.warning(f"wandb: init ({mode}) failed: {one_line(e)}")
            return None
        self.mode = mode
        return run

    @property
    def active(self) -> bool:
        return self._run is not None

    def _safe_log(self, data: dict, step: int) -> None:
        try:
            self._run.log(data, step=int(step))
        except Exception as e:  # never let monitoring stop training
            log.warning(f"wandb: log failed ({one_line(e)}); W&B logging disabled for the rest of the run")
            self._close_quietly()

    def log_train(self, record: dict) -> None:
        """A metrics.jsonl train event -> train/<field> (every number but step and time; so
        train/epoch is 0-based, as in metrics.jsonl) and rank/<r>/<part>_ms (the per-rank lists,
        rank_times) at the record's global step."""
        if self._run is None:
            return
        data = {f"train/{k}": v for k, v in record.items() if is_number(v) and k not in ("step", "time")}
        data.update(rank_scalars(record))  # every rank's time accounting: rank/<r>/data_wait_ms, ...
        self._safe_log(data, record["step"])

    def log_eval(self, record: dict, classes: list[str]) -> None:
        """An eval event -> test/accuracy, test/correct, test/total, test/epoch, train_seconds,
        test/per_class_accuracy/<class> and test/confusion_matrix, at the record's global step (the
        same step as the epoch's last train record: wandb merges them into one history row).

        The confusion matrix is logged as wandb's own confusion-matrix chart (the vega preset
        `wandb/confusion_matrix/v1` over a wandb.Table of Actual/Predicted/nPredictions), built from
        the counts directly since wandb.plot.confusion_matrix wants per-sample predictions.
        It works offline (a table file plus a chart spec) and is viewable after `wandb sync`.
        """
        if self._run is None:
            return
        data: dict = {"test/accuracy": record["test_accuracy"]}
        for k in ("test_correct", "test_total", "epoch"):  # test/epoch = epochs completed (1-based)
            if is_number(record.get(k)):
                data[f"test/{k.removeprefix('test_')}"] = record[k]
        if is_number(record.get("train_seconds")):
            data["train_seconds"] = record["train_seconds"]
        if is_number(record.get("ema_test_accuracy")):  # --model-ema: the average's score beside the model's
            data["test/ema_accuracy"] = record["ema_test_accuracy"]
        per_class = record.get("per_class_accuracy") or []
        names = class_names(classes, len(per_class))
        for name, acc in zip(names, per_class):
            if is_number(acc):  # a class without test images has no accuracy
                data[f"test/per_class_accuracy/{name}"] = acc
        matrix = record.get("confusion_matrix")
        if matrix:
            chart = self._confusion_chart(matrix, class_names(classes, len(matrix)))
            if chart is not None:
                data["test/confusion_matrix"] = chart
        self._safe_log(data, record["step"])

    def _confusion_chart(self, matrix, names):
        wandb = self._wandb
        n = len(matrix)
        # zeros are kept for small matrices (a full grid); large ones keep nonzero cells only
        rows = [[names[i], names[j], int(c)] for i, row in enumerate(matrix) for j, c in enumerate(row) if c or n <= 20]
        if len(rows) > wandb.Table.MAX_ROWS:
            return None
        try:
            table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=rows)
            return wandb.plot_table(
                "wandb/confusion_matrix/v1",
                table,
                {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                {"title": "Test confusion matrix"},
            )
        except Exception as e:
            log.warning(f"wandb: confusion matrix not logged ({one_line(e)})")
            return None

    def finish(self, summary: dict | None = None) -> None:
        """run.summary.update(summary); run.finish(); then wait until wandb has written (offline) or
        uploaded (online) everything, so the files are complete when this returns, e.g. before a
        SLURM requeue's grace period runs out (run.finish() alone returns before wandb-core has
        flushed the offline .wandb file). Safe to call twice or when inactive."""
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            if summary:
                run.summary.update(dict(summary))
            run.finish()
            self._wandb.teardown()
        except Exception as e:
            log.warning(f"wandb: finish failed ({one_line(e)})")

    def _close_quietly(self) -> None:
        run, self._run = self._run, None
        try:
            run.finish()
        except Exception:
            pass
