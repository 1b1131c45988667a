"""Parsing XML that may be hostile: no DTD, no entities, no network, bounded size.

PAGE and ALTO files never need a DTD. A document type declaration that
declares entities (the billion-laughs and external-entity attacks) is refused
with a clear error before anything is expanded; external entities, DTDs and
XInclude are never loaded (libxml2 with ``resolve_entities=False``,
``no_network=True``, ``load_dtd=False``); ``huge_tree=False`` keeps libxml2's
own limits on depth and text node size; the file itself is bounded by
:data:`MAX_XML_BYTES`.
"""

from __future__ import annotations

import re

from ..errors import ArchivalError, require

_STANDALONE = re.compile(rb"^\s*<\?xml[^>]*\bstandalone\s*=\s*[\"'](yes|no)[\"']")
MAX_XML_BYTES = 64 * 1024 * 1024  # a PAGE file of a dense newspaper page is a few MB


def _lxml():
    return require("lxml.etree", "archival", "reading PAGE-XML and ALTO")


def parse(data: bytes, name: str):
    """The :class:`lxml.etree._ElementTree` of *data*; :class:`ArchivalError` naming *name* otherwise."""
    etree = _lxml()
    if len(data) > MAX_XML_BYTES:
        raise ArchivalError(f"{name}: {len(data)} bytes is more than the {MAX_XML_BYTES} bytes an XML input may have")
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
        huge_tree=False, remove_blank_text=False, remove_comments=False, remove_pis=False,
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise ArchivalError(f"{name}: not well-formed XML: {exc}") from None
    tree = root.getroottree()
    dtd = tree.docinfo.internalDTD
    if dtd is not None and any(True for _ in dtd.iterentities()):
        raise ArchivalError(f"{name}: the document declares XML entities; PAGE and ALTO files never need them "
                       "(refused: entity expansion and external entities are a known attack)")
    return tree


def serialize(tree, original: bytes | None = None) -> bytes:
    """*tree* as UTF-8 with an XML declaration; ``standalone`` written only when *original*'s declaration
    had it (lxml would otherwise add ``standalone='no'``)."""
    etree = _lxml()
    decl = '<?xml version="1.0" encoding="UTF-8"'
    m = _STANDALONE.search(original[:200]) if original else None
    if m:
        decl += f' standalone="{m.group(1).decode()}"'
    return (decl + "?>\n").encode() + etree.tostring(tree, encoding="UTF-8", xml_declaration=False) + b"\n"
