"""The device's content store (under the deployment root), as ``edge-sdk device have|install|prune`` use it.

Every stored file is read-only (0444) and every directory 0755, set explicitly whatever the umask or
the way a file arrived (rsync keeps a resumed partial upload's 0600): a daemon running as another
user can read them, and nobody writes through one version's hard link into every version sharing
the file. A file that no longer hashes to its name is treated as never received: ``have`` removes
such an object and reports it ``damaged``, so the workstation sends it again, and ``assemble`` re-links
each file of an installed version that no longer matches, one rename per file, so that ``current``
never points at nothing. ``prune`` keeps ``current``, ``previous`` and the newest N versions (by
install time), removes the other versions, every object no kept version references, and partial
uploads and staging directories untouched for an hour.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from edge_sdk.deploy.transport import DeployError
from runtime.signing import SIGNATURES

log = logging.getLogger(__name__)

HASH_LEN = 64
OBJECT_MODE, DIR_MODE = 0o444, 0o755
STALE_S = 3600.0  # a partial upload or staging directory untouched this long is abandoned
MANIFEST = "manifest.json"


def is_hash(value: str) -> bool:
    return len(value) == HASH_LEN and all(c in "0123456789abcdef" for c in value)


def check_hash(value: str) -> str:
    if not is_hash(value):
        raise DeployError(f"{value!r} is not a sha256 hex digest")
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Layout:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.objects, self.versions = self.root / "objects", self.root / "versions"
        self.current, self.previous = self.root / "current", self.root / "previous"

    def object(self, digest: str) -> Path:
        return self.objects / check_hash(digest)

    def partial(self, digest: str) -> Path:
        return self.objects / f"{check_hash(digest)}.partial"

    def version(self, digest: str) -> Path:
        return self.versions / check_hash(digest)

    def link_target(self, link: Path) -> str | None:
        if not link.is_symlink():
            return None
        name = Path(os.readlink(link)).name
        return name if is_hash(name) else None


def _set_mode(path: Path, mode: int) -> None:
    if stat.S_IMODE(path.stat().st_mode) != mode:
        os.chmod(path, mode)


def make_dirs(path: Path) -> None:
    """``path`` and its missing parents as 0755 directories, whatever the umask."""
    if path.is_dir():
        return
    make_dirs(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        if path.is_dir():  # made meanwhile by another step
            return
        raise
    os.chmod(path, DIR_MODE)


def prepare(layout: Layout) -> None:
    """The root (if missing), ``objects/`` and ``versions/``, each 0755."""
    for directory in (layout.objects, layout.versions):
        make_dirs(directory)
        _set_mode(directory, DIR_MODE)


def have(root: str, digests: Sequence[str]) -> dict[str, Any]:
    """Which objects the device holds intact, how far partial uploads got, and the root's free bytes.

    Each object is hashed before it is reported present: one that no longer matches its name is
    removed and listed as ``damaged``, so that the workstation sends it again."""
    layout = Layout(root)
    prepare(layout)
    wanted = list(dict.fromkeys(digests))
    done, damaged = [], []
    for digest in wanted:
        path = layout.object(digest)
        if not path.is_file():
            continue
        if sha256_file(path) == digest:
            _set_mode(path, OBJECT_MODE)
            done.append(digest)
        else:
            log.warning("object %s is damaged (its content no longer hashes to its name); removed", digest[:12])
            path.unlink()
            damaged.append(digest)
    held = set(done)
    partial = {d: layout.partial(d).stat().st_size for d in wanted if d not in held and layout.partial(d).is_file()}
    return {"have": done, "partial": partial, "damaged": damaged, "free": shutil.disk_usage(layout.root).free}


def commit_object(layout: Layout, digest: str) -> bool:
    """A finished upload becomes a read-only object once its content hashes to its name; False when
    the object was there already."""
    final = layout.object(digest)
    if final.is_file():
        return False
    partial = layout.partial(digest)
    if not partial.is_file():
        raise DeployError(f"object {digest[:12]} was not uploaded", hint="run the deployment again")
    got = sha256_file(partial)
    if got != digest:
        partial.unlink()
        raise DeployError(f"object {digest[:12]} arrived corrupted (its sha256 is {got[:12]}); it was removed",
                          hint="run the deployment again to upload it afresh")
    os.chmod(partial, OBJECT_MODE)
    os.replace(partial, final)
    return True


def _manifest(layout: Layout, package: str) -> bytes:
    """The bytes of ``package``'s manifest: its object, else the installed copy, whichever is intact."""
    for source in (layout.object(package), layout.version(package) / MANIFEST):
        try:
            data = source.read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == package:
            return data
    raise DeployError(f"the manifest of package {package[:12]} is missing or damaged on the device",
                      hint="run the deployment again to upload it afresh")


