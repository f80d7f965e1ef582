# TEMPORARY placeholder while the fused kernel is written: delegates to the reference.
from .scan_ref import selective_scan_ref as selective_scan_cpu  # noqa: F401
