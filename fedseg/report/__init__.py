"""Experiment reports built from `cases.csv` alone: tables, paired tests and plots."""

from fedseg.report.summary import build_report, build_seed_report

__all__ = ["build_report", "build_seed_report"]
