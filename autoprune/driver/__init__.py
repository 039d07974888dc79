"""The search, driver side and worker side: `search` runs its steps — the shared inputs prepared (`prepare`),
Optuna's sampling (`sampling`), Ray Tune's trials (`tune`, running `worker` on each), checks before anything
starts (`preflight`), resuming a stopped search (`resume`) — and says what it produced (`outcome`)."""
