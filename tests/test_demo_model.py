"""The demo model: deterministic, laid out like the incident, loads offline, generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from htrctl.demo_model import HUB_BASE_ID, build_demo_model, tree_digest


def test_layout_is_the_incidents(demo_model_dir):
    names = {p.name for p in demo_model_dir.iterdir()}
    for required in ("config.json", "generation_config.json", "model.safetensors.index.json",
                     "tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert required in names, required
    assert any(n.startswith("model-0000") and n.endswith(".safetensors") for n in names)
    acfg = json.loads((demo_model_dir / "final_model" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == HUB_BASE_ID  # the trap provision must catch
    assert (demo_model_dir / "final_model" / "adapter_model.safetensors").is_file()
    assert not list(demo_model_dir.rglob("*.bin")) and not list(demo_model_dir.rglob("*.pt"))


def test_tokenizer_covers_glagolitic(demo_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir, local_files_only=True)
    text = "ⰀⰁⰂ verbum"
    assert tok.decode(tok.encode(text)) == text
    for special in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert len(tok.encode(special)) == 1


@pytest.mark.slow
def test_build_twice_is_byte_identical(tmp_path, demo_model_dir):
    # In a fresh interpreter with another hash seed: set ordering must not leak into files.
    env = dict(os.environ, PYTHONHASHSEED="12345")
    code = (
        "import sys; from pathlib import Path; from htrctl.demo_model import build_demo_model, tree_digest;"
        "print(tree_digest(build_demo_model(Path(sys.argv[1]), force=True)))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == tree_digest(demo_model_dir)


def test_reuses_a_complete_build(demo_model_dir):
    before = (demo_model_dir / "config.json").stat().st_mtime_ns
    assert build_demo_model(demo_model_dir) == demo_model_dir
    assert (demo_model_dir / "config.json").stat().st_mtime_ns == before


def test_loads_offline_with_peft_and_generates(demo_model_dir, monkeypatch):
    """The way the daemon loads: local paths, offline, safetensors, PEFT adapter from final_model/."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    base = Qwen3VLForConditionalGeneration.from_pretrained(
        demo_model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32
    )
    base_logits_model = base
    model = PeftModel.from_pretrained(base_logits_model, demo_model_dir / "final_model", local_files_only=True)
    model.eval()
    proc = AutoProcessor.from_pretrained(demo_model_dir, local_files_only=True)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Transcribe."}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    img = Image.new("RGB", (320, 48), "white")
    inputs = proc(text=[prompt], images=[img], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert 1 <= new.numel() <= 6
    # The adapter changes the output: compare logits with the adapter disabled.
    with torch.no_grad():
        with_adapter = model(**inputs).logits
        with model.disable_adapter():
            without = model(**inputs).logits
    assert not torch.allclose(with_adapter, without)
    # Greedy decoding is reproducible.
    with torch.no_grad():
        again = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, again)
