"""A job's results as a Camera Trap Data Package (Camtrap DP 1.0.2, the TDWG standard): a zip holding
`datapackage.json` and three CSV tables, `deployments`, `media` and `observations`.

What the standard needs of each image comes from the job's manifest (pipeline/core/manifests.py): its
`deployment`, `timestamp`, `latitude` and `longitude`. A job with an image that lacks one cannot be described
and is refused, naming how many lack it. Then:

- a deployment per `deployment` value: its place (the first image's), and its start and end (the earliest and the
  latest of its images' timestamps);
- a media row per image (`filePath` its URL; `mediaComments` why it failed, when it did);
- an observation per detection (`observationType` animal, its best classification's taxon as
  `scientificName`, `classificationMethod` machine, the score as `classificationProbability`), and a `blank`
  observation for a processed image with none; the box normalised to the image's size (0 to 1, from the top
  left corner, as the standard asks) where jetpipe can read the size (local images; elsewhere the box is left
  out).

The tables are written a page of images at a time (bounded memory) into a temporary directory beside the zip.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import mimetypes
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from PIL import Image

from models import Job, JobImage, tuples, utcnow
from pipeline.errors import UserInputError
from pipeline.ops.export import images

VERSION = "1.0.2"
PROFILE = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{VERSION}/camtrap-dp-profile.json"
TABLE_SCHEMA = "https://raw.githubusercontent.com/tdwg/camtrap-dp/" + VERSION + "/{}-table-schema.json"
DEPLOYMENTS = ("deploymentID", "locationID", "locationName", "latitude", "longitude", "coordinateUncertainty",
               "deploymentStart", "deploymentEnd", "setupBy", "cameraID", "cameraModel", "cameraDelay",
               "cameraHeight", "cameraDepth", "cameraTilt", "cameraHeading", "detectionDistance", "timestampIssues",
               "baitUse", "featureType", "habitat", "deploymentGroups", "deploymentTags", "deploymentComments")
MEDIA = ("mediaID", "deploymentID", "captureMethod", "timestamp", "filePath", "filePublic", "fileName",
         "fileMediatype", "exifData", "favorite", "mediaComments")
OBSERVATIONS = ("observationID", "deploymentID", "mediaID", "eventID", "eventStart", "eventEnd", "observationLevel",
                "observationType", "cameraSetupType", "scientificName", "count", "lifeStage", "sex", "behavior",
                "individualID", "individualPositionRadius", "individualPositionAngle", "individualSpeed", "bboxX",
                "bboxY", "bboxWidth", "bboxHeight", "classificationMethod", "classifiedBy",
                "classificationTimestamp", "classificationProbability", "observationTags", "observationComments")
NEEDED = ("deployment", "timestamp", "latitude", "longitude")


class _Deployment:
    def __init__(self, latitude: float, longitude: float, when: dt.datetime):
        self.latitude, self.longitude, self.start, self.end = latitude, longitude, when, when


def write_package(job: Job, path: str) -> int:
    """Write the job's Camtrap DP zip to `path`; the number of observations. UserInputError, before anything
    is written, when an image lacks what the standard needs."""
    deployments = _deployments(job)
    directory = tempfile.mkdtemp(prefix="jetpipe-camtrap-", dir=os.path.dirname(os.path.abspath(path)) or None)
    try:
        taxa: set[str] = set()
        observed = _tables(job, Path(directory), taxa)
        with open(Path(directory) / "deployments.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(DEPLOYMENTS)
            for name, d in sorted(deployments.items()):
                writer.writerow(_row(DEPLOYMENTS, {"deploymentID": name, "locationName": name, "latitude": d.latitude,
                                                   "longitude": d.longitude, "deploymentStart": _when(d.start),
                                                   "deploymentEnd": _when(d.end)}))
        descriptor = _descriptor(job, deployments, taxa)
        (Path(directory) / "datapackage.json").write_text(json.dumps(descriptor, indent=2, ensure_ascii=False))
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as package:
            for name in ("datapackage.json", "deployments.csv", "media.csv", "observations.csv"):
                package.write(Path(directory) / name, name)
        return observed
    finally:
        for name in os.listdir(directory):
            os.remove(Path(directory) / name)
        os.rmdir(directory)


def _deployments(job: Job) -> dict[str, _Deployment]:
    """Every deployment of the job's images, from their manifest metadata, read a page at a time; refuses a job
    whose images do not all say where and when they were taken."""
    found: dict[str, _Deployment] = {}
    lacking = 0
    query = JobImage.select(JobImage.meta).where(JobImage.job == job.id).order_by(JobImage.id)
    for (meta,) in tuples(query, stream=True):
        said = json.loads(meta) if meta else {}
        if any(said.get(name) in (None, "") for name in NEEDED):
            lacking += 1
            continue
        when = dt.datetime.fromisoformat(said["timestamp"])
        d = found.setdefault(said["deployment"], _Deployment(said["latitude"], said["longitude"], when))
        d.start, d.end = min(d.start, when), max(d.end, when)
    if lacking:
        raise UserInputError(f"job {job.id}: {lacking} image(s) lack a deployment, timestamp, latitude or longitude, "
                             "which Camtrap DP needs of every image: make the job from a manifest that gives them "
                             "(enqueue-job --manifest)")
    return found


def _tables(job: Job, directory: Path, taxa: set[str]) -> int:
    observed = 0
    with open(directory / "media.csv", "w", encoding="utf-8", newline="") as media_file, \
            open(directory / "observations.csv", "w", encoding="utf-8", newline="") as observation_file:
        media = csv.writer(media_file, lineterminator="\n")
        observations = csv.writer(observation_file, lineterminator="\n")
        media.writerow(MEDIA)
        observations.writerow(OBSERVATIONS)
        for image in images(job):
            meta = image["metadata"]
            when = _when(dt.datetime.fromisoformat(meta["timestamp"]))
            url = image["url"]
            name = os.path.basename(unquote(urlsplit(url).path))
            media.writerow(_row(MEDIA, {
                "mediaID": image["image_id"], "deploymentID": meta["deployment"], "timestamp": when, "filePath": url,
                "filePublic": str(urlsplit(url).scheme in ("http", "https")).lower(), "fileName": name,
                "fileMediatype": mimetypes.guess_type(name)[0] or "image/jpeg",
                "mediaComments": f"jetpipe: {image['error']}" if image["status"] == "failed" else None}))
            if image["status"] != "processed":
                continue
            common = {"deploymentID": meta["deployment"], "mediaID": image["image_id"], "eventStart": when,
                      "eventEnd": when, "observationLevel": "media", "classificationMethod": "machine"}
            if not image["detections"]:
                observations.writerow(_row(OBSERVATIONS, {**common, "observationID": f"{image['image_id']}-0",
                                                          "observationType": "blank"}))
                observed += 1
                continue
            size = _size(url) if any(d["bbox"]["x1"] is not None for d in image["detections"]) else None
            for n, detection in enumerate(image["detections"], 1):
                best = max(detection["classifications"], key=lambda c: c["score"] or 0.0, default=None)
                if best is not None:
                    taxa.add(best["taxon"])
                observations.writerow(_row(OBSERVATIONS, {
                    **common, "observationID": f"{image['image_id']}-{n}", "observationType": "animal",
                    "scientificName": best["taxon"] if best else None, "count": 1,
                    "classifiedBy": best["algorithm"] if best else detection["algorithm"],
                    "classificationProbability": _probability(best["score"] if best else detection["score"]),
                    **_box(detection["bbox"], size)}))
                observed += 1
    return observed


def _descriptor(job: Job, deployments: dict[str, _Deployment], taxa: set[str]) -> dict[str, Any]:
    lats = [d.latitude for d in deployments.values()]
    lons = [d.longitude for d in deployments.values()]
    west, east, south, north = min(lons, default=0.0), max(lons, default=0.0), min(lats, default=0.0), max(lats,
                                                                                                         default=0.0)
    spatial = ({"type": "Point", "coordinates": [west, south]} if (west, south) == (east, north) else
               {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north],
                                                    [west, south]]]})
    starts = [d.start for d in deployments.values()]
    ends = [d.end for d in deployments.values()]
    return {
        "name": f"jetpipe-job-{job.id}", "title": f"{job.name} (jetpipe job {job.id})",
        "profile": PROFILE, "created": utcnow().replace(microsecond=0).isoformat() + "Z",
        "contributors": [{"title": f"jetpipe project {job.project_name}", "role": "publisher"}],
        "sources": [{"title": "jetpipe", "version": "0.1.0"}],
        "project": {"title": job.name, "samplingDesign": "opportunistic", "captureMethod": ["activityDetection"],
                    "individualAnimals": False, "observationLevel": ["media"]},
        "spatial": spatial,
        "temporal": {"start": min(starts).date().isoformat() if starts else utcnow().date().isoformat(),
                     "end": max(ends).date().isoformat() if ends else utcnow().date().isoformat()},
        "taxonomic": [{"scientificName": taxon} for taxon in sorted(taxa)],
        "resources": [{"name": table, "path": f"{table}.csv", "profile": "tabular-data-resource", "format": "csv",
                       "mediatype": "text/csv", "encoding": "utf-8", "schema": TABLE_SCHEMA.format(table)}
                      for table in ("deployments", "media", "observations")],
    }


def _row(columns: tuple[str, ...], values: dict[str, Any]) -> list[Any]:
    return ["" if values.get(name) is None else values[name] for name in columns]


def _when(value: dt.datetime) -> str:
    """A timestamp as the standard's tables write it (`%Y-%m-%dT%H:%M:%S%z`)."""
    return value.replace(microsecond=0).isoformat()


def _probability(score: float | None) -> float | None:
    return None if score is None else min(max(float(score), 0.0), 1.0)


def _size(url: str) -> tuple[int, int] | None:
    """The image's width and height, read from its header where it is a local file; None elsewhere."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    try:
        with Image.open(unquote(parts.path)) as picture:
            return picture.size
    except OSError:
        return None


def _box(box: dict[str, float], size: tuple[int, int] | None) -> dict[str, float]:
    """The box from its top left corner, normalised to the image (0 to 1); nothing without the image's size."""
    if size is None or box["x1"] is None:
        return {}
    width, height = size
    x1, y1 = min(max(box["x1"] / width, 0.0), 1.0), min(max(box["y1"] / height, 0.0), 1.0)
    x2, y2 = min(max(box["x2"] / width, 0.0), 1.0), min(max(box["y2"] / height, 0.0), 1.0)
    width_, height_ = round(x2 - x1, 6), round(y2 - y1, 6)
    if width_ <= 0 or height_ <= 0:  # (a box outside the image, or thinner than the standard can say)
        return {}
    return {"bboxX": round(x1, 6), "bboxY": round(y1, 6), "bboxWidth": width_, "bboxHeight": height_}
