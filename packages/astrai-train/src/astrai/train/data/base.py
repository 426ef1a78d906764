"""What the pre-training, SFT and DPO data modules share: loading files, checking and
tokenising every row once with a cached ``datasets.map``, splitting off validation rows,
and building resumable dataloaders.

A subclass names its columns, converts one row to token ids (raising ``RecordError`` on a
malformed row) and turns the tokenised rows into a torch dataset. The map is keyed by our
own fingerprint (input data, tokenizer files, options, code version), so a second run with
the same inputs reads the cache instead of tokenising again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pyarrow.compute as pc
from datasets import Dataset, Features, Value, concatenate_datasets
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from astrai.core.tokenizer import AutoTokenizer

from .loader import ResumableDataLoader, ResumableSampler
from .records import DataError, RecordError, row_error
from .sources import Part, Spec, load_parts, split_off

log = logging.getLogger(__name__)

# Bump when a converter's output changes, so old caches are not reused.
CACHE_VERSION = "2"
ERROR = "_error"  # per-row error message ("" when the row is fine)
TRUNCATED = "_truncated"  # optional per-row flag: the row was cut to the length limit


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> AutoTokenizer:
    """One tokenizer per process and directory (``datasets.map`` workers load their own)."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"data.tokenizer: {e}") from None


def tokenizer_fingerprint(path: str) -> str:
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        file = Path(path) / name
        digest.update(name.encode() + (file.read_bytes() if file.is_file() else b"-"))
    return digest.hexdigest()


def per_row(convert: Callable, rows: list[dict], tok: AutoTokenizer, **options: Any) -> list[dict | RecordError]:
    """Apply a one-row converter to each row, keeping a ``RecordError`` in place of a bad row."""
    out: list[dict | RecordError] = []
    for row in rows:
        try:
            out.append(convert(row, tok, **options))
        except RecordError as e:
            out.append(e)
    return out


def _convert_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    convert: Callable,
    empty: dict[str, Any],
    tokenizer: str,
    options: dict[str, Any],
    origin: str,
    skip: bool,
) -> dict[str, list]:
    """``datasets.map`` body: convert a batch of rows; a bad row raises, or leaves an empty row
    that carries its error message (skip mode) so it can be counted and filtered out later."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out: dict[str, list] = {key: [] for key in [*empty, ERROR]}
    for index, result in zip(indices, convert(rows, load_tokenizer(tokenizer), **options)):
        error = ""
        if isinstance(result, RecordError):
            if not skip:
                raise row_error(origin, index + 1, result)
            result, error = empty, f"row {index + 1}: {result}"
        for key in empty:
            out[key].append(result[key])
        out[ERROR].append(error)
    return out


class Rows(TorchDataset):
    """Tokenised rows of a ``datasets.Dataset`` as a torch map-style dataset, one sample a row."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict:
        return self.ds[index]


def _is_good(errors: list[str]) -> list[bool]:
    return [not e for e in errors]


