"""Output directories: written whole or not at all, verified on load, never over data frugallm did not write.

Every directory frugallm writes (a checkpoint, a Hugging Face export, a quantized export, a data cache)
goes through `write_directory(path, kind)`:
  1. refuse, before anything is written, a path that holds something else: the working directory or
     the home directory, a directory without a frugallm manifest of the same kind (a training run, a
     folder of unknown files), or the source being read (the same path, or a folder holding it);
  2. yield a temp dir beside `path` (the same filesystem, so the renames below are atomic) to fill;
  3. fsync every file, then write manifest.json LAST: the kind, and each file's size and sha256; fsync
     it and the temp dir. A directory with a manifest is complete; one without is not;
  4. swap: rename the old copy aside, rename the new one in, fsync the parent, only then delete the old.
A crash before step 4 leaves the old directory untouched (and a hidden `.NAME.tmp-*` to delete); a crash
between the two renames leaves the complete old copy at `.NAME.old-*`, which the next write of NAME
renames back first. `verify` checks a manifest on every load. A directory one process fills in place
(a training run) is guarded instead by `lock_directory`: one writer at a time. Manifests written before this module
(checkpoints and quantized exports: a plain {file: sha256} mapping) still verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .names import CHECKPOINTS, QUANTIZATION, TRAIN_CONFIG

MANIFEST = "manifest.json"
KINDS = {"checkpoint": "checkpoint", "hf": "Hugging Face export", "quantized": "quantized export",
         "data-cache": "data cache", "tokenizer": "tokenizer"}
# what a user can do about a directory that fails verification, by kind
FIX = {"checkpoint": "frugallm.load(run) and --resume use the newest checkpoint that verifies; delete this one",
       "hf": "write the export again from its source",
       "quantized": "write it again with `frugallm quantize`",
       "data-cache": "delete the directory; the next run rebuilds it",
       "tokenizer": "train it again with `frugallm tokenizer train`"}


def cache_root() -> Path:
    """Where frugallm caches what it derives (token shards, tokenizers, the host profile): FRUGALLM_CACHE."""
    return Path(os.environ.get("FRUGALLM_CACHE", Path.home() / ".cache" / "frugallm"))


class OutputError(ValueError):
    """A write refused because it would replace data frugallm did not write, or the data being read."""


class CorruptOutput(RuntimeError):
    """A directory whose files do not match its manifest (or that has none): not to be loaded."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (the names created or renamed in it), to disk."""
    if os.name == "nt" and Path(path).is_dir():
        return  # Windows cannot open a directory to fsync it; its renames are journaled by NTFS
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """Replace one file atomically and durably (the new content or the old, never a torn mix)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)
    return path


@contextmanager
def replace_file(path: str | os.PathLike) -> Iterator[Path]:
    """write_file for a file too big to hold in memory (a GGUF export): yields a temp path beside
    `path` for the caller to write; on a clean exit it is fsynced and renamed over `path`; on an
    error it is deleted and `path` stays as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


# --- reading a manifest ------------------------------------------------------------------------

def read_manifest(path: str | os.PathLike) -> dict | None:
    """{"kind", "files": {name: {"sha256", "size"?}}} of a frugallm-written directory; None if it has none."""
    path = Path(path) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptOutput(f"{path} is not valid JSON ({e}); the directory cannot be verified") from None
    if isinstance(m, dict) and m.get("kind") in KINDS and isinstance(m.get("files"), dict):
        return m
    if isinstance(m, dict) and all(isinstance(v, str) and len(v) == 64 for v in m.values()):
        # written before this module: {file: sha256}, by checkpoint.save or quantize_checkpoint
        kind = "quantized" if QUANTIZATION in m else "checkpoint"
        return {"kind": kind, "files": {name: {"sha256": digest} for name, digest in m.items()}}
    return None  # someone else's manifest.json (a Hugging Face repo may hold one)


def manifest_kind(path: str | os.PathLike) -> str | None:
    """The kind of output frugallm wrote at `path` ("checkpoint", "hf", ...), or None."""
    try:
        m = read_manifest(path)
    except CorruptOutput:
        return None
    return m and m["kind"]


