"""Segmentation metrics: DSC, NSD at a tolerance in mm, and HD95 in mm, per case and class (see docs/metrics.md)."""
from medadapt.metrics.evaluate import evaluate_folders, format_mean_std, summarize
from medadapt.metrics.overlap_surface import EMPTY_POLICY, binary_metrics, case_metrics

__all__ = ["case_metrics", "binary_metrics", "evaluate_folders", "summarize", "format_mean_std", "EMPTY_POLICY"]
