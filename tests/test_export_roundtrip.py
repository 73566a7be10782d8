"""save_pretrained -> Auto*.from_pretrained gives the same model, with and without ``import elm``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from elm import ArchConfig, LayerConfig, config_from_arch
from elm.modeling import (
    ElmConfig,
    ElmForCausalLM,
    ElmForMaskedLM,
    ElmForSequenceClassification,
    ElmModel,
    arch_from_config,
)

VOCAB = 40
NUM_LABELS = 3


def mixed_arch(causal: bool) -> ArchConfig:
    return ArchConfig(
        hidden_size=24,
        embedding_size=12,
        vocab_size=VOCAB,
        max_positions=16,
        type_vocab_size=0 if causal else 2,
        causal=causal,
        layers=[
            LayerConfig("bert", num_heads=2, head_dim=6, ffn_dim=20, share="qv"),
            LayerConfig(
                "mobilebert", num_heads=2, head_dim=4, ffn_dim=10, num_ffn=2, bottleneck_size=16, share="kv"
            ),
            LayerConfig("bert", num_heads=3, head_dim=4, ffn_dim=8, share="none"),
            LayerConfig("llama", num_heads=4, head_dim=4, ffn_dim=12, share="gqa2"),  # pre-RMSNorm, rotary, GQA
        ],
    ).validate()


def build(cls, arch: ArchConfig, **config_kw):
    torch.manual_seed(0)
    model = cls(config_from_arch(arch, **config_kw))
    with torch.no_grad():  # every tensor (LayerNorms, biases, lm_head.bias) off its init value
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture(scope="module")
def mlm_export(tmp_path_factory):
    arch = mixed_arch(causal=False)
    model = build(ElmForMaskedLM, arch)
    path = tmp_path_factory.mktemp("mlm")
    model.save_pretrained(path)
    return arch, model, path


@pytest.fixture(scope="module")
def causal_export(tmp_path_factory):
    arch = mixed_arch(causal=True)
    model = build(ElmForCausalLM, arch)
    path = tmp_path_factory.mktemp("clm")
    model.save_pretrained(path)
    return arch, model, path


@pytest.fixture(scope="module")
def cls_export(tmp_path_factory):
    arch = mixed_arch(causal=False)
    model = build(ElmForSequenceClassification, arch, num_labels=NUM_LABELS)
    path = tmp_path_factory.mktemp("cls")
    model.save_pretrained(path)
    return arch, model, path


def test_export_folder_is_self_contained(mlm_export, causal_export):
    for arch, _, path in (mlm_export, causal_export):
        files = set(os.listdir(path))
        shipped = {"configuration_elm.py", "modeling_elm.py", "modeling_elm_layouts.py", "modeling_elm_llama.py"}
        assert {"config.json", "model.safetensors"} | shipped <= files
        auto_map = json.loads((path / "config.json").read_text())["auto_map"]
        expected = {
            "AutoConfig": "configuration_elm.ElmConfig",
            "AutoModel": "modeling_elm.ElmModel",
            "AutoModelForMaskedLM": "modeling_elm.ElmForMaskedLM",
            "AutoModelForSequenceClassification": "modeling_elm.ElmForSequenceClassification",
        }
        if arch.causal:
            expected["AutoModelForCausalLM"] = "modeling_elm.ElmForCausalLM"
        assert auto_map == expected
        # the shipped code imports only its siblings (relatively), never the elm package outside a
        # ``try`` (transformers skips those when it checks what remote code needs)
        for name in shipped:
            for node in required_imports(ast.parse((path / name).read_text())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    assert node.level == 1 and f"{node.module}.py" in shipped, name
                else:
                    modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                    assert not any(m == "elm" or m.startswith("elm.") for m in modules), name


def required_imports(node: ast.AST):
    """The import statements of ``node`` outside ``try`` blocks."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    elif not isinstance(node, ast.Try):
        for child in ast.iter_child_nodes(node):
            yield from required_imports(child)


