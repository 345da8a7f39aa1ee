# A few minutes on 2 CPU cores (`make demo-quick`, `python -m demo --quick`; tests/test_demo.py runs it):
# the same runs as the default on a tenth of the pages, with small tokenizers, short sequences and a tenth
# of the steps: for seeing the whole system work, not for its figures.

work_dir = "runs/demo-quick"

# corpora and tokenizers
pages_per_language = 150
base_vocab = 1000
new_pieces = 1000

# model and batches
model = "test"
seq_len = 64
global_batch = 8
micro_batch = 8

# steps
phase1_steps = 120
phase2_steps = 40
eval_every = 20
eval_batches = 2