def verify(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
           files: Iterable[str] | None = None) -> dict:
    """Check every file against the manifest (size, then sha256); return the manifest.
    kind: the kind(s) expected (None: any); files: only these (each must be listed), e.g. a
    checkpoint's tokenizer without hashing its weights. Raises CorruptOutput naming the file and the fix."""
    path = Path(path)
    m = read_manifest(path)
    fix = FIX.get(kind if isinstance(kind, str) else (m or {}).get("kind"), "write it again")
    if m is None:
        aside = _aside_copies(path)
        where = f"; its previous copy is at {aside[0]} (an interrupted write): rename it back" if aside else ""
        raise CorruptOutput(f"{path} has no {MANIFEST} (a write that did not finish, or not written by "
                            f"frugallm){where}; {fix}")
    if kind is not None and m["kind"] not in ((kind,) if isinstance(kind, str) else kind):
        want = " or ".join(KINDS[k] for k in ((kind,) if isinstance(kind, str) else kind))
        raise CorruptOutput(f"{path} is a {KINDS[m['kind']]} written by frugallm, not a {want}")
    listed = m["files"]
    for name in files or ():
        if name not in listed:
            raise CorruptOutput(f"{path}/{MANIFEST} does not list {name}; {fix}")
    for name, entry in (listed.items() if files is None else ((n, listed[n]) for n in files)):
        file = path / name
        if not file.is_file():
            raise CorruptOutput(f"{path} lacks {name}, which its {MANIFEST} lists; {fix}")
        if "size" in entry and file.stat().st_size != entry["size"]:  # cheap: catches truncation first
            raise CorruptOutput(f"{file} is {file.stat().st_size} bytes, its {MANIFEST} says {entry['size']} "
                                f"(truncated or changed after frugallm wrote it); {fix}")
        if sha256(file) != entry["sha256"]:
            raise CorruptOutput(f"{file} does not match its sha256 in {MANIFEST} (corrupted, or changed after "
                                f"frugallm wrote it); {fix}")
    return m


# --- refusing to write -------------------------------------------------------------------------

def check_output(path: str | os.PathLike, kind: str, sources: Iterable = (), suggest: str | None = None) -> None:
    """Raise OutputError unless writing a `kind` directory at `path` destroys nothing but an older
    output of the same kind. Call it early, before the expensive work; write_directory calls it too."""
    path = Path(path)
    what, where = KINDS[kind], path.resolve()
    eg = f", e.g. {suggest}" if suggest else ""

    def refuse(why: str):
        raise OutputError(f"refusing to write the {what} over {path}: {why}; choose another output "
                          f"directory (--out){eg}")

    for src in sources:  # resolved: "runs/x/" and "./runs/x" and a symlink to it are one directory
        s = Path(src).resolve()
        if s == where or where in s.parents:
            refuse(f"it {'is' if s == where else 'holds'} {src}, the source being read")
    if path.is_symlink():
        refuse("it is a symbolic link; pass the directory it points to, or another path")
    if not path.exists():
        return
    if not path.is_dir():
        refuse("it is a file, not a directory")
    if why := nobodys_output(path):
        refuse(why)
    found = manifest_kind(path)
    if found == kind or not any(path.iterdir()):  # our own older output, or nothing to lose
        return
    if found:
        refuse(f"it is a {KINDS[found]}, not a {what} written by frugallm")
    if (path / CHECKPOINTS).is_dir() or (path / TRAIN_CONFIG).exists():
        refuse(f"it is a training run, not a {what} written by frugallm")
    refuse(f"it holds {sum(1 for _ in path.iterdir())} entries that frugallm did not write (no {MANIFEST} "
           f"of a {what})")


def nobodys_output(path: str | os.PathLike) -> str | None:
    """Why `path` may hold no output of any writer (the working directory, a folder holding it, the home
    directory: `--out .` or `--out ~` is a slip, never a choice), or None."""
    where, cwd = Path(path).resolve(), Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        return "it is the working directory" if where == cwd else "it holds the working directory"
    if where == Path.home().resolve():
        return "it is the home directory"
    return None


