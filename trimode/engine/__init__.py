"""The engine layer: many concurrent requests on one model, one step loop, fused forwards, `mode: auto`
(docs/engine.md)."""

from trimode.decode.modes import MODES as _REGISTRY
from trimode.engine.auto import AutoConfig, CostModel
from trimode.engine.engine import Engine
from trimode.engine.kv_pool import KVBudgetError
from trimode.engine.request import EngineRequest, EngineStopped, QueueFull, RequestCancelled, RequestHandle

MODES = tuple(_REGISTRY)  # every mode of the registry runs in the engine

__all__ = ["AutoConfig", "CostModel", "Engine", "EngineRequest", "EngineStopped", "KVBudgetError", "MODES",
           "QueueFull", "RequestCancelled", "RequestHandle"]
