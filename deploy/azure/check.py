"""Parses every Bicep template here with pycep-parser (PyPI), so a syntax error fails CI.

No Bicep compiler is reachable offline, so this checks the grammar and structure, not the
resource types' schemas; `az bicep build` does that on a machine with network access.
"""

import sys
from pathlib import Path

from pycep import BicepParser

templates = sorted(Path(__file__).parent.glob("*.bicep"))
if not templates:
    sys.exit("no Bicep templates found")
for template in templates:
    parsed = BicepParser().parse(file_path=template)
    resources = parsed.get("resources", {})
    if not resources:
        sys.exit(f"{template.name}: parsed, but declares no resources")
    print(f"{template.name}: {len(resources)} resources, {len(parsed.get('parameters', {}))} parameters")
