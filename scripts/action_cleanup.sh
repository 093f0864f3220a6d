#!/usr/bin/env bash
# The Action's last resort (an `if: always()` step of action.yml): stop the run's container if
# it is still there, then complete the check run it opened if it is still in progress (the
# container was killed, ran out of memory or the job was cancelled or timed out before the
# entrypoint could complete it). Runs on the runner itself with bash and curl only.
#
# Environment: CONCLUSION (cancelled or failure), CONTAINER (the run's container name),
# STATE_DIR (holds `check-run`: the check run's API URL while it is open), TOKEN,
# GITHUB_API_URL, GITHUB_RUN_ID, GITHUB_SERVER_URL, GITHUB_REPOSITORY.
set -uo pipefail

if [ -n "${CONTAINER:-}" ] && command -v docker >/dev/null 2>&1; then
  # The entrypoint gets SIGTERM and completes the check run itself if it still can.
  docker stop --time 30 "$CONTAINER" >/dev/null 2>&1 || true
fi

state="${STATE_DIR:-}/check-run"
if [ ! -s "$state" ]; then
  exit 0  # no check run, or the entrypoint completed it
fi
url="$(head -n 1 "$state")"
api="${GITHUB_API_URL:-https://api.github.com}"
case "$url" in
  "$api"/repos/*/check-runs/*) ;;
  *) echo "::warning title=InvarLock::not completing the check run: unexpected address in $state"; exit 0 ;;
esac
case "${CONCLUSION:-failure}" in
  cancelled) title="Cancelled before a verdict was reached" ;;
  *) CONCLUSION=failure; title="No verdict: the certifier stopped before it could report" ;;
esac
run_url="${GITHUB_SERVER_URL:-https://github.com}/${GITHUB_REPOSITORY:-}/actions/runs/${GITHUB_RUN_ID:-}"
summary="The container stopped (cancelled, timed out, killed or out of memory) while the check was in progress. See the [workflow run]($run_url)."
now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
body="$(printf '{"status":"completed","conclusion":"%s","completed_at":"%s","output":{"title":"%s","summary":"%s"}}' \
  "$CONCLUSION" "$now" "$title" "$summary")"
# The token goes through curl's config on stdin, never on the command line.
status="$(printf 'header = "Authorization: Bearer %s"\n' "${TOKEN:-}" | curl --silent --show-error \
  --config - --max-time 60 --retry 3 --retry-all-errors --output /dev/null --write-out '%{http_code}' \
  --request PATCH \
  --header "Accept: application/vnd.github+json" \
  --header "X-GitHub-Api-Version: 2022-11-28" \
  --header "User-Agent: invarlock-action" \
  --header "Content-Type: application/json" \
  --data "$body" "$url")" || status="000"
if [ "$status" = 200 ]; then
  rm -f "$state"
  echo "InvarLock: the check run left in progress was completed as $CONCLUSION"
else
  echo "::warning title=InvarLock::could not complete the check run left in progress (HTTP $status)"
fi
