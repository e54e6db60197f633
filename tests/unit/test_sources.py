"""Where a job's images come from: one rule for lines of URLs, whichever door (CLI file, web upload, form,
JSON list) they arrive through."""

from __future__ import annotations

import io

import pytest

from pipeline.errors import UserInputError
from pipeline.ops.sources import image_urls_from_file, image_urls_from_upload, local_image_urls, url_lines

LINES = ["  https://host/a.png ", "", "# a comment", "/srv/traps/b.png", "file:///srv/traps/c.png",
         "s3://bucket/d.png"]
EXPECTED = ["https://host/a.png", "file:///srv/traps/b.png", "file:///srv/traps/c.png", "s3://bucket/d.png"]


def test_a_url_is_kept_an_absolute_path_becomes_its_file_url_and_blanks_and_comments_are_skipped():
    assert list(url_lines(LINES)) == EXPECTED  # unknown schemes are the job's to refuse, by name


def test_the_same_lines_give_the_same_urls_from_a_file_and_from_an_upload(tmp_path, monkeypatch):
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(LINES))
    monkeypatch.chdir(tmp_path)
    assert list(image_urls_from_file(str(listing))) == EXPECTED
    assert list(image_urls_from_upload(io.BytesIO(listing.read_bytes()), "urls.txt")) == EXPECTED


def test_a_relative_path_is_the_working_directory_s_on_the_cli_and_refused_from_the_web(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "urls.txt").write_text("night/e.png\n")
    assert list(image_urls_from_file("urls.txt")) == [f"file://{tmp_path}/night/e.png"]
    with pytest.raises(UserInputError, match="not an image URL .*absolute path.*'night/e.png'"):
        list(image_urls_from_upload(io.BytesIO(b"night/e.png\n"), "urls.txt"))


def test_unreadable_sources_are_named(tmp_path):
    with pytest.raises(UserInputError, match="cannot read --images-file"):
        list(image_urls_from_file(str(tmp_path / "missing.txt")))
    (tmp_path / "latin1.txt").write_bytes(b"/srv/caf\xe9.png\n")
    with pytest.raises(UserInputError, match="is not UTF-8 text"):
        list(image_urls_from_file(str(tmp_path / "latin1.txt")))
    with pytest.raises(UserInputError, match="upload.txt is not UTF-8 text"):
        list(image_urls_from_upload(io.BytesIO(b"/srv/caf\xe9.png\n"), "upload.txt"))
    with pytest.raises(UserInputError, match="no such image file"):
        list(local_image_urls([str(tmp_path / "nope.png")]))
