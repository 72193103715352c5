"""Every notebook in colabs/ executes top to bottom (so none can rot).

Each notebook runs in a fresh CPU kernel whose cwd is the repo root, as a
user who opened it from a checkout; its own last cell asserts its results
(e.g. eval perplexity fell), so an exception in any cell fails the test.
Notebooks that default to full-size runs read JFT_COLAB_SMALL=1 (set here)
and shrink every run to a few steps; the stage cache ($JFT_CACHE) points
at an empty directory that must stay empty, so no notebook falls back on
training a full-size `run:` stage under test. Each takes under ~2 minutes
on an idle 2-core machine.
"""

import glob
import math
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


def test_there_are_notebooks():
  assert NOTEBOOKS, "colabs/ holds no notebooks"


def _kernel_env(tmp_dir, cache_dir) -> dict[str, str]:
  """CPU only, one device (conftest's fake 8 would only slow it down);
  temp files (a notebook's workdir) under pytest's tmp_path; small
  settings; a stage cache of the test's own."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TMPDIR=str(tmp_dir),
    JFT_COLAB_SMALL="1",
    JFT_CACHE=str(cache_dir),
  )
  flags = env.get("XLA_FLAGS", "").split()
  flags = [f for f in flags if "force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


@pytest.mark.parametrize(
  "path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS]
)
def test_notebook_executes(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  cache = tmp_path / "jft-cache"
  cache.mkdir()
  client = nbclient.NotebookClient(
    nb,
    timeout=600,  # per cell (a loaded 2-core machine is several times slower)
    kernel_name="python3",
    resources={"metadata": {"path": ROOT}},
  )
  # Raises CellExecutionError if any cell fails.
  client.execute(env=_kernel_env(tmp_path, cache))
  assert not os.listdir(cache), "a notebook trained a full-size stage"
  outputs = [
    o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  ]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs)
  name = os.path.basename(path)
  if name != "quickstart.ipynb":  # tables and plots were displayed
    data = [o.get("data", {}) for o in outputs]
    assert any("image/png" in d for d in data), name
    assert any("text/markdown" in d for d in data), name
  if name == "quickstart.ipynb":
    m = re.search(r"eval perplexity: (\S+) at step 0 -> (\S+) at step", text)
    assert m, text[-2000:]
    before, after = float(m.group(1)), float(m.group(2))
    assert math.isfinite(before) and math.isfinite(after)
    assert 0 < after < before