def test_an_export_without_own_layouts_ships_none(tmp_path):
    arch = ArchConfig.from_dict({**mixed_arch(causal=False).to_dict(), "layers": [vars(mixed_arch(False).layers[0])]})
    build(ElmForMaskedLM, arch).save_pretrained(tmp_path)
    assert not list(tmp_path.glob("modeling_elm_llama.py"))
    remote = get_class_from_dynamic_module("modeling_elm.ElmForMaskedLM", tmp_path)  # the export's own code
    assert remote.from_pretrained(tmp_path).config.block_layouts == {}


def test_save_pretrained_with_push_uploads_the_layouts(tmp_path, monkeypatch, mlm_export):
    """transformers uploads inside its own ``save_pretrained``: the folder it uploads already holds
    the export's layouts (the generated ``modeling_elm_layouts.py`` and ``modeling_elm_llama.py``).
    The Hub calls are stand-ins; the save and the upload hook are transformers' own."""
    import types

    import transformers.modeling_utils as modeling_utils
    from transformers.utils.hub import PushToHubMixin

    uploaded = []
    repo = types.SimpleNamespace(create_repo=lambda repo_id, **kw: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(modeling_utils, "hf_api", lambda: repo)
    monkeypatch.setattr(modeling_utils, "create_and_tag_model_card", lambda *a, **k: types.SimpleNamespace(save=print))
    monkeypatch.setattr(PushToHubMixin, "_upload_modified_files", lambda self, folder, repo_id, *a, **k: uploaded.append(
        (repo_id, sorted(os.listdir(folder)), (Path(folder) / "modeling_elm_layouts.py").read_text())))  # fmt: skip
    mlm_export[1].save_pretrained(tmp_path, push_to_hub=True, repo_id="me/tiny", commit_message="hi")
    [(repo_id, files, layouts)] = uploaded
    assert repo_id == "me/tiny" and {"model.safetensors", "modeling_elm_llama.py"} <= set(files)
    assert "written by elm's export" in layouts and "from .modeling_elm_llama import" in layouts


def test_a_config_written_by_hand_exports_its_families_layouts(tmp_path):
    """A config without ``block_layouts`` builds llama layers from the registry; its export ships
    them too and names their family, so the export's own code builds the same model."""
    arch = mixed_arch(causal=False)
    model = build(ElmForMaskedLM, arch)
    hand = ElmForMaskedLM(ElmConfig.from_arch_dict(arch.to_dict()))
    hand.load_state_dict(model.state_dict())
    assert hand.config.block_layouts == {}
    hand.eval().save_pretrained(tmp_path)
    remote = get_class_from_dynamic_module("modeling_elm.ElmForMaskedLM", tmp_path)
    assert torch.equal(remote.from_pretrained(tmp_path).eval()(**inputs()).logits, model(**inputs()).logits)


def test_auto_config_round_trip(mlm_export):
    arch, model, path = mlm_export
    config = AutoConfig.from_pretrained(path)
    assert type(config) is ElmConfig
    assert arch_from_config(config) == arch
    assert config.to_diff_dict() == model.config.to_diff_dict()


def test_auto_model_and_masked_lm_round_trip(mlm_export):
    arch, model, path = mlm_export
    batch = inputs()
    base = AutoModel.from_pretrained(path).eval()
    assert type(base) is ElmModel
    assert_same_weights(base, model.elm)
    assert torch.equal(base(**batch).last_hidden_state, model.elm(**batch).last_hidden_state)

    mlm = AutoModelForMaskedLM.from_pretrained(path).eval()
    assert type(mlm) is ElmForMaskedLM
    assert_same_weights(mlm, model)
    assert torch.equal(mlm(**batch).logits, model(**batch).logits)
    assert mlm.elm.embeddings.word.weight.data_ptr() != model.elm.embeddings.word.weight.data_ptr()


def test_classifier_from_masked_lm_checkpoint(mlm_export):
    _, model, path = mlm_export
    cls = AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS).eval()
    assert type(cls) is ElmForSequenceClassification and cls.config.num_labels == NUM_LABELS
    assert_same_weights(cls.elm, model.elm)
    assert cls(**inputs()).logits.shape == (2, NUM_LABELS)


