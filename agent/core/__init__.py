"""Transport-free conversation core: projects, sessions, prompts, limits, one turn per session in order, output rules, reasoning, metrics. Imports no front door."""
