"""Files the application writes: atomic writes (a crash or a full disk never leaves half a checkpoint or
cache file), figures, and the commit that results files record."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "atomic_write_text", "git_commit", "save_figure"]


def _atomic(path: Path, mode: str, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace`` it into place.

    Readers see either the old file or the complete new one; on any failure the
    temporary file is removed.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "run" / "checkpoint.pt"
    >>> atomic_save({"step": 3}, path)
    >>> torch.load(path)["step"]
    3
    """
    _atomic(Path(path), "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` atomically (same guarantee as :func:`atomic_save`).

    Used to rewrite files that a crash must never leave half-written, such as a
    run's ``metrics.jsonl`` when a resumed run drops the records logged after
    its checkpoint.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> atomic_write_text('{"step": 1}\\n', path)
    >>> path.read_text()
    '{"step": 1}\\n'
    """
    _atomic(Path(path), "w", lambda f: f.write(text))


def git_commit(root: str | os.PathLike | None = None) -> str | None:
    """``git describe --always --dirty`` of the checkout holding this package, or ``None`` outside git.

    Results files record it, so every quoted number names the code that measured it.
    """
    import subprocess

    where = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=where,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def save_figure(fig: Any, path: str | os.PathLike, title: str) -> Path:
    """Give matplotlib figure ``fig`` its ``title``, lay it out, write it to ``path`` as a PNG and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
