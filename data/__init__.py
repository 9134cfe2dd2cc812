"""Data pipeline for SimMIM (installed as ``simmim.data``): mask generation, transforms and datasets."""
