import os
import tempfile

import pytest

# Statistics and other caches of a test run go to a fresh folder, never the user's cache.
os.environ["KEDIT_CACHE"] = tempfile.mkdtemp(prefix="kedit-test-cache-")


@pytest.fixture(scope="session")
def tiny_gpt2():
    """The bundled GPT-2-architecture model, loaded once per test session."""
    import kedit

    return kedit.load("tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    import kedit

    return kedit.load("tiny-llama")
