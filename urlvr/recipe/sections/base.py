"""The section base classes, at their old path: they live in the leaf `urlvr.section`."""

from urlvr.section import Section, VariantSection, check_variant_name, variant_section

__all__ = ["Section", "VariantSection", "check_variant_name", "variant_section"]
