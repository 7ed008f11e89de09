"""Files and folders written so that a kill at any moment loses nothing already written (temp file, fsync,
rename; a folder built beside its target and swapped in), and JSON lines."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_figure(fig, path: str | Path, dpi: int) -> None:
    """A matplotlib figure as PNG, atomically (rendered in memory, then written as bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def json_safe(obj: object) -> object:
    """`obj` with what JSON cannot hold made plain: non-finite floats become None (null), float keys their
    %g text; dicts, lists and tuples are walked."""
    if isinstance(obj, dict):
        return {(f"{k:g}" if isinstance(k, float) else k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; when the block completes it replaces `path` (an existing one is
    moved aside first, then removed), and when it fails it is removed: `path` is never a half-written folder
    (between the two renames it is briefly absent). Whether replacing is allowed is the caller's decision."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process with our pid (a container's pid 1)
    tmp.mkdir(parents=True)
    old = None
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old is not None:
        old.unlink()


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """One JSON object per line, atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSON-lines file we wrote (user data goes through data/loading.py, which names bad lines)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def local_or_hub(name: str) -> str:
    """A local file or folder by its absolute path (symlinks resolved), anything else (a hub id) as given."""
    return str(Path(name).resolve()) if name and Path(name).exists() else name


def looks_local(name: str) -> bool:
    """A name meant as a local path rather than a hub id ("org/model"): absolute, starting with '.' or '~', or
    with more than one '/'."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def require_local(name: str, what: str) -> None:
    """Refuse, in one line, a local path that does not exist (the hub would answer with a repo-id error)."""
    if name and looks_local(name) and not Path(name).expanduser().exists():
        from refdpo.errors import ConfigError

        raise ConfigError(f"{name}: no such file or folder ({what})")


def require_writable(path: str | Path, what: str) -> None:
    """Refuse, in one line and before anything heavy, an output path that cannot be written (a read-only
    filesystem, no permission, a file where a folder should be). Creates nothing: a probe file in the nearest
    existing folder is made and removed."""
    import tempfile

    from refdpo.errors import ConfigError

    target = Path(path).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".refdpo-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot write in {existing} ({e.strerror or e})") from None
