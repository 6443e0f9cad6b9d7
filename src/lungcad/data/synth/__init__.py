"""Synthetic chest-CT phantoms with nodules, written in the exact LUNA16 layout.

``generate_scan`` renders one phantom in memory with its ground truth; ``write_dataset``
writes many as ``subsetK/<uid>.mhd`` plus the LUNA16 tables, so the same code that
trains on real LUNA16 runs on them.
"""

from lungcad.data.synth.dataset import SynthSummary, write_dataset
from lungcad.data.synth.scan import (
    PhantomFinding,
    PhantomNodule,
    PhantomScan,
    generate_scan,
    series_uid,
)

__all__ = [
    "PhantomFinding",
    "PhantomNodule",
    "PhantomScan",
    "SynthSummary",
    "generate_scan",
    "series_uid",
    "write_dataset",
]
