"""``slip protect``: artifacts, errors, and what the public half alone is worth."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from slip_vllm.core.manifest import read_public_manifest
from slip_vllm.protect.tiny_models import make_tiny_model


def run_slip(*args):
    return subprocess.run([sys.executable, "-m", "slip_vllm.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_protect_writes_both_halves_and_refuses_to_overwrite(tmp_path):
    model = make_tiny_model("llama", tmp_path / "m", tie=True)
    out = tmp_path / "out"
    r = run_slip("protect", "--model", str(model), "--out", str(out), "--rank", "12")
    assert r.returncode == 0, r.stderr
    assert "protected 15 matrices" in r.stdout  # tied: embedding + 14 projections, no separate LM head
    manifest, digest = read_public_manifest(out / "public")
    assert manifest.tied_embeddings and {t.rank for t in manifest.tensors} == {12}
    bundle = json.loads((out / "secret" / "bundle.json").read_text())
    assert bundle["public_manifest_sha256"] == digest
    config = json.loads((out / "public" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "slip"
    public_files = sorted(p.name for p in (out / "public").iterdir())
    assert "factors.safetensors" not in public_files and "bundle.json" not in public_files
    assert {"config.json", "model.safetensors", "slip_manifest.json", "tokenizer.json"} <= set(public_files)
    assert (out / "secret").stat().st_mode & 0o077 == 0

    again = run_slip("protect", "--model", str(model), "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr
    forced = run_slip("protect", "--model", str(model), "--out", str(out), "--force", "--rank", "8")
    assert forced.returncode == 0, forced.stderr
    assert {t.rank for t in read_public_manifest(out / "public")[0].tensors} == {8}


def test_cli_errors_are_clear(tmp_path):
    r = run_slip("protect", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a Hugging Face model directory" in r.stderr
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    r = run_slip("protect", "--model", str(weird), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "not supported" in r.stderr
    model = make_tiny_model("gpt2", tmp_path / "g")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("rank:\n  default: {fraction: 2.0}\n")
    r = run_slip("protect", "--model", str(model), "--out", str(tmp_path / "o3"), "--config", str(bad_cfg))
    assert r.returncode == 2 and "fraction" in r.stderr
    # protocol shielded serves the Llama family only (llama, mistral, qwen2, qwen3): GPT-2 is refused
    r = run_slip("protect", "--model", str(model), "--out", str(tmp_path / "o4"), "--protocol", "shielded")
    assert r.returncode == 2 and "shielded" in r.stderr and "Llama family" in r.stderr
    assert not (tmp_path / "o4").exists()


def test_yaml_config_ranks_and_overrides(tmp_path):
    from slip_vllm.protect.artifact import ProtectConfig, protect

    model = make_tiny_model("qwen2", tmp_path / "q")
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("protocol: split\nrank:\n  default: {fraction: 0.25}\n  overrides:\n"
                        "    - {match: '*embed_tokens*', absolute: 5}\n    - {match: '*mlp*', energy: 0.5}\n")
    manifest = protect(model, tmp_path / "out", ProtectConfig.from_yaml(cfg_file), progress=False)
    ranks = {t.name: t.rank for t in manifest.tensors}
    assert ranks["model.embed_tokens.weight"] == 5
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 32  # 0.25 * 128
    assert all(1 <= ranks[n] < 128 for n in ranks if ".mlp." in n)


def test_conv1d_orientation_is_respected(model_factory):
    original_dir, protected = model_factory("gpt2", tie=True)
    original = load_file(str(original_dir / "model.safetensors"))
    public = load_file(str(protected / "public" / "model.safetensors"))
    factors = load_file(str(protected / "secret" / "factors.safetensors"))
    manifest, _ = read_public_manifest(protected / "public")
    entry = manifest.by_name()["transformer.h.0.attn.c_attn.weight"]
    assert entry.orientation == "in_out" and entry.shape == (384, 128)
    w = original[entry.name].double().T  # Conv1D stores [in, out]
    d = public[entry.name].double().T
    c = factors[f"t{entry.id}.left"].double() @ factors[f"t{entry.id}.right"].double()
    assert torch.allclose(c + d, w, atol=1e-5)
    assert "lm_head.weight" not in public  # tied to wte


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_public_residual_alone_disagrees_with_the_original(model_factory, family):
    """The public directory used as an ordinary model (plugin and service absent) gives mostly
    different greedy next tokens: teacher-forced argmax over the same text."""
    import transformers

    original_dir, protected = model_factory(family, tie=family == "gpt2")
    stripped = protected.parent / "public-stripped"
    if not stripped.exists():
        import shutil

        shutil.copytree(protected / "public", stripped)
        config = json.loads((stripped / "config.json").read_text())
        config.pop("quantization_config")
        (stripped / "config.json").write_text(json.dumps(config))
    tokenizer = transformers.AutoTokenizer.from_pretrained(original_dir)
    text = ("def add(a, b):\n    return a + b\nThe secure service keeps the secret part of every weight "
            "matrix. Hello world! How are you today? for i in range(10): total += i * i")
    ids = tokenizer(text, return_tensors="pt").input_ids
    predictions = {}
    for label, path in (("original", original_dir), ("public", stripped)):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            predictions[label] = model(ids).logits.argmax(-1)
    agreement = (predictions["original"] == predictions["public"]).float().mean().item()
    assert ids.shape[1] > 40
    assert agreement < 0.5, agreement


def _add_extra_files(model_dir):
    """Non-weight files a real checkpoint carries, and weights that must stay behind."""
    extra = {
        "chat_template.jinja": "{{ messages }}",
        "README.md": "model card",
        "1_Pooling/config.json": json.dumps({"word_embedding_dimension": 128, "pooling_mode_mean_tokens": True}),
        "modules.json": json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                                    {"idx": 1, "name": "1", "path": "1_Pooling",
                                     "type": "sentence_transformers.models.Pooling"}]),
        "notes/extra.txt": "kept with its folder",
    }
    for rel, text in extra.items():
        (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / rel).write_text(text)
    torch.save({"w": torch.ones(2)}, model_dir / "pytorch_model.bin")              # a second copy of weights
    (model_dir / "original").mkdir()
    torch.save({"w": torch.ones(2)}, model_dir / "original" / "consolidated.00.pth")  # Llama-3's original/
    (model_dir / ".git").mkdir()
    (model_dir / ".git" / "HEAD").write_text("ref")
    return extra


@pytest.mark.parametrize("protocol", ["split", "shielded"])
def test_the_public_artifact_carries_every_non_weight_file_and_no_weights(tmp_path, protocol):
    from slip_vllm.core.decompose import RankPolicy
    from slip_vllm.protect.artifact import ProtectConfig, protect

    model = make_tiny_model("llama", tmp_path / "model", hidden=64, layers=1, heads=2, kv_heads=1)
    extra = _add_extra_files(model)
    protect(model, tmp_path / "out", ProtectConfig(protocol=protocol, default_rank=RankPolicy(absolute=4), seed=1),
            progress=False)
    public = tmp_path / "out" / "public"
    for rel, text in extra.items():
        assert (public / rel).read_text() == text, rel
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model / name).exists():
            assert (public / name).read_bytes() == (model / name).read_bytes()
    carried = {p.relative_to(public).as_posix() for p in public.rglob("*") if p.is_file()}
    assert not {"pytorch_model.bin", "original/consolidated.00.pth", ".git/HEAD"} & carried
    weights = {c for c in carried if c.endswith((".safetensors", ".bin", ".pth"))}
    assert weights == {"model.safetensors"}  # the public residual only


def test_weights_of_a_sentence_transformers_module_are_refused(tmp_path):
    from slip_vllm.protect.artifact import ProtectConfig, ProtectError, protect

    model = make_tiny_model("bert", tmp_path / "model", hidden=64, layers=1, heads=2, kv_heads=2)
    (model / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    (model / "2_Dense").mkdir()
    torch.save({"linear.weight": torch.ones(4, 64)}, model / "2_Dense" / "pytorch_model.bin")
    with pytest.raises(ProtectError, match="2_Dense"):
        protect(model, tmp_path / "out", ProtectConfig(seed=1), progress=False)
    assert not (tmp_path / "out" / "public").exists()