def _files(package: str, manifest: bytes) -> list[tuple[str, str]]:
    """(path, sha256) of every file a version holds, its manifest first; unsafe paths refused."""
    try:
        entries = json.loads(manifest).get("files", {})
        files = [(str(rel), check_hash(str(entry["sha256"]))) for rel, entry in entries.items()]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise DeployError(f"package {package[:12]} has an unreadable manifest") from None
    for rel, _ in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts or rel in ("", ".", MANIFEST, SIGNATURES):
            raise DeployError(f"package {package[:12]} lists an unsafe path {rel!r}")
    return [(MANIFEST, package), *files]


def _link(layout: Layout, digest: str, dest: Path) -> None:
    """Put object ``digest`` at ``dest`` (a hard link, else a read-only copy) by a rename."""
    make_dirs(dest.parent)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(layout.object(digest), tmp)  # objects are read-only: sharing them is safe
    except OSError:
        shutil.copyfile(layout.object(digest), tmp)
        os.chmod(tmp, OBJECT_MODE)
    os.replace(tmp, dest)


def assemble(layout: Layout, package: str, signature: str | None = None) -> Path:
    """``versions/<package>/`` from the objects, complete or not at all; an installed one is checked and
    its damaged files replaced. With ``signature`` (the object holding its signatures.json) placed in
    it, replacing an earlier one."""
    target = layout.version(package)
    files = _files(package, _manifest(layout, package))
    if target.is_dir():
        fixed = _repair(layout, package, target, files)
        if fixed:
            log.warning("package %s: replaced %d damaged file(s), e.g. %s", package[:12], len(fixed), fixed[0])
        os.utime(target)  # installed again: the newest version as far as prune is concerned
    else:
        missing = [rel for rel, digest in files if not layout.object(digest).is_file()]
        if missing:
            raise DeployError(f"package {package[:12]} lacks {len(missing)} file(s) on the device, "
                              f"e.g. {missing[0]!r}")
        staging = layout.versions / f".{package}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        make_dirs(staging)
        for rel, digest in files:
            _link(layout, digest, staging / rel)
        if signature is not None:
            place_signatures(layout, staging, signature)
        os.replace(staging, target)
        return target
    if signature is not None:
        place_signatures(layout, target, signature)
    return target


def _repair(layout: Layout, package: str, target: Path, files: Iterable[tuple[str, str]]) -> list[str]:
    """Re-link every file of the installed ``target`` that no longer matches; the paths replaced."""
    _set_mode(target, DIR_MODE)
    fixed = []
    for rel, digest in files:
        dest = target / rel
        if dest.is_file() and not dest.is_symlink() and sha256_file(dest) == digest:
            _set_mode(dest, OBJECT_MODE)
            _set_mode(dest.parent, DIR_MODE)
            continue
        source = layout.object(digest)
        if not source.is_file():
            raise DeployError(f"{rel!r} of package {package[:12]} is damaged on the device and its object is "
                              "missing", hint="run the deployment again: the device asks for the file afresh")
        if dest.is_file() and not dest.is_symlink() and os.path.samefile(dest, source):  # the object is that file
            source.unlink()
            raise DeployError(f"object {digest[:12]} ({rel!r} of package {package[:12]}) is damaged on the device; "
                              "it was removed", hint="run the deployment again to upload it afresh")
        _link(layout, digest, dest)
        fixed.append(rel)
    return fixed


