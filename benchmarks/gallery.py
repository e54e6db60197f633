"""The `gallery` stage of benchmarks/run.py: the first page of a job's gallery (GET /api/v1/jobs/{id}/images,
48 images with their boxes) on a 1,000,000-image job, next to a raw query of the same 48 rows.

The job's rows are made by `create_job` (no dispatch); its first 2,000 images get 3 detections each, one of
them of a rare taxon every 500 images, and the pages are read through the API function the route calls:
the first page, a page half-way (by key), the rare taxon's first page, and failed images only (none).
"""

from __future__ import annotations

from benchmarks.run import console, run_py

CODE = """
import json, time, statistics, models
from models import Algorithm, Classification, Detection, Job, JobImage, SourceImage, database
from pipeline.sdk import moth
from pipeline.core.registry import register_pipeline
from pipeline.schemas import decode_pipeline_spec
from pipeline.infra.runtime import get_runtime
from pipeline.core.jobs import create_job
from pipeline.ops.job_views import gallery
get_runtime(); models.create_schema()
register_pipeline(decode_pipeline_spec(json.dumps(moth.PIPELINE_SPEC).encode(), source="bench"))
t0 = time.perf_counter()
job = create_job("moth-demo", (f"file:///gallery/{i}.png" for i in range(N)))
made_s = time.perf_counter() - t0
det = Algorithm.get(Algorithm.key == "blob-detector-v1")
cls = Algorithm.get(Algorithm.key == "moth-shape-v1")
images = [i for (i,) in JobImage.select(JobImage.image).where(JobImage.job == job.id).order_by(JobImage.image)
          .limit(2000).tuples()]
with database.atomic():
    for n, image in enumerate(images):
        for b in range(3):
            d = Detection.create(image=image, algorithm=det, bbox_key=f"{b},0,{b + 5},5", x1=b, y1=0, x2=b + 5, y2=5,
                                 score=0.9, job=job.id)
            Classification.create(detection=d, algorithm=cls, taxon="Rarus" if n % 500 == 0 and b == 0 else
                                  "Noctuidae", score=0.8)
middle = [i for (i,) in JobImage.select(JobImage.image).where(JobImage.job == job.id).order_by(JobImage.image)
          .offset(N // 2).limit(1).tuples()][0]
def timed(fn, runs=7):
    took = []
    for _ in range(runs):
        t = time.perf_counter(); got = fn(); took.append((time.perf_counter() - t) * 1000)
    return statistics.median(took), got
cursor = database.cursor()
raw_sql = 'SELECT image_id, status FROM job_image WHERE job_id = %s ORDER BY image_id LIMIT 48'
raw_sql = raw_sql.replace("%s", "?") if not models.is_postgres() else raw_sql
out = {"made_s": made_s}
out["raw"], _ = timed(lambda: database.execute_sql(raw_sql, (job.id,)).fetchall())
for name, kwargs in (("first", {}), ("middle", {"after": middle}), ("rare_taxon", {"taxon": "Rarus"}),
                     ("failed_only", {"failed": True})):
    out[name], page = timed(lambda: gallery(job.id, limit=48, **kwargs))
    out[name + "_images"] = len(page["images"])
print(json.dumps(out))
"""


def gallery_first_page(env: dict, images: int) -> list[tuple]:
    console.log(f"gallery: the first page of a {images:,}-image job's gallery")
    got = run_py(CODE.replace("range(N)", f"range({images})").replace("N // 2", str(images // 2)), env)
    rows = []
    for name, label in (("first", "first page"), ("middle", "a page half-way through (by key)"),
                        ("rare_taxon", "first page of a taxon on 1 image in 500"),
                        ("failed_only", "failed images only (there are none)")):
        target = name in ("first", "middle")
        rows.append((f"gallery of a {images:,}-image job: {label}, 48 images with boxes",
                     f"{got[name]:,.1f} ms ({got[name + '_images']} images)", f"{got['raw']:,.2f} ms raw 48-row query",
                     f"{got[name] / got['raw']:.0f}x", "well under 1 s" if target else "",
                     got[name] < 250 if target else None))
    return rows
