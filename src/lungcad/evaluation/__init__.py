"""Scoring detections the LUNA16 way: FROC curve, sensitivity at 1/8..8 FP/scan, CPM."""
