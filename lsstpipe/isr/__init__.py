"""Instrument signature removal; :mod:`lsstpipe.isr.assembly` turns raw segments into CCD images."""

from lsstpipe.isr.assembly import AmpRegions, assemble_ccd, disassemble_ccd, overscan_regions, parse_section

__all__ = ["AmpRegions", "assemble_ccd", "disassemble_ccd", "overscan_regions", "parse_section"]
