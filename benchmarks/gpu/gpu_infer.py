"""Inference and serving rows of the GPU run (filled in by the packages that provide them)."""

from __future__ import annotations

SECTIONS: dict = {}
