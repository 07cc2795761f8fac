"""A full disk as a one-line error naming the path and the bytes a write needs, instead of a writer's traceback.

torch.save on a full disk fails with `unexpected pos 1460224 vs 1460176` (a RuntimeError that carries no errno),
other writers with OSError ENOSPC or EDQUOT. `disk_space(path, needed)` wraps such a write: when it fails and
the device of `path` is full (the errno says so, or fewer bytes are free than the write needs), a half-written
checkpoint is removed, so the space it took is given back, and a DiskFullError is raised (a UserError: one line,
exit status 2)."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from components.config import UserError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError):
    """A write failed because its device (or the user's quota) is full."""


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the device of `path` (or of its nearest existing parent); None when it cannot be told."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state: dicts, lists and tuples of tensors and plain values."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def training_state_bytes(model, optimizer=None) -> int:
    """About what a checkpoint of `model` and its optimizer takes: the weights and the optimizer's state (twice
    the weights, AdamW's two moments, when the optimizer's state cannot be read)."""
    weights = sum(tensor_bytes(param) for param in model.parameters())
    try:
        state = getattr(optimizer, "state", None)
        moments = tensor_bytes(list(state.values())) if isinstance(state, dict) else 0
    except (AttributeError, RuntimeError, TypeError):  # a wrapped (DeepSpeed) optimizer's state
        moments = 0
    return weights + (moments or 2 * weights)


def is_disk_full(error: BaseException, path: str | Path, needed: int) -> bool:
    """Whether `error`, raised by a write under `path`, is a full disk: an ENOSPC/EDQUOT anywhere in its chain,
    or (torch's writer says only `unexpected pos`) fewer bytes free than the write needs."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    free = free_bytes(path)
    return free is not None and free < needed


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@contextmanager
def disk_space(path: str | Path, needed: Callable[[], int], what: str = "a checkpoint",
               checkpoints: Iterable[Path] = ()):
    """Within it, a write of `what` to `path` that fails on a full disk raises DiskFullError naming `path` and the
    bytes needed (`needed()`, about); any other failure is raised as it is. The `checkpoints` being written
    (directories in components.training.distributed's layout) lose what the failed write left of them: their
    `.tmp` sibling, and themselves unless their COMPLETE marker was written."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        size = needed()
        if not is_disk_full(e, path, size):
            raise
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint.with_name(checkpoint.name + ".tmp"), ignore_errors=True)
            if not (checkpoint / "COMPLETE").exists():
                shutil.rmtree(checkpoint, ignore_errors=True)
        free = free_bytes(path)
        raise DiskFullError(
            f"{path}: no space left on the device to write {what}: it needs about {size} bytes "
            f"({_human(size)}), {'an unknown number of' if free is None else free} bytes are free; free space or "
            f"put output_dir on a larger volume, then run again (a stage resumes from its last complete "
            f"checkpoint)") from e
