"""What tests — ours and those of methods written outside this repository — use: servers on loopback."""
