"""Reading and writing files a user points us at: JSON, confined paths, writes that never destroy.

Every reader of the project (checkpoints, sharded indexes, adapters, golden vectors) goes through
these helpers, so the promises of ``docs/reader.md`` hold in one place. Pairs with
``qlora_ref.formats.checkpoint`` (streaming safetensors reads), ``qlora_ref.conformance.vectors`` and
``qlora_ref.formats.peft``.

Note: hostile paths
    A name written inside a file (a manifest's ``file``, an index's shard) is a relative path
    that must resolve under the file's folder, with no symlink on the way, and name a regular
    file (not a device, FIFO or socket, which could block or never end); its size comes from
    ``stat`` and is checked against what the caller expects before one byte is read. One
    exception: the Hugging Face cache links every file of a snapshot into one ``blobs`` folder,
    so ``confined_file(links_into=...)`` accepts a link that resolves directly into it.

Note: writes that never destroy
    Outputs are written to a temporary file in the same folder and renamed over the target, so
    an interrupted run leaves the old file whole; a symlink at the target is replaced, never
    followed. Long commands call ``check_writable`` on their output before they start work.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["load_json", "read_json_file", "confined_file", "read_confined_bytes", "check_writable",
           "write_bytes_atomic", "MAX_JSON_BYTES"]

#: Largest JSON file (config, manifest, index) read; real ones are a few MB at most.
MAX_JSON_BYTES = 64 << 20


def load_json(data, where: str):
    """Parse JSON text or bytes; every failure is a ``ValueError`` naming ``where``.

    Deep nesting (which makes Python's parser raise ``RecursionError``) and invalid UTF-8 are
    refused with the same kind of error as malformed JSON.

    Examples
    --------
    >>> load_json(b'{"a": 1}', "x.json")
    {'a': 1}
    >>> load_json("[" * 100000, "x.json")
    Traceback (most recent call last):
    ...
    ValueError: x.json: not JSON (nested too deeply)
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{where}: not JSON (nested too deeply)") from None


def _regular_size(path: Path, what: str, *, follow: bool = False) -> int:
    """``lstat`` ``path`` (``stat`` if ``follow``): refuse symlinks and anything but a regular file."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what}: cannot stat {path} ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{what}: {path} is a symlink; files named inside a folder must be regular files in it")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what}: {path} is not a regular file (a device, FIFO, socket or folder)")
    return st.st_size


def read_json_file(path, *, max_bytes: int = MAX_JSON_BYTES):
    """Read a JSON file that is a regular file of at most ``max_bytes`` bytes.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If it is not a regular file, too large, not UTF-8 or not JSON (naming the file).
    """
    path = Path(path)
    size = _regular_size(path, str(path), follow=True)  # a path the user gave may be a link
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes, more than the {max_bytes} a JSON file here may have")
    with open(path, "rb") as f:
        return load_json(f.read(max_bytes + 1), str(path))


def confined_file(folder, name, *, what: str, links_into=None) -> tuple[Path, int]:
    """Resolve ``name`` (read from a file in ``folder``) to a regular file inside ``folder``.

    Parameters
    ----------
    folder : str or Path
    name : str
        A relative path with ``/`` separators, as a manifest or index writes it.
    what : str
        Names the file and field that held ``name``, for messages.
    links_into : Path, optional
        Accept a symlink as the last component when it resolves to a regular file directly in
        this folder (the Hugging Face cache links every file of a snapshot into one ``blobs``
        folder; see Note: hostile paths).

    Returns
    -------
    path : Path
    size : int
        Its size in bytes, from ``lstat``.

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    ValueError
        If ``name`` is empty, absolute, leaves the folder (``..``), passes through a symlink, or
        does not name a regular file (see Note: hostile paths).
    FileNotFoundError
        If the file does not exist.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what}: a file name must be a string, got {type(name).__name__}")
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or any(
            p in ("", ".", "..") for p in parts) or "\x00" in name:
        raise ValueError(f"{what}: file name {name!r} must be a relative path inside the folder "
                         f"(no absolute path, no '..', no empty part)")
    root = Path(folder)
    current = root
    for part in parts[:-1]:  # every folder on the way must be a real folder, not a symlink
        current = current / part
        if current.is_symlink() or not current.is_dir():
            raise ValueError(f"{what}: {current} is not a folder inside {root} (a symlink or missing)")
    path = root.joinpath(*parts)
    if links_into is not None and path.is_symlink() and path.resolve().parent == Path(links_into):
        return path, _regular_size(path, what, follow=True)
    return path, _regular_size(path, what)


def read_confined_bytes(folder, name, *, expected_size: int, what: str) -> bytes:
    """Read a confined file (``confined_file``) whose size must be ``expected_size`` bytes.

    The size is checked from ``lstat`` before reading, and at most ``expected_size + 1`` bytes
    are read, so a file that grows (or a special file that slipped in) cannot exhaust memory.
    """
    path, size = confined_file(folder, name, what=what)
    if size != expected_size:
        raise ValueError(f"{what}: {name} has {size} bytes, but its entry needs {expected_size}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        data = f.read(expected_size + 1)
    if len(data) != expected_size:
        raise ValueError(f"{what}: {name} changed size while it was read")
    return data


def check_writable(path, *, what: str = "output") -> Path:
    """Check before a long run that ``path`` can be written (its folder exists and is writable).

    Raises
    ------
    ValueError
        If ``path`` is empty, is a folder or a symlink, or its folder is missing or not writable.
    """
    if path is None or str(path) == "":
        raise ValueError(f"{what}: the path is empty")
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{what}: {path} is a symlink; refusing to write through it")
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a folder, not a file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{what}: the folder {parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as exc:
        raise ValueError(f"{what}: cannot write in {parent} ({exc.strerror})") from None
    return path


def write_bytes_atomic(path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``.

    A symlink at ``path`` is replaced by the file, never followed (``os.replace`` renames over
    the link itself; see Note: writes that never destroy).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
