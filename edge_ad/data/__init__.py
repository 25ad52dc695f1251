"""Datasets (MVTec AD layout), image decoding and synthetic parts with planted defects."""
