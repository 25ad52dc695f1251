"""Bundle archives for model updates: a tar with the sha256 of every file and an optional signature.

::

    edge-ad-package.json    index: format, the bundle's model kind and hash, {path: {sha256, bytes}}
    edge-ad-package.sig     optional: {"alg": "hmac-sha256" | "ed25519", "key_id", "signature"} over the
                            exact bytes of the index (which holds the hash of every file)
    bundle/...              the bundle: manifest.json, every file it records (graphs, checkpoint,
                            Gaussian statistics, quant report), calibration.json and calibration.d/; not
                            what else lies in its folder: no engines/ (tied to the GPU and TensorRT
                            version, the device builds its own), eval/, training state (train_state.pt:
                            optimizer state for 'train --resume'), temp files, nor a file the manifest does
                            not record (left from an earlier model)

A bundle is packed only when its active graph is there and recorded (a bundle trained with --no-export
cannot inspect: run 'edge-ad export' first).

Keys: HMAC-SHA256 with a shared secret (bytes, or a file holding it), or Ed25519 (PEM files: the private
key signs, the public key verifies; needs the optional ``cryptography`` package, ``pip install
'edge-ad[sign]'``). :func:`extract_archive` checks everything before a byte lands outside its staging
folder: the signature (when a key is given, an unsigned archive is refused), member names and types
(regular files under ``bundle/`` only: no links, devices, absolute paths or ``..``), that the files are
exactly those of the index, and each file's size and sha256; then, before the caller installs anything,
that every file is one ``pack`` ships (:func:`ships`).

The index and the signature are the archive's first members, as ``pack`` writes them, and only they are
read before the signature is checked: an archive is never read through (a .tar.gz decompressed whole, a
member list kept in memory) on the strength of an index that may not verify. An index lists at most
:data:`MAX_FILES` files, so nothing an archive says can make extraction keep a huge member list.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..bundle import _CAL_RE, NOT_SHIPPED, Bundle, now_iso
from ..errors import InputError, RuntimeFailure

INDEX = "edge-ad-package.json"
SIGNATURE = "edge-ad-package.sig"
PREFIX = "bundle"
FORMAT = "edge-ad-package"
FORMAT_VERSION = 1
# A bundle has tens of files (graphs, checkpoint, Gaussian statistics: gaussian.d keeps 5) plus its calibration
# history, kept until 'edge-ad calibrate --prune' deletes old versions: one calibration.d/NNNN.json per calibrate
# and per persisted MQTT set_threshold, ~11,000 a year on a line tuned 30 times a day (10,000, the cap before,
# refused such a bundle within a year).
# An index or an archive with more entries than this is refused unread. What it bounds is memory: installing
# keeps the parsed index, tarfile's member list and the files' records, ~2 KB an entry at its peak (measured:
# 20 MB more for 10,000 calibration versions than for a bundle of tens of files), so 25,000 entries (over two
# years at 30 a day, a decade at 6) cost ~50 MB. Longer histories need pruning (see _check_count).
MAX_FILES = 25_000


@dataclass(frozen=True)
class SigningKey:
    alg: str            # "hmac-sha256" | "ed25519"
    secret: Any         # bytes (HMAC) or a cryptography Ed25519 key object
    key_id: str         # short fingerprint, recorded in the signature file

    @property
    def can_sign(self) -> bool:
        return self.alg == "hmac-sha256" or hasattr(self.secret, "sign")


@dataclass(frozen=True)
class PackageInfo:
    index: dict
    signed: bool
    alg: str | None
    key_id: str | None
    verified: bool      # the signature was checked against a key


# ----------------------------------------------------------------------------- keys
def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise InputError("Ed25519 keys need the 'cryptography' package: pip install 'edge-ad[sign]' "
                         "(or use an HMAC secret file)") from exc
    return serialization, ed25519, InvalidSignature


def load_key(key: bytes | str | os.PathLike | SigningKey) -> SigningKey:
    """A key from bytes (an HMAC secret) or a file: a PEM Ed25519 key, else the file's bytes as an HMAC
    secret (a trailing newline is stripped)."""
    if isinstance(key, SigningKey):
        return key
    where = "key"
    if isinstance(key, (bytes, bytearray)):
        data = bytes(key)
    else:
        p = Path(key)
        where = str(p)
        if not p.is_file():
            raise InputError(f"{p}: key file not found")
        data = p.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        serialization, ed25519, _ = _crypto()
        try:
            if b"PRIVATE KEY" in data:
                k = serialization.load_pem_private_key(data, password=None)
                pub = k.public_key()
            else:
                k = serialization.load_pem_public_key(data)
                pub = k
        except (ValueError, TypeError) as exc:
            raise InputError(f"{where}: not a readable PEM key without a password ({exc})") from exc
        if not isinstance(pub, ed25519.Ed25519PublicKey):
            raise InputError(f"{where}: a {type(pub).__name__}; expected an Ed25519 key "
                             "(make one with 'edge-ad bundle keygen')")
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return SigningKey("ed25519", k, hashlib.sha256(raw).hexdigest()[:16])
    secret = data.rstrip(b"\r\n")
    if len(secret) < 16:
        raise InputError(f"{where}: an HMAC secret of {len(secret)} bytes; expected at least 16")
    return SigningKey("hmac-sha256", secret, hashlib.sha256(b"edge-ad key id" + secret).hexdigest()[:16])


def generate_ed25519(private_path: str | os.PathLike, public_path: str | os.PathLike) -> str:
    """Write a new Ed25519 key pair (PEM; the private file mode 0600); returns the key id.

    Both paths are checked before either is written (two different files, each in a writable folder),
    and the private key is removed again when the public one cannot be written, so a failure leaves
    neither behind (and never a private key overwritten by its public half)."""
    from .. import atomic

    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise InputError(f"{private_path}: given for both the private and the public key; expected two files "
                         "(the public key would overwrite the private one)")
    atomic.check_creatable(private_path, "private key")
    atomic.check_creatable(public_path, "public key")
    serialization, ed25519, _ = _crypto()
    k = ed25519.Ed25519PrivateKey.generate()
    priv = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())
    pub = k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic.write_bytes(private_path, priv, mode=0o600)
    try:
        atomic.write_bytes(public_path, pub)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return load_key(public_path).key_id


def _sign(key: SigningKey, data: bytes) -> str:
    if key.alg == "hmac-sha256":
        return hmac.new(key.secret, data, hashlib.sha256).hexdigest()
    if not key.can_sign:
        raise InputError("signing needs the Ed25519 *private* key (the public key only verifies)")
    return key.secret.sign(data).hex()


def _verify(key: SigningKey, data: bytes, sig: dict, where: str) -> None:
    alg = sig.get("alg")
    if alg != key.alg:
        raise InputError(f"{where}: signed with '{alg}', but the key given is {key.alg}; update refused")
    try:
        signature = bytes.fromhex(str(sig.get("signature", "")))
    except ValueError:
        raise InputError(f"{where}: the signature is not hex; update refused") from None
    if key.alg == "hmac-sha256":
        if not hmac.compare_digest(hmac.new(key.secret, data, hashlib.sha256).digest(), signature):
            raise InputError(f"{where}: HMAC signature does not match (wrong key or altered archive); update refused")
        return
    _, _, InvalidSignature = _crypto()
    pub = key.secret.public_key() if hasattr(key.secret, "sign") else key.secret
    try:
        pub.verify(signature, data)
    except InvalidSignature:
        raise InputError(f"{where}: Ed25519 signature does not verify (wrong key or altered archive); "
                         "update refused") from None


# ----------------------------------------------------------------------------- pack
_NEVER = [n + "/" if n in ("engines", "eval") else n for n in NOT_SHIPPED]
# what an archive's bundle/ may hold, for messages
SHIPPED = ("manifest.json, calibration.json, calibration.d/NNNN.json and the files its manifest.json records; "
           f"never {', '.join(_NEVER[:-1])} or {_NEVER[-1]}")
# what to do about an archive that holds anything else (one packed by an older edge-ad, one made by hand)
REPACK = "pack the bundle again with 'edge-ad bundle pack BUNDLE_DIR OUT', which ships only those"


def ships(rel: str, b: Bundle) -> bool:
    """Whether bundle file ``rel`` is one ``pack`` ships from bundle ``b`` (:func:`_bundle_files`), and so one an
    archive may hold: manifest.json, calibration.json, a calibration version ``calibration.d/NNNN.json``, a
    file the manifest records (or a :meth:`Bundle.replace_files` cut off by a power cut was renaming in); never
    what :data:`edge_ad.bundle.NOT_SHIPPED` names, even recorded (TensorRT engines are built for one GPU,
    training state stays where it was trained)."""
    if rel.split("/")[0] in NOT_SHIPPED:
        return False
    if rel in ("manifest.json", "calibration.json") or rel in b.manifest["files"] or rel in b.replacing:
        return True
    folder, _, name = rel.rpartition("/")
    m = _CAL_RE.match(name)
    return folder == "calibration.d" and m is not None and b.calibration_version_file(int(m.group(1))).name == name


def _bundle_files(b: Bundle) -> list[str]:
    """What the bundle consists of: manifest.json, the files it records, the calibration in force and its
    history (never :data:`edge_ad.bundle.NOT_SHIPPED` or files the manifest does not record: :func:`ships`,
    which an install checks every file of an archive against). A file that is a symbolic link is refused:
    packed as a link, no device would accept it."""
    root = b.path
    names = {"manifest.json", "calibration.json", *b.manifest["files"], *b.replacing}
    names |= {f"calibration.d/{b.calibration_version_file(v).name}" for v in b.calibration_versions()}
    out = []
    for rel in sorted(names):
        p = b.file(rel)
        if not ships(rel, b):
            continue
        if p.is_symlink():   # left out, the archive would miss a file its manifest records
            raise InputError(f"{p}: a symbolic link (to {os.readlink(p)}); bundle files must be regular files: "
                             "replace the link with a copy of its target, then pack again (nothing packed)")
        if not p.is_file():
            continue
        out.append(rel)
    if "manifest.json" not in out:
        raise InputError(f"{root}: no manifest.json")
    return out


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def pack_bundle(bundle_dir: str | os.PathLike, out_archive: str | os.PathLike,
                sign_key: bytes | str | os.PathLike | None = None) -> Path:
    """Write ``out_archive`` (.tar; .tar.gz / .tgz compressed) from a bundle folder, verified first."""
    from .. import atomic

    if not Path(out_archive).name.lower().endswith(ARCHIVE_SUFFIXES):
        raise InputError(f"{out_archive}: expected a name ending in {', '.join(ARCHIVE_SUFFIXES)} (.tar.gz and "
                         ".tgz are compressed)")
    b = Bundle.open(bundle_dir, verify=True)
    try:  # a bundle without its graph cannot inspect (trained with --no-export, or an export that failed)
        graph = b.check_graph(verify=False)  # verified above
    except InputError as exc:
        raise InputError(f"{exc}; the bundle's active graph ({b.active_graph}) must be there and recorded "
                         "in manifest.json to pack it (nothing packed)") from None
    _check_opens(b, graph)
    key = load_key(sign_key) if sign_key is not None else None
    if key is not None and not key.can_sign:
        raise InputError(f"{sign_key}: a public key cannot sign; give the Ed25519 private key")
    root = b.path
    files = _bundle_files(b)
    _check_count(b, files)
    index_files = {}
    for rel in files:
        p = root / rel
        index_files[f"{PREFIX}/{rel}"] = {"sha256": atomic.sha256_file(p), "bytes": p.stat().st_size}
    index = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": now_iso(),
             "bundle": {"kind": b.kind, "model_hash": b.model_hash(), "image_size": list(b.image_size),
                        "active": b.manifest.get("active")},
             "files": index_files}
    index_bytes = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")
    out = Path(out_archive)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = out.name.lower()
    mode = "w:gz" if name.endswith((".tar.gz", ".tgz")) else "w"
    # a temp file nobody can guess (atomic.writing): a fixed '.NAME.tmp' in a shared folder let a planted link
    # make pack overwrite the file it pointed at
    with atomic.writing(out) as fh, tarfile.open(fileobj=fh, mode=mode, format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, INDEX, index_bytes)
        if key is not None:
            sig = {"alg": key.alg, "key_id": key.key_id, "signature": _sign(key, index_bytes)}
            _add_bytes(tar, SIGNATURE, (json.dumps(sig, indent=2) + "\n").encode())
        for rel in files:
            info = tar.gettarinfo(str(root / rel), arcname=f"{PREFIX}/{rel}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with open(root / rel, "rb") as src:
                tar.addfile(info, src)
    return out


def _check_opens(b: Bundle, graph: Path) -> None:
    """Refuse to pack a bundle that ``edge-ad run`` and ``bundle install`` refuse (packed, it failed at the
    install on the device): its active graph ``graph`` opened as they open it (:meth:`Inspector.open`; here on
    ONNX Runtime on this CPU, which every machine that packs has) under its calibration in force: a bundle
    without calibration.json, whose manifest names outputs the graph lacks, whose calibration names maps the
    model does not make or Gaussian statistics that are not there."""
    from ..errors import EdgeADError
    from ..inspector import Inspector

    try:
        Inspector.open(b, "onnxruntime", b.active_precision, "cpu", graph=graph, threads=1).backend.close()
    except EdgeADError as exc:
        raise InputError(f"{exc}; edge-ad run and bundle install refuse such a bundle (nothing packed)") from None


def _check_count(b: Bundle, files: list[str]) -> None:
    """Refuse to pack more files than an install accepts (:data:`MAX_FILES`), before anything is written: packed,
    the archive was refused by pack's own check afterwards ("update refused") and left on disk, unusable. What
    grows is the calibration history (kept until pruned), so name the command that shortens it, with the most
    versions it may keep for the bundle to pack."""
    if len(files) <= MAX_FILES:
        return
    cal = [rel for rel in files if rel.startswith("calibration.d/")]
    # the prune keeps KEEP newest versions and up to 3 more (in force, plain rollback target, v1)
    most = max(1, MAX_FILES - (len(files) - len(cal)) - 3)
    raise InputError(f"{b.path}: {len(files):,} files to pack ({len(cal):,} of them calibration versions in "
                     f"calibration.d/), and an install accepts at most {MAX_FILES:,}: delete old calibration versions "
                     f"with 'edge-ad calibrate --bundle {b.path} --prune KEEP' (KEEP: the newest versions to keep, at "
                     f"most {most:,} here; the one in force and the one a rollback goes back to are always kept; "
                     "--dry-run shows what would go), then pack again (nothing packed)")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------- verify and extract
# the compressions tarfile's "r:*" tries, by the bytes a file of theirs starts with
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))


def _open_tar(archive: Path) -> tarfile.TarFile:
    if not archive.is_file():
        raise InputError(f"{archive}: archive not found")
    try:
        return tarfile.open(archive, "r:*")
    except tarfile.ReadError as exc:   # its message lists each decompression tried: say what the file is instead
        raise InputError(f"{archive}: {_not_a_tar(archive)}; expected a tar or tar.gz archive made by 'edge-ad "
                         "bundle pack'; update refused") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"{archive}: not a readable tar archive ({exc}); update refused") from exc


def _not_a_tar(archive: Path) -> str:
    """What ``archive``, which tarfile cannot open, is, in a few words: empty, a compressed file that holds no
    tar archive (or a cut-short one), too short for a tar archive, or something else."""
    try:
        with open(archive, "rb") as fh:
            head = fh.read(512)
    except OSError:
        head = b""
    if not head:
        return "an empty file"
    for magic, kind in _COMPRESSED:
        if head.startswith(magic):
            return f"a {kind} file holding no readable tar archive (corrupt or cut short)"
    if len(head) < 512:
        return f"not a tar archive ({len(head)} bytes, shorter than a tar header)"
    return "not a tar archive"


def _safe_name(name: str, where: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or name != p.as_posix() or ".." in p.parts or len(p.parts) < 2 or p.parts[0] != PREFIX:
        raise InputError(f"{where}: member '{name}' is outside bundle/ or not a plain relative path; update refused")
    return name


def read_index(archive: str | os.PathLike, key: bytes | str | os.PathLike | SigningKey | None = None,
               require_signature: bool | None = None) -> PackageInfo:
    """Read and check the index and the signature (without extracting anything)."""
    archive = Path(archive)
    key_obj = load_key(key) if key is not None else None
    if require_signature is None:
        require_signature = key_obj is not None
    with _open_tar(archive) as tar:
        index_bytes, sig = _index_and_sig(tar, archive)
    return _check_index(archive, index_bytes, sig, key_obj, require_signature)


def _index_and_sig(tar: tarfile.TarFile, archive: Path) -> tuple[bytes, dict | None]:
    """The index and the signature: the archive's first members ('edge-ad bundle pack' writes the index, then
    the signature). Reading stops at the first other member, so what follows is never read (nor decompressed,
    nor kept in ``tar.members``) before the signature is checked: a hostile archive of a million members is
    refused at once. :func:`extract_archive` refuses an index or a signature found later on."""
    index_bytes = sig_bytes = None
    seen = []   # the names read: at most the index, the signature and one other
    try:
        for m in tar:
            seen.append(f"'{m.name[:200]}'")
            if m.name not in (INDEX, SIGNATURE):
                break
            if not m.isfile() or m.size > 64 << 20:
                raise InputError(f"{archive}: '{m.name}' is not a plain file of sane size; update refused")
            data = tar.extractfile(m).read()
            if m.name == INDEX:
                if index_bytes is not None:
                    raise InputError(f"{archive}: two '{INDEX}' members; update refused")
                index_bytes = data
            else:
                if sig_bytes is not None:
                    raise InputError(f"{archive}: two '{SIGNATURE}' members; update refused")
                sig_bytes = data
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{archive}: corrupt archive ({exc}); update refused") from exc
    if index_bytes is None:
        found = f"it starts with {', '.join(seen)}" if seen else "it holds no member"
        raise InputError(f"{archive}: no '{INDEX}' among its first two members ({found}); an archive made by "
                         f"'edge-ad bundle pack' starts with its index, then its signature; update refused")
    sig = None
    if sig_bytes is not None:
        try:
            sig = json.loads(sig_bytes)
            if not isinstance(sig, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise InputError(f"{archive}: unreadable '{SIGNATURE}' ({exc}); update refused") from exc
    return index_bytes, sig


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_index(archive: Path, index_bytes: bytes, sig: dict | None, key: SigningKey | None,
                 require_signature: bool) -> PackageInfo:
    if sig is None and require_signature:
        raise InputError(f"{archive}: unsigned, and a signed archive is required; update refused")
    verified = False
    if sig is not None and key is not None:
        _verify(key, index_bytes, sig, str(archive))
        verified = True
    try:
        index = json.loads(index_bytes)
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"'format' is not '{FORMAT}'")
        version = index.get("format_version", 0)
        if not _is_int(version):
            raise ValueError(f"format_version {str(version)[:40]!r} is not a whole number")
        if version > FORMAT_VERSION:
            raise ValueError(f"format_version {version} is newer than this edge_ad reads")
        files = index["files"]
        if not isinstance(files, dict) or f"{PREFIX}/manifest.json" not in files:
            raise ValueError("'files' does not list bundle/manifest.json")
        if len(files) > MAX_FILES:
            raise ValueError(f"'files' lists {len(files):,} entries; at most {MAX_FILES:,} are accepted (a bundle's "
                             "files and its calibration history)")
        for name, rec in files.items():
            _safe_name(name, str(archive))
            if not isinstance(rec, dict) or len(str(rec.get("sha256", ""))) != 64:
                raise ValueError(f"entry '{name}' lacks sha256")
            if not _is_int(rec.get("bytes")) or rec["bytes"] < 0:
                raise ValueError(f"entry '{name}': bytes {str(rec.get('bytes'))[:40]!r} is not a whole number >= 0")
        for name in files:
            if name.split("/")[1] in NOT_SHIPPED:   # whatever the manifest says: see ships()
                raise InputError(f"{archive}: '{name}' is never part of a bundle archive (it holds {SHIPPED}: "
                                 f"{REPACK}; an edge-ad before 706432c (2026-12-05) packed all of the folder but "
                                 "engines/); update refused")
            # 'bundle/a' and 'bundle/a/b' cannot both be files: extracting one would fail on the other as if
            # the disk were at fault
            for parent in PurePosixPath(name).parents[:-2]:
                if parent.as_posix() in files:
                    raise InputError(f"{archive}: the index lists both '{parent}' and '{name}', so '{parent}' would "
                                     "be a file and a folder at once (not made by 'edge-ad bundle pack'); update "
                                     "refused")
    except InputError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{archive}: invalid '{INDEX}' ({exc}); update refused") from exc
    return PackageInfo(index=index, signed=sig is not None, alg=(sig or {}).get("alg"),
                       key_id=(sig or {}).get("key_id"), verified=verified)


def _write_failed(exc: OSError, dest: Path, name: str) -> RuntimeFailure:
    """Writing the extracted bundle failed (a full disk, an I/O error): not the archive's fault."""
    return RuntimeFailure(f"{dest.parent}: {(exc.strerror or str(exc)).lower()} (extracting {name}); update not "
                          "installed")


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike,
                    key: bytes | str | os.PathLike | SigningKey | None = None,
                    require_signature: bool | None = None) -> PackageInfo:
    """Verify ``archive`` and extract its bundle into the new folder ``dest`` (which must not exist).

    Raises :class:`InputError` (and leaves ``dest`` removed) for a bad signature, an unsigned archive when
    one is required, unsafe or unexpected members, or any size / sha256 mismatch.
    """
    import shutil

    archive, dest = Path(archive), Path(dest)
    key_obj = load_key(key) if key is not None else None
    if require_signature is None:
        require_signature = key_obj is not None
    if dest.exists():
        raise InputError(f"{dest}: already exists; extraction needs a new folder")
    with _open_tar(archive) as tar:
        index_bytes, sig = _index_and_sig(tar, archive)
    info = _check_index(archive, index_bytes, sig, key_obj, require_signature)
    files = info.index["files"]
    dest.mkdir(parents=True)
    seen: set[str] = set()
    try:
        with _open_tar(archive) as tar:
            m, reading = None, None   # the member last read, and whether its content was being read
            try:
                count, head = 0, True   # head: still among the index and signature members at the start
                for m in tar:
                    count += 1   # every member is kept in tar.members: a signed index cannot lift this cap
                    if count > MAX_FILES + 2:
                        raise InputError(f"{archive}: more than {MAX_FILES:,} members besides its index and "
                                         "signature (a bundle's files and its calibration history); update refused")
                    if m.name in (INDEX, SIGNATURE):
                        if not head:   # read_index stopped before it: never checked, never ignored
                            raise InputError(f"{archive}: '{m.name}' after the bundle's files ('edge-ad bundle "
                                             "pack' writes it first); update refused")
                        continue
                    head = False
                    if m.isdir():
                        _safe_name(m.name + "/x", str(archive))
                        continue
                    if not m.isfile():
                        raise InputError(f"{archive}: member '{m.name}' is a link or special file; update refused")
                    name = _safe_name(m.name, str(archive))
                    if name not in files:
                        raise InputError(f"{archive}: member '{name}' is not in the index; update refused")
                    if name in seen:
                        raise InputError(f"{archive}: member '{name}' appears twice; update refused")
                    seen.add(name)
                    rec = files[name]
                    if m.size != int(rec["bytes"]):
                        raise InputError(f"{archive}: '{name}' is {m.size} bytes, the index says {rec['bytes']}; "
                                         "update refused")
                    out = dest / PurePosixPath(name).relative_to(PREFIX)
                    try:
                        out.parent.mkdir(parents=True, exist_ok=True)
                    except OSError as exc:
                        raise _write_failed(exc, dest, name) from exc
                    h = hashlib.sha256()
                    reading = name
                    src = tar.extractfile(m)
                    try:
                        fh = open(out, "wb")
                    except OSError as exc:
                        raise _write_failed(exc, dest, name) from exc
                    with fh:
                        while True:
                            block = src.read(1 << 20)
                            if not block:
                                break
                            h.update(block)
                            try:
                                fh.write(block)
                            except OSError as exc:
                                raise _write_failed(exc, dest, name) from exc
                        try:
                            fh.flush()
                            os.fsync(fh.fileno())
                        except OSError as exc:
                            raise _write_failed(exc, dest, name) from exc
                    if h.hexdigest() != rec["sha256"]:
                        raise InputError(f"{archive}: '{name}' has sha256 {h.hexdigest()[:12]}…, the index says "
                                         f"{rec['sha256'][:12]}… (corrupt or altered); update refused")
                    reading = None
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:   # reading it: writes are told above
                where = f"in '{reading}'" if reading else f"after '{m.name[:200]}'" if m else "at its start"
                raise InputError(f"{archive}: corrupt or cut-short archive ({exc}, {where}); update refused") \
                    from exc
        missing = sorted(set(files) - seen)
        if missing:
            raise InputError(f"{archive}: files listed in the index are missing: {', '.join(missing[:5])}; "
                             "update refused")
        # Only files 'pack' ships: which ones depends on the manifest, which is one member among the others
        # (sorted after the checkpoint), so this is checked once all are extracted into dest rather than in a
        # second read of the whole archive. dest is a new folder of the caller's (a release's staging folder)
        # and removed below, so a refused file is never installed, nor left behind.
        b = Bundle.open(dest, verify=True)
        foreign = sorted(n for n in files if not ships(n[len(PREFIX) + 1:], b))
        if foreign:
            raise InputError(f"{archive}: '{foreign[0]}' is not part of the bundle, its manifest.json does not "
                             f"record it (an archive holds {SHIPPED}: {REPACK}); update refused")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return info
