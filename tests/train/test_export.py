"""Exported model directories load in AutoModel, transformers and the inference engine, and
give the trained module's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader
from train_helpers import TINY_MODEL, CycleBatches, make_trainer

from astrai.core.auto import AutoModel
from astrai.core.tokenizer import AutoTokenizer
from astrai.train.export import ModelExport, export_model
from astrai.train.pretrain_module import PretrainModule
from astrai.train.sft_module import SFTModule


def _tensor_names(path: Path) -> dict[str, torch.dtype]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).dtype for k in f.keys()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """A PretrainModule fitted on the cycle task and exported on fit end (default location)."""
    root = tmp_path_factory.mktemp("export_run")
    torch.manual_seed(0)
    module = PretrainModule(model=TINY_MODEL, tokenizer=tokenizer_dir, optimizer={"lr": 1e-2})
    trainer = make_trainer(root, max_steps=25, logger=L.pytorch.loggers.CSVLogger(root, name="logs"))
    trainer.fit(module, DataLoader(CycleBatches(16, 16), batch_size=4, shuffle=True))
    return module.eval(), root / "export"


def test_fit_end_export_loads_in_automodel_with_equal_logits(trained):
    module, path = trained
    assert {p.name for p in path.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    loaded = AutoModel.from_pretrained(path)
    ids = torch.tensor([CycleBatches(1, 12).rows[0]["input_ids"].tolist()])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), module.model(ids), rtol=1e-5, atol=1e-5)
    assert loaded.config.vocab_size == AutoTokenizer.from_pretrained(path).vocab_size


def test_export_loads_in_transformers_with_equal_logits(trained):
    transformers = pytest.importorskip("transformers")
    module, path = trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, module.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, module.model(ids), rtol=1e-4, atol=1e-4)


def test_export_serves_in_the_engine_and_continues_the_learned_cycle(trained):
    engine_mod = pytest.importorskip("astrai.core.engine", reason="the inference engine is not in this tree")
    module, path = trained
    model = AutoModel.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    row = CycleBatches(1, 24).rows[0]
    prompt, target = row["input_ids"][:8].tolist(), row["input_ids"][8:16].tolist()
    engine = engine_mod.InferenceEngine(model, tok, max_batch_size=2, num_pages=16, page_size=8)
    params = engine_mod.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    (completion,) = engine.generate([prompt], params)
    assert list(completion.samples[0].token_ids) == target


def test_lora_export_is_merged(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    module = SFTModule(
        model=TINY_MODEL,
        tokenizer=tokenizer_dir,
        lora={"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
        optimizer={"lr": 1e-2},
        export={"dir": str(tmp_path / "out")},
    )
    make_trainer(tmp_path, max_steps=5).fit(module, DataLoader(CycleBatches(8, 16), batch_size=4))
    names = _tensor_names(tmp_path / "out")
    assert not any("lora" in n for n in names)
    loaded = AutoModel.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 320, (1, 9))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), module.model(ids), rtol=1e-5, atol=1e-5)


def test_export_dtype_and_no_export(tmp_path, tokenizer_dir):
    module = PretrainModule(
        model=TINY_MODEL, tokenizer=tokenizer_dir, export={"dtype": "bfloat16", "dir": str(tmp_path / "bf16")}
    )
    path = export_model(module, tmp_path / "bf16")
    assert set(_tensor_names(path).values()) == {torch.bfloat16}
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    quiet = PretrainModule(
        model=TINY_MODEL, tokenizer=tokenizer_dir, export={"on_fit_end": False, "dir": str(tmp_path / "none")}
    )
    make_trainer(tmp_path, max_steps=1).fit(quiet, DataLoader(CycleBatches(4, 8), batch_size=4))
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="model.export.dtype"):
        export_model(module, tmp_path / "x", dtype="int8")


def test_export_callback_writes_every_n_steps_and_keeps_the_last(tmp_path, tokenizer_dir):
    module = PretrainModule(model=TINY_MODEL, tokenizer=tokenizer_dir, export={"on_fit_end": False})
    callback = ModelExport(every_n_train_steps=2, dirpath=str(tmp_path / "exports"), keep_last=2)
    trainer = make_trainer(tmp_path, max_steps=7, callbacks=[callback], accumulate_grad_batches=2)
    trainer.fit(module, DataLoader(CycleBatches(16, 8), batch_size=2))
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["step-000004", "step-000006"]
    last = AutoModel.from_pretrained(tmp_path / "exports" / "step-000006")
    assert last.config.vocab_size == 320


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDP needs CUDA")
@pytest.mark.parametrize("lora", [None, {"rank": 4, "alpha": 8, "targets": ["all-linear"]}], ids=["full", "lora"])
def test_fsdp_fit_exports_the_gathered_model(tmp_path, tokenizer_dir, lora):
    """Under FSDP the weights are sharded: the export gathers them (and merges LoRA) on rank 0."""
    torch.manual_seed(0)
    module = SFTModule(
        model=TINY_MODEL,
        tokenizer=tokenizer_dir,
        lora=lora,
        optimizer={"lr": 1e-2},
        export={"dir": str(tmp_path / "out")},
    )
    trainer = make_trainer(tmp_path, max_steps=4, accelerator="gpu", strategy="fsdp", precision="bf16-mixed")
    trainer.fit(module, DataLoader(CycleBatches(8, 16), batch_size=4))
    assert not any("lora" in name for name in _tensor_names(tmp_path / "out"))
    torch.manual_seed(0)
    initial = SFTModule(model=TINY_MODEL, tokenizer=tokenizer_dir).model.eval()
    exported = AutoModel.from_pretrained(tmp_path / "out")
    batch = next(iter(DataLoader(CycleBatches(8, 16), batch_size=8)))

    def loss(model):
        with torch.no_grad():
            logits = model(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()

    assert loss(exported) < loss(initial) - 0.05  # the trained weights, not the initial ones
