"""One base for user-facing errors (AstraiError), one require() check, one byte-size parser.

The command-line tools catch AstraiError to print a message instead of a traceback, so every
error a person fixes by changing a setting, a file or a request must derive from it; and a size
that astrai-serve accepts must mean the same bytes to the engine (and so to GRPO's engine
settings) and to save_pretrained.
"""

from __future__ import annotations

import pytest
import torch

from astrai.core import AstraiError, parse_bytes, require
from astrai.core.checkpoint import CheckpointError
from astrai.core.checkpoint import parse_size as shard_size
from astrai.core.config import ConfigError
from astrai.core.engine import EngineError
from astrai.core.engine import parse_bytes as engine_parse_bytes
from astrai.core.engine.page_allocator import OutOfPages
from astrai.core.engine.paged_cache import pool_pages
from astrai.core.errors import require_for
from astrai.core.hf_config import HFConfigError
from astrai.core.integrity import IntegrityError
from astrai.serve.config import ServeConfigError
from astrai.serve.config import parse_size as serve_parse_size
from astrai.train.base_module import BatchError
from astrai.train.cli import USER_ERRORS, UsageError
from astrai.train.data.records import DataError, RecordError
from astrai.train.rewards import RewardError

USER_FACING = [
    IntegrityError,
    ConfigError,
    CheckpointError,
    HFConfigError,
    ServeConfigError,
    UsageError,
    BatchError,
    DataError,
    RecordError,
    RewardError,
]

SIZES = {
    "2G": 2 * 10**9,
    "2GB": 2 * 10**9,
    "2GiB": 2 * 2**30,
    "512MB": 512 * 10**6,
    "512MiB": 512 * 2**20,
    "1.5GiB": 3 * 2**29,
    "4096": 4096,
}
NOT_SIZES = ["two gigs", "-1G", ""]


@pytest.mark.parametrize("error", USER_FACING, ids=lambda e: e.__name__)
def test_every_user_facing_error_is_an_astrai_error_and_still_a_value_error(error):
    assert issubclass(error, AstraiError) and issubclass(error, ValueError)


def test_failures_of_the_program_itself_are_not_astrai_errors():
    assert not issubclass(EngineError, AstraiError) and not issubclass(OutOfPages, AstraiError)


def test_astrai_train_reports_every_astrai_error_as_one_line():
    assert AstraiError in USER_ERRORS


def test_require_passes_when_the_check_holds():
    require(True, "top_p", "must be in (0, 1]")


def test_require_raises_the_given_class_with_a_message_naming_the_field():
    with pytest.raises(ConfigError, match=r"^ModelConfig\.dim must be a positive integer, got 0$"):
        require(False, "ModelConfig.dim", "must be a positive integer, got 0", ConfigError)
    with pytest.raises(AstraiError, match=r"^request_id must be a non-empty string$"):
        require("", "request_id", "must be a non-empty string")


def test_require_for_names_the_field_as_owner_dot_field():
    check = require_for("SamplingParams")
    with pytest.raises(AstraiError, match=r"^SamplingParams\.top_p must be in \(0, 1\], got 2$"):
        check(False, "top_p", "must be in (0, 1], got 2")


@pytest.mark.parametrize(("text", "expected"), SIZES.items())
def test_a_size_means_the_same_bytes_to_the_engine_astrai_serve_and_save_pretrained(text, expected):
    assert parse_bytes(text) == engine_parse_bytes(text) == serve_parse_size(text) == shard_size(text) == expected


def test_sizes_take_any_case_spaces_and_integers():
    assert parse_bytes(" 2 gb ") == parse_bytes("2g") == 2 * 10**9 and parse_bytes("2Gi") == 2 * 2**30
    assert parse_bytes(4096) == 4096 and parse_bytes(".5k") == 500 and parse_bytes("1.1MB") == 1_100_000


@pytest.mark.parametrize("bad", NOT_SIZES + [True, "2 parsecs", "1.2.3MB", "GB", "2iB"])
def test_a_non_size_raises_an_error_naming_the_field(bad):
    with pytest.raises(AstraiError, match=r"^kv_cache_memory .* is not a size; use a number of bytes"):
        parse_bytes(bad, "kv_cache_memory")
    with pytest.raises(ServeConfigError, match=r"^kv_cache_memory: .* is not a size"):
        serve_parse_size(bad, "kv_cache_memory")
    with pytest.raises(CheckpointError, match=r"^max_shard_size "):
        shard_size(bad)


@pytest.mark.parametrize("bad", [0, "0", "0.1B", -3])
def test_a_size_of_no_bytes_is_refused_as_not_positive(bad):
    with pytest.raises(ServeConfigError, match=r"^max_request_bytes: must be positive, got "):
        serve_parse_size(bad, "max_request_bytes")


@pytest.mark.parametrize("text", SIZES)
def test_the_engine_budgets_its_kv_pages_from_any_size_astrai_serve_accepts(text):
    """GRPO's `engine: {kv_cache_memory: ...}` reaches the engine's pool_pages as written."""
    assert pool_pages(None, text, per_page=1024, wanted=1, device=torch.device("cpu")) == SIZES[text] // 1024


@pytest.mark.parametrize("bad", NOT_SIZES)
def test_the_engine_refuses_a_non_size_naming_kv_cache_memory(bad):
    with pytest.raises(AstraiError, match=r"^kv_cache_memory "):
        pool_pages(None, bad, per_page=1024, wanted=1, device=torch.device("cpu"))


@pytest.mark.parametrize(
    "make_error",
    [
        pytest.param(lambda: pool_pages(4, "1MiB", 1024, 8, torch.device("cpu")), id="pool pages and a byte budget"),
        pytest.param(lambda: pool_pages(None, 100, 1024, 8, torch.device("cpu")), id="a budget below one page"),
        pytest.param(
            lambda: __import__("astrai.core.engine.kv_dtype", fromlist=["pool_dtype"]).pool_dtype(
                "int4", torch.float32, torch.device("cpu")
            ),
            id="an unknown KV cache dtype",
        ),
    ],
)
def test_engine_settings_checked_outside_engine_config_raise_astrai_errors(make_error):
    with pytest.raises(AstraiError):
        make_error()


def test_a_malformed_tokenizer_directory_and_a_bad_chat_message_raise_astrai_errors(tmp_path):
    from astrai.core.chat_template import normalize_messages
    from astrai.core.tokenizer import AutoTokenizer

    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(AstraiError):
        AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(AstraiError, match=r"messages\[0\]\['content'\] must be a string"):
        normalize_messages([{"role": "user", "content": 3}])
