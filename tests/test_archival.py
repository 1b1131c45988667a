"""PAGE-XML and ALTO: reading, cutting lines, writing the texts back (no daemon; see test_archival_e2e).

Real exports (Transkribus, eScriptorium, PRImA; tests/data/archival/README.md names where each came
from) and synthetic pages (tests/archival_pages.py). What htrctl writes is validated against the official
XSD schemas committed in tests/data/archival/xsd.
"""

from __future__ import annotations

import io
import time

import pytest
from archival_pages import (
    DATA,
    ESCRIPTORIUM,
    GLAGOLITIC,
    PAGE_NS,
    PRIMA,
    TRANSKRIBUS,
    assert_valid,
    copy_fixture,
    glagolitic,
    make_page,
)
from lxml import etree
from PIL import Image

from htrctl import protocol as P
from htrctl.archival import crop as C
from htrctl.archival import job as J
from htrctl.archival import load, prepare, whole_image_document
from htrctl.archival.xmlsafe import parse
from htrctl.errors import ArchivalError


def answer(job: J.PageJob, texts=None, digest: str | None = "sha256:" + "ab" * 32) -> P.TranscribeResponse:
    """What the daemon would answer for *job*'s lines."""
    texts = texts or [f"text of {ln.id}" for ln in job.todo]
    return P.TranscribeResponse(request_id="r1", model_digest=digest,
                                results=[P.PageResult(page=i, text=t) for i, t in enumerate(texts)])


def without(tree_bytes: bytes, *local_names: str) -> bytes:
    """Canonical XML with the named elements removed (to compare "everything else")."""
    root = etree.fromstring(tree_bytes)
    for el in list(root.iter()):
        if isinstance(el.tag, str) and etree.QName(el).localname in local_names and el.getparent() is not None:
            el.getparent().remove(el)
    for el in root.iter():  # whitespace-only text/tails are layout, not content
        if el.text is not None and not el.text.strip():
            el.text = None
        if el.tail is not None and not el.tail.strip():
            el.tail = None
    return etree.tostring(root, method="c14n")


# ------------------------------------------------------------------ real exports, read
def test_transkribus_page_2013_reading_order_and_texts():
    doc = load(TRANSKRIBUS.read_bytes(), TRANSKRIBUS.name)
    assert doc.kind == "page" and doc.version == "PAGE 2013-07-15"
    assert doc.image_name == "170025120000003,0074.jpg"
    assert len(doc.lines) == 44
    # ReadingOrder puts region_1469098609000_462 (the page number) first, as does the custom attribute
    assert doc.lines[0].id == "line_1469098625593_463" and doc.lines[0].text == "$pag:39"
    assert doc.lines[1].text.startswith("$-nor su hijo")
    assert all(ln.geometry.polygon and ln.geometry.baseline for ln in doc.lines)


def test_escriptorium_alto_v4_lines_texts_baselines_and_polygons_are_read():
    doc = load(ESCRIPTORIUM.read_bytes(), ESCRIPTORIUM.name)
    assert doc.kind == "alto" and doc.version == "ALTO v4" and doc.image_name == "0014.jpg"
    assert [ln.id for ln in doc.lines] == ["eSc_line_0e5809e0", "eSc_line_d9c33ce2"]
    assert doc.lines[0].text == "Ꝙesãsͥ"
    assert doc.lines[0].geometry.baseline == [(5.0, 44.0), (224.0, 50.0)]
    assert len(doc.lines[0].geometry.polygon) == 89  # the Shape/Polygon, not the 4-corner box


def test_page_explicit_reading_order_differs_from_document_order():
    doc = load((DATA / "kraken" / "page_explicit_ro.xml").read_bytes(), "ro.xml")
    assert [ln.id for ln in doc.lines] == ["l3", "l4", "l1", "l2", "l5"]