# --- one writer at a time ----------------------------------------------------------------------

LOCK = ".lock"  # in a directory one process fills in place (a training run): who holds it


def lock_directory(path: str | os.PathLike):
    """Take the exclusive lock of `path` (an existing directory one process fills in place, such as a
    training run) and return the open lock file: close it to release the lock. The lock is the kernel's
    (flock), so it goes when the process exits, a crash or kill -9 included, and a lock file left on disk
    locks nothing. Raises OutputError naming the holder when another process holds it."""
    file = Path(path) / LOCK
    f = open(file, "a+")  # never truncated before the lock is ours: the holder's name stays readable
    try:
        _lock(f)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        raise OutputError(f"{path} is being written by another frugallm process ({holder}); wait for it to "
                          f"finish or stop it, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def _lock(f) -> None:
    """An exclusive, non-blocking lock on the whole file; OSError when another process holds it."""
    if os.name == "nt":
        import msvcrt

        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


# --- writing -----------------------------------------------------------------------------------

def _aside_copies(path: Path) -> list[Path]:
    """Complete old copies left by a crash between the two renames of a swap, newest first."""
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}.old-"
    found = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and read_manifest(p) is not None]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _umask() -> int:
    """The process's umask. Read from /proc where it is there: os.umask can only read it by setting it,
    which would open a window in which another thread creates files with the wrong mode."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_modes(tmp: Path) -> None:
    """Give tmp and everything in it the modes of a file or folder the user made (0644 / 0755 under the
    usual umask 022): mkdtemp makes tmp owner-only (0700), and safetensors writes its files 0600."""
    mask = _umask()
    os.chmod(tmp, 0o777 & ~mask)
    for root, dirs, names in os.walk(tmp):
        for d in dirs:
            os.chmod(Path(root) / d, 0o777 & ~mask)
        for name in names:
            os.chmod(Path(root) / name, 0o666 & ~mask)


def _seal(tmp: Path, kind: str) -> None:
    """Give every file and folder under tmp the usual modes and fsync it, then write the manifest last
    and fsync it and tmp."""
    if (tmp / MANIFEST).exists():
        raise ValueError(f"{MANIFEST} is written by frugallm.io; do not write one into the temp dir")
    _usual_modes(tmp)
    files = {}
    for root, dirs, names in os.walk(tmp):
        for name in sorted(names):
            file = Path(root) / name
            _fsync(file)
            files[file.relative_to(tmp).as_posix()] = {"sha256": sha256(file), "size": file.stat().st_size}
        for d in dirs:
            _fsync(Path(root) / d)
    # write_file fsyncs the manifest and then tmp itself, so every name in tmp is on disk
    write_file(tmp / MANIFEST, json.dumps({"kind": kind, "files": dict(sorted(files.items()))}, indent=2) + "\n")


@contextmanager
def write_directory(path: str | os.PathLike, kind: str, *, sources: Iterable = (),
                    suggest: str | None = None) -> Iterator[Path]:
    """Yield an empty temp dir beside `path` to fill; on success it is sealed and swapped in (the
    old copy kept until the new one is in place); on error it is deleted and `path` is as it was."""
    given = Path(path)
    path = Path(os.path.abspath(given))  # "runs/x/.." is "runs"; lexical, so a symlink stays one (refused)
    aside = _aside_copies(path)
    if aside and not path.exists():  # finish the swap a crash interrupted: the old copy goes back
        os.replace(aside[0], path)
        _fsync(path.parent)
    check_output(given, kind, sources, suggest)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    old = path.with_name(f".{path.name}.old-{tmp.name[len(prefix):]}")  # unique like tmp
    try:
        yield tmp
        _seal(tmp, kind)
        if path.exists():
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the new copy did not go in: the old one goes back
                raise
        else:
            os.replace(tmp, path)
        _fsync(path.parent)  # both renames on disk before the old copy goes
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