def test_sequence_classification_round_trip(cls_export):
    _, model, path = cls_export
    loaded = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert type(loaded) is ElmForSequenceClassification and loaded.config.num_labels == NUM_LABELS
    assert_same_weights(loaded, model)
    assert torch.equal(loaded(**inputs()).logits, model(**inputs()).logits)


def test_causal_lm_round_trip(causal_export):
    _, model, path = causal_export
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(loaded) is ElmForCausalLM
    assert_same_weights(loaded, model)
    batch = inputs()
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    prompt = batch["input_ids"][:1]
    kw = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(loaded.generate(prompt, **kw), model.generate(prompt, **kw))


def test_non_causal_export_has_no_causal_lm_entry(mlm_export):
    _, _, path = mlm_export
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(path)


# ---- loading without the elm package (trust_remote_code) ----------------------------------
REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["elm"] = None  # any `import elm` now fails: the export must not need it
    import torch
    torch.set_num_threads(1)
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
                              AutoModelForSequenceClassification)

    ref = torch.load("reference.pt")
    report = {}

    def check(name, auto, path, expected):
        model = auto.from_pretrained(path, trust_remote_code=True).eval()
        out = model(**ref["inputs"])
        got = out.logits if hasattr(out, "logits") else out.last_hidden_state
        report[name] = {"module": type(model).__module__, "cls": type(model).__name__,
                        "equal": bool(torch.equal(got, ref[expected]))}
        return model

    config = AutoConfig.from_pretrained("mlm", trust_remote_code=True)
    report["config"] = {"module": type(config).__module__, "layers": config.layers}
    check("model", AutoModel, "mlm", "model")
    mlm = check("mlm", AutoModelForMaskedLM, "mlm", "mlm")
    check("cls", AutoModelForSequenceClassification, "cls", "cls")
    clm = check("clm", AutoModelForCausalLM, "clm", "clm")
    gen = clm.generate(ref["inputs"]["input_ids"][:1], max_new_tokens=4, do_sample=False)
    report["generate_equal"] = bool(torch.equal(gen, ref["generate"]))
    # a model loaded as remote code exports again, with its code and full auto_map
    mlm.save_pretrained("again")
    check("again", AutoModel, "again", "model")
    report["elm_imported"] = any(k == "elm" or k.startswith("elm.") for k, v in sys.modules.items() if v)
    print("REPORT" + json.dumps(report))
    """
)


def test_trust_remote_code_without_elm(tmp_path, mlm_export, causal_export, cls_export):
    batch = inputs()
    reference = {
        "inputs": batch,
        "model": mlm_export[1].elm(**batch).last_hidden_state,
        "mlm": mlm_export[1](**batch).logits,
        "cls": cls_export[1](**batch).logits,
        "clm": causal_export[1](**batch).logits,
        "generate": causal_export[1].generate(batch["input_ids"][:1], max_new_tokens=4, do_sample=False),
    }
    torch.save(reference, tmp_path / "reference.pt")
    for name, (_, _, path) in {"mlm": mlm_export, "clm": causal_export, "cls": cls_export}.items():
        os.symlink(path, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT"))
    report = json.loads(line[len("REPORT") :])

    assert report["elm_imported"] is False
    assert report["config"]["module"].startswith("transformers_modules.")
    assert report["config"]["layers"] == [vars(layer) for layer in mlm_export[0].layers]
    expected_cls = {"model": "ElmModel", "mlm": "ElmForMaskedLM", "cls": "ElmForSequenceClassification",
                    "clm": "ElmForCausalLM", "again": "ElmModel"}  # fmt: skip
    for name, cls_name in expected_cls.items():
        entry = report[name]
        assert entry["cls"] == cls_name
        assert entry["module"].startswith("transformers_modules.") and entry["module"].endswith(
            ".modeling_elm"
        )
        assert entry["equal"], f"{name}: outputs differ after remote-code load"
    assert report["generate_equal"]
