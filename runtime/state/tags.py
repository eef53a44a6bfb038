"""A checkpoint directory: tag folders, the `latest` pointer, staging, commit and pruning.

    save_dir/
      latest                       one line: the newest complete tag (replaced atomically)
      global_step20/               a complete tag (docs/checkpoints.md lists its files)
      .tmp-global_step30/          a save in progress, or one a crash interrupted: never loaded, removed by
                                   the next save of that tag

A tag folder only appears under its name once every rank's files are written and fsynced (`commit`), so a
crash at any point leaves either the old set of tags or the new one, and `latest` never names a partial tag.
No process group here: the caller orders the steps across ranks (runtime/state/save.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ztune.errors import UserError
from ztune.runtime.state.files import CheckpointError, fsync_dir, read_checked_json, replace_atomic

LATEST = "latest"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
FORMAT = "ztune.checkpoint"
FORMAT_VERSION = 1
MODULE_FILE = "module.safetensors"
OBJECTS_FILE = "objects.pt"


def rank_meta_name(rank: int) -> str:
    return f"rank{rank:05d}.json"


def rank_tensors_name(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def check_tag(tag: str) -> str:
    """`tag` as a folder name; UserError if it could escape the save directory or clash with our names."""
    if not tag or tag in (".", "..", LATEST) or "/" in tag or "\\" in tag or tag.startswith(".") or "\0" in tag:
        raise UserError(f"checkpoint tag {tag!r} is not usable as a folder name: use letters, digits, '_', '-' "
                        "(not 'latest', not starting with '.')")
    return tag


def begin(save_dir: Path, tag: str) -> Path:
    """Create a fresh staging folder for `tag` (removing one an earlier crash left) and return it."""
    check_save_dir(save_dir, must_exist=False)
    save_dir.mkdir(parents=True, exist_ok=True)
    final = save_dir / tag
    # commit() replaces a tag folder of the same name: only ever one of ours (a DeepSpeed save_dir reused after
    # moving a script to ztune holds global_step<N> folders of its own).
    if final.exists() and not final.is_dir():
        raise UserError(f"save_checkpoint: {final} is a file; ztune saves tag {tag!r} as a folder there: use "
                        "another save_dir or tag")
    if final.is_dir() and not (final / rank_meta_name(0)).exists() and any(final.iterdir()):
        raise UserError(f"save_checkpoint: {final} exists and is not a ztune checkpoint, and saving tag {tag!r} "
                        "would replace it; use another save_dir or tag")
    staging = save_dir / f"{TMP_PREFIX}{tag}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def commit(save_dir: Path, tag: str, *, save_latest: bool) -> Path:
    """Move the complete staging folder of `tag` into place (replacing an older tag of the same name) and,
    if `save_latest`, point `latest` at it. Every file in it must already be fsynced."""
    staging, final = save_dir / f"{TMP_PREFIX}{tag}", save_dir / tag
    fsync_dir(staging)
    old = None
    if final.exists():
        old = save_dir / f"{OLD_PREFIX}{tag}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(save_dir)
    if save_latest:
        replace_atomic(save_dir / LATEST, (tag + "\n").encode())
    if old is not None:
        shutil.rmtree(old)
    return final


def check_save_dir(load_dir: Path, *, must_exist: bool) -> None:
    """Refuse a `load_dir` that is not a folder: a path that exists but is a file (`latest`, a tag's rank file,
    a weights file given by mistake) is named as such, with the folder to pass where one is near, instead of
    being reported as missing. With `must_exist`, a missing path is refused too."""
    if load_dir.is_dir():
        return
    if not load_dir.exists():
        if must_exist:
            raise CheckpointError(f"checkpoint directory {load_dir} does not exist; check the path")
        return
    kind = "a file" if load_dir.is_file() else "not a folder"
    # The save directory is the file's folder (`latest`) or the folder above (a file inside a tag folder).
    near = next((p for p in (load_dir.parent, load_dir.parent.parent)
                 if (p / LATEST).is_file() or any(True for _ in _tag_folders(p))), None)
    hint = f" ({near} looks like one)" if near is not None else ""
    raise CheckpointError(f"{load_dir} is {kind}, not a checkpoint directory; pass the save directory, the "
                          f"folder that holds 'latest' and the tag folders{hint}")


def _tag_folders(save_dir: Path):
    """The complete tag folders in `save_dir` (none when it is not a readable folder)."""
    try:
        entries = list(save_dir.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(".") and entry.is_dir() and (entry / rank_meta_name(0)).exists():
            yield entry


def read_latest(load_dir: Path) -> str | None:
    """The tag `latest` names, or None when there is no `latest` file."""
    try:
        tag = (load_dir / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {load_dir / LATEST} cannot be read ({exc.__class__.__name__}); "
                              "pass a tag explicitly") from None
    return check_tag(tag)


def list_tags(save_dir: Path) -> list[tuple[str, int]]:
    """(tag, global step) of the complete tags in `save_dir`, oldest first (by step, then modification time).
    A tag whose rank-0 metadata cannot be read sorts first with step -1."""
    if not save_dir.is_dir():
        return []
    found = []
    for entry in _tag_folders(save_dir):
        try:
            step = int(read_checked_json(entry / rank_meta_name(0))["counters"]["global_steps"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            step = -1
        found.append((step, entry.stat().st_mtime, entry.name))
    return [(name, step) for step, _, name in sorted(found)]


def prune(save_dir: Path, *, keep_last: int, protect: str) -> list[str]:
    """Delete all but the newest `keep_last` complete tags (never `protect`, nor the tag `latest` names).
    Returns the deleted tags. keep_last 0 keeps everything."""
    if keep_last <= 0:
        return []
    tags = [name for name, _ in list_tags(save_dir)]
    keep = set(tags[-keep_last:]) | {protect}
    try:
        latest = read_latest(save_dir)
    except UserError:
        latest = None
    if latest:
        keep.add(latest)
    deleted = []
    for name in tags:
        if name not in keep:
            shutil.rmtree(save_dir / name, ignore_errors=True)
            deleted.append(name)
    if deleted:
        fsync_dir(save_dir)
    return deleted
