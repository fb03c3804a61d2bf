"""Every fixture of the demos and tests: the tiny base and drafter, the demo data, the preference demo's pairs."""
