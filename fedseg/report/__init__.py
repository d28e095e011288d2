"""Experiment reports built from `cases.csv` alone: tables, paired tests and plots."""

from fedseg.report.against import build_against_report
from fedseg.report.summary import build_report, build_seed_report

__all__ = ["build_against_report", "build_report", "build_seed_report"]
