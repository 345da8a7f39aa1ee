"""The main job: the paper's English -> German experiment run through the whole system (`python -m demo`).

Not part of the trainer: it starts a Ray head, mixer services and trainer processes, and changes a
ratio with curl, as a user of all three parts would.
"""