def test_alto_words_joined_with_spaces_and_reading_order(tmp_path):
    doc = load((DATA / "kraken" / "alto_missing_coords_ro.xml").read_bytes(), "ro.xml")
    assert [ln.text for ln in doc.lines] == ["Line one", "Line two", "Line three", "Line four"]
    # an ALTO ReadingOrder that is not document order
    xml = (DATA / "kraken" / "alto_missing_coords_ro.xml").read_text().replace(
        'REF="tb_1"', 'REF="TMP"').replace('REF="tb_2"', 'REF="tb_1"').replace('REF="TMP"', 'REF="tb_2"')
    doc = load(xml.encode(), "ro2.xml")
    assert [ln.id for ln in doc.lines] == ["tl_4", "tl_3", "tl_1", "tl_2"]


def test_transkribus_custom_reading_order_inside_a_region():
    xml = TRANSKRIBUS.read_text(encoding="utf-8")
    # swap the order indexes of two lines of the main region: the custom attribute decides, not the file order
    xml = xml.replace('id="line_1469098653078_465" custom="readingOrder {index:1;}',
                      'id="line_1469098653078_465" custom="readingOrder {index:2;}', 1)
    xml = xml.replace('id="line_1469098657875_466" custom="readingOrder {index:2;}',
                      'id="line_1469098657875_466" custom="readingOrder {index:1;}', 1)
    ids = [ln.id for ln in load(xml.encode("utf-8"), "x.xml").lines]
    assert ids.index("line_1469098657875_466") < ids.index("line_1469098653078_465")


def test_page_2010_point_children_are_read_as_polygons(tmp_path):
    ns = "http://schema.primaresearch.org/PAGE/gts/pagecontent/2010-01-12"
    xml = (f'<PcGts xmlns="{ns}"><Metadata><Creator/><Created>2010-01-01T00:00:00</Created>'
           f'<LastChange>2010-01-01T00:00:00</LastChange></Metadata>'
           f'<Page imageFilename="a.png" imageWidth="100" imageHeight="50"><TextRegion id="r"><TextLine id="l">'
           f'<Coords><Point x="1" y="2"/><Point x="90" y="2"/><Point x="90" y="30"/><Point x="1" y="30"/></Coords>'
           f'</TextLine></TextRegion></Page></PcGts>').encode()
    doc = load(xml, "old.xml")
    assert doc.version == "PAGE 2010-01-12"
    assert doc.lines[0].geometry.polygon == [(1, 2), (90, 2), (90, 30), (1, 30)]


def test_unknown_xml_is_named():
    with pytest.raises(ArchivalError, match="neither PAGE-XML nor ALTO"):
        load(b"<html><body/></html>", "a.xml")
    with pytest.raises(ArchivalError, match="not well-formed"):
        load(b"<PcGts", "b.xml")


# ------------------------------------------------------------------ hostile XML
@pytest.mark.parametrize("levels", [3, 9])
def test_billion_laughs_is_refused_quickly(levels):
    """Nine levels: libxml2's own amplification limit stops it while parsing; three (only 1000 'lol's,
    below that limit): refused because the document declares entities at all."""
    ents = '<!ENTITY a0 "lol">' + "".join(f'<!ENTITY a{i} "{f"&a{i - 1};" * 10}">' for i in range(1, levels + 1))
    xml = (f'<?xml version="1.0"?><!DOCTYPE PcGts [{ents}]>'
           f'<PcGts xmlns="{PAGE_NS["2019"]}"><Metadata/><Page>&a{levels};</Page></PcGts>').encode()
    t0 = time.monotonic()
    with pytest.raises(ArchivalError, match="declares XML entities|entity amplification"):
        load(xml, "laughs.xml")
    assert time.monotonic() - t0 < 2.0


def test_external_entity_is_never_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    xml = (f'<?xml version="1.0"?><!DOCTYPE PcGts [<!ENTITY x SYSTEM "{secret.as_uri()}">]>'
           f'<PcGts xmlns="{PAGE_NS["2019"]}"><Metadata/><Page>&x;</Page></PcGts>').encode()
    with pytest.raises(ArchivalError, match="declares XML entities") as ei:
        load(xml, "xxe.xml")
    assert "TOP-SECRET" not in str(ei.value)


