"""The one saving policy: where diffq may write a folder, and how it replaces one.

* A target that is an existing file, or a non-empty folder diffq did not write, is refused with a
  :class:`OverwriteRefusedError` naming it (nothing in it is touched) unless ``overwrite=True``.
* A target that is, contains, or is an existing part of a folder the model being saved was loaded
  from is refused, overwrite or not (paths are compared resolved, symlinks included).
* The new folder is written beside the target under a temporary name and renamed into place, so
  an interrupted save leaves the earlier checkpoint (or nothing) — never a mix. Replacing an
  earlier diffq checkpoint keeps the files of the user's that were beside its own (they are
  hard-linked into the new folder before the swap).
* A full disk, a read-only or otherwise unwritable target raises a :class:`SaveError` and leaves
  no partial folder behind.

Which folders a diffq checkpoint contains is recorded in :data:`MARKER` inside it.

Single files (images, plans, statistics, sensitivity analyses, reports, plots) go through
:func:`write_file`: a temporary file beside the target renamed over it, an existing folder never
replaced, and an existing file replaced only with ``overwrite=True`` or when the writer recognises
it as an earlier file of its own kind (a sensitivity analysis it resumes, a PNG diffq drew).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from diffq.errors import DiffQError

MARKER = "diffq_checkpoint.json"
_FORMAT = 1


class OverwriteRefusedError(DiffQError, FileExistsError):
    """A save would overwrite or delete files diffq did not write, or the model's own files."""


class SaveError(DiffQError, OSError):
    """The disk refused a save (full, read-only, no permission); nothing partial was left."""


_SOFTWARE = "diffq"
"""The PNG ``Software`` text diffq writes into the images and charts it makes (see :func:`png_is_ours`)."""


def png_is_ours(path: Path) -> bool:
    """Whether ``path`` is a PNG diffq wrote (its ``Software`` text chunk says so)."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.format == "PNG" and str(image.info.get("Software", "")).startswith(_SOFTWARE)
    except (OSError, ValueError, ImportError):
        return False


def png_info() -> Any:
    """PNG text chunks that mark an image as diffq's (``pnginfo=`` of ``PIL.Image.save``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", _SOFTWARE)
    return info


def json_has_keys(*keys: str) -> Callable[[Path], bool]:
    """A ``replaceable`` test for :func:`write_file`: a JSON object with all of ``keys``."""

    def test(path: Path) -> bool:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return False
        return isinstance(data, dict) and all(key in data for key in keys)

    return test


def _describe(err: OSError) -> str:
    return {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EDQUOT: "the disk quota is exceeded"}.get(err.errno, err.strerror or str(err))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_file_target(
    target: str | os.PathLike, *, overwrite: bool = False, replaceable: Callable[[Path], bool] | None = None
) -> None:
    """Raise :class:`OverwriteRefusedError` if :func:`write_file` would refuse ``target``."""
    target = Path(target).expanduser()
    if target.is_dir():
        raise OverwriteRefusedError(f"{target} is a folder; diffq replaces only a file with a file. Give a "
                                    "file path.")
    if target.exists() and not overwrite and not (replaceable is not None and replaceable(target)):
        raise OverwriteRefusedError(
            f"{target} is an existing file that diffq did not write; it was left as it is. Write to another "
            "path, or pass overwrite=True (--overwrite) to replace it."
        )


def write_file(
    target: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    replaceable: Callable[[Path], bool] | None = None,
) -> Path:
    """Write one file at ``target`` by calling ``write(temporary_path)``, then renaming it into place.

    An existing folder at ``target`` is refused; an existing file is refused unless ``overwrite``
    or ``replaceable(target)`` (an earlier file of the writer's own kind). A failing disk raises
    :class:`SaveError` and leaves the earlier file (or nothing) in place.
    """
    target = Path(target).expanduser()
    check_file_target(target, overwrite=overwrite, replaceable=replaceable)
    temporary = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        temporary = Path(name)
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(temporary, target)
        temporary = None
    except OSError as err:
        if isinstance(err, DiffQError):
            raise
        raise SaveError(f"could not write {target}: {_describe(err)}. It was left as it was; free space or "
                        "choose a writable folder and try again.") from err
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    return target


