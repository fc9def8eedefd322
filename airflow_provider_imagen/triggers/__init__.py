"""Triggers that wait on reAPI in Airflow's triggerer; they poll and never pay."""

from __future__ import annotations