def test_external_dtd_is_not_loaded(tmp_path):
    dtd = tmp_path / "evil.dtd"
    dtd.write_text('<!ENTITY x "FROM-THE-DTD">')
    xml = (f'<?xml version="1.0"?><!DOCTYPE PcGts SYSTEM "{dtd.as_uri()}">'
           f'<PcGts xmlns="{PAGE_NS["2019"]}"><Metadata/><Page imageFilename="a.png">&x;</Page></PcGts>').encode()
    tree = parse(xml, "dtd.xml")
    assert b"FROM-THE-DTD" not in etree.tostring(tree)


def test_xml_over_the_size_limit_is_refused(monkeypatch):
    from htrctl.archival import xmlsafe

    monkeypatch.setattr(xmlsafe, "MAX_XML_BYTES", 1000)
    with pytest.raises(ArchivalError, match="more than the 1000 bytes"):
        load(b"<alto>" + b" " * 2000 + b"</alto>", "big.xml")


def test_bad_points_are_named():
    xml = TRANSKRIBUS.read_text(encoding="utf-8").replace('points="2344,182 2428,195 2420,244 2336,231"',
                                                          'points="2344,182 2428,195 2420"', 1)
    with pytest.raises(ArchivalError, match="TextLine line_1469098625593_463: cannot read the points"):
        load(xml.encode("utf-8"), "x.xml")


# ------------------------------------------------------------------ finding the page image
def test_image_with_spaces_and_non_ascii_name(tmp_path):
    xml, img, _ = make_page(tmp_path / "in", "Ⰰ folio 1r (Kiev)", n_lines=2)
    job = prepare(xml.read_bytes(), name=xml.name, xml_path=xml)
    assert job.image == img and len(job.todo) == 2


def test_transkribus_layout_xml_in_page_subfolder(tmp_path):
    xml, img, _ = make_page(tmp_path / "doc", "p1", n_lines=2)
    (tmp_path / "doc" / "page").mkdir()
    moved = xml.rename(tmp_path / "doc" / "page" / xml.name)
    assert prepare(moved.read_bytes(), name=moved.name, xml_path=moved).image == img


def test_images_option_and_missing_image_named(tmp_path):
    xml, img, _ = make_page(tmp_path / "xml", "p1", n_lines=2)
    elsewhere = tmp_path / "scans"
    elsewhere.mkdir()
    img.rename(elsewhere / img.name)
    with pytest.raises(ArchivalError, match=r"its page image 'p1.png' not found \(looked in .*xml") as ei:
        prepare(xml.read_bytes(), name=xml.name, xml_path=xml)
    assert ei.value.remedy and "--images" in ei.value.remedy
    assert prepare(xml.read_bytes(), name=xml.name, xml_path=xml, images_dir=elsewhere).image == elsewhere / img.name


