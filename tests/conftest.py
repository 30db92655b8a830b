"""Session fixtures shared by the pipeline tests: one tiny ERNIE-4.5-VL and one calibration parquet.

The Triton kernels run in Triton's interpreter on this CPU-only suite. The variable is set here,
before any test module is collected: a module that imports transformers' model code can import
Triton, which then keeps the setting it saw (test_sass.py compiles in a subprocess without it).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ccq.tiny import PIPELINE_ERNIE_OPTIONS, build_tiny_ernie_vl  # noqa: E402
from pipeline_helpers import WORDS  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ernie(tmp_path_factory):
    return build_tiny_ernie_vl(tmp_path_factory.mktemp("ernie") / "model", **PIPELINE_ERNIE_OPTIONS)


@pytest.fixture(scope="session")
def calib_parquet(tmp_path_factory):
    """Text rows and image+text rows (PIL images) as a parquet file."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)
    rows = {"text": [], "image": []}
    for i in range(6):
        rows["text"].append(" ".join(rng.choice(WORDS, 40)))
        rows["image"].append(None)
    for i in range(2):
        rows["text"].append("what is the value of the red bar")
        rows["image"].append(Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")))
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"text": datasets.Value("string"), "image": datasets.Image()}))
    path = tmp_path_factory.mktemp("calib") / "calib.parquet"
    ds.to_parquet(str(path))
    return path
