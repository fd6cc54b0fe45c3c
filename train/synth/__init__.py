"""Synthetic X-ray data engine: FluoroSeg-style DRRs with every structure's mask and text prompts.

The pipeline is: CT source (``ct_source``) -> per-view C-arm camera (``geometry``) -> one torch projector pass
that yields per-material line integrals and every label's ray-crossing mask (``projector``, with procedural
tools from ``tools``) -> X-ray physics (``physics``) -> FluoroSeg-layout writer (``fluoroseg_io``). Heavy
optional dependencies (spekpy, xraydb, diffdrr, deepdrr) are imported lazily, never at package import.
"""