class BaseDataModule(L.LightningDataModule):
    """Shared options of the data modules (see the subclasses for the format of the rows).

    Args:
        tokenizer: tokenizer directory (``tokenizer.json`` + config + chat template).
        train: training rows: a file (.jsonl/.json/.parquet/.arrow), a glob, a directory, a
            ``save_to_disk`` directory, a dataset name ``org/name[:split]``, or a list of them.
        val: validation rows, in the same forms; else ``val_fraction`` of ``train`` is held out.
        val_fraction: share of training rows held out (seeded) when ``val`` is not given; 0 = none.
        test: rows for ``astrai-train test``; defaults to the validation rows.
        batch_size: rows per training batch (per device).
        val_batch_size: rows per validation batch; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        num_proc: processes for tokenising with ``datasets.map`` (None = in this process).
        cache_dir: ``datasets`` cache directory (default: the ``datasets`` default, ``HF_DATASETS_CACHE``).
        skip_bad_rows: skip malformed rows and report how many, instead of stopping at the first.
        seed: seed of the shuffle and of the validation split.
        load_kwargs: extra arguments for ``datasets.load_dataset`` when a dataset name is given.
        rename: column renames applied before anything else, e.g. ``{conversations: messages}``.
    """

    columns_hint = ""  # what a row must contain, for error messages

    def __init__(
        self,
        tokenizer: str,
        train: Spec,
        val: Spec | None = None,
        val_fraction: float = 0.0,
        test: Spec | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        cache_dir: str | None = None,
        skip_bad_rows: bool = False,
        seed: int = 0,
        load_kwargs: dict[str, Any] | None = None,
        rename: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"data.batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise DataError(f"data.num_workers must be 0 (load in the training process) or more, got {num_workers!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
        self.tokenizer_path = str(tokenizer)
        self.train_spec, self.val_spec, self.test_spec = train, val, test
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.cache_dir = cache_dir
        self.skip_bad_rows = skip_bad_rows
        self.seed = seed
        self.load_kwargs = load_kwargs or {}
        self.rename = rename or {}
        self.skipped: dict[str, int] = {}  # split -> rows skipped (skip_bad_rows)
        self.truncated: dict[str, int] = {}  # split -> rows cut to the length limit
        self.train_dataset = self.val_dataset = self.test_dataset = None
        self._built = False

    # ---- what a subclass provides ---------------------------------------------------

    def check_columns(self, columns: list[str], origin: str) -> None:
        """Raise ``DataError`` when a required column is missing."""

    def converter(self, columns: list[str]) -> tuple[Callable, dict[str, Any], Features]:
        """(converter, keyword options, output features) for rows with these columns. The
        converter is a module-level function ``(rows, tokenizer, **options)`` returning one
        dict or ``RecordError`` per row (see ``per_row``)."""
        raise NotImplementedError

    def to_torch(self, ds: Dataset, split: str):
        """A torch dataset of the tokenised rows."""
        raise NotImplementedError

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        """A picklable batch builder (DataLoader workers may be separate processes)."""
        raise NotImplementedError

    # ---- tokenisation ---------------------------------------------------------------

    @property
    def tokenizer(self) -> AutoTokenizer:
        return load_tokenizer(self.tokenizer_path)

    def _require(self, columns: list[str], needed: list[str], origin: str) -> None:
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(
                f"{origin}: no column {', '.join(map(repr, missing))} (columns: {', '.join(columns) or 'none'}); "
                f"{self.columns_hint} — rename columns with data.rename, e.g. {{old_name: {missing[0]}}}"
            )

    def _tokenize_part(self, part: Part, split: str) -> Dataset:
        ds = part.dataset
        if self.rename:
            present = {k: v for k, v in self.rename.items() if k in ds.column_names}
            ds = ds.rename_columns(present) if present else ds
        self.check_columns(ds.column_names, part.origin)
        convert, options, features = self.converter(ds.column_names)
        key = json.dumps(
            [
                CACHE_VERSION,
                type(self).__name__,
                ds._fingerprint,
                tokenizer_fingerprint(self.tokenizer_path),
                convert.__qualname__,
                options,
                self.skip_bad_rows,
            ],
            sort_keys=True,
            default=str,
        )
        fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
        ds = ds.map(
            _convert_batch,
            batched=True,
            with_indices=True,
            remove_columns=ds.column_names,
            features=Features({**features, ERROR: Value("string")}),
            num_proc=self.num_proc,
            new_fingerprint=fingerprint,
            desc=f"tokenising {Path(part.origin).name}",
            fn_kwargs=dict(
                convert=convert,
                empty={k: _empty(v) for k, v in features.items()},
                tokenizer=self.tokenizer_path,
                options=options,
                origin=part.origin,
                skip=self.skip_bad_rows,
            ),
        )
        column = ds.with_format("arrow")[ERROR]  # counted in Arrow: no Python string per row
        errors = pc.filter(column, pc.not_equal(column, "")).to_pylist()
        skipped = part.skipped + errors
        if errors:
            ds = ds.filter(_is_good, input_columns=ERROR, batched=True, new_fingerprint=fingerprint + "-good")
        if skipped:
            self.skipped[split] = self.skipped.get(split, 0) + len(skipped)
            log.warning("%s: skipped %d bad rows (first: %s)", part.origin, len(skipped), skipped[0])
        if len(ds) == 0:
            raise DataError(f"{part.origin}: no usable rows" + (f" (first problem: {skipped[0]})" if skipped else ""))
        if TRUNCATED in ds.column_names:
            if n := pc.sum(ds.with_format("arrow")[TRUNCATED]).as_py():
                self.truncated[split] = self.truncated.get(split, 0) + n
                log.warning("%s: %d rows were longer than data.max_len and were truncated", part.origin, n)
            ds = ds.remove_columns(TRUNCATED)
        return ds.remove_columns(ERROR)

    def _tokenized(self, spec: Spec, split: str) -> Dataset:
        parts = load_parts(
            spec,
            f"data.{split}",
            cache_dir=self.cache_dir,
            load_kwargs=self.load_kwargs,
            skip_bad_rows=self.skip_bad_rows,
        )
        done = [self._tokenize_part(part, split) for part in parts]
        return done[0] if len(done) == 1 else concatenate_datasets(done)

    def build(self) -> None:
        """Load, check and tokenise every split (cached); safe to call more than once."""
        if self._built:
            return
        self.skipped, self.truncated = {}, {}
        train = self._tokenized(self.train_spec, "train")
        val = None
        if self.val_spec is not None:
            val = self._tokenized(self.val_spec, "val")
        elif self.val_fraction:
            train, val = split_off(train, self.val_fraction, self.seed)
        test = self._tokenized(self.test_spec, "test") if self.test_spec is not None else val
        self.train_dataset = self.to_torch(train, "train")
        self.val_dataset = self.to_torch(val, "val") if val is not None else None
        self.test_dataset = self.val_dataset if test is val else self.to_torch(test, "test")
        self._built = True

    # ---- Lightning hooks ------------------------------------------------------------

    def prepare_data(self) -> None:
        # Runs once per node before the other processes start: fill the cache here.
        self.build()

    def setup(self, stage: str | None = None) -> None:
        self.build()

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(self.train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, dataset, split: str) -> DataLoader:
        if dataset is None:
            raise DataError(f"no {split} data: set data.val (files) or data.val_fraction (a share of data.train)")
        return DataLoader(
            dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            collate_fn=self.collate_fn(),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        # No validation data is allowed for fit (Lightning then skips validation).
        return self._eval_loader(self.val_dataset, "validation") if self.val_dataset is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset, "test")


def _empty(feature: Any) -> Any:
    """The value a skipped row gets in a column of this feature type."""
    return None if isinstance(feature, Value) else []
