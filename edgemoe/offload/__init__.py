"""Expert providers: fully resident, and offloading (store -> cache -> prefetcher).

Everything between "the MoE layer needs experts {e1, e2} of layer L" and a runnable expert:
  provider.py    ExpertRunner / ExpertProvider protocols, ResidentProvider, OffloadingProvider
  store.py       ExpertStore protocol, OnnxExpertStore (bundle files -> ORT sessions, checked)
  cache.py       ExpertCache: byte capacity as a hard bound, leases, reservations, counters
  policies.py    eviction: lru | lfu | edgemoe (activation frequency / layer distance)
  prefetcher.py  paging threads; demand loads on the waiting caller
  predictor.py   RouterPredictor (next router on this hidden state), StatisticalPredictor (EdgeMoE table)
  budget.py      "1.5GB" / "512MiB" / "25%" -> bytes; process budget -> expert cache capacity
  sessions.py    memory hygiene and the one set of ORT session options
Importing this package does not import onnxruntime; building ORT sessions does.
"""

from edgemoe.offload.budget import Budget, ExpertBudget, MemoryBudget, format_bytes, parse_size
from edgemoe.offload.cache import CacheStats, ExpertCache, Lease
from edgemoe.offload.errors import (BudgetError, CacheCapacityError, ExpertLoadError, OffloadError,
                                    OffloadTimeout, PrepareError)
from edgemoe.offload.prefetcher import DEFAULT_LOADERS
from edgemoe.offload.policies import DEFAULT_POLICY, POLICIES, EdgeMoEPolicy, EvictionPolicy, LFUPolicy, LRUPolicy, make_policy
from edgemoe.offload.predictor import (ExpertPredictor, PredictionStats, PredictionSummary, RouterPredictor,
                                       StatisticalPredictor)
from edgemoe.offload.prefetcher import Prefetcher, PrefetchStats
from edgemoe.offload.protocols import ExpertProvider, ExpertRunner, ExpertStore
from edgemoe.offload.provider import OffloadingProvider, ProviderStats, ResidentProvider
from edgemoe.offload.store import OnnxExpert, OnnxExpertStore, StoreStats

__all__ = [
    "DEFAULT_LOADERS", "DEFAULT_POLICY", "POLICIES", "Budget", "BudgetError", "CacheCapacityError", "CacheStats", "EdgeMoEPolicy", "EvictionPolicy",
    "ExpertBudget", "ExpertCache", "ExpertLoadError", "ExpertPredictor", "ExpertProvider", "ExpertRunner",
    "ExpertStore", "LFUPolicy", "LRUPolicy", "Lease", "MemoryBudget", "OffloadError", "OffloadTimeout",
    "OffloadingProvider", "OnnxExpert", "OnnxExpertStore", "PredictionStats", "PredictionSummary", "PrepareError",
    "PrefetchStats", "Prefetcher", "ProviderStats", "ResidentProvider", "RouterPredictor",
    "StatisticalPredictor", "StoreStats", "format_bytes", "make_policy", "parse_size",
]
