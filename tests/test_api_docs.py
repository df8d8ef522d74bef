"""The README's API reference is the app's: regenerated from the built app (no model weights)
and compared with README.md. When it fails: `python -m scripts.api_docs`, then commit README.md."""
import subprocess
import sys

from tests.app_server import REPO


def test_readme_api_reference_matches_the_app():
    out = subprocess.run([sys.executable, "-m", "scripts.api_docs", "--check"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stderr or out.stdout)[-3000:]
