"""Reading, verifying and writing model packages (``*.edgepkg``).

A package is a directory, or a zip archive of that directory, holding
``manifest.json`` plus every file it lists with a sha256 and a size. Reading a
package verifies the schema version and every file before anything is used;
a tampered, truncated or unsafe package is refused with a clear error.

Writes are atomic: a package is staged next to its destination and renamed
into place, so a crash never leaves a half-written package behind, and an
existing package is replaced only once the new one is complete.

A package may also hold ``signatures.json``, ed25519 signatures over the exact
bytes of ``manifest.json`` (see :mod:`runtime.signing`). It is the one file the
manifest does not list (it cannot hash its own signature); ``Package.open``
checks it against the manifest bytes it verified the hashes with.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

import numpy as np

from edge_sdk.errors import PackageError, PackageIntegrityError
from runtime.manifest import FileEntry, Manifest
from runtime.signing import (
    MAX_SIGNATURES_BYTES, SIGNATURES, PackageSignatureError, PublicKey, Signature, SigningKey, check_signatures,
    load_signing_key, parse_signatures, signatures_document,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 1 << 20
#: Members an archive stores as they are rather than deflated: graphs, golden vectors (already a
#: deflated npz) and engines. Deflate saves about 11% on a graph's weights, but inflating them is most
#: of a cold start: on the demo text package (300 MB of graphs) it took 1.57 s against 0.17 s for the
#: sha256 every open computes anyway (x86-64 AVX-512, zlib level 1). Archives written before read alike.
STORED_SUFFIXES = (".onnx", ".npz", ".plan", ".engine")
_MAX_MANIFEST_BYTES = 16 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_member_name(name: str) -> str:
    """Return ``name`` if it is a safe relative POSIX path inside a package, else raise."""
    path = PurePosixPath(name)
    unsafe = (
        not name
        or "\\" in name
        or "\x00" in name
        or path.is_absolute()
        or ":" in path.parts[0]
        or any(part in ("..", ".", "") for part in path.parts)
        or str(path) != name
    )
    if unsafe:
        raise PackageIntegrityError(
            f"package member {name!r} is not a safe relative path",
            hint="the archive may be malicious; rebuild it with edge-sdk convert",
        )
    return name


class Package:
    """A verified model package. Open with :meth:`Package.open`.

    ``manifest_bytes`` are the exact bytes the hashes were checked against, ``signatures`` the
    package's ``signatures.json`` (None: unsigned) and ``signer`` the id of the key whose signature
    verified (None: unsigned, or not checked).
    """

    def __init__(self, path: Path, manifest: Manifest, archive: bool, manifest_bytes: bytes = b"",
                 signatures: bytes | None = None, signer: str | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.is_archive = archive
        self.manifest_bytes = manifest_bytes
        self.signatures = signatures
        self.signer = signer

    @classmethod
    def open(cls, path: str | os.PathLike[str], trusted_keys: Sequence[PublicKey] | None = None) -> Package:
        """Open and fully verify the package at ``path`` (a directory or an archive).

        With ``trusted_keys`` it must also be signed by one of them; without, a signature that is
        present must still verify (see :mod:`runtime.signing`).
        """
        package = open_hashed(path)
        package.signer = check_signatures(package.manifest_bytes, package.signatures, trusted_keys, package.path)
        m = package.manifest
        signed = (f"signed by {package.signer}" if package.signer
                  else "unsigned" if package.signatures is None else "signature not checked")
        log.info("package %s verified: %s %s (%d files), %s", package.path, m.name, m.version, len(m.files), signed)
        return package

    def read_bytes(self, name: str) -> bytes:
        """Read one listed file and check it against its sha256 again (it may have changed since open)."""
        check_member_name(name)
        entry = self.manifest.files.get(name)
        if entry is None:
            raise PackageError(f"package {self.path} has no file {name!r}", hint=f"listed files: {sorted(self.manifest.files)}")
        if self.is_archive:
            with _open_zip(self.path) as zf:
                try:
                    data = zf.read(name)
                except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
                    raise PackageIntegrityError(f"package file {name!r} in {self.path} is damaged ({exc})") from None
        else:
            data = (self.path / name).read_bytes()
        if len(data) != entry.size or sha256_bytes(data) != entry.sha256:
            raise PackageIntegrityError(f"package file {name!r} in {self.path} changed after it was verified")
        return data

    def copy_file(self, name: str, dest: str | os.PathLike[str]) -> None:
        """Write one listed file to ``dest`` a chunk at a time (memory stays flat for large models), checking
        it against its sha256 again; ``dest`` is removed when it does not match."""
        check_member_name(name)
        entry = self.manifest.files.get(name)
        if entry is None:
            raise PackageError(f"package {self.path} has no file {name!r}", hint=f"listed files: {sorted(self.manifest.files)}")
        h, size = hashlib.sha256(), 0
        try:
            with contextlib.ExitStack() as stack:
                if self.is_archive:
                    source = stack.enter_context(stack.enter_context(_open_zip(self.path)).open(name))
                else:
                    source = stack.enter_context((self.path / name).open("rb"))
                out = stack.enter_context(open(dest, "wb"))
                while chunk := source.read(_CHUNK):
                    size += len(chunk)
                    h.update(chunk)
                    out.write(chunk)
        except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
            Path(dest).unlink(missing_ok=True)
            raise PackageIntegrityError(f"package file {name!r} in {self.path} is damaged ({exc})") from None
        if size != entry.size or h.hexdigest() != entry.sha256:
            Path(dest).unlink(missing_ok=True)
            raise PackageIntegrityError(f"package file {name!r} in {self.path} changed after it was verified")

    def golden(self, graph: str = "fp32") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The golden feeds and the reference outputs of ``graph`` ("fp32" or an int8 variant)."""
        if not self.manifest.golden:
            return {}, {}
        prefix = golden_prefix(graph)
        with np.load(io.BytesIO(self.read_bytes(self.manifest.golden)), allow_pickle=False) as npz:
            inputs = {k[3:]: npz[k] for k in npz.files if k.startswith("in.")}
            outputs = {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)}
        return inputs, outputs


