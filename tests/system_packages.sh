#!/usr/bin/env bash
# The distribution packages behind the tests that start real services (a one-node SLURM cluster on
# localhost, a headless browser). Installs whichever are missing, as root through apt-get; elsewhere it
# says what it could not install and exits 0: those tests then skip and name the missing program.
#
#   bash tests/system_packages.sh        # before `python -m pytest`, as .ci/run does
set -uo pipefail
# program to look for -> Debian packages that bring it
declare -A wanted=(
  [slurmctld]="slurm-wlm munge"
  # headless Chromium for the TensorBoard/report page test; with --no-install-recommends it brings no
  # fonts of its own, and DejaVu keeps the screenshots legible
  [chromium]="chromium fonts-dejavu-core"
)
missing=()
for program in "${!wanted[@]}"; do
  command -v "$program" >/dev/null 2>&1 || missing+=(${wanted[$program]})
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system packages: missing ${missing[*]} (need root and apt-get to install them); their tests will skip"
  exit 0
fi
echo "system packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/tmp/ftforget-apt.log 2>&1; then
  echo "system packages: apt-get failed (see /tmp/ftforget-apt.log); their tests will skip"
  tail -n 5 /tmp/ftforget-apt.log
fi
exit 0
