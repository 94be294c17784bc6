"""The KL barrier: ``lam · relu(agg_t KL_t(student ‖ base) − tau)`` on the per-token KL to the frozen base.

``kl`` holds the maths (per-token KL, the aggregates, the hinge, the counted positions, ``token_stats``);
``fused_head`` computes the per-token statistics straight from hidden rows and the LM head in vocabulary chunks;
``shared_prefix`` runs the part of the backbone the adapter leaves alone once for student and ref; ``ref_cache``
keeps the ref's rows across epochs; ``distributed`` pools per-token values across ranks; ``metrics`` and
``panels`` are the logged statistics and TensorBoard panels; ``tau`` suggests a tau per aggregate from a barrier-free
run's own KL (m × its last-quarter mean), and ``run`` is its command, ``heal tau``. Importing this package imports
torch only.
"""

from heal_pl.barrier.kl import KLBarrier, aggregate, per_token_kl, token_stats
from heal_pl.barrier.tau import suggest_taus

__all__ = ["KLBarrier", "aggregate", "per_token_kl", "suggest_taus", "token_stats"]