def open_hashed(path: str | os.PathLike[str]) -> Package:
    """Open the package at ``path`` verifying its schema and every hash, but not its signatures (its
    ``signer`` is None): for signing it. Everything else opens packages with :meth:`Package.open`."""
    p = Path(path)
    if p.is_dir():
        manifest, raw, signatures = _verify_directory(p)
    elif p.is_file():
        manifest, raw, signatures = _verify_archive(p)
    else:
        raise PackageError(f"package {str(p)!r} does not exist", hint="check the path, or run edge-sdk convert first")
    return Package(p, manifest, p.is_file(), raw, signatures)


def _parse_manifest(data: bytes, where: Path) -> Manifest:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageIntegrityError(f"manifest.json in {where} is not valid JSON: {exc}") from None
    manifest = Manifest.from_dict(raw)
    for name in manifest.files:
        check_member_name(name)
    if SIGNATURES in manifest.files:
        raise PackageIntegrityError(f"manifest of {where} lists {SIGNATURES!r}, the name reserved for the package's "
                                    "signatures", hint="rebuild it with edge-sdk convert")
    for named in (manifest.model, manifest.golden, *manifest.graphs.values()):
        if named and named not in manifest.files:
            raise PackageIntegrityError(f"manifest of {where} names {named!r} but does not list it in 'files'")
    return manifest


def _check_entry(name: str, entry: FileEntry, size: int, digest: str, where: Path) -> None:
    if size != entry.size:
        raise PackageIntegrityError(
            f"package file {name!r} in {where} is {size} bytes; the manifest says {entry.size}",
            hint="the package is truncated or was modified; copy it again or re-convert",
        )
    if digest != entry.sha256:
        raise PackageIntegrityError(
            f"package file {name!r} in {where} has sha256 {digest[:16]}...; the manifest says {entry.sha256[:16]}...",
            hint="the package was modified after it was built; copy it again or re-convert",
        )


def _hash_stream(stream: Any, limit: int) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    while chunk := stream.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            break  # larger than declared: stop reading (zip bomb / tampering)
        h.update(chunk)
    return size, h.hexdigest()


def _verify_directory(root: Path) -> tuple[Manifest, bytes, bytes | None]:
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise PackageError(f"{root} has no manifest.json; it is not an edge-sdk package")
    raw = manifest_path.read_bytes()
    manifest = _parse_manifest(raw, root)
    for name, entry in manifest.files.items():
        path = root / name
        if path.is_symlink() or not path.is_file():
            raise PackageIntegrityError(f"package file {name!r} is missing from {root} (or is not a regular file)")
        with path.open("rb") as f:
            size, digest = _hash_stream(f, entry.size)
        _check_entry(name, entry, size, digest, root)
    return manifest, raw, _directory_signatures(root)


