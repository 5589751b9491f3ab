"""Shared pytest setup.

In CI (`CI` set) a skipped test is a failure: parity tests must run there.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every test: {report.longrepr}"


# --- Gemma-4-style test tokenizer (tests/tokenizer_fixture.py) ---
@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A directory holding tokenizer.json, tokenizer_config.json and chat_template.jinja (vocab 384)."""
    from tokenizer_fixture import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=384)
