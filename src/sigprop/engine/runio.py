"""Run folder I/O: atomic writes, checkpoints, metrics logs.

A run folder holds ``config.json`` (resolved config, seed, versions),
``checkpoint.pt`` (rewritten atomically after every epoch), ``metrics.jsonl`` and
``metrics.csv`` (one row per epoch, rewritten from the checkpointed history, so
they always agree with the checkpoint even after a crash).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import pickle
import platform
import secrets
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, StorageError

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CHECKPOINT_FORMAT = 1
RUN_FILES = (CONFIG, METRICS_JSONL, METRICS_CSV, CHECKPOINT)  # what a one-process run writes


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one,
    never a partial one: write a temp file in the same folder, fsync, rename. A write
    the system refuses (a full disk, no permission) is a StorageError naming the file;
    the old file, if any, is left as it was."""
    path = Path(path)
    # the name is known before the file exists, so a signal (Ctrl-C, SIGTERM raised as an
    # exception) arriving anywhere after its creation still finds it to remove
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o644)  # whatever the umask: run files are meant to be shared
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself is gone or unusable: nothing was left there
        if isinstance(err, OSError):
            raise StorageError(f"cannot write {path} ({write_failure(err)})") from None
        raise


def write_failure(err: OSError) -> str:
    """Why a write failed, in a few words a user can act on."""
    reason = err.strerror or type(err).__name__
    hint = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EACCES: "no permission to write there", errno.EPERM: "no permission to "
            "write there", errno.EROFS: "the disk is read-only", errno.ENOENT: "its folder "
            "does not exist", errno.ENOTDIR: "a part of its path is a file",
            errno.EISDIR: "it is a folder", errno.ENAMETOOLONG: "the name is too long"}
    extra = hint.get(err.errno)
    return f"{reason}: {extra}" if extra and extra.lower() != reason.lower() else reason


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically, with the digest of its content (:func:`state_digest`),
    which :func:`load_checkpoint` checks."""
    state = {"format": CHECKPOINT_FORMAT, **state}
    state["digest"] = state_digest(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def state_digest(state: Any) -> str:
    """SHA-256 of a checkpoint's content: every key, plain value and tensor (dtype,
    shape, bytes), in a fixed order; the ``digest`` entry itself aside. A flipped bit
    in a weight or a number changes it."""
    h = hashlib.sha256()

    def walk(where: str, v: Any) -> None:
        if isinstance(v, dict):
            for k in sorted(v, key=repr):
                if not (where == "" and k == "digest"):
                    walk(f"{where}/{k!r}", v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"{where}:{type(v).__name__}{len(v)}".encode())
            for i, x in enumerate(v):
                walk(f"{where}[{i}]", x)
        elif isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{where}:{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{where}={v!r}".encode())

    walk("", state)
    return h.hexdigest()


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", *,
                    stage: bool = False) -> dict[str, Any]:
    """Read a checkpoint without running anything from it, and check its structure.

    ``torch.load(weights_only=True)`` unpickles only tensors and plain containers (what
    :func:`save_checkpoint` writes): a file carrying other objects - such as a pickle
    whose ``__reduce__`` calls ``os.system`` - is refused before any of it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines()]
        refused = next((ln for ln in lines if "GLOBAL" in ln), None)
        if refused is None:  # not a forbidden object: a damaged or foreign file
            what = next((ln for ln in lines if ln.startswith("Unsupported")), "bad pickle")
            raise CheckpointError(
                f"checkpoint {path} is unreadable ({what[:120]}); "
                "it was not written by sigprop or is damaged: delete it to start the run afresh"
            ) from None
        # weights_only names the global the file asked for (os.system, ...)
        raise CheckpointError(
            f"refusing to load {path}: it holds objects sigprop checkpoints never contain "
            f"({refused[:160]}), and loading them could run code; use a checkpoint written "
            "by sigprop"
        ) from None
    except Exception as err:  # a truncated zip, a damaged record, ...
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(err).__name__}); it was not written "
            "by sigprop or is damaged: delete it to start the run afresh"
        ) from None
    check_checkpoint(state, path, stage=stage)
    digest = state.get("digest")  # absent in checkpoints written before it was recorded
    if digest is not None and digest != state_digest(state):
        raise CheckpointError(
            f"checkpoint {path} is damaged: its content does not match the digest written "
            "with it; restore it from a copy, or delete it to start the run afresh")
    return state


# key -> (accepted types, what it should be); the layout save_checkpoint callers write
_CHECKPOINT_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "epoch": ((int,), "the number of finished epochs"),
    "config": ((dict,), "the run's configuration"),
    "rule": ((dict,), "the rule's state"),
    "rng": ((torch.Tensor,), "the random number generator's state"),
    "history": ((list,), "one record per finished epoch"),
}


