"""`htrctl transcribe FILE.xml` end to end: a real htrd (demo model, CPU, Unix socket) and real exports.

The demo model's weights are random, so its texts are noise; what is checked is that each line's text
is the daemon's answer for that line's image, in place, in a file that is still valid against the
official schema, and that a page costs one batch request.
"""

from __future__ import annotations

import functools
import json

import pytest
from archival_pages import ESCRIPTORIUM, TRANSKRIBUS, assert_valid, copy_fixture, make_page
from daemon_harness import start_daemon
from helpers import SAMPLES, run_htrctl
from lxml import etree

from htrctl.archival import prepare
from htrctl.archival.job import _NOT_XML

pytestmark = pytest.mark.slow


htrctl = functools.partial(run_htrctl, text=False)  # this file's tests read bytes


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, provisioned_model):
    d = start_daemon(tmp_path_factory.mktemp("archival-e2e"), provisioned_model)
    yield d
    assert d.stop() == 0, d.stderr()[-3000:]


def page_texts(xml: bytes) -> dict[str, str]:
    root = etree.fromstring(xml)
    ns = etree.QName(root).namespace
    if etree.QName(root).localname == "PcGts":
        return {tl.get("id"): tl.findtext(f"{{{ns}}}TextEquiv/{{{ns}}}Unicode")
                for tl in root.iter(f"{{{ns}}}TextLine")}
    return {tl.get("ID"): " ".join(s.get("CONTENT") for s in tl.iter(f"{{{ns}}}String"))
            for tl in root.iter(f"{{{ns}}}TextLine")}


def test_page_and_alto_written_back_one_batch_per_page(daemon, tmp_path):
    src = tmp_path / "in"
    trk = copy_fixture(TRANSKRIBUS, src / "transkribus")
    esc = copy_fixture(ESCRIPTORIUM, src / "escriptorium")
    glag, _, _ = make_page(src / "synthetic", "Ⰰ folio 1r", n_lines=5, geometry="baseline", angle_deg=4.0,
                           texts={2: "ⰀⰁⰂ ⰃⰄ"})
    before = daemon.status()
    out = tmp_path / "out"
    r = htrctl("transcribe", "-s", str(daemon.socket_path), "--out", str(out), "--replace", "-f", "jsonl",
               str(trk), str(esc), str(glag))
    assert r.returncode == 0, r.stderr.decode()
    after = daemon.status()
    # one batch request per page, one image per line (44 + 2 + 5)
    assert after["counters"]["requests"] - before["counters"]["requests"] == 3
    assert after["counters"]["images"] - before["counters"]["images"] == 51
    for xml, xsd in ((trk, "pagecontent-2013-07-15.xsd"), (esc, "alto-4-4.xsd"), (glag, "pagecontent-2019-07-15.xsd")):
        written = out / xml.name  # the same file name
        assert written.is_file(), sorted(p.name for p in out.iterdir())
        data = written.read_bytes()
        assert_valid(data, xsd)
        assert after["manifest_digest"] in data.decode()  # the processing step names the model
        assert xml.read_bytes() != data  # the input is untouched, the output differs from it
    # each line got the daemon's answer for its own image (the mapping line -> text is right)
    job = prepare(trk.read_bytes(), name=trk.name, xml_path=trk, replace=True)
    texts = page_texts((out / trk.name).read_bytes())
    for ln, png in list(zip(job.todo, job.crops))[:4]:
        alone = daemon.post("/v1/transcribe", content=png, headers={"Content-Type": "application/octet-stream"})
        assert alone.status_code == 200, alone.text
        assert texts[ln.id] == _NOT_XML.sub("", alone.json()["results"][0]["text"])  # the noise has controls
    assert len({texts[ln.id] for ln in job.todo[:4]}) > 1  # the texts differ: the check above can tell them apart
    assert page_texts((out / glag.name).read_bytes())["l2"] != "ⰀⰁⰂ ⰃⰄ"  # --replace: the existing text replaced


