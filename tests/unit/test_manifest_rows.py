"""Manifests (pipeline/core/manifests.py, pipeline/ops/sources.py): a CSV or JSON-lines file, an image a row, with
what it says of each image, checked and normalised; a bad row is named by its line."""

from __future__ import annotations

import io

import pytest

from pipeline.core.manifests import Row, metadata
from pipeline.errors import UserInputError
from pipeline.ops.sources import manifest_format, manifest_from_objects, manifest_rows, uploaded_images


def rows(text: str, fmt: str = "csv", base_dir: str | None = "/data") -> list[Row]:
    return list(manifest_rows(io.StringIO(text), fmt, base_dir=base_dir, name="m." + fmt))


def test_a_csv_manifest_gives_each_image_its_metadata():
    found = rows("url,deployment,timestamp,latitude,longitude,camera\n"
                 "traps/a.jpg,pole 7,2024-06-01T22:05:00Z,45.5,-73.56,cam-1\n"
                 "https://x.example/b.jpg,,,,,\n")
    assert found == [
        Row("file:///data/traps/a.jpg", {"deployment": "pole 7", "timestamp": "2024-06-01T22:05:00+00:00",
                                        "latitude": 45.5, "longitude": -73.56, "camera": "cam-1"}),
        Row("https://x.example/b.jpg", None)]


def test_a_jsonl_manifest_keeps_numbers_and_flags_of_its_own_fields():
    found = rows('{"url": "s3://traps/n1/a.jpg", "deployment": "p7", "exposure_ms": 12.5, "flash": true}\n\n'
                 '{"url": "/abs/b.jpg"}\n', "jsonl", base_dir=None)
    assert found == [Row("s3://traps/n1/a.jpg", {"deployment": "p7", "exposure_ms": 12.5, "flash": True}),
                     Row("file:///abs/b.jpg", None)]


@pytest.mark.parametrize("text, fmt, message", [
    ("path,deployment\na.jpg,p\n", "csv", "one must be url"),
    ("url,url\na.jpg,b.jpg\n", "csv", "names a column twice"),
    ("url,deployment\na.jpg,p,extra\n", "csv", "manifest line 2: 3 cells under 2 columns"),
    ("url,latitude\na.jpg,45\nb.jpg,95\n", "csv", "manifest line 3: latitude '95' is not a number of degrees"),
    ("url,longitude\na.jpg,east\n", "csv", "manifest line 2: longitude 'east' is not a number"),
    ("url,timestamp\na.jpg,2024-06-01 22:05\n", "csv", "line 2: timestamp '2024-06-01 22:05' has no time zone"),
    ("url,timestamp\na.jpg,last night\n", "csv", "is not an ISO 8601 date and time"),
    ("url,bad name\na.jpg,x\n", "csv", "field name 'bad name' may use letters"),
    ("url,deployment\n,p\n", "csv", "manifest line 2: no url"),
    ('{"url": "a.jpg"}\nnot json\n', "jsonl", "manifest line 2: not a JSON object"),
    ('["a.jpg"]\n', "jsonl", "manifest line 1: not a JSON object"),
    ('{"url": "a.jpg", "shape": {"x": 1}}\n', "jsonl", "shape must be text, a number or true/false"),
    ('{"url": "ftp://x/a.jpg"}\n', "jsonl", None),  # a URL's scheme is checked when the job is made
    ('{"url": "a.jpg", "deployment": "line\\nbreak"}\n', "jsonl", "without control characters"),
])
def test_a_bad_row_is_refused_naming_its_line(text, fmt, message):
    if message is None:
        assert rows(text, fmt)
        return
    with pytest.raises(UserInputError, match=message):
        rows(text, fmt)


def test_a_relative_path_means_nothing_in_an_upload():
    with pytest.raises(UserInputError, match="manifest line 2: not an image URL"):
        list(uploaded_images(io.BytesIO(b"url\nrelative/a.jpg\n"), "night.csv"))
    assert list(uploaded_images(io.BytesIO(b"https://x.example/a.jpg\n"), "list.txt")) == ["https://x.example/a.jpg"]


def test_more_than_twenty_fields_of_ones_own_are_refused():
    with pytest.raises(UserInputError, match="more than 20 fields"):
        metadata({f"f{n}": "x" for n in range(21)}, 4)


def test_the_api_s_images_are_rows_counted_from_one():
    assert list(manifest_from_objects([{"url": "https://x.example/a.jpg", "deployment": "p"}])) == [
        Row("https://x.example/a.jpg", {"deployment": "p"})]
    with pytest.raises(UserInputError, match="manifest line 2: no url"):
        list(manifest_from_objects([{"url": "https://x.example/a.jpg"}, {"deployment": "p"}]))


def test_a_manifest_is_known_by_its_name():
    assert (manifest_format("night.CSV"), manifest_format("n.jsonl"), manifest_format("n.ndjson"),
            manifest_format("urls.txt"), manifest_format(None)) == ("csv", "jsonl", "jsonl", None, None)
