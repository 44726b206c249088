"""The soft-target store: compute the teacher once, train many students from disk.

    cache_teacher(teacher, data, out, top_k=None, precision="fp16")   write a store
    SoftTargetStore.open(out)                                         read it by sample id
    StoreTeacher(out, teacher=..., data=...)                          use it in `distill`

Dense stores hold raw logits (fp16/fp32); top-k stores hold per position the k largest
log-probabilities, their ids and the mass outside them (see `stillroom.store.codec`). A manifest
ties the store to the teacher's weights and the dataset; shard checksums catch damaged files; an
interrupted `cache_teacher` resumes where it stopped.
"""

from stillroom.losses.topk import TopKTargets
from stillroom.store.codec import TopKCodec, index_dtype, topk_fidelity
from stillroom.store.fingerprint import dataset_fingerprint, input_fingerprints, teacher_fingerprint
from stillroom.store.manifest import Manifest
from stillroom.store.reader import SoftTargetStore
from stillroom.store.teacher import StoreTeacher
from stillroom.store.writer import cache_teacher

__all__ = [
    "Manifest",
    "SoftTargetStore",
    "StoreTeacher",
    "TopKCodec",
    "TopKTargets",
    "cache_teacher",
    "dataset_fingerprint",
    "index_dtype",
    "input_fingerprints",
    "teacher_fingerprint",
    "topk_fidelity",
]
