"""Archival formats: PAGE-XML and ALTO in, the recognised text written back in place.

A PAGE or ALTO file already segmented into lines (by eScriptorium/kraken,
Transkribus, Loghi, PERO-OCR...) is read (:mod:`.page`, :mod:`.alto`), its page
image found, every text line cut out of it (:mod:`.crop`) and sent to htrd as
one batch request per page, and the texts written back into the same file,
everything else preserved (:mod:`.job`). Hostile XML is refused
(:mod:`.xmlsafe`). Needs the ``archival`` extra (lxml, Pillow, numpy); never
torch.
"""

from __future__ import annotations

from .job import PageJob, is_xml, load, prepare, whole_image_document

__all__ = ["PageJob", "is_xml", "load", "prepare", "whole_image_document"]
