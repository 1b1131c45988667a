"""One PAGE/ALTO file through the daemon: find its image, cut its lines, send them, write the texts back."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from .. import __version__
from .. import protocol as P
from ..errors import ArchivalError
from . import crop as C
from .alto import AltoDocument, alto_version
from .doc import Document, Line
from .page import PageDocument, is_page
from .xmlsafe import parse, serialize

logger = logging.getLogger(__name__)
XML_SUFFIXES = (".xml",)
PREPARE_THREADS = min(4, os.cpu_count() or 1)
# Decoded page images held at once, whatever the client's concurrency (a 600 dpi folio is ~100 MB decoded).
_PAGES_IN_MEMORY = threading.BoundedSemaphore(max(2, os.cpu_count() or 1))
LINES_PER_REQUEST = 256  # the daemon's default limits.max_images_per_request
# Characters XML 1.0 cannot hold (C0 controls but tab/newline/CR, surrogates, U+FFFE/U+FFFF): a model can emit
# them; they are dropped from its text rather than making the file unwritable.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".jp2", ".webp", ".bmp")


def is_xml(name: str) -> bool:
    return name.lower().endswith(XML_SUFFIXES)


def load(data: bytes, name: str) -> Document:
    """Parse *data* as PAGE or ALTO (recognised by the root's namespace)."""
    tree = parse(data, name)
    root = tree.getroot()
    if is_page(root):
        return PageDocument.read(tree, name)
    if alto_version(root) is not None:
        return AltoDocument.read(tree, name)
    tag = root.tag if isinstance(root.tag, str) else "?"
    raise ArchivalError(f"{name}: neither PAGE-XML nor ALTO (root element {tag})",
                        remedy="PAGE (PcGts in a schema.primaresearch.org namespace) and ALTO v2-v4 are read")


def _candidates(image_name: str | None, xml_path: Path | None, images_dir: Path | None) -> list[Path]:
    """Where the page image may be. A name the file gives is looked up relative to --images, the XML's
    folder and that folder's parent (Transkribus exports put the XML in page/ beside the images); an
    absolute path, a URL or a name with '..' is reduced to its last component: a file never makes
    htrctl read outside those folders."""
    dirs = [d for d in (images_dir, xml_path.parent if xml_path else None,
                        xml_path.parent.parent if xml_path else None) if d is not None]
    names: list[str] = []
    if image_name:
        raw = image_name.strip()
        if raw.lower().startswith("file:"):
            raw = unquote(raw[5:])
        base = raw.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        rel = raw.replace("\\", "/")
        if "://" not in rel and not rel.startswith("/") and ":" not in rel.split("/", 1)[0] \
                and ".." not in PurePosixPath(rel).parts:
            names.append(rel)
        names.append(base)
        if "%" in base:
            names.append(unquote(base))
    elif xml_path is not None:
        names.extend(xml_path.stem + s for s in IMAGE_SUFFIXES)
        names.extend(xml_path.stem + s.upper() for s in IMAGE_SUFFIXES)
    out: list[Path] = []
    for d in dirs:
        for n in dict.fromkeys(names):
            if n:
                out.append(d / n)
    return out


def find_image(doc: Document, xml_path: Path | None, images_dir: Path | None) -> Path:
    cands = _candidates(doc.image_name, xml_path, images_dir)
    for c in cands:
        if c.is_file():
            return c
    what = f"its page image {doc.image_name!r}" if doc.image_name else "the name of its page image"
    looked = ", ".join(dict.fromkeys(str(c.parent) for c in cands)) or "nowhere (no --images)"
    raise ArchivalError(f"{doc.name}: {what} not found (looked in {looked})",
                        remedy="put the image beside the XML file or pass --images DIR")


@dataclass
class PageJob:
    """A parsed file, its lines cut out, waiting for the daemon's texts."""

    doc: Document
    image: Path | None  # None when no line needs recognising
    todo: list[Line] = field(default_factory=list)  # lines to recognise, in reading order
    crops: list[bytes] = field(default_factory=list)  # their PNGs, same order
    kept: int = 0  # lines that already had a text (kept: no --replace)
    empty: list[str] = field(default_factory=list)  # lines with no area inside the image (left as they were)
    prepare_ms: float = 0.0
    source: bytes | None = None  # the file as read (its XML declaration is kept)

    def send(self, client: Any, *, timeout: float | None, max_new_tokens: int | None) -> P.TranscribeResponse:
        """The lines through ``/v1/transcribe/batch`` (one request per page; more above LINES_PER_REQUEST).

        One result per line (``page`` is the line's position in this request order). A line the daemon
        refuses fails the whole file (nothing is written for it); daemon-level errors (not ready, queue
        full, connection lost) propagate as :class:`~htrctl.errors.DaemonError` for the caller to retry."""
        results: list[P.PageResult] = []
        rid = digest = None
        for start in range(0, len(self.crops), LINES_PER_REQUEST):
            chunk = self.crops[start:start + LINES_PER_REQUEST]
            names = [f"{ln.id}.png" for ln in self.todo[start:start + LINES_PER_REQUEST]]
            resp = client.transcribe_batch(list(zip(names, chunk)), timeout=timeout, max_new_tokens=max_new_tokens)
            rid, digest = rid or resp.request_id, resp.model_digest or digest
            for item in resp.items:
                ln = self.todo[start + item.index]
                if item.error is not None or not item.results:
                    msg = item.error.message if item.error is not None else "no result"
                    raise ArchivalError(f"{self.doc.name}: line {ln.id}: {msg}")
                r = item.results[0].model_copy()
                r.page = start + item.index
                results.append(r)
        return P.TranscribeResponse(request_id=rid or "-", model_digest=digest, results=results)

    def render(self, resp: P.TranscribeResponse) -> bytes:
        """The file with the recognised texts in place."""
        if len(resp.results) != len(self.todo):
            raise ArchivalError(f"{self.doc.name}: {len(resp.results)} texts for {len(self.todo)} lines")
        dropped = 0
        for ln, r in zip(self.todo, resp.results):
            text, n = _NOT_XML.subn("", r.text)
            dropped += n
            self.doc.set_text(ln, text)
        if dropped:
            logger.warning("%s: %d character(s) that XML cannot hold dropped from the model's texts",
                           self.doc.name, dropped)
        if self.todo:
            self.doc.finish(self.todo, model_digest=resp.model_digest, software_version=__version__)
        return serialize(self.doc.tree, self.source)


def prepare(data: bytes, *, name: str, xml_path: Path | None, images_dir: Path | None = None,
            replace: bool = False) -> PageJob:
    """Parse *data*, find and open the page image, cut out the lines to recognise.

    Without *replace* a line that already has a text keeps it and is not sent; with it every line is."""
    t0 = time.monotonic()
    doc = load(data, name)
    job = PageJob(doc, None, source=data[:200])
    for ln in doc.lines:
        if ln.has_text and not replace:
            job.kept += 1
        else:
            job.todo.append(ln)
    if job.todo:  # a page whose lines all have their text needs no image
        job.image = find_image(doc, xml_path, images_dir)
        with _PAGES_IN_MEMORY:
            _cut(job)
    job.prepare_ms = (time.monotonic() - t0) * 1000.0
    return job


def _cut(job: PageJob) -> None:
    """Decode the page image and cut ``job.todo``'s lines out of it (lines with no area are dropped)."""
    doc = job.doc
    img = C.open_page_image(job.image.read_bytes(), str(job.image))
    doc.scale_to(img.size)
    C.estimate_heights([ln.geometry for ln in doc.lines], img.size[1])
    fill = C.background(img)

    def cut(ln: Line) -> bytes | None:
        line_img = C.crop_line(img, ln.geometry, fill)
        return None if line_img is None else C.to_png(line_img)

    # Pillow releases the GIL while it resamples and zlib while it compresses: lines are cut in parallel.
    with ThreadPoolExecutor(max_workers=min(PREPARE_THREADS, max(1, len(job.todo)))) as pool:
        pngs = list(pool.map(cut, job.todo))
    job.empty = [ln.id for ln, png in zip(job.todo, pngs) if png is None]
    job.crops = [png for png in pngs if png is not None]
    job.todo = [ln for ln, png in zip(job.todo, pngs) if png is not None]
    if job.empty:
        doc.warnings.append(f"{len(job.empty)} line(s) without area inside the image left as they were: "
                            + ", ".join(job.empty[:5]) + (" ..." if len(job.empty) > 5 else ""))


# --------------------------------------------------------------------- plain images -> PAGE / ALTO
PAGE_2019 = "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15"
ALTO_V4 = "http://www.loc.gov/standards/alto/ns-v4#"
XSI = "http://www.w3.org/2001/XMLSchema-instance"


def _image_sizes(data: bytes, name: str) -> list[tuple[int, int]]:
    Image = C._pil()
    import io
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                sizes = []
                for i in range(getattr(im, "n_frames", 1)):
                    im.seek(i)
                    sizes.append(im.size)
                return sizes
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ArchivalError(f"{name}: cannot read the image size: {exc}") from None


def whole_image_document(fmt: str, image_name: str, data: bytes, resp: P.TranscribeResponse) -> bytes:
    """A PAGE (2019) or ALTO (v4) file around whole-image transcriptions: one region and one line covering
    each page image, holding its text. (No segmentation: segment first with ``kraken segment`` and
    transcribe the XML it writes for line-level geometry.)"""
    from .xmlsafe import _lxml

    etree = _lxml()
    sizes = _image_sizes(data, image_name)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    step = f"htrctl {__version__}: whole-image recognition" + (
        f" with model {resp.model_digest}" if resp.model_digest else "")
    fname = os.path.basename(image_name)
    if fmt == "page":
        if len(resp.results) != 1:
            raise ArchivalError(f"{image_name}: {len(resp.results)} pages; a PAGE file holds one",
                                remedy="use -f alto (one Page per image page) or split the TIFF")
        w, h = sizes[0]
        E = lambda tag, **a: etree.Element(f"{{{PAGE_2019}}}{tag}", {k: str(v) for k, v in a.items()})
        root = etree.Element(f"{{{PAGE_2019}}}PcGts", nsmap={None: PAGE_2019, "xsi": XSI})
        root.set(f"{{{XSI}}}schemaLocation", f"{PAGE_2019} {PAGE_2019}/pagecontent.xsd")
        md = etree.SubElement(root, f"{{{PAGE_2019}}}Metadata")
        for tag, text in (("Creator", f"htrctl {__version__}"), ("Created", now), ("LastChange", now)):
            etree.SubElement(md, f"{{{PAGE_2019}}}{tag}").text = text
        md.append(E("MetadataItem", type="processingStep", name="htrctl", value=step, date=now))
        page = etree.SubElement(root, f"{{{PAGE_2019}}}Page", imageFilename=fname, imageWidth=str(w),
                                imageHeight=str(h))
        box = f"0,0 {w - 1},0 {w - 1},{h - 1} 0,{h - 1}"
        region = etree.SubElement(page, f"{{{PAGE_2019}}}TextRegion", id="r0")
        region.append(E("Coords", points=box))
        line = etree.SubElement(region, f"{{{PAGE_2019}}}TextLine", id="r0l0")
        line.append(E("Coords", points=box))
        for holder in (line, region):
            te = etree.SubElement(holder, f"{{{PAGE_2019}}}TextEquiv")
            etree.SubElement(te, f"{{{PAGE_2019}}}Unicode").text = _NOT_XML.sub("", resp.results[0].text)
    else:
        q = lambda tag: f"{{{ALTO_V4}}}{tag}"
        root = etree.Element(q("alto"), nsmap={None: ALTO_V4, "xsi": XSI})
        root.set(f"{{{XSI}}}schemaLocation", f"{ALTO_V4} http://www.loc.gov/standards/alto/v4/alto-4-4.xsd")
        desc = etree.SubElement(root, q("Description"))
        etree.SubElement(desc, q("MeasurementUnit")).text = "pixel"
        sii = etree.SubElement(desc, q("sourceImageInformation"))
        etree.SubElement(sii, q("fileName")).text = fname
        proc = etree.SubElement(desc, q("Processing"), ID="htrctl_1")
        etree.SubElement(proc, q("processingCategory")).text = "contentGeneration"
        etree.SubElement(proc, q("processingDateTime")).text = now.rstrip("Z")
        etree.SubElement(proc, q("processingStepDescription")).text = step
        sw = etree.SubElement(proc, q("processingSoftware"))
        etree.SubElement(sw, q("softwareName")).text = "htrctl"
        etree.SubElement(sw, q("softwareVersion")).text = __version__
        layout = etree.SubElement(root, q("Layout"))
        for r in resp.results:
            w, h = sizes[r.page] if r.page < len(sizes) else sizes[0]
            dims = {"HPOS": "0", "VPOS": "0", "WIDTH": str(w), "HEIGHT": str(h)}
            pg = etree.SubElement(layout, q("Page"), ID=f"p{r.page}", PHYSICAL_IMG_NR=str(r.page + 1),
                                  WIDTH=str(w), HEIGHT=str(h))
            ps = etree.SubElement(pg, q("PrintSpace"), **dims)
            tb = etree.SubElement(ps, q("TextBlock"), ID=f"p{r.page}b0", **dims)
            tl = etree.SubElement(tb, q("TextLine"), ID=f"p{r.page}l0", **dims)
            etree.SubElement(tl, q("String"), ID=f"p{r.page}s0", CONTENT=" ".join(_NOT_XML.sub("", r.text).split()),
                             **dims)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
