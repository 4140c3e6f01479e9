"""The output folder of a run: its config, the checkpoints and the `last` pointer, and metrics.csv."""

from __future__ import annotations

import csv
import json
import logging
import math
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from serval.atomic import atomic_write_text, replace_dir
from serval.model import SERModel
from serval.train.checkpoint import (
    OLD_TRAINER_STATE,
    TRAINER_STATE,
    old_format_message,
    rng_state,
    save_model,
    save_trainer_state,
)
from serval.train.config import TrainConfig
from serval.train.ddp import Dist, barrier, gather_objects

log = logging.getLogger("serval.train")


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder in `parent` to build a checkpoint in before it is renamed into place.

    Made with a plain mkdir so its mode follows the umask like the run's other folders
    (`tempfile.mkdtemp` makes it 0700, and the rename keeps that mode).
    """
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@dataclass
class RunState:
    """Where a run stands: steps, epochs, the batch within the epoch, the best checkpoints, stopping."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # global batches of `epoch` already done
    best: list = field(default_factory=list)  # [dev_loss, checkpoint name, epoch], best first
    best_loss: float = math.inf
    bad_epochs: int = 0
    stopped: bool = False


class Run:
    """The output folder: config, metrics, checkpoints, the pointer to the last one, the final model."""

    VOLATILE = ("resume", "progress", "log_every", "tensorboard", "device", "threads", "data.num_workers")

    def __init__(self, cfg: TrainConfig, dist: Dist):
        self.cfg, self.dist, self.out = cfg, dist, Path(cfg.out_dir)
        self.ckpts = self.out / "checkpoints"
        self.training_data: dict | None = None  # written into every saved model (serval.training_data)

    def _comparable(self, d: dict) -> dict:
        d = json.loads(json.dumps(d))
        for key in self.VOLATILE:
            *parents, leaf = key.split(".")
            node = d
            for p in parents:
                node = node.get(p, {})
            node.pop(leaf, None)
        return d

    def last_checkpoint(self) -> Path | None:
        """The checkpoint `last` points at, when it holds a trainer state; ValueError for a pickled one."""
        pointer = self.out / "last"
        if not pointer.is_file():
            return None
        path = self.out / pointer.read_text().strip()
        if not (path / TRAINER_STATE).is_file() and (path / OLD_TRAINER_STATE).is_file():
            raise ValueError(old_format_message(path))
        return path if (path / TRAINER_STATE).is_file() else None

    def prepare(self, overwrite: bool = False) -> Path | None:
        """Check the folder may be used, or with `overwrite` clear the run in it; returns the checkpoint
        to resume from, if any. The errors name the folder and say what a rerun can do about it."""
        cfg = self.cfg
        saved = self.out / "config.yaml"
        if self.out.exists() and any(self.out.iterdir()):
            if not saved.is_file():
                raise ValueError(
                    f"{self.out}: output folder is not empty and holds no serval run (no config.yaml); "
                    "choose another out_dir (--overwrite deletes only a serval run)"
                )
            if overwrite:
                self.clear()
            else:
                self._check_rerun(saved)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(saved, yaml.safe_dump(cfg.to_dict(), sort_keys=False), overwrite=True)
        return self.last_checkpoint() if saved.is_file() else None

    def _check_rerun(self, saved: Path) -> None:
        """ValueError when the run in the folder may not be continued by this config as it stands."""
        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(
                f"{saved}: not readable ({e}); pass --overwrite to start the run again"
            ) from None
        last = self.last_checkpoint()
        state = f"last checkpoint {last.name}" if last else "no checkpoint yet"
        if self.cfg.resume == "never":
            raise ValueError(
                f"{self.out}: holds a run already ({state}; resume: never); pass --overwrite to delete it "
                "and start again, or choose another out_dir"
            )
        changed = _differences(self._comparable(old), self._comparable(self.cfg.to_dict()))
        if self.cfg.resume == "auto" and changed:
            shown = ", ".join(changed[:6]) + (" …" if len(changed) > 6 else "")
            raise ValueError(
                f"{self.out}: holds a run with a different config ({state}; differs in {shown}); pass "
                "--resume (resume: force) to continue it with this config, or --overwrite to delete it "
                "and start again"
            )

    def clear(self) -> None:
        """Delete the run in the folder (config, checkpoints, best/, metrics); an encoder cache in it stays."""
        cache = Path(self.cfg.cache.dir) if self.cfg.cache.dir else self.out / "cache"
        for entry in self.out.iterdir():
            if entry.resolve() == cache.resolve():
                continue  # keyed by what was encoded: still valid, and costly to rebuild
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        log.info("%s: the previous run deleted (--overwrite)", self.out)

    def save(self, model: SERModel, state: RunState, trainer_state: dict) -> Path:
        """Write checkpoint step-XXXXXX atomically (temp dir, then rename) and point `last` at it."""
        name = f"step-{state.step:06d}"
        final = self.ckpts / name
        self.ckpts.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(self.ckpts, f".tmp-{name}-")
        save_model(model, tmp, self.training_data)
        save_trainer_state(trainer_state, tmp)
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        replace_dir(tmp, final)  # the same step can be saved again after a resume
        atomic_write_text(self.out / "last", f"checkpoints/{name}\n", overwrite=True)
        keep = {name} | {b[1] for b in state.best}
        for d in self.ckpts.iterdir():
            if d.name not in keep:  # superseded checkpoints and temp dirs of crashed saves
                shutil.rmtree(d, ignore_errors=True)
        return final

    def checkpoint(
        self, model: SERModel, optimizer, scheduler, state: RunState, steps_per_epoch: int
    ) -> None:
        """Save the run as it stands. Every rank calls this: each one's RNG states go into the checkpoint."""
        rngs = gather_objects(rng_state(), self.dist)
        if self.dist.main:
            trainer_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "run": asdict(state),
                "rng": rngs,
                "steps_per_epoch": steps_per_epoch,
            }
            path = self.save(model, state, trainer_state)
            log.info("checkpoint %s saved", path.name)
        barrier(self.dist)


class MetricsLog:
    """metrics.csv (one row per log interval and per evaluation) and TensorBoard when installed."""

    COLUMNS = ("step", "epoch", "split", "loss", "ce", "ccc", "uar", "lr_lora", "lr_head", "seconds")

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path, self.enabled, self.tb = out / "metrics.csv", enabled, None
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.path.is_file():  # drop rows past the checkpoint we resume from
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.COLUMNS)
            w.writeheader()
            w.writerows(rows)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, **row) -> None:
        """Append one row (missing columns stay empty) and mirror its figures to TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.COLUMNS).writerow({k: _fmt(row.get(k)) for k in self.COLUMNS})
        if self.tb is not None:
            for k in ("loss", "ce", "ccc", "uar", "lr_lora", "lr_head"):
                if row.get(k) is not None:
                    self.tb.add_scalar(f"{row['split']}/{k}", row[k], row["step"])
            self.tb.flush()

    def close(self) -> None:
        """Close the TensorBoard writer, if any."""
        if self.tb is not None:
            self.tb.close()


def _differences(a, b, prefix: str = "") -> list[str]:
    """The dotted names of the settings that differ between two config dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _fmt(v):
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
