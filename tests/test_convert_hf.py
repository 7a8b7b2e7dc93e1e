"""Hugging Face conversion: the name map, export (checked, atomic), import, bad input, DeepSpeed checkpoints.

The DeepSpeed tests (marked slow) launch tests/ds_scripts/convert_make_ckpt.py once with the real
`deepspeed` launcher on 2 CPU ranks (gloo) and export ZeRO-0/1/2/3 checkpoints in bf16 and fp32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_model

from roberta_ds import cli
from roberta_ds.checkpoint.read_weights import inspect_layout, load_weights, resolve_tag_dir
from roberta_ds.config import PRESETS, model_config, resolve_auto
from roberta_ds.data.shards import tokenizer_fingerprint
from roberta_ds.durable import file_sha256
from roberta_ds.errors import CheckpointError, ConfigError, UserError
from roberta_ds.hf.convert import (
    TOKENIZER_FILES,
    export_hf,
    from_hf,
    hf_config,
    import_hf,
    load_pretrained,
    read_weights,
    resolve_model_config,
    to_hf,
)
from roberta_ds.hf.parity import ParityError, check_hf_dir
from roberta_ds.model.model import RobertaMLM

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_dir(small_tokenizer) -> Path:
    """The suite's tokenizer (conftest: byte-level BPE trained on the built-in corpus)."""
    return Path(small_tokenizer)


@pytest.fixture(scope="module")
def vocab_size(tokenizer_dir) -> int:
    from roberta_ds.data.tokenizer import load_tokenizer_info

    return load_tokenizer_info(tokenizer_dir).vocab_size


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (init leaves biases 0 and LayerNorm 1, which would hide a swapped map)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.lower().endswith("norm.weight") else 0.05 * noise)
    return model.eval()


def our_model(vocab_size: int, seed: int = 0) -> RobertaMLM:
    return randomized(tiny_model(vocab_size, seed=seed), seed)


def hf_model(vocab_size: int, seed: int = 1):
    cfg = transformers.RobertaConfig(**hf_config(model_config("tiny", vocab_size=vocab_size)))
    torch.manual_seed(seed)
    return randomized(transformers.RobertaForMaskedLM(cfg), seed)


def padded_batch(vocab_size: int, T: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab_size, (3, T), generator=g)
    ids[:, 0] = 0
    ids[1, 40:] = 1
    ids[2, 7:] = 1
    ids[1, 39] = ids[2, 6] = ids[0, -1] = 2
    return ids


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=ids.ne(1).long()).logits


# ----------------------------------------------------------------------------------------------
# The name map


def test_name_map_covers_hf_exactly_and_round_trips():
    model = our_model(300)
    hf = hf_model(300)
    ours = model.state_dict()
    converted = to_hf(ours)
    assert set(converted) == set(hf.state_dict())  # tied names included, buffers not
    assert converted["lm_head.decoder.weight"] is converted["roberta.embeddings.word_embeddings.weight"]
    H = model.cfg.hidden_size
    qkv = ours["layers.1.attn.qkv.weight"]
    assert torch.equal(converted["roberta.encoder.layer.1.attention.self.key.weight"], qkv[H:2 * H])
    back = from_hf(converted)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_to_hf_gives_identical_logits():
    model = our_model(300)
    hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**hf_config(model.cfg))).eval()
    hf.load_state_dict(to_hf(model.state_dict()), strict=True)
    ids = padded_batch(300)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), hf_logits(hf, ids), rtol=0, atol=1e-5)


def test_from_hf_gives_identical_logits():
    hf = hf_model(300)
    model = RobertaMLM(model_config("tiny", vocab_size=300)).eval()
    model.load_state_dict(from_hf(hf.state_dict()), strict=True)
    ids = padded_batch(300)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), hf_logits(hf, ids), rtol=0, atol=1e-5)


