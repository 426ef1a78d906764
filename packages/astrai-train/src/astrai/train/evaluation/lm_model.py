"""lm-eval's ``astrai`` model: an AstrAI model directory scored and sampled in this process.

lm-eval asks a model for three things, and each has one path here:

- ``loglikelihood`` (multiple choice, MMLU-style tasks): lm-eval tokenizes each (context,
  continuation) pair; the pairs are sorted longest first, right-padded into batches of
  ``batch_size`` and run through the model's forward, whose head is applied only at the
  positions that predict a continuation token (``logits_index``), so a large vocabulary costs
  no (batch, seq, vocab) tensor. Right padding needs no mask: causal attention never looks ahead.
- ``loglikelihood_rolling`` (perplexity): the text is cut into lm-eval's disjoint windows of
  ``max_length`` tokens and each window is scored as above; the sums are per document.
- ``generate_until`` (exact match, code): every request goes to one InferenceEngine at once
  (continuous batching, stop strings, greedy or seeded sampling); the engine lives for that
  call only, so its KV cache does not hold memory that the scoring forward needs.

    from lm_eval import simple_evaluate
    import astrai.train.evaluation.lm_model  # registers "astrai"
    simple_evaluate(model="astrai", model_args="pretrained=runs/sft/export", tasks=[...])
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from astrai.core.auto import AutoModel
from astrai.core.engine import InferenceEngine, SamplingParams
from astrai.core.errors import require
from astrai.core.tokenizer import AutoTokenizer

from ..inference_dtype import resolve_dtype

log = logging.getLogger(__name__)

# generation_kwargs that map onto SamplingParams fields of the same name.
SAMPLING_KEYS = ("top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def positive_int(value, field: str) -> int:
    ok = str(value).isdigit() and int(value) > 0
    require(ok, field, f"must be a positive integer, got {value!r}")
    return int(value)


@register_model("astrai")
class AstraiLM(TemplateLM):
    """An AstrAI model directory as an lm-eval model (``--model astrai`` once this module is imported).

    pretrained: the model directory (ours, Hugging Face or upstream AstrAI; the tokenizer beside it).
    batch_size: sequences per scoring forward. max_length: longest sequence scored or prompted
    (default: the model's max_len). max_num_seqs: the engine's max_batch_size when generating.
    max_gen_toks: generation length when a task does not give one. seed: base of the per-request
    sampling seeds (request i uses seed + i), so sampled tasks repeat exactly.
    """

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = 16,
        max_length: int | str | None = None,
        max_num_seqs: int | str = 64,
        max_gen_toks: int | str = 256,
        add_bos_token: bool = False,
        seed: int | str = 1234,
        **unused,
    ) -> None:
        super().__init__()
        if unused:
            log.warning("astrai model: ignoring arguments %s", sorted(unused))
        self.batch_size = positive_int(batch_size or 16, "--batch-size")
        self.max_num_seqs = positive_int(max_num_seqs, "--max-num-seqs")
        self.max_gen_toks = positive_int(max_gen_toks, "max_gen_toks")
        self.add_bos_token = str(add_bos_token).lower() in ("1", "true", "yes")
        self.seed = int(seed)
        self._device = torch.device(device or default_device())
        dtype = resolve_dtype(dtype, self._device, "--dtype")
        self.pretrained = str(pretrained)
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self.model = AutoModel.from_pretrained(pretrained, dtype=dtype, device=self._device)
        model_max = self.model.config.max_len
        self.max_length = positive_int(max_length or model_max, "--max-length")
        require(
            self.max_length <= model_max, "--max-length", f"is {self.max_length}, above the model's max_len {model_max}"
        )
        self._warned_long_generation = False

    def settings(self) -> dict:
        """What this model was built with, for the results file."""
        return {
            "pretrained": self.pretrained,
            "device": str(self._device),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "max_num_seqs": self.max_num_seqs,
            "seed": self.seed,
        }

    # -- what lm-eval reads off a model ---------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS if the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return Path(self.pretrained).name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_special_tokens=bool(special))

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    # -- log-likelihoods ---------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation token), whether every one is the argmax) per
        (cache key, context ids, continuation ids) request, in request order."""
        for _, _, continuation in requests:
            require(
                len(continuation) <= self.max_length,
                "--max-length",
                f"is {self.max_length} tokens, shorter than a continuation to score ({len(continuation)}); raise it",
            )
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, desc="astrai log-likelihoods", disable=disable_tqdm):
            batch = order[start : start + self.batch_size]
            scores = self._score_batch([(requests[i][1], requests[i][2]) for i in batch])
            for i, score in zip(batch, scores):
                results[i] = score
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return results

    @torch.no_grad()
    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One forward over right-padded rows; the head runs only where a continuation token is predicted."""
        rows = [(context + continuation)[-(self.max_length + 1) :][:-1] for context, continuation in pairs]
        width = max(map(len, rows))
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions, targets = [], []
        for r, (row, (_, continuation)) in enumerate(zip(rows, pairs)):
            input_ids[r, : len(row)] = torch.tensor(row)
            first = len(row) - len(continuation)
            positions += [r * width + p for p in range(first, len(row))]
            targets += continuation
        index = torch.tensor(positions, dtype=torch.long, device=self._device)
        logits = self.model(input_ids.to(self._device), logits_index=index).float()
        target = torch.tensor(targets, dtype=torch.long, device=self._device)
        token_logps = logits.log_softmax(-1).gather(1, target[:, None])[:, 0].double().cpu()
        is_argmax = (logits.argmax(-1) == target).cpu()
        scores, offset = [], 0
        for _, continuation in pairs:
            end = offset + len(continuation)
            scores.append((float(token_logps[offset:end].sum()), bool(is_argmax[offset:end].all())))
            offset = end
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) per document, summed over lm-eval's disjoint windows of max_length tokens
        (the first conditioned on prefix_token_id, the others on the token before them)."""
        windows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(
                make_disjoint_window, get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)
            ):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------
    def sampling_params(self, gen_kwargs: dict, index: int) -> SamplingParams:
        """lm-eval's generation_kwargs as the engine's SamplingParams (greedy unless do_sample)."""
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_tokens = int(kwargs.pop("max_gen_toks"))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0)) if sample else 0.0
        kwargs.pop("temperature", None)
        extra = {key: kwargs.pop(key) for key in SAMPLING_KEYS if key in kwargs}
        if kwargs:
            log.warning("astrai model: ignoring generation_kwargs %s", sorted(kwargs))
        seed = self.seed + index if temperature > 0 else None
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=until, seed=seed, **extra)

    def prompt_room(self, max_tokens: int) -> int:
        """Most prompt tokens kept (the last ones): what max_tokens leaves of max_length, but at
        least half of it; the engine then ends a generation that reaches max_length."""
        if max_tokens > self.max_length // 2 and not self._warned_long_generation:
            self._warned_long_generation = True
            log.warning(
                "astrai model: max_gen_toks %d leaves little of --max-length %d for the prompt; prompts keep "
                "their last %d tokens and generations stop at the length limit",
                max_tokens,
                self.max_length,
                self.max_length - self.max_length // 2,
            )
        return self.max_length - min(max_tokens, self.max_length // 2)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Every request through one engine, all queued at once; text up to the first stop string."""
        prompts, params = [], []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            p = self.sampling_params(gen_kwargs, i)
            ids = self.tok_encode(context)[-self.prompt_room(p.max_tokens) :] or [self.prefix_token_id]
            prompts.append(ids)
            params.append(p)
        if not prompts:
            return []
        engine = InferenceEngine(
            self.model, self.tokenizer, max_batch_size=self.max_num_seqs, max_model_len=self.max_length
        )
        try:
            completions = engine.generate(prompts, params, use_tqdm=not disable_tqdm)
        finally:
            engine.shutdown()
            del engine
            gc.collect()  # the engine's KV cache goes now, before the next scoring forward
            if self._device.type == "cuda":
                torch.cuda.empty_cache()
        texts = []
        for req, p, completion in zip(requests, params, completions):
            text = completion.text
            for stop in p.stop_strings:
                text = text.split(stop)[0] if stop else text
            texts.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts
