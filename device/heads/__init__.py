"""Classifier heads of an engine directory, in numpy (the device runtime, engine-directory
eval, the exporter's parity check and bench).

The exported graph outputs one feature vector per learner; the heads stay outside the graph
because enrollment changes them. One module per head kind, each registered by name in
:data:`HEADS` (:mod:`.base`); the engine manifest names each learner's kind:

* ``ranpac`` (:mod:`.ranpac`; RanPAC, both SAFE learners): logits = ReLU(f @ W_rand) @ W,
  enrolls by rank-k ridge updates of G and Q;
* ``prototypes`` (:mod:`.prototypes`; SimpleCIL): logits = cos(f, sums_c / counts_c),
  enrolls by adding sums and counts;
* ``linear`` (:mod:`.linear`; SLCA / SLCA++, the aligned per-session heads):
  logits = f @ weight.T + bias; runs, renames and removes, does not enroll yet.

SAFE's entropy-weighted aggregation of several learners' logits is :mod:`.aggregate`.
"""

from . import linear, prototypes, ranpac  # noqa: F401  (the built-in kinds register themselves)
from .aggregate import aggregate, entropy_weights, predict, softmax
from .base import HEADS, Head, StoreView, head_class, load_head, register_head

__all__ = ["HEADS", "Head", "StoreView", "aggregate", "entropy_weights", "head_class", "load_head", "predict",
           "register_head", "softmax"]
