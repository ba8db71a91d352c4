"""Package signatures: ed25519 over the exact bytes of ``manifest.json``.

The manifest holds a sha256 and a size for every file of a package, so a signature over its
bytes covers the whole content. Signatures cannot be listed in the manifest (it would have to
hash its own signature), so they live beside it in ``signatures.json``, the one file a package
may hold that its manifest does not list::

    {"format": 1,
     "signatures": [{"algorithm": "ed25519", "key_id": "3f2a9c0d1e4b5a67",
                     "public_key": "<base64 of the raw 32-byte key>", "signature": "<base64, 64 bytes>"}]}

``key_id`` is the first 16 hex digits of the sha256 of the raw public key. The public key is
carried so that a signature can be checked even where no key is trusted; whether it is trusted
is decided only by the keys a device holds (:func:`check_signatures`, applied by
:meth:`runtime.package.Package.open`):

- trusted keys given: the package must carry a signature by one of them that verifies;
  unsigned, signed only by other keys, or any signature that does not verify is refused.
- none given: an unsigned package opens as before, but a signature that is present must verify
  (a manifest changed after signing is refused everywhere). Without the ``cryptography``
  package such a signature cannot be checked: that is logged, and the package opens unchecked.

Keys are PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key), the formats OpenSSL
reads: ``openssl pkey -in line.key -pubout`` gives ``line.pub``. ``cryptography`` is imported
only when a key or a signature is used, so the runtime imports without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from edge_sdk.errors import BackendUnavailableError, PackageError

log = logging.getLogger(__name__)

SIGNATURES = "signatures.json"
FORMAT = 1
ALGORITHM = "ed25519"
MAX_SIGNATURES_BYTES = 1 << 20
MAX_SIGNATURES = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class PackageSignatureError(PackageError):
    """A package is unsigned where a signature is required, signed by an untrusted key, or its signature
    (or a key file) is bad."""


def key_id(raw_public_key: bytes) -> str:
    """The id a key is known by: the first 16 hex digits of the sha256 of its raw 32 bytes."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A trusted (or carried) ed25519 public key: its raw 32 bytes, and where it was read from."""

    raw: bytes
    source: str = ""

    @property
    def key_id(self) -> str:
        return key_id(self.raw)


@dataclass(frozen=True)
class SigningKey:
    """An ed25519 private key read from a file; :meth:`sign` signs bytes with it."""

    private: Any = field(repr=False)  # cryptography's Ed25519PrivateKey
    public: PublicKey

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        return bytes(self.private.sign(data))


@dataclass(frozen=True)
class Signature:
    """One entry of ``signatures.json``."""

    key_id: str
    public_key: bytes
    signature: bytes

    def to_dict(self) -> dict[str, str]:
        return {"algorithm": ALGORITHM, "key_id": self.key_id,
                "public_key": base64.b64encode(self.public_key).decode("ascii"),
                "signature": base64.b64encode(self.signature).decode("ascii")}


