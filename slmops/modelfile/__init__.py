"""Modelfiles: parsing, rendering back to text, and building a model in the store from one."""

from slmops.modelfile.parser import Modelfile, parse, render

__all__ = ["Modelfile", "parse", "render"]