def check_checkpoint(state: Any, path: Path | str, *, stage: bool = False) -> None:
    """Raise CheckpointError unless ``state`` has the layout of a sigprop checkpoint
    (``stage``: of one stage's part, sigprop.engine.runstate: the first stage's holds
    the history, the others an empty one)."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a sigprop checkpoint (format {CHECKPOINT_FORMAT})")
    damaged = f"checkpoint {path} is damaged or not written by sigprop"
    for key, (types, what) in _CHECKPOINT_KEYS.items():
        if key not in state:
            raise CheckpointError(f"{damaged}: it lacks {key!r} ({what}); delete it to start "
                                  "the run afresh")
        value = state[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise CheckpointError(f"{damaged}: {key!r} is a {type(value).__name__}, not {what}")
    epoch, history, rule = state["epoch"], state["history"], state["rule"]
    if stage:
        if not isinstance(state.get("stage"), int) or isinstance(state["stage"], bool):
            raise CheckpointError(f"{damaged}: it does not say which stage it holds")
        if state["stage"] > 0 and history == []:
            history = [{}] * epoch
    if epoch < 1 or len(history) != epoch or not all(isinstance(r, dict) for r in history):
        raise CheckpointError(f"{damaged}: {epoch} epochs but {len(history)} history records")
    if not isinstance(rule.get("modules"), dict) or not isinstance(rule.get("optimizers"), list):
        raise CheckpointError(f"{damaged}: the rule's state lacks its modules or optimizers")
    if state["rng"].dtype != torch.uint8:
        raise CheckpointError(f"{damaged}: 'rng' is not a generator state (uint8 tensor)")
    cuda_rng = state.get("cuda_rng")
    if cuda_rng is not None and not isinstance(cuda_rng, torch.Tensor):
        raise CheckpointError(f"{damaged}: 'cuda_rng' is not a generator state")


def versions() -> dict[str, str]:
    from .. import __version__

    return {
        "sigprop": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl and metrics.csv (flat columns) from the full history."""
    atomic_write_text(run_dir / METRICS_JSONL, "".join(strict_dumps(r) + "\n" for r in history))
    rows = [_flatten(r) for r in history]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / METRICS_CSV, out.getvalue())


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``run_dir/metrics.jsonl`` (empty if it does not exist
    yet); a damaged file (a line that is not JSON, a record out of order, a loss or
    accuracy that is not a finite number, an accuracy outside [0, 1]) is a
    CheckpointError naming it and the line."""
    path = Path(run_dir) / METRICS_JSONL
    try:
        text = read_bounded(path).decode("utf-8")
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is damaged (not UTF-8 text)") from None
    history = []
    for i, line in enumerate(text.splitlines(), 1):
        try:
            record = strict_json(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or record.get("epoch") != i or not _sane(record):
            raise CheckpointError(f"{path} is damaged at line {i} (not epoch {i}'s record)")
        history.append(record)
    return history


# the record's own numbers: finite, and accuracies in [0, 1] (a rule's extra metrics, such
# as an angle that is undefined for a zero matrix, may be NaN)
_CORE = ("lr", "train_loss", "train_acc", "test_acc", "test_error", "epoch_time_s",
         "samples_per_s")
_EXITS = ("train_loss_exits", "train_acc_exits", "test_acc_exits")


def _sane(record: dict[str, Any]) -> bool:
    values = [(k, record[k]) for k in _CORE if k in record]
    for key in _EXITS:
        exits = record.get(key, {})
        if not isinstance(exits, dict):
            return False
        values += [(key, v) for v in exits.values()]
    for key, v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if "acc" in key and not 0.0 <= v <= 1.0:
            return False
    return True


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_dumps(value: Any, **kw: Any) -> str:
    """JSON any reader accepts: non-finite numbers written as null."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kw)


MAX_READ = 256 * 2**20  # bytes of a record file we read back (config, metrics, manifests)


def read_bounded(path: Path, limit: int = MAX_READ) -> bytes:
    """The bytes of ``path``; a file larger than ``limit`` or one that cannot be read is
    a CheckpointError (FileNotFoundError passes through for callers that allow it)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a file") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path} ({err.strerror or err})") from None
    if len(data) > limit:
        raise CheckpointError(f"{path} is larger than the {limit // 2**20} MiB such a file "
                              "ever is: it is damaged or not sigprop's; restore or remove it")
    return data


def strict_json(text: str) -> Any:
    """``json.loads`` with nesting too deep to parse raised as ValueError (as are
    integers too long to convert), not RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def read_json(path: Path) -> Any:
    """A JSON file we wrote earlier (a run's config.json, a manifest), each failure one
    clear line."""
    path = Path(path)
    try:
        return strict_json(read_bounded(path).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is damaged (not UTF-8 text); restore it or delete the "
                              "run folder to start afresh") from None
    except ValueError as err:  # JSONDecodeError, NaN, nesting, a 5,000-digit integer
        why = " ".join(str(err).split())[:120]
        raise CheckpointError(f"{path} is not valid JSON ({why}); restore it or delete the "
                              "run folder to start afresh") from None


def recorded_config(config: Any, path: Path | str):
    """The :class:`~.config.Config` a run recorded (in config.json or a checkpoint) at
    ``path``; a bad key or value there is a CheckpointError naming the file."""
    from ..errors import ConfigError
    from .config import config_from_dict

    if isinstance(config, dict) and isinstance(config.get("train"), dict) \
            and "layout" not in config["train"]:
        # recorded before train.layout existed: such runs computed on NCHW maps
        config = {**config, "train": {**config["train"], "layout": "nchw"}}
    try:
        return config_from_dict(config)
    except ConfigError as err:
        raise CheckpointError(f"{path} holds a bad config ({err}); restore it, or delete the "
                              "run folder to start afresh") from None


def read_run_config(path: Path) -> dict[str, Any]:
    """The ``config`` table of a run folder's config.json, checked for its layout: an
    object holding a ``config`` object with every section (values are checked when the
    config is rebuilt)."""
    from .config import SECTIONS

    record = read_json(path)
    fix = "restore it, or delete the run folder to start afresh"
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{path} is not a sigprop run config (no 'config' object); {fix}")
    missing = [s for s in SECTIONS if not isinstance(record["config"].get(s), dict)]
    if missing:
        raise CheckpointError(
            f"{path} is damaged: its config lacks the section(s) {', '.join(missing)}; {fix}")
    return record