def test_absolute_and_parent_paths_reduced_to_the_file_name(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    xml, img, _ = make_page(tmp_path / "a" / "b", "p1", n_lines=1, image_name=str(outside / "p1.png"))
    Image.new("RGB", (50, 50)).save(outside / "p1.png")
    # the absolute path is not opened: the file beside the XML (same name) is
    assert prepare(xml.read_bytes(), name=xml.name, xml_path=xml).image == img
    xml2, _, _ = make_page(tmp_path / "c" / "d", "p2", n_lines=1, image_name="../../outside/p1.png")
    with pytest.raises(ArchivalError, match="not found"):
        prepare(xml2.read_bytes(), name=xml2.name, xml_path=xml2)


def test_windows_path_in_image_filename(tmp_path):
    xml, img, _ = make_page(tmp_path, "p1", n_lines=1, image_name="C:\\Users\\scribe\\scans\\p1.png")
    assert prepare(xml.read_bytes(), name=xml.name, xml_path=xml).image == img


# ------------------------------------------------------------------ cutting lines
def test_polygon_crop_fills_outside_with_background():
    img = Image.new("L", (200, 100), 230)
    img.paste(0, (0, 0, 200, 100))  # black everywhere ...
    img.paste(230, (0, 40, 200, 60))  # ... but a light band
    g = C.LineGeometry(polygon=[(10, 30), (190, 45), (190, 70), (10, 55)])  # a skewed quadrilateral
    line = C.crop_line(img, g, 255)
    px = list(line.getdata())
    assert line.size == (181, 41)
    assert px.count(255) > 0.3 * len(px)  # the corners outside the polygon are background, not black
    assert min(px) == 0  # the black inside the polygon is kept


def test_inclined_baseline_is_straightened():
    img = Image.new("L", (600, 400), 255)
    from PIL import ImageDraw

    d = ImageDraw.Draw(img)
    d.line([(50, 100), (550, 300)], fill=0, width=9)  # a thick stroke along an inclined "baseline"
    g = C.LineGeometry(polygon=None, baseline=[(50, 100), (550, 300)], height=40)
    line = C.crop_line(img, g, 255)
    assert abs(C.baseline_angle(g.baseline) - 21.8) < 0.1
    w, h = line.size
    assert w > 500 and h < 60  # straightened: long and thin (the unrotated box is 500x200+)
    rows = [sum(1 for x in range(w) if line.getpixel((x, y)) < 128) for y in range(h)]
    assert max(rows) > 0.8 * w  # the stroke runs along one row after straightening


def test_right_to_left_baseline_not_turned_upside_down():
    assert C.baseline_angle([(500, 100), (50, 110)]) == pytest.approx(-1.27, abs=0.01)
    assert C.baseline_angle([(100, 50), (100, 500)]) == 90.0  # a vertical line written downwards


def test_baseline_only_height_from_neighbours():
    gs = [C.LineGeometry(baseline=[(0, y), (500, y)]) for y in (100, 150, 200)]
    lone = C.LineGeometry(baseline=[(800, 400), (900, 400)])
    C.estimate_heights([*gs, lone], 1000)
    assert [g.height for g in gs] == [50, 50, 50]
    assert lone.height == 50  # no horizontal neighbour: the page's median
    band = C.outline(gs[1])
    ys = [y for _, y in band]
    assert min(ys) == pytest.approx(150 - C.ASCENT * 50) and max(ys) == pytest.approx(150 + C.DESCENT * 50)


def test_polygon_outside_image_clipped_and_line_outside_left_alone(tmp_path):
    xml, _, lines = make_page(tmp_path, "p", n_lines=3)
    text = xml.read_text().replace(
        'points="' + " ".join(f"{x},{y}" for x, y in lines[0].polygon) + '"',
        'points="-100,-50 5000,-50 5000,200 -100,200"').replace(
        'points="' + " ".join(f"{x},{y}" for x, y in lines[2].polygon) + '"',
        'points="9000,9000 9500,9000 9500,9100 9000,9100"')
    job = prepare(text.encode(), name="p.xml", xml_path=xml)
    assert [ln.id for ln in job.todo] == ["l0", "l1"] and job.empty == ["l2"]
    assert any("l2" in w for w in job.doc.warnings)
    w0, h0 = Image.open(io.BytesIO(job.crops[0])).size
    assert w0 == 1200 and h0 <= 201  # clipped to the page
    out = job.render(answer(job))
    l2 = etree.fromstring(out).find(f".//{{{PAGE_NS['2019']}}}TextLine[@id='l2']")
    assert l2.find(f"{{{PAGE_NS['2019']}}}TextEquiv") is None  # left as it was


def test_image_smaller_than_declared_is_scaled(tmp_path):
    xml, img, _ = make_page(tmp_path, "p", n_lines=3)
    big = Image.open(img)
    big.resize((big.width // 2, big.height // 2)).save(img)
    job = prepare(xml.read_bytes(), name="p.xml", xml_path=xml)
    assert any("scaled" in w for w in job.doc.warnings)
    assert 550 < Image.open(io.BytesIO(job.crops[0])).width < 620


# ------------------------------------------------------------------ writing back
@pytest.mark.parametrize("version,xsd", [("2019", "pagecontent-2019-07-15.xsd"), ("2013", "pagecontent-2013-07-15.xsd")])
def test_page_written_back_valid_and_everything_else_kept(tmp_path, version, xsd):
    texts = {1: glagolitic(1), 3: "  "}
    xml, _, _ = make_page(tmp_path, "Ⱂ folio", version=version, n_lines=5, geometry="both", texts=texts,
                          angle_deg=2.0)
    src = xml.read_bytes()
    assert_valid(src, xsd)
    job = prepare(src, name=xml.name, xml_path=xml)
    assert [ln.id for ln in job.todo] == ["l0", "l2", "l3", "l4"] and job.kept == 1  # l1 has a text: kept
    new = [glagolitic(10 + i) + " \U0001E000" for i in range(4)]  # Glagolitic and the Supplement (non-BMP)
    out = job.render(answer(job, new))
    assert_valid(out, xsd)
    ns = {"p": PAGE_NS[version]}
    root = etree.fromstring(out)
    got = {tl.get("id"): tl.findtext("p:TextEquiv/p:Unicode", namespaces=ns) for tl in root.iterfind(".//p:TextLine", ns)}
    assert got == {"l0": new[0], "l1": texts[1], "l2": new[1], "l3": new[2], "l4": new[3]}
    # the region's own text: none before, none invented
    assert root.find("p:Page/p:TextRegion[@id='r0']/p:TextEquiv", ns) is None
    assert root.find("p:Page/p:TextRegion[@id='r_empty']", ns) is not None  # a region without lines, kept
    # a processing step naming htrctl and the model digest
    md = etree.tostring(root.find("p:Metadata", ns), encoding="unicode")
    assert "htrctl" in md and "sha256:" + "ab" * 32 in md
    assert without(out, "TextEquiv", "Metadata") == without(src, "TextEquiv", "Metadata")


def test_page_replace_and_region_text_updated(tmp_path):
    dest = copy_fixture(TRANSKRIBUS, tmp_path)
    src = dest.read_bytes()
    (dest.parent / "170025120000003,0074.jpg").unlink()
    idle = prepare(src, name=dest.name, xml_path=dest)  # every line has a text: nothing to do, no image needed
    assert idle.todo == [] and idle.kept == 44 and idle.image is None
    copy_fixture(TRANSKRIBUS, tmp_path)
    job = prepare(src, name=dest.name, xml_path=dest, replace=True)
    assert len(job.todo) == 44
    out = job.render(answer(job))
    assert_valid(out, "pagecontent-2013-07-15.xsd")
    ns = {"p": PAGE_NS["2013"]}
    root = etree.fromstring(out)
    region = root.find(".//p:TextRegion[@id='region_1469098609000_462']", ns)
    assert region.findtext("p:TextEquiv/p:Unicode", namespaces=ns) == "text of line_1469098625593_463"
    assert len(root.findall(".//p:TextLine/p:TextEquiv", ns)) == 44
    assert "htrctl" in root.findtext("p:Metadata/p:Comments", namespaces=ns)  # 2013: no MetadataItem
    assert out.startswith(b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>')
    assert without(out, "TextEquiv", "Metadata") == without(src, "TextEquiv", "Metadata")


def test_page_textequiv_placed_before_textstyle(tmp_path):
    xml, _, _ = make_page(tmp_path, "p", n_lines=1)
    ns = PAGE_NS["2019"]
    text = xml.read_text().replace("      </TextLine>", '        <Word id="w1"><Coords points="50,100 60,100 60,90"/>'
                                   '</Word>\n        <TextStyle fontSize="12"/>\n      </TextLine>')
    job = prepare(text.encode(), name="p.xml", xml_path=xml)
    out = job.render(answer(job))
    assert_valid(out, "pagecontent-2019-07-15.xsd")
    kids = [etree.QName(c).localname for c in etree.fromstring(out).find(f".//{{{ns}}}TextLine")]
    assert kids == ["Coords", "Baseline", "Word", "TextEquiv", "TextStyle"]


def test_characters_xml_cannot_hold_are_dropped(tmp_path, caplog):
    xml, _, _ = make_page(tmp_path, "p", n_lines=2)
    job = prepare(xml.read_bytes(), name="p.xml", xml_path=xml)
    out = job.render(answer(job, ["a\x00b\x1bc", "Ⰰ\ufffe"]))  # a model can emit these
    assert_valid(out, "pagecontent-2019-07-15.xsd")
    assert [ln.text for ln in load(out, "p.xml").lines] == ["abc", "Ⰰ"]
    assert "3 character(s) that XML cannot hold dropped" in caplog.text


def test_prima_example_region_without_lines_kept(tmp_path):
    dest = copy_fixture(PRIMA, tmp_path)
    src = dest.read_bytes()
    job = prepare(src, name=dest.name, xml_path=dest)
    assert [ln.id for ln in job.todo] == ["l0"]  # the only line; r1 has text but no lines
    out = job.render(answer(job))
    assert_valid(out, "pagecontent-2017-07-15.xsd")
    assert b"There is a plethora of established" in out
    assert without(out, "TextEquiv", "Metadata") == without(src, "TextEquiv", "Metadata")


def test_escriptorium_alto_written_back(tmp_path):
    dest = copy_fixture(ESCRIPTORIUM, tmp_path)
    src = dest.read_bytes()
    job = prepare(src, name=dest.name, xml_path=dest, replace=True)
    assert len(job.crops) == 2
    out = job.render(answer(job, ["ⰀⰁⰂ Ⱃ", "a9 ⱄ"]))
    assert_valid(out, "alto-4-4.xsd")
    ns = {"a": "http://www.loc.gov/standards/alto/ns-v4#"}
    root = etree.fromstring(out)
    strings = root.findall(".//a:TextLine/a:String", ns)
    assert [s.get("CONTENT") for s in strings] == ["ⰀⰁⰂ Ⱃ", "a9 ⱄ"]
    assert strings[0].get("HPOS") == "4" and strings[0].get("WIDTH") == "219"  # the String kept its geometry
    proc = root.find("a:Description/a:Processing", ns)
    assert proc.findtext("a:processingSoftware/a:softwareName", namespaces=ns) == "htrctl"
    assert "sha256:" in proc.findtext("a:processingStepSettings", namespaces=ns)
    assert without(out, "String", "Processing") == without(src, "String", "Processing")


@pytest.mark.parametrize("version,xsd", [("v4", "alto-4-4.xsd"), ("v3", "alto-3-1.xsd"), ("v2", "alto-2-1.xsd")])
def test_alto_words_become_one_string_per_line(tmp_path, version, xsd):
    xml, _, _ = make_page(tmp_path, "p", fmt="alto", version=version, n_lines=3,
                          texts={0: "Ⰰ ⰁⰂ Ⱃ"}, empty_region=True)
    src = xml.read_bytes()
    assert_valid(src, xsd)
    job = prepare(src, name=xml.name, xml_path=xml)
    assert [ln.id for ln in job.todo] == ["l1", "l2"] and job.kept == 1
    assert job.doc.lines[0].text == "Ⰰ ⰁⰂ Ⱃ"  # words joined by their SP
    job = prepare(src, name=xml.name, xml_path=xml, replace=True)
    out = job.render(answer(job, ["one two", "ⰀⰁ", "x"]))
    assert_valid(out, xsd)
    ns = {"a": f"http://www.loc.gov/standards/alto/ns-{version}#"}
    root = etree.fromstring(out)
    l0 = root.find(".//a:TextLine[@ID='l0']", ns)
    assert [etree.QName(c).localname for c in l0 if etree.QName(c).localname != "Shape"] == ["String"]
    assert l0.find("a:String", ns).get("ID") == "l0_w0" and l0.find("a:String", ns).get("CONTENT") == "one two"
    step = "Processing" if version == "v4" else "OCRProcessing"
    assert root.find(f"a:Description/a:{step}", ns) is not None


def test_alto_mm10_coordinates_scaled_to_pixels(tmp_path):
    xml, _, _ = make_page(tmp_path, "p", fmt="alto", n_lines=2, empty_region=False)
    doc_px = prepare(xml.read_bytes(), name="p.xml", xml_path=xml)
    text = xml.read_text().replace("<MeasurementUnit>pixel", "<MeasurementUnit>mm10")
    # the same page described in tenths of a millimetre at 300 dpi: every coordinate * 254/300
    root = etree.fromstring(text.encode())
    f = 254 / 300
    for el in root.iter():
        for a in ("HPOS", "VPOS", "WIDTH", "HEIGHT"):
            if el.get(a) is not None:
                el.set(a, f"{float(el.get(a)) * f:.2f}")
        for a in ("POINTS", "BASELINE"):
            if el.get(a):
                el.set(a, " ".join(f"{float(v) * f:.2f}" for v in el.get(a).split()))
    job = prepare(etree.tostring(root), name="p.xml", xml_path=xml)
    assert not job.doc.warnings
    a = Image.open(io.BytesIO(job.crops[0])).size
    b = Image.open(io.BytesIO(doc_px.crops[0])).size
    assert abs(a[0] - b[0]) <= 2 and abs(a[1] - b[1]) <= 2


def test_baseline_only_page_lines_are_cut(tmp_path):
    xml, _, _ = make_page(tmp_path, "p", n_lines=4, geometry="baseline", angle_deg=-3.0)
    job = prepare(xml.read_bytes(), name="p.xml", xml_path=xml)
    assert len(job.crops) == 4
    for png in job.crops:
        w, h = Image.open(io.BytesIO(png)).size
        assert w > 1000 and 45 <= h <= 65  # the band: (ASCENT + DESCENT) * 48 px spacing, straightened


# ------------------------------------------------------------------ plain images -> PAGE / ALTO
def test_whole_image_page_and_alto_are_valid(tmp_path):
    img = tmp_path / "line.png"
    Image.new("RGB", (640, 80), "white").save(img)
    resp = P.TranscribeResponse(request_id="r", model_digest="sha256:" + "cd" * 32,
                                results=[P.PageResult(page=0, text="ⰀⰁⰂ & <ok>")])
    page = whole_image_document("page", str(img), img.read_bytes(), resp)
    assert_valid(page, "pagecontent-2019-07-15.xsd")
    doc = load(page, "x.xml")
    assert doc.image_name == "line.png" and doc.lines[0].text == "ⰀⰁⰂ & <ok>"
    alto = whole_image_document("alto", str(img), img.read_bytes(), resp)
    assert_valid(alto, "alto-4-4.xsd")
    assert load(alto, "y.xml").lines[0].text == "ⰀⰁⰂ & <ok>"


def test_a_multipage_tiff_becomes_one_alto_page_per_page_and_no_page_xml(tmp_path):
    tif = tmp_path / "two.tif"
    a, b = Image.new("L", (300, 60), 255), Image.new("L", (320, 70), 255)
    a.save(tif, save_all=True, append_images=[b])
    resp = P.TranscribeResponse(request_id="r", results=[P.PageResult(page=0, text="a"), P.PageResult(page=1, text="b")])
    alto = whole_image_document("alto", str(tif), tif.read_bytes(), resp)
    assert_valid(alto, "alto-4-4.xsd")
    pages = etree.fromstring(alto).findall(".//{http://www.loc.gov/standards/alto/ns-v4#}Page")
    assert [(p.get("WIDTH"), p.get("HEIGHT")) for p in pages] == [("300", "60"), ("320", "70")]
    with pytest.raises(ArchivalError, match="a PAGE file holds one"):
        whole_image_document("page", str(tif), tif.read_bytes(), resp)


def test_glagolitic_alphabet_round_trip():
    assert len(GLAGOLITIC) == 31 and all(0x2C00 <= ord(c) <= 0x2C5F for c in GLAGOLITIC)
