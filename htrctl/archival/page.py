"""PAGE-XML (PRImA; the 2009-2019 schemas, 2013-07-15 and 2019-07-15 the usual ones).

Read: ``Page/@imageFilename``, ``@imageWidth``/``@imageHeight``, every
``TextLine`` with its ``Coords/@points``, ``Baseline/@points`` and first
``TextEquiv/Unicode``. Reading order: ``ReadingOrder`` (ordered groups by
``@index``, nested groups flattened), else the regions' ``readingOrder
{index:N;}`` custom attribute (Transkribus), else document order; lines inside
a region by their own ``readingOrder`` custom attribute when all have one,
else document order.

Write: the line's ``TextEquiv`` (its ``Unicode``, without ``@conf``: the model
gives no calibrated confidence) placed where the schema wants it (after
``Word``, before ``TextStyle``/``UserDefined``/``Labels``); a region's own
``TextEquiv``, where it has one, becomes its lines' texts joined by newlines;
``Metadata/LastChange`` is updated, and a ``MetadataItem type="processingStep"``
(2018 schema and later) or a line in ``Comments`` (older ones) names htrctl
and the model digest. ``Word`` elements and everything else are left as they
are (the model gives no word positions).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from ..errors import ArchivalError
from .crop import LineGeometry
from .doc import Document, Line, localname, parse_points, usable_polygon

NS_PREFIXES = ("http://schema.primaresearch.org/PAGE/gts/pagecontent/",
               "https://schema.primaresearch.org/PAGE/gts/pagecontent/")
_CUSTOM_INDEX = re.compile(r"readingOrder\s*\{[^}]*index\s*:\s*(\d+)")
_TEXT_AFTER = ("TextStyle", "UserDefined", "Labels")  # TextEquiv goes before these


def is_page(root) -> bool:
    ns = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
    return localname(root) == "PcGts" and ns.startswith(NS_PREFIXES)


def _custom_index(el) -> int | None:
    m = _CUSTOM_INDEX.search(el.get("custom") or "")
    return int(m.group(1)) if m else None


def _region_order(page, q) -> list[str]:
    """Region ids in the order ReadingOrder gives (nested groups flattened, indexed ones sorted)."""
    ro = page.find(q("ReadingOrder"))
    out: list[str] = []
    if ro is None:
        return out

    def walk(group) -> None:
        if group.get("regionRef"):
            out.append(group.get("regionRef"))
        kids = [k for k in group if localname(k) in (
            "RegionRefIndexed", "OrderedGroupIndexed", "UnorderedGroupIndexed",
            "RegionRef", "OrderedGroup", "UnorderedGroup")]
        if any(k.get("index") is not None for k in kids):
            kids.sort(key=lambda k: int(k.get("index") or 0) if (k.get("index") or "0").isdigit() else 0)
        for k in kids:
            if localname(k) in ("RegionRefIndexed", "RegionRef"):
                if k.get("regionRef"):
                    out.append(k.get("regionRef"))
            else:
                walk(k)

    for top in ro:
        if localname(top) in ("OrderedGroup", "UnorderedGroup"):
            walk(top)
    return out


class PageDocument(Document):
    ns: str = ""

    def q(self, name: str) -> str:
        return f"{{{self.ns}}}{name}"

    # ------------------------------------------------------------------ reading
    @classmethod
    def read(cls, tree, name: str) -> PageDocument:
        root = tree.getroot()
        ns = root.tag[1:].split("}", 1)[0]
        page = root.find(f"{{{ns}}}Page")
        if page is None:
            raise ArchivalError(f"{name}: a PAGE file without a Page element")
        size = None
        try:
            w, h = float(page.get("imageWidth") or 0), float(page.get("imageHeight") or 0)
            size = (w, h) if w > 0 and h > 0 else None
        except ValueError:
            raise ArchivalError(f"{name}: Page/@imageWidth or @imageHeight is not a number") from None
        doc = cls(kind="page", version=f"PAGE {ns.rstrip('/').rsplit('/', 1)[-1]}", tree=tree, name=name,
                  image_name=page.get("imageFilename") or None, declared_size=size)
        doc.ns = ns
        doc.lines = doc._lines_in_order(page)
        return doc

    def _line(self, el) -> Line:
        lid = el.get("id") or f"(line {el.sourceline})"
        where = f"{self.name}: TextLine {lid}"
        poly = self._points(el.find(self.q("Coords")), where)
        base = self._points(el.find(self.q("Baseline")), where)
        text = None
        te = el.find(self.q("TextEquiv"))
        if te is not None:
            u = te.find(self.q("Unicode"))
            text = u.text if u is not None else None
        return Line(lid, el, LineGeometry(polygon=usable_polygon(poly), baseline=base), text)

    def _points(self, el, where: str):
        """``@points`` (2010-03-19 schema and later) or ``Point`` children (the 2009 and early 2010 ones)."""
        if el is None:
            return None
        if el.get("points") is not None:
            return parse_points(el.get("points"), where)
        pts = el.findall(self.q("Point"))
        return parse_points(" ".join(f"{p.get('x')},{p.get('y')}" for p in pts), where) if pts else None

    def _lines_in_order(self, page) -> list[Line]:
        q = self.q
        order = _region_order(page, q)
        regions = {el.get("id"): el for el in page.iter() if localname(el).endswith("Region") and el.get("id")}
        top = [el for el in page if localname(el).endswith("Region")]
        if not order:
            idx = [_custom_index(el) for el in top]
            if top and all(i is not None for i in idx):
                order = [el.get("id") for _, el in sorted(zip(idx, top), key=lambda t: t[0]) if el.get("id")]
        seq = [regions[r] for r in order if r in regions] + top
        lines: list[Line] = []
        seen: set = set()
        for region in seq:
            groups: dict = {}
            for tl in region.iter(q("TextLine")):
                if tl not in seen:
                    groups.setdefault(tl.getparent(), []).append(tl)
            for tls in groups.values():
                idx = [_custom_index(t) for t in tls]
                if all(i is not None for i in idx):
                    tls = [t for _, t in sorted(zip(idx, tls), key=lambda p: p[0])]
                for tl in tls:
                    seen.add(tl)
                    lines.append(self._line(tl))
        for tl in page.iter(q("TextLine")):  # lines outside any region (not schema-valid, but seen)
            if tl not in seen:
                seen.add(tl)
                lines.append(self._line(tl))
        return lines

    # ------------------------------------------------------------------ writing
    def _set_unicode(self, holder, text: str) -> None:
        """Replace *holder*'s TextEquiv elements by one holding *text*."""
        q = self.q
        old = holder.findall(q("TextEquiv"))
        anchor = old[0] if old else None
        te = holder.makeelement(q("TextEquiv"), {})
        u = holder.makeelement(q("Unicode"), {})
        u.text = text
        te.append(u)
        if anchor is not None:
            te.tail = anchor.tail
            holder.replace(anchor, te)
            for o in old[1:]:
                _remove_keeping_tail(o)
            return
        after = next((c for c in holder if localname(c) in _TEXT_AFTER), None)
        if after is not None:
            prev = after.getprevious()
            te.tail = prev.tail if prev is not None else after.tail
            after.addprevious(te)
        else:
            last = holder[-1] if len(holder) else None
            if last is not None:
                te.tail = last.tail
                last.tail = holder.text
            holder.append(te)

    def set_text(self, line: Line, text: str) -> None:
        self._set_unicode(line.element, text)
        line.text = text

    def finish(self, changed: list[Line], *, model_digest: str | None, software_version: str) -> None:
        q = self.q
        if changed:
            by_el = {ln.element: ln for ln in self.lines}
            parents = {ln.element.getparent() for ln in changed}
            for region in parents:
                if region is None or region.find(q("TextEquiv")) is None:
                    continue  # a region without its own text stays so
                texts = []
                for tl in region.findall(q("TextLine")):
                    ln = by_el.get(tl)
                    texts.append((ln.text if ln else None) or "")
                self._set_unicode(region, "\n".join(texts))
        self._stamp(model_digest, software_version, len(changed))

    def _stamp(self, model_digest: str | None, software_version: str, n: int) -> None:
        q = self.q
        root = self.tree.getroot()
        md = root.find(q("Metadata"))
        if md is None:
            return  # required by every schema; a file without one is left without one
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        lc = md.find(q("LastChange"))
        if lc is not None:
            lc.text = now
        value = f"htrctl {software_version}: recognised {n} text lines"
        if model_digest:
            value += f" with model {model_digest}"
        year = self.ns.rstrip("/").rsplit("/", 1)[-1][:4]
        if year.isdigit() and int(year) >= 2018:
            item = md.makeelement(q("MetadataItem"), {"type": "processingStep", "name": "htrctl",
                                                        "value": value, "date": now})
            last = md[-1] if len(md) else None
            if last is not None:
                item.tail = last.tail
                last.tail = md.text
            md.append(item)
            return
        comments = md.find(q("Comments"))
        if comments is None:
            comments = md.makeelement(q("Comments"), {})
            after = lc if lc is not None else md.find(q("Created"))
            if after is None:
                return
            comments.tail = after.tail
            after.addnext(comments)
        comments.text = ((comments.text or "").rstrip() + "\n" if (comments.text or "").strip() else "") + value


def _remove_keeping_tail(el) -> None:
    parent = el.getparent()
    prev = el.getprevious()
    if el.tail and el.tail.strip():
        if prev is not None:
            prev.tail = (prev.tail or "") + el.tail
        else:
            parent.text = (parent.text or "") + el.tail
    parent.remove(el)
