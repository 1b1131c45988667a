"""ALTO (Library of Congress; v2, v3, v4 namespaces).

Read: ``Description/sourceImageInformation/fileName``, ``MeasurementUnit``
(pixel, mm10, inch1200: coordinates are scaled to the image by ``Page/@WIDTH``
and ``@HEIGHT``), every ``TextLine`` with its ``Shape/Polygon/@POINTS`` when it
has one, else its box ``HPOS/VPOS/WIDTH/HEIGHT``; its ``BASELINE`` when it is
a polyline (v4.2 and later; an older single number is only a height and is
ignored). Its text: the ``String/@CONTENT`` joined by ``SP`` (and ``HYP``).
Reading order: the first ``ReadingOrder`` ordered group (its ``ElementRef``
to blocks or lines), then every other line in document order.

Write: one ``String`` per line. The model gives no word positions, so the
line's text is not split into words with invented geometry: a line that had
one ``String`` keeps it (its ID and attributes; ``CONTENT`` replaced, stale
``WC``, ``SUBS_*``, glyphs and alternatives removed); a line with several
words gets one ``String`` with the first word's ID and the line's box. This is
how eScriptorium exports lines. A ``Processing`` step (v4) or an
``OCRProcessing`` step (v2, v3) names htrctl and the model digest.
"""

from __future__ import annotations

from datetime import datetime, timezone

from ..errors import ArchivalError
from .crop import LineGeometry
from .doc import Document, Line, localname, parse_points, usable_polygon

_STRING_STALE = ("WC", "CC", "SUBS_TYPE", "SUBS_CONTENT")


def alto_version(root) -> str | None:
    """"v2", "v3", "v4" (or "" for a namespace-less ALTO file); None when *root* is not ALTO."""
    if localname(root) != "alto":
        return None
    ns = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
    if not ns:
        return ""
    if "standards/alto/ns-v" in ns:
        return "v" + ns.split("ns-v", 1)[1].rstrip("#/")
    return None


def _f(el, attr: str, where: str) -> float | None:
    v = el.get(attr)
    if v is None or not v.strip():
        return None
    try:
        return float(v)
    except ValueError:
        raise ArchivalError(f"{where}: @{attr}={v!r} is not a number") from None


