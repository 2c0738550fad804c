"""The README's Python snippets run as written, in order, as one script in a fresh interpreter (the later ones use
`model` and `cfg`; a fresh process, so that a submodule the test-suite imported elsewhere cannot hide a missing
import)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_snippets_run(smollm2, tmp_path):
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
  assert len(blocks) >= 2
  script = tmp_path / "readme_snippets.py"
  script.write_text("\n".join(blocks) + "\nassert 'params' in dir() and 'frozen' in dir()\n")
  r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                     env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / "my_adapter" / "adapter_config.json").is_file()  # the first snippet's save_adapter