def test_unknown_and_missing_names_are_named():
    sd = our_model(300).state_dict()
    with pytest.raises(CheckpointError, match=r"unknown parameter\(s\) \['layers.0.attn.rotary'\]"):
        to_hf({**sd, "layers.0.attn.rotary": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"missing parameter\(s\) \['head.bias'\]"):
        to_hf({k: v for k, v in sd.items() if k != "head.bias"})
    hf = hf_model(300).state_dict()
    extra = "roberta.encoder.layer.0.attention.self.distance_embedding.weight"
    with pytest.raises(CheckpointError, match=extra):
        from_hf({**hf, extra: torch.zeros(3)})
    with pytest.raises(CheckpointError, match="lm_head.dense.bias"):
        from_hf({k: v for k, v in hf.items() if k != "lm_head.dense.bias"})


def test_untied_hf_decoder_is_refused():
    hf = dict(hf_model(300).state_dict())
    hf["lm_head.decoder.weight"] = hf["lm_head.decoder.weight"] + 1
    with pytest.raises(CheckpointError, match="lm_head.decoder.weight differs"):
        from_hf(hf)


def test_wrapper_prefixes_are_removed():
    sd = our_model(300).state_dict()
    for prefix in ("_orig_mod.", "module.", "module._orig_mod."):
        wrapped = {prefix + k: v for k, v in sd.items()}
        assert set(to_hf(wrapped)) == set(to_hf(sd))


def test_hf_config_fields():
    base = hf_config(PRESETS["roberta-base"])
    assert base["architectures"] == ["RobertaForMaskedLM"]
    assert base["max_position_embeddings"] == 514
    assert (base["type_vocab_size"], base["layer_norm_eps"]) == (1, 1e-5)
    assert (base["vocab_size"], base["hidden_act"], base["tie_word_embeddings"]) == (50265, "gelu", True)
    large = hf_config(PRESETS["roberta-large"])
    assert (large["num_hidden_layers"], large["hidden_size"], large["num_attention_heads"]) == (24, 1024, 16)


def test_model_config_resolution(tmp_path):
    assert resolve_model_config("tiny", ["vocab_size=1000", "dropout=0"]) == model_config(
        "tiny", vocab_size=1000, dropout=0.0)
    fields = dataclasses.asdict(model_config("tiny", vocab_size=777))
    (tmp_path / "a.json").write_text(json.dumps(fields))
    (tmp_path / "b.json").write_text(json.dumps({"model": fields, "tokenizer_sha256": "x"}))
    assert resolve_model_config(str(tmp_path / "a.json")).vocab_size == 777
    assert resolve_model_config(str(tmp_path / "b.json")).vocab_size == 777
    with pytest.raises(ConfigError, match="vocab_sz"):
        resolve_model_config("tiny", ["vocab_sz=3"])
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_model_config("robertabase")
    with pytest.raises(ConfigError, match="required"):
        resolve_model_config(None)


# ----------------------------------------------------------------------------------------------
# Export from a state dict, import, round trip


@pytest.fixture(scope="module")
def exported(tokenizer_dir, vocab_size, tmp_path_factory) -> tuple[Path, RobertaMLM]:
    root = tmp_path_factory.mktemp("export")
    model = our_model(vocab_size)
    save_file(model.state_dict(), str(root / "weights.safetensors"))
    fields = dataclasses.asdict(model.cfg)
    (root / "cfg.json").write_text(json.dumps(fields))
    rc = cli.main(["export-hf", "--state-dict", str(root / "weights.safetensors"), "--model-config",
                   str(root / "cfg.json"), "--tokenizer", str(tokenizer_dir), "--out", str(root / "hf")])
    assert rc == 0
    return root / "hf", model


def test_export_writes_safetensors_config_and_tokenizer_only(exported, vocab_size):
    out, model = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors",
                                                            *TOKENIZER_FILES])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["RobertaForMaskedLM"] and cfg["vocab_size"] == vocab_size
    assert (cfg["max_position_embeddings"], cfg["type_vocab_size"], cfg["layer_norm_eps"]) == (130, 1, 1e-5)
    assert not list(out.parent.glob(".hf.tmp-*"))


def test_export_loads_with_plain_auto_classes_and_logits_match(exported, vocab_size):
    out, model = exported
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "RobertaForMaskedLM"
    assert hf.lm_head.decoder.weight.data_ptr() == hf.roberta.embeddings.word_embeddings.weight.data_ptr()
    ids = padded_batch(vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, ids), model.logits(ids), rtol=0, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.pad_token_id == 1 and tok.mask_token == "<mask>"