def repair_others(layout: Layout, fresh: set[str], skip: str) -> dict[str, list[str]]:
    """Installed versions (but ``skip``) holding a file whose object was just uploaded again (``fresh``):
    a damaged copy still linked there is replaced by the new object. Versions share files by hard
    link, so a byte damaged in one is damaged in all; only these files are hashed."""
    fixed: dict[str, list[str]] = {}
    if not fresh or not layout.versions.is_dir():
        return fixed
    for version in sorted(layout.versions.iterdir()):
        if not is_hash(version.name) or version.name == skip or not version.is_dir():
            continue
        try:
            files = _files(version.name, _manifest(layout, version.name))
        except DeployError:
            continue  # a version this install does not need: left as it is
        for rel, digest in files:
            if digest not in fresh:
                continue
            dest = version / rel
            if dest.is_file() and (os.path.samefile(dest, layout.object(digest)) or sha256_file(dest) == digest):
                continue
            _link(layout, digest, dest)
            fixed.setdefault(version.name, []).append(rel)
    for name, paths in fixed.items():
        log.warning("package %s: replaced %d damaged file(s), e.g. %s", name[:12], len(paths), paths[0])
    return fixed


def place_signatures(layout: Layout, directory: Path, signature: str) -> None:
    tmp = directory / f".{SIGNATURES}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    shutil.copyfile(layout.object(signature), tmp)
    os.chmod(tmp, OBJECT_MODE)
    os.replace(tmp, directory / SIGNATURES)


def _references(layout: Layout, package: str) -> set[str] | None:
    """The objects installed version ``package`` is made of; None when its manifest is unreadable."""
    try:
        refs = {digest for _, digest in _files(package, _manifest(layout, package))}
    except DeployError:
        return None
    signatures = layout.version(package) / SIGNATURES
    if signatures.is_file():
        refs.add(sha256_file(signatures))
    return refs


def prune(root: str, keep: int) -> dict[str, Any]:
    """Keep ``current``, ``previous`` and the ``keep`` most recently installed versions; remove the other
    versions, every object none of the kept ones references (unless a kept manifest is unreadable),
    and partial uploads and staging directories untouched for an hour."""
    if keep < 0:
        raise DeployError(f"--keep {keep}: expected the number of versions to keep, 0 or more")
    layout = Layout(root)
    if not layout.root.is_dir():
        return {"kept": [], "removed": [], "objects_removed": 0, "partials_removed": 0, "free": None, "freed": 0}
    before = shutil.disk_usage(layout.root).free
    installed = sorted((p for p in layout.versions.iterdir() if is_hash(p.name) and p.is_dir()),
                       key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True) if layout.versions.is_dir() else []
    kept = {d for d in (layout.link_target(layout.current), layout.link_target(layout.previous)) if d}
    kept |= {p.name for p in installed[:keep]}
    removed = [p.name for p in installed if p.name not in kept]
    for name in removed:
        shutil.rmtree(layout.version(name))
    referenced: set[str] | None = set()
    for package in kept:
        refs = _references(layout, package) if layout.version(package).is_dir() else {package}
        referenced = None if refs is None or referenced is None else referenced | refs
    stale = time.time() - STALE_S
    objects = partials = 0
    for path in layout.objects.iterdir() if layout.objects.is_dir() else ():
        if path.name.startswith(".") or (path.name.endswith(".partial") and is_hash(path.name[:-8])):
            if path.is_file() and path.stat().st_mtime < stale:  # abandoned (or an rsync temporary file)
                path.unlink()
                partials += 1
        elif is_hash(path.name) and referenced is not None and path.name not in referenced:
            path.unlink()
            objects += 1
    for path in layout.versions.iterdir() if layout.versions.is_dir() else ():
        if path.name.startswith(".") and path.is_dir() and path.stat().st_mtime < stale:
            shutil.rmtree(path, ignore_errors=True)  # an install that never finished
    after = shutil.disk_usage(layout.root).free
    if referenced is None:
        log.warning("a kept version's manifest is unreadable: no object was removed")
    return {"kept": sorted(kept), "removed": removed, "objects_removed": objects, "partials_removed": partials,
            "free": after, "freed": max(0, after - before)}
