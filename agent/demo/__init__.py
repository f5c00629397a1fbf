"""The demo (``python -m agent.demo``: the real agent on a tiny model) and the tiny checkpoints
it and the tests build: a random one (``tiny_checkpoint``) and one trained for a minute on
the projects' example dialogues (``demo_model``)."""