def test_fill_mask_pipeline_runs_on_export(exported):
    out, model = exported
    fill = transformers.pipeline("fill-mask", model=str(out))
    preds = fill(f"The quick brown fox {fill.tokenizer.mask_token} over the lazy dog.", top_k=3)
    assert len(preds) == 3 and all(0 <= p["score"] <= 1 for p in preds)
    ids = fill.tokenizer("The quick brown fox <mask> over the lazy dog.", return_tensors="pt")["input_ids"]
    at = int((ids[0] == fill.tokenizer.mask_token_id).nonzero())
    with torch.no_grad():
        assert preds[0]["token"] == int(model.logits(ids)[0, at].argmax())


def test_import_of_export_round_trips_exactly(exported, tmp_path):
    out, model = exported
    cfg = import_hf(out, tmp_path / "ours")
    # The import leaves the kernel to the run that loads it ("auto"); built into a model, it is this one.
    assert (cfg.attention_kernel, cfg.unpad) == ("auto", "auto") and resolve_auto(cfg, flash=False) == model.cfg
    cfg2, weights = load_pretrained(tmp_path / "ours")
    assert cfg2 == cfg
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["model.safetensors", "model_config.json",
                                                                      "source.json"]
    source = json.loads((tmp_path / "ours" / "source.json").read_text())  # init_from compares tokenizers
    assert source == {"hf_dir": str(out), "tokenizer_sha256": file_sha256(out / "tokenizer.json")}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_import_random_hf_model_logits_match(tmp_path, fmt):
    hf = hf_model(300)
    src = tmp_path / "hf"
    if fmt == "safetensors":
        hf.save_pretrained(str(src))
    else:  # an older-style checkpoint: pickled state dict with the buffers and a pooler
        src.mkdir()
        hf.config.to_json_file(str(src / "config.json"))
        sd = dict(hf.state_dict())
        sd["roberta.embeddings.position_ids"] = torch.arange(130)[None]
        sd["roberta.pooler.dense.weight"] = torch.zeros(64, 64)
        sd["roberta.pooler.dense.bias"] = torch.zeros(64)
        torch.save(sd, src / "pytorch_model.bin")
    notes = []
    import_hf(src, tmp_path / "ours", log=notes.append)
    if fmt == "bin":
        assert any("roberta.pooler.dense.weight" in n for n in notes)  # reported, not silently dropped
    cfg, weights = load_pretrained(tmp_path / "ours")
    model = RobertaMLM(cfg).eval()
    model.load_state_dict(weights, strict=True)
    ids = padded_batch(300)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), hf_logits(hf, ids), rtol=0, atol=1e-4)


