"""param_dtype bfloat16 resumes exactly: the float32 masters go into the checkpoint and come
back float32 (torch's Optimizer.load_state_dict would cast them to bf16). Kept apart from
test_master_adamw.py because the resume helpers need the CLI's dependencies."""

from __future__ import annotations

import torch
from test_resume import _fit, _optimizer_state


def test_bf16_params_resume_exactly(tmp_path, tokenizer_dir):
    """The masters go into the checkpoint and come back float32: a resumed run ends where an
    uninterrupted one does."""
    full, full_trainer = _fit(tmp_path / "full", tokenizer_dir, param_dtype="bfloat16")
    _fit(tmp_path / "split", tokenizer_dir, crash_at=7, param_dtype="bfloat16")
    resumed, resumed_trainer = _fit(tmp_path / "split", tokenizer_dir, resume=True, param_dtype="bfloat16")
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert q.dtype == torch.bfloat16
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    full_state, resumed_state = _optimizer_state(full_trainer), _optimizer_state(resumed_trainer)
    for index, state in full_state.items():
        assert state["master"].dtype == resumed_state[index]["master"].dtype == torch.float32
        for key, value in state.items():
            torch.testing.assert_close(resumed_state[index][key], value, rtol=0, atol=0)
