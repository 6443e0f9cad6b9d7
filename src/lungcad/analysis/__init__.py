"""The analysis of a CT: segmentation, grouping into candidates, classification, reports.

``analyze_ct(volume, ModelBundle.load(...), AnalysisOptions())`` is the one entry point the
CLI and the server share; ``run_analysis`` drives many scans and writes the run's files.
"""

from lungcad.analysis.pipeline import (
    AnalysisOptions,
    Detection,
    ModelBundle,
    ScanResult,
    analyze_ct,
)
from lungcad.analysis.segmentation import segment_volume

__all__ = [
    "AnalysisOptions",
    "Detection",
    "ModelBundle",
    "ScanResult",
    "analyze_ct",
    "segment_volume",
]
