"""Synthetic manuscript pages with their PAGE-XML / ALTO, for the archival tests and bench.

``make_page`` draws a parchment-coloured page with "ink" strokes along each
line's baseline (optionally inclined) and writes the PAGE 2019 (or 2013) or
ALTO v4 (or v2/v3) file that describes it: polygons, baselines only, or both,
with an optional empty region and optional existing texts (Glagolitic).
"""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from lxml import etree
from PIL import Image, ImageDraw

DATA = Path(__file__).resolve().parent / "data" / "archival"
XSD = DATA / "xsd"
TRANSKRIBUS = DATA / "transkribus" / "170025120000003,0074.xml"
ESCRIPTORIUM = DATA / "escriptorium" / "0014.xml"
PRIMA = DATA / "prima" / "SimplePage.xml"
_SCHEMAS: dict[str, object] = {}


def schema(name: str):
    """An official schema, its xlink import pointed at the local copy (no network)."""
    if name not in _SCHEMAS:
        text = (XSD / name).read_text(encoding="utf-8").replace(
            'schemaLocation="http://www.loc.gov/standards/xlink/xlink.xsd"',
            f'schemaLocation="{(XSD / "xlink.xsd").resolve().as_uri()}"')
        parser = etree.XMLParser(no_network=True, resolve_entities=False)
        _SCHEMAS[name] = etree.XMLSchema(etree.fromstring(text.encode(), parser, base_url=XSD.resolve().as_uri() + "/"))
    return _SCHEMAS[name]


def assert_valid(xml: bytes, xsd: str) -> None:
    s = schema(xsd)
    ok = s.validate(etree.fromstring(xml))
    assert ok, [e.message for e in s.error_log][:5]


