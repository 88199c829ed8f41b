"""Silver layer: Ray Data batch inference from the manifest to versioned Parquet embeddings.

Ray Data plans the work (one row per media_id of the manifest not yet embedded for this
model_version: read_parquet of the manifest and of silver's ids, one sort-based aggregation by media_id)
and streams it: repartition(blocks) → map_batches(EmbedUDF, compute=ActorPoolStrategy) →
write_parquet into silver/embeddings/model_version=<mv>/dt=<day>/ on the data root's own
filesystem, local or an object store. The driver holds block references, never the rows.
The run's files are silver data only once its commit record, written last, names them.
Each actor loads the model once, reads the image bytes through storage and reports bad images to a
small stats actor, which are skipped.

Decode overlaps encode inside each actor: Ray Data runs two calls per actor at once
(`max_concurrent_calls_per_actor=2`), and a lock lets only one of them encode, so one batch is
read, decoded and preprocessed while the previous one is in the model. (A separate decode stage of
Ray tasks was measured against this and was slower on a 2-core CPU; see the README.)
"""

from .plan import DRIVER_PLAN_ROWS, plan_work, plans_in_driver
from .report import OUTSIDE_PHASES, STARTUP_PHASES, EmbedReport, startup_breakdown
from .run import embed, filed_as, save_record
from .sizing import choose_decode, default_actors
from .worker import Decoder, EmbedUDF

__all__ = [
    "DRIVER_PLAN_ROWS",
    "OUTSIDE_PHASES",
    "STARTUP_PHASES",
    "Decoder",
    "EmbedReport",
    "EmbedUDF",
    "choose_decode",
    "default_actors",
    "embed",
    "filed_as",
    "plan_work",
    "plans_in_driver",
    "save_record",
    "startup_breakdown",
]
