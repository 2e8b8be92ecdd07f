"""Security and reliability tests: auth, limits, fuzzing, resource bombs, disk full."""
