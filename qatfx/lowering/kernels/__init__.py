"""Triton kernels for converted qatfx models, one kernel family per file with its launcher."""
