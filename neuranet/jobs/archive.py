"""A job's project archive: pack a project directory into a deterministic tar.gz, check one
without extracting it, and unpack one safely.

Pure-ish core with thin I/O: every refusal is an :class:`ArchiveError` (an ``Invalid``) or an
:class:`ArchiveTooLarge` (a ``TooLarge``) whose message names the member or line at fault.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pathspec
from packaging.requirements import InvalidRequirement, Requirement

from neuranet.errors import Invalid, TooLarge

GiB = 1 << 30
IGNORE_FILES = (".gitignore", ".neuranetignore")
_MTIME = 0


class ArchiveError(Invalid):
    """The archive (or the project it is packed from) is not acceptable."""


class ArchiveTooLarge(ArchiveError, TooLarge):
    """The archive is over a size or count limit."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int = GiB  # compressed and uncompressed totals, each
    max_files: int = 100_000
    max_member_bytes: int = GiB


@dataclass(frozen=True)
class PackedArchive:
    path: Path
    sha256: str
    size: int
    files: int
    unpacked_bytes: int


@dataclass(frozen=True)
class ArchiveManifest:
    files: int
    unpacked_bytes: int
    entry: str
    requirements: str | None = None


def _human(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _rel_name(name: str, what: str) -> str:
    """Normalise a project-relative posix path, refusing absolute ones and ``..``."""
    if not name or name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{what} {name!r} is not a relative path inside the project")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if not parts or ".." in parts:
        raise ArchiveError(f"{what} {name!r} is not a path inside the project")
    return "/".join(parts)


# ---------------------------------------------------------------- requirements


def parse_requirements(text: str) -> list[str]:
    """One requirement per line; comments and blank lines allowed. Options (``-e``, ``-r``,
    ``--index-url``, ...), URLs and local paths are refused: only wheels from the configured
    index are installed."""
    out: list[str] = []
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        where = f"requirements line {no} ({raw.strip()!r})"
        if line.startswith("-"):
            raise ArchiveError(f"{where}: options are not allowed; only packages from the index are installed")
        if "://" in line or line.startswith((".", "/", "~")) or "\\" in line:
            raise ArchiveError(f"{where}: URLs and local paths are not allowed; only packages from the index are installed")
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise ArchiveError(f"{where} is not a valid requirement: {e}") from None
        if req.url:
            raise ArchiveError(f"{where}: URLs and local paths are not allowed; only packages from the index are installed")
        out.append(str(req))
    return out


# ---------------------------------------------------------------- pack


def _walk(root: Path) -> list[tuple[str, Path]]:
    """Every file and directory under root, honouring .gitignore/.neuranetignore files (nested
    ones apply below their directory), always skipping .git/. Sorted, posix relative names."""
    found: list[tuple[str, Path]] = []
    # stack of (dir prefix, spec) active for the current subtree
    def visit(d: Path, rel: str, specs: list[tuple[str, pathspec.GitIgnoreSpec]]) -> None:
        lines: list[str] = []
        for ign in IGNORE_FILES:
            f = d / ign
            if f.is_file():
                lines += f.read_text(errors="replace").splitlines()
        if lines:
            specs = [*specs, (rel, pathspec.GitIgnoreSpec.from_lines(lines))]
        for child in sorted(d.iterdir(), key=lambda p: p.name):
            name = child.name
            crel = f"{rel}/{name}" if rel else name
            if name == ".git":
                continue
            is_dir = child.is_dir() and not child.is_symlink()
            if _ignored(crel, is_dir, specs):
                continue
            found.append((crel, child))
            if is_dir:
                visit(child, crel, specs)

    visit(root, "", [])
    return found


def _ignored(rel: str, is_dir: bool, specs: list[tuple[str, pathspec.GitIgnoreSpec]]) -> bool:
    for base, spec in specs:
        sub = rel[len(base) + 1:] if base else rel
        if spec.match_file(sub + ("/" if is_dir else "")):
            return True
    return False


def pack(
    project_dir: Path,
    out_path: Path,
    *,
    entry: str,
    requirements: str | None = None,
    checkpoint_dir: str | None = None,
    limits: ArchiveLimits = ArchiveLimits(),
    on_progress: Callable[[int, int], None] | None = None,
) -> PackedArchive:
    """Pack project_dir into out_path (tar.gz, deterministic: the same tree gives the same sha256).
    Refuses, before writing anything big, a missing project, entry or requirements file, a
    malformed requirements file, and a tree over the limits. ``on_progress(done, total)`` gets
    uncompressed bytes."""
    root = Path(project_dir)
    if not root.is_dir():
        raise ArchiveError(f"project directory {str(root)!r} does not exist")
    root = root.resolve()
    entry_rel = _rel_name(entry, "entry point")
    entry_path = root / entry_rel
    if not entry_path.resolve().is_relative_to(root):
        raise ArchiveError(f"entry point {entry!r} is outside the project")
    if not entry_path.is_file():
        raise ArchiveError(f"entry point {entry!r} is not a file in the project {str(root)!r}")
    if requirements is not None:
        req_rel = _rel_name(requirements, "requirements file")
        req_path = root / req_rel
        if not req_path.resolve().is_relative_to(root) or not req_path.is_file():
            raise ArchiveError(f"requirements file {requirements!r} is not a file in the project")
        parse_requirements(req_path.read_text(errors="replace"))
    if checkpoint_dir is not None:
        _rel_name(checkpoint_dir, "checkpoint directory")

    members = _walk(root)
    total = 0
    files = 0
    for rel, p in members:
        if p.is_symlink():
            target = p.resolve()
            if not target.is_relative_to(root):
                raise ArchiveError(f"{rel!r} is a link pointing outside the project")
            continue
        if p.is_file():
            total += p.stat().st_size
        elif not p.is_dir():
            raise ArchiveError(f"{rel!r} is not a regular file or directory")
        files += 1
    if len(members) > limits.max_files:
        raise ArchiveTooLarge(
            f"project has {len(members)} files, over the {limits.max_files} limit; "
            "add what need not travel to .neuranetignore")
    if total > limits.max_bytes:
        raise ArchiveTooLarge(
            f"project is {_human(total)} unpacked, over the {_human(limits.max_bytes)} limit; "
            "add what need not travel to .neuranetignore")

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = 0
    h = hashlib.sha256()

    class _Hashing(io.RawIOBase):
        def __init__(self, f):
            self.f = f
            self.n = 0

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[override]
            self.n += len(b)
            if self.n > limits.max_bytes:
                raise ArchiveTooLarge(
                    f"project is over {_human(limits.max_bytes)} packed, over the limit; "
                    "add what need not travel to .neuranetignore")
            h.update(b)
            return self.f.write(b)

    try:
        with open(out, "wb") as raw:
            sink = _Hashing(raw)
            with gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=_MTIME) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for rel, p in members:
                        ti = tarfile.TarInfo(rel)
                        ti.mtime = _MTIME
                        ti.uid = ti.gid = 0
                        ti.uname = ti.gname = ""
                        if p.is_symlink():
                            ti.type = tarfile.SYMTYPE
                            ti.linkname = os.path.relpath(p.resolve(), p.parent.resolve())
                            ti.mode = 0o777
                            tar.addfile(ti)
                        elif p.is_dir():
                            ti.type = tarfile.DIRTYPE
                            ti.mode = 0o755
                            tar.addfile(ti)
                        else:
                            st = p.stat()
                            ti.size = st.st_size
                            ti.mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
                            with open(p, "rb") as f:
                                tar.addfile(ti, f)
                            done += st.st_size
                            if on_progress is not None:
                                on_progress(done, total)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return PackedArchive(path=out, sha256=h.hexdigest(), size=sink.n, files=files, unpacked_bytes=total)


