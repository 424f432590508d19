"""MkDocs hook: publish files that live beside the demo model instead of copying them into docs/.

`demo/eval/` (the shipped model's evaluation report and its plots) becomes `eval/` in the site,
`demo/app_screenshot.png` (taken by the web page's browser test) becomes `assets/app_screenshot.png`,
so the docs always show what `mi-jax eval` and the test last wrote.
"""

from __future__ import annotations

import glob
import os

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = {
    "eval": "demo/eval/*",
    "assets": "demo/app_screenshot.png",
}


def on_files(files, config):
    for folder, pattern in PUBLISHED.items():
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            files.append(File.generated(config, f"{folder}/{os.path.basename(path)}", abs_src_path=path))
    return files
