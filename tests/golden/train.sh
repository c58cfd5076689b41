#!/usr/bin/env bash
# train jobs of experiment golden: 3 job(s), one per line; rerunning skips finished jobs.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m phasediagram.execution.worker --experiment-dir checkpoint/golden --stage train --index 0
python -m phasediagram.execution.worker --experiment-dir checkpoint/golden --stage train --index 1
python -m phasediagram.execution.worker --experiment-dir checkpoint/golden --stage train --index 2