class AltoDocument(Document):
    ns: str = ""

    def q(self, name: str) -> str:
        return f"{{{self.ns}}}{name}" if self.ns else name

    @classmethod
    def read(cls, tree, name: str) -> AltoDocument:
        root = tree.getroot()
        ver = alto_version(root)
        ns = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
        q = (lambda n: f"{{{ns}}}{n}") if ns else (lambda n: n)
        fname = root.find(f"{q('Description')}/{q('sourceImageInformation')}/{q('fileName')}")
        pages = root.findall(f"{q('Layout')}/{q('Page')}")
        if not pages:
            raise ArchivalError(f"{name}: an ALTO file without Layout/Page")
        if len(pages) > 1:
            raise ArchivalError(f"{name}: {len(pages)} pages in one ALTO file; htrctl takes one page (image) per file")
        page = pages[0]
        w, h = _f(page, "WIDTH", f"{name}: Page"), _f(page, "HEIGHT", f"{name}: Page")
        doc = cls(kind="alto", version=f"ALTO {ver or '(no namespace)'}", tree=tree, name=name,
                  image_name=(fname.text or "").strip() or None if fname is not None else None,
                  declared_size=(w, h) if w and h and w > 0 and h > 0 else None)
        doc.ns = ns
        unit = root.find(f"{q('Description')}/{q('MeasurementUnit')}")
        doc.unit = (unit.text or "").strip() if unit is not None else "pixel"
        if doc.unit != "pixel" and doc.declared_size is None:
            raise ArchivalError(f"{name}: coordinates in {doc.unit} and no Page/@WIDTH and @HEIGHT to scale them by")
        doc.lines = doc._lines_in_order(root, page)
        return doc

    def _line(self, el) -> Line:
        q = self.q
        lid = el.get("ID") or f"(line {el.sourceline})"
        where = f"{self.name}: TextLine {lid}"
        poly = None
        pg = el.find(f"{q('Shape')}/{q('Polygon')}")
        if pg is not None:
            poly = usable_polygon(parse_points(pg.get("POINTS"), where))
        if poly is None:
            x, y = _f(el, "HPOS", where), _f(el, "VPOS", where)
            w, h = _f(el, "WIDTH", where), _f(el, "HEIGHT", where)
            box = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)] if None not in (x, y, w, h) else None
            poly = usable_polygon(box)
        base = None
        b = el.get("BASELINE")
        if b and len(b.replace(",", " ").split()) >= 4:
            base = parse_points(b, where)
        parts = []
        for c in el:
            n = localname(c)
            if n in ("String", "HYP"):
                parts.append(c.get("CONTENT") or "")
            elif n == "SP":
                parts.append(" ")
        has_sp = " " in parts
        text = "".join(parts) if has_sp else " ".join(p for p in parts if p)
        return Line(lid, el, LineGeometry(polygon=poly, baseline=base), text)

    def _lines_in_order(self, root, page) -> list[Line]:
        q = self.q
        by_id = {el.get("ID"): el for el in page.iter() if el.get("ID")}
        ordered = []
        ro = root.find(q("ReadingOrder"))
        if ro is not None:
            group = next((g for g in ro.iter(q("OrderedGroup"))), None)
            if group is not None:
                for ref in group.iter(q("ElementRef")):
                    el = by_id.get(ref.get("REF"))
                    if el is None:
                        continue
                    ordered.extend([el] if localname(el) == "TextLine" else list(el.iter(q("TextLine"))))
        lines: list[Line] = []
        seen: set = set()
        for tl in [*ordered, *page.iter(q("TextLine"))]:
            if tl not in seen:
                seen.add(tl)
                lines.append(self._line(tl))
        return lines

    # ------------------------------------------------------------------ writing
    def set_text(self, line: Line, text: str) -> None:
        q = self.q
        el = line.element
        words = [c for c in el if localname(c) in ("String", "SP", "HYP")]
        strings = [c for c in words if localname(c) == "String"]
        if len(strings) == 1 and len(words) == 1:
            s = strings[0]
            for a in _STRING_STALE:
                s.attrib.pop(a, None)
            for c in list(s):
                if localname(c) in ("Glyph", "ALTERNATIVE"):
                    s.remove(c)
            if not len(s):
                s.text = None
            s.set("CONTENT", text)
        else:
            attrs = {}
            if strings and strings[0].get("ID"):
                attrs["ID"] = strings[0].get("ID")
            for a in ("HPOS", "VPOS", "WIDTH", "HEIGHT"):
                if el.get(a) is not None:
                    attrs[a] = el.get(a)
            attrs["CONTENT"] = text
            s = el.makeelement(q("String"), attrs)
            if words:
                last_tail = words[-1].tail
                el.replace(words[0], s)
                for w in words[1:]:
                    el.remove(w)
                s.tail = last_tail
            else:
                shape = el.find(q("Shape"))
                if shape is not None:
                    s.tail = shape.tail
                    shape.addnext(s)
                else:
                    s.tail = el.text
                    el.insert(0, s)
        line.text = text

    def finish(self, changed: list[Line], *, model_digest: str | None, software_version: str) -> None:
        q = self.q
        root = self.tree.getroot()
        desc = root.find(q("Description"))
        if desc is None:
            return  # optional in v2; not invented here
        used = {el.get("ID") for el in root.iter() if isinstance(el.tag, str) and el.get("ID")}
        n = 1
        while f"htrctl_{n}" in used:
            n += 1
        pid = f"htrctl_{n}"
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        v2 = not self.version.startswith("ALTO v4")  # Processing came with v4; v2 and v3 have OCRProcessing
        step = desc.makeelement(q("ocrProcessingStep" if v2 else "Processing"), {} if v2 else {"ID": pid})

        def sub(parent, tag, text=None):
            e = parent.makeelement(q(tag), {})
            e.text = text
            parent.append(e)
            return e

        if self.version.startswith("ALTO v4"):
            sub(step, "processingCategory", "contentGeneration")
        sub(step, "processingDateTime", now)
        sub(step, "processingStepDescription", f"text recognition of {len(changed)} lines")
        if model_digest:
            sub(step, "processingStepSettings", f"model digest: {model_digest}")
        sw = sub(step, "processingSoftware")
        sub(sw, "softwareName", "htrctl")
        sub(sw, "softwareVersion", software_version)
        if v2:
            holder = desc.makeelement(q("OCRProcessing"), {"ID": pid})
            holder.append(step)
            step = holder
        # After MeasurementUnit, sourceImageInformation and the earlier OCRProcessing/Processing steps.
        last = None
        for c in desc:
            if localname(c) in ("MeasurementUnit", "sourceImageInformation", "OCRProcessing", "Processing"):
                last = c
        if last is None:
            desc.insert(0, step)
        else:
            step.tail = last.tail
            last.addnext(step)
