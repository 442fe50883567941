"""Cost models: hardware catalog, compute, communication, memory and schedule models.

Data flow: the annotated graph (``node.meta["autopar"]``) and a ``ClusterSpec`` go in;
per-node and per-stage times and bytes come out for the planner. ``hardware`` is the
table of devices and links that ``ClusterSpec`` references and every model reads.
Imported only as ``autopar.cost_models`` (see ARCHITECTURE.md).
"""

from autopar.cost_models.hardware import (
    DEVICE_ALIASES,
    DEVICE_CATALOG,
    DTYPES,
    GLOO_LOOPBACK,
    GLOO_TCP,
    IB_HDR,
    IB_NDR,
    NVLINK_A100,
    NVLINK_H100,
    DeviceSpec,
    LinkLevel,
    canonical_dtype,
    default_links,
    get_device,
    valid_device_names,
)

__all__ = [
    "DEVICE_ALIASES", "DEVICE_CATALOG", "DTYPES", "GLOO_LOOPBACK", "GLOO_TCP", "IB_HDR", "IB_NDR",
    "NVLINK_A100", "NVLINK_H100", "DeviceSpec", "LinkLevel", "canonical_dtype", "default_links",
    "get_device", "valid_device_names",
]