def copy_fixture(xml: Path, dest: Path) -> Path:
    """The XML and its image into *dest* (tests never write into tests/data)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in xml.parent.iterdir():
        if p.stem == xml.stem:
            shutil.copyfile(p, dest / p.name)
    return dest / xml.name


PARCHMENT = (233, 221, 190)
INK = (60, 40, 30)
GLAGOLITIC = "ⰀⰁⰂⰃⰄⰅⰆⰇⰈⰉⰊⰋⰌⰍⰎⰏⰐⰑⰒⰓⰔⰕⰖⰗⰘⰙⰚⰛⰜⰝⰞ"
PAGE_NS = {"2013": "http://schema.primaresearch.org/PAGE/gts/pagecontent/2013-07-15",
           "2019": "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15"}
ALTO_NS = {"v2": "http://www.loc.gov/standards/alto/ns-v2#", "v3": "http://www.loc.gov/standards/alto/ns-v3#",
           "v4": "http://www.loc.gov/standards/alto/ns-v4#"}


@dataclass
class SynthLine:
    id: str
    baseline: list[tuple[int, int]]
    polygon: list[tuple[int, int]] | None
    text: str | None  # an existing text in the file


def glagolitic(i: int, n: int = 12) -> str:
    rnd = random.Random(i)
    words = ["".join(rnd.choice(GLAGOLITIC) for _ in range(rnd.randint(2, 6))) for _ in range(max(1, n // 4))]
    return " ".join(words)


def _layout(n_lines: int, width: int, spacing: int, angle_deg: float, top: int = 60, left: int = 50):
    out = []
    a = math.radians(angle_deg)
    length = width - 2 * left
    for i in range(n_lines):
        x0, y0 = left, top + (i + 1) * spacing
        x1, y1 = x0 + length * math.cos(a), y0 + length * math.sin(a)
        out.append([(x0, y0), (round(x1), round(y1))])
    return out


def _polygon(baseline, height: int):
    (x0, y0), (x1, y1) = baseline
    a = math.atan2(y1 - y0, x1 - x0)
    nx, ny = math.sin(a), -math.cos(a)
    up = [(x + nx * 0.75 * height, y + ny * 0.75 * height) for x, y in baseline]
    down = [(x - nx * 0.3 * height, y - ny * 0.3 * height) for x, y in baseline]
    return [(round(x), round(y)) for x, y in up + down[::-1]]


def draw_page(size, lines: list[SynthLine], spacing: int, seed: int = 0) -> Image.Image:
    img = Image.new("RGB", size, PARCHMENT)
    d = ImageDraw.Draw(img)
    rnd = random.Random(seed)
    for ln in lines:
        (x0, y0), (x1, y1) = ln.baseline
        steps = max(2, int(math.hypot(x1 - x0, y1 - y0) // 9))
        for k in range(steps):
            t = k / steps
            x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
            if rnd.random() < 0.15:
                continue  # a space between words
            h = rnd.randint(int(spacing * 0.3), int(spacing * 0.55))
            d.line([(x, y), (x + rnd.randint(-3, 3), y - h)], fill=INK, width=2)
    return img


def make_page(folder: Path, name: str = "folio 1r", *, fmt: str = "page", version: str | None = None,
              n_lines: int = 6, geometry: str = "both", angle_deg: float = 0.0, texts: dict[int, str] | None = None,
              empty_region: bool = True, image_suffix: str = ".png", width: int = 1200, spacing: int = 48,
              image_name: str | None = None) -> tuple[Path, Path, list[SynthLine]]:
    """Write ``<folder>/<name><image_suffix>`` and ``<folder>/<name>.xml``; returns both paths and the lines.

    *geometry*: "both" (Coords + Baseline), "polygon", "baseline" (PAGE only). *texts*: line index -> an
    existing text. *image_name* overrides the name the file gives for its image."""
    folder.mkdir(parents=True, exist_ok=True)
    version = version or ("2019" if fmt == "page" else "v4")
    texts = texts or {}
    height = 120 + (n_lines + 1) * spacing + int(abs(math.sin(math.radians(angle_deg))) * width)
    lines = [SynthLine(f"l{i}", bl, _polygon(bl, spacing) if geometry != "baseline" else None, texts.get(i))
             for i, bl in enumerate(_layout(n_lines, width, spacing, angle_deg))]
    img = draw_page((width, height), lines, spacing)
    img_path = folder / f"{name}{image_suffix}"
    img.save(img_path)
    xml_path = folder / f"{name}.xml"
    fname = image_name if image_name is not None else img_path.name
    if fmt == "page":
        xml = _page_xml(fname, (width, height), lines, version, geometry, empty_region)
    else:
        xml = _alto_xml(fname, (width, height), lines, version, empty_region)
    xml_path.write_text(xml, encoding="utf-8")
    return xml_path, img_path, lines


def _pts(points, sep=",") -> str:
    return " ".join(f"{x}{sep}{y}" for x, y in points)


def _bbox(points):
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _page_xml(fname, size, lines, version, geometry, empty_region) -> str:
    ns = PAGE_NS[version]
    w, h = size
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           (f'<PcGts xmlns="{ns}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            f'xsi:schemaLocation="{ns} {ns}/pagecontent.xsd">'),
           "  <Metadata>", "    <Creator>tests/archival_pages.py</Creator>",
           "    <Created>2026-01-01T00:00:00</Created>", "    <LastChange>2026-01-01T00:00:00</LastChange>",
           "  </Metadata>",
           f"  <Page imageFilename={quoteattr(fname)} imageWidth=\"{w}\" imageHeight=\"{h}\">",
           "    <ReadingOrder>", '      <OrderedGroup id="ro0" caption="Regions reading order">']
    if empty_region:
        out.append('        <RegionRefIndexed index="0" regionRef="r_empty"/>')
    out += ['        <RegionRefIndexed index="1" regionRef="r0"/>', "      </OrderedGroup>", "    </ReadingOrder>"]
    if empty_region:
        out += ['    <TextRegion id="r_empty" type="heading">', '      <Coords points="10,10 300,10 300,40 10,40"/>',
                "    </TextRegion>"]
    allpts = [p for ln in lines for p in (ln.polygon or ln.baseline)]
    x0, y0, x1, y1 = _bbox(allpts)
    out += ['    <TextRegion id="r0" type="paragraph">',
            f'      <Coords points="{_pts([(max(0, x0 - 5), max(0, y0 - 40)), (x1 + 5, max(0, y0 - 40)), (x1 + 5, y1 + 5), (max(0, x0 - 5), y1 + 5)])}"/>']
    for ln in lines:
        out.append(f'      <TextLine id="{ln.id}">')
        if ln.polygon is not None:
            out.append(f'        <Coords points="{_pts(ln.polygon)}"/>')
        else:  # Coords is required: a producer with only baselines writes the baseline there (no area)
            out.append(f'        <Coords points="{_pts(ln.baseline)}"/>')
        if geometry in ("both", "baseline"):
            out.append(f'        <Baseline points="{_pts(ln.baseline)}"/>')
        if ln.text is not None:
            out.append(f"        <TextEquiv><Unicode>{escape(ln.text)}</Unicode></TextEquiv>")
        out.append("      </TextLine>")
    out += ["    </TextRegion>", "  </Page>", "</PcGts>", ""]
    return "\n".join(out)


def _alto_xml(fname, size, lines, version, empty_region) -> str:
    ns = ALTO_NS[version]
    w, h = size
    out = ['<?xml version="1.0" encoding="UTF-8"?>', f'<alto xmlns="{ns}">', "  <Description>",
           "    <MeasurementUnit>pixel</MeasurementUnit>",
           f"    <sourceImageInformation><fileName>{escape(fname)}</fileName></sourceImageInformation>",
           "  </Description>", "  <Layout>",
           f'    <Page ID="p0" WIDTH="{w}" HEIGHT="{h}" PHYSICAL_IMG_NR="1">',
           f'      <PrintSpace HPOS="0" VPOS="0" WIDTH="{w}" HEIGHT="{h}">']
    if empty_region:
        out.append('        <TextBlock ID="b_empty" HPOS="10" VPOS="10" WIDTH="290" HEIGHT="30"/>')
    allpts = [p for ln in lines for p in (ln.polygon or ln.baseline)]
    x0, y0, x1, y1 = _bbox(allpts)
    out.append(f'        <TextBlock ID="b0" HPOS="{x0}" VPOS="{y0}" WIDTH="{x1 - x0}" HEIGHT="{y1 - y0}">')
    for ln in lines:
        bx0, by0, bx1, by1 = _bbox(ln.polygon or ln.baseline)
        base = f' BASELINE="{_pts(ln.baseline, " ")}"' if version == "v4" else f' BASELINE="{ln.baseline[0][1]}"'
        out.append(f'          <TextLine ID="{ln.id}" HPOS="{bx0}" VPOS="{by0}" WIDTH="{bx1 - bx0}" '
                   f'HEIGHT="{by1 - by0}"{base}>')
        if ln.polygon is not None and version != "v2":
            out.append(f'            <Shape><Polygon POINTS="{_pts(ln.polygon, " ")}"/></Shape>')
        words = (ln.text or "").split() or [""]
        for k, word in enumerate(words):
            if k:
                out.append(f'            <SP HPOS="{bx0}" VPOS="{by0}" WIDTH="1"/>')
            out.append(f'            <String ID="{ln.id}_w{k}" CONTENT={quoteattr(word)} HPOS="{bx0}" '
                       f'VPOS="{by0}" WIDTH="{bx1 - bx0}" HEIGHT="{by1 - by0}"/>')
        out.append("          </TextLine>")
    out += ["        </TextBlock>", "      </PrintSpace>", "    </Page>", "  </Layout>", "</alto>", ""]
    return "\n".join(out)