def test_import_refuses_another_architecture(tmp_path):
    hf = hf_model(300)
    hf.save_pretrained(str(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["hidden_act"] = "gelu_new"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["import-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]) == 1
    with pytest.raises(ConfigError, match="hidden_act"):
        import_hf(tmp_path / "hf", tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# Bad input


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_that_runs_code_is_refused(tmp_path, tokenizer_dir):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"embeddings.word.weight": _RunsCode(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        read_weights(evil)
    assert cli.main(["export-hf", "--state-dict", str(evil), "--model-config", "tiny",
                     "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o")]) == 1
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(model_config("tiny"))))
    shutil.copy(evil, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused"):
        import_hf(tmp_path / "hf", tmp_path / "o")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_failed_check_leaves_no_output(tmp_path, tokenizer_dir, vocab_size):
    sd = our_model(vocab_size).state_dict()
    sd["layers.1.ffn.fc.weight"][0, 0] = float("nan")
    with pytest.raises(ParityError, match="non-finite"):
        export_hf(tmp_path / "o", tokenizer_dir, state_dict=sd,
                  model_cfg=model_config("tiny", vocab_size=vocab_size))
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging directory


def test_check_catches_a_tampered_export(exported, tmp_path, vocab_size):
    out, model = exported
    copy = tmp_path / "hf"
    shutil.copytree(out, copy)
    weights = load_file(str(copy / "model.safetensors"))
    weights["roberta.encoder.layer.0.output.LayerNorm.bias"] += 0.01
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ParityError, match="logits differ"):
        check_hf_dir(copy, model, vocab_size, 0, 2, 1e-4)


def test_tokenizer_that_does_not_fit_is_refused(tmp_path, tokenizer_dir):
    sd = our_model(300).state_dict()
    small = model_config("tiny", vocab_size=300)
    with pytest.raises(ConfigError, match="vocab_size is 300"):
        export_hf(tmp_path / "o", tokenizer_dir, state_dict=sd, model_cfg=small)



# ----------------------------------------------------------------------------------------------
# --tokenizer: any directory AutoTokenizer loads as a RoBERTa fast tokenizer (hf_tokenizer.py)


@pytest.fixture(scope="module")
def saved_pretrained(tokenizer_dir, tmp_path_factory) -> Path:
    """What transformers' save_pretrained writes for our tokenizer (5.x: tokenizer.json, re-serialized,
    and tokenizer_config.json; no vocab.json or merges.txt)."""
    out = tmp_path_factory.mktemp("saved_pretrained")
    transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


def _export_state_dict(out: Path, tok: Path, vocab_size: int, seed: int = 0) -> RobertaMLM:
    model = randomized(RobertaMLM(model_config("tiny", vocab_size=vocab_size)), seed)
    export_hf(out, tok, state_dict=model.state_dict(), model_cfg=model.cfg, log=lambda m: None)
    return model


def _check_export_tokenizer(out: Path, source: Path) -> None:
    from tokenizers import Tokenizer

    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()  # the fingerprint
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.is_fast and (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.mask_token == "<mask>"
    text = "Return the <mask> of the list."
    assert tok(text)["input_ids"] == Tokenizer.from_file(str(source / "tokenizer.json")).encode(text).ids


def test_export_takes_a_save_pretrained_tokenizer_directory(saved_pretrained, vocab_size, tmp_path):
    assert "tokenizer.json" in os.listdir(saved_pretrained) and "tokenizer_config.json" in os.listdir(saved_pretrained)
    _export_state_dict(tmp_path / "hf", saved_pretrained, vocab_size)
    _check_export_tokenizer(tmp_path / "hf", saved_pretrained)
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config == json.loads((saved_pretrained / "tokenizer_config.json").read_text())  # theirs, as given


def test_export_takes_a_directory_with_tokenizer_json_alone(tokenizer_dir, vocab_size, tmp_path):
    bare = tmp_path / "tok"
    bare.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", bare)
    _export_state_dict(tmp_path / "hf", bare, vocab_size)
    _check_export_tokenizer(tmp_path / "hf", bare)
    assert sorted(os.listdir(tmp_path / "hf")) == sorted(["config.json", "model.safetensors", "tokenizer.json",
                                                          "tokenizer_config.json", "special_tokens_map.json"])


def test_other_tokenizer_directories_are_refused_saying_how_to_adopt(tokenizer_dir, saved_pretrained, vocab_size,
                                                                     tmp_path):
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, slow)
    with pytest.raises(UserError) as e:
        _export_state_dict(tmp_path / "a", slow, vocab_size)
    assert str(e.value).startswith(f"--tokenizer {slow}: no tokenizer.json (it holds ['merges.txt', 'vocab.json'])")
    assert "roberta-ds tokenizer --out tok/ --from PATH/tokenizer.json" in str(e.value)

    # A tokenizer_config.json that makes AutoTokenizer load something else: no pad or mask token.
    generic = tmp_path / "generic"
    shutil.copytree(saved_pretrained, generic)
    config = json.loads((generic / "tokenizer_config.json").read_text())
    for key in ("tokenizer_class", "pad_token", "mask_token"):
        config.pop(key, None)
    (generic / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        _export_state_dict(tmp_path / "b", generic, vocab_size)
    message = str(e.value)
    assert message.startswith(f"--tokenizer {generic}: AutoTokenizer loads it as ")
    assert "pad_token_id is None, but <pad> is id 1 in tokenizer.json" in message
    mask_id = vocab_size - 1                                    # <mask> last, as in roberta-base
    assert f"mask_token_id is None, but <mask> is id {mask_id} in tokenizer.json" in message
    adopt = f"`roberta-ds tokenizer --out tok/ --from {generic / 'tokenizer.json'}`"
    assert adopt in message
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    # The way out it names: adopted, the same tokenizer.json (fingerprint) exports.
    assert cli.main(["tokenizer", "--out", str(tmp_path / "tok"), "--from", str(generic / "tokenizer.json")]) == 0
    assert tokenizer_fingerprint(tmp_path / "tok") == tokenizer_fingerprint(generic)
    _export_state_dict(tmp_path / "c", tmp_path / "tok", vocab_size)
    _check_export_tokenizer(tmp_path / "c", generic)


def test_weights_of_another_shape_are_named(tmp_path, tokenizer_dir, vocab_size):
    sd = our_model(vocab_size).state_dict()
    with pytest.raises(CheckpointError, match=r"another model shape.*hidden_size=64.*num_layers=2"):
        export_hf(tmp_path / "o", tokenizer_dir, state_dict=sd,
                  model_cfg=model_config("tiny", vocab_size=vocab_size, hidden_size=128))


def test_non_empty_out_is_refused(tmp_path, tokenizer_dir, vocab_size):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_hf(tmp_path / "o", tokenizer_dir, state_dict=our_model(vocab_size).state_dict(),
                  model_cfg=model_config("tiny", vocab_size=vocab_size))
    assert (tmp_path / "o" / "keep.txt").read_text() == "x"


def test_checkpoint_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_tag_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        resolve_tag_dir(tmp_path / "empty")
    ck = tmp_path / "ck"
    (ck / "step5").mkdir(parents=True)
    (ck / "step5" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no `latest` file.*tags found: \['step5'\]"):
        resolve_tag_dir(ck)
    (ck / "latest").write_text("step9")
    with pytest.raises(CheckpointError, match="names tag 'step9'.*does not exist"):
        resolve_tag_dir(ck)
    with pytest.raises(CheckpointError, match="--tag 'step7'"):
        resolve_tag_dir(ck, "step7")
    (ck / "step9").mkdir()
    with pytest.raises(CheckpointError, match="no DeepSpeed model-states file"):
        resolve_tag_dir(ck)
    assert resolve_tag_dir(ck, "step5") == ck / "step5" == resolve_tag_dir(ck / "step5")
    with pytest.raises(CheckpointError, match="cannot read"):
        inspect_layout(ck / "step5")  # an empty (truncated) model-states file


# ----------------------------------------------------------------------------------------------
# Real 2-rank DeepSpeed checkpoints

DS_CASES = ["zero0_fp32", "zero1_bf16_fp32acc", "zero2_bf16", "zero2_fp16", "zero3_fp32", "zero3_bf16_bare"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ds_checkpoints(tmp_path_factory, tokenizer_dir, vocab_size) -> Path:
    out = tmp_path_factory.mktemp("ds")
    bin_dir = Path(sys.executable).parent
    launcher = bin_dir / "deepspeed" if (bin_dir / "deepspeed").exists() else shutil.which("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "ds_scripts" / "convert_make_ckpt.py"), "--out", str(out),
           "--vocab-size", str(vocab_size), "--tokenizer-sha256", tokenizer_fingerprint(tokenizer_dir),
           "--cases", *DS_CASES]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", DS_CASES)
def test_consolidated_weights_equal_live_fp32_master(ds_checkpoints, case):
    tag_dir = resolve_tag_dir(ds_checkpoints / case)
    layout = inspect_layout(tag_dir)
    assert layout.world_size == 2 and layout.zero_stage == int(case[4])
    reference = load_file(str(ds_checkpoints / case / "reference.safetensors"))
    weights = load_weights(tag_dir, layout)
    assert set(weights) == set(reference)
    for name, t in reference.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], t), name


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero2_bf16", "zero3_fp32"])
def test_export_from_deepspeed_checkpoint(ds_checkpoints, tokenizer_dir, vocab_size, tmp_path, case):
    out = tmp_path / "hf"
    assert cli.main(["export-hf", "--checkpoint", str(ds_checkpoints / case),
                     "--tokenizer", str(tokenizer_dir), "--out", str(out)]) == 0
    cfg = model_config("tiny", vocab_size=vocab_size, dropout=0.0, attention_dropout=0.0)
    model = RobertaMLM(cfg).eval()
    model.load_state_dict(load_file(str(ds_checkpoints / case / "reference.safetensors")))
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    ids = padded_batch(vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, ids), model.logits(ids), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_bare_checkpoint_needs_model_config(ds_checkpoints, tokenizer_dir, vocab_size, tmp_path):
    bare = ds_checkpoints / "zero3_bf16_bare"
    with pytest.raises(ConfigError, match="--model-config"):
        export_hf(tmp_path / "a", tokenizer_dir, checkpoint=bare)
    with pytest.raises(CheckpointError, match="another model shape"):
        export_hf(tmp_path / "b", tokenizer_dir, checkpoint=bare, model_cfg="tiny",
                  overrides=[f"vocab_size={vocab_size}", "num_layers=3"])
    result = export_hf(tmp_path / "c", tokenizer_dir, checkpoint=bare / "step2", model_cfg="tiny",
                       overrides=[f"vocab_size={vocab_size}"])
    assert result.max_abs_diff <= 1e-4 and (tmp_path / "c" / "model.safetensors").is_file()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_checkpoint_of_another_tokenizer_is_refused(ds_checkpoints, tokenizer_dir, tmp_path):
    other = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, other)
    (other / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text() + "\n")
    with pytest.raises(CheckpointError, match="sha256"):
        export_hf(tmp_path / "o", other, checkpoint=ds_checkpoints / "zero2_bf16", tag="step2")


@pytest.mark.slow
@pytest.mark.parametrize("case, victim", [
    ("zero2_bf16", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    ("zero3_fp32", "zero_pp_rank_1_mp_rank_00_model_states.pt"),
    ("zero3_fp32", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
])
def test_missing_rank_file_is_named(ds_checkpoints, tmp_path, case, victim):
    ck = tmp_path / case
    shutil.copytree(ds_checkpoints / case, ck)
    (ck / "step2" / victim).unlink()
    with pytest.raises(CheckpointError, match=r"rank\(s\) \[[01]\] of 2"):
        load_weights(resolve_tag_dir(ck))


@pytest.mark.slow
def test_corrupt_checkpoint_file_is_refused(ds_checkpoints, tokenizer_dir, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(ds_checkpoints / "zero2_bf16", ck)
    victim = ck / "step2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern changed
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        export_hf(tmp_path / "o", tokenizer_dir, checkpoint=ck)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_code_running_pickle_in_checkpoint_is_refused(ds_checkpoints, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(ds_checkpoints / "zero3_bf16_bare", ck)
    marker = tmp_path / "ran"
    torch.save({"module": _RunsCode(marker)}, ck / "step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_weights(resolve_tag_dir(ck))
    assert not marker.exists()


@pytest.mark.slow
def test_checkpoint_export_fingerprints_tokenizer_json_of_any_layout(ds_checkpoints, tokenizer_dir,
                                                                      saved_pretrained, tmp_path):
    """The checkpoint records tokenizer.json's sha256; any directory holding those bytes exports it."""
    bare = tmp_path / "tok"
    bare.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", bare)
    export_hf(tmp_path / "a", bare, checkpoint=ds_checkpoints / "zero2_bf16", log=lambda m: None)
    _check_export_tokenizer(tmp_path / "a", bare)
    # save_pretrained re-serialized tokenizer.json: another fingerprint than the checkpoint's.
    with pytest.raises(CheckpointError, match=r"tokenizer\.json sha256 \w+\.\.\. is not the tokenizer this "
                                              r"checkpoint was trained with"):
        export_hf(tmp_path / "b", saved_pretrained, checkpoint=ds_checkpoints / "zero2_bf16", log=lambda m: None)
    # A checkpoint trained with the save_pretrained directory (its manifest records that fingerprint;
    # the manifest is not among the files it checksums) exports with it.
    ck = tmp_path / "ck"
    shutil.copytree(ds_checkpoints / "zero2_bf16", ck)
    meta_path = resolve_tag_dir(ck) / "roberta_ds.json"
    meta = json.loads(meta_path.read_text())
    assert "roberta_ds.json" not in meta["files"]
    meta["tokenizer_sha256"] = tokenizer_fingerprint(saved_pretrained)
    meta_path.write_text(json.dumps(meta))
    export_hf(tmp_path / "c", saved_pretrained, checkpoint=ck, log=lambda m: None)
    _check_export_tokenizer(tmp_path / "c", saved_pretrained)