def _crypto(extra: str) -> Any:
    """cryptography's ed25519 and serialization modules, or an error naming the extra to install."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BackendUnavailableError(
            "ed25519 package signatures need the 'cryptography' package, which is not installed",
            hint=f"pip install 'edge-sdk[{extra}]'") from None
    return ed25519, serialization


def have_cryptography() -> bool:
    try:
        _crypto("serve")
    except BackendUnavailableError:
        return False
    return True


# -- key files ---------------------------------------------------------------------------------

def generate_key_pair(out_dir: str | os.PathLike[str], name: str = "edge-sdk") -> tuple[Path, Path, str]:
    """Write ``NAME.key`` (PKCS#8 PEM, mode 0600) and ``NAME.pub`` (PEM) into ``out_dir``; existing files
    are never overwritten. Returns both paths and the key id."""
    ed25519, serialization = _crypto("convert")
    if not _NAME.fullmatch(name):
        raise PackageSignatureError(f"key name {name!r} is not a plain file name",
                                    hint="use letters, digits, '.', '_' and '-', e.g. line1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise PackageSignatureError(f"{path} already exists; refusing to overwrite a key",
                                        hint="choose another --name or --out")
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = private.public_key()
    pub_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(key_path, pem, 0o600)
    try:
        _write_new(pub_path, pub_pem, 0o644)
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_path, pub_path, key_id(raw)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may only have narrowed it; make it exact
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key_file(path: Path, kind: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PackageSignatureError(f"{kind} file {str(path)!r} cannot be read: {exc.strerror}",
                                    hint="check the path and that this user may read it") from None
    if len(data) > 64 << 10:
        raise PackageSignatureError(f"{kind} file {str(path)!r} is {len(data)} bytes; expected a small PEM file")
    return data


def load_public_key(path: str | os.PathLike[str], *, extra: str = "serve") -> PublicKey:
    """Read an ed25519 public key (PEM, as ``edge-sdk keys generate`` writes ``NAME.pub``)."""
    ed25519, serialization = _crypto(extra)
    file = Path(path)
    data = _read_key_file(file, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise PackageSignatureError(f"public key file {str(file)!r} is not an ed25519 public key in PEM form",
                                    hint="pass the NAME.pub that `edge-sdk keys generate` wrote (not the .key)")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(bytes(raw), str(file))


def load_signing_key(path: str | os.PathLike[str], *, extra: str = "convert") -> SigningKey:
    """Read an unencrypted ed25519 private key (PKCS#8 PEM, as ``edge-sdk keys generate`` writes it)."""
    ed25519, serialization = _crypto(extra)
    file = Path(path)
    data = _read_key_file(file, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PackageSignatureError(f"private key file {str(file)!r} is encrypted; edge-sdk reads unencrypted "
                                    "keys only", hint="keep the key unencrypted with mode 0600 on the signing "
                                                      "machine") from None
    except ValueError:
        key = None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PackageSignatureError(f"private key file {str(file)!r} is not an ed25519 private key in PEM form",
                                    hint="create one with `edge-sdk keys generate --out DIR`")
    mode = file.stat().st_mode
    if mode & 0o077:
        log.warning("private key %s may be read by other users (mode %o); chmod 600 it", file, mode & 0o777)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey(key, PublicKey(bytes(raw), str(file)))


# -- signatures.json ---------------------------------------------------------------------------

def _b64(value: Any, size: int, what: str, where: str) -> bytes:
    try:
        data = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        data = b""
    if len(data) != size:
        raise PackageSignatureError(f"{SIGNATURES} of {where} has a {what} that is not {size} base64-encoded bytes")
    return data


def parse_signatures(data: bytes, where: str | os.PathLike[str]) -> tuple[Signature, ...]:
    """The entries of a ``signatures.json`` document; a malformed one is refused."""
    w = str(where)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageSignatureError(f"{SIGNATURES} of {w} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("signatures"), list):
        raise PackageSignatureError(f"{SIGNATURES} of {w} is not a format-{FORMAT} signature list",
                                    hint="sign the package again with this edge-sdk: edge-sdk sign PKG --key KEY "
                                         "--replace")
    entries = doc["signatures"]
    if not entries or len(entries) > MAX_SIGNATURES:
        raise PackageSignatureError(
            f"{SIGNATURES} of {w} holds {len(entries)} signatures; expected 1-{MAX_SIGNATURES}")
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("algorithm") != ALGORITHM:
            raise PackageSignatureError(f"{SIGNATURES} of {w} has an entry that is not an {ALGORITHM} signature")
        public = _b64(entry.get("public_key"), 32, "public_key", w)
        if entry.get("key_id") != key_id(public):
            raise PackageSignatureError(f"{SIGNATURES} of {w} names key {entry.get('key_id')!r} for a public key "
                                        f"whose id is {key_id(public)}")
        out.append(Signature(key_id(public), public, _b64(entry.get("signature"), 64, "signature", w)))
    return tuple(out)


def signatures_document(manifest_bytes: bytes, key: SigningKey, keep: Sequence[Signature] = ()) -> bytes:
    """``signatures.json`` with ``key``'s signature over ``manifest_bytes``, after the ``keep`` entries of
    other keys (an earlier signature by the same key is replaced)."""
    entries = [s for s in keep if s.key_id != key.key_id]
    entries.append(Signature(key.key_id, key.public.raw, key.sign(manifest_bytes)))
    return json.dumps({"format": FORMAT, "signatures": [s.to_dict() for s in entries]},
                      indent=2, sort_keys=True).encode("utf-8") + b"\n"


def _verifies(ed25519: Any, raw_public_key: bytes, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(raw_public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def check_signatures(manifest_bytes: bytes, document: bytes | None, trusted: Sequence[PublicKey] | None,
                     where: str | os.PathLike[str]) -> str | None:
    """Apply the signing policy (see the module docstring) to a package's exact manifest bytes and its
    ``signatures.json`` (None: absent). Returns the key id that signed (the trusted one when keys are
    given), or None for an unsigned package (or an unchecked signature) where no key is trusted."""
    w = str(where)
    keys = {k.key_id: k for k in trusted or ()}
    signatures = parse_signatures(document, w) if document is not None else ()
    if not signatures:
        if keys:
            raise PackageSignatureError(
                f"package {w} is unsigned; this device serves only packages signed by a trusted key "
                f"({', '.join(sorted(keys))})", hint="sign it on the workstation: edge-sdk sign PKG --key KEY")
        return None
    if not keys and not have_cryptography():
        log.warning("package %s is signed by %s, but its signature is not checked: the cryptography package is "
                    "not installed (pip install 'edge-sdk[serve]')", w, ", ".join(s.key_id for s in signatures))
        return None
    ed25519, _ = _crypto("serve")
    for s in signatures:
        public = keys[s.key_id].raw if s.key_id in keys else s.public_key
        if not _verifies(ed25519, public, s.signature, manifest_bytes):
            raise PackageSignatureError(
                f"the signature of package {w} by key {s.key_id} does not verify: its manifest.json was changed "
                "after it was signed", hint="the package may have been tampered with; rebuild it, or sign the "
                                            "original again on the workstation")
    if not keys:
        return signatures[0].key_id
    for s in signatures:
        if s.key_id in keys:
            return s.key_id
    raise PackageSignatureError(
        f"package {w} is signed by untrusted key {', '.join(s.key_id for s in signatures)}; this device trusts "
        f"{', '.join(sorted(keys))}", hint="sign it with a trusted key, or add its public key to [trust] keys")
