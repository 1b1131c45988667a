"""Adapters as training really produces them, made by PEFT on the demo model: provision, verify and htrd's one
loader (htrd.model.load_model) agree on every shape, and an adapter trained with added tokens (resized
embeddings, ``modules_to_save``, its own tokenizer) is served as it was trained -- the same tokens from the
training-time model, from the fast path (merged) and from the plain path (PeftModel), CPU, fp32.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from htrctl.errors import HtrError, IncompatibleAdapterError  # noqa: E402
from htrctl.provision import provision  # noqa: E402
from htrctl.verify import verify_model_dir  # noqa: E402

PROMPT = "Transcribe the handwritten text in this image exactly. Output only the text."
NEW = 12
EMBED = "base_model.model.model.language_model.embed_tokens.weight"
HEAD = "base_model.model.lm_head.weight"
Q0_B = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"
# ligatures a Glagolitic fine-tuning run might add as tokens (unique: i % 48 and i // 48 identify i)
GLAGOLITIC = [chr(0x2C00 + i % 48) + chr(0x2C30 + (i * 5) % 48) + chr(0x2C00 + i // 48) for i in range(96)]


def make_adapter(base_dir: Path, out: Path, *, lora: dict, add: int = 0, resize: bool = True,
                 save: str | None = None, seed: int = 7):
    """Fine-tune-shaped adapter: optional added tokens + resize_token_embeddings(len(tokenizer)) (the usual
    advice), a LoRA config, every trainable tensor moved off its initial value, saved by PEFT; *save*:
    "processor" / "tokenizer" / None -- what the training script saved next to the adapter.
    Returns the training-time (PeftModel, processor)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(base_dir, local_files_only=True)
    model = Qwen3VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True,
                                                            use_safetensors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT/transformers advice about resizing and saving embeddings
        if add:
            assert processor.tokenizer.add_tokens(GLAGOLITIC[:add]) == add
            if resize:
                model.resize_token_embeddings(len(processor.tokenizer))
        torch.manual_seed(seed)
        pm = get_peft_model(model, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(pm.named_parameters()):
                if p.requires_grad:  # LoRA A/B, DoRA magnitudes, modules_to_save copies, trainable tokens
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        pm.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    if save == "processor":
        processor.save_pretrained(out)
    elif save == "tokenizer":
        processor.tokenizer.save_pretrained(out)
    return pm.eval(), processor


def rewrite(adapter: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    p = adapter / "adapter_model.safetensors"
    tensors = load_file(p)
    fn(tensors)
    save_file(tensors, p)


def into_model_dir(demo_model_dir: Path, adapter: Path, dest: Path) -> Path:
    """A model directory made by hand (no provision): the demo base with *adapter* as final_model/."""
    shutil.copytree(demo_model_dir, dest, ignore=shutil.ignore_patterns("final_model"))
    shutil.copytree(adapter, dest / "final_model")
    return dest


def loads(model_dir: Path, *, merge: bool = True) -> tuple[bool, str]:
    from htrd.model import load_model

    try:
        load_model(model_dir, device="cpu", dtype="float32", variant="adapter", merge=merge)
    except HtrError as exc:
        return False, str(exc)
    return True, ""


def _grown_mismatched_head(t):
    t[HEAD] = t[HEAD][:704].contiguous()


def _bad_lora_shape(t):
    t[Q0_B] = torch.zeros(32, t[Q0_B].shape[1])


def _tensor_not_in_base(t):
    t[Q0_B.replace("layers.0", "layers.7")] = t.pop(Q0_B)


def _drop_head(t):
    del t[HEAD]


def _old_transformers_names(t):
    for k in list(t):
        t[k.replace("model.language_model.", "model.")] = t.pop(k)


def _one_module_lost(t):
    del t[Q0_B], t[Q0_B.replace("lora_B", "lora_A")]


MTS = {"modules_to_save": ["embed_tokens", "lm_head"]}
# id: (adapter recipe, mutation of the saved tensors, the finding code verify must give, or None for ok)
CASES = {
    "list-targets": (dict(lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])), None, None),
    "regex-text-vision-merger": (dict(lora=dict(r=4, target_modules=(
        r".*\.(q_proj|o_proj|attn\.qkv|attn\.proj|merger\.linear_fc1|merger\.linear_fc2)"))), None, None),
    "dora-conv-patch-embed": (dict(lora=dict(r=4, target_modules=["patch_embed.proj", "q_proj", "linear_fc2"],
                                             use_dora=True)), None, None),
    "rslora-lora-bias": (dict(lora=dict(r=4, target_modules=["attn.qkv", "linear_fc1"], use_rslora=True,
                                        lora_bias=True)), None, None),
    "lora-bias-on-a-layer-without-bias": (dict(lora=dict(r=4, target_modules=["q_proj"], lora_bias=True)), None,
                                          "adapter_mismatch"),
    "lora-on-embeddings": (dict(lora=dict(r=4, target_modules=["embed_tokens", "q_proj"])), None, None),
    "trainable-tokens": (dict(lora=dict(r=4, target_modules=["q_proj"], trainable_token_indices=[5, 650])),
                         None, None),
    "added-tokens-vocab-shrunk": (dict(add=3, save="processor", lora=dict(r=4, target_modules=["q_proj"], **MTS)),
                                  None, None),
    "added-tokens-vocab-grown": (dict(add=60, save="tokenizer", lora=dict(r=4, target_modules=["q_proj"], **MTS)),
                                 None, None),
    "grown-without-lm-head": (dict(add=60, lora=dict(r=4, target_modules=["q_proj"],
                                                     modules_to_save=["embed_tokens"])), None, "adapter_vocab"),
    "tokenizer-larger-than-embedding": (dict(add=60, resize=False, save="tokenizer",
                                             lora=dict(r=4, target_modules=["q_proj"])), None, "tokenizer_too_large"),
    "vocab-rows-disagree": (dict(add=60, lora=dict(r=4, target_modules=["q_proj"], **MTS)), _grown_mismatched_head,
                            "adapter_vocab"),
    "lora-shape-mismatch": (dict(lora=dict(r=4, target_modules=["q_proj"])), _bad_lora_shape, "adapter_mismatch"),
    "tensor-not-in-base": (dict(lora=dict(r=4, target_modules=["q_proj"])), _tensor_not_in_base, "adapter_mismatch"),
    "old-transformers-module-names": (dict(lora=dict(r=4, target_modules=["q_proj"])), _old_transformers_names,
                                      "adapter_mismatch"),
    "a-targeted-module-without-weights": (dict(lora=dict(r=4, target_modules=["q_proj", "v_proj"])),
                                          _one_module_lost, "adapter_mismatch"),
    "all-linear": (dict(lora=dict(r=2, target_modules="all-linear")), None, None),
    "exclude-modules": (dict(lora=dict(r=2, target_modules=["q_proj", "qkv"], exclude_modules=r".*layers\.1\..*")),
                        None, None),
    "modules-to-save-lost": (dict(add=3, lora=dict(r=4, target_modules=["q_proj"], **MTS)), _drop_head,
                             "adapter_mismatch"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_provision_verify_and_the_loader_agree(case, demo_model_dir, tmp_path):
    recipe, mutate, code = CASES[case]
    src = tmp_path / "adapter"
    make_adapter(demo_model_dir, src, **recipe)
    if mutate is not None:
        rewrite(src, mutate)
    dest = tmp_path / "provisioned"
    try:
        provision(str(src), str(dest), base=str(demo_model_dir), progress=False)
        provisioned = True
    except IncompatibleAdapterError:
        provisioned = False
    model_dir = dest if provisioned else into_model_dir(demo_model_dir, src, tmp_path / "by-hand")
    report = verify_model_dir(model_dir, quick=True)
    ok, why = loads(model_dir)
    assert (provisioned, report.ok, ok) == ((code is None),) * 3, (report.to_dict(), why)
    assert loads(model_dir, merge=False)[0] == ok  # htrd's plain path (PeftModel, unmerged) agrees
    if code is not None:
        assert code in {f.code for f in report.errors}, report.to_dict()
        assert why.startswith("cannot load the LoRA adapter"), why


def test_pickle_adapter_is_refused_with_the_conversion_command(demo_model_dir, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "adapter"
    make_adapter(demo_model_dir, src, lora=dict(r=4, target_modules=["q_proj"]))
    torch.save(load_file(src / "adapter_model.safetensors"), src / "adapter_model.bin")
    (src / "adapter_model.safetensors").unlink()
    with pytest.raises(IncompatibleAdapterError) as exc:
        provision(str(src), str(tmp_path / "dest"), base=str(demo_model_dir), progress=False)
    assert "weights_only=True" in exc.value.remedy and "save_file" in exc.value.remedy
    model_dir = into_model_dir(demo_model_dir, src, tmp_path / "by-hand")
    report = verify_model_dir(model_dir, quick=True)
    finding = next(f for f in report.errors if f.code == "pickle_weights")
    assert finding.path == "final_model/adapter_model.bin" and "safetensors.torch" in finding.remedy
    ok, why = loads(model_dir)  # PEFT itself would unpickle it; htrd never does
    assert not ok and "pickle" in why


def test_shape_mismatch_is_also_what_peft_refuses(demo_model_dir, tmp_path):
    """verify is not stricter than loading here: PEFT itself cannot load the adapter verify rejects."""
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    src = tmp_path / "adapter"
    make_adapter(demo_model_dir, src, lora=dict(r=4, target_modules=["q_proj"]))
    rewrite(src, _bad_lora_shape)
    base = Qwen3VLForConditionalGeneration.from_pretrained(demo_model_dir, dtype=torch.float32, local_files_only=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(base, src, local_files_only=True)


def _grown_adapter(demo_model_dir: Path, src: Path):
    """An adapter trained with 60 added tokens (vocabulary 654 -> 714 rows, the base has 704), embed_tokens and
    lm_head in modules_to_save, the training processor saved with it; one added token is made the model's
    favourite (its lm_head row is a scaled copy of the row the first step picks), so it gets generated."""
    from htrd.model import warmup_image

    pm, processor = make_adapter(demo_model_dir, src, add=60, save="processor",
                                 lora=dict(r=4, target_modules=["q_proj", "v_proj", "qkv"], **MTS))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[warmup_image()], return_tensors="pt")
    with torch.inference_mode():
        first = pm.generate(**enc, max_new_tokens=1, do_sample=False)[0, -1].item()
    new_id = processor.tokenizer.convert_tokens_to_ids(GLAGOLITIC[59])
    head = pm.base_model.model.lm_head.modules_to_save["default"]
    with torch.no_grad():
        head.weight[new_id] = head.weight[first] * 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(src, safe_serialization=True)
    (src / "README.md").unlink(missing_ok=True)
    with torch.inference_mode():
        want = pm.generate(**enc, max_new_tokens=NEW, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    return want, new_id, processor


@pytest.mark.slow
def test_added_tokens_adapter_is_served_as_it_was_trained(demo_model_dir, tmp_path):
    from htrd.fastgen import FastGenerator
    from htrd.model import load_model, warmup_image
    from htrd.plaingen import PlainGenerator
    from safetensors.torch import load_file

    src = tmp_path / "adapter"
    want, new_id, trained_processor = _grown_adapter(demo_model_dir, src)
    assert new_id >= 704 and new_id in want  # the token exists only in the adapter's tokenizer and embedding

    dest = tmp_path / "model"
    provision(str(src), str(dest), base=str(demo_model_dir), progress=False)
    report = verify_model_dir(dest)
    assert report.ok, report.to_dict()
    info = [f for f in report.findings if f.code == "adapter_processor"]
    assert info and info[0].severity == "info" and "tokenizer.json" in info[0].problem
    assert (dest / "final_model" / "tokenizer.json").is_file()

    fast_loaded = load_model(dest, device="cpu", dtype="float32", merge=True)
    assert fast_loaded.processor_from == "adapter" and fast_loaded.vocab_resized == 714
    assert len(fast_loaded.processor.tokenizer) == len(trained_processor.tokenizer) == 714
    saved = load_file(dest / "final_model" / "adapter_model.safetensors")
    assert torch.equal(fast_loaded.model.get_input_embeddings().weight, saved[EMBED])
    assert torch.equal(fast_loaded.model.lm_head.weight, saved[HEAD])
    fast = FastGenerator(fast_loaded.model, fast_loaded.processor, prompt=PROMPT, batch_sizes=[1, 2],
                         max_cache_len=512, max_new_tokens=NEW)
    plain = PlainGenerator.load(dest, device="cpu", dtype="float32", merge=False, prompt=PROMPT, batch_sizes=[1, 2],
                                max_new_tokens=NEW)
    image = warmup_image()
    (f,) = fast.generate([fast.prepare(image)])
    (p,) = plain.generate([plain.prepare(image)])
    assert f.token_ids == p.token_ids == want
    assert GLAGOLITIC[59] in fast.pre.decode(f.token_ids)  # decoded with the adapter's tokenizer

    # provision --merge writes merged/ through the same loader; it serves with the adapter's processor too
    merged_dest = tmp_path / "merged-model"
    provision(str(src), str(merged_dest), base=str(demo_model_dir), merge=True, progress=False)
    assert verify_model_dir(merged_dest).ok
    cfg = json.loads((merged_dest / "merged" / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == 714
    merged = FastGenerator.load(merged_dest, device="cpu", dtype="float32", prompt=PROMPT, batch_sizes=[1],
                                max_cache_len=512, max_new_tokens=NEW)
    assert merged.variant == "merged"
    (m,) = merged.generate([merged.prepare(image)])
    assert m.token_ids == want


def test_adapter_tokenizer_alone_pairs_with_the_base_image_processor(demo_model_dir, tmp_path):
    """A training script that saved only the tokenizer (and its chat template): the image processor comes from
    the base, the tokenizer and the template from the adapter."""
    from htrd.model import load_model

    src = tmp_path / "adapter"
    _, processor = make_adapter(demo_model_dir, src, add=3, save="tokenizer",
                                lora=dict(r=4, target_modules=["q_proj"], **MTS))
    (src / "chat_template.jinja").write_text(processor.chat_template.replace("<|im_start|>assistant",
                                                                             "<|im_start|>assistant ⰀⰁ"))
    model_dir = into_model_dir(demo_model_dir, src, tmp_path / "model")
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    assert loaded.processor_from == "adapter-tokenizer" and loaded.vocab_resized == 657
    assert len(loaded.processor.tokenizer) == 657
    assert "assistant ⰀⰁ" in loaded.processor.chat_template
    assert loaded.processor.image_processor.to_dict() == processor.image_processor.to_dict()


@pytest.mark.slow
def test_htrd_serves_an_added_tokens_adapter_through_both_paths(demo_model_dir, tmp_path):
    """The incident's shape with a training-time tokenizer: provision -> verify ok -> htrd READY (it used to exit
    65 on the state_dict size mismatch) -> the fast and the plain path transcribe the training model's text."""
    import io

    from daemon_harness import start_daemon
    from htrd.model import warmup_image

    from htrctl import protocol as P

    src = tmp_path / "adapter"
    want, new_id, trained = _grown_adapter(demo_model_dir, src)
    eos = set(trained.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    ids = []
    for t in want:
        if t in eos:
            break
        ids.append(t)
    text = trained.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert GLAGOLITIC[59] in text
    dest = tmp_path / "model"
    provision(str(src), str(dest), base=str(demo_model_dir), progress=False)
    assert verify_model_dir(dest).ok
    buf = io.BytesIO()
    warmup_image().save(buf, "PNG")
    got = {}
    for name, static in (("fast", "auto"), ("plain", False)):
        (tmp_path / name).mkdir()
        with start_daemon(tmp_path / name, dest, config={"generation": {"max_new_tokens": NEW,
                                                                         "static_cache": static}}) as d:
            assert d.status()["engine"]["generator"] == name
            r = d.post(P.PATH_TRANSCRIBE, content=buf.getvalue())
            assert r.status_code == 200, r.text
            got[name] = r.json()["results"][0]["text"]
    assert got == {"fast": text, "plain": text}