def _directory_signatures(root: Path) -> bytes | None:
    path = root / SIGNATURES
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_SIGNATURES_BYTES:
        raise PackageIntegrityError(f"{SIGNATURES} in {root} is not a regular file of at most {MAX_SIGNATURES_BYTES} "
                                    "bytes", hint="remove it and sign the package again")
    return path.read_bytes()


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackageIntegrityError(
            f"package archive {path} cannot be read ({exc})",
            hint="the file is truncated or not an edge-sdk package; copy it again or re-convert",
        ) from None


def _archive_members(zf: zipfile.ZipFile, where: Path) -> dict[str, zipfile.ZipInfo]:
    members: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        check_member_name(info.filename.rstrip("/") if info.is_dir() else info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise PackageIntegrityError(f"package archive {where} contains a symbolic link {info.filename!r}")
        if not info.is_dir():
            members[info.filename] = info
    return members


def _verify_archive(path: Path) -> tuple[Manifest, bytes, bytes | None]:
    with _open_zip(path) as zf:
        members = _archive_members(zf, path)
        if MANIFEST not in members or members[MANIFEST].file_size > _MAX_MANIFEST_BYTES:
            raise PackageError(f"{path} has no usable manifest.json; it is not an edge-sdk package")
        signatures = None
        try:
            raw = zf.read(MANIFEST)
            manifest = _parse_manifest(raw, path)
            if SIGNATURES in members:
                if members[SIGNATURES].file_size > MAX_SIGNATURES_BYTES:
                    raise PackageIntegrityError(f"{SIGNATURES} in {path} is larger than {MAX_SIGNATURES_BYTES} bytes")
                signatures = zf.read(SIGNATURES)
            extra = sorted(set(members) - set(manifest.files) - {MANIFEST, SIGNATURES})
            if extra:
                raise PackageIntegrityError(f"package archive {path} holds files the manifest does not list: {extra}")
            for name, entry in manifest.files.items():
                if name not in members:
                    raise PackageIntegrityError(f"package file {name!r} is missing from {path}")
                with zf.open(members[name]) as f:
                    size, digest = _hash_stream(f, entry.size)
                _check_entry(name, entry, size, digest, path)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
            raise PackageIntegrityError(f"package archive {path} is damaged ({exc})", hint="copy it again or re-convert") from None
    return manifest, raw, signatures


def extract_package(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Package:
    """Safely unpack a verified archive into a new directory ``dest`` and open it there."""
    src, out = Path(archive), Path(dest)
    if out.exists():
        raise PackageError(f"extraction target {out} already exists", hint="choose a new directory")
    package = Package.open(src)
    manifest = package.manifest
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with _open_zip(src) as zf:
            for name in [*manifest.files, MANIFEST, *([SIGNATURES] if package.signatures is not None else [])]:
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(check_member_name(name)) as f, target.open("wb") as g:
                    shutil.copyfileobj(f, g, _CHUNK)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Package.open(out)


def golden_prefix(graph: str) -> str:
    """Key prefix of a graph's outputs in golden.npz: ``out.`` for fp32, ``out@u8s8.`` for a variant."""
    return "out." if graph == "fp32" else f"out@{graph}."


def golden_bytes(
    inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
    variants: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> bytes:
    """Serialise golden vectors (fp32 outputs, plus each int8 variant's) to ``golden.npz``: no pickles,
    reproducible bytes."""
    arrays: dict[str, np.ndarray] = {f"in.{k}": v for k, v in inputs.items()}
    for graph, outs in {"fp32": outputs, **(variants or {})}.items():
        arrays.update({f"{golden_prefix(graph)}{k}": v for k, v in outs.items()})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            with zf.open(_fixed_time_info(f"{key}.npy"), "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(value), allow_pickle=False)
    return buf.getvalue()


def write_package(
    manifest: Manifest, files: Mapping[str, bytes], out: str | os.PathLike[str], *, archive: bool = True,
    sign: SigningKey | None = None,
) -> Package:
    """Write ``files`` with ``manifest`` (its ``files`` table is filled in here) to ``out`` atomically,
    signed with ``sign`` when given (the signature is part of the same atomic write).

    ``out`` may already hold a package, which is replaced; any other existing
    path is refused rather than overwritten.
    """
    dest = Path(out)
    _refuse_clobber(dest)
    entries = {check_member_name(n): FileEntry(sha256_bytes(d), len(d)) for n, d in files.items()}
    if MANIFEST in entries or SIGNATURES in entries:
        raise PackageError(f"a package file may not be named {MANIFEST} or {SIGNATURES}")
    manifest = replace(manifest, files=entries)
    Manifest.from_dict(manifest.to_dict())  # validate the exact document we write
    manifest_bytes = json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode("utf-8")
    head = [(MANIFEST, manifest_bytes)]
    if sign is not None:
        head.append((SIGNATURES, signatures_document(manifest_bytes, sign)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        if archive:
            staged = staging / "package.zip"
            with zipfile.ZipFile(staged, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
                for name, data in [*head, *sorted(files.items())]:
                    zf.writestr(_fixed_time_info(name, stored=name.endswith(STORED_SUFFIXES)), data)
            _fsync(staged)
        else:
            staged = staging / "package"
            for name, data in [*head, *files.items()]:
                target = staged / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                _fsync(target)
        _swap_into_place(staged, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Package.open(dest)


def replace_signatures(package: Package, signatures: bytes) -> None:
    """Replace ``package``'s ``signatures.json`` atomically: a directory gets the file renamed into place,
    an archive is rewritten next to itself with every other member unchanged and renamed over the old."""
    if not package.is_archive:
        staged = package.path / f".{SIGNATURES}.{os.getpid()}"
        staged.write_bytes(signatures)
        _fsync(staged)
        os.replace(staged, package.path / SIGNATURES)
        return
    staged = package.path.with_name(f".{package.path.name}.{os.getpid()}.signing")
    try:
        with _open_zip(package.path) as src, zipfile.ZipFile(staged, "w", compresslevel=1) as dst:
            for info in src.infolist():
                if info.filename == SIGNATURES:
                    continue
                copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                copy.compress_type, copy.external_attr = info.compress_type, info.external_attr
                if info.is_dir():
                    dst.writestr(copy, b"")
                    continue
                big = info.file_size > zipfile.ZIP64_LIMIT
                with src.open(info) as f, dst.open(copy, "w", force_zip64=big) as g:
                    shutil.copyfileobj(f, g, _CHUNK)
                if info.filename == MANIFEST:  # signatures right after the manifest, as write_package puts them
                    dst.writestr(_fixed_time_info(SIGNATURES), signatures)
        _fsync(staged)
        os.replace(staged, package.path)
    finally:
        staged.unlink(missing_ok=True)


def _fixed_time_info(name: str, stored: bool = False) -> zipfile.ZipInfo:
    """A member header with a fixed timestamp, so the same content gives the same archive bytes;
    deflated unless ``stored``."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def _refuse_clobber(dest: Path) -> None:
    if not dest.exists():
        return
    is_package = (dest.is_dir() and (dest / MANIFEST).is_file()) or (dest.is_file() and zipfile.is_zipfile(dest))
    if not is_package:
        raise PackageError(f"{dest} exists and is not an edge-sdk package; refusing to overwrite it",
                           hint="choose another output path")


def _swap_into_place(staged: Path, dest: Path) -> None:
    if staged.is_file() and not dest.is_dir():
        os.replace(staged, dest)
        return
    old = dest.with_name(f".{dest.name}.old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(staged, dest)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        old.unlink()


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def sign_package(path: str | os.PathLike[str], key: SigningKey | str | os.PathLike[str], *,
                 replace: bool = False) -> str:
    """Sign the package at ``path`` (a directory or an archive) in place with ``key`` (a
    :class:`SigningKey` or a private key file); returns the key id.

    The package's hashes are verified first, and the signature covers the exact manifest bytes that
    were verified. Other keys' signatures are kept when they verify (a stale one is refused: pass
    ``replace=True`` to drop every earlier signature instead).
    """
    signing = key if isinstance(key, SigningKey) else load_signing_key(key)
    package = open_hashed(path)
    keep: tuple[Signature, ...] = ()
    if package.signatures is not None and not replace:
        check_signatures(package.manifest_bytes, package.signatures, None, package.path)
        keep = parse_signatures(package.signatures, package.path)
    replace_signatures(package, signatures_document(package.manifest_bytes, signing, keep))
    log.info("signed %s with key %s", package.path, signing.key_id)
    return signing.key_id


def verify_package(path: str | os.PathLike[str], trusted: Sequence[PublicKey]) -> str:
    """Fully verify the package at ``path`` against ``trusted`` keys; the id of the trusted key that signed."""
    if not trusted:
        raise PackageSignatureError("no trusted keys given to verify the package against",
                                    hint="pass the public key file(s) of the keys you trust")
    signer = Package.open(path, trusted_keys=trusted).signer
    if signer is None:  # pragma: no cover - check_signatures raises first
        raise PackageSignatureError(f"package {path} is unsigned")
    return signer