def test_existing_texts_kept_resume_and_in_place(daemon, tmp_path):
    xml, _, _ = make_page(tmp_path / "in", "folio 2v", n_lines=4, texts={0: "ⰀⰁⰂ", 3: "Ⰳ Ⰴ"})
    out = tmp_path / "out"
    r = htrctl("transcribe", "-s", str(daemon.socket_path), "--out", str(out), str(xml))
    assert r.returncode == 0, r.stderr.decode()
    texts = page_texts((out / xml.name).read_bytes())
    assert texts["l0"] == "ⰀⰁⰂ" and texts["l3"] == "Ⰳ Ⰴ"  # kept (no --replace)
    assert texts["l1"] is not None and texts["l2"] is not None
    before = daemon.status()["counters"]["requests"]
    r = htrctl("transcribe", "-s", str(daemon.socket_path), "--out", str(out), "--resume", str(xml))
    assert r.returncode == 0, r.stderr.decode()
    assert daemon.status()["counters"]["requests"] == before  # nothing sent: the output is complete
    # --in-place: the input itself gets the texts, no other file appears
    original = xml.read_bytes()
    r = htrctl("transcribe", "-s", str(daemon.socket_path), "--in-place", str(xml))
    assert r.returncode == 0, r.stderr.decode()
    assert xml.read_bytes() != original and page_texts(xml.read_bytes())["l1"] is not None
    assert sorted(p.name for p in xml.parent.iterdir()) == ["folio 2v.png", "folio 2v.xml"]


def test_transkribus_folder_layout_with_include(daemon, tmp_path):
    doc = tmp_path / "export" / "Codex 1"
    xml, _, _ = make_page(doc, "0001", n_lines=2)
    (doc / "page").mkdir()
    xml = xml.rename(doc / "page" / xml.name)  # the XML in page/, the image beside page/
    out = tmp_path / "out"
    r = htrctl("transcribe", "-s", str(daemon.socket_path), "--include", "*.xml", "--out", str(out), str(doc / "page"))
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(p.name for p in out.iterdir()) == ["0001.xml"]
    assert all(page_texts((out / "0001.xml").read_bytes()).values())


def test_missing_image_fails_that_file_only(daemon, tmp_path):
    good, _, _ = make_page(tmp_path / "in", "good", n_lines=2)
    bad, img, _ = make_page(tmp_path / "in", "bad", n_lines=2)
    img.unlink()
    out = tmp_path / "out"
    r = htrctl("transcribe", "-s", str(daemon.socket_path), "--out", str(out), str(good), str(bad))
    assert r.returncode == 4, r.stderr.decode()
    err = r.stderr.decode()
    assert "bad.xml: its page image 'bad.png' not found (looked in" in err and "--images" in err
    assert (out / "good.xml").is_file() and not (out / "bad.xml").exists()


def test_plain_image_to_page_and_alto(daemon, tmp_path):
    img = SAMPLES / "line-01.png"
    for fmt, xsd in (("page", "pagecontent-2019-07-15.xsd"), ("alto", "alto-4-4.xsd")):
        out = tmp_path / fmt
        r = htrctl("transcribe", "-s", str(daemon.socket_path), "--out", str(out), "-f", fmt, str(img))
        assert r.returncode == 0, r.stderr.decode()
        data = (out / "line-01.png.xml").read_bytes()
        assert_valid(data, xsd)
        assert next(iter(page_texts(data).values()))


def test_xml_records_on_stdout_without_out(daemon, tmp_path):
    xml, _, _ = make_page(tmp_path, "p", n_lines=3)
    r = htrctl("transcribe", "-s", str(daemon.socket_path), "-f", "jsonl", str(xml))
    assert r.returncode == 0, r.stderr.decode()
    recs = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert [rec["page"] for rec in recs] == [0, 1, 2]  # one record per line, in reading order
    assert all(rec["input"] == str(xml) for rec in recs)
