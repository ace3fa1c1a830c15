"""The compute market's project archive: pack honours ignores and is deterministic; check refuses
every unsafe or oversized archive, naming the member, without extracting; unpack round-trips."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from neuranet.errors import Invalid, TooLarge
from neuranet.jobs import archive as A
from neuranet.jobs.archive import (
    ArchiveError, ArchiveLimits, ArchiveTooLarge, check_archive, pack, parse_requirements, unpack,
)


def _project(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "train.py").write_text("print('hi')\n")
    (root / "src" / "model.py").write_text("X = 1\n")
    (root / "requirements.txt").write_text("# deps\nnumpy>=1.26\n\ntorch==2.13.0  # pinned\n")
    (root / ".gitignore").write_text("*.pyc\n/data/\n")
    (root / ".neuranetignore").write_text("big.bin\n")
    (root / "data").mkdir()
    (root / "data" / "x.csv").write_text("1,2\n")
    (root / "big.bin").write_bytes(b"\0" * 1000)
    (root / "src" / "m.pyc").write_bytes(b"c")
    (root / "src" / ".gitignore").write_text("local_*\n")
    (root / "src" / "local_notes.txt").write_text("n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref\n")
    (root / "ckpt").mkdir()
    (root / "ckpt" / "last.pt").write_bytes(b"w")
    return root


def _names(path: Path) -> list[str]:
    with tarfile.open(path, "r:gz") as t:
        return t.getnames()


def test_pack_honours_ignores_and_roundtrips(tmp_path):
    proj = _project(tmp_path / "p")
    seen = []
    packed = pack(proj, tmp_path / "a.tar.gz", entry="train.py", requirements="requirements.txt",
                  checkpoint_dir="ckpt", on_progress=lambda d, t: seen.append((d, t)))
    names = _names(packed.path)
    assert "train.py" in names and "src/model.py" in names and "ckpt/last.pt" in names
    for gone in ("data", "data/x.csv", "big.bin", "src/m.pyc", "src/local_notes.txt", ".git", ".git/HEAD"):
        assert gone not in names
    assert packed.size == packed.path.stat().st_size
    assert seen and seen[-1][0] == seen[-1][1] == packed.unpacked_bytes
    m = check_archive(packed.path, entry="train.py", requirements="requirements.txt")
    assert m.entry == "train.py" and m.unpacked_bytes == packed.unpacked_bytes
    assert parse_requirements(m.requirements or "") == ["numpy>=1.26", "torch==2.13.0"]
    out = tmp_path / "out"
    unpack(packed.path, out, entry="train.py")
    assert (out / "train.py").read_text() == "print('hi')\n"
    assert (out / "src" / "model.py").read_text() == "X = 1\n"


def test_pack_is_deterministic(tmp_path):
    a = pack(_project(tmp_path / "p1"), tmp_path / "a.tar.gz", entry="train.py")
    b = pack(_project(tmp_path / "p2"), tmp_path / "b.tar.gz", entry="train.py")
    import hashlib
    assert a.sha256 == b.sha256 == hashlib.sha256(a.path.read_bytes()).hexdigest()
    (tmp_path / "p2" / "train.py").write_text("print('changed')\n")
    c = pack(tmp_path / "p2", tmp_path / "c.tar.gz", entry="train.py")
    assert c.sha256 != a.sha256


@pytest.mark.parametrize("kwargs, needle", [
    ({"entry": "nope.py"}, "entry point 'nope.py'"),
    ({"entry": "../x.py"}, "entry point '../x.py'"),
    ({"entry": "/etc/passwd"}, "entry point '/etc/passwd'"),
    ({"entry": "train.py", "requirements": "missing.txt"}, "requirements file 'missing.txt'"),
])
def test_pack_refuses_bad_inputs(tmp_path, kwargs, needle):
    proj = _project(tmp_path / "p")
    with pytest.raises(ArchiveError) as e:
        pack(proj, tmp_path / "a.tar.gz", **kwargs)
    assert needle in str(e.value)
    assert not (tmp_path / "a.tar.gz").exists()


def test_pack_refuses_missing_project_and_bad_requirements(tmp_path):
    with pytest.raises(ArchiveError, match="does not exist"):
        pack(tmp_path / "none", tmp_path / "a.tar.gz", entry="train.py")
    proj = _project(tmp_path / "p")
    (proj / "requirements.txt").write_text("numpy\n-e git+https://x/y\n")
    with pytest.raises(ArchiveError, match="line 2"):
        pack(proj, tmp_path / "a.tar.gz", entry="train.py", requirements="requirements.txt")


def test_pack_refuses_a_tree_over_the_limits(tmp_path):
    proj = _project(tmp_path / "p")
    (proj / "weights.bin").write_bytes(b"\1" * 5000)
    with pytest.raises(ArchiveTooLarge, match="over the .* limit; add what need not travel to .neuranetignore"):
        pack(proj, tmp_path / "a.tar.gz", entry="train.py", limits=ArchiveLimits(max_bytes=4000))
    with pytest.raises(ArchiveTooLarge, match="files, over the 3 limit"):
        pack(proj, tmp_path / "a.tar.gz", entry="train.py", limits=ArchiveLimits(max_files=3))
    assert not (tmp_path / "a.tar.gz").exists()


def test_errors_map_to_domain_kinds():
    assert issubclass(ArchiveError, Invalid)
    assert issubclass(ArchiveTooLarge, TooLarge) and issubclass(ArchiveTooLarge, ArchiveError)


# ---------------------------------------------------------------- crafted bad archives


def _craft(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
            else:
                t.addfile(ti)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, type_: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.linkname = linkname
    return ti, None


@pytest.mark.parametrize("bad, needle", [
    (_file("/etc/evil"), "'/etc/evil'"),
    (_file("a/../../evil"), "'a/../../evil'"),
    (_special("ln", tarfile.SYMTYPE, "../../etc/passwd"), "'ln' is a symlink pointing outside"),
    (_special("sub/ln", tarfile.SYMTYPE, "../../x"), "'sub/ln' is a symlink pointing outside"),
    (_special("ln", tarfile.SYMTYPE, "/etc/passwd"), "'ln' is a symlink to an absolute path"),
    (_special("hl", tarfile.LNKTYPE, "../outside"), "'hl' is a hard link pointing outside"),
    (_special("hl", tarfile.LNKTYPE, "/etc/shadow"), "'hl' is a hard link to an absolute path"),
    (_special("dev", tarfile.CHRTYPE), "'dev' is not a regular file"),
    (_special("blk", tarfile.BLKTYPE), "'blk' is not a regular file"),
    (_special("fifo", tarfile.FIFOTYPE), "'fifo' is not a regular file"),
])
def test_check_refuses_unsafe_members(tmp_path, bad, needle):
    p = _craft(tmp_path / "bad.tar.gz", [_file("train.py"), bad])
    for call in (lambda: check_archive(p, entry="train.py"),
                 lambda: unpack(p, tmp_path / "out", entry="train.py")):
        with pytest.raises(ArchiveError) as e:
            call()
        assert needle in str(e.value)
    assert not (tmp_path / "out").exists()


def test_in_root_links_are_fine(tmp_path):
    p = _craft(tmp_path / "ok.tar.gz", [
        _file("train.py"), _special("sub/ln", tarfile.SYMTYPE, "../train.py"),
        _special("hl", tarfile.LNKTYPE, "train.py")])
    unpack(p, tmp_path / "out", entry="train.py")
    assert (tmp_path / "out" / "sub" / "ln").resolve() == (tmp_path / "out" / "train.py").resolve()


def test_too_many_files(tmp_path):
    p = _craft(tmp_path / "many.tar.gz", [_file("train.py")] + [_file(f"f{i}") for i in range(10)])
    with pytest.raises(ArchiveTooLarge, match="more than 5 members"):
        check_archive(p, entry="train.py", limits=ArchiveLimits(max_files=5))


def test_uncompressed_bomb_is_refused_without_decompressing_it(tmp_path, monkeypatch):
    big = 64 << 20  # 64 MiB of zeros compresses to ~64 KiB
    p = tmp_path / "bomb.tar.gz"
    with tarfile.open(p, "w:gz") as t:
        t.addfile(*_file("train.py"))
        for i in range(4):
            ti = tarfile.TarInfo(f"zeros{i}")
            ti.size = big // 4
            t.addfile(ti, io.BytesIO(bytes(big // 4)))
    assert p.stat().st_size < 1 << 20
    read = [0]
    orig = gzip.GzipFile.read

    def counting(self, n=-1):
        data = orig(self, n)
        read[0] += len(data)
        return data

    monkeypatch.setattr(gzip.GzipFile, "read", counting)
    limit = 20 << 20
    with pytest.raises(ArchiveTooLarge, match="over the limit") as e:
        check_archive(p, entry="train.py", limits=ArchiveLimits(max_bytes=limit))
    assert "zeros1" in str(e.value)
    assert read[0] < limit + (1 << 20)  # stopped at the member that goes over, not at the end
    with pytest.raises(ArchiveTooLarge):
        unpack(p, tmp_path / "out", entry="train.py", limits=ArchiveLimits(max_bytes=limit))
    assert not (tmp_path / "out").exists()


def test_one_oversized_member_is_refused_from_its_header(tmp_path):
    p = _craft(tmp_path / "b.tar.gz", [_file("train.py"), _file("w.bin", bytes(4096))])
    with pytest.raises(ArchiveTooLarge, match="'w.bin'"):
        check_archive(p, entry="train.py", limits=ArchiveLimits(max_member_bytes=1000))


def test_missing_entry(tmp_path):
    p = _craft(tmp_path / "a.tar.gz", [_file("other.py")])
    with pytest.raises(ArchiveError, match="entry point 'train.py' is not in the archive"):
        check_archive(p, entry="train.py")


def test_not_a_tarball_and_truncated(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not an archive at all")
    with pytest.raises(ArchiveError, match="not a gzip-compressed tar"):
        check_archive(junk, entry="train.py")
    gz_not_tar = tmp_path / "g.tar.gz"
    gz_not_tar.write_bytes(gzip.compress(b"plain text, not a tar" * 50))
    with pytest.raises(ArchiveError, match="not a complete gzip-compressed tar"):
        check_archive(gz_not_tar, entry="train.py")
    whole = _craft(tmp_path / "w.tar.gz", [_file("train.py"), _file("data", bytes(range(256)) * 400)])
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="not a complete gzip-compressed tar"):
        check_archive(cut, entry="train.py")
    with pytest.raises(ArchiveError, match="does not exist"):
        check_archive(tmp_path / "none.tar.gz", entry="train.py")


# ---------------------------------------------------------------- requirements


def test_parse_requirements_accepts_plain_requirements():
    text = "# top\n\nnumpy>=1.26\ntorch==2.13.0  # pinned\nrequests[socks]; python_version>'3'\n"
    assert parse_requirements(text) == ["numpy>=1.26", "torch==2.13.0",
                                        'requests[socks]; python_version > "3"']


@pytest.mark.parametrize("line, needle", [
    ("-e git+https://github.com/x/y", "options are not allowed"),
    ("--index-url https://evil/simple", "options are not allowed"),
    ("-r other.txt", "options are not allowed"),
    ("https://evil/x-1.0-py3-none-any.whl", "URLs and local paths"),
    ("pkg @ https://evil/pkg.whl", "URLs and local paths"),
    ("./local/pkg", "URLs and local paths"),
    ("/abs/pkg", "URLs and local paths"),
    ("not a requirement!!", "is not a valid requirement"),
])
def test_parse_requirements_refuses(line, needle):
    with pytest.raises(ArchiveError) as e:
        parse_requirements(f"numpy\n\n{line}\n")
    assert "line 3" in str(e.value) and needle in str(e.value) and line.split()[0] in str(e.value)
