"""Bronze layer: metadata (via img2dataset), a folder, or shards already downloaded (WebDataset tars,
img2dataset's output) → content-addressed objects + manifest.

The data root is a local folder or an object-store prefix (storage.py); the steps are the same on
both. Order of commits, so that a run killed at any point leaves nothing half-written:
0. URLs the manifest already names are set aside (never handed to img2dataset) unless refetch;
1. img2dataset downloads into bronze/downloads/<run_id>/ (original bytes, no re-encode, one Parquet
   shard of bytes and statuses per few hundred to 10,000 URLs), a work folder the run holds
   (storage.working) and that the next run or `rayclip gc` sweeps;
2. while img2dataset downloads the next shards, each finished shard's images are checked (they
   decode), hashed and put at bronze/objects/<aa>/<sha256>.<ext> unless already there, on a pool of
   threads (one whole write each: content-addressed, so a present key holds these very bytes);
3. each finished shard's new manifest rows are written as ONE object
   bronze/manifest/part-<run_id>-<n>.<bytes>B.parquet, after every object they name is stored (the
   commit: readers list only committed parts; a killed run keeps the shards it finished);
4. the run summary is written to bronze/runs/<run_id>.json.
A rerun finds the objects already stored and adds the manifest rows that are still missing.

Shards (ingest_webdataset, ingest_img2dataset_output) skip step 1: their samples are read in order
(store/shards), one shard at a time, and go through the same check, hash, store and commit (steps 2 to 4).

The modules, one concern each: metadata.py (reading the metadata file), download.py (running
img2dataset; spawned.py is the main module its spawned processes start from), admit.py (steps 2
to 4), sources.py (the entry points, one per source).
"""

from .admit import IngestReport
from .metadata import read_metadata
from .sources import ingest_folder, ingest_img2dataset_output, ingest_metadata, ingest_webdataset

__all__ = [
    "IngestReport",
    "ingest_folder",
    "ingest_img2dataset_output",
    "ingest_metadata",
    "ingest_webdataset",
    "read_metadata",
]