def written_files(folder: Path) -> set[str] | None:
    """The files (relative paths) diffq wrote into ``folder``, or ``None`` if it has no marker."""
    try:
        data = json.loads((folder / MARKER).read_text())
        return set(data["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _overlaps(target: Path, source: Path) -> bool:
    """Whether writing ``target`` would replace ``source`` or part of it: the same folder, one
    that contains it, or an existing folder inside it (a new subfolder only adds files)."""
    return target == source or source.is_relative_to(target) or (target.is_relative_to(source) and target.exists())


def check_target(
    target: Path,
    *,
    overwrite: bool = False,
    sources: Iterable[Path] = (),
    is_checkpoint: Callable[[Path], bool] = lambda folder: written_files(folder) is not None,
) -> None:
    """Raise :class:`OverwriteRefusedError` if writing a folder at ``target`` breaks the policy."""
    resolved = target.expanduser().resolve()
    for source in sources:
        if _overlaps(resolved, Path(source).expanduser().resolve()):
            raise OverwriteRefusedError(
                f"{target} is (or contains) {source}, where the model being saved was loaded from; diffq "
                "never writes over a model's own files, overwrite or not. Save to another folder."
            )
    if resolved.exists() and not resolved.is_dir():
        if not overwrite:
            raise OverwriteRefusedError(
                f"{target} is an existing file; nothing was written. Save to a folder path that does not "
                "exist yet, or pass overwrite=True (--overwrite) to replace the file."
            )
    elif resolved.is_dir() and any(resolved.iterdir()) and not is_checkpoint(resolved) and not overwrite:
        raise OverwriteRefusedError(
            f"{target} is a folder with files diffq did not write; nothing in it was touched. Save to a "
            "new or empty folder, or pass overwrite=True (--overwrite) to replace its contents."
        )


def recover(target: Path) -> None:
    """Undo what an interrupted earlier save left beside ``target``: put an earlier checkpoint
    that was moved aside back in place, and remove abandoned temporary folders."""
    parent = target.parent
    if not parent.is_dir():
        return
    for path in parent.glob(f".{target.name}.old-*"):
        if not target.exists():
            path.rename(target)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in parent.glob(f".{target.name}.*.tmp"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _keep_user_files(old: Path, staging: Path) -> None:
    """Hard-link (or copy) into ``staging`` the files of the user's in the old checkpoint ``old``."""
    ours = written_files(old)
    if ours is None:  # a checkpoint from before the marker: its subfolders and index are diffq's
        ours = {p.relative_to(old).as_posix() for p in old.rglob("*") if p.parent != old or p.name == "model_index.json"}
    for path in old.rglob("*"):
        relative = path.relative_to(old).as_posix()
        if path.is_dir() or relative in ours or relative == MARKER or (staging / relative).exists():
            continue
        destination = staging / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


def _usual_modes(folder: Path) -> None:
    """The modes a plain ``mkdir``/``open`` would give (mkdtemp makes 0700, safetensors 0600 files)."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def write_folder(
    target: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    sources: Iterable[Path] = (),
    is_checkpoint: Callable[[Path], bool] = lambda folder: written_files(folder) is not None,
) -> Path:
    """Write a folder at ``target`` by calling ``write(staging_folder)``, under the policy above."""
    target = Path(target).expanduser().resolve()
    check_target(target, overwrite=overwrite, sources=sources, is_checkpoint=is_checkpoint)
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        write(staging)
        _usual_modes(staging)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        (staging / MARKER).write_text(json.dumps({"format": _FORMAT, "files": files}, indent=1))
        if target.is_dir() and is_checkpoint(target):
            _keep_user_files(target, staging)
        _fsync_tree(staging)
        if target.exists() or target.is_symlink():
            aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            aside.rmdir()
            target.rename(aside)  # the earlier checkpoint stays whole until the new one is in place
            staging.rename(target)
            staging = None
            shutil.rmtree(aside) if aside.is_dir() else aside.unlink()
        else:
            staging.rename(target)
            staging = None
    except OSError as err:
        if isinstance(err, DiffQError):
            raise
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        recover(target)
        what = _describe(err)
        raise SaveError(
            f"could not save to {target}: {what}. Nothing partial was left behind"
            f"{' and the earlier checkpoint is unchanged' if target.exists() else ''}; free space or "
            "choose a writable folder and save again."
        ) from err
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
