"""Calibration data sources and the block-sequential calibration engine."""