# ---------------------------------------------------------------- check / unpack


class _Counting(io.RawIOBase):
    """Reads the decompressed stream, refusing once more than ``limit`` bytes came out."""

    def __init__(self, f, limit: int):
        self.f = f
        self.limit = limit
        self.n = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.f.read(min(len(b), 1 << 16))
        self.n += len(data)
        if self.n > self.limit:
            raise ArchiveTooLarge(
                f"archive unpacks to over {_human(self.limit)}, over the limit")
        b[: len(data)] = data
        return len(data)


def _members(path: Path, limits: ArchiveLimits, on_member: Callable[[tarfile.TarFile, tarfile.TarInfo, str], None] | None = None):
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"archive {str(path)!r} does not exist")
    if path.stat().st_size > limits.max_bytes:
        raise ArchiveTooLarge(f"archive is {_human(path.stat().st_size)}, over the {_human(limits.max_bytes)} limit")
    with open(path, "rb") as raw:
        if raw.read(2) != b"\x1f\x8b":
            raise ArchiveError("archive is not a gzip-compressed tar file")
        raw.seek(0)
        gz = gzip.GzipFile(fileobj=raw, mode="rb")
        # the tar framing (headers, padding) counts too; allow one record per member on top
        counting = _Counting(gz, limits.max_bytes + 1024 * (limits.max_files + 2) + 20 * 512)
        stream = io.BufferedReader(counting, buffer_size=1 << 16)
        files = 0
        total = 0
        names: set[str] = set()
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for m in tar:
                    name = _member_name(m.name)
                    files += 1
                    if files > limits.max_files:
                        raise ArchiveTooLarge(f"archive has more than {limits.max_files} members, over the limit")
                    if m.isfile():
                        if m.size > limits.max_member_bytes:
                            raise ArchiveTooLarge(f"member {m.name!r} is {_human(m.size)}, over the limit")
                        total += m.size
                        if total > limits.max_bytes:
                            raise ArchiveTooLarge(
                                f"archive unpacks to over {_human(limits.max_bytes)} (at member {m.name!r}), over the limit")
                    elif m.isdir():
                        pass
                    elif m.issym() or m.islnk():
                        _check_link(m, name)
                    else:
                        raise ArchiveError(f"member {m.name!r} is not a regular file, directory or link")
                    names.add(name)
                    if on_member is not None:
                        on_member(tar, m, name)
        except (tarfile.ReadError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
            if isinstance(e, ArchiveError):
                raise
            raise ArchiveError(f"archive is not a complete gzip-compressed tar file ({e})") from None
    return files, total, names


def _member_name(name: str) -> str:
    try:
        return _rel_name(name.rstrip("/") or name, "member")
    except ArchiveError:
        raise ArchiveError(f"member {name!r} has an absolute path or '..' component") from None


def _check_link(m: tarfile.TarInfo, name: str) -> None:
    target = m.linkname
    kind = "symlink" if m.issym() else "hard link"
    if not target or target.startswith("/") or "\\" in target:
        raise ArchiveError(f"member {m.name!r} is a {kind} to an absolute path {target!r}")
    base = PurePosixPath(name).parent if m.issym() else PurePosixPath("")
    depth: list[str] = list(base.parts)
    for part in PurePosixPath(target).parts:
        if part == "..":
            if not depth:
                raise ArchiveError(f"member {m.name!r} is a {kind} pointing outside the archive ({target!r})")
            depth.pop()
        elif part != ".":
            depth.append(part)


def check_archive(path: Path, *, entry: str, limits: ArchiveLimits = ArchiveLimits(),
                  requirements: str | None = None) -> ArchiveManifest:
    """Read the archive as a stream (never extracting) and refuse anything unsafe or over the
    limits; the message names the member. ``requirements``, if given, is read and parsed."""
    entry_rel = _rel_name(entry, "entry point")
    req_rel = _rel_name(requirements, "requirements file") if requirements is not None else None
    req_text: list[str] = []

    def grab(tar: tarfile.TarFile, m: tarfile.TarInfo, name: str) -> None:
        if req_rel is not None and name == req_rel and m.isfile():
            f = tar.extractfile(m)
            assert f is not None
            req_text.append(f.read().decode("utf-8", errors="replace"))

    files, total, names = _members(path, limits, grab)
    if entry_rel not in names:
        raise ArchiveError(f"entry point {entry!r} is not in the archive")
    text = None
    if req_rel is not None:
        if not req_text:
            raise ArchiveError(f"requirements file {requirements!r} is not in the archive")
        text = req_text[0]
        parse_requirements(text)
    return ArchiveManifest(files=files, unpacked_bytes=total, entry=entry_rel, requirements=text)


def unpack(path: Path, dest: Path, *, entry: str, limits: ArchiveLimits = ArchiveLimits(),
           requirements: str | None = None) -> ArchiveManifest:
    """Check the archive, then extract it into dest (created if missing) with tarfile's ``data``
    filter: no setuid/setgid bits, no devices, nothing outside dest."""
    manifest = check_archive(path, entry=entry, limits=limits, requirements=requirements)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest_root = dest.resolve()
    with tarfile.open(path, mode="r:gz") as tar:
        for m in tar:
            _member_name(m.name)
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise ArchiveError(f"member {m.name!r} is not a regular file, directory or link")
            target = (dest_root / m.name).resolve()
            if not target.is_relative_to(dest_root):
                raise ArchiveError(f"member {m.name!r} would be written outside the destination")
            try:
                tar.extract(m, dest_root, filter="data")
            except tarfile.FilterError as e:
                raise ArchiveError(f"member {m.name!r} refused: {e}") from None
    return manifest
