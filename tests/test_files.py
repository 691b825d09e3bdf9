"""`kmsgate.files.write_all`: the several files of one operation, all or none, on a real
file system."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from kmsgate.files import rename_new, write_all, write_new


def test_every_file_is_written_with_the_mode_and_replaces_what_was_there(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"before")
    write_all([(old, b"after"), (new, b"fresh")], mode=0o640)
    assert (old.read_bytes(), new.read_bytes()) == (b"after", b"fresh")
    assert {stat.S_IMODE(p.stat().st_mode) for p in (old, new)} == {0o640}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]  # no file kept aside


def test_a_file_that_cannot_be_written_leaves_every_path_as_it_was(tmp_path: Path) -> None:
    """Its temporary file cannot be made (the name is over NAME_MAX, as a full disk fails
    a write): the files before it are not renamed into place."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"before")
    too_long = tmp_path / ("n" * 250)
    with pytest.raises(OSError) as caught:
        write_all([(old, b"after"), (new, b"fresh"), (too_long, b"x")], mode=0o644)
    assert caught.value.filename == str(too_long)
    assert old.read_bytes() == b"before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_a_rename_that_fails_puts_back_the_files_renamed_before_it(tmp_path: Path) -> None:
    """The last path is a directory, which the rename refuses after the others were
    renamed: the replaced file gets its earlier content back (the same file, not a copy),
    the new one is removed, and a symbolic link replaced is put back as a link."""
    old, new, link = tmp_path / "old", tmp_path / "new", tmp_path / "link"
    old.write_bytes(b"before")
    link.symlink_to("old")
    inode = old.stat().st_ino
    directory = tmp_path / "directory"
    directory.mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        write_all([(old, b"after"), (new, b"fresh"), (link, b"x"), (directory, b"y")], mode=0o644)
    assert caught.value.filename == str(directory)
    assert old.read_bytes() == b"before" and old.stat().st_ino == inode
    assert os.readlink(link) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["directory", "link", "old"]


def test_a_path_given_twice_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    target = tmp_path / "out.pem"
    with pytest.raises(ValueError, match="given twice"):
        write_all([(target, b"a"), (target, b"b")], mode=0o644)
    assert list(tmp_path.iterdir()) == []


def test_write_new_never_replaces_and_leaves_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    write_new(target, b"secret", mode=0o600)
    assert target.read_bytes() == b"secret" and stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_new(target, b"other")
    assert target.read_bytes() == b"secret"


@pytest.mark.parametrize("hard_links", [True, False])
def test_rename_new_never_replaces_a_file_made_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    """Moved when nothing is at the path; else FileExistsError, both files as they were
    (also on a file system without hard links, where a last check precedes the rename)."""
    if not hard_links:

        def no_link(*_args: object, **_kwargs: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    source, path = tmp_path / "source", tmp_path / "path"
    source.write_bytes(b"new")
    path.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        rename_new(source, path)
    assert (source.read_bytes(), path.read_bytes()) == (b"new", b"theirs")
    path.unlink()
    rename_new(source, path)
    assert path.read_bytes() == b"new" and not source.exists()
